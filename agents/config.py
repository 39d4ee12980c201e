"""Options from a TOML file, the command line on top.

Every option of a command can be set in its ``--config`` file: the key is
the long option without the dashes (``downtime-ms = 300`` or
``downtime_ms = 300``), the value a TOML string, number, boolean (switches)
or array (repeatable options).  The mapping is generic — it reads the
argparse parser — so an option added to a parser works in a config file
with no further code.  Options given on the command line win.

Errors name the key: ``config /etc/precopy/dest.toml: key 'listen': ...``.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ConfigError", "add_config_args", "load_config", "parse_with_config", "config_values",
           "effective_config"]

_UNSET = object()


class ConfigError(Exception):
    """A config file is unreadable or one of its keys is invalid."""


def add_config_args(p: argparse.ArgumentParser, *, check: bool = True) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file with any of these options as keys (e.g. downtime-ms = 300); "
                        "options on the command line override it (default: none)")
    if check:
        p.add_argument("--check-config", action="store_true",
                       help="validate the configuration (file and command line), print the "
                            "effective options and exit: 0 valid, 2 not")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every long option that can be configured."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:  # argparse has no public accessor for its actions
        if not a.option_strings or a.dest in ("help", "config", "check_config"):
            continue
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        out[a.dest] = a
    return out


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """One TOML value -> what argparse would have stored for it."""
    where = f"key {key!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: a switch takes true or false, not {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {value!r}")
        return [_convert_one(action, where, v) for v in value]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    return _convert_one(action, where, value)


def _convert_one(action: argparse.Action, where: str, value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ConfigError(f"{where}: expected a {getattr(action.type, '__name__', 'string')}, got {value!r}")
    typ = action.type
    if typ is float and isinstance(value, (int, float)):
        out: Any = float(value)
    elif typ is int and isinstance(value, int):
        out = value
    elif typ in (int, float) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a {typ.__name__}, got {value!r}")
    else:
        text = value if isinstance(value, str) else str(value)
        try:
            out = typ(text) if callable(typ) else text
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except (ValueError, TypeError) as exc:
            if typ in (int, float):  # Python's own message ("could not convert ...") names no remedy
                raise ConfigError(f"{where}: {value!r} is not a number (write e.g. {key_of(where)} = "
                                  f"{'120' if typ is float else '8'}, without quotes)") from None
            raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and out not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    return out


def key_of(where: str) -> str:
    """``key 'idle-timeout'`` -> ``idle-timeout``."""
    return where.split("'")[1] if where.count("'") >= 2 else where


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML file; raises :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def config_values(parser: argparse.ArgumentParser, data: dict[str, Any]) -> dict[str, Any]:
    """Validate a key -> value mapping against ``parser``; returns dest -> value.

    Raises :class:`ConfigError` naming the first bad key.  Also used for the
    source daemon's ``start`` requests, which carry options the same way.
    """
    actions = _actions(parser)
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise ConfigError(f"key {key!r} is not an option of {parser.prog} "
                              f"(known: {', '.join(sorted(d.replace('_', '-') for d in actions))})")
        out[dest] = _convert(action, str(key), value)
    return out


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      values: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse ``argv`` on top of the ``--config`` file (or of ``values``).

    Exits with argparse's usage error (status 2) on a bad command line or a
    bad config key.  The returned namespace has ``config_values``: the dests
    that came from the file.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    conf: dict[str, Any] = dict(values or {})
    if known.config is not None:
        try:
            conf.update(config_values(parser, load_config(known.config)))
        except ConfigError as exc:
            msg = str(exc)
            msg = msg if msg.startswith("config") else f"config {known.config}: {msg}"
            parser.exit(2, f"{parser.prog}: error: {msg}\n")  # one line: the key says what to fix
    actions = _actions(parser)
    # What the file provides is no longer required on the command line.
    for dest in conf:
        actions[dest].required = False
    groups = list(parser._mutually_exclusive_groups)
    relaxed = [g for g in groups if g.required and any(a.dest in conf for a in g._group_actions)]
    for g in relaxed:
        g.required = False
    # Parse with every dest preset to a marker, to learn what the command
    # line set: argparse only fills defaults for attributes that are missing.
    # (--help and --version store nothing: their default is SUPPRESS.)
    stored = [a for a in parser._actions if a.dest != argparse.SUPPRESS and a.default != argparse.SUPPRESS]
    # (A repeatable option appends to what is there: its marker is None, from which argparse starts a list.)
    appends = {a.dest for a in stored if isinstance(a, argparse._AppendAction)}
    ns = argparse.Namespace(**{a.dest: None if a.dest in appends else _UNSET for a in stored})
    args = parser.parse_args(argv, namespace=ns)
    given = {d for d, v in vars(args).items() if v is not _UNSET and not (d in appends and v is None)}
    for g in groups:
        members = [a.dest for a in g._group_actions]
        if any(d in given for d in members):
            for d in members:  # the command line picks one; drop the file's choice
                if d not in given:
                    conf.pop(d, None)
        elif sum(1 for d in members if d in conf) > 1:
            parser.error("config: only one of " + ", ".join(d.replace("_", "-") for d in members)
                         + " may be set")
    for a in stored:
        if a.dest in given:
            continue
        if a.dest in conf:
            setattr(args, a.dest, conf[a.dest])
        else:
            default = a.default
            if isinstance(default, str) and callable(a.type):
                default = a.type(default)
            setattr(args, a.dest, default)
    for g in relaxed:
        if not any(getattr(args, a.dest) is not None for a in g._group_actions):
            parser.error("one of " + ", ".join(a.option_strings[0] for a in g._group_actions)
                         + " is required (on the command line or in --config)")
    args.config_values = sorted(conf)
    return args


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], int):  # HOST:PORT
        host = f"[{v[0]}]" if ":" in str(v[0]) else str(v[0])
        return _toml_value(f"{host}:{v[1]}")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def effective_config(args: argparse.Namespace) -> str:
    """The options in effect, as TOML a --config file accepts (unset ones omitted)."""
    lines = []
    for dest, v in sorted(vars(args).items()):
        if dest in ("config", "check_config", "config_values") or v is None or v == argparse.SUPPRESS:
            continue
        lines.append(f"{dest.replace('_', '-')} = {_toml_value(v)}")
    return "\n".join(lines)

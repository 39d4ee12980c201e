"""precopy-install: put the operator files that ship with precopy where they belong.

    precopy-install --list                               # what ships, and where it is here
    precopy-install [--root DIR] [--force] [WHAT ...]    # WHAT: systemd, config, on-resume (default: all)

* ``systemd``: ``precopy-dest.service`` and ``precopy-source.service`` into
  ROOT/etc/systemd/system/, their ``ExecStart`` pointing at this
  installation's ``precopy-dest`` and ``precopy-source``.
* ``config``: the example configs into ROOT/etc/precopy/ (``dest.toml``,
  ``source.toml``).
* ``on-resume``: ``move-address.sh`` (an ``--on-resume`` step that moves a
  service address) into ROOT/usr/local/lib/precopy/.

An existing file is left alone (and named) unless ``--force``.  The OCF
resource agent is installed by ``precopy-ocf install``.  The files ship in
the package as ``precopy_agents/contrib/`` (in a source checkout:
``contrib/``).
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

from .common import add_version_arg

__all__ = ["contrib_dir", "main", "FILES"]

#: what -> (file under contrib/, directory under the root, mode)
FILES: dict[str, list[tuple[str, str, int]]] = {
    "systemd": [("systemd/precopy-dest.service", "etc/systemd/system", 0o644),
                ("systemd/precopy-source.service", "etc/systemd/system", 0o644)],
    "config": [("config/dest.toml", "etc/precopy", 0o644),
               ("config/source.toml", "etc/precopy", 0o644)],
    "on-resume": [("on-resume/move-address.sh", "usr/local/lib/precopy", 0o755)],
}

#: The units name the scripts where ``pip install`` as root puts them.
_UNIT_BIN = "/usr/local/bin/"


def contrib_dir() -> Path:
    """The operator files: inside the installed package, or contrib/ of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "contrib", here.parent / "contrib"):
        if (candidate / "systemd").is_dir():
            return candidate
    raise FileNotFoundError(f"the operator files are neither in {here / 'contrib'} nor in {here.parent / 'contrib'}")


def _scripts_dir() -> Path | None:
    """Where this installation's console scripts are (None: not found)."""
    for base in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (base / "precopy-dest").exists():
            return base
    return None


def _text(rel: str, scripts: Path | None) -> str:
    text = (contrib_dir() / rel).read_text()
    if rel.endswith(".service") and scripts is not None:
        text = text.replace(_UNIT_BIN, f"{scripts}/")
    return text


def install(root: Path, what: list[str], force: bool) -> list[str]:
    """Write the files of ``what`` under ``root``; one line per file saying what happened."""
    scripts = _scripts_dir()
    done = []
    for name in what:
        for rel, directory, mode in FILES[name]:
            target = root / directory / Path(rel).name
            if target.exists() and not force:
                done.append(f"kept     {target} (it exists; --force replaces it)")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(_text(rel, scripts))
            os.chmod(tmp, mode)
            os.replace(tmp, target)
            done.append(f"wrote    {target}")
    if "systemd" in what:
        done.append("then:    systemctl daemon-reload; systemctl enable --now precopy-dest (or precopy-source)")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="precopy-install",
        description="Install the operator files that ship with precopy: systemd units, example "
                    "configs, the on-resume address mover.  The OCF resource agent: precopy-ocf install.",
        epilog="Exit codes: 0 done; 1 a file could not be written; 2 usage.")
    p.add_argument("what", nargs="*", metavar="WHAT",
                   help=f"what to install: {', '.join(FILES)} (default: all)")
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="install under this directory instead of / (default: /)")
    p.add_argument("--force", action="store_true", help="replace files that exist (default: keep them)")
    p.add_argument("--list", action="store_true", help="list the files and where they are in this installation")
    add_version_arg(p)
    args = p.parse_args(argv)
    unknown = [w for w in args.what if w not in FILES]
    if unknown:
        p.error(f"unknown WHAT {', '.join(unknown)}: use {', '.join(FILES)}")
    if args.list:
        base = contrib_dir()
        for name, files in FILES.items():
            for rel, directory, _ in files:
                print(f"{name:10} {base / rel}  ->  /{directory}/{Path(rel).name}")
        return 0
    try:
        for line in install(args.root, args.what or list(FILES), args.force):
            print(line)
    except OSError as exc:
        print(f"precopy-install: cannot write under {args.root}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

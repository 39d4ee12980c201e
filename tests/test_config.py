"""--config TOML files, --check-config, and --help of every command."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from precopy_agents import ctl, dest_main, source_daemon, source_main
from precopy_agents.config import ConfigError, config_values, parse_with_config

from .conftest import ENV, PY, ROOT, Procs, create_region, guest, run_source, start_dest


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "conf.toml"
    p.write_text(text)
    return p


def test_every_flag_maps_from_toml_and_the_command_line_wins(tmp_path: Path) -> None:
    conf = _toml(tmp_path, """
to = "10.0.0.2:7070"
memory = "/dev/shm/g"
pid = 4242
downtime-ms = 150
max_rounds = 5
compress = "off"
dry-run = true
""")
    args = parse_with_config(source_main.build_parser(), ["--config", str(conf), "--max-rounds", "9"])
    assert args.to == ("10.0.0.2", 7070)
    assert args.memory == Path("/dev/shm/g")
    assert args.pid == 4242 and args.guest_control is None
    assert args.downtime_ms == 150.0 and isinstance(args.downtime_ms, float)
    assert args.max_rounds == 9  # the command line overrides the file
    assert args.compress == "off" and args.dry_run is True
    assert args.batch_pages == 256  # untouched default
    assert args.log_format == "auto"


def test_throttle_options_from_toml_reach_the_engine(tmp_path: Path) -> None:
    region = tmp_path / "g.mem"
    region.write_bytes(b"\0" * 4096)
    conf = _toml(tmp_path, f"""
to = "10.0.0.2:7070"
memory = "{region}"
guest-control = "/run/g.sock"
throttle = "off"
throttle-ramp = "step"
throttle-initial = 30
throttle_step = 5
throttle-max = 80
""")
    args = parse_with_config(source_main.build_parser(), ["--config", str(conf), "--throttle-max", "90"])
    opts, _ = source_main.make_migration(args)
    assert (opts.throttle, opts.throttle_initial_pct, opts.throttle_step_pct, opts.throttle_max_pct) == \
        ("off", 30, 5, 90)
    assert opts.throttle_ramp == "step"
    defaults = parse_with_config(source_main.build_parser(), ["--to", "h:1", "--memory", str(region),
                                                               "--guest-control", "/run/g.sock"])
    opts, _ = source_main.make_migration(defaults)
    assert (opts.throttle, opts.throttle_initial_pct, opts.throttle_step_pct, opts.throttle_max_pct) == \
        ("auto", 20, 10, 99)
    assert opts.throttle_ramp == "predict"
    assert opts.max_downtime_ms is None
    capped = parse_with_config(source_main.build_parser(), ["--config", str(conf), "--downtime-ms", "50",
                                                             "--max-downtime-ms", "80"])
    assert source_main.make_migration(capped)[0].max_downtime_ms == 80.0
    bad = parse_with_config(source_main.build_parser(), ["--config", str(conf), "--throttle-initial", "95"])
    with pytest.raises(ValueError, match="initial <= max"):
        source_main.make_migration(bad)


def test_flags_added_to_a_parser_work_in_config_without_code(tmp_path: Path) -> None:
    p = source_main.build_parser()
    p.add_argument("--example-flag", choices=["one", "two"], default="one", help="(default one)")
    conf = _toml(tmp_path, 'to = "h:1"\nmemory = "/m"\npid = 7\nexample-flag = "two"\n')
    assert parse_with_config(p, ["--config", str(conf)]).example_flag == "two"


def test_command_line_picks_the_workload_over_the_file(tmp_path: Path) -> None:
    conf = _toml(tmp_path, 'to = "h:1"\nmemory = "/m"\npid = 7\n')
    args = parse_with_config(source_main.build_parser(), ["--config", str(conf), "--guest-control", "/s"])
    assert args.guest_control == Path("/s") and args.pid is None


@pytest.mark.parametrize("text, message", [
    ('downtime-ms = "fast"\n', "key 'downtime-ms'"),
    ('to = "nohost"\n', "key 'to': 'nohost' is not HOST:PORT"),
    ('compress = "zstd"\n', "key 'compress': 'zstd' is not one of off, lz4, auto"),
    ('dry-run = "yes"\n', "key 'dry-run': a switch takes true or false"),
    ('max-rounds = 2.5\n', "key 'max-rounds': expected a int"),
    ('no-such-flag = 1\n', "key 'no-such-flag' is not an option of precopy-source"),
    ('pid = [1, 2]\n', "key 'pid': expected a single value"),
])
def test_bad_keys_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        import tomllib

        config_values(source_main.build_parser(), tomllib.loads(text))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_check_config_dest(tmp_path: Path) -> None:
    good = _toml(tmp_path, f'listen = "127.0.0.1:7070"\nmemory-dir = "{tmp_path}/in"\nidle-timeout = 30\n')
    r = _run("-m", "precopy_agents.dest_main", "--config", str(good), "--check-config")
    assert r.returncode == 0, r.stderr
    assert 'listen = "127.0.0.1:7070"' in r.stdout and "idle-timeout = 30.0" in r.stdout
    assert "configuration OK" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = "127.0.0.1:7070"\nmemory-dir = "/x"\nidle-timeout = "soon"\n')
    r = _run("-m", "precopy_agents.dest_main", "--config", str(bad), "--check-config")
    assert r.returncode == 2 and "key 'idle-timeout'" in r.stderr
    bad.write_text('listen = "127.0.0.1:7070"\nmemory-dir = "/proc/no/such"\n')
    r = _run("-m", "precopy_agents.dest_main", "--config", str(bad), "--check-config")
    assert r.returncode == 2 and "key 'memory-dir'" in r.stderr
    bad.write_text(f'listen = "127.0.0.1:7070"\nmemory-dir = "{tmp_path}"\nauth-key-file = "/no/key"\n')
    r = _run("-m", "precopy_agents.dest_main", "--config", str(bad), "--check-config")
    assert r.returncode == 2 and "key 'auth-key-file'" in r.stderr
    bad.write_text("listen = \n")
    r = _run("-m", "precopy_agents.dest_main", "--config", str(bad), "--check-config")
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = _run("-m", "precopy_agents.dest_main", "--memory-dir", "/x", "--check-config")
    assert r.returncode == 2 and "--listen" in r.stderr


def test_check_config_source_and_serve(tmp_path: Path) -> None:
    region = tmp_path / "g.mem"
    region.write_bytes(b"\0" * 8192)
    conf = _toml(tmp_path, f'to = "127.0.0.1:1"\nmemory = "{region}"\npid = {__import__("os").getpid()}\n')
    r = _run("-m", "precopy_agents.source_main", "--config", str(conf), "--check-config")
    assert r.returncode == 0, r.stderr
    serve = tmp_path / "serve.toml"
    serve.write_text(f'control = "{tmp_path}/c.sock"\n[migration]\ndowntime-ms = 50\n')
    r = _run("-m", "precopy_agents.source_main", "serve", "--config", str(serve), "--check-config")
    assert r.returncode == 0, r.stderr
    assert "downtime-ms = 50" in r.stdout
    serve.write_text('[migration]\ndowntime-ms = "x"\n')
    r = _run("-m", "precopy_agents.source_main", "serve", "--config", str(serve), "--check-config")
    assert r.returncode == 2 and "key 'downtime-ms'" in r.stderr


def test_one_shot_migration_from_a_config_file(procs: Procs, work: Path) -> None:
    region = work / "g.mem"
    create_region(region, "4M")
    g = procs.start(*guest("dirty", "--memory", str(region), "--rate", "200"))
    dest = start_dest(procs, work)
    conf = _toml(work, f'to = "{dest.addr}"\nmemory = "{region}"\npid = {g.pid}\ndowntime-ms = 200\n')
    code, rep, out = run_source(work, "--config", str(conf))
    assert code == 0, out
    assert rep is not None and rep["downtime_budget_ms"] == 200.0
    assert (dest.memory_dir / "g.mem").read_bytes() == region.read_bytes()


def _all_parsers() -> list[argparse.ArgumentParser]:
    parsers = [source_main.build_parser(), dest_main.build_parser(), source_daemon.build_parser()]
    top = ctl.build_parser()
    parsers.append(top)
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.extend(action.choices.values())
    return parsers


def test_every_option_explains_its_default() -> None:
    """Each option's help names its default, or says it is required, or it is a pure switch."""
    for p in _all_parsers():
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction)):
                assert a.help, f"{p.prog} {a.option_strings}: no help"
                continue
            text = (a.help or "").lower()
            assert "default" in text or "required" in text, f"{p.prog} {a.option_strings or a.dest}: {a.help!r}"


def test_help_of_every_command_runs() -> None:
    for argv in (["-m", "precopy_agents.source_main", "--help"], ["-m", "precopy_agents.dest_main", "--help"],
                 ["-m", "precopy_agents.source_main", "serve", "--help"], ["-m", "precopy_agents.source_main", "ctl", "--help"],
                 ["-m", "precopy_agents.source_main", "ctl", "start", "--help"]):
        r = _run(*argv)
        assert r.returncode == 0 and "usage:" in r.stdout, (argv, r.stderr)

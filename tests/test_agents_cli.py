"""precopy-source's exit-code contract, with the engine replaced by fakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

import precopy_agents.source_main as source_main
from precopy_agents.common import EXIT_ABORTED, EXIT_IN_DOUBT, EXIT_OK, EXIT_USAGE, parse_hostport
from precopy.errors import AbortCode, MigrationAborted, MigrationInDoubt
from precopy.session.report import MigrationReport


@pytest.fixture
def sleeper() -> Iterator[int]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pid: int, outcome: Any) -> tuple[int, dict[str, Any]]:
    region = tmp_path / "r.mem"
    region.write_bytes(bytes(8192))
    report = tmp_path / "report.json"

    async def fake_migrate(opts: Any, workload: Any, progress: Any = None) -> MigrationReport:
        rep = MigrationReport(migration_id=str(opts.migration_id), outcome="committed")
        if isinstance(outcome, BaseException):
            rep.outcome = "aborted" if isinstance(outcome, MigrationAborted) else "in-doubt"
            outcome.report = rep  # type: ignore[attr-defined]
            raise outcome
        return rep

    monkeypatch.setattr(source_main, "migrate", fake_migrate)
    code = source_main.main(["--to", "127.0.0.1:1", "--memory", str(region), "--pid", str(pid),
                             "--report", str(report), "--progress", "off", "--log-format", "json"])
    return code, json.loads(report.read_text())


@pytest.mark.parametrize("outcome,code,label", [
    (None, EXIT_OK, "committed"),
    (MigrationAborted("rolled back", AbortCode.NOT_CONVERGED), EXIT_ABORTED, "aborted"),
    (MigrationInDoubt("no answer", AbortCode.LINK), EXIT_IN_DOUBT, "in-doubt"),
])
def test_exit_codes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sleeper: int,
                    outcome: Any, code: int, label: str) -> None:
    got, rep = _run(monkeypatch, tmp_path, sleeper, outcome)
    assert got == code
    assert rep["outcome"] == label


def test_usage_errors(tmp_path: Path, sleeper: int, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert source_main.main(["--to", "h:1", "--memory", str(missing), "--pid", str(sleeper)]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    region = tmp_path / "r"
    region.write_bytes(bytes(4096))
    key = tmp_path / "short.key"
    key.write_text("short")
    key.chmod(0o600)
    assert source_main.main(["--to", "h:1", "--memory", str(region), "--pid", str(sleeper),
                             "--auth-key-file", str(key)]) == EXIT_USAGE
    assert "use at least 16" in capsys.readouterr().err
    assert source_main.main(["--to", "h:1", "--memory", str(region), "--pid", str(sleeper),
                             "--name", "../evil"]) == EXIT_USAGE
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as ei:
        source_main.main(["--to", "h:1", "--memory", str(region)])  # no --pid/--guest-control
    assert ei.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err and "--help" in err, err  # one line, no usage block
    odd = tmp_path / "odd"
    odd.write_bytes(bytes(4097))
    assert source_main.main(["--to", "h:1", "--memory", str(odd), "--pid", str(sleeper)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4097 bytes" in err and "multiple of 4096" in err, err


def test_summary_of_a_migration_that_moved_nothing_is_short() -> None:
    rep = MigrationReport(migration_id="m1", outcome="aborted", error="cannot connect to h:1: refused")
    assert source_main.summary(rep).splitlines() == [
        "migration m1: aborted, before any page moved", "  error       cannot connect to h:1: refused"]


def test_summary_says_what_became_of_the_source_copy() -> None:
    from precopy.session.report import RoundReport

    rnd = RoundReport(round=0, kind="full", pages_scanned=1, pages_dirty=1, pages_sent=1, zero_pages=0,
                      bytes_on_wire=4096, seconds=0.1)
    rep = MigrationReport(migration_id="m2", outcome="committed", workload="pid 4242 (SIGSTOP/SIGCONT)",
                          downtime_ms=12.0, rounds=[rnd], bytes_on_wire=4096, pages_sent=1)
    assert "left stopped (pid 4242 (SIGSTOP/SIGCONT); --on-commit keep-stopped)" in source_main.summary(rep)
    assert source_main.summary(rep).endswith("release it: kill -KILL 4242")
    rep.on_commit = "kill"
    assert "source copy ended at the commit (--on-commit kill)" in source_main.summary(rep)
    # A report read back from its JSON (as ctl does with the daemon's) says the same.
    again = MigrationReport.from_dict({**json.loads(rep.to_json()), "options": {"pid": 4242}})
    assert again == rep and source_main.summary(again) == source_main.summary(rep)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:7070") == ("127.0.0.1", 7070)
    assert parse_hostport("[::1]:80") == ("::1", 80)
    for bad in ("nohost", ":80", "h:port", "h:70000"):
        with pytest.raises(Exception):
            parse_hostport(bad)


def test_dest_help_mentions_the_hook_environment() -> None:
    out = subprocess.run([sys.executable, "-m", "precopy_agents.dest_main", "--help"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert out.returncode == 0
    for name in ("PRECOPY_MEMORY", "PRECOPY_DEVICE_STATE", "PRECOPY_MIGRATION_ID", "--on-resume"):
        assert name in out.stdout


_LARGE_FREES = """
import sys
import numpy as np
from precopy_agents.common import return_large_frees
if sys.argv[1] == "fixed":
    assert return_large_frees()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
a = np.ones(8 << 20, np.uint8)
del a  # glibc raises its mmap threshold past 8 MiB here, unless it is fixed
base = rss()
for _ in range(4):
    b = np.ones(6 << 20, np.uint8)
    del b
print((rss() - base) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_agents_give_large_freed_arrays_back_to_the_system() -> None:
    """The agents' NumPy temporaries of a few MiB are unmapped when freed, not kept in the heap."""
    kept = {how: int(subprocess.run([sys.executable, "-c", _LARGE_FREES, how], capture_output=True, text=True,
                                    check=True, cwd=Path(__file__).resolve().parent.parent).stdout)
            for how in ("default", "fixed")}
    assert kept["default"] >= 5  # what the test shows: glibc's default keeps the freed 6 MiB
    assert kept["fixed"] == 0

"""Logs: human-readable on a TTY, JSON lines otherwise; the source's progress line."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from precopy_agents.common import ProgressLine, setup_logging

from .conftest import ENV, PY, ROOT, Procs, create_region, guest, start_dest


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def _emit(monkeypatch: pytest.MonkeyPatch, stream: object, fmt: str) -> None:
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("info", fmt)
    logging.getLogger("precopy-test").warning("region %s is %d MiB", "g.mem", 64)


def test_json_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    for fmt in ("auto", "json"):
        buf = io.StringIO()
        _emit(monkeypatch, buf, fmt)
        rec = json.loads(buf.getvalue().splitlines()[-1])
        assert rec["level"] == "warning" and rec["logger"] == "precopy-test"
        assert rec["msg"] == "region g.mem is 64 MiB" and isinstance(rec["ts"], float)


def test_text_on_a_terminal(monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        _emit(monkeypatch, tty, "auto")
        tty.flush()
        out = os.read(master, 4096).decode()
    os.close(master)
    assert "WARNING region g.mem is 64 MiB" in out and not out.lstrip().startswith("{")
    buf = io.StringIO()
    _emit(monkeypatch, buf, "text")
    assert "WARNING region g.mem is 64 MiB" in buf.getvalue()


def _progress(**kw: object) -> SimpleNamespace:
    base = dict(phase="iterating", round=3, pages_done=500, pages_todo=1000, dirty_pages=1234,
                bandwidth_bps=118e6, dirty_rate_pps=2000.0, expected_downtime_ms=42.0, elapsed_s=1.0,
                eta_s=0.5, page_rate_bps=117e6, throttle_pct=0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_progress_line_shows_round_dirty_rate_downtime_eta() -> None:
    buf = io.StringIO()
    line = ProgressLine(stream=buf, enabled=True)
    line(_progress())
    out = buf.getvalue()
    assert out.startswith("\r")
    for part in ("round 3", "50.0%", "117.0 MB/s", "link 118 MB/s", "dirty 1234 pages (2000/s)",
                 "expected downtime 42 ms", "ETA 0.5 s"):
        assert part in out, (part, out)
    line.done()
    assert buf.getvalue().endswith("\n")
    quiet = io.StringIO()
    ProgressLine(stream=quiet, enabled=False)(_progress())
    assert quiet.getvalue() == ""


def test_progress_line_shows_a_throttle_only_when_there_is_one() -> None:
    for pct, shown in ((0, False), (40, True)):
        buf = io.StringIO()
        ProgressLine(stream=buf, enabled=True)(_progress(throttle_pct=pct))
        assert ("throttle 40%" in buf.getvalue()) is shown, buf.getvalue()
        assert "throttle" in buf.getvalue() or not shown


def test_summary_shows_a_throttle_only_when_there_was_one() -> None:
    from precopy_agents.source_main import summary
    from precopy.session.report import MigrationReport, RoundReport

    rep = MigrationReport(migration_id="m", outcome="committed", rounds=[
        RoundReport(round=i, kind="iterative", pages_scanned=1, pages_dirty=1, pages_sent=1, zero_pages=0,
                    bytes_on_wire=1, seconds=0.1, throttle_pct=pct) for i, pct in enumerate((0, 0, 20, 30, 0))])
    assert "throttle" not in summary(rep)
    rep.max_throttle_pct = 30
    assert "throttle    up to 30 % of the workload's time stopped, in 2 rounds (2-3)" in summary(rep)
    rep.rounds = rep.rounds[:2]  # cut short in the first throttled round
    assert "throttle    up to 30 % of the workload's time stopped\n" in summary(rep)


def test_a_log_line_erases_the_progress_line_first(restore_logging: None) -> None:
    buf = io.StringIO()
    logging.getLogger().handlers[:] = [logging.StreamHandler(buf)]
    line = ProgressLine(stream=buf, enabled=True)
    line(_progress())
    logging.getLogger("precopy-test").warning("something happened")
    assert buf.getvalue().endswith("\r" + " " * len(buf.getvalue().split("\r")[1]) + "\rsomething happened\n")
    line.done()
    assert not logging.getLogger().handlers[0].filters


def test_progress_line_is_on_by_default_only_on_a_terminal() -> None:
    assert ProgressLine(stream=io.StringIO()).enabled is False
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            assert ProgressLine(stream=tty).enabled is True
    finally:
        os.close(master)


def test_source_shows_progress_while_migrating(procs: Procs, work: Path) -> None:
    region = work / "g.mem"
    create_region(region, "32M")
    g = procs.start(*guest("dirty", "--memory", str(region), "--rate", "500"))
    dest = start_dest(procs, work)
    r = subprocess.run([PY, "-m", "precopy_agents.source_main", "--to", dest.addr, "--memory", str(region),
                        "--pid", str(g.pid), "--progress", "on", "--log-format", "text"],
                       env=ENV, cwd=ROOT, capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "\rfull copy  100.0%" in err and "MB/s" in err, repr(err)
    # human-readable lines, at the start of a line (after a newline, or the erased progress line)
    assert re.search(r"[\r\n]HH:MM:SS INFO    committed", re.sub(r"\d\d:\d\d:\d\d", "HH:MM:SS", err)), repr(err)
    assert "\rswitchover after " in err, repr(err)  # the progress line says when the workload is paused
    # each log line starts on a clean line: the progress line is erased before it
    assert re.search(r"MB/s[^\r\n]*\d\d:\d\d:\d\d INFO", err) is None, repr(err)

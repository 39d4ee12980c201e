"""Shared fixtures: real processes on loopback, cleaned up by PID."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
#: PY for a shell command line (a hook): quoted, as a checkout's path may hold spaces.
SH_PY = shlex.quote(PY)
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """At the end of the run: which tests were skipped, why, and the command that enables them."""
    from .skipsummary import skip_summary

    skips = []
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        skips.append((rep.nodeid, str(reason)))
    ci_run = ROOT / ".ci" / "run"
    lines = skip_summary(skips, ci_run.read_text() if ci_run.exists() else "", shutil.which)
    if lines:
        terminalreporter.section("skipped tests", sep="-")
        for line in lines:
            terminalreporter.write_line(line)


#: Under pytest-xdist (``make test``: two workers, a file at a time) the files that take longest run
#: first, so that the last file to start is a short one and both workers end near the same time
#: (each file's tests keep their order).  Longest first, from ``pytest --durations=0`` on 2 cores.
LONG_FILES_FIRST = (
    "test_faults.py", "test_cluster.py", "test_tracking.py", "test_postcopy_matrix.py", "test_throttle_integration.py",
    "test_soak.py", "test_integration.py", "test_source_daemon.py", "test_wire_faults.py", "test_wire.py",
    "test_guest.py", "test_drain.py", "test_fault_signals.py", "test_fuzz_session.py", "test_readme.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker: the order as collected
        return
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


def wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll ``pred`` until true; the timeout only bounds a hang (a daemon's start, a Python import
    took over 10 s at load 15 with two test workers), it never times what a test proves."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def proc_state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rindex(b")") + 2:][:1].decode()


class Procs:
    """Processes a test started; all stopped at teardown, by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, **kw) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
        kw.setdefault("env", ENV)
        kw.setdefault("cwd", ROOT)
        p = subprocess.Popen([PY, *args], **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    p.terminate()
                    p.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait()


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    try:
        yield ps
    finally:
        ps.stop_all()


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory in RAM (falls back to tmp_path)."""
    base = Path("/dev/shm")
    if not base.is_dir():
        yield tmp_path
        return
    d = base / f"precopy-test-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def work(shm: Path) -> Path:
    """Where a test keeps its source regions."""
    d = shm / "src"
    d.mkdir()
    return d


@pytest.fixture
def dest_dir(shm: Path) -> Path:
    """The destination's --memory-dir (created by the server)."""
    return shm / "dest"


class Dest:
    def __init__(self, proc: subprocess.Popen[bytes], addr: str, memory_dir: Path, log: Path) -> None:
        self.proc, self.addr, self.memory_dir, self.log = proc, addr, memory_dir, log

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def start_dest(procs: Procs, work: Path, *extra: str, loop: str = "uvloop", ready_timeout: float = 10.0) -> Dest:
    memdir = work / "dest"
    ready = work / f"dest-{time.monotonic_ns()}.addr"
    log = work / "dest.log"
    p = procs.start("-m", "precopy_agents.dest_main", "--listen", "127.0.0.1:0", "--memory-dir", str(memdir),
                    "--ready-file", str(ready), "--event-loop", loop, "--log-format", "json",
                    "--log-level", "debug", *extra,
                    stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    wait_for(lambda: ready.exists() and ready.read_text().endswith("\n") or p.poll() is not None,
             timeout=ready_timeout, what="precopy-dest to listen")
    assert p.poll() is None, f"precopy-dest died: {log.read_text()}"
    return Dest(p, ready.read_text().strip(), memdir, log)


def run_source(work: Path, *args: str, timeout: float = 120) -> tuple[int, dict | None, str]:  # type: ignore[type-arg]
    report = work / f"report-{time.monotonic_ns()}.json"
    try:
        r = subprocess.run([PY, "-m", "precopy_agents.source_main", *args, "--report", str(report),
                            "--log-format", "json", "--progress", "off"],
                           env=ENV, cwd=ROOT, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        # The source's last log lines say what it waited for (pytest cuts the exception's repr short).
        out = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace")
        raise AssertionError(f"precopy-source still running after {timeout:.0f} s; its last output:\n"
                             + out[-6000:]) from None
    rep = json.loads(report.read_text()) if report.exists() else None
    return r.returncode, rep, (r.stdout + r.stderr).decode(errors="replace")


def guest(*args: str) -> list[str]:
    return ["-m", "precopy.guest", *args]


def create_region(path: Path, size: str, content: str = "random", seed: int = 0) -> None:
    """What ``precopy-guest create`` writes, written here: the same function, without a Python
    started (with numpy) for each region; tests/test_guest.py runs the command itself."""
    from precopy.guest.region import create_region as create, parse_size

    create(path, parse_size(size), content, seed)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs an agent's main() in-process gets its setup_logging() handler, on the
    stream pytest captured for that test; left in place, every later test's log lines would hit
    the closed stream ("--- Logging error --- ValueError: I/O operation on closed file")."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

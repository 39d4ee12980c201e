"""Post-copy's failure semantics (docs/FAILURES.md "Post-copy") with real agents, real guests and the
fault proxy, beside the fault matrix (tests/test_postcopy_matrix.py: cut, stall, SIGKILL of either
agent at every phase): an interrupted source agent's guardian serves the pages; a destination guest
that never comes aborts before it ran; a destination that stays down ends in doubt with the source's
copy paused.  Every post-copy that finishes is
checked by the det guest's digest (equal to an unmigrated run's).  No timing assertions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from precopy.protocol import Kind

from .conftest import ENV, PY, ROOT, Procs, proc_state, start_dest, wait_for
from .faultproxy import S2C, Fault, FaultProxy
from .test_faults import dport
from .test_postcopy import STEPS, det_hook, det_source, reference_digest

pytestmark = pytest.mark.integration


class Source:
    """precopy-source as a process (its pid is needed to kill it)."""

    def __init__(self, shm: Path, *args: str) -> None:
        self.report = shm / f"report-{time.monotonic_ns()}.json"
        self.log = shm / "source.log"
        self.proc = subprocess.Popen([PY, "-m", "precopy_agents.source_main", *args, "--report", str(self.report),
                                      "--log-format", "json", "--progress", "off"],
                                     env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))

    def finish(self, timeout: float = 180) -> tuple[int, dict[str, Any] | None, str]:
        rc = self.proc.wait(timeout)
        rep = json.loads(self.report.read_text()) if self.report.exists() else None
        return rc, rep, self.log.read_text()


def guest_pid_hook(out: Path, pidfile: Path) -> str:
    """The det hook, recording the resumed guest's pid (the destination daemon, not the test, starts it)."""
    return f"echo $$ > {pidfile}; " + det_hook(out)


def kill_pidfile(pidfile: Path) -> None:
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def after_postcopy(kind: Kind = Kind.PAGES) -> tuple[Fault, threading.Event]:
    """A flag set once POSTCOPY went by, for a fault on the post-copy frames that follow it."""
    seen = threading.Event()
    return Fault("call", kind=Kind.POSTCOPY, callback=seen.set), seen


# (cut, stall, a lost COMPLETE and SIGKILL at every phase: tests/test_postcopy_matrix.py)
@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["interrupted"])
def test_a_dead_source_agent_s_guardian_serves_the_pages(procs: Procs, shm: Path, sig: signal.Signals) -> None:
    expected = reference_digest(procs, shm)
    out, pidfile = shm / "resumed.json", shm / "guest.pid"
    dest = start_dest(procs, shm, "--on-resume", guest_pid_hook(out, pidfile))
    src, ctl = det_source(procs, shm)
    box: dict[str, Source] = {}

    def kill_source() -> None:
        box["s"].proc.send_signal(sig)

    # The source dies (or is interrupted) the moment the destination says the workload runs there.
    fault = Fault("kill" if sig == signal.SIGKILL else "delay", kind=Kind.COMMITTED, direction=S2C,
                  callback=kill_source, seconds=0.5)
    try:
        with FaultProxy(("127.0.0.1", dport(dest)), [fault]) as proxy:
            box["s"] = Source(shm, "--to", proxy.addr, "--memory", str(src), "--guest-control", str(ctl),
                              "--postcopy", "now")
            rc, rep, log = box["s"].finish()
            if sig == signal.SIGKILL:
                assert rc == -signal.SIGKILL, log
            else:  # interrupted: in doubt, and the guardian takes the stream up
                assert rc == 4 and rep is not None and rep["outcome"] == "in-doubt", log
            # The guardian takes the page stream up (RESUME through the proxy: a new connection passes).
            wait_for(out.exists, timeout=120, what="the resumed det guest to finish (pages from the guardian)")
        assert json.loads(out.read_text()) == {"steps": STEPS, "digest": expected}
        wait_for(lambda: '"postcopy": "complete"' in "".join(
            p.read_text() for p in (dest.memory_dir / ".precopy" / "journal").glob("*.json")),
            what="the destination to record the post-copy complete")
        # The source's copy was never resumed: it did not run to its end.
        assert "digest" not in ((shm / "det.out").read_text() if (shm / "det.out").exists() else "")
    finally:
        kill_pidfile(pidfile)


def test_no_guest_on_the_destination_aborts_before_it_ran(procs: Procs, shm: Path) -> None:
    dest = start_dest(procs, shm, "--on-resume", "true", "--postcopy-guest-timeout", "2")
    src, ctl = det_source(procs, shm, 400000)
    s = Source(shm, "--to", dest.addr, "--memory", str(src), "--guest-control", str(ctl), "--postcopy", "now")
    rc, rep, log = s.finish()
    assert rc == 3, log + dest.log_text()
    assert rep is not None and rep["outcome"] == "aborted" and "no guest listened" in rep["error"], rep
    assert not (dest.memory_dir / "vm.mem").exists(), "the punched region was left under its name"
    # Rolled back: the source's guest runs again (its control socket answers a pause and a resume).
    from precopy.workload.control import GuestControl
    import asyncio

    async def pause_resume() -> None:
        g = GuestControl(ctl)
        await g.pause()
        await g.resume()
        await g.close()

    asyncio.run(pause_resume())


def test_an_unrecoverable_stream_ends_in_doubt_with_the_source_paused(procs: Procs, shm: Path) -> None:
    out, pidfile = shm / "resumed.json", shm / "guest.pid"
    dest = start_dest(procs, shm, "--on-resume", guest_pid_hook(out, pidfile))
    src, ctl = det_source(procs, shm, 400000)
    mark, seen = after_postcopy()

    def kill_dest() -> None:
        dest.proc.kill()

    fault = Fault("kill", kind=Kind.PAGES, where=lambda meta: seen.is_set(), callback=kill_dest)
    try:
        with FaultProxy(("127.0.0.1", dport(dest)), [mark, fault]) as proxy:
            s = Source(shm, "--to", proxy.addr, "--memory", str(src), "--guest-control", str(ctl),
                       "--postcopy", "now", "--outcome-retries", "2", "--connect-timeout", "1")
            rc, rep, log = s.finish()
        assert rc == 4, log
        assert rep is not None and rep["outcome"] == "in-doubt" and "BROKEN" in rep["error"], rep
        # The source's copy holds the missing pages: paused, not resumed, not killed.
        det = procs.procs[-1]  # the source's det guest (det_source started it last)
        assert det.poll() is None and proc_state(det.pid) in ("S", "R"), "the source guest is gone"
        assert not (shm / "det.out").exists() or "digest" not in (shm / "det.out").read_text()
    finally:
        kill_pidfile(pidfile)

"""precopy-dest --postcopy-guest-early: the post-copy guest started when its migration begins, held,
then resumed at the post-copy switchover, or after a pre-copy commit, or stopped when the migration
ends without one.  Real agents, real det guests (their digest says every page is right); no timing
assertions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from precopy.protocol import Kind

from .conftest import Procs, run_source, start_dest, wait_for
from .faultproxy import Fault, FaultProxy
from .test_faults import dport
from .test_postcopy import STEPS, det_hook, det_source, reference_digest
from .test_postcopy_faults import Source, kill_pidfile

pytestmark = pytest.mark.integration


def early_hook(out: Path, seen: Path, pidfile: Path) -> str:
    """The det hook, recording the region path it was given and the guest's pid."""
    return f"echo \"$PRECOPY_MEMORY\" > {seen}; echo $$ > {pidfile}; " + det_hook(out)


def test_a_guest_started_early_takes_the_post_copy(procs: Procs, shm: Path) -> None:
    expected = reference_digest(procs, shm)
    out, seen, pidfile = shm / "resumed.json", shm / "seen", shm / "guest.pid"
    dest = start_dest(procs, shm, "--on-resume", early_hook(out, seen, pidfile), "--postcopy-guest-early")
    src, ctl = det_source(procs, shm)
    try:
        rc, rep, log = run_source(shm, "--to", dest.addr, "--memory", str(src), "--guest-control", str(ctl),
                                  "--postcopy", "now", "--on-commit", "kill")
        assert rc == 0, log + dest.log_text()
        assert rep is not None and rep["postcopy"] is not None and rep["postcopy"]["pages_missing"] > 0
        # Started while the region was still being received (its partial name), not at the commit.
        assert seen.read_text().strip() != str(dest.memory_dir / "vm.mem")
        wait_for(out.exists, timeout=120, what="the resumed det guest to finish")
        assert json.loads(out.read_text()) == {"steps": STEPS, "digest": expected}
    finally:
        kill_pidfile(pidfile)


def test_a_held_guest_runs_after_a_pre_copy_commit(procs: Procs, shm: Path) -> None:
    """--postcopy auto that converges: no post-copy, the guest held since BEGIN is resumed as it is."""
    expected = reference_digest(procs, shm)
    out, seen, pidfile = shm / "resumed.json", shm / "seen", shm / "guest.pid"
    dest = start_dest(procs, shm, "--on-resume", early_hook(out, seen, pidfile), "--postcopy-guest-early")
    src, ctl = det_source(procs, shm, STEPS, "--step-sleep-us", "50000")  # ~20 pages/s: converges
    try:
        rc, rep, log = run_source(shm, "--to", dest.addr, "--memory", str(src), "--guest-control", str(ctl),
                                  "--postcopy", "auto", "--on-commit", "kill")
        assert rc == 0, log + dest.log_text()
        assert rep is not None and rep["postcopy"] is None, rep
        wait_for(out.exists, timeout=120, what="the resumed det guest to finish")
        assert json.loads(out.read_text()) == {"steps": STEPS, "digest": expected}
        assert seen.read_text().count("\n") == 1  # the hook ran once
    finally:
        kill_pidfile(pidfile)


def test_a_held_guest_is_stopped_when_the_migration_aborts(procs: Procs, shm: Path) -> None:
    out, seen, pidfile = shm / "resumed.json", shm / "seen", shm / "guest.pid"
    dest = start_dest(procs, shm, "--on-resume", early_hook(out, seen, pidfile), "--postcopy-guest-early")
    src, ctl = det_source(procs, shm)
    fault = Fault("cut", kind=Kind.SWITCHOVER)  # the link dies at the switchover: rolled back
    try:
        with FaultProxy(("127.0.0.1", dport(dest)), [fault]) as proxy:
            s = Source(shm, "--to", proxy.addr, "--memory", str(src), "--guest-control", str(ctl),
                       "--postcopy", "now", "--io-timeout", "3")
            rc, rep, log = s.finish()
        assert fault.fired.is_set(), log
        assert rc == 3, log + dest.log_text()
        wait_for(pidfile.exists, timeout=60, what="the held guest's hook")
        pid = int(pidfile.read_text())

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] == "Z"

        wait_for(gone, timeout=60, what="the held guest to be stopped")
        assert not out.exists(), "the held guest ran"
    finally:
        kill_pidfile(pidfile)

"""Signals on the agents: SIGINT/SIGTERM cancel a source cleanly in every phase
before the commit; SIGTERM stops a destination without leaving partial state,
and lets a committed migration be confirmed first."""

from __future__ import annotations

import os
import signal

import pytest


from .conftest import Procs
from .faultproxy import FaultProxy
from .test_faults import PRE_COMMIT, Setup, dport, fault_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# SIGINT in every phase before the commit (pid mode); SIGTERM where the
# workload is paused (guest-control mode, with a device state).
SIGNAL_CASES = [(p, signal.SIGINT) for p in PRE_COMMIT] + [
    (p, signal.SIGTERM) for p in ("first-copy", "device-state")]


@pytest.mark.parametrize(("phase", "sig"), SIGNAL_CASES, ids=[f"{p}-{s.name}" for p, s in SIGNAL_CASES])
def test_source_signal_before_commit_rolls_back(procs: Procs, shm, phase: str, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    s = Setup(procs, shm, "control" if sig == signal.SIGTERM else "pid")

    def interrupt() -> None:
        assert s.source is not None
        os.kill(s.source.pid, sig)

    # The frame (and all behind it) is held while the signal lands, so the
    # source cannot get past its next wait for an answer.
    fault = fault_at(phase, action="delay", seconds=1.0, callback=interrupt)
    with FaultProxy(("127.0.0.1", dport(s.dest)), [fault]) as proxy:
        s.start_source(proxy.addr)
        rc, rep, log = s.finish()
    assert fault.fired.is_set(), log
    assert rc == 3, s.diag()
    assert rep is not None and rep["outcome"] == "aborted" and "cancel" in rep["error"], s.diag()
    s.assert_runs_on_source()
    s.assert_no_partial()


def test_dest_sigterm_mid_copy_source_rolls_back(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """precopy-dest stopped during the first copy: it aborts the migration (the
    source is told and rolls back), removes the partial file and exits 0."""
    s = Setup(procs, shm)

    def terminate() -> None:
        s.dest.proc.send_signal(signal.SIGTERM)

    fault = fault_at("first-copy", action="call", callback=terminate)
    # A slow link: the copy is still running when the daemon stops.
    with FaultProxy(("127.0.0.1", dport(s.dest)), [fault], rate_bps=20e6) as proxy:
        s.start_source(proxy.addr)
        rc, rep, log = s.finish()
    assert rc == 3, s.diag()
    assert "shutting down" in rep["error"], s.diag()  # type: ignore[index]
    assert s.dest.proc.wait(20) == 0, s.dest.log_text()
    s.assert_runs_on_source()
    assert not list(s.dest.memory_dir.glob(".*.partial"))
    assert not (s.dest.memory_dir / "vm.mem").exists()


def test_dest_sigterm_while_paused_source_rolls_back(procs: Procs, shm) -> None:  # type: ignore[no-untyped-def]
    """Stopped after the source paused: the ABORT is a definite 'not committed', the guest resumes."""
    s = Setup(procs, shm, "control")

    def terminate() -> None:  # while the device state is held back
        s.dest.proc.send_signal(signal.SIGTERM)
        s.dest.proc.wait(20)

    fault = fault_at("device-state", action="kill", callback=terminate)
    with FaultProxy(("127.0.0.1", dport(s.dest)), [fault]) as proxy:
        s.start_source(proxy.addr)
        rc, rep, log = s.finish()
    assert rc == 3, s.diag()
    assert "refused the commit" in rep["error"] or "shutting down" in rep["error"], s.diag()  # type: ignore[index]
    assert s.dest.proc.wait(20) == 0
    s.assert_runs_on_source()
    assert not list(s.dest.memory_dir.glob(".*.partial"))

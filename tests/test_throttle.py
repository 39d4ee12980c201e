"""Throttling a workload (auto-converge): the SIGSTOP/SIGCONT duty cycle on real
processes, the guest-control ``throttle`` op, and how a session applies and ends it.

The rule about when to throttle is tested on its own in tests/test_policy.py;
here the session's decisions are scripted.  No test asserts a duration: the
duty cycle is observed by sampling the child's ``/proc`` state, with loose
bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import precopy.session.source
from precopy.session.estimate import DowntimeModel
from precopy.session.sender import PageSender
from precopy.errors import GuestControlError, MigrationAborted, PrecopyError
from precopy.session.guardian import ARMED, IDLE
from precopy.policy.switchover import Action, Decision, SwitchoverPolicy
from precopy.workload.base import process_state
from precopy.workload.control import GuestControl
from precopy.workload.signals import SignalWorkload

from precopy_agents.source_main import summary

from .conftest import ENV, PY, ROOT, wait_for
from .test_engine import FakeWorkload, make_region, options, serve


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A process that mostly sleeps: its state is 'S' unless we stop it ('T')."""
    p = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.005)"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def stopped(pid: int) -> bool:
    return process_state(pid) in ("T", "t")


def stopped_share(pid: int, seconds: float) -> float:
    """The fraction of samples (one every ~2 ms, short sleeps: no tight /proc loop) in which ``pid`` is stopped."""
    n = hits = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n += 1
        hits += stopped(pid)
        time.sleep(0.002)
    return hits / n


def never_stopped(pid: int, seconds: float = 0.3) -> bool:
    return stopped_share(pid, seconds) == 0.0


# --------------------------------------------------------------------------
# SignalWorkload: the duty cycle


async def test_duty_cycle_stops_the_process_part_of_the_time(child: subprocess.Popen[bytes]) -> None:
    w = SignalWorkload(child.pid)
    assert never_stopped(child.pid)
    await w.throttle(0.5)
    assert w.throttled
    half = stopped_share(child.pid, 1.0)
    await w.throttle(0.9)  # a change applies to the running cycle
    most = stopped_share(child.pid, 1.0)
    await w.throttle(0.0)
    assert not w.throttled
    assert 0.2 < half < 0.8, half
    assert most > 0.5 and most > half, (half, most)
    assert never_stopped(child.pid)


async def test_ending_the_throttle_always_leaves_it_running(child: subprocess.Popen[bytes]) -> None:
    w = SignalWorkload(child.pid)
    for _ in range(5):
        await w.throttle(0.9)
        wait_for(lambda: stopped(child.pid), what="a stop of the duty cycle")
        await w.throttle(0.0)  # ends in the middle of a stop
        assert not stopped(child.pid)
        assert never_stopped(child.pid, 0.15)
    await w.throttle(0.0)  # ending no throttle is harmless
    assert never_stopped(child.pid, 0.1)


async def test_resume_and_stop_end_the_throttle(child: subprocess.Popen[bytes]) -> None:
    w = SignalWorkload(child.pid)
    await w.throttle(0.9)
    wait_for(lambda: stopped(child.pid), what="a stop of the duty cycle")
    await w.resume()
    assert not w.throttled and never_stopped(child.pid)
    await w.throttle(0.9)
    await w.stop()
    assert child.wait(5) == -9
    assert not w.throttled


async def test_pause_takes_over_from_the_throttle(child: subprocess.Popen[bytes]) -> None:
    """The pause stops the process straight from the duty cycle, which is gone
    afterwards: nothing continues the paused process behind the session's back."""
    w = SignalWorkload(child.pid)
    await w.throttle(0.5)
    time.sleep(0.1)
    assert await w.pause() == b""
    assert not w.throttled
    assert stopped_share(child.pid, 0.3) == 1.0
    await w.resume()
    assert never_stopped(child.pid)


async def test_hold_keeps_it_stopped_until_the_next_call(child: subprocess.Popen[bytes]) -> None:
    w = SignalWorkload(child.pid)
    await w.hold()  # unthrottled: nothing to hold
    assert never_stopped(child.pid, 0.1) and w.ran_since(time.monotonic())
    await w.throttle(0.2)
    await w.hold()
    t = time.monotonic()
    assert stopped_share(child.pid, 0.3) == 1.0  # 20 % would have run it most of that time
    assert not w.ran_since(t)
    await w.throttle(0.2)  # releases the hold: the cycle goes on
    assert 0.0 < stopped_share(child.pid, 0.5) < 0.6
    assert w.ran_since(t)
    await w.hold()
    assert await w.pause() == b""  # the pause takes over the hold
    assert stopped_share(child.pid, 0.2) == 1.0
    await w.resume()
    await w.throttle(0.5)
    await w.hold()
    await w.throttle(0.0)  # ending the throttle ends a hold: running
    assert never_stopped(child.pid)


async def test_throttling_a_process_that_is_gone(child: subprocess.Popen[bytes]) -> None:
    w = SignalWorkload(child.pid)
    await w.throttle(0.5)
    child.kill()
    child.wait()
    time.sleep(0.1)  # the cycle's next signal finds it gone
    with pytest.raises(GuestControlError, match="gone"):
        await w.throttle(0.6)
    assert not w.throttled
    await w.throttle(0.0)  # nothing to end
    with pytest.raises(GuestControlError, match="gone"):
        await w.throttle(0.3)


async def test_throttle_fraction_is_checked(child: subprocess.Popen[bytes]) -> None:
    w = SignalWorkload(child.pid)
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="throttle"):
            await w.throttle(bad)
    assert not w.throttled


def test_an_agent_exiting_with_a_throttle_on_leaves_the_process_running(child: subprocess.Popen[bytes]) -> None:
    """An uncaught error ends the interpreter with the duty cycle still on: the
    exit handler continues the process (SIGKILL is the guardian's case)."""
    script = (
        "import asyncio, sys\n"
        "from precopy.workload.base import process_state\n"
        "from precopy.workload.signals import SignalWorkload\n"
        f"w = SignalWorkload({child.pid})\n"
        "asyncio.run(w.throttle(0.95))\n"
        "while process_state(w.pid) != 'T':\n"
        "    pass\n"
        "raise RuntimeError('boom, while the process is stopped')\n"
    )
    r = subprocess.run([PY, "-c", script], env=ENV, cwd=ROOT, capture_output=True, timeout=60)
    assert r.returncode == 1 and b"boom" in r.stderr
    assert never_stopped(child.pid)


# --------------------------------------------------------------------------
# GuestControl: the optional op


async def test_guest_control_throttle_request_and_refusal(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            req = json.loads(line)
            seen.append(req)
            ok = req["op"] != "throttle" or len(seen) < 3
            writer.write(b'{"ok": true}\n' if ok else b'{"ok": false, "error": "unknown op"}\n')
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(guest, path=str(tmp_path / "g.sock"))
    async with server:
        gc = GuestControl(tmp_path / "g.sock", timeout_s=2)
        await gc.throttle(0.3)
        await gc.throttle(0.0)
        with pytest.raises(GuestControlError, match="guest refused 'throttle'"):
            await gc.throttle(0.99)
        with pytest.raises(ValueError):
            await gc.throttle(1.0)
        await gc.close()
    assert seen == [{"op": "throttle", "pct": 30}, {"op": "throttle", "pct": 0}, {"op": "throttle", "pct": 99}]


async def test_a_refused_throttle_of_a_guest_this_process_serves_is_not_turned_into_sigstop(tmp_path: Path) -> None:
    """The fallback signals the process serving the control socket: never the agent itself."""
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            writer.write(b'{"ok": false, "error": "unknown op"}\n')
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(guest, path=str(tmp_path / "g.sock"))
    async with server:
        gc = GuestControl(tmp_path / "g.sock", timeout_s=2)
        with pytest.raises(GuestControlError, match="guest refused 'throttle'.*cannot be throttled with "
                                                    "SIGSTOP instead.*this agent's own process"):
            await gc.throttle(0.5)
        assert gc.throttle_method is None and not gc.throttled
        await gc.close()


# --------------------------------------------------------------------------
# GuestControl: a guest without the throttle op gets the SIGSTOP duty cycle


@pytest.fixture
def plain_guest(shm: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """An idle guest-control guest that does not offer the throttle op (it sleeps: 'S' unless stopped)."""
    region = shm / "g.mem"
    make_region(region, 64)
    sock = shm / "g.sock"
    p = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(region), "--rate", "0",
                          "--control", str(sock), "--no-throttle", "--no-tracking", "--device-state-size", "100"],
                         env=ENV, cwd=ROOT)
    try:
        wait_for(lambda: sock.exists() or p.poll() is not None, what="the guest's control socket")
        assert p.poll() is None
        yield p, sock, region
    finally:
        p.send_signal(signal.SIGCONT)  # whatever a failed test left
        p.kill()
        p.wait()


async def test_a_guest_without_the_throttle_op_is_throttled_with_sigstop(
        plain_guest: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    g, sock, _ = plain_guest
    gc = GuestControl(sock, timeout_s=5)
    await gc.throttle(0.5)
    assert gc.throttle_method == "sigstop" and gc.peer_pid == g.pid and gc.throttled
    assert 0.1 < stopped_share(g.pid, 1.0) < 0.9
    await gc.throttle(0.0)
    assert not gc.throttled and never_stopped(g.pid)
    await gc.throttle(0.2)  # the method is decided: no second request to the guest
    assert gc.throttle_method == "sigstop"
    await gc.throttle(0.95)
    wait_for(lambda: stopped(g.pid), what="a stop of the duty cycle")
    # The pause is written while the guest is stopped, then it is continued to answer.
    assert len(await gc.pause()) == 100
    assert not gc.throttled and never_stopped(g.pid, 0.2)  # paused at its gate, not stopped
    await gc.resume()
    await gc.throttle(0.95)
    assert await gc.hold() is True
    assert stopped_share(g.pid, 0.2) == 1.0
    await gc.resume()  # ends the duty cycle, then the guest's resume
    assert never_stopped(g.pid)
    await gc.throttle(0.95)
    await gc.close()  # a closing agent never leaves it stopped
    assert never_stopped(g.pid)
    assert gc.ran_since(time.monotonic()) is True


SILENT_GUEST = """
import asyncio, json, os, sys
async def serve(reader, writer):
    while line := await reader.readline():
        op = json.loads(line)["op"]
        if op == "pause":
            continue  # never answers a pause
        writer.write(b'{"ok": true}\\n' if op == "resume" else b'{"ok": false, "error": "unknown op"}\\n')
        await writer.drain()
async def main():
    # Listening before the path appears (as precopy.guest's control server): bound under a temporary
    # name, renamed once it listens -- a test that connects as soon as the path exists is never refused.
    server = await asyncio.start_unix_server(serve, path=sys.argv[1] + ".tmp")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


async def test_a_failed_pause_of_a_guest_stopped_by_the_duty_cycle_continues_it_before_the_resume(
        tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    p = subprocess.Popen([PY, "-c", SILENT_GUEST, str(sock)])
    try:
        wait_for(sock.exists, what="the fake guest's socket")
        gc = GuestControl(sock, timeout_s=1)
        await gc.throttle(0.95)
        assert gc.throttle_method == "sigstop"
        with pytest.raises(GuestControlError, match="did not answer 'pause'.*asked to resume and confirmed"):
            await gc.pause()
        assert never_stopped(p.pid)
        await gc.close()
    finally:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()


async def test_a_guest_throttling_itself_cannot_be_held(tmp_path: Path) -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            writer.write(b'{"ok": true}\n')
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(guest, path=str(tmp_path / "g.sock"))
    async with server:
        gc = GuestControl(tmp_path / "g.sock", timeout_s=2)
        await gc.throttle(0.99)
        assert gc.throttle_method == "guest-op"
        assert await gc.hold() is False and gc.ran_since(0.0) is None
        await gc.close()


# --------------------------------------------------------------------------
# The session: applying and ending a throttle (decisions scripted)


class ThrottledWorkload(FakeWorkload):
    """Records throttle calls too; ``refuse`` raises as a guest answering not-ok would."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.refuse = refuse

    async def throttle(self, fraction: float) -> None:
        self.calls.append(f"throttle {fraction:g}")
        if self.refuse:
            raise GuestControlError("guest refused 'throttle': {'ok': False, 'error': 'unknown op'}")


class HoldingWorkload(ThrottledWorkload):
    async def hold(self) -> None:
        self.calls.append("hold")


def script(monkeypatch: pytest.MonkeyPatch, *steps: tuple[Action, int]) -> None:
    """Make every policy decide from ``steps`` (the last repeats), throttle 0 once throttling is off."""
    it = iter(steps)
    last: list[tuple[Action, int]] = []

    def decide(self: SwitchoverPolicy, **kw: Any) -> Decision:
        step = next(it, None) or last[-1]
        last.append(step)
        action, pct = step
        return Decision(action, 0.001, f"scripted {action.value}", pct if self.throttle == "auto" else 0)

    monkeypatch.setattr(SwitchoverPolicy, "decide", decide)


async def test_switchover_pauses_straight_from_the_throttle(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = work / "t.mem"
    make_region(src, 256)
    script(monkeypatch, (Action.CONTINUE, 20), (Action.CONTINUE, 30), (Action.SWITCHOVER, 30))
    wl = ThrottledWorkload()
    async with serve(dest_dir) as server:
        rep = await precopy.session.source.migrate(options(server, src), wl)
    assert rep.outcome == "committed"
    # No "throttle 0" between: the pause ends it (the workload must not run in between).
    assert wl.calls == ["throttle 0.2", "throttle 0.3", "pause"]
    assert [(r.kind, r.throttle_pct) for r in rep.rounds] == [
        ("full", 0), ("iterative", 20), ("iterative", 30), ("final", 0)]
    assert rep.max_throttle_pct == 30
    assert rep.to_dict()["rounds"][1]["throttle_pct"] == 20
    assert (dest_dir / "t.mem").read_bytes() == src.read_bytes()


async def test_at_99_percent_the_workload_is_held_from_each_scan_to_its_decision(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = work / "t.mem"
    make_region(src, 256)
    script(monkeypatch, (Action.CONTINUE, 90), (Action.CONTINUE, 99), (Action.CONTINUE, 99),
           (Action.SWITCHOVER, 99))
    wl = HoldingWorkload()
    async with serve(dest_dir) as server:
        rep = await precopy.session.source.migrate(options(server, src), wl)
    assert rep.outcome == "committed"
    # Held for the scans after 99 % was reached; released by setting the throttle again
    # (even unchanged); the last hold is taken over by the pause.
    assert wl.calls == ["throttle 0.9", "throttle 0.99", "hold", "throttle 0.99", "hold", "pause"]


@pytest.mark.parametrize("ran", [True, False])
async def test_a_scan_the_throttled_workload_ran_after_is_not_trusted(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch, ran: bool) -> None:
    """A throttled workload writes in bursts: when it ran after a scan began, the
    decision counts what its recent runs dirtied, on top of what the scan found."""
    src = work / "t.mem"
    mm = make_region(src, 256)
    # Fewer than half the chunks: a dense scan would send whole chunks (more pages).
    BURST = 40
    seen: list[dict[str, Any]] = []
    steps = iter([(Action.CONTINUE, 20), (Action.CONTINUE, 20), (Action.SWITCHOVER, 20)])

    def decide(self: SwitchoverPolicy, **kw: Any) -> Decision:
        seen.append(kw)
        action, pct = next(steps)
        return Decision(action, 0.001, "scripted", pct)

    monkeypatch.setattr(SwitchoverPolicy, "decide", decide)

    class Bursty(ThrottledWorkload):
        async def throttle(self, fraction: float) -> None:
            await super().throttle(fraction)
            mm[:BURST] = np.random.default_rng(len(self.calls)).integers(0, 256, (BURST, 4096), dtype=np.uint8)

        def ran_since(self, t: float) -> bool:
            return ran

    pages: list[int] = []  # what each expected downtime was computed for
    real = DowntimeModel.expected

    def expected(self: Any, remaining: int, device_state_bytes: int = 0,
                 final_scan_s: float | None = None, **kw: Any) -> float:
        # A live round's estimate (the pause's own go through rest_s, with a final_scan_s of 0).
        if final_scan_s is None:
            pages.append(remaining)
        return real(self, remaining, device_state_bytes, final_scan_s, **kw)

    monkeypatch.setattr(DowntimeModel, "expected", expected)
    async with serve(dest_dir) as server:
        rep = await precopy.session.source.migrate(options(server, src), Bursty())
    assert rep.outcome == "committed"
    # Round 1 (unthrottled so far) found nothing; round 2 the burst of the first throttle
    # call; round 3 nothing new: but the workload ran after that scan began.
    assert [kw["remaining_pages"] for kw in seen] == [0, BURST, 0]
    assert [kw["dirtied_pages"] for kw in seen] == ([0, 2 * BURST, BURST] if ran else [0, BURST, 0])
    # Besides what it found, a switchover sends what the workload dirties until the
    # pause: a scan's worth at the dirty rate (under BURST pages here), or its recent burst.
    assert (pages[2] >= BURST) is ran, pages


async def test_a_failure_while_throttled_ends_the_throttle_and_rolls_back(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = work / "t.mem"
    make_region(src, 256)
    script(monkeypatch, (Action.CONTINUE, 40))
    sends = 0
    real = PageSender.send

    async def send_pages(self: Any, indices: np.ndarray, rnd: Any, phase: str, **kw: Any) -> None:
        nonlocal sends
        if phase == "iterating":
            sends += 1
            if sends == 3:
                raise PrecopyError("injected failure in round 3")
        await real(self, indices, rnd, phase, **kw)

    monkeypatch.setattr(PageSender, "send", send_pages)
    wl = ThrottledWorkload()
    async with serve(dest_dir) as server:
        with pytest.raises(MigrationAborted, match="injected") as err:
            await precopy.session.source.migrate(options(server, src), wl)
    assert wl.calls == ["throttle 0.4", "throttle 0"]  # ended, never paused
    assert err.value.report.max_throttle_pct == 40  # type: ignore[attr-defined]


async def test_a_refused_throttle_is_said_once_and_the_migration_goes_on(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    src = work / "t.mem"
    make_region(src, 256)
    script(monkeypatch, (Action.CONTINUE, 20), (Action.CONTINUE, 30), (Action.CONTINUE, 40),
           (Action.SWITCHOVER, 40))
    caplog.set_level(logging.WARNING, logger="precopy.session.throttle")
    for wl in (ThrottledWorkload(refuse=True), FakeWorkload()):  # refuses / has no throttle at all
        caplog.clear()
        async with serve(dest_dir / type(wl).__name__) as server:
            rep = await precopy.session.source.migrate(options(server, src), wl)
        assert rep.outcome == "committed" and rep.max_throttle_pct == 0
        assert all(r.throttle_pct == 0 for r in rep.rounds)
        warned = [r.getMessage() for r in caplog.records if "throttling unavailable" in r.getMessage()]
        assert len(warned) == 1, warned
        # An explicit refusal changed nothing on the guest: nothing to end.
        assert [c for c in wl.calls if c.startswith("throttle")] == (
            ["throttle 0.2"] if isinstance(wl, ThrottledWorkload) else [])
        script(monkeypatch, (Action.CONTINUE, 20), (Action.CONTINUE, 30), (Action.SWITCHOVER, 30))


@pytest.mark.parametrize("throttle", ["auto", "off"])
async def test_a_guest_without_the_throttle_op_is_throttled_by_the_session_unless_off(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch, throttle: str,
        plain_guest: tuple[subprocess.Popen[bytes], Path, Path]) -> None:
    g, sock, region = plain_guest
    script(monkeypatch, (Action.CONTINUE, 20), (Action.CONTINUE, 30), (Action.SWITCHOVER, 30))
    gc = GuestControl(sock, timeout_s=5)
    try:
        async with serve(dest_dir) as server:
            rep = await precopy.session.source.migrate(options(server, region, throttle=throttle, tracking="digest"), gc)
    finally:
        await gc.close()
    assert rep.outcome == "committed"
    if throttle == "auto":
        assert rep.throttle_method == "sigstop" and rep.max_throttle_pct == 30
        assert [r.throttle_pct for r in rep.rounds] == [0, 20, 30, 0]
        assert "SIGSTOP/SIGCONT duty cycle" in summary(rep)
    else:  # --throttle off still means never
        assert rep.throttle_method is None and rep.max_throttle_pct == 0 and gc.throttle_method is None
    assert rep.to_dict()["throttle_method"] == rep.throttle_method
    assert not stopped(g.pid)  # paused at its gate by the guest's own pause, not by SIGSTOP


async def test_a_cancel_while_throttled_leaves_the_process_running(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch, child: subprocess.Popen[bytes]) -> None:
    """The guardian is armed while throttled and idle again once the throttle is
    ended; a cancellation (SIGINT, the daemon's cancel) ends it."""
    src = work / "t.mem"
    make_region(src, 256)
    script(monkeypatch, (Action.CONTINUE, 90))
    states: list[str] = []
    real_declare = precopy.session.source.Guardian.declare

    def declare(self: Any, state: str) -> None:
        states.append(state)
        real_declare(self, state)

    monkeypatch.setattr(precopy.session.source.Guardian, "declare", declare)
    wl = SignalWorkload(child.pid)
    async with serve(dest_dir) as server:
        task = asyncio.create_task(precopy.session.source.migrate(options(server, src, guardian=True), wl))
        while not wl.throttled:
            await asyncio.sleep(0.01)
        while not stopped(child.pid):
            await asyncio.sleep(0.001)
        assert states == [ARMED]
        task.cancel()
        with pytest.raises(MigrationAborted, match="cancelled"):
            await task
    assert not wl.throttled
    assert states == [ARMED, IDLE]
    assert never_stopped(child.pid)

"""The hard downtime cap (--max-downtime-ms): the pure check, where the session
makes it, and a real rollback.

No test depends on how fast this machine is: the session's cap reads a fake
clock that moves only when a test injects a slow step, and the integration
test sets a cap no pause can keep.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import precopy.session.source
from precopy_agents.source_main import summary
from precopy.policy.downtime import CAP_STEPS, DowntimeCap, DowntimeCapExceeded, Part, switchover_margin
from precopy.errors import AbortCode, MigrationAborted
from precopy.policy.switchover import Action, Decision, LinkEstimator, SwitchoverPolicy
from precopy.session.exchange import Exchange
from precopy.session.source import SourceOptions, SourceSession
from precopy.protocol import Commit, DeviceState, DigestRequest, Pages

from .conftest import Procs, create_region, guest, proc_state, run_source, start_dest
from .test_engine import FakeWorkload, make_region, options, serve, settled


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------
# The pure check


def test_the_cap_counts_the_time_paused_and_what_is_expected_to_follow() -> None:
    clock = FakeClock()
    cap = DowntimeCap(0.100, clock)
    assert cap.paused_s() == 0.0
    cap.check("final_scan", 0.090)  # not paused yet: 0 + 90 ms
    cap.start()
    clock.t += 0.040
    cap.check("final_pages", 0.060)  # 40 + 60 = the cap: kept
    with pytest.raises(DowntimeCapExceeded) as err:
        cap.check("final_pages", 0.061)
    e = err.value
    assert (e.step, e.code) == ("final_pages", AbortCode.TIMEOUT)
    assert e.paused_s == pytest.approx(0.040) and e.rest_s == pytest.approx(0.061)
    assert str(e).startswith("downtime cap hit before final pages: paused 40.0 ms (measured), ~61.0 ms more")
    assert "over --max-downtime-ms 100" in str(e) and "resumes on the source" in str(e)
    cap.check("commit", -1.0)  # a negative guess counts as nothing
    assert not cap.passed()
    clock.t += 0.061
    assert cap.passed()
    with pytest.raises(DowntimeCapExceeded, match="before commit: paused 101.0 ms"):
        cap.check("commit", 0.0)
    assert [c[0] for c in cap.checks] == ["final_scan", "final_pages", "final_pages", "commit", "commit"]
    with pytest.raises(ValueError, match="unknown switchover step"):
        cap.check("coffee", 0.0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="positive"):
            DowntimeCap(bad, clock)


def test_options_check_the_cap(work: Path) -> None:
    path = work / "r.mem"
    make_region(path, 4)
    SourceOptions(host="h", port=1, memory=path, downtime_ms=50, max_downtime_ms=50)
    with pytest.raises(ValueError, match="under the downtime budget 300 ms.*lower --downtime-ms"):
        SourceOptions(host="h", port=1, memory=path, max_downtime_ms=100)
    with pytest.raises(ValueError, match="positive"):
        SourceOptions(host="h", port=1, memory=path, downtime_ms=1, max_downtime_ms=0)


# --------------------------------------------------------------------------
# Where the session checks (a fake clock; a step made slow by moving it)

CAP_S = 0.100
#: Pages the workload writes while it is paused (the final pass sends them),
#: in batches of BATCH.
BATCH = 8


async def capped_migration(work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch, *,
                           slow: str, written: int, **kw: Any) -> tuple[SourceSession, FakeWorkload,
                                                                      BaseException | None]:
    """Migrate with a 100 ms cap on a fake clock that jumps 150 ms at ``slow``:
    "pause", "first_final_batch", "device_state", "verify" or "commit" (the event sent)."""
    src = work / "c.mem"
    mm = make_region(src, 256)
    clock = FakeClock()

    async def on_pause() -> None:
        mm[100:100 + written] = np.random.default_rng(7).integers(1, 256, (written, mm.shape[1]), dtype=np.uint8)
        mm.flush()
        if slow == "pause":
            clock.t += 0.150

    real_send = Exchange.send
    jumped = [False]

    async def send_event(self: Exchange, ev: Any) -> int:
        n = await real_send(self, ev)
        if session.paused and (
                slow == "first_final_batch" and isinstance(ev, Pages) and not jumped[0]
                or slow == "device_state" and isinstance(ev, Pages)
                or slow == "verify" and isinstance(ev, DeviceState)
                or slow == "commit" and isinstance(ev, DigestRequest) and ev.final
                or slow == "after_commit" and isinstance(ev, Commit)):
            jumped[0] = True
            clock.t += 0.150
        return n

    monkeypatch.setattr(Exchange, "send", send_event)
    wl = FakeWorkload(on_pause=on_pause)
    kw.setdefault("downtime_ms", 100)
    async with serve(dest_dir) as server:
        session = SourceSession(options(server, src, max_downtime_ms=CAP_S * 1e3, batch_pages=BATCH,
                                        compress="off", **kw), wl)
        assert session._cap is not None
        session._cap.clock = clock
        err: BaseException | None = None
        try:
            await asyncio.wait_for(session.run(), 60)
        except MigrationAborted as exc:
            err = exc
        await settled(server)
        if err is not None:
            assert all(r.outcome == "aborted" for r in server.results)
            assert not (dest_dir / "c.mem").exists()
    return session, wl, err


# (the step the cap is hit before, where the clock jumps, pages written while paused)
CASES = [
    ("final_scan", "pause", 0),
    ("final_pages", "first_final_batch", 3 * BATCH),  # checked before every batch: the second one
    ("device_state", "device_state", BATCH),  # one batch: the next check is the device state's
    ("verify", "verify", BATCH),  # pages were sent paused: they are verified
    ("commit", "commit", BATCH),  # the last moment a rollback is possible
]


@pytest.mark.parametrize(("step", "slow", "written"), CASES, ids=[c[0] for c in CASES])
async def test_a_step_that_would_pass_the_cap_rolls_back(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch, step: str, slow: str, written: int) -> None:
    session, wl, err = await capped_migration(work, dest_dir, monkeypatch, slow=slow, written=written)
    assert isinstance(err, MigrationAborted), err
    rep = session.report
    assert rep.outcome == "aborted" and rep.cap_hit == step
    assert rep.error is not None and rep.error.startswith(f"downtime cap hit before {step.replace('_', ' ')}: "
                                                         "paused 150.0 ms (measured)"), rep.error
    assert "over --max-downtime-ms 100" in rep.error
    assert wl.calls == ["pause", "resume"]  # rolled back: it runs on the source
    assert rep.paused_ms is not None and rep.downtime_ms is None
    assert rep.to_dict()["max_downtime_ms"] == 100
    assert "cap 100 ms hit before" in summary(rep)
    assert session._cap is not None
    checks = [c[0] for c in session._cap.checks]
    assert checks[-1] == step and checks == sorted(checks, key=CAP_STEPS.index)
    if step == "final_pages":
        assert checks.count("final_pages") == 2


async def test_every_step_is_checked_and_a_pause_within_the_cap_commits(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session, wl, err = await capped_migration(work, dest_dir, monkeypatch, slow="never", written=3 * BATCH)
    assert err is None and session.report.outcome == "committed" and session.report.cap_hit is None
    assert session._cap is not None
    assert [c[0] for c in session._cap.checks] == [
        "final_scan", "final_pages", "final_pages", "final_pages", "device_state", "verify", "commit"]
    assert (dest_dir / "c.mem").read_bytes() == (work / "c.mem").read_bytes()


async def test_after_commit_the_cap_rolls_nothing_back(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly one owner wins: once COMMIT is out, passing the cap is only reported."""
    session, wl, err = await capped_migration(work, dest_dir, monkeypatch, slow="after_commit", written=BATCH)
    assert err is None
    rep = session.report
    assert rep.outcome == "committed" and rep.cap_hit == "after_commit"
    assert wl.calls == ["pause"]
    assert (dest_dir / "c.mem").read_bytes() == (work / "c.mem").read_bytes()


async def test_what_is_expected_to_follow_counts_too(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop-and-copy sends the whole region paused: at an expected 1 MB/s that is ~1 s,
    over the cap before a page is sent, though the fake clock never moves."""
    monkeypatch.setattr(LinkEstimator, "paused_bytes_per_second", property(lambda self: 1e6))
    session, wl, err = await capped_migration(work, dest_dir, monkeypatch, slow="never", written=0,
                                              mode="stop-and-copy")
    assert isinstance(err, MigrationAborted)
    assert session.report.cap_hit == "final_scan"
    assert "paused 0.0 ms (measured)" in str(session.report.error)
    assert session.report.pages_sent == 0 and wl.calls == ["pause", "resume"]


async def test_forcing_a_switchover_over_the_cap_aborts_without_pausing(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SwitchoverPolicy, "decide",
                        lambda self, **kw: Decision(Action.FORCE, kw["expected_s"], "scripted force"))
    src = work / "f.mem"
    make_region(src, 64)
    wl = FakeWorkload()
    async with serve(dest_dir) as server:
        with pytest.raises(MigrationAborted, match="scripted force; but the expected downtime .* is over "
                                                   "--max-downtime-ms 1e-06: aborting without pausing") as err:
            await precopy.session.source.migrate(options(server, src, downtime_ms=1e-6, max_downtime_ms=1e-6,
                                                 on_nonconvergence="force"), wl)
    assert "pause" not in wl.calls
    assert err.value.report.cap_hit is None  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# The real thing


@pytest.mark.integration
def test_a_cap_no_pause_can_keep_rolls_back_with_the_workload_running(procs: Procs, shm: Path) -> None:
    src = shm / "vm.mem"
    create_region(src, "16M")
    g = procs.start(*guest("dirty", "--memory", str(src), "--rate", "1000"))
    dest = start_dest(procs, shm)
    # Stop-and-copy pauses first: 16 MiB cannot be sent within 0.01 ms.
    rc, rep, out = run_source(shm, "--to", dest.addr, "--memory", str(src), "--pid", str(g.pid),
                              "--mode", "stop-and-copy", "--downtime-ms", "0.01", "--max-downtime-ms", "0.01")
    assert rc == 3, out
    assert rep is not None and rep["outcome"] == "aborted", out
    assert rep["cap_hit"] == "final_scan" and rep["max_downtime_ms"] == 0.01
    assert rep["error"].startswith("downtime cap hit before final scan: paused "), rep["error"]
    assert rep["paused_ms"] is not None and rep["downtime_ms"] is None
    assert "paused " in out and "then resumed there (cap 0.01 ms hit before final scan)" in out
    # Rolled back: the workload runs on the source, nothing was committed on the destination.
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        assert proc_state(g.pid) not in ("T", "t")
        time.sleep(0.005)
    assert not (dest.memory_dir / "vm.mem").exists()


# --------------------------------------------------------------------------
# The switchover's margin from the spread of the pause's parts (pure)

def test_a_steady_part_gets_a_small_margin_a_noisy_one_a_large_one() -> None:
    steady = [0.010, 0.0101, 0.0099, 0.010, 0.0102]
    noisy = [0.006, 0.014, 0.010, 0.018, 0.005]
    calm = switchover_margin({"final_scan": Part(0.020, 0.010, steady)}, 0.050)
    wild = switchover_margin({"final_scan": Part(0.020, 0.010, noisy)}, 0.050)
    assert calm.basis == wild.basis == "spread"
    assert calm.margin_s < wild.margin_s
    # Steady: the part's 5 % minimum (1 ms of 20), within the 5 % .. 50 % of the budget allowed.
    assert calm.parts_s["final_scan"] == pytest.approx(0.001)
    assert calm.margin_s == pytest.approx(0.050 * 0.05)  # at least 5 % of the budget
    assert calm.target_s == pytest.approx(0.050 - calm.margin_s)
    # Noisy: mean 10.6 ms + 2.33 sd (5.46 ms) = 23.3 ms over a 10 ms estimate: +133 % of 20 ms,
    # and the margin is capped at half the budget.
    assert wild.parts_s["final_scan"] == pytest.approx(0.020 * (0.0106 + 2.33 * statistics.stdev(noisy)) / 0.010 - 0.020)
    assert wild.margin_s == pytest.approx(0.025) and wild.target_s == pytest.approx(0.025)


def test_rates_count_as_time_per_byte_and_parts_add_in_quadrature() -> None:
    rates = [1.0e9, 1.2e9, 0.9e9, 1.1e9]
    m = switchover_margin({"final_pages": Part(0.010, 1.0e9, rates, inverse=True),
                           "final_scan": Part(0.010, 0.005, [0.005] * 4)}, 0.030)
    per_byte = [1 / r for r in rates]
    mean = sum(per_byte) / 4
    sd = (sum((x - mean) ** 2 for x in per_byte) / 3) ** 0.5
    pages = 0.010 * ((mean + 2.33 * sd) * 1.0e9 - 1)
    assert m.parts_s["final_pages"] == pytest.approx(pages)
    assert m.parts_s["final_scan"] == pytest.approx(0.0005)  # no spread: the 5 % minimum
    assert m.margin_s == pytest.approx((pages ** 2 + 0.0005 ** 2) ** 0.5)


def test_what_a_pause_may_not_give_back_is_kept_whole() -> None:
    parts = {"final_scan": Part(0.005, 0.005, [0.005] * 4)}
    without = switchover_margin(parts, 0.100)
    with_ = switchover_margin(parts, 0.100, whole={"speedup": 0.012, "cpu": 0.003, "nothing": 0.0})
    assert with_.parts_s == {"final_scan": pytest.approx(0.00025), "speedup": 0.012, "cpu": 0.003}
    assert with_.margin_s == pytest.approx(without.parts_s["final_scan"] + 0.015)
    with pytest.raises(ValueError, match="a part's name"):
        switchover_margin(parts, 0.100, whole={"final_scan": 0.001})


def test_without_samples_the_margin_is_the_fixed_share() -> None:
    parts = {"final_scan": Part(0.005, 0.005, [0.005, 0.006]), "verify": Part(0.002, 0.001)}
    m = switchover_margin(parts, 0.050)
    assert m.basis == "fixed" and m.target_s == pytest.approx(0.0375)
    # A part with too few samples counts a quarter of its share when others are sampled.
    parts["final_pages"] = Part(0.010, 1e9, [1e9] * 3, inverse=True)
    m = switchover_margin(parts, 0.050)
    assert m.basis == "spread" and m.parts_s["verify"] == pytest.approx(0.0005)
    assert m.parts_s["final_scan"] == pytest.approx(0.005 * 0.25)
    with pytest.raises(ValueError, match="positive"):
        switchover_margin(parts, 0.0)
    with pytest.raises(ValueError, match="shares"):
        switchover_margin(parts, 0.05, min_share=0.9)


def test_the_policy_switches_over_at_the_budget_less_the_margin() -> None:
    p = SwitchoverPolicy(downtime_s=0.050)
    assert p.decide(rounds_done=1, elapsed_s=1, expected_s=0.040).action is Action.CONTINUE  # over 75 %
    p = SwitchoverPolicy(downtime_s=0.050)
    assert p.decide(rounds_done=1, elapsed_s=1, expected_s=0.040, margin_s=0.005).action is Action.SWITCHOVER
    p = SwitchoverPolicy(downtime_s=0.050)
    assert p.decide(rounds_done=1, elapsed_s=1, expected_s=0.030, margin_s=0.025).action is Action.CONTINUE


@pytest.mark.parametrize("headroom", ["spread", "fixed"])
async def test_the_session_decides_with_the_margin_and_reports_it(
        work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch, headroom: str) -> None:
    seen: list[float | None] = []
    real = SwitchoverPolicy.decide

    def decide(self: SwitchoverPolicy, **kw: Any) -> Decision:
        seen.append(kw.get("margin_s"))
        return real(self, **kw)

    monkeypatch.setattr(SwitchoverPolicy, "decide", decide)
    src = work / "m.mem"
    make_region(src, 256)
    async with serve(dest_dir) as server:
        rep = await precopy.session.source.migrate(options(server, src, downtime_ms=50, headroom=headroom), FakeWorkload())
    assert rep.outcome == "committed" and seen
    assert rep.switchover_margin_ms is not None
    if headroom == "fixed":
        assert seen == [None] * len(seen)
        assert rep.margin_basis == "fixed" and rep.switchover_margin_ms == pytest.approx(12.5)
    else:
        assert all(m is not None and 2.5e-3 - 1e-9 <= m <= 25e-3 + 1e-9 for m in seen), seen
        assert rep.switchover_margin_ms == pytest.approx(seen[-1] * 1e3)  # type: ignore[operator]
        assert {"final_scan", "final_pages", "dirtied", "verify", "overhead"} <= set(rep.margin_parts_ms)
    assert rep.to_dict()["margin_basis"] == rep.margin_basis
    with pytest.raises(ValueError, match="headroom must be spread or fixed"):
        options(server, src, headroom="wide")


def test_the_floor_is_held_against_the_fixed_share_not_this_rounds_margin() -> None:
    """The margin is sized for this round's pause (its pages and their spread): a pause at
    the floor would not have them.  A 59 ms floor under a 100 ms budget is no reason to give
    up because a round with 8,192 pages left asked for a 50 ms margin."""
    p = SwitchoverPolicy(downtime_s=0.100)
    for _ in range(4):
        d = p.decide(rounds_done=1, elapsed_s=1, expected_s=0.200, floor_s=0.059, margin_s=0.050)
        assert d.action is Action.CONTINUE, d.reason
    p = SwitchoverPolicy(downtime_s=0.100)
    actions = [p.decide(rounds_done=1, elapsed_s=1, expected_s=0.200, floor_s=0.080, margin_s=0.010).action
               for _ in range(2)]
    assert actions == [Action.CONTINUE, Action.ABORT]

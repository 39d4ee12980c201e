"""The source session's phase pieces, driven without sockets (issue 19).

The committer's lost-reply handling and outcome resolution with a fake
exchange and a fake outcome query; the downtime model with made-up
measurements; the throttle with a fake workload and guardian; the report
builder; the rounds with a scripted policy and fake scanner and sender;
the switchover's steps with fake tables.  The sessions over loopback (tests/test_engine.py and the fault
tests) cover the same pieces wired together.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import xxhash

import precopy.session.commit as commit
from precopy.errors import AbortCode, GuestControlError, MigrationInDoubt, PrecopyError
from precopy.net.channel import LinkError, PeerAborted
from precopy.policy.downtime import DowntimeCap, DowntimeCapExceeded
from precopy.policy.switchover import Action, Decision, DirtyRateEstimator, LinkEstimator, SwitchoverPolicy
from precopy.protocol import PAGE_SIZE, Commit, Committed, DeviceState, DigestTable, Outcome
from precopy.protocol import Switchover as SwitchoverEvent
from precopy.protocol.compress import AdaptiveCompressor
from precopy.session.commit import Committer, NotCommitted, OutcomeTarget, resolve_outcome
from precopy.session.contention import ContentionMeter
from precopy.session.estimate import DowntimeModel
from precopy.session.guardian import ARMED, COMMIT, IDLE
from precopy.session.report import MigrationReport, RoundReport
from precopy.session.reporting import in_doubt, record_commit
from precopy.session.rounds import Rounds
from precopy.session.scanner import Scan
from precopy.session.switchover import Switchover
from precopy.session.throttle import Throttle

TARGET = OutcomeTarget(host="dest.example", port=7070, migration_id="m1", retries=3)


class Answers:
    """What each outcome query returns (an Outcome) or raises (an exception), in turn; who was asked."""

    def __init__(self) -> None:
        self.queue: list[Any] = []
        self.asked: list[OutcomeTarget] = []

    async def query(self, target: OutcomeTarget) -> Outcome:
        self.asked.append(target)
        got = self.queue.pop(0)
        if isinstance(got, BaseException):
            raise got
        assert isinstance(got, Outcome)
        return got


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> Answers:
    """The outcome query answers from a list, with no waits between tries."""
    fake = Answers()

    async def no_sleep(seconds: float) -> None:
        pass

    monkeypatch.setattr(commit, "query_outcome", fake.query)
    monkeypatch.setattr(commit.asyncio, "sleep", no_sleep)
    return fake


async def test_outcome_committed_after_failed_queries(answers: Answers) -> None:
    answers.queue += [OSError("refused"), LinkError("reset"), Outcome("m1", committed=True, known=True)]
    await resolve_outcome(TARGET, LinkError("lost"))
    assert len(answers.asked) == 3 and all(t is TARGET for t in answers.asked)


async def test_outcome_definitely_not_committed_rolls_back_with_the_cause_code(answers: Answers) -> None:
    answers.queue.append(Outcome("m1", committed=False, known=True))
    committer = Committer(TARGET)
    committer.sent = True
    assert committer.in_doubt
    with pytest.raises(NotCommitted, match="not committed") as err:
        await committer.resolve(PrecopyError("cut", AbortCode.TIMEOUT))
    assert err.value.code is AbortCode.TIMEOUT
    assert committer.not_committed and not committer.in_doubt


@pytest.mark.parametrize("last", ["no-record", "no-answer"])
async def test_outcome_unknown_is_in_doubt(answers: Answers, last: str) -> None:
    if last == "no-record":
        answers.queue.append(Outcome("m1", committed=False, known=False))
    else:
        answers.queue += [OSError("refused")] * TARGET.retries
    committer = Committer(TARGET)
    committer.sent = True
    with pytest.raises(MigrationInDoubt, match="left PAUSED on the source") as err:
        await committer.resolve(LinkError("lost"))
    assert "dest.example:7070" in str(err.value) and err.value.code is AbortCode.LINK
    assert len(answers.asked) == (1 if last == "no-record" else TARGET.retries)
    assert committer.in_doubt  # never a rollback


class FakeExchange:
    """COMMIT goes into ``sent``; the answer is ``reply`` (an event, or an exception to raise)."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.sent: list[Any] = []

    async def send(self, ev: Any) -> int:
        self.sent.append(ev)
        return 64

    async def expect(self, typ: type) -> Any:
        if isinstance(self.reply, BaseException):
            raise self.reply
        assert isinstance(self.reply, typ)
        return self.reply


async def test_commit_confirmed() -> None:
    ex = FakeExchange(Committed("m1", resumed=True, timings={"resume": 1.5}))
    committer = Committer(TARGET)
    done = await committer.commit(ex.send, ex.expect, 1234, None)
    assert ex.sent == [Commit(migration_id="m1", checksum=1234)]
    assert done is not None and done.timings == {"resume": 1.5}
    assert committer.sent and committer.confirmed and not committer.not_committed


async def test_commit_refused_is_definitely_not_committed() -> None:
    ex = FakeExchange(PeerAborted(int(AbortCode.VERIFY_FAILED), "digest mismatch"))
    committer = Committer(TARGET)
    with pytest.raises(PrecopyError, match="refused the commit") as err:
        await committer.commit(ex.send, ex.expect, 1, None)
    assert err.value.code is AbortCode.VERIFY_FAILED
    assert committer.sent and committer.not_committed and not committer.confirmed


async def test_commit_confirmed_for_another_migration_is_in_doubt() -> None:
    ex = FakeExchange(Committed("someone-else", resumed=True))
    committer = Committer(TARGET)
    with pytest.raises(MigrationInDoubt, match="someone-else"):
        await committer.commit(ex.send, ex.expect, 1, None)
    assert committer.in_doubt and not committer.confirmed


async def test_commit_with_a_lost_reply_asks_and_closes_the_link(answers: Answers) -> None:
    answers.queue.append(Outcome("m1", committed=True, known=True))

    class Chan:
        closed = False

        def close(self) -> None:
            self.closed = True

    chan = Chan()
    ex = FakeExchange(LinkError("connection reset"))
    committer = Committer(TARGET)
    assert await committer.commit(ex.send, ex.expect, 1, chan) is None  # type: ignore[arg-type]
    assert chan.closed and len(answers.asked) == 1 and committer.confirmed


def test_describe() -> None:
    assert commit.describe(asyncio.CancelledError()) == "migration cancelled"
    assert commit.describe(LinkError("")) == "LinkError"
    assert commit.describe(OSError("boom")) == "boom"


# --------------------------------------------------------------------------
# The downtime model


def _model(headroom: str = "spread", rtt: float = 0.001) -> DowntimeModel:
    policy = SwitchoverPolicy(downtime_s=0.1)
    link = LinkEstimator()
    link.add(100_000_000, 1.0)  # 100 MB/s, no waits: the paused rate is the same
    model = DowntimeModel(policy, link, DirtyRateEstimator(), AdaptiveCompressor("off"), lambda: rtt,
                          budget_s=0.1, headroom=headroom, switchover_cost_s=0.01)
    model.region(npages=1024, chunk_pages=32, chunks=None)
    return model


def test_expected_downtime_is_the_sum_of_its_parts() -> None:
    model = _model()
    model.last_scan_s = 0.004
    model.chunk_hash_s = 1e-5
    split: dict[str, float] = {}
    pages = 100
    total = model.expected(pages, device_state_bytes=4096, split=split)
    assert split["final_scan"] == pytest.approx(4.0)
    assert split["final_pages"] == pytest.approx((pages * PAGE_SIZE + 4096) / 100e6 * 1e3)
    # Verification: a round trip, the 32 chunk digests back, the chunks of the pages rehashed.
    assert split["verify"] == pytest.approx((0.001 + 32 * 8 / 100e6 + 32 * 1e-5) * 1e3)
    assert split["overhead"] == pytest.approx((0.002 + 2 * 0.001 + 0.01) * 1e3)
    assert total * 1e3 == pytest.approx(sum(split.values()))
    # Nothing left with digests: no verification, and the final scan as given.
    assert model.expected(0, final_scan_s=0.0) == pytest.approx(model.overhead_s())
    # The downtime cap's guess leaves the scan out.
    assert model.rest_s(pages, 4096) * 1e3 == pytest.approx(split["final_pages"] + split["verify"]
                                                          + split["overhead"])


def test_fixed_headroom_is_a_quarter_of_the_budget() -> None:
    model = _model("fixed")
    split: dict[str, float] = {}
    model.expected(10, split=split)
    margin = model.margin(split, 0, 0.001, None)
    assert margin.basis == "fixed" and margin.margin_s == pytest.approx(0.025)


# --------------------------------------------------------------------------
# The throttle


class ThrottleWorkload:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[float] = []

    def describe(self) -> str:
        return "fake"

    async def throttle(self, fraction: float) -> None:
        self.calls.append(fraction)
        if self.refuse:
            raise GuestControlError("guest refused: no")


class FakeGuardian:
    def __init__(self) -> None:
        self.states: list[str] = []

    def declare(self, state: str) -> None:
        self.states.append(state)


def _throttle(wl: ThrottleWorkload) -> tuple[Throttle, MigrationReport, FakeGuardian]:
    report = MigrationReport(migration_id="m1")
    t = Throttle(wl, SwitchoverPolicy(downtime_s=0.1), report, lambda: False)  # type: ignore[arg-type]
    guardian = FakeGuardian()
    t.guardian = guardian  # type: ignore[assignment]
    return t, report, guardian


async def test_throttle_arms_the_guardian_while_on() -> None:
    wl = ThrottleWorkload()
    t, report, guardian = _throttle(wl)
    await t.set(20)
    await t.set(20)  # unchanged: nothing to do
    await t.set(40)
    await t.end()
    await t.end()
    assert wl.calls == [0.2, 0.4, 0.0]
    assert guardian.states == [ARMED, ARMED, IDLE]
    assert report.max_throttle_pct == 40 and report.throttle_method == "adapter" and t.pct == 0


async def test_a_refused_throttle_turns_throttling_off() -> None:
    wl = ThrottleWorkload(refuse=True)
    t, report, guardian = _throttle(wl)
    await t.set(20)
    assert t.policy.throttle == "off" and t.pct == 0
    assert wl.calls == [0.2] and guardian.states == [ARMED, IDLE]
    assert report.max_throttle_pct == 0


# --------------------------------------------------------------------------
# The report builder


def test_a_committed_report_past_the_cap() -> None:
    report = MigrationReport(migration_id="m1")
    clock = [10.0]
    cap = DowntimeCap(0.05, lambda: clock[0])
    cap.start()
    clock[0] = 10.08
    record_commit(report, paused_s=0.08, phases_ms={"pause": 1.0}, expected_s=0.03, budget_ms=50,
                  bandwidth_bps=1e9, cap=cap)
    assert report.downtime_ms == report.paused_ms == pytest.approx(80)
    assert report.cap_hit == "after_commit" and report.expected_downtime_ms == pytest.approx(30)
    assert report.downtime_overshoot_ms == pytest.approx(30) and report.phases_ms == {"pause": 1.0}


def test_in_doubt_says_where_to_look() -> None:
    report = MigrationReport(migration_id="m1", destination="d:1")
    err = in_doubt(report, asyncio.CancelledError(), "m1")
    assert report.outcome == "in-doubt" and err.code is AbortCode.LINK
    assert str(err) == report.error and "migration cancelled" in str(err) and "(d:1)" in str(err)


# --------------------------------------------------------------------------
# The rounds and the switchover, with a scripted policy and fake parts


NPAGES, CHUNK = 256, 32


class ScriptedPolicy(SwitchoverPolicy):
    """Decides from ``steps`` (action, throttle %, wait s) in turn; records what it was asked."""

    def __init__(self, *steps: tuple[Action, int, float]) -> None:
        super().__init__(downtime_s=0.1, max_rounds=10)
        self.steps = list(steps)
        self.asked: list[dict[str, Any]] = []

    def decide(self, **kw: Any) -> Decision:  # type: ignore[override]
        self.asked.append(kw)
        action, pct, wait = self.steps.pop(0)
        return Decision(action, kw["expected_s"], f"scripted {action.value}", pct, wait)


class FakeScanner:
    """Each scan finds the next of ``found`` (dirty pages, odd pages); a live scan's table is its number."""

    name = "digest"
    page_s = 0.0
    detect_cpu_s = 0.0

    def __init__(self, *found: tuple[list[int], list[int]]) -> None:
        self.found = list(found)
        self.scans: list[dict[str, Any]] = []

    async def scan(self, *, final: bool, dest_table: np.ndarray | None = None,
                   pending: np.ndarray | None = None) -> Scan:
        self.scans.append({"final": final, "dest_table": dest_table, "pending": pending})
        dirty, odd = self.found.pop(0)
        n = len(self.scans)
        table = np.full(NPAGES // CHUNK, n, dtype=np.uint64)
        return Scan(np.array(dirty, dtype=np.uint32), np.array(odd, dtype=np.uint32), table, table,
                    0.001, 0.0)


class FakeSender:
    def __init__(self) -> None:
        self.sends: list[tuple[str, list[int], dict[str, Any]]] = []

    async def send(self, indices: np.ndarray, rnd: RoundReport, phase: str, **kw: Any) -> None:
        self.sends.append((phase, indices.tolist(), kw))
        rnd.pages_sent += len(indices)
        before = kw.get("before_batch")
        if before is not None:
            before(len(indices))


class FakeTables:
    """The exchange's digest requests: each answered with the next of ``tables`` (or ``frozen``)."""

    dest_peers = 0
    chan = None

    def __init__(self, *tables: np.ndarray, committed: Any = None) -> None:
        self.tables = list(tables)
        self.committed = committed
        self.sent: list[Any] = []
        self.seq = 0

    async def send(self, ev: Any) -> int:
        self.sent.append(ev)
        return 100

    async def request(self, **fields: Any) -> int:
        self.seq += 1
        self.sent.append(("request", fields))
        return self.seq

    async def expect_table(self, seq: int) -> DigestTable:
        return DigestTable(seq=seq, digests=self.tables.pop(0))

    async def expect(self, typ: type) -> Any:
        assert isinstance(self.committed, typ)
        return self.committed


class PauseWorkload:
    def __init__(self, blob: bytes = b"device") -> None:
        self.blob = blob
        self.calls: list[str] = []
        self.phases_ms = {"stop": 0.5}

    def describe(self) -> str:
        return "fake"

    async def pause(self) -> bytes:
        self.calls.append("pause")
        return self.blob

    async def throttle(self, fraction: float) -> None:
        self.calls.append(f"throttle {fraction:g}")


def _rounds(policy: SwitchoverPolicy, scanner: FakeScanner, sender: FakeSender, exchange: FakeTables,
            wl: PauseWorkload, cap: DowntimeCap | None = None) -> Rounds:
    report = MigrationReport(migration_id="m1")
    report.rounds.append(RoundReport(round=0, kind="full", pages_scanned=NPAGES, pages_dirty=NPAGES,
                                     pages_sent=NPAGES, zero_pages=0, bytes_on_wire=NPAGES * PAGE_SIZE, seconds=1.0))
    link, dirty_rate = LinkEstimator(), DirtyRateEstimator()
    model = DowntimeModel(policy, link, dirty_rate, AdaptiveCompressor("off"), lambda: 0.001,
                          budget_s=0.1, headroom="spread")
    model.region(NPAGES, CHUNK, None)
    throttle = Throttle(wl, policy, report, lambda: False)  # type: ignore[arg-type]
    return Rounds(workload=wl, policy=policy, model=model, throttle=throttle,  # type: ignore[arg-type]
                  contention=ContentionMeter("m1"), report=report, link=link, dirty_rate=dirty_rate,
                  exchange=exchange, scanner=scanner, sender=sender, npages=NPAGES,  # type: ignore[arg-type]
                  chunk_pages=CHUNK, chunks=None, cap=cap, headroom="spread", t0=time.monotonic(),
                  emit=lambda *a: None)


async def test_rounds_send_what_each_scan_finds_until_the_policy_switches_over() -> None:
    policy = ScriptedPolicy((Action.CONTINUE, 20, 0.0), (Action.CONTINUE, 30, 0.0), (Action.SWITCHOVER, 0, 0.0))
    scanner = FakeScanner(([1, 2, 3], []), ([7], [40, 41]), ([9], []))
    sender, wl = FakeSender(), PauseWorkload()
    rounds = _rounds(policy, scanner, sender, FakeTables(), wl)
    expected, dest_table = await rounds.run()
    # Two rounds sent live (digests: gaps of one page filled), throttled first; the third decided.
    assert [(p, pages, kw["fill"], kw["live"]) for p, pages, kw in sender.sends] == [
        ("iterating", [1, 2, 3], 1, True), ("iterating", [7, 40, 41], 1, True)]
    assert wl.calls == ["throttle 0.2", "throttle 0.3"]
    assert [s["final"] for s in scanner.scans] == [False, False, False]
    assert rounds.pending.tolist() == [9] and dest_table.tolist() == [3] * (NPAGES // CHUNK)
    rep = rounds.report
    assert [(r.kind, r.pages_dirty, r.throttle_pct) for r in rep.rounds] == [
        ("full", NPAGES, 0), ("iterative", 3, 20), ("iterative", 3, 30)]
    # The policy heard what each round found and what the round before sent.
    assert [(a["rounds_done"], a["remaining_pages"], a["sent_pages"]) for a in policy.asked] == [
        (0, 3, NPAGES), (1, 3, 3), (2, 1, 3)]
    # ... and, from the first live round on, its rates for the predict ramp (the full copy's
    # interval spans the connection too: none after it).
    fits = [a["fit"] for a in policy.asked]
    assert fits[0] is None
    assert [(f.pages_sent, f.dirtied, f.throttle_pct, f.npages, f.scan_per_page) for f in fits[1:]] == [
        (3, 1, 20, NPAGES, False), (3, 1, 30, NPAGES, False)]
    assert all(f.usable() and f.scan_s == r.scan_seconds for f, r in zip(fits[1:], rep.rounds[1:]))
    assert expected == pytest.approx(policy.asked[-1]["expected_s"])
    assert rep.expected_phases_ms and rep.switchover_margin_ms is not None and rep.margin_basis


async def test_with_a_tracker_the_full_copy_brings_rates_too() -> None:
    """A tracker armed before the full copy counts every page written since: the first
    decision gets the copy's rates (precopy.policy.converge.RoundFit.after_full_copy)."""
    policy = ScriptedPolicy((Action.SWITCHOVER, 0, 0.0))
    rounds = _rounds(policy, FakeScanner(([1, 2, 3, 4], [])), FakeSender(), FakeTables(), PauseWorkload())
    rnd = await rounds._scan()
    assert rounds._fit(rnd) is None  # digests: the first scan finds only pages written after the copy read them
    rounds.chunks = object()  # type: ignore[assignment]  # tracked: only ``tracked`` is asked here
    fit = rounds._fit(rnd)
    assert fit is not None and fit.usable()
    assert (fit.dirtied, fit.npages, fit.fixed_s, fit.interval_s, fit.scan_s) == (
        4, NPAGES, 0.0, rnd.interval_s, rnd.scan_s)


async def test_rounds_abort_and_a_forced_switchover_past_the_cap_never_pause() -> None:
    for action, cap in ((Action.ABORT, None), (Action.FORCE, DowntimeCap(1e-6, time.monotonic))):
        policy = ScriptedPolicy((action, 0, 0.0))
        wl, sender = PauseWorkload(), FakeSender()
        rounds = _rounds(policy, FakeScanner(([1], [])), sender, FakeTables(), wl, cap)
        with pytest.raises(PrecopyError, match="scripted") as err:
            await rounds.run()
        assert err.value.code is AbortCode.NOT_CONVERGED
        assert rounds.report.reason == f"scripted {action.value}" and not rounds.report.forced
        assert sender.sends == [] and wl.calls == []


async def test_a_contended_round_waits_and_the_wait_is_not_the_next_rounds() -> None:
    policy = ScriptedPolicy((Action.CONTINUE, 0, 0.01), (Action.SWITCHOVER, 0, 0.0))
    rounds = _rounds(policy, FakeScanner(([1], []), ([], [])), FakeSender(), FakeTables(), PauseWorkload())
    await rounds.run()
    assert rounds.contention.slept == 0.0  # counted off by the next round's measure


def test_near_switchover_stays_true_once_close() -> None:
    rounds = _rounds(ScriptedPolicy(), FakeScanner(), FakeSender(), FakeTables(), PauseWorkload())
    rounds.link.add(10_000_000, 1.0)  # 10 MB/s: 0.2 s (twice the budget) is ~488 pages
    assert not rounds.near_switchover(10_000)
    assert rounds.near_switchover(400)
    assert rounds.near_switchover(10_000)


def _switchover(scanner: FakeScanner, exchange: FakeTables, wl: PauseWorkload,
                cap: DowntimeCap | None = None) -> tuple[Switchover, FakeSender, FakeGuardian]:
    report = MigrationReport(migration_id="m1")
    policy = SwitchoverPolicy(downtime_s=0.1)
    model = DowntimeModel(policy, LinkEstimator(), DirtyRateEstimator(), AdaptiveCompressor("off"),
                          lambda: 0.001, budget_s=0.1, headroom="spread")
    model.region(NPAGES, CHUNK, None)
    guardian, sender = FakeGuardian(), FakeSender()
    throttle = Throttle(wl, policy, report, lambda: True)  # type: ignore[arg-type]
    throttle.pct = 30
    sw = Switchover(workload=wl, guardian=guardian, throttle=throttle, exchange=exchange,  # type: ignore[arg-type]
                    scanner=scanner, sender=sender, record=None, model=model,  # type: ignore[arg-type]
                    committer=Committer(TARGET), report=report, cap=cap, npages=NPAGES, chunk_pages=CHUNK,
                    chunks=None, pool=None)  # type: ignore[arg-type]
    return sw, sender, guardian


async def test_switchover_steps_in_order_with_a_repair() -> None:
    nchunks = NPAGES // CHUNK
    frozen = np.full(nchunks, 1, dtype=np.uint64)  # the final scan's table (FakeScanner: its first)
    off = frozen.copy()
    off[2] = 99  # the destination holds chunk 2 differently at first
    exchange = FakeTables(off, frozen.copy(), committed=Committed("m1", resumed=True, timings={"resume": 2.0}))
    wl = PauseWorkload(b"x" * 10)
    sw, sender, guardian = _switchover(FakeScanner(([5, 6], [200])), exchange, wl)
    blob = await sw.pause()
    assert blob == wl.blob and wl.calls == ["pause"] and guardian.states == [ARMED]
    assert sw.throttle.pct == 0  # the pause ended the throttle itself
    rnd, table, sent = await sw.final_pass(0.05, None, np.array([9], dtype=np.uint32), len(blob))
    assert isinstance(exchange.sent[0], SwitchoverEvent)
    assert sent.tolist() == [5, 6, 200] and table.tolist() == frozen.tolist()
    assert sw.report.verify_repairs == 1  # the odd page
    await sw.send_device_state(blob, rnd)
    device = [ev for ev in exchange.sent if isinstance(ev, DeviceState)]
    assert len(device) == 1 and bytes(device[0].data) == blob and sw.report.device_state_bytes == 10
    await sw.verify(table, sent, rnd)
    assert [p for p, _, _ in sender.sends] == ["switchover", "repair"]
    assert sender.sends[1][1] == list(range(2 * CHUNK, 3 * CHUNK))
    assert sw.report.verify_repairs == 1 + CHUNK and sw.report.rounds == [rnd] and rnd.kind == "final"
    t_commit = await sw.commit(blob)
    assert guardian.states == [ARMED, COMMIT] and sw.committer.confirmed
    commit_ev = exchange.sent[-1]
    assert isinstance(commit_ev, Commit) and commit_ev.checksum == xxhash.xxh3_64_intdigest(blob)
    assert list(sw.phases) == ["pause", "stop", "final_scan", "final_pages", "device_state", "verify",
                               "dest_resume", "commit"]
    assert t_commit >= sw.t_pause


async def test_switchover_verification_gives_up_after_three_repairs() -> None:
    nchunks = NPAGES // CHUNK
    wrong = np.full(nchunks, 7, dtype=np.uint64)
    exchange = FakeTables(wrong, wrong, wrong)
    sw, sender, _ = _switchover(FakeScanner(([1], [])), exchange, PauseWorkload())
    blob = await sw.pause()
    rnd, table, sent = await sw.final_pass(0.05, None, np.zeros(0, dtype=np.uint32), len(blob))
    with pytest.raises(PrecopyError, match="still differs after 3 repairs") as err:
        await sw.verify(table, sent, rnd)
    assert err.value.code is AbortCode.VERIFY_FAILED
    assert [p for p, _, _ in sender.sends] == ["switchover", "repair", "repair", "repair"]


async def test_the_cap_stops_the_switchover_before_the_final_scan() -> None:
    clock = [0.0]
    cap = DowntimeCap(0.01, lambda: clock[0])
    scanner = FakeScanner(([1], []))
    sw, sender, _ = _switchover(scanner, FakeTables(), PauseWorkload(), cap)
    await sw.pause()
    clock[0] = 0.02  # the pause alone took longer than the cap
    with pytest.raises(DowntimeCapExceeded):
        await sw.final_pass(0.001, None, np.zeros(0, dtype=np.uint32), 0)
    assert sw.report.cap_hit == "final_scan" and scanner.scans == [] and sender.sends == []

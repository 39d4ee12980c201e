"""The source session's phase pieces, driven without sockets (issue 19).

The committer's lost-reply handling and outcome resolution with a fake
exchange and a fake outcome query; the downtime model with made-up
measurements; the throttle with a fake workload and guardian; the report
builder.  The sessions over loopback (tests/test_engine.py and the fault
tests) cover the same pieces wired together.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import precopy.session.commit as commit
from precopy.errors import AbortCode, GuestControlError, MigrationInDoubt, PrecopyError
from precopy.net.channel import LinkError, PeerAborted
from precopy.policy.downtime import DowntimeCap
from precopy.policy.switchover import DirtyRateEstimator, LinkEstimator, SwitchoverPolicy
from precopy.protocol import PAGE_SIZE, Commit, Committed, Outcome
from precopy.protocol.compress import AdaptiveCompressor
from precopy.session.commit import Committer, NotCommitted, OutcomeTarget, resolve_outcome
from precopy.session.estimate import DowntimeModel
from precopy.session.guardian import ARMED, IDLE
from precopy.session.report import MigrationReport
from precopy.session.reporting import in_doubt, record_commit
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

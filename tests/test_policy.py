"""Tests of the pure switchover policy (``precopy.policy.switchover``)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precopy.policy.switchover import (
    Contention,
    MAX_PAUSED_SPEEDUP,
    Action,
    Decision,
    DirtyRateEstimator,
    LinkEstimator,
    SwitchoverPolicy,
    expected_downtime,
)
from precopy.protocol import PAGE_SIZE

approx = pytest.approx


# --------------------------------------------------------------------------
# LinkEstimator


def test_link_estimator_starts_at_initial_guess() -> None:
    assert LinkEstimator().bytes_per_second == 100e6
    assert LinkEstimator(initial_bps=5e6).bytes_per_second == 5e6


@pytest.mark.parametrize("nbytes,seconds", [(0, 1.0), (-5, 1.0), (1000, 0.0), (1000, -1.0)])
def test_link_estimator_ignores_empty_or_bogus_samples(nbytes: int, seconds: float) -> None:
    est = LinkEstimator(initial_bps=7e6)
    est.add(nbytes, seconds)
    assert est.bytes_per_second == 7e6
    est.add(1000, 0.1)
    assert est.bytes_per_second == approx(10_000)  # the bogus sample was not pooled


def test_paused_rate_takes_out_the_time_the_sender_waited_for_a_cpu() -> None:
    est = LinkEstimator(alpha=0.5, min_seconds=0.0)
    assert est.paused_bytes_per_second == est.bytes_per_second == 100e6  # nothing known: the guess
    est.add(1_000_000, 1.0)  # nobody else wanted the CPU: the pause changes nothing
    assert est.paused_bytes_per_second == approx(1e6)
    est.add(1_000_000, 1.0, waited=0.25)  # a quarter of it runnable but not running (the workload's CPU)
    assert est.bytes_per_second == approx(1e6)
    assert est.paused_bytes_per_second == approx(0.5 * 1e6 / 0.75 + 0.5 * 1e6)
    fresh = LinkEstimator(min_seconds=0.0)
    fresh.add(1_000_000, 1.0, waited=0.9)  # never taken for more than MAX_PAUSED_SPEEDUP times faster
    assert fresh.paused_bytes_per_second == approx(MAX_PAUSED_SPEEDUP * 1e6)
    fresh.add(1_000_000, 1.0, waited=5.0)  # a wait longer than the sample is the sample
    assert fresh.paused_bytes_per_second == approx(MAX_PAUSED_SPEEDUP * 1e6)
    pooled = LinkEstimator(min_seconds=0.02)
    pooled.add(1000, 0.01)
    pooled.add(1000, 0.01, waited=0.005)
    pooled.add(1000, 0.01, waited=0.005)  # pooled with the bytes and seconds
    assert pooled.paused_bytes_per_second == approx(0.5 * 2000 / 0.01 + 0.5 * 1000 / 0.01)


def test_link_estimator_first_sample_is_taken_even_if_short() -> None:
    est = LinkEstimator(min_seconds=0.02)
    est.add(1000, 0.001)
    assert est.bytes_per_second == approx(1e6)


def test_link_estimator_ewma() -> None:
    est = LinkEstimator(alpha=0.5, min_seconds=0.0)
    est.add(1_000_000, 1.0)
    assert est.bytes_per_second == approx(1e6)
    est.add(3_000_000, 1.0)
    assert est.bytes_per_second == approx(0.5 * 3e6 + 0.5 * 1e6)
    est.add(1_000_000, 0.5)
    assert est.bytes_per_second == approx(0.5 * 2e6 + 0.5 * 2e6)

    quarter = LinkEstimator(alpha=0.25, min_seconds=0.0)
    quarter.add(100, 1.0)
    quarter.add(500, 1.0)
    assert quarter.bytes_per_second == approx(0.25 * 500 + 0.75 * 100)


def test_link_estimator_pools_short_samples() -> None:
    est = LinkEstimator(alpha=0.5, min_seconds=0.02)
    est.add(1_000_000, 1.0)  # 1 MB/s
    est.add(1000, 0.01)      # too short: pooled, estimate unchanged
    assert est.bytes_per_second == approx(1e6)
    est.add(3000, 0.01)      # pool: 4000 bytes over 0.02 s = 200 kB/s
    assert est.bytes_per_second == approx(0.5 * 200_000 + 0.5 * 1e6)
    est.add(10, 0.01)        # the pool was emptied: pooled again
    assert est.bytes_per_second == approx(600_000)


def test_link_estimator_alpha_one_tracks_last_sample() -> None:
    est = LinkEstimator(alpha=1.0, min_seconds=0.0)
    for bps in (5e6, 1e6, 9e6):
        est.add(int(bps), 1.0)
        assert est.bytes_per_second == approx(bps)


# --------------------------------------------------------------------------
# DirtyRateEstimator


def test_dirty_rate_estimator() -> None:
    est = DirtyRateEstimator(alpha=0.5)
    assert est.pages_per_second == 0.0
    est.add(100, 0.0)  # no elapsed time: ignored
    est.add(100, -1.0)
    assert est.pages_per_second == 0.0
    est.add(100, 2.0)
    assert est.pages_per_second == approx(50.0)
    est.add(0, 1.0)  # a quiet round pulls the rate down, it is not ignored
    assert est.pages_per_second == approx(25.0)
    est.add(300, 1.0)
    assert est.pages_per_second == approx(0.5 * 300 + 0.5 * 25)


def test_dirty_rate_estimator_alpha() -> None:
    est = DirtyRateEstimator(alpha=0.25)
    est.add(400, 1.0)
    est.add(0, 1.0)
    assert est.pages_per_second == approx(0.75 * 400)


# --------------------------------------------------------------------------
# expected_downtime


def test_expected_downtime_formula() -> None:
    bw = 1000 * PAGE_SIZE  # 1000 pages a second
    assert expected_downtime(remaining_pages=1000, bandwidth_bps=bw) == approx(1.0)
    assert expected_downtime(remaining_pages=1000, bandwidth_bps=bw, compress_ratio=0.25) == approx(0.25)
    assert expected_downtime(remaining_pages=0, bandwidth_bps=bw, device_state_bytes=bw // 2) == approx(0.5)
    full = expected_downtime(
        remaining_pages=500, bandwidth_bps=bw, compress_ratio=0.5,
        device_state_bytes=bw, final_scan_s=0.125, overhead_s=0.01,
    )
    assert full == approx(500 * PAGE_SIZE * 0.5 / bw + 1.0 + 0.125 + 0.01)


def test_expected_downtime_nothing_left_is_fixed_costs() -> None:
    assert expected_downtime(remaining_pages=0, bandwidth_bps=1e9, final_scan_s=0.02, overhead_s=0.003) \
        == approx(0.023)
    assert expected_downtime(remaining_pages=0, bandwidth_bps=1e9) == 0.0


@pytest.mark.parametrize("bw", [0.0, -10.0, 0.5])
def test_expected_downtime_with_no_bandwidth_is_finite(bw: float) -> None:
    t = expected_downtime(remaining_pages=1, bandwidth_bps=bw)
    assert math.isfinite(t)
    assert t == approx(PAGE_SIZE / 1.0)  # bandwidth floored at 1 B/s


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 28), st.integers(0, 1 << 28), st.floats(1e3, 1e11))
def test_expected_downtime_is_monotonic(pages: int, more: int, bw: float) -> None:
    a = expected_downtime(remaining_pages=pages, bandwidth_bps=bw)
    b = expected_downtime(remaining_pages=pages + more, bandwidth_bps=bw)
    c = expected_downtime(remaining_pages=pages, bandwidth_bps=bw * 2)
    assert 0 <= a <= b
    assert c <= a


# --------------------------------------------------------------------------
# SwitchoverPolicy


def test_switchover_within_budget() -> None:
    pol = SwitchoverPolicy(downtime_s=0.3)
    d = pol.decide(rounds_done=0, elapsed_s=1.0, expected_s=0.1)
    assert isinstance(d, Decision)
    assert d.action is Action.SWITCHOVER
    assert d.expected_downtime_s == 0.1
    assert "within" in d.reason and "100.0 ms" in d.reason


def test_switchover_exactly_at_the_budget_less_its_headroom() -> None:
    """The estimate errs (a pause can send no faster than the live rounds): the pause is
    planned with a quarter of the budget to spare."""
    assert SwitchoverPolicy(downtime_s=0.3).headroom == 0.75
    assert SwitchoverPolicy(downtime_s=0.3).decide(rounds_done=3, elapsed_s=0, expected_s=0.22).action \
        is Action.SWITCHOVER
    assert SwitchoverPolicy(downtime_s=0.3).decide(rounds_done=3, elapsed_s=0, expected_s=0.24).action \
        is Action.CONTINUE
    assert SwitchoverPolicy(downtime_s=0.3, headroom=1.0).decide(rounds_done=3, elapsed_s=0,
                                                                 expected_s=0.3).action is Action.SWITCHOVER
    with pytest.raises(ValueError, match="headroom"):
        SwitchoverPolicy(headroom=0.0)


def test_continue_when_over_budget_and_limits_not_reached() -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=5, max_time_s=60)
    d = pol.decide(rounds_done=4, elapsed_s=59.9, expected_s=0.31)
    assert d.action is Action.CONTINUE
    assert "over budget" in d.reason


@pytest.mark.parametrize("mode,action,word", [("abort", Action.ABORT, "aborting"),
                                              ("force", Action.FORCE, "forcing")])
def test_max_rounds_reached(mode: str, action: Action, word: str) -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=5, max_time_s=None, on_nonconvergence=mode)
    assert pol.decide(rounds_done=4, elapsed_s=1e6, expected_s=2.0).action is Action.CONTINUE
    d = pol.decide(rounds_done=5, elapsed_s=1e6, expected_s=2.0)
    assert d.action is action
    assert d.expected_downtime_s == 2.0
    assert "5 rounds" in d.reason and word in d.reason


@pytest.mark.parametrize("mode,action", [("abort", Action.ABORT), ("force", Action.FORCE)])
def test_max_time_reached(mode: str, action: Action) -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=100, max_time_s=10.0, on_nonconvergence=mode)
    assert pol.decide(rounds_done=1, elapsed_s=9.99, expected_s=1.0).action is Action.CONTINUE
    d = pol.decide(rounds_done=1, elapsed_s=10.0, expected_s=1.0)
    assert d.action is action
    assert "10.0 s" in d.reason


def test_unbounded_time_never_times_out() -> None:
    pol = SwitchoverPolicy(max_rounds=1000, max_time_s=None)
    assert pol.decide(rounds_done=1, elapsed_s=1e12, expected_s=100.0).action is Action.CONTINUE


def test_budget_met_wins_over_limits() -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=2, max_time_s=1.0)
    assert pol.decide(rounds_done=50, elapsed_s=50.0, expected_s=0.2).action is Action.SWITCHOVER


def test_zero_rounds_allowed_decides_at_once() -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=0, on_nonconvergence="force")
    assert pol.decide(rounds_done=0, elapsed_s=0.0, expected_s=0.5).action is Action.FORCE


def test_history_records_every_estimate() -> None:
    pol = SwitchoverPolicy()
    for e in (3.0, 1.0, 0.2):
        pol.decide(rounds_done=0, elapsed_s=0.0, expected_s=e)
    assert pol.history == [3.0, 1.0, 0.2]
    assert SwitchoverPolicy().history == []  # not shared between instances


@pytest.mark.parametrize("kwargs", [
    {"on_nonconvergence": "maybe"},
    {"on_nonconvergence": "ABORT"},
    {"downtime_s": 0.0},
    {"downtime_s": -0.1},
    {"max_rounds": -1},
])
def test_invalid_policy_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SwitchoverPolicy(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    budget=st.floats(1e-3, 10.0),
    expected=st.floats(0.0, 100.0),
    rounds=st.integers(0, 100),
    max_rounds=st.integers(0, 100),
    elapsed=st.floats(0.0, 1e4),
    max_time=st.none() | st.floats(0.0, 1e4),
    mode=st.sampled_from(["abort", "force"]),
)
def test_decision_rule(budget: float, expected: float, rounds: int, max_rounds: int,
                       elapsed: float, max_time: float | None, mode: str) -> None:
    pol = SwitchoverPolicy(downtime_s=budget, max_rounds=max_rounds, max_time_s=max_time,
                           on_nonconvergence=mode)
    d = pol.decide(rounds_done=rounds, elapsed_s=elapsed, expected_s=expected)
    exhausted = rounds >= max_rounds or (max_time is not None and elapsed >= max_time)
    if expected <= budget * pol.headroom:
        assert d.action is Action.SWITCHOVER
    elif not exhausted:
        assert d.action is Action.CONTINUE
    else:
        assert d.action is (Action.FORCE if mode == "force" else Action.ABORT)
    assert d.expected_downtime_s == expected


# --------------------------------------------------------------------------
# Auto-converge (throttling) and the downtime floor


def _round(pol: SwitchoverPolicy, expected: float, *, dirtied: int = 1000, sent: int = 1000,
           floor: float = 0.01, rounds: int = 0, remaining: int | None = None) -> Decision:
    """One decision of a migration whose dirty set does not shrink (by default)."""
    return pol.decide(rounds_done=rounds, elapsed_s=0.0, expected_s=expected, floor_s=floor,
                      scan_s=floor / 2, dirtied_pages=dirtied, sent_pages=sent,
                      remaining_pages=dirtied if remaining is None else remaining)


def test_decision_without_throttle_field_means_no_throttle() -> None:
    assert Decision(Action.CONTINUE, 1.0, "x").throttle_pct == 0


def test_throttle_starts_after_two_non_converging_rounds() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05)
    first = _round(pol, 0.5, rounds=0)
    assert first.action is Action.CONTINUE and first.throttle_pct == 0
    second = _round(pol, 0.5, rounds=1)
    assert second.action is Action.CONTINUE and second.throttle_pct == 20
    assert "not converging" in second.reason and "1000 pages dirtied vs 1000 sent" in second.reason
    assert "throttling the workload to 20 %" in second.reason
    assert pol.throttle_pct == 20


def test_throttle_steps_up_every_further_trigger_and_stops_at_the_cap() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100, throttle_initial_pct=20, throttle_step_pct=10,
                           throttle_max_pct=45)
    seen = [_round(pol, 0.5, rounds=r).throttle_pct for r in range(10)]
    # QEMU: two non-converging periods per trigger, then the count starts again.
    assert seen == [0, 20, 20, 30, 30, 40, 40, 45, 45, 45]
    _round(pol, 0.5, rounds=10)
    assert "stays at its maximum, 45 %" in _round(pol, 0.5, rounds=11).reason


def test_throttle_defaults_are_qemus() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=1000)
    seen = {_round(pol, 0.5, rounds=r).throttle_pct for r in range(40)}
    assert seen == {0, 20, 30, 40, 50, 60, 70, 80, 90, 99}


def test_two_in_a_row_means_in_a_row() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100)
    for r in range(6):  # not converging, then converging, alternately
        d = _round(pol, 0.5, dirtied=1000 if r % 2 == 0 else 100, rounds=r)
        assert d.throttle_pct == 0, r


@pytest.mark.parametrize("dirtied", [0, 100, 500])  # at most half of what was sent
def test_never_throttled_while_the_dirty_set_shrinks_by_half(dirtied: int) -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100)
    for r in range(10):
        assert _round(pol, 0.5, dirtied=dirtied, sent=1000, rounds=r).throttle_pct == 0


def test_never_throttled_within_budget() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05)
    d = _round(pol, 0.035, dirtied=10_000, sent=1)
    assert d.action is Action.SWITCHOVER and d.throttle_pct == 0


def test_never_throttled_when_the_trend_reaches_the_budget_soon() -> None:
    """More dirtied than half of what was sent, but the expected downtime falls fast enough:
    at this ratio the budget is a few rounds away, so the migration converges without help."""
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100)
    floor = 0.01
    for r, expected in enumerate((0.97, 0.394, 0.164, 0.071)):  # excess 0.96, then x 0.4 a round
        d = _round(pol, expected, dirtied=900, sent=1000, floor=floor, rounds=r)
        assert d.action is Action.CONTINUE and d.throttle_pct == 0, (r, d.reason)
    assert _round(pol, 0.035, dirtied=900, sent=1000, floor=floor, rounds=4).action is Action.SWITCHOVER


def test_a_decline_too_slow_for_the_rounds_left_is_not_convergence() -> None:
    thr = []
    for max_rounds in (100, 3):
        pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=max_rounds, on_nonconvergence="force")
        for r, expected in enumerate((0.97, 0.394, 0.164)):  # 0.4 a round: 2.5 more rounds needed
            d = _round(pol, expected, dirtied=900, sent=1000, floor=0.01, rounds=r)
        thr.append(d.throttle_pct)
    assert thr == [0, 20]


def test_a_slow_decline_is_not_convergence() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100)
    thr = [_round(pol, 1.0 - 0.02 * r, dirtied=900, sent=1000, rounds=r).throttle_pct for r in range(3)]
    assert thr == [0, 20, 20]


def test_throttle_off_never_throttles() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100, throttle="off")
    assert all(_round(pol, 0.5, rounds=r).throttle_pct == 0 for r in range(10))


def test_disable_throttle_ends_it() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100)
    _round(pol, 0.5)
    assert _round(pol, 0.5, rounds=1).throttle_pct == 20
    pol.disable_throttle()
    assert all(_round(pol, 0.5, rounds=r).throttle_pct == 0 for r in range(2, 8))


def test_no_measurements_no_throttle() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100)
    for r in range(6):
        assert pol.decide(rounds_done=r, elapsed_s=0.0, expected_s=0.5).throttle_pct == 0


def test_limits_after_throttling_still_end_by_the_nonconvergence_policy() -> None:
    for mode, action in (("abort", Action.ABORT), ("force", Action.FORCE)):
        pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=4, max_time_s=None, on_nonconvergence=mode)
        decisions = [_round(pol, 0.5, rounds=r) for r in range(5)]
        assert [d.action for d in decisions[:4]] == [Action.CONTINUE] * 4
        assert decisions[-1].action is action
        assert "did not converge after 4 rounds (throttled at 30 %)" in decisions[-1].reason


def test_one_round_over_the_floor_is_not_floor_bound_but_is_not_throttled() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100)
    assert _round(pol, 0.5, rounds=0).throttle_pct == 0
    d = _round(pol, 0.5, floor=0.06, rounds=1)  # would be the trigger, but the floor is over budget
    assert d.action is Action.CONTINUE and d.throttle_pct == 0
    d = _round(pol, 0.5, floor=0.01, rounds=2)  # the count started again
    assert d.action is Action.CONTINUE and d.throttle_pct == 0


@pytest.mark.parametrize("tracked", [False, True])
def test_floor_over_budget_twice_aborts_at_once(tracked: bool) -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, on_nonconvergence="abort", tracked=tracked)
    assert pol.decide(rounds_done=0, elapsed_s=0, expected_s=0.5, floor_s=0.08, scan_s=0.07).action \
        is Action.CONTINUE
    d = pol.decide(rounds_done=1, elapsed_s=0, expected_s=0.5, floor_s=0.0812, scan_s=0.07)
    assert d.action is Action.ABORT
    assert "cannot converge" in d.reason and "downtime floor" in d.reason
    assert "~81.2 ms, over the 50 ms budget in 2 rounds in a row" in d.reason
    assert "raise --downtime-ms to at least 136" in d.reason and "aborting" in d.reason
    if tracked:
        assert "uffd-wp" not in d.reason and "final scan alone" not in d.reason
    else:
        assert "the final scan alone takes ~70 ms" in d.reason and "--tracking uffd-wp" in d.reason


def test_floor_strikes_must_be_consecutive() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30)
    for r, floor in enumerate((0.08, 0.03, 0.08, 0.03, 0.08)):
        assert pol.decide(rounds_done=r, elapsed_s=0, expected_s=0.5, floor_s=floor).action \
            is Action.CONTINUE


def test_floor_bound_force_switches_over_once_the_dirty_set_stops_shrinking() -> None:
    """Without a throttle to try, a floor-bound forced migration goes on only while
    the dirty set shrinks by a tenth a round."""
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, on_nonconvergence="force", throttle="off")
    assert _round(pol, 0.9, floor=0.08, remaining=9000, rounds=0).action is Action.CONTINUE
    d = _round(pol, 0.5, floor=0.08, remaining=5000, rounds=1)  # floor-bound, but still shrinking
    assert d.action is Action.CONTINUE and "while the dirty set shrinks" in d.reason
    d = _round(pol, 0.48, floor=0.08, remaining=4800, rounds=2)  # less than a tenth smaller: now
    assert d.action is Action.FORCE and "forcing switchover now" in d.reason and "downtime floor" in d.reason


def test_floor_bound_force_does_not_wait_for_max_rounds() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, on_nonconvergence="force", throttle="off")
    actions = [_round(pol, 0.5, floor=0.08, remaining=5000, rounds=r).action for r in range(3)]
    assert actions == [Action.CONTINUE, Action.FORCE, Action.FORCE]


def test_floor_bound_force_near_the_floor_switches_over_at_once() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, on_nonconvergence="force")
    _round(pol, 0.09, floor=0.08, remaining=100, rounds=0)
    d = _round(pol, 0.095, floor=0.08, remaining=90, rounds=1)  # within a quarter of the floor
    assert d.action is Action.FORCE


def test_floor_bound_force_throttles_toward_the_floor_then_forces() -> None:
    """Floor-bound and forced: the budget is out of reach, but a throttle still shrinks
    what the pause sends above the floor; it steps up as usual, and once it is at its
    maximum and the dirty set no longer shrinks, the switchover is forced (well before
    the round limit)."""
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100, on_nonconvergence="force", throttle_max_pct=40)
    decisions = [_round(pol, 0.9, floor=0.08, remaining=9000, rounds=r) for r in range(12)]
    thr = [d.throttle_pct for d in decisions]
    assert max(thr) == 40 and thr == sorted(thr) and thr[2] == 20  # floor-bound from the second round
    forced = [d.action for d in decisions].index(Action.FORCE)
    assert all(d.action is Action.CONTINUE for d in decisions[:forced])
    assert forced < 12 and thr[forced] == 40 and "throttling toward the floor" in decisions[forced - 1].reason
    # Abort mode never throttles a floor-bound migration: it ends it.
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=100, on_nonconvergence="abort")
    _round(pol, 0.9, rounds=0)
    assert _round(pol, 0.9, rounds=1).throttle_pct == 20
    _round(pol, 0.9, floor=0.08, rounds=2)
    d = _round(pol, 0.9, floor=0.08, rounds=3)
    assert d.action is Action.ABORT and pol.throttle_pct == 0


def test_floor_bound_force_does_not_throttle_a_pause_close_to_the_floor() -> None:
    """A few pages over a floor (the estimate's noise, not pages that take long to
    send) are no reason to slow the workload down, however fast it dirties them."""
    pol = SwitchoverPolicy(downtime_s=0.001, max_rounds=30, on_nonconvergence="force")
    decisions = [_round(pol, 0.0095, floor=0.0070, remaining=6, rounds=r) for r in range(6)]
    assert all(d.throttle_pct == 0 for d in decisions), [d.reason for d in decisions]
    assert decisions[-1].action is Action.FORCE


def test_floor_bound_force_does_not_throttle_for_slow_live_scans() -> None:
    """Measured: a 2,000 pages/s guest, live scans of ~85 ms over a 54 ms floor (the paused
    scan has the CPUs to itself), ~140 pages left: 1.7 x the floor, all of it scan time.
    Throttling cannot shorten that; only pages that take long to send are a reason."""
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, on_nonconvergence="force")
    decisions = [pol.decide(rounds_done=r, elapsed_s=0.0, expected_s=0.092, floor_s=0.054, scan_s=0.052,
                            dirtied_pages=140, sent_pages=140, remaining_pages=140, at_floor_scan_s=0.056)
                 for r in range(6)]
    assert all(d.throttle_pct == 0 for d in decisions), [d.reason for d in decisions]
    assert decisions[-1].action is Action.FORCE
    # The same pause made of pages that take long to send is throttled toward the floor.
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, on_nonconvergence="force")
    decisions = [pol.decide(rounds_done=r, elapsed_s=0.0, expected_s=0.5, floor_s=0.054, scan_s=0.052,
                            dirtied_pages=9000, sent_pages=9000, remaining_pages=9000, at_floor_scan_s=0.48)
                 for r in range(6)]
    assert max(d.throttle_pct for d in decisions) >= 20


@pytest.mark.parametrize("kwargs", [
    {"throttle": "on"},
    {"throttle_initial_pct": 0},
    {"throttle_initial_pct": 50, "throttle_max_pct": 40},
    {"throttle_max_pct": 100},
    {"throttle_step_pct": -1},
    {"throttle_checks": 0},
])
def test_invalid_throttle_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="throttle"):
        SwitchoverPolicy(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    rounds=st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 0.2), st.integers(0, 10_000),
                              st.integers(0, 10_000)), min_size=1, max_size=40),
    initial=st.integers(1, 99), step=st.integers(0, 99), cap=st.integers(1, 99),
    mode=st.sampled_from(["abort", "force"]),
)
def test_throttle_invariants(rounds: list[tuple[float, float, int, int]], initial: int, step: int,
                             cap: int, mode: str) -> None:
    """Whatever the measurements: the throttle is 0 or between initial and the cap; it only
    grows, except to 0 when floor-bound (and aborting); a round that dirtied at most half of what was sent
    never starts it; a stop rule applies as before."""
    cap = max(cap, initial)
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=1000, max_time_s=None, on_nonconvergence=mode,
                           throttle_initial_pct=initial, throttle_step_pct=step, throttle_max_pct=cap)
    prev = 0
    target = 0.05 * pol.headroom
    for r, (expected, floor, dirtied, sent) in enumerate(rounds):
        d = pol.decide(rounds_done=r, elapsed_s=0.0, expected_s=expected, floor_s=floor,
                       dirtied_pages=dirtied, sent_pages=sent, remaining_pages=dirtied)
        assert d.throttle_pct == 0 or initial <= d.throttle_pct <= cap
        if expected <= target:
            assert d.action is Action.SWITCHOVER
        elif d.action is Action.CONTINUE:
            assert d.throttle_pct >= prev or d.throttle_pct == 0 and floor > target
            if d.throttle_pct > prev:
                assert dirtied > sent / 2 and (floor <= target or mode == "force")
        else:
            assert d.action in (Action.ABORT, Action.FORCE) and "floor" in d.reason
            break
        prev = d.throttle_pct


def test_a_floor_within_the_budget_but_not_its_headroom_says_so() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, on_nonconvergence="abort")
    for r in range(2):
        d = pol.decide(rounds_done=r, elapsed_s=0, expected_s=0.2, floor_s=0.047, scan_s=0.04)
    assert d.action is Action.ABORT
    assert "~47.0 ms, over 37.5 ms (the 50 ms budget less its 25 % headroom)" in d.reason


# --------------------------------------------------------------------------
# A floor measured under contention is not a floor (issue 29)

_BUSY = Contention(dest_peers=7, cpu_wait_share=0.6)


def _floor_round(pol: SwitchoverPolicy, r: int, floor: float, contention: Contention | None = None,
                 elapsed: float = 0.0, floor_min: float | None = None) -> Decision:
    return pol.decide(rounds_done=r, elapsed_s=elapsed, expected_s=floor + 0.01, floor_s=floor, scan_s=0.012,
                      contention=contention, floor_min_s=floor_min)


def test_contention_reasons_name_each_cause_at_the_limits() -> None:
    assert Contention().reasons(0.4, 0.1) == []
    assert Contention(cpu_wait_share=0.39, steal_share=0.09).reasons(0.4, 0.1) == []
    why = Contention(source_peers=2, dest_peers=7, cpu_wait_share=0.6, steal_share=0.2).reasons(0.4, 0.1)
    assert why == ["2 other migration(s) sending from this host", "7 other migration(s) into the destination",
                   "the sender waited for a CPU 60% of the time", "CPU steal 20%"]


def test_a_floor_over_budget_under_contention_waits_instead_of_aborting() -> None:
    """The issue's case: eight migrations on two cores measure a ~353 ms floor on a 300 ms
    budget; alone the same guest's floor is ~20 ms.  No abort while contended: wait, retry."""
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=30)
    waits = []
    for r in range(40):  # more than --max-rounds: contended rounds are not counted
        d = _floor_round(pol, r, 0.3535, _BUSY)
        assert d.action is Action.CONTINUE, d.reason
        assert "contention" in d.reason and "7 other migration(s) into the destination" in d.reason
        waits.append(d.wait_s)
    assert waits[:4] == [0.25, 0.5, 1.0, 2.0] and set(waits[4:]) == {2.0}  # backs off, bounded
    # Contention gone: the floor alone decides, and it is far under the budget.
    d = _floor_round(pol, 40, 0.02)
    assert d.action is Action.SWITCHOVER and d.wait_s == 0.0


def test_a_floor_that_holds_once_contention_is_gone_aborts() -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=30)
    assert _floor_round(pol, 0, 0.35, _BUSY).action is Action.CONTINUE
    assert _floor_round(pol, 1, 0.35, _BUSY).action is Action.CONTINUE
    d = _floor_round(pol, 2, 0.35)  # quiet: a first strike
    assert d.action is Action.CONTINUE and d.wait_s == 0.0
    d = _floor_round(pol, 3, 0.35)  # quiet again: the floor is real
    assert d.action is Action.ABORT and "cannot converge" in d.reason and "in 2 rounds in a row" in d.reason


def test_quiet_floor_strikes_must_be_consecutive_across_contended_rounds() -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=30)
    for r, busy in enumerate((None, _BUSY, None, _BUSY, None)):
        assert _floor_round(pol, r, 0.35, busy).action is Action.CONTINUE


def test_contention_gives_up_at_max_time() -> None:
    pol = SwitchoverPolicy(downtime_s=0.3, max_rounds=30, max_time_s=600.0)
    assert _floor_round(pol, 0, 0.35, _BUSY, elapsed=599.0).action is Action.CONTINUE
    d = _floor_round(pol, 1, 0.35, _BUSY, elapsed=600.5)
    assert d.action is Action.ABORT and "did not converge after 600.5 s (2 rounds contended, the last: " in d.reason
    assert "waited for a CPU" in d.reason or "other migration" in d.reason, d.reason
    forced = SwitchoverPolicy(downtime_s=0.3, on_nonconvergence="force", max_time_s=10.0)
    d = _floor_round(forced, 0, 0.35, _BUSY, elapsed=11.0)
    assert d.action is Action.FORCE


def test_a_floor_whose_fixed_costs_exceed_the_budget_aborts_even_under_contention() -> None:
    """A 1 ms budget is under the fixed 2 ms of any pause: no contention can be to blame."""
    pol = SwitchoverPolicy(downtime_s=0.001)
    assert _floor_round(pol, 0, 0.02, _BUSY, floor_min=0.002).action is Action.CONTINUE
    d = _floor_round(pol, 1, 0.02, _BUSY, floor_min=0.002)
    assert d.action is Action.ABORT and "cannot converge" in d.reason


@pytest.mark.parametrize("busy", [
    Contention(source_peers=1), Contention(dest_peers=1), Contention(cpu_wait_share=0.5),
    Contention(steal_share=0.3),
], ids=["source-peer", "dest-peer", "cpu-wait", "steal"])
def test_each_kind_of_contention_alone_defers_the_floor_rule(busy: Contention) -> None:
    pol = SwitchoverPolicy(downtime_s=0.05)
    for r in range(5):
        assert _floor_round(pol, r, 0.08, busy).action is Action.CONTINUE


def test_a_little_cpu_wait_is_not_contention() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05)
    _floor_round(pol, 0, 0.08, Contention(cpu_wait_share=0.2))
    assert _floor_round(pol, 1, 0.08, Contention(cpu_wait_share=0.2)).action is Action.ABORT


def test_contended_rounds_do_not_count_toward_max_rounds() -> None:
    """Not floor-bound, just over budget: the rounds contention made do not use up --max-rounds."""
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=3, throttle="off")
    for r in range(6):
        d = pol.decide(rounds_done=r, elapsed_s=0, expected_s=0.5, floor_s=0.01, contention=_BUSY)
        assert d.action is Action.CONTINUE and d.wait_s == 0.0  # only a floor waits
    d = pol.decide(rounds_done=8, elapsed_s=0, expected_s=0.5, floor_s=0.01)
    assert d.action is Action.CONTINUE
    d = pol.decide(rounds_done=9, elapsed_s=0, expected_s=0.5, floor_s=0.01)
    assert d.action is Action.ABORT and "did not converge after 9 rounds (6 of them contended)" in d.reason


def test_a_forced_migration_under_contention_is_forced_at_max_rounds() -> None:
    """--on-nonconvergence force: contention delays the switchover, but --max-rounds still bounds
    it (on a host that stays busy a forced migration waited for quiet until --max-time)."""
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=6, on_nonconvergence="force", throttle="off")
    for r in range(6):
        d = _floor_round(pol, r, 0.08, _BUSY)
        assert d.action is Action.CONTINUE and d.wait_s > 0, d.reason
    d = _floor_round(pol, 6, 0.08, _BUSY)
    assert d.action is Action.FORCE and "did not converge after 6 rounds" in d.reason
    over = SwitchoverPolicy(downtime_s=0.05, max_rounds=3, on_nonconvergence="force", throttle="off")
    for r in range(3):  # not floor-bound, just over budget: every round counts as well
        assert over.decide(rounds_done=r, elapsed_s=0, expected_s=0.5, floor_s=0.01,
                           contention=_BUSY).action is Action.CONTINUE
    assert over.decide(rounds_done=3, elapsed_s=0, expected_s=0.5, floor_s=0.01,
                       contention=_BUSY).action is Action.FORCE


def test_contention_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="contention"):
        SwitchoverPolicy(contended_cpu_wait=0)
    with pytest.raises(ValueError, match="contention"):
        SwitchoverPolicy(contention_wait_s=3.0, contention_wait_max_s=2.0)

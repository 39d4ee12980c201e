"""Tests of the pure switchover policy (``precopy.policy``)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precopy.policy import (
    Action,
    Decision,
    DirtyRateEstimator,
    LinkEstimator,
    SwitchoverPolicy,
    expected_downtime,
)
from precopy.wire import PAGE_SIZE

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


def test_switchover_exactly_at_budget() -> None:
    assert SwitchoverPolicy(downtime_s=0.3).decide(rounds_done=3, elapsed_s=0, expected_s=0.3).action \
        is Action.SWITCHOVER


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
    if expected <= budget:
        assert d.action is Action.SWITCHOVER
    elif not exhausted:
        assert d.action is Action.CONTINUE
    else:
        assert d.action is (Action.FORCE if mode == "force" else Action.ABORT)
    assert d.expected_downtime_s == expected

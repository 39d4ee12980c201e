"""Tests of the predictive throttle (``precopy.policy.converge``) and the policy's predict ramp.

Pure: no sockets, no clock.  The numbers are those of a quiet run's round log
(1 GiB, 200,000 pages/s uniform, uffd-wp; benchmarks/RESULTS.md, "Issue 21: where every
target stands").
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from precopy.policy.converge import RoundFit, needed_throttle, predicted_throttle, project
from precopy.policy.switchover import Action, SwitchoverPolicy

NPAGES = 262_144  # 1 GiB
#: A round on the plateau of a 200,000 pages/s run: 28,000 pages sent (~270,000 a second, a 40 ms
#: tracked scan of them) in a 0.15 s interval while as many were dirtied.
HIGH = RoundFit(pages_sent=28_000, interval_s=0.15, scan_s=0.04, scan_per_page=True, send_pps=270_000,
                dirtied=28_000, npages=NPAGES, throttle_pct=0)
#: A 2,000 pages/s guest's round: 3,000 pages in 0.1 s, 200 dirtied.
LOW = RoundFit(pages_sent=3_000, interval_s=0.1, scan_s=0.005, scan_per_page=True, send_pps=300_000,
               dirtied=200, npages=NPAGES, throttle_pct=0)


def test_the_fit_splits_a_round_into_its_pages_and_the_rest() -> None:
    assert HIGH.usable()
    assert HIGH.per_page_s == pytest.approx(1 / 270_000 + 0.04 / 28_000)
    assert HIGH.overhead_s == pytest.approx(0.15 - 28_000 * HIGH.per_page_s)
    # A digest scan hashes the whole region whatever is dirty: its time is overhead, not per page.
    digests = replace(HIGH, scan_per_page=False)
    assert digests.per_page_s == pytest.approx(1 / 270_000)
    assert digests.overhead_s > HIGH.overhead_s
    # A round faster than its pages' sending leaves no negative overhead.
    assert replace(HIGH, interval_s=0.01).overhead_s == 0.0


def test_the_write_rate_counts_the_writes_behind_the_distinct_pages_and_the_throttle() -> None:
    # Few pages of many: about one write each.
    assert LOW.write_pps == pytest.approx(2_000, rel=0.01)
    # A fifth of the region: more writes than pages (some hit a page twice).
    assert HIGH.write_pps > 28_000 / 0.15
    # Measured while throttled to 50 %: the workload ran half the time, so twice that unthrottled.
    assert replace(HIGH, throttle_pct=50).write_pps == pytest.approx(2 * HIGH.write_pps)
    # The whole region dirtied: a lower bound, finite.
    assert math.isfinite(replace(HIGH, dirtied=NPAGES).write_pps)


def test_the_full_copy_counts_as_a_round_for_a_tracker() -> None:
    """Armed before the full copy, a tracker counts every page written since: the copy's time
    says the write rate; the scan of those pages its cost per page; the rest is not known."""
    fit = RoundFit.after_full_copy(copy_s=1.1, scan_s=0.14, send_pps=270_000, dirtied=96_320, npages=NPAGES)
    assert fit.usable() and fit.overhead_s == 0.0 and fit.throttle_pct == 0
    assert fit.per_page_s == pytest.approx(1 / 270_000 + 0.14 / 96_320)
    assert fit.write_pps == pytest.approx(-NPAGES * math.log1p(-96_320 / NPAGES) / 1.1)
    # A copy that saw nothing written: nothing to project, no throttle.
    quiet = RoundFit.after_full_copy(copy_s=1.0, scan_s=0.001, send_pps=270_000, dirtied=0, npages=NPAGES)
    assert quiet.usable() and project(quiet, 0, 0, 3) == 0.0


@pytest.mark.parametrize("bad", [dict(pages_sent=0), dict(interval_s=0.0), dict(interval_s=math.nan),
                                 dict(send_pps=0.0), dict(send_pps=math.inf), dict(scan_s=-1.0),
                                 dict(npages=0), dict(throttle_pct=100), dict(dirtied=-1)])
def test_a_fit_from_bogus_measurements_is_not_usable(bad: dict[str, object]) -> None:
    assert not replace(HIGH, **bad).usable()  # type: ignore[arg-type]


def test_the_projection_of_the_plateau_and_of_a_converging_guest() -> None:
    # 200,000 pages/s unthrottled: the dirty set stays far above the ~6,600 pages a 50 ms pause sends.
    assert project(HIGH, 28_000, 0, 10) > 25_000
    # Throttled hard, it falls.
    assert project(HIGH, 28_000, 80, 3) < 2_000
    # 2,000 pages/s falls to a few hundred pages in a round.
    assert project(LOW, 3_000, 0, 1) < 500
    # Nothing written: nothing left after a round.
    assert project(replace(LOW, dirtied=0), 3_000, 0, 1) == 0.0


@given(st.integers(0, 98), st.integers(1, 5), st.integers(1_000, NPAGES))
def test_the_projection_falls_as_the_throttle_rises_and_never_passes_the_region(pct: int, rounds: int,
                                                                               pages: int) -> None:
    assert project(HIGH, pages, pct + 1, rounds) <= project(HIGH, pages, pct, rounds)
    assert 0 <= project(HIGH, pages, pct, rounds) <= NPAGES


@pytest.mark.parametrize("rounds", [1, 2, 3, 5])
def test_the_needed_throttle_is_the_lowest_that_reaches_the_target(rounds: int) -> None:
    need = needed_throttle(HIGH, 28_000, 6_600, rounds, 1, 99)
    assert need is not None and 1 < need <= 99
    assert project(HIGH, 28_000, need, rounds) <= 6_600 < project(HIGH, 28_000, need - 1, rounds)
    # Fewer rounds to get there need more throttle.
    if rounds > 1:
        assert need <= needed_throttle(HIGH, 28_000, 6_600, rounds - 1, 1, 99)  # type: ignore[operator]


def test_no_throttle_under_the_cap_reaches_an_unreachable_target() -> None:
    assert needed_throttle(HIGH, 28_000, 6_600, 1, 1, 30) is None
    assert needed_throttle(HIGH, 28_000, 0, 3, 1, 99) is None


def _predict(fit: RoundFit, *, pages: int = 28_000, expected_s: float = 0.092, floor_s: float = 0.01,
             target_s: float = 0.032, current_pct: int = 0, max_pct: int = 99) -> tuple[int, str]:
    return predicted_throttle(fit, pages=pages, expected_s=expected_s, floor_s=floor_s, target_s=target_s,
                              current_pct=current_pct, max_pct=max_pct, soon=5, rounds=3)


def test_a_plateau_is_throttled_at_once_to_what_reaches_the_budget_in_three_rounds() -> None:
    pct, note = _predict(HIGH)
    target_pages = 28_000 * (0.032 - 0.01) / (0.092 - 0.01)
    assert pct == needed_throttle(HIGH, 28_000, target_pages, 3, 1, 99)
    assert 30 <= pct <= 95, pct
    assert f"throttling the workload to {pct} %" in note and "in 3 rounds" in note
    assert f"~{target_pages:.0f} fit the budget" in note


def test_a_guest_that_converges_on_its_own_is_never_throttled() -> None:
    assert _predict(LOW, pages=3_000, expected_s=0.06) == (0, "")


def test_the_predicted_throttle_never_steps_down() -> None:
    need, _ = _predict(HIGH)
    assert _predict(HIGH, current_pct=need + 5) == (need + 5, "")


def test_a_throttle_the_workload_made_up_for_asks_for_more() -> None:
    """The rate measured at a throttle is taken as the rate it let through: a workload that
    rested less than asked (or made up for its rests) shows a higher rate unthrottled, and
    the next round's throttle is higher."""
    first, _ = _predict(HIGH)
    # It wrote as much as unthrottled although throttled to ``first``.
    second, note = _predict(replace(HIGH, throttle_pct=first), current_pct=first)
    assert second > first and "throttling" in note


def test_over_the_cap_the_throttle_goes_to_the_cap_and_says_so() -> None:
    pct, note = _predict(replace(HIGH, dirtied=NPAGES - 1), max_pct=60)
    assert pct == 60 and "at most 60 %" in note


@pytest.mark.parametrize("floor_s", [0.032, 0.05])
def test_no_throttle_when_the_floor_alone_is_over_the_target(floor_s: float) -> None:
    assert _predict(HIGH, floor_s=floor_s) == (0, "")


# --------------------------------------------------------------------------
# SwitchoverPolicy's predict ramp (and the step ramp still reachable)


def _decide(pol: SwitchoverPolicy, rounds: int, fit: RoundFit | None, expected: float = 0.092,
            pages: int = 28_000, dirtied: int = 28_000, sent: int = 28_000) -> int:
    d = pol.decide(rounds_done=rounds, elapsed_s=1.0, expected_s=expected, floor_s=0.01, scan_s=0.005,
                   dirtied_pages=dirtied, sent_pages=sent, remaining_pages=pages, fit=fit)
    assert d.action is Action.CONTINUE, d.reason
    assert d.throttle_pct == pol.throttle_pct
    return d.throttle_pct


def test_predict_throttles_after_one_round_that_will_not_converge() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30)
    assert pol.throttle_ramp == "predict"
    # The first round after the full copy brings no rates: the step rule counts it (one of two).
    assert _decide(pol, 0, None, pages=28_000, sent=NPAGES, dirtied=200_000) == 0
    pct = _decide(pol, 1, HIGH)
    assert pct > pol.throttle_initial_pct  # not QEMU's 20 % first
    # Rounds that converge at that throttle keep it; it never steps down.
    assert _decide(pol, 2, replace(HIGH, throttle_pct=pct, dirtied=10_000), pages=10_000,
                   expected=0.04, dirtied=10_000, sent=28_000) == pct


def test_predict_leaves_a_converging_guest_alone() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30)
    for r in range(1, 6):
        assert _decide(pol, r, LOW, pages=3_000, expected=0.06, dirtied=3_000, sent=3_000) == 0


def test_the_step_ramp_ignores_the_rates() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, throttle_ramp="step")
    seen = [_decide(pol, r, HIGH, dirtied=28_000, sent=28_000) for r in range(1, 7)]
    assert seen == [0, 20, 20, 30, 30, 40]


def test_throttle_off_ignores_the_rates_too() -> None:
    pol = SwitchoverPolicy(downtime_s=0.05, max_rounds=30, throttle="off")
    assert all(_decide(pol, r, HIGH) == 0 for r in range(1, 5))


@pytest.mark.parametrize("kwargs", [dict(throttle_ramp="fast"), dict(predict_rounds=0)])
def test_invalid_ramp_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="ramp"):
        SwitchoverPolicy(**kwargs)  # type: ignore[arg-type]

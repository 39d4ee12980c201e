"""precopy.policy.postcopy: when post-copy takes the place of a pre-copy decision (pure)."""

from __future__ import annotations

import pytest

from precopy.policy.postcopy import apply_postcopy, check_postcopy, postcopy_wanted
from precopy.policy.switchover import Action, Decision, SwitchoverPolicy


def d(action: Action, throttle: int = 0) -> Decision:
    return Decision(action, 0.5, "why", throttle)


@pytest.mark.parametrize(("mode", "nonconv", "decision", "before", "want"), [
    ("off", "abort", d(Action.ABORT), 0, Action.ABORT),
    ("off", "postcopy", d(Action.ABORT), 0, Action.POSTCOPY),
    ("off", "postcopy", d(Action.CONTINUE, 20), 0, Action.CONTINUE),  # auto-converge still runs
    ("auto", "abort", d(Action.CONTINUE, 20), 0, Action.POSTCOPY),  # never throttled
    ("auto", "abort", d(Action.CONTINUE, 20), 20, Action.CONTINUE),  # (a throttle it did not raise)
    ("auto", "abort", d(Action.CONTINUE), 0, Action.CONTINUE),
    ("auto", "force", d(Action.FORCE), 0, Action.POSTCOPY),
    ("auto", "abort", d(Action.SWITCHOVER), 0, Action.SWITCHOVER),  # pre-copy converged: no need
    ("now", "abort", d(Action.SWITCHOVER), 0, Action.POSTCOPY),
    ("now", "abort", d(Action.CONTINUE), 0, Action.POSTCOPY),
])
def test_apply_postcopy(mode: str, nonconv: str, decision: Decision, before: int, want: Action) -> None:
    got = apply_postcopy(decision, mode=mode, on_nonconvergence=nonconv, throttle_before=before)
    assert got.action is want
    if want is Action.POSTCOPY:
        assert got.throttle_pct == 0 and "post-copy" in got.reason and got.reason.startswith("why")
    else:
        assert got is decision


@pytest.mark.parametrize(("mode", "nonconv", "converging", "want"), [
    ("auto", "abort", False, Action.POSTCOPY),  # a round that dirtied more than half of what was sent
    ("auto", "abort", True, Action.CONTINUE),
    ("auto", "abort", None, Action.CONTINUE),  # not known (nothing sent before)
    ("off", "postcopy", False, Action.CONTINUE),  # --on-nonconvergence postcopy only replaces the abort
    ("off", "abort", False, Action.CONTINUE),
])
def test_auto_stops_pre_copy_at_the_first_round_that_does_not_converge(mode: str, nonconv: str,
                                                                        converging: bool | None, want: Action) -> None:
    got = apply_postcopy(d(Action.CONTINUE), mode=mode, on_nonconvergence=nonconv, throttle_before=0,
                         converging=converging)
    assert got.action is want
    if want is Action.POSTCOPY:
        assert "not converging" in got.reason


def test_settings() -> None:
    check_postcopy("auto", "abort")
    with pytest.raises(ValueError, match="one of off, auto, now"):
        check_postcopy("sometimes", "abort")
    with pytest.raises(ValueError, match="needs mode precopy"):
        check_postcopy("off", "postcopy", "stop-and-copy")
    assert postcopy_wanted("off", "postcopy") and postcopy_wanted("now", "abort")
    assert not postcopy_wanted("off", "force")


def test_the_policy_decides_postcopy_as_abort() -> None:
    """--on-nonconvergence postcopy: out of rounds, the policy says ABORT and the rule makes it POSTCOPY."""
    pol = SwitchoverPolicy(downtime_s=0.1, max_rounds=1, on_nonconvergence="postcopy", throttle="off")
    got = pol.decide(rounds_done=1, elapsed_s=1.0, expected_s=1.0)
    assert got.action is Action.ABORT
    assert apply_postcopy(got, mode="off", on_nonconvergence="postcopy", throttle_before=0).action is Action.POSTCOPY

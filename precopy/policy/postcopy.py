"""When to switch over to post-copy instead of pausing for pre-copy's last pages: a pure rule.

``--postcopy`` (``SourceOptions.postcopy``):

* ``off`` (the default): never.  Post-copy gives up the rollback: from its
  switchover the workload runs on the destination while pages are still
  on the source, so a lost source loses the workload.  An operator opts in.
* ``auto``: pre-copy as usual while it converges; post-copy from the first
  round that does not (over the budget, and it dirtied more than it could
  hope to catch up with: more than half of what the round before sent --
  auto-converge's trigger, taken at once instead of twice in a row), or
  where pre-copy would otherwise *give in* -- throttle the workload, abort,
  or force a long pause.  The workload is never throttled.
* ``now``: post-copy right after the full copy and the first scan.
* ``immediate``: post-copy before anything is copied: right after READY
  the workload is paused and resumed on the destination with every page
  it lacks missing (every page the source's file holds; its holes read as
  zeros on a new destination region), and the post-copy push *is* the
  copy -- each page sent once.  No rounds, no tracking, no final scan: the
  rule below is never asked (see :mod:`precopy.session.postcopy_immediate`).

``--on-nonconvergence postcopy`` is narrower than ``auto``: pre-copy runs as
with ``abort`` (auto-converge included), and post-copy takes the place of
the abort.  Either way the destination must offer it (HELLO's ``caps``).
"""

from __future__ import annotations

import dataclasses
from typing import Final

from precopy.policy.switchover import Action, Decision

__all__ = ["POSTCOPY_MODES", "check_postcopy", "postcopy_wanted", "apply_postcopy"]

POSTCOPY_MODES: Final = ("off", "auto", "now", "immediate")


def check_postcopy(mode: str, on_nonconvergence: str, precopy_mode: str = "precopy") -> None:
    """Raise ValueError, saying what is wrong, unless these settings go together."""
    if mode not in POSTCOPY_MODES:
        raise ValueError(f"postcopy must be one of {', '.join(POSTCOPY_MODES)}, not {mode!r}")
    if (mode != "off" or on_nonconvergence == "postcopy") and precopy_mode != "precopy":
        raise ValueError("post-copy needs mode precopy (stop-and-copy pauses before anything is copied)")


def postcopy_wanted(mode: str, on_nonconvergence: str) -> bool:
    """Whether these settings may end in post-copy (the source then offers it in HELLO)."""
    return mode != "off" or on_nonconvergence == "postcopy"


def apply_postcopy(decision: Decision, *, mode: str, on_nonconvergence: str, throttle_before: int,
                   converging: bool | None = None) -> Decision:
    """The policy's ``decision`` after one round, with post-copy taking the place it may take.

    ``throttle_before``: the throttle (percent) before this decision; a
    CONTINUE that raises it is auto-converge stepping in, which ``auto``
    replaces.  ``converging``: whether the round dirtied at most half of
    what the previous one sent (None: not known); a CONTINUE on a round
    that did not is where ``auto`` stops pre-copy.  Returns ``decision``
    itself when post-copy does not apply.
    """
    act = decision.action
    if mode in ("now", "immediate"):  # (immediate never runs rounds: for completeness)
        why = f"--postcopy {mode}"
    elif act in (Action.ABORT, Action.FORCE) and (mode == "auto" or on_nonconvergence == "postcopy"):
        why = "pre-copy will not converge"
    elif mode == "auto" and act is Action.CONTINUE and decision.throttle_pct > throttle_before:
        why = "pre-copy would throttle the workload to converge"
    elif mode == "auto" and act is Action.CONTINUE and converging is False:
        why = "the round dirtied more than half of what the last one sent: pre-copy is not converging"
    else:
        return decision
    return dataclasses.replace(decision, action=Action.POSTCOPY, throttle_pct=0,
                               reason=f"{decision.reason}; {why}: switching over to post-copy")


"""When to stop iterating: estimates and the switchover rule, as plain code.

Nothing here does I/O or reads a clock; the session feeds it measurements
and asks :meth:`SwitchoverPolicy.decide` what to do next.

Expected downtime (DESIGN "Switchover")::

    remaining bytes (after compression) / bandwidth while paused
      + device state / bandwidth while paused
      + cost of the final scan (measured: the last live chunk scan)
      + fixed overhead (pause, round trips, commit, resume; measured RTT-based)

Switch over when that is within the budget less a margin for the
estimate's error -- the session's, sized from the measured spread of the
pause's parts (``margin_s``, precopy.policy.downtime.switchover_margin), or a fixed
share (``SwitchoverPolicy.headroom``, 75 % of the budget) -- as QEMU does
with the whole budget (remaining < bandwidth x downtime-limit).

When the dirty set will not shrink, :meth:`SwitchoverPolicy.decide` also
says how hard to throttle the workload (auto-converge, QEMU's semantics):
a round is *not converging* when the pages dirtied during it exceed half
the pages sent in it and the expected downtime's trend does not reach the
budget within a couple of rounds; two such rounds in a row throttle the
workload to 20 %, and every further two add 10 %, up to 99 %.  That is
the ``step`` ramp; the default, ``predict`` (precopy.policy.converge),
projects the next rounds from the last one's send and dirty rates and, once
one says the dirty set will not fall to the budget within a couple of
rounds, jumps to the lowest throttle that makes it within three.  The
throttle never steps down before the switchover, and a migration that
would converge without it is never throttled.

The *downtime floor* is the expected downtime with nothing left to send
(final scan, verification, device state, fixed overhead).  When it alone
is over the budget (less its headroom) in two rounds in a row, more rounds (or throttling)
cannot reach the budget: abort at once, or, with ``force``, switch over as
soon as the dirty set stops shrinking.

A floor measured while the host is *contended* (:class:`Contention`: other
migrations moving bytes on either side, the sender waiting for a CPU most
of the round, CPU steal) is not a floor: eight migrations sharing two cores
measured one at ~350 ms that is ~20 ms alone.  Such rounds count no strike;
the decision is CONTINUE with a pause (``Decision.wait_s``, backing off)
before the next round, and only a floor over the budget in rounds without
contention (or one whose contention-proof part, ``floor_min_s``, is over it
already) gives up -- or ``max_time_s``.  Contended rounds do not count
toward ``max_rounds`` either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from precopy.policy.converge import RoundFit, predicted_throttle
from precopy.policy.rates import MAX_PAUSED_SPEEDUP, DirtyRateEstimator, LinkEstimator, expected_downtime

__all__ = [
    "MAX_PAUSED_SPEEDUP",
    "Action",
    "Contention",
    "Decision",
    "LinkEstimator",
    "DirtyRateEstimator",
    "SwitchoverPolicy",
    "THROTTLE_MODES",
    "THROTTLE_RAMPS",
    "check_throttle",
    "expected_downtime",
]

THROTTLE_MODES = ("auto", "off")
#: How auto-converge raises the throttle: from a projection of the rounds (precopy.policy.converge),
#: or QEMU's steps (+step % every ``throttle_checks`` non-converging rounds).
THROTTLE_RAMPS = ("predict", "step")


class Action(Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    FORCE = "force"  # switch over although the budget will be exceeded
    ABORT = "abort"  # give up: roll back, the workload keeps running on the source
    #: Switch over to post-copy: run the workload on the destination at once and
    #: fetch the pages it lacks on demand (precopy.policy.postcopy decides it).
    POSTCOPY = "postcopy"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    expected_downtime_s: float
    reason: str
    #: How hard the workload should be throttled from now on, in percent of
    #: its time stopped (0: not at all).  Meaningful with CONTINUE; the
    #: session ends any throttle before it switches over or rolls back.
    throttle_pct: int = 0
    #: Seconds to wait before the next round (CONTINUE while the host is
    #: contended: let the contention pass instead of adding to it).
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Contention:
    """What competed with the migration over the last round (measured by the session).

    ``source_peers``: other migrations moving bytes out of this process;
    ``dest_peers``: other migrations the destination said it is receiving;
    ``cpu_wait_share``: of the round's wall time, the session's thread was
    runnable but waiting for a CPU, or of the time the process's threads
    were runnable, the share they waited (the larger; schedstat);
    ``steal_share``: of the host's CPU time over the round, the share the
    hypervisor stole (/proc/stat).
    """

    source_peers: int = 0
    dest_peers: int = 0
    cpu_wait_share: float = 0.0
    steal_share: float = 0.0

    def reasons(self, cpu_wait_limit: float, steal_limit: float) -> list[str]:
        """What makes the round contended at these limits (empty: not contended)."""
        out = []
        if self.source_peers > 0:
            out.append(f"{self.source_peers} other migration(s) sending from this host")
        if self.dest_peers > 0:
            out.append(f"{self.dest_peers} other migration(s) into the destination")
        if self.cpu_wait_share >= cpu_wait_limit:
            out.append(f"the sender waited for a CPU {self.cpu_wait_share:.0%} of the time")
        if self.steal_share >= steal_limit:
            out.append(f"CPU steal {self.steal_share:.0%}")
        return out


def check_throttle(mode: str, initial_pct: int, step_pct: int, max_pct: int) -> None:
    """Raise ValueError, saying what is wrong, unless these are valid throttle settings."""
    if mode not in THROTTLE_MODES:
        raise ValueError(f"throttle must be auto or off, not {mode!r}")
    if not 1 <= initial_pct <= max_pct <= 99:
        raise ValueError("throttle percentages must satisfy 1 <= initial <= max <= 99 "
                         f"(got initial {initial_pct}, max {max_pct})")
    if not 0 <= step_pct <= 99:
        raise ValueError(f"throttle step must be 0..99, not {step_pct}")


@dataclass(slots=True)
class _Round:
    """One call of :meth:`SwitchoverPolicy.decide`: its measurements, then (filled in by
    ``_observe``) the targets and what the rules compare."""

    rounds_done: int
    elapsed_s: float
    expected_s: float
    floor_s: float | None
    scan_s: float | None
    dirtied_pages: int | None
    sent_pages: int | None
    remaining_pages: int | None
    at_floor_scan_s: float | None
    floor_min_s: float | None
    margin_s: float | None
    fit: RoundFit | None = None  # the last live round's rates (the predict ramp)
    target: float = 0.0  # switch over at or under this expected downtime
    floor_target: float = 0.0  # the floor is over the budget above this
    busy: list[str] = field(default_factory=list)  # why the round was contended
    floor_over: bool = False
    sure: bool = False  # the floor's contention-proof part alone is over
    excess: float = 0.0  # the expected downtime above the floor
    prev_excess: float | None = None
    prev_min: int | None = None  # the smallest dirty set before this round
    forcing: bool = False
    over_rounds: bool = False
    over_time: bool = False


@dataclass
class SwitchoverPolicy:
    """The stop rule, and what to do when the dirty set will not shrink.

    ``on_nonconvergence`` is ``"abort"`` (roll back) or ``"force"`` (switch
    over anyway; the report shows the overshoot).  ``max_rounds`` counts
    rounds after the first full copy; ``max_time_s`` bounds the time spent
    iterating (None: unbounded).

    ``throttle`` is ``"auto"`` (auto-converge, see the module docstring:
    start at ``throttle_initial_pct``, add ``throttle_step_pct`` per further
    trigger, at most ``throttle_max_pct``) or ``"off"``.  A trigger is
    ``throttle_checks`` non-converging rounds in a row, a round being
    non-converging when it dirtied more than ``throttle_threshold`` times the
    pages it sent and the trend of the expected downtime does not reach the
    budget within ``converge_rounds`` rounds (and the rounds left).  That is
    ``throttle_ramp="step"``; with ``"predict"`` (the default), a round that
    brings its rates (``fit``) is judged by their projection instead, and
    the throttle jumps to what reaches the budget within ``predict_rounds``
    rounds (precopy.policy.converge); ``throttle_initial_pct`` and
    ``throttle_step_pct`` then serve the rounds without rates (with
    digests, the first after the full copy) and a floor-bound forced
    migration's throttle toward its floor.  ``tracked``: dirty pages come
    from kernel write tracking (only changes the advice when floor-bound).

    A round is contended (see :class:`Contention`) when another migration
    moves bytes on either side, the sender waited for a CPU at least
    ``contended_cpu_wait`` of it, or steal was at least ``contended_steal``;
    a floor over the budget then waits ``contention_wait_s`` (doubling each
    contended round in a row, at most ``contention_wait_max_s``) instead of
    counting toward an abort.

    The policy keeps state between calls (history, the throttle, counters):
    one instance per migration.
    """

    downtime_s: float = 0.3
    max_rounds: int = 30
    max_time_s: float | None = 600.0
    on_nonconvergence: str = "abort"
    throttle: str = "auto"
    throttle_initial_pct: int = 20
    throttle_step_pct: int = 10
    throttle_max_pct: int = 99
    throttle_threshold: float = 0.5
    throttle_checks: int = 2
    throttle_ramp: str = "predict"
    predict_rounds: int = 3
    converge_rounds: float = 5.0
    floor_rounds: int = 2
    tracked: bool = False
    #: Switch over once the expected downtime is within this share of the
    #: budget: the estimate errs by 10-15 % either way here (pauses of
    #: 0.87-1.14 times the estimate at 200,000 pages/s), and now and then a
    #: pause sends no faster than the live rounds did (one in ten: 1.3
    #: against 1.9-2.2 GB/s, 54.7 ms for 39.4 expected) -- a pause over the
    #: budget is the failure users see.  At 0.85 and 0.9, two runs of
    #: sixteen paused 50.8-54.7 ms on a 50 ms budget; at 0.75 none of
    #: three, 37-38 ms (RESULTS.md, 2026-12-04).
    headroom: float = 0.75
    #: Contention (see the class docstring): a CPU-wait share of the round
    #: this high -- alone on 2 cores, the sender of a sweeping guest waited
    #: well under it -- or this much steal.
    contended_cpu_wait: float = 0.4
    contended_steal: float = 0.1
    contention_wait_s: float = 0.25
    contention_wait_max_s: float = 2.0
    history: list[float] = field(default_factory=list)
    #: The throttle the last decision asked for (percent).
    throttle_pct: int = field(default=0, init=False)
    _high: int = field(default=0, init=False, repr=False)  # non-converging rounds in a row
    _floor_strikes: int = field(default=0, init=False, repr=False)
    _prev_excess: float | None = field(default=None, init=False, repr=False)
    _min_remaining: int | None = field(default=None, init=False, repr=False)
    _contended_rounds: int = field(default=0, init=False, repr=False)  # in all: not counted as rounds
    _contended_run: int = field(default=0, init=False, repr=False)  # contended floor waits in a row

    def __post_init__(self) -> None:
        # "postcopy" decides as "abort" here; precopy.policy.postcopy turns the ABORT into POSTCOPY.
        if self.on_nonconvergence not in ("abort", "force", "postcopy"):
            raise ValueError(f"on_nonconvergence must be 'abort', 'force' or 'postcopy', "
                             f"not {self.on_nonconvergence!r}")
        if self.downtime_s <= 0:
            raise ValueError("downtime budget must be positive")
        if self.max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")
        check_throttle(self.throttle, self.throttle_initial_pct, self.throttle_step_pct, self.throttle_max_pct)
        if self.throttle_ramp not in THROTTLE_RAMPS or self.predict_rounds < 1:
            raise ValueError(f"throttle ramp must be predict or step (not {self.throttle_ramp!r}) "
                             f"and predict_rounds >= 1 (not {self.predict_rounds})")
        if self.throttle_checks < 1 or self.floor_rounds < 1:
            raise ValueError("throttle_checks and floor_rounds must be >= 1")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], not {self.headroom}")
        if not (0 < self.contended_cpu_wait and 0 < self.contended_steal
                and 0 <= self.contention_wait_s <= self.contention_wait_max_s):
            raise ValueError("contention limits must be positive and the waits 0 <= first <= max")

    def disable_throttle(self) -> None:
        """The workload cannot be throttled: decide as with ``throttle="off"``."""
        self.throttle = "off"
        self.throttle_pct = 0
        self._high = 0

    def decide(self, *, rounds_done: int, elapsed_s: float, expected_s: float,
               floor_s: float | None = None, scan_s: float | None = None,
               dirtied_pages: int | None = None, sent_pages: int | None = None,
               remaining_pages: int | None = None, at_floor_scan_s: float | None = None,
               contention: Contention | None = None, floor_min_s: float | None = None,
               margin_s: float | None = None, fit: RoundFit | None = None) -> Decision:
        """Decide after a scan.

        ``rounds_done``: iterative rounds completed after the full copy;
        ``expected_s``: expected downtime if we paused now.  Optional, for
        the floor rule and throttling: ``floor_s``, the expected downtime
        with nothing left to send, and ``scan_s``, its final-scan part;
        ``dirtied_pages``, pages dirtied since the previous scan, and
        ``sent_pages``, pages sent meanwhile (by the previous round, or the
        full copy); ``remaining_pages``, what a switchover now would send;
        ``at_floor_scan_s``, ``expected_s`` with the final scan at the floor's
        cost (what the pages add to the floor, without the live scans'
        noise: a floor-bound migration is throttled only for that).
        Without them, neither rule applies.  ``contention``: what competed
        with the round (None: nothing known, not contended); ``floor_min_s``:
        the part of the floor no contention inflates (fixed costs) -- over
        the budget, the floor holds whatever the contention.  ``margin_s``:
        how far under the budget the expected downtime must fall to switch
        over (from the spread of the pause's parts,
        precopy.policy.downtime.switchover_margin); without it, to ``headroom`` of
        the budget (the floor rule always uses ``headroom``).  ``fit``: the
        last live round's rates, for the predict ramp.  Returns the
        decision; raises nothing.

        The rules, in order: within the target, switch over; a floor over
        the budget measured under contention, wait and measure again; a
        floor over the budget rounds in a row, abort or force; out of
        rounds or time, abort or force; else one more round (throttled if
        it does not converge).
        """
        r = self._observe(_Round(
            rounds_done=rounds_done, elapsed_s=elapsed_s, expected_s=expected_s, floor_s=floor_s,
            scan_s=scan_s, dirtied_pages=dirtied_pages, sent_pages=sent_pages,
            remaining_pages=remaining_pages, at_floor_scan_s=at_floor_scan_s,
            floor_min_s=floor_min_s, margin_s=margin_s, fit=fit), contention)
        if expected_s <= r.target:
            return Decision(Action.SWITCHOVER, expected_s,
                            f"expected downtime {expected_s * 1e3:.1f} ms within the "
                            f"{self.downtime_s * 1e3:.0f} ms budget", self.throttle_pct)
        waiting = self._wait_out_contention(r)
        if waiting is not None:
            return waiting
        self._contended_run = 0
        if floor_s is not None and self._floor_strikes >= self.floor_rounds:
            return self._floor_bound(r, floor_s)
        if r.over_rounds or r.over_time:
            return self._out_of_bounds(r)
        return self._one_more_round(r)

    def _observe(self, r: _Round, contention: Contention | None) -> _Round:
        """Record one round's measurements (history, contention, floor strikes, the smallest
        dirty set) and fill in what the rules compare them with."""
        budget = self.downtime_s
        # What the expected downtime must fall to.  The floor is held against
        # the fixed share: the margin was sized for this round's pause, whose
        # pages (and their spread) a pause at the floor would not have.
        r.floor_target = budget * self.headroom
        r.target = budget - r.margin_s if r.margin_s is not None else r.floor_target
        self.history.append(r.expected_s)
        r.busy = (contention.reasons(self.contended_cpu_wait, self.contended_steal)
                  if contention is not None else [])
        if r.busy:
            self._contended_rounds += 1
        r.floor_over = r.floor_s is not None and r.floor_s > r.floor_target
        # A floor measured under contention is no floor: no strike (below).
        r.sure = r.floor_min_s is not None and r.floor_min_s > r.floor_target
        self._floor_strikes = self._floor_strikes + 1 if r.floor_over and (r.sure or not r.busy) else 0
        # What more rounds can shrink: the expected downtime above the floor.
        r.excess = r.expected_s - (r.floor_s or 0.0)
        r.prev_excess, self._prev_excess = self._prev_excess, r.excess
        r.prev_min = self._min_remaining
        if r.remaining_pages is not None:
            self._min_remaining = (r.remaining_pages if r.prev_min is None
                                   else min(r.prev_min, r.remaining_pages))
        # Giving up (abort) waits out contention: its rounds do not use up
        # --max-rounds.  Forcing is not giving up: every round counts, so
        # --max-rounds bounds a forced migration on a busy host too (else it
        # waited for quiet until --max-time, 600 s by default).
        r.forcing = self.on_nonconvergence == "force"
        r.over_rounds = r.rounds_done - (0 if r.forcing else self._contended_rounds) >= self.max_rounds
        r.over_time = self.max_time_s is not None and r.elapsed_s >= self.max_time_s
        return r

    def _wait_out_contention(self, r: _Round) -> Decision | None:
        """CONTINUE after a pause when the floor is over the budget only as measured under
        contention (and rounds and time are left); None when this rule does not apply."""
        if not (r.floor_over and r.busy and not r.sure and not r.over_time
                and not (r.forcing and r.over_rounds)):
            return None
        assert r.floor_s is not None
        self._high = 0  # no throttle helps a floor: not a check "in a row"
        wait = min(self.contention_wait_s * 2 ** self._contended_run, self.contention_wait_max_s)
        self._contended_run += 1
        return Decision(Action.CONTINUE, r.expected_s,
                        f"the downtime floor ~{r.floor_s * 1e3:.1f} ms is over {r.floor_target * 1e3:.1f} ms, "
                        f"but measured under contention ({'; '.join(r.busy)}): waiting {wait:.2f} s for it "
                        f"to pass, then measuring again", self.throttle_pct, wait_s=wait)

    def _floor_bound(self, r: _Round, floor_s: float) -> Decision:
        """The floor was over the budget ``floor_rounds`` in a row: abort, or force -- at once,
        or after rounds (throttled) that bring the pause nearer the floor."""
        expected_s, remaining_pages, prev_min = r.expected_s, r.remaining_pages, r.prev_min
        why = self._floor_reason(floor_s, r.scan_s)
        if self.on_nonconvergence == "abort":
            self.throttle_pct, self._high = 0, 0
            return Decision(Action.ABORT, expected_s, why + "; aborting")
        # Force: the budget is out of reach, so get as close to the floor
        # as rounds and throttling can (throttling cannot lower the floor,
        # but it shrinks what is sent above it: a sweep forced at once
        # paused for ~0.9 s over a ~0.1 s floor), then switch over.
        near = expected_s <= 1.25 * floor_s
        shrinking = (remaining_pages is not None and prev_min is not None
                     and remaining_pages < 0.9 * prev_min)
        if near or r.over_rounds or r.over_time:
            return Decision(Action.FORCE, expected_s, why + "; forcing switchover now", self.throttle_pct)
        note = ""
        # Throttle only for a pause well above the floor because of pages
        # that take long to send -- not the estimate's noise over a few
        # pages, nor live scans slower than the paused one will be (a
        # 2,000 pages/s guest was throttled to 30 % for 85 ms live scans
        # over a 54 ms floor: ~140 pages, 1 ms of it).
        above = expected_s if r.at_floor_scan_s is None else r.at_floor_scan_s
        if (self.throttle == "auto" and r.dirtied_pages is not None and r.sent_pages is not None
                and above > 1.5 * floor_s):
            halving = (remaining_pages is not None and prev_min is not None
                       and remaining_pages <= 0.5 * prev_min)
            before = self.throttle_pct
            note = self._auto_converge(r.dirtied_pages, r.sent_pages, halving)
            if self.throttle_pct > before or (self.throttle_pct < self.throttle_max_pct and not shrinking
                                              and self._high):
                return Decision(Action.CONTINUE, expected_s,
                                why + f"; throttling toward the floor ({remaining_pages} pages left)" + note,
                                self.throttle_pct)
        if shrinking:
            return Decision(Action.CONTINUE, expected_s,
                            why + f"; one more round while the dirty set shrinks "
                                  f"({remaining_pages} pages, smallest before {prev_min})" + note,
                            self.throttle_pct)
        return Decision(Action.FORCE, expected_s, why + "; forcing switchover now" + note, self.throttle_pct)

    def _out_of_bounds(self, r: _Round) -> Decision:
        """Out of rounds or time without converging: abort, or force."""
        bound = (f"{r.rounds_done} rounds" if r.over_rounds else f"{r.elapsed_s:.1f} s")
        if self._contended_rounds:
            # Over time after waiting out contention: say so (a host that stayed busy, not a workload
            # that never converged on its own).
            bound += (f" ({self._contended_rounds} of them contended)" if r.over_rounds else
                      f" ({self._contended_rounds} rounds contended, the last: {'; '.join(r.busy)})"
                      if r.busy else f" ({self._contended_rounds} rounds contended)")
        throttled = f" (throttled at {self.throttle_pct} %)" if self.throttle_pct else ""
        why = (f"did not converge after {bound}{throttled}: expected downtime "
               f"{r.expected_s * 1e3:.1f} ms > budget {self.downtime_s * 1e3:.0f} ms")
        if self.on_nonconvergence == "force":
            return Decision(Action.FORCE, r.expected_s, why + "; forcing switchover", self.throttle_pct)
        return Decision(Action.ABORT, r.expected_s, why + "; aborting", self.throttle_pct)

    def _one_more_round(self, r: _Round) -> Decision:
        """CONTINUE, the throttle stepped up when the round did not converge (auto-converge)."""
        note = ""
        if r.floor_over:
            self._high = 0  # no throttle can help this round: not a check "in a row"
        elif self.throttle == "auto" and r.dirtied_pages is not None and r.sent_pages is not None:
            soon = min(self.converge_rounds, self.max_rounds - r.rounds_done + self._contended_rounds)
            if self.throttle_ramp == "predict" and r.fit is not None and r.fit.usable() and r.remaining_pages:
                self._high = 0
                self.throttle_pct, note = predicted_throttle(
                    r.fit, pages=r.remaining_pages, expected_s=r.expected_s, floor_s=r.floor_s or 0.0,
                    target_s=r.target, current_pct=self.throttle_pct, max_pct=self.throttle_max_pct,
                    soon=soon, rounds=self.predict_rounds)
                return Decision(Action.CONTINUE, r.expected_s,
                                f"expected downtime {r.expected_s * 1e3:.1f} ms over budget" + note,
                                self.throttle_pct)
            note = self._auto_converge(r.dirtied_pages, r.sent_pages,
                                       _rounds_to_reach(r.prev_excess, r.excess,
                                                        r.target - (r.floor_s or 0.0)) <= soon)
        return Decision(Action.CONTINUE, r.expected_s,
                        f"expected downtime {r.expected_s * 1e3:.1f} ms over budget" + note, self.throttle_pct)

    def _auto_converge(self, dirtied: int, sent: int, converging: bool) -> str:
        """Count a non-converging round, step the throttle up on a trigger; a note for the reason."""
        if converging or dirtied <= self.throttle_threshold * sent:
            self._high = 0
            return ""
        self._high += 1
        if self._high < self.throttle_checks:
            return ""
        self._high = 0
        new = (self.throttle_initial_pct if not self.throttle_pct
               else min(self.throttle_pct + self.throttle_step_pct, self.throttle_max_pct))
        why = (f"; not converging ({dirtied} pages dirtied vs {sent} sent, "
               f"{self.throttle_checks} rounds in a row)")
        if new == self.throttle_pct:
            return why + f": throttle stays at its maximum, {new} %"
        self.throttle_pct = new
        return why + f": throttling the workload to {new} %"

    def _floor_reason(self, floor_s: float, scan_s: float | None) -> str:
        budget_ms, floor_ms = self.downtime_s * 1e3, floor_s * 1e3
        scan = (f"; the final scan alone takes ~{scan_s * 1e3:.0f} ms"
                if scan_s is not None and not self.tracked else "")
        advice = f"raise --downtime-ms to at least {math.ceil(floor_ms * 1.25 / self.headroom)}"
        if not self.tracked:
            advice += ", or use a guest that offers kernel write tracking (--tracking uffd-wp)"
        over = (f"the {budget_ms:.0f} ms budget" if floor_ms > budget_ms else
                f"{budget_ms * self.headroom:.1f} ms (the {budget_ms:.0f} ms budget less its "
                f"{100 - 100 * self.headroom:.0f} % headroom)")
        return (f"cannot converge: the downtime floor (a pause with nothing left to send: final "
                f"scan, verification, fixed costs) is ~{floor_ms:.1f} ms, over {over} "
                f"in {self._floor_strikes} rounds in a row{scan}; more rounds cannot help: {advice}")


def _rounds_to_reach(prev: float | None, now: float, target: float) -> float:
    """Rounds until ``now`` falls to ``target`` at the ratio it fell since ``prev`` (inf: never)."""
    if now <= target:
        return 0.0
    if prev is None or target <= 0 or not 0 < now < prev:
        return math.inf
    return math.log(target / now) / math.log(now / prev)

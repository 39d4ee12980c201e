"""The downtime budget as a promise: the switchover's margin and a hard cap, as plain code.

Nothing here does I/O; the clock is passed in.

:func:`switchover_margin`: how far under the budget the expected downtime
must fall before the switchover, from the measured spread of the pause's
own parts rather than one fixed fraction of the budget.  Each part of the
estimate (the final scan, the final pages, ...) is driven by a quantity the
live rounds measured again and again (the scan's cost, the send rate); the
spread of those samples says how far that part of *this* pause may run
over its estimate.  A part with a steady driver gets a small margin, a
noisy one a large one.  What the estimate expects the pause to give back
is kept whole on top: the final pages sent faster than live, the kernel
scan at its CPU time rather than its wall time (the workload's CPU is
freed by the pause; now and then -- or whenever other processes hold the
CPUs -- it is not).

:class:`DowntimeCap` (``--max-downtime-ms``): once the workload is paused,
the session asks :meth:`DowntimeCap.check` before each step that still
stands between it and the commit -- the final scan, every batch of the
final pass, the device state, each verification, the COMMIT itself --
giving what is expected to follow until the commit is confirmed.  When the
time already paused plus that would pass the cap, it raises
:class:`DowntimeCapExceeded` and the session rolls back: the workload
resumes on the source (exit 3).  Once COMMIT is sent the cap can no longer
roll anything back (DESIGN invariant 3, exactly one owner, wins): a
pause that passes the cap after that is only reported
(:meth:`DowntimeCap.passed`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from precopy.errors import AbortCode, PrecopyError

__all__ = ["CAP_STEPS", "DowntimeCap", "DowntimeCapExceeded", "Margin", "Part", "switchover_margin"]

#: One-sided normal quantile: a part runs over estimate + Z x its spread in ~1 % of pauses.
Z_99 = 2.33


@dataclass(frozen=True, slots=True)
class Part:
    """One part of the expected downtime and the live samples of what drives it.

    ``expected_s``: the part's share of the expected downtime; ``estimate``:
    the value of its driver that share was computed with; ``samples``: the
    driver as the live rounds measured it (same unit).  ``inverse``: the
    part takes time as 1 / driver (a rate), else in proportion to it.
    """

    expected_s: float
    estimate: float
    samples: Sequence[float] = ()
    inverse: bool = False


@dataclass(frozen=True, slots=True)
class Margin:
    """What :func:`switchover_margin` decided: switch over once expected <= ``target_s``."""

    margin_s: float
    target_s: float
    #: Per part, how far it may run over its estimate (s), and the terms kept
    #: whole (e.g. "speedup": room for a pause that sends no faster than the
    #: live rounds; "cpu": for one that does not get the CPU back).
    parts_s: dict[str, float]
    #: "spread" (from samples), or "fixed" (too few samples of any part: the
    #: budget's fixed share, as before).
    basis: str


def _overrun(part: Part, *, z: float, min_rel: float, min_samples: int, unknown_rel: float) -> float:
    """How far (s) ``part`` may run over its expected share, at the ~z-sigma point of its samples."""
    if part.expected_s <= 0:
        return 0.0
    xs = [x for x in part.samples if x > 0 and math.isfinite(x)]
    est = part.estimate
    if len(xs) < min_samples or not est > 0 or not math.isfinite(est):
        return part.expected_s * unknown_rel
    if part.inverse:  # time per unit of the driver
        xs, est = [1.0 / x for x in xs], 1.0 / est
    high = statistics.fmean(xs) + z * statistics.stdev(xs)
    return part.expected_s * max(high / est - 1.0, min_rel)


def switchover_margin(parts: Mapping[str, Part], budget_s: float, *, whole: Mapping[str, float] | None = None,
                      z: float = Z_99, min_rel: float = 0.05, min_samples: int = 3,
                      unknown_rel: float = 0.25, fixed_share: float = 0.75,
                      min_share: float = 0.5, max_share: float = 0.95) -> Margin:
    """The margin under ``budget_s`` the expected downtime must keep at the switchover.

    Each part may run over its expected share by the z-sigma point of its
    samples relative to its estimate (at least ``min_rel`` of the share:
    what no sample shows, e.g. the scheduler; ``unknown_rel`` with fewer
    than ``min_samples`` samples).  The parts vary independently: their
    overruns add in quadrature.  ``whole``: terms (s) added as they are --
    what the estimate counts on the pause to give back (the final pages at
    the live rate less at the rate expected paused, ...): a pause that does
    not get it happens too often (one in ten at 200,000 pages/s) to be
    averaged away.  The target stays within ``min_share`` ..
    ``max_share`` of the budget (a huge spread must not stop every
    switchover; a tiny one must not leave no room at all).  With no part
    sampled well enough, the target is ``fixed_share`` of the budget (the
    old fixed headroom).  Raises ValueError for a budget that is not
    positive or shares out of order.
    """
    if not budget_s > 0:
        raise ValueError(f"the budget must be positive, not {budget_s!r}")
    if not 0 < min_share <= fixed_share <= max_share <= 1:
        raise ValueError("shares must satisfy 0 < min <= fixed <= max <= 1")
    over = {name: _overrun(p, z=z, min_rel=min_rel, min_samples=min_samples, unknown_rel=unknown_rel)
            for name, p in parts.items()}
    sampled = any(len(p.samples) >= min_samples and p.expected_s > 0 for p in parts.values())
    kept = {k: v for k, v in (whole or {}).items() if v > 0}
    if set(kept) & set(over):
        raise ValueError(f"a term kept whole has a part's name: {sorted(set(kept) & set(over))}")
    raw = math.sqrt(sum(v * v for v in over.values())) + sum(kept.values())
    over.update(kept)
    if not sampled:
        margin = budget_s * (1 - fixed_share)
        return Margin(margin, budget_s - margin, over, "fixed")
    margin = min(max(raw, budget_s * (1 - max_share)), budget_s * (1 - min_share))
    return Margin(margin, budget_s - margin, over, "spread")

#: The steps checked, in the order a switchover takes them ("commit": just
#: before COMMIT is sent, the last moment a rollback is possible).
CAP_STEPS = ("final_scan", "final_pages", "device_state", "verify", "commit")


class DowntimeCapExceeded(PrecopyError):
    """The pause would pass ``--max-downtime-ms`` before the commit: roll back."""

    code = AbortCode.TIMEOUT

    def __init__(self, step: str, paused_s: float, rest_s: float, cap_s: float) -> None:
        self.step, self.paused_s, self.rest_s, self.cap_s = step, paused_s, rest_s, cap_s
        super().__init__(
            f"downtime cap hit before {step.replace('_', ' ')}: paused {paused_s * 1e3:.1f} ms (measured), "
            f"~{rest_s * 1e3:.1f} ms more expected until the commit is confirmed, over --max-downtime-ms "
            f"{cap_s * 1e3:g}; rolling back, the workload resumes on the source"
        )


@dataclass
class DowntimeCap:
    """The hard cap on one pause.  ``clock`` is a monotonic clock in seconds.

    Call :meth:`start` right before the workload is paused (downtime is
    measured from there, as the report's ``downtime_ms``), then
    :meth:`check` before each step.
    """

    cap_s: float
    clock: Callable[[], float]
    paused_at: float | None = None
    #: The checks made: (step, paused seconds, expected rest), for the log.
    checks: list[tuple[str, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cap_s > 0:
            raise ValueError(f"the downtime cap must be positive, not {self.cap_s!r}")

    def start(self) -> None:
        self.paused_at = self.clock()

    def paused_s(self) -> float:
        """Seconds since :meth:`start` (0 before it)."""
        return 0.0 if self.paused_at is None else self.clock() - self.paused_at

    def check(self, step: str, rest_s: float) -> None:
        """Before ``step``: raise :class:`DowntimeCapExceeded` if the time paused so far plus
        ``rest_s`` (what is expected to follow until the commit is confirmed, >= 0) passes
        the cap.  Raises ValueError for an unknown step (a bug)."""
        if step not in CAP_STEPS:
            raise ValueError(f"unknown switchover step {step!r}")
        paused = self.paused_s()
        rest = max(rest_s, 0.0)
        self.checks.append((step, paused, rest))
        if paused + rest > self.cap_s:
            raise DowntimeCapExceeded(step, paused, rest, self.cap_s)

    def passed(self) -> bool:
        """Whether the pause is past the cap now (after the commit: reported, never rolled back)."""
        return self.paused_s() > self.cap_s

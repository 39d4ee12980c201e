"""The downtime budget as a promise: a hard cap on the pause, as plain code.

Nothing here does I/O; the clock is passed in.

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

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import AbortCode, PrecopyError

__all__ = ["CAP_STEPS", "DowntimeCap", "DowntimeCapExceeded"]

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

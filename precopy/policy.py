"""When to stop iterating: estimates and the switchover rule, as plain code.

Nothing here does I/O or reads a clock; the session feeds it measurements
and asks :meth:`SwitchoverPolicy.decide` what to do next.

Expected downtime (DESIGN "Switchover")::

    remaining bytes (after compression) / bandwidth
      + device state / bandwidth
      + cost of the final scan (measured: the last live chunk scan)
      + fixed overhead (pause, round trips, commit, resume; measured RTT-based)

Switch over when that is within the budget, as QEMU does
(remaining < bandwidth x downtime-limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .wire import PAGE_SIZE

__all__ = [
    "Action",
    "Decision",
    "LinkEstimator",
    "DirtyRateEstimator",
    "SwitchoverPolicy",
    "expected_downtime",
]


class Action(Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    FORCE = "force"  # switch over although the budget will be exceeded
    ABORT = "abort"  # give up: roll back, the workload keeps running on the source


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    expected_downtime_s: float
    reason: str


@dataclass
class LinkEstimator:
    """Bandwidth from what was actually sent: bytes over wall time of sends.

    Samples shorter than ``min_seconds`` are pooled until they are long
    enough to mean something; the estimate is an EWMA over pooled samples.
    """

    initial_bps: float = 100e6
    alpha: float = 0.5
    min_seconds: float = 0.02
    _bps: float | None = None
    _pool_bytes: int = 0
    _pool_seconds: float = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        self._pool_bytes += nbytes
        self._pool_seconds += seconds
        if self._pool_seconds < self.min_seconds and self._bps is not None:
            return
        sample = self._pool_bytes / self._pool_seconds
        self._pool_bytes, self._pool_seconds = 0, 0.0
        self._bps = sample if self._bps is None else self.alpha * sample + (1 - self.alpha) * self._bps

    @property
    def bytes_per_second(self) -> float:
        return self._bps if self._bps is not None else self.initial_bps


@dataclass
class DirtyRateEstimator:
    """Pages dirtied per second, from successive scans."""

    alpha: float = 0.5
    _rate: float | None = None

    def add(self, pages_dirty: int, seconds: float) -> None:
        if seconds <= 0:
            return
        sample = pages_dirty / seconds
        self._rate = sample if self._rate is None else self.alpha * sample + (1 - self.alpha) * self._rate

    @property
    def pages_per_second(self) -> float:
        return self._rate if self._rate is not None else 0.0


def expected_downtime(
    *,
    remaining_pages: int,
    bandwidth_bps: float,
    compress_ratio: float = 1.0,
    device_state_bytes: int = 0,
    final_scan_s: float = 0.0,
    overhead_s: float = 0.0,
) -> float:
    """Seconds the workload will be paused if we switch over now."""
    wire = remaining_pages * PAGE_SIZE * compress_ratio + device_state_bytes
    return wire / max(bandwidth_bps, 1.0) + final_scan_s + overhead_s


@dataclass
class SwitchoverPolicy:
    """The stop rule, and what to do when the dirty set will not shrink.

    ``on_nonconvergence`` is ``"abort"`` (roll back) or ``"force"`` (switch
    over anyway; the report shows the overshoot).  ``max_rounds`` counts
    rounds after the first full copy; ``max_time_s`` bounds the time spent
    iterating (None: unbounded).
    """

    downtime_s: float = 0.3
    max_rounds: int = 30
    max_time_s: float | None = 600.0
    on_nonconvergence: str = "abort"
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_nonconvergence not in ("abort", "force"):
            raise ValueError(f"on_nonconvergence must be 'abort' or 'force', not {self.on_nonconvergence!r}")
        if self.downtime_s <= 0:
            raise ValueError("downtime budget must be positive")
        if self.max_rounds < 0:
            raise ValueError("max_rounds must be >= 0")

    def decide(self, *, rounds_done: int, elapsed_s: float, expected_s: float) -> Decision:
        """Decide after a scan.

        ``rounds_done``: iterative rounds completed after the full copy;
        ``expected_s``: expected downtime if we paused now.
        """
        self.history.append(expected_s)
        if expected_s <= self.downtime_s:
            return Decision(Action.SWITCHOVER, expected_s,
                            f"expected downtime {expected_s * 1e3:.1f} ms within the "
                            f"{self.downtime_s * 1e3:.0f} ms budget")
        over_rounds = rounds_done >= self.max_rounds
        over_time = self.max_time_s is not None and elapsed_s >= self.max_time_s
        if over_rounds or over_time:
            bound = (f"{rounds_done} rounds" if over_rounds else f"{elapsed_s:.1f} s")
            why = (f"did not converge after {bound}: expected downtime "
                   f"{expected_s * 1e3:.1f} ms > budget {self.downtime_s * 1e3:.0f} ms")
            if self.on_nonconvergence == "force":
                return Decision(Action.FORCE, expected_s, why + "; forcing switchover")
            return Decision(Action.ABORT, expected_s, why + "; aborting")
        return Decision(Action.CONTINUE, expected_s,
                        f"expected downtime {expected_s * 1e3:.1f} ms over budget")

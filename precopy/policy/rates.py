"""What the switchover rule is fed: the link's rate, the dirty rate, the expected downtime -- plain code.

Split from :mod:`precopy.policy.switchover` (which re-exports these names):
nothing here does I/O or reads a clock; the session adds its measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from precopy.protocol import PAGE_SIZE

__all__ = ["MAX_PAUSED_SPEEDUP", "SAMPLES_KEPT", "LinkEstimator", "DirtyRateEstimator", "expected_downtime"]

#: The most the pause is taken to speed sending up (see LinkEstimator).
MAX_PAUSED_SPEEDUP = 2.0
#: Rate samples a LinkEstimator keeps for their spread.
SAMPLES_KEPT = 16


@dataclass
class LinkEstimator:
    """Bandwidth from what was actually sent: bytes over wall time of sends.

    Samples shorter than ``min_seconds`` are pooled until they are long
    enough to mean something; the estimate is an EWMA over pooled samples.

    Each sample may say how long the sender ``waited`` for a CPU (runnable,
    not running) meanwhile.  On a machine the workload shares, that is the
    workload's doing, and the pause gives the CPU back: the final pages of
    a 200,000 pages/s guest went at 1.7-2.0 GB/s against 1.2-1.3 GB/s live,
    and 1.4-1.7 GB/s live with the waits taken out.  The sender also counts
    there the time it spends on work only a live round does: re-protecting
    each batch for kernel write tracking (10-18 ms of every 50 at 200,000
    pages/s).  :attr:`paused_bytes_per_second`
    is that rate (at most ``MAX_PAUSED_SPEEDUP`` times the live one), for
    what the pause will send.
    """

    initial_bps: float = 100e6
    alpha: float = 0.5
    min_seconds: float = 0.02
    _bps: float | None = None
    _free_bps: float | None = None
    _pool_bytes: int = 0
    _pool_seconds: float = 0.0
    _pool_waited: float = 0.0
    #: The last pooled samples of the rate with the waits taken out (newest
    #: last, at most ``SAMPLES_KEPT``): their spread sizes the switchover's
    #: margin for the pause's pages (precopy.policy.downtime.switchover_margin).
    free_samples: list[float] = field(default_factory=list)

    def add(self, nbytes: int, seconds: float, waited: float = 0.0) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        self._pool_bytes += nbytes
        self._pool_seconds += seconds
        self._pool_waited += min(max(waited, 0.0), seconds)
        if self._pool_seconds < self.min_seconds and self._bps is not None:
            return
        sample = self._pool_bytes / self._pool_seconds
        free = self._pool_bytes / max(self._pool_seconds - self._pool_waited,
                                      self._pool_seconds / MAX_PAUSED_SPEEDUP)
        self._pool_bytes, self._pool_seconds, self._pool_waited = 0, 0.0, 0.0
        self.free_samples = [*self.free_samples[-(SAMPLES_KEPT - 1):], free]
        self._bps = sample if self._bps is None else self.alpha * sample + (1 - self.alpha) * self._bps
        self._free_bps = free if self._free_bps is None else self.alpha * free + (1 - self.alpha) * self._free_bps

    @property
    def bytes_per_second(self) -> float:
        return self._bps if self._bps is not None else self.initial_bps

    @property
    def paused_bytes_per_second(self) -> float:
        """The rate with the sender's waits for a CPU taken out: what the pause can expect."""
        return max(self._free_bps, self.bytes_per_second) if self._free_bps is not None else self.bytes_per_second


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

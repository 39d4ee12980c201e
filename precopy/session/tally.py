"""Running totals of finished migrations, so a long-lived daemon keeps counters, not every record.

A daemon serves migrations for months: its metrics' counters must keep
growing while its memory does not.  :class:`Tally` folds each finished
migration into a few numbers (counts by outcome, byte and round sums, a
downtime histogram's bucket counts) the moment it ends; the daemons keep
only their newest records besides (``RECENT_KEPT``), for listings and
outcome queries.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["DOWNTIME_BUCKETS_S", "RECENT_KEPT", "OUTCOMES", "Tally"]

#: Downtime histogram buckets, seconds (the upper bounds; +Inf is implied).
DOWNTIME_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Finished migrations a daemon keeps in memory (and the destination in its journal).
RECENT_KEPT = 1000
#: Outcomes always reported, zero or not.
OUTCOMES = ("committed", "aborted", "in-doubt")


@dataclass
class Tally:
    """Totals over every migration finished since the daemon started."""

    buckets: tuple[float, ...] = DOWNTIME_BUCKETS_S
    by_outcome: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    bytes: int = 0
    pages: int = 0
    rounds: int = 0
    #: Downtimes observed, cumulative per bucket of ``buckets`` then +Inf.
    downtime_counts: list[int] = field(default_factory=list)
    downtime_sum_s: float = 0.0

    def __post_init__(self) -> None:
        if list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"histogram buckets must be increasing: {self.buckets}")
        if not self.downtime_counts:
            self.downtime_counts = [0] * (len(self.buckets) + 1)

    def add(self, outcome: str, *, bytes: int = 0, pages: int = 0, rounds: int = 0,
            downtime_s: float | None = None) -> None:
        """Count one finished migration (``downtime_s`` only for one that committed)."""
        self.by_outcome[outcome] = self.by_outcome.get(outcome, 0) + 1
        self.bytes += max(0, int(bytes))
        self.pages += max(0, int(pages))
        self.rounds += max(0, int(rounds))
        if downtime_s is not None:
            self.observe_downtime(float(downtime_s))

    def observe_downtime(self, seconds: float) -> None:
        first = bisect.bisect_left(self.buckets, seconds)  # the first bucket with seconds <= bound
        for i in range(first, len(self.downtime_counts)):
            self.downtime_counts[i] += 1
        self.downtime_sum_s += seconds

    @property
    def finished(self) -> int:
        return sum(self.by_outcome.values())

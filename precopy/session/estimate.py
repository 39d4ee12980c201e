"""The downtime model: what a pause would cost now, from what the rounds measured (DESIGN "Switchover").

Expected downtime = the final scan + the pages left (after compression, at
the rate a pause sends) + device state + verification + a fixed overhead
(pausing, round trips, the commit, the resume).  The switchover margin
says how far under the budget that must fall, from the measured spread of
those parts (:func:`precopy.policy.downtime.switchover_margin`).  No I/O:
the rounds feed it their measurements, the policy reads its answers.
"""

from __future__ import annotations

from typing import Callable

from precopy.memory.tracking import SourceChunks
from precopy.policy.downtime import Margin, Part, switchover_margin
from precopy.policy.switchover import DirtyRateEstimator, LinkEstimator, SwitchoverPolicy, expected_downtime
from precopy.protocol import PAGE_SIZE
from precopy.protocol.compress import AdaptiveCompressor
from precopy.session.report import RoundReport

__all__ = ["DowntimeModel", "SPREAD_SAMPLES"]

#: Live samples of the scan's cost and of the dirty rate kept for their spread.
SPREAD_SAMPLES = 8


class DowntimeModel:
    """Expected downtime and switchover margin for one migration.

    Built from the estimators the rounds feed (``link``, ``dirty_rate``,
    ``compressor``), the round trip (``rtt()``, learned by the exchanges)
    and what pausing the workload costs it (``switchover_cost_s``).  The
    region's geometry and the tracker's chunk table (``chunks``, None
    without kernel tracking) are set once known (:meth:`region`).  The
    measured attributes below are written by the rounds.
    """

    def __init__(self, policy: SwitchoverPolicy, link: LinkEstimator, dirty_rate: DirtyRateEstimator,
                 compressor: AdaptiveCompressor, rtt: Callable[[], float], *, budget_s: float,
                 headroom: str, switchover_cost_s: float = 0.0) -> None:
        self.policy = policy
        self.link = link
        self.dirty_rate = dirty_rate
        self.compressor = compressor
        self.rtt = rtt
        self.budget_s = budget_s
        self.headroom = headroom
        self.switchover_cost_s = switchover_cost_s
        self.npages = 0
        self.chunk_pages = 1
        self.chunks: SourceChunks | None = None
        #: The final scan's expected cost (the slower of the last two live scans).
        self.last_scan_s = 0.0
        self.prev_scan_s = 0.0
        #: The CPU time of the tracker's detection in the scan before.
        self.prev_detect_s = 0.0
        #: The fastest scan of the whole region so far.
        self.floor_scan_s = float("inf")
        #: Rehashing for one scattered page: its chunk, or (by page) itself.
        self.chunk_hash_s = 0.0
        #: The scan's cost as each live round measured it.
        self.scan_samples: list[float] = []
        #: The dirty rate (pages/s) each live round measured.
        self.dirty_samples: list[float] = []
        #: Pages sent since the destination last hashed what it holds (tracked).
        self.unsettled = 0

    def region(self, npages: int, chunk_pages: int, chunks: SourceChunks | None) -> None:
        """The region's size in pages, its chunk size, and the tracker's chunk table (None: digests)."""
        self.npages, self.chunk_pages, self.chunks = npages, chunk_pages, chunks

    @property
    def _ratio(self) -> float:
        return self.compressor.ratio if self.compressor.active else 1.0

    def round_s(self, pages: int) -> float:
        """Seconds a round that sends ``pages`` would take: the send plus a scan."""
        return pages * PAGE_SIZE * self._ratio / max(self.link.bytes_per_second, 1.0) + self.last_scan_s

    def overhead_s(self) -> float:
        """The pause's fixed costs: pausing, round trips, the commit and the resume."""
        # A workload may declare what pausing and resuming it costs (a VMM's
        # device-state save and load).
        return 0.002 + 2 * self.rtt() + self.switchover_cost_s

    def rest_s(self, pages_left: int, device_state_bytes: int = 0) -> float:
        """What a pause is expected to take from here until the commit is confirmed, with
        ``pages_left`` pages and ``device_state_bytes`` still to send: the downtime cap's guess."""
        split: dict[str, float] = {}
        self.expected(pages_left, device_state_bytes, final_scan_s=0.0, split=split)
        return (split["final_pages"] + split["verify"] + split["overhead"]) / 1e3

    def expected(self, remaining_pages: int, device_state_bytes: int = 0,
                 final_scan_s: float | None = None, split: dict[str, float] | None = None) -> float:
        """Expected downtime if the workload were paused now (seconds); ``split`` gets its parts in ms."""
        verify_s = 0.0
        nchunks = -(-self.npages // self.chunk_pages)
        tracked = self.chunks is not None and self.chunks.table is not None
        if tracked or remaining_pages:
            # Verification (always with a tracker; with digests after pages
            # were sent paused): a round trip, the destination's chunk table
            # back, and first its rehash of every chunk written since its
            # last refresh -- those of the pages still to send (the last
            # round's were settled while it ran: Rounds.settle).
            # Scattered pages cost a whole chunk each: with 500 pages that
            # was most of a 30 ms pause.
            # By page, the destination hashes each page as it lands (part of
            # sending it) and derives chunk digests from page digests at
            # ~0.2 us a chunk: counting a page hash a page here put 9-10 ms
            # of a 200,000 pages/s guest's pause in verify, which took 2.
            by_page = self.chunks is not None and self.chunks.by_page
            stale = 0 if by_page else min(remaining_pages + self.unsettled, nchunks)
            verify_s = (self.rtt() + nchunks * 8 / max(self.link.paused_bytes_per_second, 1.0)
                        + stale * self.chunk_hash_s)
        scan_s = self.last_scan_s if final_scan_s is None else final_scan_s
        overhead_s = self.overhead_s()
        pages_s = expected_downtime(
            remaining_pages=remaining_pages,
            bandwidth_bps=self.link.paused_bytes_per_second,
            compress_ratio=self._ratio,
            device_state_bytes=device_state_bytes,
        )
        if split is not None:
            split.update(final_scan=scan_s * 1e3, final_pages=pages_s * 1e3, verify=verify_s * 1e3,
                         overhead=overhead_s * 1e3)
        return verify_s + pages_s + scan_s + overhead_s

    def margin(self, split: dict[str, float], later: int, scan_estimate: float,
               last_round: RoundReport | None) -> Margin:
        """The switchover's margin for an expected downtime made of ``split`` (ms, from
        :meth:`expected`), ``later`` of its pages dirtied until the pause, and a final scan
        estimated from a live scan cost of ``scan_estimate`` s (see switchover_margin).
        ``last_round``: the round (or full copy) just sent, for its waits for a CPU."""
        link = self.link
        paused_bps = link.paused_bytes_per_second
        later_s = later * PAGE_SIZE * self._ratio / max(paused_bps, 1.0)
        parts = {
            "final_scan": Part(split["final_scan"] / 1e3, scan_estimate, self.scan_samples),
            # The pages' time goes as 1 / the paused rate; the rate samples
            # are the live ones with the waits taken out (what it is made of).
            "final_pages": Part(split["final_pages"] / 1e3, paused_bps, link.free_samples, inverse=True),
            # Of those pages, the ones dirtied until the pause go with the dirty rate.
            "dirtied": Part(later_s, self.dirty_rate.pages_per_second, self.dirty_samples),
            # Round trips and fixed costs: no live samples (the handshake's two).
            "verify": Part(split["verify"] / 1e3, self.rtt()),
            "overhead": Part(split["overhead"] / 1e3, self.rtt()),
        }
        whole = {
            # The pause may send no faster than the live rounds did ...
            "speedup": split["final_pages"] / 1e3 * max(paused_bps / max(link.bytes_per_second, 1.0) - 1.0, 0.0),
        }
        if self.chunks is not None and last_round is not None and last_round.send_seconds > 0:
            # ... and a kernel scan taken at its CPU time may wait for a CPU
            # as long as the last round's sends did (other processes hold it).
            waited = min(last_round.send_cpu_wait_seconds / last_round.send_seconds, 0.75)
            whole["cpu"] = split["final_scan"] / 1e3 * waited / (1 - waited)
        if self.headroom == "fixed":
            fixed = self.budget_s * (1 - self.policy.headroom)
            return Margin(fixed, self.budget_s - fixed, {}, "fixed")
        return switchover_margin(parts, self.budget_s, whole=whole, fixed_share=self.policy.headroom)

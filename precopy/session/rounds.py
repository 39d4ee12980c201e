"""The iterative rounds: scan, estimate the pause, ask the policy, send what is dirty, again.

Each round asks the dirty scanner what changed, feeds the downtime model
(:mod:`precopy.session.estimate`) what the scan measured, and hands the
policy (:class:`precopy.policy.switchover.SwitchoverPolicy`, pure) the
expected downtime; on CONTINUE the round sends the dirty pages while the
workload runs (throttled when the policy says so), on SWITCHOVER or FORCE
the loop ends with the pages left for the pause.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from precopy.errors import AbortCode, PrecopyError
from precopy.memory.digest import page_union
from precopy.memory.tracking import SourceChunks
from precopy.policy.converge import RoundFit
from precopy.policy.downtime import DowntimeCap, Margin
from precopy.policy.postcopy import apply_postcopy
from precopy.policy.switchover import Action, Decision, DirtyRateEstimator, LinkEstimator, SwitchoverPolicy
from precopy.protocol import PAGE_SIZE
from precopy.session.contention import ContentionMeter
from precopy.session.estimate import SPREAD_SAMPLES, DowntimeModel
from precopy.session.exchange import Exchange
from precopy.session.report import MigrationReport, RoundReport
from precopy.session.reporting import record_margin
from precopy.session.scanner import DirtyScanner, Scan
from precopy.session.sender import PageSender
from precopy.session.throttle import Throttle
from precopy.workload.base import Workload

__all__ = ["Rounds", "TRACKED_SHRINK_PAGES"]

_log = logging.getLogger(__name__)
#: With a tracker, a dirty set this small is sent paused rather than chased.
TRACKED_SHRINK_PAGES = 64


@dataclass
class _Round:
    """What one round's scan found and what the model made of it."""

    t: float  # when the scan began
    scan: Scan
    scan_s: float  # the scan's wall time
    scanned_s: float  # its hashing (or a tracker's detection and rehash)
    todo: np.ndarray  # the pages to send: dirty, and those of chunks that differ oddly
    later: int  # pages the workload dirties from the scan to a pause
    dirtied: int  # what it dirtied over the round (a throttled workload's recent runs counted)
    interval_s: float = 0.0  # from the last scan (or the migration's start) to this one
    scan_estimate: float = 0.0  # the final scan's cost as the margin takes it
    final_scan_s: float | None = None  # a tracker's paused scan, when it differs from the live one
    expected: float = 0.0
    split: dict[str, float] = field(default_factory=dict)
    margin: Margin | None = None


class Rounds:
    """The iterative rounds of one migration, from the full copy to the decision to pause.

    ``pending`` holds, once :meth:`run` returns, the pages decided on that
    the final pass sends whatever its scan finds.  :meth:`settle` and
    :meth:`settled` keep the destination's chunk table current between
    tracked rounds; the switchover waits on the last one.
    """

    def __init__(self, *, workload: Workload, policy: SwitchoverPolicy, model: DowntimeModel,
                 throttle: Throttle, contention: ContentionMeter, report: MigrationReport,
                 link: LinkEstimator, dirty_rate: DirtyRateEstimator, exchange: Exchange,
                 scanner: DirtyScanner, sender: PageSender, npages: int, chunk_pages: int,
                 chunks: SourceChunks | None, cap: DowntimeCap | None, headroom: str, t0: float,
                 emit: Callable[[str, int, int, int, int, float], None],
                 postcopy: tuple[str, str] = ("off", "abort")) -> None:
        self.workload = workload
        self.policy = policy
        self.model = model
        self.throttle = throttle
        self.contention = contention
        self.report = report
        self.link = link
        self.dirty_rate = dirty_rate
        self.exchange = exchange
        self.scanner = scanner
        self.sender = sender
        self.npages = npages
        self.chunk_pages = chunk_pages
        self.chunks = chunks  # a kernel tracker's chunk table; None: digests
        self.cap = cap
        self.headroom = headroom
        self.t0 = t0
        self.emit = emit
        self.last_scan_t = t0  # when the last scan (or the full copy) began: the dirty rate's interval
        self.pending = np.zeros(0, dtype=np.uint32)
        #: (--postcopy, --on-nonconvergence) where the destination serves post-copy;
        #: ``postcopy_chosen`` once the rounds end in it (precopy.policy.postcopy).
        self.postcopy = postcopy
        self.postcopy_chosen = False
        self._recent_dirty: list[int] = []  # dirty pages found by the last rounds' scans
        self._closing_in = False  # see near_switchover
        self._settle_seq: int | None = None  # a table asked for by settle, not yet answered

    @property
    def tracked(self) -> bool:
        return self.chunks is not None

    async def run(self) -> tuple[float, np.ndarray]:
        """Rounds until the policy says switch over.

        Returns the expected downtime and the destination's chunk digests
        from the last scan, which stay current: nothing is sent after it.
        Raises :class:`PrecopyError` (NOT_CONVERGED) when the policy aborts.
        """
        rounds_done = 0
        while True:
            # Before the scan: time the destination still needs for the last
            # round is then part of the round (its writes are in the scan),
            # not a gap between the decision and the pause.
            await self.settled()
            held = await self.throttle.hold_for_scan()
            rnd = await self._scan()
            self._estimate(rnd)
            decision = self._decide(rnd, rounds_done)
            if await self._act(decision, rnd, held, rounds_done):
                return rnd.expected, rnd.scan.dest_table
            rounds_done += 1
            await self._send(rnd, rounds_done)

    async def _scan(self) -> _Round:
        """The round's scan, and what it says of the dirty rate and of the final scan's cost."""
        model = self.model
        t = time.monotonic()
        scan = await self.scanner.scan(final=False)
        dirty = scan.dirty
        scan_s = time.monotonic() - t
        # The final scan costs the local chunk hash plus per-page hashing
        # of the candidate chunks; the round trip is in the overhead.
        # Take the slower of the last two scans: a single fast one (a
        # quiet moment on a shared machine) should not trigger a switchover.
        est = scanned_s = scan.hash_s + scan.page_hash_s
        nchunks = -(-self.npages // self.chunk_pages)
        if scan.by_page:
            # The final scan hashes chunks, then the pages of those that
            # differ: what a scan by page would find dirty, at the least.
            chunk_pass = model.floor_scan_s if model.floor_scan_s != float("inf") else est
            est = chunk_pass + self.scanner.page_s * min(self.npages, self.chunk_pages * len(dirty))
        else:
            model.chunk_hash_s = (self.chunks.scattered_page_s if self.chunks is not None
                                  else scan.hash_s / nchunks)
        model.last_scan_s = max(est, model.prev_scan_s)
        model.prev_scan_s = est
        interval = time.monotonic() - self.last_scan_t
        self.last_scan_t = t
        self.dirty_rate.add(len(dirty), interval)
        if interval > 0:
            model.dirty_samples = [*model.dirty_samples[-(SPREAD_SAMPLES - 1):], len(dirty) / interval]
        todo = page_union(self.npages, dirty, scan.odd)
        # Switching over now leaves ``todo`` plus what the workload dirties
        # until it is paused (about one scan's time) for the pause.
        later = int(self.dirty_rate.pages_per_second * model.last_scan_s)
        self._recent_dirty = [*self._recent_dirty[-3:], len(dirty)]
        dirtied = len(dirty)
        ran_since = getattr(self.workload, "ran_since", None)
        if self.throttle.pct and ran_since is not None and ran_since(t):
            # A throttled workload writes in bursts: the quiet scan of a
            # stop phase says nothing of a run that came after it began.
            # Count what its recent runs dirtied, so as not to pause on it.
            stale = max(self._recent_dirty)
            later = max(later, stale)
            dirtied = min(self.npages, dirtied + stale)
        return _Round(t, scan, scan_s, scanned_s, todo, later, dirtied, interval)

    def _estimate(self, rnd: _Round) -> None:
        """The expected downtime of a pause now, its parts and its margin."""
        model = self.model
        if self.tracked:  # the detection's CPU time drives the paused scan
            scan_sample = self.scanner.detect_cpu_s
            rnd.scan_estimate = max(self.scanner.detect_cpu_s, model.prev_detect_s)
        else:
            scan_sample, rnd.scan_estimate = rnd.scanned_s, model.last_scan_s
        model.scan_samples = [*model.scan_samples[-(SPREAD_SAMPLES - 1):], scan_sample]
        if self.chunks is not None and self.chunks.table is not None:
            # Paused, the tracker's scan rehashes only the chunks of what
            # is written from now to the pause (``todo``'s were rehashed
            # in this scan): its detection plus ``later`` pages' chunks,
            # not this scan's rehash of the whole dirty set.  Detection
            # is taken at the CPU time the last two live ones used (the
            # slower): their wall time includes waiting for a CPU the
            # workload and the destination held, which a pause gives
            # back -- 4.6-9.5 ms live for pauses that scanned in 1.7-2.8
            # (2,000 pages/s, measured ÷ expected 0.47-0.74).
            detect_s = max(self.scanner.detect_cpu_s, model.prev_detect_s)
            rnd.final_scan_s = detect_s + self.chunks.estimate(rnd.later)
            model.prev_detect_s = self.scanner.detect_cpu_s
        rnd.expected = model.expected(len(rnd.todo) + rnd.later, final_scan_s=rnd.final_scan_s, split=rnd.split)
        rnd.margin = model.margin(rnd.split, rnd.later, rnd.scan_estimate,
                                  self.report.rounds[-1] if self.report.rounds else None)

    def _decide(self, rnd: _Round, rounds_done: int) -> Decision:
        """The policy's decision on the round, with the floor it needs and the contention it saw."""
        model = self.model
        dirty = rnd.scan.dirty
        # For the floor rule and auto-converge: what a pause with nothing
        # left to send would cost (the part of the scan no dirty page
        # adds to: hashing every chunk, or the tracker's scan), and what
        # the previous round (or the full copy) sent while the workload
        # dirtied ``dirty``.
        # The fastest such scan so far: a live scan competes with the
        # workload for the CPUs, the paused one does not.
        # A kernel tracker's scan grows with what was written (one region
        # per run of written pages, decoded here): only a scan of a small
        # dirty set says what it costs when nothing is left, and until one
        # is seen the floor is unknown -- never a reason to stop.
        if not rnd.scan.by_page and (not self.tracked or len(dirty) <= max(2048, self.npages // 100)):
            model.floor_scan_s = min(model.floor_scan_s, rnd.scan.hash_s)
        last = self.report.rounds[-1]
        # A workload that writes leaves pages for any pause, and so the
        # verification they bring: the floor counts one.
        floor = (model.expected(1 if len(dirty) else 0, final_scan_s=model.floor_scan_s)
                 if model.floor_scan_s != float("inf") else None)
        _log.debug("round %d: downtime floor %s (scan %.1f ms); %d pages dirtied while %d were sent",
                   rounds_done + 1, "unknown" if floor is None else f"{floor * 1e3:.1f} ms",
                   model.floor_scan_s * 1e3, len(dirty), last.pages_sent + last.zero_pages)
        contention = self.contention.measure(self.exchange.dest_peers)
        assert rnd.margin is not None
        decision = self.policy.decide(
            rounds_done=rounds_done, elapsed_s=time.monotonic() - self.t0 - self.report.queued_s,
            expected_s=rnd.expected, contention=contention,
            floor_min_s=0.002 + model.switchover_cost_s,
            floor_s=floor, scan_s=model.floor_scan_s if floor is not None else None, dirtied_pages=rnd.dirtied,
            sent_pages=last.pages_sent + last.zero_pages, remaining_pages=len(rnd.todo),
            at_floor_scan_s=(model.expected(len(rnd.todo) + rnd.later, final_scan_s=model.floor_scan_s)
                             if floor is not None else None),
            margin_s=rnd.margin.margin_s if self.headroom == "spread" else None, fit=self._fit(rnd),
        )
        todo = len(rnd.todo)
        if (decision.action is Action.SWITCHOVER and self.tracked
                and rounds_done + 1 < self.policy.max_rounds
                and (rounds_done == 0 and todo
                     or todo > max(TRACKED_SHRINK_PAGES,
                                   2 * self.dirty_rate.pages_per_second * model.round_s(todo)))):
            # Tracked rounds cost a few ms: while sending the dirty set live
            # would at least halve it (the workload dirties ~rate x the next
            # round's time meanwhile), do that rather than send it paused.
            # The first round's set spans the full copy: never pause on it.
            decision = dataclasses.replace(decision, action=Action.CONTINUE,
                                           reason=decision.reason + "; one more tracked round first")
        sent = last.pages_sent + last.zero_pages
        return apply_postcopy(decision, mode=self.postcopy[0], on_nonconvergence=self.postcopy[1],
                              throttle_before=self.throttle.pct,
                              converging=rnd.dirtied <= self.policy.throttle_threshold * sent if sent else None)

    def _fit(self, rnd: _Round) -> RoundFit | None:
        """The last round's rates, for the policy's predict ramp: after the full copy only with
        kernel write tracking (digests find only the pages written after the copy read them)."""
        last = self.report.rounds[-1]
        if last.kind != "iterative":
            if not self.tracked or last.kind != "full":
                return None
            return RoundFit.after_full_copy(copy_s=rnd.interval_s, scan_s=rnd.scan_s,
                                            send_pps=self.link.bytes_per_second / PAGE_SIZE,
                                            dirtied=len(rnd.scan.dirty), npages=self.npages)
        return RoundFit(pages_sent=last.pages_sent + last.zero_pages, interval_s=rnd.interval_s,
                        scan_s=last.scan_seconds, scan_per_page=self.tracked,
                        send_pps=self.link.bytes_per_second / PAGE_SIZE, dirtied=len(rnd.scan.dirty),
                        npages=self.npages, throttle_pct=self.throttle.pct)

    async def _act(self, decision: Decision, rnd: _Round, held: bool, rounds_done: int) -> bool:
        """Carry out the decision: True to switch over now; raises to abort; else go on."""
        if decision.action is Action.CONTINUE:
            await self.throttle.set(decision.throttle_pct, release=held)
        throttled = f", throttle {self.throttle.pct} %" if self.throttle.pct else ""
        _log.info("round %d: %d dirty pages, %.1f MB/s%s, %s", rounds_done + 1, len(rnd.scan.dirty),
                  self.link.bytes_per_second / 1e6, throttled, decision.reason)
        if decision.action in (Action.SWITCHOVER, Action.FORCE):
            assert rnd.margin is not None
            record_margin(self.report, rnd.split, rnd.margin)
        if decision.action in (Action.SWITCHOVER, Action.POSTCOPY):
            self.postcopy_chosen = decision.action is Action.POSTCOPY
            if self.postcopy_chosen:
                self.report.reason = decision.reason
            self.pending = rnd.todo
            return True
        if decision.action is Action.FORCE and self.cap is not None and rnd.expected > self.cap.cap_s:
            # Forcing would pause past the cap for sure: roll back without pausing at all.
            self.report.reason = decision.reason
            raise PrecopyError(
                f"{decision.reason}; but the expected downtime {rnd.expected * 1e3:.1f} ms is over "
                f"--max-downtime-ms {self.cap.cap_s * 1e3:g}: aborting without pausing",
                AbortCode.NOT_CONVERGED)
        if decision.action is Action.FORCE:
            self.report.forced = True
            self.report.reason = decision.reason
            self.pending = rnd.todo
            return True
        if decision.action is Action.ABORT:
            self.report.reason = decision.reason
            raise PrecopyError(decision.reason, AbortCode.NOT_CONVERGED)
        if decision.wait_s > 0:
            # Contended: let it pass rather than add to it (the pages
            # found are still sent below: a tracker has re-armed them).
            await asyncio.sleep(decision.wait_s)
            self.contention.slept += decision.wait_s
        return False

    async def _send(self, rnd: _Round, number: int) -> None:
        """Send the round's dirty pages while the workload runs; report the round."""
        todo = rnd.todo
        report = RoundReport(round=number, kind="iterative", pages_scanned=self.npages,
                             pages_dirty=len(todo), pages_sent=0, zero_pages=0, bytes_on_wire=0,
                             seconds=0.0, scan_seconds=rnd.scan_s,
                             detect_seconds=rnd.scan.hash_s if self.tracked else rnd.scanned_s,
                             dirty_rate_pps=self.dirty_rate.pages_per_second,
                             expected_downtime_ms=rnd.expected * 1e3, throttle_pct=self.throttle.pct)
        # With a tracker, scattered pages are gathered straight from
        # memory as cheaply as runs: filling gaps would only add bytes.
        await self.sender.send(todo, report, "iterating", fill=0 if self.tracked else 1, live=True)
        if self.tracked and len(todo):
            if self.near_switchover(len(todo)):
                await self.settle()
            else:
                # Far from a switchover the destination would rehash
                # chunks the next round rewrites: it does when asked.
                self.model.unsettled += len(todo)
        report.seconds = time.monotonic() - rnd.t
        report.bandwidth_bps = self.link.bytes_per_second
        self.report.rounds.append(report)
        self.emit("iterating", number, len(todo), len(todo), len(todo), rnd.t)

    def near_switchover(self, pages: int) -> bool:
        """Whether a tracked migration is closing in on its switchover.

        True from the first dirty set of ``pages`` that can be sent within
        twice the downtime budget, and from then on.  Before, a tracked
        round leaves the rehash of the chunks it dirtied (here and on the
        destination) for later: a fast writer dirties them again.  After,
        every round rehashes what it dirtied, so that the pause rehashes
        only its own pages' chunks; for good, since flushing the backlog
        takes a round long enough to swell the next dirty set, and going
        back to deferring made rounds alternate without converging.
        """
        if not self._closing_in:
            rate = max(self.link.bytes_per_second, 1.0)
            self._closing_in = pages * PAGE_SIZE <= 2 * self.policy.downtime_s * rate
        return self._closing_in

    async def settle(self) -> None:
        """Ask the destination for its table after a tracked round's pages (answer: :meth:`settled`).

        With kernel write tracking nothing else asks the destination for its
        chunk table between rounds, and its background rehash lags behind a
        fast round: the verification after the pause would first rehash that
        backlog (2-28 ms measured, most of a 10-30 ms pause, and not in the
        estimate).  Asked for right after the round's pages, the destination
        hashes them while the workload runs; the next scan waits for the
        answer, so that the pause follows its decision at once (waiting after
        the decision let a throttled workload write ~2,000 pages more, at
        200,000 pages/s, than the estimate had counted).
        """
        self._settle_seq = await self.exchange.request(by_page=self.chunks is not None and self.chunks.by_page)
        self.model.unsettled = 0

    async def settled(self) -> None:
        """Wait for the answer to :meth:`settle`, if one is due (its table itself is not needed)."""
        if self._settle_seq is None:
            return
        t = time.monotonic()
        await self.exchange.expect_table(self._settle_seq)
        self._settle_seq = None
        _log.debug("destination settled %.1f ms after the scan", (time.monotonic() - t) * 1e3)

"""The source side of a migration, as one asyncio session.

Rounds, in the QEMU pre-copy shape:

0. **Full copy** of every page while the workload runs.
1. **Iterative rounds**: ask the destination for its chunk digests while
   hashing our live chunks (two threads, memory speed); chunks that differ
   are candidates; inside them, pages whose live digest differs from the
   digest of what we last *sent* are dirty.  Decide with the policy; send
   the dirty pages; repeat.
2. **Switchover**: pause the workload, hash the frozen region's chunks,
   compare with the destination's table, send what differs, send the
   device state, verify the chunk tables agree (repairing any chunk that
   does not, counted in ``verify_repairs``), commit.

Chunk digests are computed over real memory on both sides, so the final
comparison is an end-to-end check of the whole region.  Page digests are
taken from the staged copy that goes on the wire (DESIGN invariant 1).

With ``tracking="uffd-wp"`` (:mod:`precopy.memory.tracking`) the kernel names the
dirty pages instead of the chunk comparison, and the source's chunk table
for the final verification is kept current by rehashing only the chunks of
reported pages, so the pause rehashes only what the last scan reported.

The work of each phase lives in an object of its own, which tests drive
without sockets: the page sender (:mod:`precopy.session.sender`), the dirty
scanner (:mod:`precopy.session.scanner` for digests,
:mod:`precopy.session.tracked` for kernel tracking, behind one interface),
the record of what the destination holds (:mod:`precopy.session.record`)
and the exchange of events with the destination
(:mod:`precopy.session.exchange`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import xxhash

from precopy.net.channel import Channel, PeerAborted, connect
from precopy.net.tls import make_channel
from precopy.protocol.compress import AdaptiveCompressor
from precopy.policy.downtime import DowntimeCap, DowntimeCapExceeded, Margin, Part, switchover_margin
from precopy.memory.digest import page_union
from precopy.session.commit import Committer, OutcomeTarget, describe
from precopy.session.contention import SENDING, ContentionMeter
from precopy.session.guardian import ARMED, COMMIT, IDLE, Guardian
from precopy.session.handshake import handshake
from precopy.session.options import Progress, SourceOptions
from precopy.session.throttle import Throttle
from precopy.errors import (
    AbortCode,
    MigrationAborted,
    MigrationInDoubt,
    PrecopyError,
)
from precopy.memory.region import GuestMemory, clear_exception_frames
from precopy.policy.switchover import (
    Action,
    DirtyRateEstimator,
    LinkEstimator,
    SwitchoverPolicy,
    expected_downtime,
)
from precopy.session.report import MigrationReport, RoundReport
from precopy.memory.tracking import SourceChunks, TrackingUnavailable, UffdTracker
from precopy.protocol import (
    MAX_PAYLOAD,
    PAGE_SIZE,
    Begin,
    DeviceState,
    Queued,
    Ready,
    Role,
    Switchover,
)
from precopy.workload.base import Workload
from precopy.session.exchange import Exchange
from precopy.session.record import PageRecord
from precopy.session.scanner import DigestScanner, DirtyScanner
from precopy.session.sender import PageSender
from precopy.session.tracked import TrackedScanner, choose_tracker

__all__ = ["SourceOptions", "Progress", "migrate", "SourceSession"]

_log = logging.getLogger(__name__)
#: With a tracker, a dirty set this small is sent paused rather than chased.
_TRACKED_SHRINK_PAGES = 64
_h64 = xxhash.xxh3_64_intdigest
#: Live samples of the scan's cost and of the dirty rate kept for their spread.
_SPREAD_SAMPLES = 8


class SourceSession:
    """One migration from the source's side.  Use :func:`migrate`."""

    def __init__(self, opts: SourceOptions, workload: Workload,
                 progress: Callable[[Progress], None] | None = None) -> None:
        self.opts = opts
        self.workload = workload
        self.progress = progress
        self.policy = SwitchoverPolicy(
            downtime_s=opts.downtime_ms / 1e3, max_rounds=opts.max_rounds,
            max_time_s=opts.max_time_s, on_nonconvergence=opts.on_nonconvergence,
            throttle=opts.throttle, throttle_initial_pct=opts.throttle_initial_pct,
            throttle_step_pct=opts.throttle_step_pct, throttle_max_pct=opts.throttle_max_pct,
        )
        self.link = LinkEstimator()
        self.dirty_rate = DirtyRateEstimator()
        self.compressor = AdaptiveCompressor(opts.compress)
        self.report = MigrationReport(
            migration_id=str(opts.migration_id), memory=str(opts.memory),
            destination=f"{opts.host}:{opts.port}", workload=workload.describe(),
            downtime_budget_ms=opts.downtime_ms, compression=opts.compress, mode=opts.mode,
            max_downtime_ms=opts.max_downtime_ms, on_commit=opts.on_commit,
        )
        self._cap = (DowntimeCap(opts.max_downtime_ms / 1e3, time.monotonic)
                     if opts.max_downtime_ms is not None else None)
        self._t_pause = 0.0
        self.chan: Channel | None = None
        self.mem: GuestMemory | None = None
        self.paused = False
        self.committer = Committer(OutcomeTarget(
            host=opts.host, port=opts.port, migration_id=str(opts.migration_id), auth_key=opts.auth_key,
            tls_context=opts.tls_context, connect_timeout_s=opts.connect_timeout_s,
            io_timeout_s=opts.io_timeout_s, retries=opts.outcome_retries))
        self.throttle = Throttle(workload, self.policy, self.report, lambda: self.paused)
        self.contention = ContentionMeter(str(opts.migration_id))
        #: Events to and from the destination (the round trip and its peers learned on the way).
        self.exchange = Exchange(opts.io_timeout_s)
        self._reader: asyncio.Task[None] | None = None
        #: What the destination holds, page by page; the page sender; the
        #: dirty scanner (digests or kernel tracking): made in _migrate.
        self.record: PageRecord
        self.sender: PageSender
        self.scanner: DirtyScanner
        self._t0 = 0.0
        self._last_scan_s = 0.0
        self._prev_scan_s = 0.0
        self._prev_detect_s = 0.0  # the CPU time of the tracker's detection in the scan before
        self._settle_seq: int | None = None  # a table asked for by _settle, not yet answered
        self._unsettled = 0  # pages sent since the destination last hashed what it holds (tracked)
        self._closing_in = False  # see _near_switchover
        self._floor_scan_s = float("inf")  # the fastest scan of the whole region so far
        self._chunk_hash_s = 0.0  # rehashing for one scattered page: its chunk, or (by page) itself
        self._hash_pool = ThreadPoolExecutor(2, thread_name_prefix="precopy-hash")
        self._outer_pool = ThreadPoolExecutor(1, thread_name_prefix="precopy-scan")
        self._guardian: Guardian | None = None
        self.tracker: UffdTracker | None = None
        self.chunks: SourceChunks | None = None
        self._recent_dirty: list[int] = []  # dirty pages found by the last rounds' scans
        self._pending = np.zeros(0, dtype=np.uint32)  # decided on, sent in the final pass
        self._scan_samples: list[float] = []  # the scan's cost as each live round measured it
        self._dirty_samples: list[float] = []  # the dirty rate (pages/s) each live round measured
        self._dest_table = np.zeros(0, dtype=np.uint64)  # from the last verification

    # -- entry point ----------------------------------------------------

    async def run(self) -> MigrationReport:
        """Migrate.  Returns the report of a committed migration.

        Raises :class:`MigrationAborted` (the workload runs on the source)
        or :class:`MigrationInDoubt` (it is left paused); both carry the
        report as ``.report``.
        """
        self._t0 = time.monotonic()
        try:
            try:
                await self._migrate()
                if self.opts.dry_run:
                    self.report.outcome = "preflight-ok"
                    return self.report
            except MigrationInDoubt:
                raise
            except BaseException as exc:
                if self.committer.confirmed:
                    # Interrupted after the destination confirmed: it is done.
                    _log.warning("interrupted after the commit was confirmed (%s)", describe(exc))
                    self.report.outcome = "committed"
                    return self.report
                if not self.committer.in_doubt:
                    raise
                # COMMIT is out (and we were cancelled, or broke, before the
                # answer): the destination may own the workload now.  Never
                # roll back blindly; ask.  "Not committed" raises, and rolls back.
                _log.warning("interrupted after COMMIT was sent (%s): asking for the outcome", describe(exc))
                await self.committer.resolve(exc, self.chan)
                self.paused = False
            self.report.outcome = "committed"
            return self.report
        except MigrationInDoubt as exc:
            self.report.outcome = "in-doubt"
            self.report.error = str(exc)
            exc.report = self.report  # type: ignore[attr-defined]
            raise
        except BaseException as exc:
            if self.committer.in_doubt:
                # The outcome could not be learned (e.g. a second interrupt
                # while asking): resuming here could make two owners.
                self.report.outcome = "in-doubt"
                self.report.error = (f"interrupted after COMMIT was sent ({describe(exc)}); "
                                     "the workload is left PAUSED on the source: check the destination "
                                     f"({self.report.destination}) for migration {self.opts.migration_id}")
                doubt = MigrationInDoubt(self.report.error, AbortCode.LINK)
                doubt.report = self.report  # type: ignore[attr-defined]
                raise doubt from exc
            # Anything, even a bug here, before the commit: the workload must
            # keep running on the source.
            if not isinstance(exc, (PrecopyError, OSError, asyncio.CancelledError)):
                _log.exception("internal error during migration; rolling back")
            code = await self._rollback(exc)
            err = MigrationAborted(describe(exc), code)
            err.report = self.report  # type: ignore[attr-defined]
            raise err from exc
        finally:
            SENDING.discard(str(self.opts.migration_id))
            if self.throttle.pct:  # every exit path: never leave the workload throttled
                await self.throttle.end()
            self.report.total_time_s = time.monotonic() - self._t0
            if self._reader is not None:
                self._reader.cancel()
            if self.chan is not None:
                self.chan.close()
            if self.tracker is not None:
                self.tracker.close()
            if self.mem is not None:
                clear_exception_frames(sys.exc_info()[1])  # their views of the region: see there
                self.mem.close()
            self._hash_pool.shutdown(wait=False)
            self._outer_pool.shutdown(wait=False)
            if self._guardian is not None:
                self._guardian.close()  # the workload is settled, one way or the other

    async def _rollback(self, exc: BaseException) -> AbortCode:
        """Undo what can be undone; returns the abort code of the failure."""
        await self.throttle.end()  # first: the workload must run again
        self.report.outcome = "aborted"
        self.report.error = describe(exc)
        code = exc.code if isinstance(exc, PrecopyError) else AbortCode.INTERNAL
        if isinstance(exc, asyncio.CancelledError):
            code = AbortCode.CANCELLED
        if self.chan is not None and not isinstance(exc, PeerAborted):
            await self.chan.abort(code, self.report.error)
        if self.paused:
            try:
                await self.workload.resume()
                self.paused = False
                self.report.paused_ms = (time.monotonic() - self._t_pause) * 1e3
                if self._guardian is not None:
                    self._guardian.declare(IDLE)
                _log.warning("rolled back: workload resumed on the source")
            except PrecopyError as rexc:
                self.report.error += f"; and resuming the workload failed: {rexc}"
                _log.error("rollback could not resume the workload: %s", rexc)
        return code

    # -- the migration --------------------------------------------------

    async def _migrate(self) -> None:
        opts = self.opts
        self.mem = GuestMemory.open(opts.memory, writable=False)
        mem = self.mem
        spec = getattr(self.workload, "guardian_spec", None)
        if opts.guardian and spec is not None:
            self._guardian = Guardian({
                "workload": spec(), "on_commit": opts.on_commit,
                "outcome": {"host": opts.host, "port": opts.port, "migration_id": opts.migration_id,
                            "key": opts.auth_key.hex() if opts.auth_key else None,
                            "tls": opts.tls_files if opts.tls_context is not None else None,
                            "retries": opts.outcome_retries, "connect_timeout": opts.connect_timeout_s,
                            "io_timeout": opts.io_timeout_s},
            })
            self.throttle.guardian = self._guardian
        self.report.region_bytes = mem.size
        self.record = PageRecord.empty(mem.npages)
        # Chunks of 128 KiB by default: big enough for xxh3 to run at memory
        # speed with the GIL released, small enough that few clean pages are
        # rehashed inside a chunk that changed.  Larger for huge regions, so
        # one digest table fits a frame.
        self.chunk_pages = opts.chunk_pages
        while -(-mem.npages // self.chunk_pages) * 8 > MAX_PAYLOAD:
            self.chunk_pages *= 2
        await self._choose_tracking()

        sock = await connect(opts.host, opts.port, opts.connect_timeout_s, retry_refused=True)
        self.chan = make_channel(sock, Role.SOURCE, opts.tls_context, opts.host)
        self.chan.send_timeout_s = opts.io_timeout_s
        self.report.source = "%s:%d" % sock.getsockname()[:2]
        await self._handshake(self.chan)
        self.exchange.chan = self.chan
        self._reader = asyncio.create_task(self.exchange.read_loop())

        # An adapter may declare what the guest needs on the destination
        # (precopy.session.preflight): checked there before any page moves.
        requirements = getattr(self.workload, "requirements", None)
        requires = dict(requirements()) if callable(requirements) else {}
        await self.exchange.send(Begin(
            migration_id=str(opts.migration_id), name=str(opts.name), size=mem.size,
            chunk_pages=self.chunk_pages, dry_run=opts.dry_run, requires=requires, wait=not opts.dry_run,
        ))
        ready = await self._wait_ready()
        self.report.dest_region = "existing" if ready.existing else "new"
        if opts.dry_run:
            _log.info("preflight of %s (%d MiB) -> %s: the destination accepts it", opts.memory,
                      mem.size >> 20, self.report.destination)
            return
        _log.info("migration %s: %s (%d MiB) -> %s", opts.migration_id, opts.memory,
                  mem.size >> 20, self.report.destination)

        await self._arm_tracking()  # (stop-and-copy has no tracker to arm)
        self._make_sender_and_scanner()
        if opts.mode == "stop-and-copy":
            # The baseline (Quick Migration, CRIU): pause first, then the
            # final pass finds every page that differs from the (empty)
            # destination and sends it while the workload is stopped.
            await self._switchover(self._expected(mem.npages), None)
            return
        await self._full_copy()
        expected, dest_table = await self._iterate()
        await self._switchover(expected, dest_table)

    async def _wait_ready(self) -> Ready:
        """READY, after any time in the destination's queue (QUEUED: position, keep-alive).

        The time queued is the report's ``queued_s``; it counts toward
        neither the downtime estimate nor ``--max-time`` (nothing moves, the
        workload runs on untouched).
        """
        t = time.monotonic()
        ev = await self.exchange.expect((Ready, Queued))
        if isinstance(ev, Queued):
            _log.info("migration %s: queued at the destination, position %d (%d of %d moving bytes there)",
                      self.opts.migration_id, ev.position, ev.active, ev.limit)
        while isinstance(ev, Queued):
            self._emit("queued", 0, 0, 0, 0, t, queue_position=ev.position)
            # QUEUED comes every couple of seconds: a shorter --io-timeout must not end the wait.
            ev = await self.exchange.expect((Ready, Queued), timeout_s=max(self.opts.io_timeout_s, 10.0))
            self.report.queued_s = time.monotonic() - t
        SENDING.add(str(self.opts.migration_id))
        self.contention.measure(self.exchange.dest_peers)  # the first round's contention counts from here
        assert isinstance(ev, Ready)
        return ev

    async def _handshake(self, chan: Channel) -> None:
        self.exchange.rtt = await handshake(chan, self.opts.auth_key, self.opts.io_timeout_s)

    def _emit(self, phase: str, rnd: int, done: int, todo: int, dirty: int, t_start: float,
              queue_position: int = 0) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        rate = done * PAGE_SIZE / (now - t_start) if now > t_start else 0.0
        left = (todo - done) * PAGE_SIZE
        self.progress(Progress(
            phase=phase, round=rnd, pages_done=done, pages_todo=todo, dirty_pages=dirty,
            bandwidth_bps=self.link.bytes_per_second, dirty_rate_pps=self.dirty_rate.pages_per_second,
            expected_downtime_ms=(self.policy.history[-1] * 1e3 if self.policy.history else None),
            elapsed_s=now - self._t0, eta_s=left / rate if rate else None, page_rate_bps=rate,
            throttle_pct=self.throttle.pct, queue_position=queue_position,
        ))

    # -- the page sender and the dirty scanner ------------------------------

    @property
    def _by_page(self) -> bool:
        """Chunk tables by page: the record holds every page's digest as last read (the scan hashed them)."""
        return self.chunks is not None and self.chunks.by_page

    async def _choose_tracking(self) -> None:
        assert self.mem is not None
        self.tracker, reason = await choose_tracker(self.opts.tracking, self.opts.mode, self.workload, self.mem)
        self._set_tracking(reason)

    def _set_tracking(self, reason: str) -> None:
        self.report.tracking = "digest" if self.tracker is None else self.tracker.name
        self.policy.tracked = self.tracker is not None
        self.report.tracking_reason = reason
        # A guest that could have offered tracking and did not is worth a
        # warning; a SIGSTOP workload never can.
        log = (_log.warning if self.tracker is None and self.opts.tracking == "auto"
               and self.opts.mode == "precopy" and hasattr(self.workload, "offer_tracking") else _log.info)
        log("dirty tracking: %s (%s)", self.report.tracking, reason)

    async def _arm_tracking(self) -> None:
        """Arm the kernel tracker before the first page is read; digests if that fails."""
        assert self.mem is not None
        if self.tracker is not None:
            try:
                arm_s = await asyncio.get_running_loop().run_in_executor(self._outer_pool, self.tracker.arm)
            except (TrackingUnavailable, OSError) as exc:
                self.tracker.close()
                self.tracker = None
                if self.opts.tracking == "uffd-wp":
                    raise PrecopyError(f"--tracking uffd-wp: arming failed: {exc}", AbortCode.GUEST) from exc
                self._set_tracking(f"arming kernel write tracking failed ({exc}); using digests")
            else:
                self.chunks = SourceChunks(self.mem, self.chunk_pages, self._hash_pool)
                _log.debug("write tracking armed in %.1f ms", arm_s * 1e3)

    def _make_sender_and_scanner(self) -> None:
        """The page sender and the dirty scanner (the kernel's, once armed; digests otherwise)."""
        assert self.mem is not None
        self.sender = PageSender(
            self.exchange, self.mem, self.record, batch_pages=self.opts.batch_pages,
            chunk_pages=self.chunk_pages, compressor=self.compressor, link=self.link, report=self.report,
            tracker=self.tracker, chunks=self.chunks, progress=self._emit if self.progress is not None else None)
        digests = DigestScanner(self.exchange, self.mem, self.record, self.chunk_pages, link=self.link,
                                pool=self._outer_pool, hash_pool=self._hash_pool)
        self.scanner = digests
        if self.tracker is not None and self.chunks is not None:
            self.scanner = TrackedScanner(digests, self.tracker, self.chunks, report=self.report,
                                          near_switchover=lambda pages: self._near_switchover(pages))

    async def _full_copy(self) -> None:
        assert self.mem is not None
        t = time.monotonic()
        rnd = RoundReport(round=0, kind="full", pages_scanned=self.mem.npages,
                          pages_dirty=self.mem.npages, pages_sent=0, zero_pages=0,
                          bytes_on_wire=0, seconds=0.0)
        existing = self.report.dest_region == "existing"
        await self.sender.send_all(rnd, self.scanner.held_already if existing else None)
        if self.tracker is not None:
            # Mapping a page in reads it: one sent, then punched, then mapped
            # in is allocated again as zeros, a hole no scan's hole check sees
            # and no rehash reads (it was not written).  The first comparison
            # reads every page and finds it, if the map-in (a thread that a
            # busy machine may starve past the full copy) is done by then.
            await asyncio.get_running_loop().run_in_executor(self._outer_pool, self.mem.prep.wait_map_in)
        rnd.seconds = time.monotonic() - t
        rnd.bandwidth_bps = self.link.bytes_per_second
        self.report.rounds.append(rnd)
        self._last_scan_t = t
        self._emit("full copy", 0, self.mem.npages, self.mem.npages, 0, t)  # shown even when it was quick

    def _near_switchover(self, pages: int) -> bool:
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

    def _round_s(self, pages: int) -> float:
        """Seconds a round that sends ``pages`` would take: the send plus a scan."""
        ratio = self.compressor.ratio if self.compressor.active else 1.0
        return pages * PAGE_SIZE * ratio / max(self.link.bytes_per_second, 1.0) + self._last_scan_s

    def _overhead_s(self) -> float:
        """The pause's fixed costs: pausing, round trips, the commit and the resume."""
        # A workload may declare what pausing and resuming it costs (a VMM's
        # device-state save and load).
        return 0.002 + 2 * self.exchange.rtt + float(getattr(self.workload, "switchover_cost_s", 0.0))

    def _rest_s(self, pages_left: int, device_state_bytes: int = 0) -> float:
        """What a pause is expected to take from here until the commit is confirmed, with
        ``pages_left`` pages and ``device_state_bytes`` still to send: the downtime cap's guess."""
        split: dict[str, float] = {}
        self._expected(pages_left, device_state_bytes, final_scan_s=0.0, split=split)
        return (split["final_pages"] + split["verify"] + split["overhead"]) / 1e3

    def _cap_check(self, step: str, rest_s: float) -> None:
        """Before a switchover step: roll back (raise) if the pause would pass ``--max-downtime-ms``."""
        if self._cap is None:
            return
        try:
            self._cap.check(step, rest_s)
        except DowntimeCapExceeded:
            self.report.cap_hit = step
            raise

    def _margin(self, split: dict[str, float], later: int, scan_estimate: float) -> Margin:
        """The switchover's margin for an expected downtime made of ``split`` (ms, from
        :meth:`_expected`), ``later`` of its pages dirtied until the pause, and a final scan
        estimated from a live scan cost of ``scan_estimate`` s (see switchover_margin)."""
        link = self.link
        paused_bps = link.paused_bytes_per_second
        ratio = self.compressor.ratio if self.compressor.active else 1.0
        later_s = later * PAGE_SIZE * ratio / max(paused_bps, 1.0)
        parts = {
            "final_scan": Part(split["final_scan"] / 1e3, scan_estimate, self._scan_samples),
            # The pages' time goes as 1 / the paused rate; the rate samples
            # are the live ones with the waits taken out (what it is made of).
            "final_pages": Part(split["final_pages"] / 1e3, paused_bps, link.free_samples, inverse=True),
            # Of those pages, the ones dirtied until the pause go with the dirty rate.
            "dirtied": Part(later_s, self.dirty_rate.pages_per_second, self._dirty_samples),
            # Round trips and fixed costs: no live samples (the handshake's two).
            "verify": Part(split["verify"] / 1e3, self.exchange.rtt),
            "overhead": Part(split["overhead"] / 1e3, self.exchange.rtt),
        }
        whole = {
            # The pause may send no faster than the live rounds did ...
            "speedup": split["final_pages"] / 1e3 * max(paused_bps / max(link.bytes_per_second, 1.0) - 1.0, 0.0),
        }
        if self.tracker is not None and self.report.rounds and self.report.rounds[-1].send_seconds > 0:
            # ... and a kernel scan taken at its CPU time may wait for a CPU
            # as long as the last round's sends did (other processes hold it).
            last = self.report.rounds[-1]
            waited = min(last.send_cpu_wait_seconds / last.send_seconds, 0.75)
            whole["cpu"] = split["final_scan"] / 1e3 * waited / (1 - waited)
        budget_s = self.opts.downtime_ms / 1e3
        if self.opts.headroom == "fixed":
            fixed = budget_s * (1 - self.policy.headroom)
            return Margin(fixed, budget_s - fixed, {}, "fixed")
        return switchover_margin(parts, budget_s, whole=whole, fixed_share=self.policy.headroom)

    def _report_margin(self, margin: Margin) -> None:
        self.report.switchover_margin_ms = margin.margin_s * 1e3
        self.report.margin_parts_ms = {k: v * 1e3 for k, v in margin.parts_s.items()}
        self.report.margin_basis = margin.basis

    def _expected(self, remaining_pages: int, device_state_bytes: int = 0,
                  final_scan_s: float | None = None, split: dict[str, float] | None = None) -> float:
        """Expected downtime if the workload were paused now (seconds); ``split`` gets its parts in ms."""
        verify_s = 0.0
        assert self.mem is not None
        nchunks = -(-self.mem.npages // self.chunk_pages)
        tracked = self.chunks is not None and self.chunks.table is not None
        if tracked or remaining_pages:
            # Verification (always with a tracker; with digests after pages
            # were sent paused): a round trip, the destination's chunk table
            # back, and first its rehash of every chunk written since its
            # last refresh -- those of the pages still to send (the last
            # round's were settled while it ran: _settle).
            # Scattered pages cost a whole chunk each: with 500 pages that
            # was most of a 30 ms pause.
            # By page, the destination hashes each page as it lands (part of
            # sending it) and derives chunk digests from page digests at
            # ~0.2 us a chunk: counting a page hash a page here put 9-10 ms
            # of a 200,000 pages/s guest's pause in verify, which took 2.
            stale = 0 if self._by_page else min(remaining_pages + self._unsettled, nchunks)
            verify_s = (self.exchange.rtt + nchunks * 8 / max(self.link.paused_bytes_per_second, 1.0)
                        + stale * self._chunk_hash_s)
        scan_s = self._last_scan_s if final_scan_s is None else final_scan_s
        overhead_s = self._overhead_s()
        pages_s = expected_downtime(
            remaining_pages=remaining_pages,
            bandwidth_bps=self.link.paused_bytes_per_second,
            compress_ratio=self.compressor.ratio if self.compressor.active else 1.0,
            device_state_bytes=device_state_bytes,
        )
        if split is not None:
            split.update(final_scan=scan_s * 1e3, final_pages=pages_s * 1e3, verify=verify_s * 1e3,
                         overhead=overhead_s * 1e3)
        return verify_s + pages_s + scan_s + overhead_s

    async def _iterate(self) -> tuple[float, np.ndarray]:
        """Iterative rounds until the policy says switch over.

        Returns the expected downtime and the destination's chunk digests
        from the last scan, which stay current: nothing is sent after it.
        """
        assert self.mem is not None
        rounds_done = 0
        while True:
            # Before the scan: time the destination still needs for the last
            # round is then part of the round (its writes are in the scan),
            # not a gap between the decision and the pause.
            await self._settled()
            held = await self.throttle.hold_for_scan()
            t = time.monotonic()
            scan = await self.scanner.scan(final=False)
            dirty, odd, dest_table = scan.dirty, scan.odd, scan.dest_table
            scan_s = time.monotonic() - t
            # The final scan costs the local chunk hash plus per-page hashing
            # of the candidate chunks; the round trip is in the overhead.
            # Take the slower of the last two scans: a single fast one (a
            # quiet moment on a shared machine) should not trigger a switchover.
            est = scanned_s = scan.hash_s + scan.page_hash_s
            nchunks = -(-self.mem.npages // self.chunk_pages)
            if scan.by_page:
                # The final scan hashes chunks, then the pages of those that
                # differ: what a scan by page would find dirty, at the least.
                chunk_pass = self._floor_scan_s if self._floor_scan_s != float("inf") else est
                est = chunk_pass + self.scanner.page_s * min(self.mem.npages, self.chunk_pages * len(dirty))
            else:
                self._chunk_hash_s = (self.chunks.scattered_page_s if self.chunks is not None
                                      else scan.hash_s / nchunks)
            self._last_scan_s = max(est, self._prev_scan_s)
            self._prev_scan_s = est
            interval = time.monotonic() - self._last_scan_t
            self._last_scan_t = t
            self.dirty_rate.add(len(dirty), interval)
            if interval > 0:
                self._dirty_samples = [*self._dirty_samples[-(_SPREAD_SAMPLES - 1):], len(dirty) / interval]
            todo = page_union(self.mem.npages, dirty, odd)
            # Switching over now leaves ``todo`` plus what the workload dirties
            # until it is paused (about one scan's time) for the pause.
            later = int(self.dirty_rate.pages_per_second * self._last_scan_s)
            self._recent_dirty = [*self._recent_dirty[-3:], len(dirty)]
            dirtied = len(dirty)
            ran_since = getattr(self.workload, "ran_since", None)
            if self.throttle.pct and ran_since is not None and ran_since(t):
                # A throttled workload writes in bursts: the quiet scan of a
                # stop phase says nothing of a run that came after it began.
                # Count what its recent runs dirtied, so as not to pause on it.
                stale = max(self._recent_dirty)
                later = max(later, stale)
                dirtied = min(self.mem.npages, dirtied + stale)
            if self.tracker is not None:  # the detection's CPU time drives the paused scan
                scan_sample = self.scanner.detect_cpu_s
                scan_estimate = max(self.scanner.detect_cpu_s, self._prev_detect_s)
            else:
                scan_sample, scan_estimate = scanned_s, self._last_scan_s
            self._scan_samples = [*self._scan_samples[-(_SPREAD_SAMPLES - 1):], scan_sample]
            final_scan_s = None
            if self.tracker is not None and self.chunks is not None and self.chunks.table is not None:
                # Paused, the tracker's scan rehashes only the chunks of what
                # is written from now to the pause (``todo``'s were rehashed
                # in this scan): its detection plus ``later`` pages' chunks,
                # not this scan's rehash of the whole dirty set.  Detection
                # is taken at the CPU time the last two live ones used (the
                # slower): their wall time includes waiting for a CPU the
                # workload and the destination held, which a pause gives
                # back -- 4.6-9.5 ms live for pauses that scanned in 1.7-2.8
                # (2,000 pages/s, measured ÷ expected 0.47-0.74).
                detect_s = max(self.scanner.detect_cpu_s, self._prev_detect_s)
                final_scan_s = detect_s + self.chunks.estimate(later)
                self._prev_detect_s = self.scanner.detect_cpu_s
            split: dict[str, float] = {}
            expected = self._expected(len(todo) + later, final_scan_s=final_scan_s, split=split)
            margin = self._margin(split, later, scan_estimate)
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
            if not scan.by_page and (self.tracker is None or len(dirty) <= max(2048, self.mem.npages // 100)):
                self._floor_scan_s = min(self._floor_scan_s, scan.hash_s)
            last = self.report.rounds[-1]
            # A workload that writes leaves pages for any pause, and so the
            # verification they bring: the floor counts one.
            floor = (self._expected(1 if len(dirty) else 0, final_scan_s=self._floor_scan_s)
                     if self._floor_scan_s != float("inf") else None)
            _log.debug("round %d: downtime floor %s (scan %.1f ms); %d pages dirtied while %d were sent",
                       rounds_done + 1, "unknown" if floor is None else f"{floor * 1e3:.1f} ms",
                       self._floor_scan_s * 1e3, len(dirty), last.pages_sent + last.zero_pages)
            contention = self.contention.measure(self.exchange.dest_peers)
            decision = self.policy.decide(
                rounds_done=rounds_done, elapsed_s=time.monotonic() - self._t0 - self.report.queued_s,
                expected_s=expected, contention=contention,
                floor_min_s=0.002 + float(getattr(self.workload, "switchover_cost_s", 0.0)),
                floor_s=floor, scan_s=self._floor_scan_s if floor is not None else None, dirtied_pages=dirtied,
                sent_pages=last.pages_sent + last.zero_pages, remaining_pages=len(todo),
                at_floor_scan_s=(self._expected(len(todo) + later, final_scan_s=self._floor_scan_s)
                                 if floor is not None else None),
                margin_s=margin.margin_s if self.opts.headroom == "spread" else None,
            )
            if (decision.action is Action.SWITCHOVER and self.tracker is not None
                    and rounds_done + 1 < self.policy.max_rounds
                    and (rounds_done == 0 and len(todo)
                         or len(todo) > max(_TRACKED_SHRINK_PAGES,
                                            2 * self.dirty_rate.pages_per_second * self._round_s(len(todo))))):
                # Tracked rounds cost a few ms: while sending the dirty set live
                # would at least halve it (the workload dirties ~rate x the next
                # round's time meanwhile), do that rather than send it paused.
                # The first round's set spans the full copy: never pause on it.
                decision = dataclasses.replace(decision, action=Action.CONTINUE,
                                               reason=decision.reason + "; one more tracked round first")
            if decision.action is Action.CONTINUE:
                await self.throttle.set(decision.throttle_pct, release=held)
            throttled = f", throttle {self.throttle.pct} %" if self.throttle.pct else ""
            _log.info("round %d: %d dirty pages, %.1f MB/s%s, %s", rounds_done + 1, len(dirty),
                      self.link.bytes_per_second / 1e6, throttled, decision.reason)
            if decision.action in (Action.SWITCHOVER, Action.FORCE):
                self.report.expected_phases_ms = split
                self._report_margin(margin)
            if decision.action is Action.SWITCHOVER:
                self._pending = todo
                return expected, dest_table
            if (decision.action is Action.FORCE and self._cap is not None
                    and expected > self._cap.cap_s):
                # Forcing would pause past the cap for sure: roll back without pausing at all.
                self.report.reason = decision.reason
                raise PrecopyError(
                    f"{decision.reason}; but the expected downtime {expected * 1e3:.1f} ms is over "
                    f"--max-downtime-ms {self._cap.cap_s * 1e3:g}: aborting without pausing",
                    AbortCode.NOT_CONVERGED)
            if decision.action is Action.FORCE:
                self.report.forced = True
                self.report.reason = decision.reason
                self._pending = todo
                return expected, dest_table
            if decision.action is Action.ABORT:
                self.report.reason = decision.reason
                raise PrecopyError(decision.reason, AbortCode.NOT_CONVERGED)
            if decision.wait_s > 0:
                # Contended: let it pass rather than add to it (the pages
                # found are still sent below: a tracker has re-armed them).
                await asyncio.sleep(decision.wait_s)
                self.contention.slept += decision.wait_s
            rounds_done += 1
            rnd = RoundReport(round=rounds_done, kind="iterative", pages_scanned=self.mem.npages,
                              pages_dirty=len(todo), pages_sent=0, zero_pages=0, bytes_on_wire=0,
                              seconds=0.0, scan_seconds=scan_s,
                              detect_seconds=scan.hash_s if self.tracker is not None else scanned_s,
                              dirty_rate_pps=self.dirty_rate.pages_per_second,
                              expected_downtime_ms=expected * 1e3, throttle_pct=self.throttle.pct)
            # With a tracker, scattered pages are gathered straight from
            # memory as cheaply as runs: filling gaps would only add bytes.
            await self.sender.send(todo, rnd, "iterating", fill=0 if self.tracker is not None else 1, live=True)
            if self.tracker is not None and len(todo):
                if self._near_switchover(len(todo)):
                    await self._settle()
                else:
                    # Far from a switchover the destination would rehash
                    # chunks the next round rewrites: it does when asked.
                    self._unsettled += len(todo)
            rnd.seconds = time.monotonic() - t
            rnd.bandwidth_bps = self.link.bytes_per_second
            self.report.rounds.append(rnd)
            self._emit("iterating", rounds_done, len(todo), len(todo), len(todo), t)

    # -- switchover -----------------------------------------------------

    async def _switchover(self, expected_s: float, dest_table: np.ndarray | None) -> None:
        """Pause, send what differs, device state, verify, commit.

        ``dest_table``: the destination's chunk digests from the last round
        (still current), or None to ask for them (stop-and-copy).
        """
        assert self.mem is not None
        phases: dict[str, float] = {}
        await self._settled()  # (already, normally: see _iterate)
        # Shown (and in a daemon's job) from here until the outcome: before
        # the pause is timed, so it costs the downtime nothing.
        self._emit("switchover", len(self.report.rounds), 0, 0, 0, time.monotonic())
        if self._guardian is not None:
            self._guardian.declare(ARMED)  # before the pause: a crash from here on resumes it
        t_pause = self._t_pause = time.monotonic()
        if self._cap is not None:
            self._cap.start()
        # The pause ends a throttle itself, stopping the workload straight
        # from it: ending it first would let the workload run (and dirty
        # pages inside the downtime) between its last stop and the pause.
        blob = await self.workload.pause()
        self.paused = True
        self.throttle.pct = 0
        t = time.monotonic()
        phases["pause"] = (t - t_pause) * 1e3
        phases.update(getattr(self.workload, "phases_ms", {}))  # e.g. QEMU's stop and save
        await self.exchange.send(Switchover())

        rnd = RoundReport(round=len(self.report.rounds), kind="final", pages_scanned=self.mem.npages,
                          pages_dirty=0, pages_sent=0, zero_pages=0, bytes_on_wire=0, seconds=0.0)
        # The downtime cap: before every step that still stands between the
        # pause and the commit, what is paused so far and what is expected to
        # follow must stay within it; else roll back.  The last check is right
        # before COMMIT: after it, the commit stands whatever the time.
        self._cap_check("final_scan", expected_s)
        final = await self.scanner.scan(final=True, dest_table=dest_table, pending=self._pending)
        dirty, odd, frozen = final.dirty, final.odd, final.live
        t2 = time.monotonic()
        phases["final_scan"] = (t2 - t) * 1e3
        rnd.scan_seconds = t2 - t
        rnd.detect_seconds = final.hash_s if self.tracker is not None else final.hash_s + final.page_hash_s
        rnd.pages_dirty = len(dirty)
        if odd.size:
            _log.warning("final pass: %d pages in chunks the destination holds differently "
                         "although our record says otherwise; resending them", len(odd))
            self.report.verify_repairs += len(odd)
        todo = page_union(self.mem.npages, dirty, odd)
        if todo.size:
            await self.sender.send(todo, rnd, "switchover",
                                   before_batch=lambda left: self._cap_check("final_pages",
                                                                             self._rest_s(left, len(blob))))
        t3 = time.monotonic()
        phases["final_pages"] = (t3 - t2) * 1e3

        self._cap_check("device_state", self._rest_s(0, len(blob)))
        self.report.device_state_bytes = len(blob)
        view = memoryview(blob)
        for off in range(0, max(len(blob), 1), MAX_PAYLOAD):
            piece = view[off:off + MAX_PAYLOAD]
            rnd.bytes_on_wire += await self.exchange.send(DeviceState(offset=off, total=len(blob), data=piece))
        t4 = time.monotonic()
        phases["device_state"] = (t4 - t3) * 1e3

        # Verify: the destination's chunk table must equal our frozen one.
        # (Digests: a final scan that found nothing to send has just compared
        # both tables.  A tracker compares nothing by itself: always verify.)
        if todo.size or self.tracker is not None:
            for attempt in range(3):
                self._cap_check("verify", self._rest_s(0))
                bad = await self._verify(frozen)
                if bad.size and self.chunks is not None:
                    bad = await self._recheck(frozen, bad)
                if not bad.size:
                    break
                _log.warning("verification: %d chunks differ; repairing (attempt %d)", bad.size, attempt + 1)
                cp = self.chunk_pages
                pages = (bad[:, None] * cp + np.arange(cp)).ravel()
                pages = pages[pages < self.mem.npages].astype(np.uint32)
                self.report.verify_repairs += len(pages)
                await self.sender.send(pages, rnd, "repair",
                                       before_batch=lambda left: self._cap_check("verify", self._rest_s(left)))
            else:
                raise PrecopyError("destination memory still differs after 3 repairs",
                                   AbortCode.VERIFY_FAILED)
        t5 = time.monotonic()
        phases["verify"] = (t5 - t4) * 1e3
        rnd.seconds = t5 - t
        self.report.rounds.append(rnd)

        self._cap_check("commit", self._overhead_s())
        if self._guardian is not None:
            self._guardian.declare(COMMIT)  # from here on a crash must ask, never resume blindly
        done = await self.committer.commit(self.exchange.send, self.exchange.expect, _h64(blob), self.chan)
        if done is not None:
            phases.update({f"dest_{k}": v for k, v in done.timings.items()})
        t6 = time.monotonic()
        phases["commit"] = (t6 - t5) * 1e3
        self.report.downtime_ms = self.report.paused_ms = (t6 - t_pause) * 1e3
        if self._cap is not None and self._cap.passed():
            # Too late to roll back: the destination may own the workload (DESIGN invariant 3).
            self.report.cap_hit = "after_commit"
            _log.warning("the pause passed --max-downtime-ms %g after COMMIT was sent (%.1f ms): "
                         "the commit stands", self._cap.cap_s * 1e3, self.report.downtime_ms)
        # stop-and-copy pauses before anything is measured: no estimate decided it
        self.report.expected_downtime_ms = expected_s * 1e3 if self.opts.mode == "precopy" else None
        self.report.downtime_overshoot_ms = max(0.0, self.report.downtime_ms - self.opts.downtime_ms)
        self.report.bandwidth_bps = self.link.bytes_per_second
        self.report.phases_ms = phases
        self.paused = False  # it is the destination's now
        if self._guardian is not None:
            self._guardian.declare(IDLE)
        if self.opts.on_commit == "kill":
            try:
                await self.workload.stop()
            except PrecopyError as exc:
                _log.warning("committed, but stopping the source workload failed: %s", exc)
        _log.info("committed: downtime %.1f ms (expected %.1f ms)", self.report.downtime_ms, expected_s * 1e3)

    async def _settle(self) -> None:
        """Ask the destination for its table after a tracked round's pages (answer: :meth:`_settled`).

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
        self._settle_seq = await self.exchange.request(by_page=self._by_page)
        self._unsettled = 0

    async def _settled(self) -> None:
        """Wait for the answer to :meth:`_settle`, if one is due (its table itself is not needed)."""
        if self._settle_seq is None:
            return
        t = time.monotonic()
        await self.exchange.expect_table(self._settle_seq)
        self._settle_seq = None
        _log.debug("destination settled %.1f ms after the scan", (time.monotonic() - t) * 1e3)

    async def _verify(self, frozen: np.ndarray) -> np.ndarray:
        seq = await self.exchange.request(final=True, by_page=self._by_page)
        t = time.monotonic()
        table = await self.exchange.expect_table(seq)
        self._dest_table = table.digests
        bad = np.flatnonzero(frozen != table.digests)
        _log.debug("verification: the destination's table in %.1f ms, %d chunks differ",
                   (time.monotonic() - t) * 1e3, bad.size)
        return bad

    async def _recheck(self, frozen: np.ndarray, bad: np.ndarray) -> np.ndarray:
        """Rehash our ``bad`` chunks from the paused region; returns those the destination really lacks.

        With a tracker our table is kept current from its reports; a race the
        kernel cannot report (a hole punched over a fresh write) can leave a
        chunk digest stale while the destination is right.
        """
        assert self.mem is not None and self.chunks is not None
        frozen[bad] = await asyncio.get_running_loop().run_in_executor(
            self._outer_pool, self.chunks.recompute, bad, self.record.sent)
        still: np.ndarray = bad[frozen[bad] != self._dest_table[bad]]
        if still.size < bad.size:
            _log.info("verification: %d chunk digests of ours were stale (holes punched while tracked); "
                      "the destination holds them right", bad.size - still.size)
        return still


async def migrate(opts: SourceOptions, workload: Workload,
                  progress: Callable[[Progress], None] | None = None) -> MigrationReport:
    """Live-migrate the region ``opts.memory`` used by ``workload``.

    Returns the report of a committed migration.  Raises
    :class:`~precopy.errors.MigrationAborted` (rolled back; the workload runs
    on the source) or :class:`~precopy.errors.MigrationInDoubt` (left paused).
    The exception's ``report`` attribute holds the report either way.
    """
    return await SourceSession(opts, workload, progress).run()

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

This module is the phase driver (:meth:`SourceSession._migrate` lists the
phases).  The work of each phase lives in an object of its own, which
tests drive without sockets: the handshake (:mod:`precopy.session.handshake`),
the page sender (:mod:`precopy.session.sender`), the dirty scanner
(:mod:`precopy.session.scanner` for digests, :mod:`precopy.session.tracked`
for kernel tracking, behind one interface), the record of what the
destination holds (:mod:`precopy.session.record`), the exchange of events
with the destination (:mod:`precopy.session.exchange`), the rounds
(:mod:`precopy.session.rounds`) with the downtime model
(:mod:`precopy.session.estimate`), auto-converge
(:mod:`precopy.session.throttle`) and contention
(:mod:`precopy.session.contention`), the switchover
(:mod:`precopy.session.switchover`), the committer with the outcome query
(:mod:`precopy.session.commit`) and the report builder
(:mod:`precopy.session.reporting`).  The options and the progress shown are
in :mod:`precopy.session.options`; the stop policy stays pure in
:mod:`precopy.policy.switchover`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Callable

import numpy as np

from precopy.errors import AbortCode, MigrationAborted, MigrationInDoubt, PrecopyError
from precopy.memory.region import GuestMemory, clear_exception_frames
from precopy.memory.tracking import SourceChunks, TrackingUnavailable, UffdTracker
from precopy.net.channel import Channel, PeerAborted, connect
from precopy.net.tls import make_channel
from precopy.policy.downtime import DowntimeCap
from precopy.policy.switchover import DirtyRateEstimator, LinkEstimator, SwitchoverPolicy
from precopy.protocol import MAX_PAYLOAD, PAGE_SIZE, Begin, Queued, Ready, Role
from precopy.protocol.compress import AdaptiveCompressor
from precopy.session.commit import Committer, OutcomeTarget, describe
from precopy.session.contention import SENDING, ContentionMeter
from precopy.session.estimate import DowntimeModel
from precopy.session.exchange import Exchange
from precopy.session.guardian import IDLE, Guardian
from precopy.session.handshake import handshake
from precopy.session.options import Progress, SourceOptions
from precopy.session.postcopy_immediate import switch_over_at_once
from precopy.session.postcopy_source import lane_ahead, offered_caps, postcopy_modes, switch_over
from precopy.session.record import PageRecord
from precopy.session.report import MigrationReport, RoundReport
from precopy.session.reporting import in_doubt, new_report, record_aborted, record_commit
from precopy.session.rounds import Rounds
from precopy.session.scanner import DigestScanner, DirtyScanner, sample_match
from precopy.session.sender import PageSender
from precopy.session.streams import open_streams
from precopy.session.switchover import Switchover
from precopy.session.throttle import Throttle
from precopy.session.tracked import TrackedScanner, choose_tracker
from precopy.workload.base import Workload

__all__ = ["SourceOptions", "Progress", "migrate", "SourceSession"]

_log = logging.getLogger(__name__)


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
            throttle=opts.throttle, throttle_ramp=opts.throttle_ramp, throttle_initial_pct=opts.throttle_initial_pct,
            throttle_step_pct=opts.throttle_step_pct, throttle_max_pct=opts.throttle_max_pct,
        )
        self.link = LinkEstimator()
        self.dirty_rate = DirtyRateEstimator()
        self.compressor = AdaptiveCompressor(opts.compress)
        self.report = new_report(opts, workload.describe())
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
        self._sample: asyncio.Task[float] | None = None  # into an existing region: how stale it is
        #: What the destination holds, page by page; the page sender; the
        #: dirty scanner (digests or kernel tracking): made in _migrate.
        self.record: PageRecord
        self.sender: PageSender
        self.scanner: DirtyScanner
        self._t0 = 0.0
        #: The expected downtime and its margin, from what the rounds measure.
        self.model = DowntimeModel(
            self.policy, self.link, self.dirty_rate, self.compressor, lambda: self.exchange.rtt,
            budget_s=opts.downtime_ms / 1e3, headroom=opts.headroom,
            switchover_cost_s=float(getattr(workload, "switchover_cost_s", 0.0)))
        #: The iterative rounds (made in _migrate; None for stop-and-copy).
        self.rounds: Rounds | None = None
        self._hash_pool = ThreadPoolExecutor(2, thread_name_prefix="precopy-hash")
        self._outer_pool = ThreadPoolExecutor(1, thread_name_prefix="precopy-scan")
        self._guardian: Guardian | None = None
        self.tracker: UffdTracker | None = None
        self.chunks: SourceChunks | None = None

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
                doubt = in_doubt(self.report, exc, str(self.opts.migration_id))
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
            _drop(self._sample)  # (the migration failed before the full copy took it)
            if self.chan is not None:
                self.chan.close()
            if self.exchange.streams is not None:  # the extra connections
                self.exchange.streams.close(self.report, self.chan)
            if self.tracker is not None:
                self.tracker.close()
            if self.mem is not None:
                clear_exception_frames(sys.exc_info()[1])  # their views of the region: see there
                self.mem.close()
            self._hash_pool.shutdown(wait=False)
            self._outer_pool.shutdown(wait=False)
            if self._guardian is not None:
                self._guardian.close(detach=self.committer.postcopy_unfinished)  # settled (or: post-copy's guardian)

    async def _rollback(self, exc: BaseException) -> AbortCode:
        """Undo what can be undone; returns the abort code of the failure."""
        await self.throttle.end()  # first: the workload must run again
        error = record_aborted(self.report, exc)
        code = exc.code if isinstance(exc, PrecopyError) else AbortCode.INTERNAL
        if isinstance(exc, asyncio.CancelledError):
            code = AbortCode.CANCELLED
        if self.chan is not None and not isinstance(exc, PeerAborted):
            await self.chan.abort(code, error)
        if self.paused:
            try:
                await self.workload.resume()
                self.paused = False
                self.report.paused_ms = (time.monotonic() - self._t_pause) * 1e3
                if self._guardian is not None:
                    self._guardian.declare(IDLE)
                _log.warning("rolled back: workload resumed on the source")
            except PrecopyError as rexc:
                self.report.error = error + f"; and resuming the workload failed: {rexc}"
                _log.error("rollback could not resume the workload: %s", rexc)
        return code

    # -- the migration --------------------------------------------------

    async def _migrate(self) -> None:
        """The phases, in order (each one's work lives in its own object)."""
        opts = self.opts
        mem = self._open()
        if opts.postcopy == "immediate":  # post-copy before any copy: no tracking, no rounds
            return await switch_over_at_once(self, mem)
        await self._choose_tracking()
        # The tracker is armed (in a thread) while the connection is made: ~20 ms a GiB of
        # write-protecting and walking beside the destination's preparation of the region.
        arming = None if opts.dry_run or self.tracker is None else self._outer_pool.submit(self.tracker.arm)
        try:
            await self._connect(mem)  # handshake, BEGIN, READY (after any time queued)
        except BaseException:
            _settled(arming)
            raise
        if opts.dry_run:
            _log.info("preflight of %s (%d MiB) -> %s: the destination accepts it", opts.memory,
                      mem.size >> 20, self.report.destination)
            return
        _log.info("migration %s: %s (%d MiB) -> %s", opts.migration_id, opts.memory,
                  mem.size >> 20, self.report.destination)
        if self.report.dest_region == "existing" and opts.mode != "stop-and-copy":
            # How stale is it: asked now, the destination hashing its sample beside the arming.
            self._sample = asyncio.create_task(sample_match(self.exchange, mem, self.chunk_pages, self._hash_pool))
        await _arm_tracking(self, arming)  # (stop-and-copy has no tracker to arm)
        self._make_sender_and_scanner()
        self.model.region(mem.npages, self.chunk_pages, self.chunks)
        if opts.mode == "stop-and-copy":
            # The baseline (Quick Migration, CRIU): pause first, then the final pass finds every
            # page that differs from the (empty) destination and sends it while the workload is stopped.
            await self._switchover(self.model.expected(mem.npages), None, np.zeros(0, dtype=np.uint32))
            return
        self.rounds = self._make_rounds()
        await self._full_copy()
        expected, dest_table = await self.rounds.run()
        await switch_over(self, expected, dest_table)  # pre-copy's, or post-copy's (postcopy_source)

    def _open(self) -> GuestMemory:
        """Map the region (read-only), start the guardian, size the chunks; returns the region."""
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
        return mem

    async def _connect(self, mem: GuestMemory) -> None:
        """Connect, authenticate, start the reader, BEGIN; wait for READY."""
        opts = self.opts
        sock = await connect(opts.host, opts.port, opts.connect_timeout_s, retry_refused=True,
                             bind=next(iter(opts.bind), None))  # --bind: stream 0's too
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
            streams=1 if opts.dry_run else int(opts.streams or 1),
        ))
        ready = await self._wait_ready()
        self.report.dest_region = "existing" if ready.existing else "new"
        if ready.streams > 1:
            self.exchange.streams = await open_streams(opts, ready.streams, mem.size, self.chunk_pages)
        self.report.streams = ready.streams

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
        greeting = await handshake(chan, self.opts.auth_key, self.opts.io_timeout_s, caps=lane_ahead(offered_caps(self.opts), chan))
        self.exchange.rtt, self.exchange.caps, self.report.dest_version = greeting.rtt_s, greeting.caps, greeting.dest_version

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

    def _make_sender_and_scanner(self) -> None:
        """The page sender and the dirty scanner (the kernel's, once armed; digests otherwise)."""
        assert self.mem is not None
        self.sender = PageSender(
            self.exchange, self.mem, self.record, batch_pages=self.opts.batch_pages,
            chunk_pages=self.chunk_pages, compressor=self.compressor, link=self.link, report=self.report,
            tracker=self.tracker, chunks=self.chunks, progress=self._emit if self.progress is not None else None)
        self.sender.stripe = self.exchange.streams.stripe if self.exchange.streams is not None else 0
        digests = DigestScanner(self.exchange, self.mem, self.record, self.chunk_pages, link=self.link,
                                pool=self._outer_pool, hash_pool=self._hash_pool)
        digests.sampled = self._sample
        self.scanner = digests
        if self.tracker is not None and self.chunks is not None:
            self.scanner = TrackedScanner(digests, self.tracker, self.chunks, report=self.report,
                                          near_switchover=self._near_switchover)

    async def _full_copy(self) -> None:
        assert self.mem is not None
        t = time.monotonic()
        rnd = RoundReport(round=0, kind="full", pages_scanned=self.mem.npages,
                          pages_dirty=self.mem.npages, pages_sent=0, zero_pages=0,
                          bytes_on_wire=0, seconds=0.0)
        existing = self.report.dest_region == "existing"
        await self.sender.send_all(rnd, self.scanner.held_already if existing else None)
        if self.tracker is not None:
            # Mapping a page in reads it: one sent, then punched, then mapped in is allocated
            # again as zeros, a hole no scan's hole check sees and no rehash reads (it was not
            # written).  So with a tracker the full copy maps each run in just before its send,
            # no thread (PageSender._map_in_and_hash); were one running, it would be waited for
            # here, before the first scan.
            await asyncio.get_running_loop().run_in_executor(self._outer_pool, self.mem.prep.wait_map_in)
        rnd.seconds = time.monotonic() - t
        rnd.bandwidth_bps = self.link.bytes_per_second
        self.report.rounds.append(rnd)
        assert self.rounds is not None
        self.rounds.last_scan_t = t
        self._emit("full copy", 0, self.mem.npages, self.mem.npages, 0, t)  # shown even when it was quick

    def _near_switchover(self, pages: int) -> bool:
        """For the tracked scanner: whether the rounds are closing in on the switchover."""
        assert self.rounds is not None
        return self.rounds.near_switchover(pages)

    def _make_rounds(self) -> Rounds:
        """The iterative rounds, with the sender and the scanner they drive."""
        assert self.mem is not None
        return Rounds(
            workload=self.workload, policy=self.policy, model=self.model, throttle=self.throttle,
            contention=self.contention, report=self.report, link=self.link, dirty_rate=self.dirty_rate,
            exchange=self.exchange, scanner=self.scanner, sender=self.sender, npages=self.mem.npages,
            chunk_pages=self.chunk_pages, chunks=self.chunks, cap=self._cap, headroom=self.opts.headroom,
            t0=self._t0, emit=self._emit, postcopy=postcopy_modes(self.opts, self.exchange.caps))

    # -- switchover -----------------------------------------------------

    async def _switchover(self, expected_s: float, dest_table: np.ndarray | None, pending: np.ndarray) -> None:
        """Pause, final pass, device state, verify, commit (:mod:`precopy.session.switchover`); hand over.

        ``dest_table``: the destination's chunk digests from the last round
        (still current), or None to ask for them (stop-and-copy); ``pending``:
        the pages the last round decided on.
        """
        assert self.mem is not None
        sw = Switchover(
            workload=self.workload, guardian=self._guardian, throttle=self.throttle, exchange=self.exchange,
            scanner=self.scanner, sender=self.sender, record=self.record, model=self.model,
            committer=self.committer, report=self.report, cap=self._cap, npages=self.mem.npages,
            chunk_pages=self.chunk_pages, chunks=self.chunks, pool=self._outer_pool)
        if self.rounds is not None:
            await self.rounds.settled()  # (already, normally: see Rounds.run)
        # Shown (and in a daemon's job) from here until the outcome: before
        # the pause is timed, so it costs the downtime nothing.
        self._emit("switchover", len(self.report.rounds), 0, 0, 0, time.monotonic())
        blob = await sw.pause()
        self.paused, self._t_pause = True, sw.t_pause
        rnd, frozen, sent = await sw.final_pass(expected_s, dest_table, pending, len(blob))
        blob = await sw.state_and_verify(blob, frozen, sent, rnd)
        t_commit = await sw.commit(blob)
        # stop-and-copy pauses before anything is measured: no estimate decided it
        record_commit(self.report, paused_s=t_commit - sw.t_pause, phases_ms=sw.phases,
                      expected_s=expected_s if self.opts.mode == "precopy" else None,
                      budget_ms=self.opts.downtime_ms, bandwidth_bps=self.link.bytes_per_second, cap=self._cap)
        await self._hand_over(expected_s)

    async def _hand_over(self, expected_s: float) -> None:
        """Committed: the workload is the destination's; stop the source copy if asked to."""
        self.paused = False  # it is the destination's now
        if self._guardian is not None:
            self._guardian.declare(IDLE)
        if self.opts.on_commit == "kill":
            try:
                await self.workload.stop()
            except PrecopyError as exc:
                _log.warning("committed, but stopping the source workload failed: %s", exc)
        _log.info("committed: downtime %.1f ms (expected %.1f ms)", self.report.downtime_ms, expected_s * 1e3)


async def migrate(opts: SourceOptions, workload: Workload,
                  progress: Callable[[Progress], None] | None = None) -> MigrationReport:
    """Live-migrate the region ``opts.memory`` used by ``workload``.

    Returns the report of a committed migration.  Raises
    :class:`~precopy.errors.MigrationAborted` (rolled back; the workload runs
    on the source) or :class:`~precopy.errors.MigrationInDoubt` (left paused).
    The exception's ``report`` attribute holds the report either way.
    """
    return await SourceSession(opts, workload, progress).run()


async def _arm_tracking(s: SourceSession, arming: Future[float] | None) -> None:
    """The kernel tracker armed (``arming``: its :meth:`UffdTracker.arm` in a thread, started
    beside the connection) before the first page is read; digests if that failed."""
    assert s.mem is not None
    if s.tracker is None:
        return
    assert arming is not None
    try:
        try:
            arm_s = await asyncio.wrap_future(arming)
        except asyncio.CancelledError:
            _settled(arming)  # the tracker is closed next: not under the thread's feet
            raise
    except (TrackingUnavailable, OSError) as exc:
        s.tracker.close()
        s.tracker = None
        if s.opts.tracking == "uffd-wp":
            raise PrecopyError(f"--tracking uffd-wp: arming failed: {exc}", AbortCode.GUEST) from exc
        s._set_tracking(f"arming kernel write tracking failed ({exc}); using digests")
    else:
        s.chunks = SourceChunks(s.mem, s.chunk_pages, s._hash_pool)
        _log.debug("write tracking armed in %.1f ms", arm_s * 1e3)


def _drop(task: asyncio.Task[float] | None) -> None:
    """Cancel ``task`` if it still runs, else read its outcome (a failure is the migration's, told already)."""
    if task is not None:
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()


def _settled(job: Future[float] | None) -> None:
    """Wait for ``job`` (arming the tracker: tens of ms) to end, its outcome left unread: on a way
    out, before the tracker is closed."""
    if job is not None:
        wait_futures([job])

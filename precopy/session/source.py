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
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import xxhash

from precopy.net.channel import Channel, LinkError, PeerAborted, connect
from precopy.net.tls import make_channel
from precopy.protocol.compress import AdaptiveCompressor
from precopy.policy.downtime import DowntimeCap, DowntimeCapExceeded, Margin, Part, switchover_margin
from precopy.memory.digest import (
    ZERO_PAGE_DIGEST,
    StagingBuffer,
    chunk_digests,
    chunk_pages_of,
    page_difference,
    page_digests,
    page_union,
    sorted_distinct,
    region_chunk_digests,
)
from precopy.session.commit import Committer, OutcomeTarget, describe
from precopy.session.contention import SENDING, ContentionMeter, cpu_wait_s as _cpu_wait_s
from precopy.session.guardian import ARMED, COMMIT, IDLE, Guardian
from precopy.session.handshake import handshake
from precopy.session.options import Progress, SourceOptions
from precopy.session.throttle import Throttle
from precopy.errors import (
    AbortCode,
    MigrationAborted,
    MigrationInDoubt,
    PrecopyError,
    RemoteProtocolError,
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
from precopy.memory.tracking import SourceChunks, TrackingUnavailable, UffdTracker, select_tracker
from precopy.protocol import (
    MAX_BATCH_PAGES,
    MAX_PAGE_DIGEST_CHUNKS,
    MAX_PAYLOAD,
    PAGE_SIZE,
    Begin,
    DeviceState,
    DigestRequest,
    DigestTable,
    Pages,
    Queued,
    Ready,
    Role,
    Switchover,
    whole_chunks,
)
from precopy.workload.base import Workload

__all__ = ["SourceOptions", "Progress", "migrate", "SourceSession"]

_log = logging.getLogger(__name__)
#: With a tracker, a dirty set this small is sent paused rather than chased.
_TRACKED_SHRINK_PAGES = 64
#: With a tracker, chunk tables go by page (SourceChunks.to_pages) once a
#: rehash that is not deferred would hash this share of all chunks: a
#: writer scattered that widely pays a whole-region chunk hash a round on
#: each side, where by page it pays 4 KiB a page written (one page pass on
#: each side to switch, ~100-160 ms per GiB here, repaid in a few rounds).
_BY_PAGE_SHARE = 0.5
#: ... and from the first round's digest comparison when the full copy's
#: writes already cover this share of the chunks (both sides hash every
#: page once, instead of every chunk now and every page a round later).
_FIRST_BY_PAGE_SHARE = 0.5
_h64 = xxhash.xxh3_64_intdigest
#: Live samples of the scan's cost and of the dirty rate kept for their spread.
_SPREAD_SAMPLES = 8


def _written_fraction(changed: int, nchunks: int, chunk_pages: int) -> float:
    """The least fraction of a changed chunk's pages that were written.

    With ``changed`` of ``nchunks`` chunks differing, writes spread evenly
    over the pages (the sparsest way to change that many chunks) wrote a
    page with probability p where 1 - (1 - p) ** chunk_pages is the changed
    fraction; a changed chunk then holds p / changed-fraction written pages.
    Clustered writers (a sweep) write more of each.  2,000 random pages/s
    changed 87 % of a 256 MiB region's chunks in a 1 Gbit/s round: 7 % of
    their pages; sent whole, each round was ten times what was written.
    """
    if nchunks <= 0 or changed <= 0:
        return 0.0
    c = min(changed / nchunks, 1.0)
    if c >= 1.0:
        return 1.0  # any fraction from 1 / chunk_pages up: cannot tell
    p: float = 1.0 - (1.0 - c) ** (1.0 / chunk_pages)
    return p / c


@dataclass(frozen=True, slots=True, eq=False)
class _Scan:
    """What one comparison of our chunks with the destination's found."""

    dirty: np.ndarray  # pages whose content differs from what we last sent
    odd: np.ndarray  # pages of chunks that differ although no page digest does
    live: np.ndarray  # our chunk digests
    dest_table: np.ndarray  # the destination's chunk digests
    hash_s: float  # hashing our chunks
    page_hash_s: float  # hashing the pages of the chunks that differ
    whole: bool = False  # ``dirty`` is every page of the chunks that differ (a dense set)
    by_page: bool = False  # every page compared with its record, no chunk pass (_page_scan)


#: A scan sends the changed chunks whole when at least this fraction of
#: their pages were written, at the least (see _written_fraction) ...
_DENSE = 0.5
#: ... and, on a link slower than hashing pages, the bytes that sends for
#: nothing cost more than finding the pages: the fraction must then be over
#: 1 - link rate / this (bytes/s: hashing pages one by one, both sides).
_PAGE_HASH_BPS = 8e9
#: Runs at least this long are sent straight from memory (see _plan).
_DIRECT_RUN = 16


def _whole_need(link_bps: float) -> float:
    """The least fraction of a changed chunk's pages that must be written to send it whole."""
    return max(_DENSE, 1.0 - link_bps / _PAGE_HASH_BPS)


def _whole_chunks_pay(cand: np.ndarray, nchunks: int, chunk_pages: int, link_bps: float,
                      written_seen: float) -> bool:
    """Whether the changed chunks ``cand`` (ascending, of ``nchunks``) go whole.

    Sending a changed chunk whole spares hashing its pages one by one
    (GIL-bound, and the destination the same for pages without a record)
    but sends its clean pages too: it pays when most of each was written
    (see _written_fraction and _whole_need), or when the changed chunks lie
    in a few long runs where even writes would leave many (a sweep writes
    through them) and the link outruns page hashing by far.  Every chunk
    changed says nothing about how much of each -- a sweep writes them
    through, 200,000 random pages/s a third -- so ``written_seen``, the
    fraction of changed chunks' pages the last page pass found written,
    decides (sent whole on a guess, a uniform writer's rounds were four
    times what it wrote).
    """
    need = _whole_need(link_bps)
    c = len(cand) / nchunks if nchunks else 0.0
    if c >= 1.0:
        return written_seen >= need
    fast = need <= 0.9  # the link outruns hashing pages by far
    runs = 1 + int(np.count_nonzero(np.diff(cand) > 1))
    clustered = len(cand) >= 16 and runs <= max(2.0, 0.25 * len(cand) * (1.0 - c))
    return _written_fraction(len(cand), nchunks, chunk_pages) >= need or (fast and clustered)


def _plan(indices: np.ndarray, size: int, *, fill: int = 0,
          ordered: bool = False) -> Iterator[tuple[np.ndarray, bool]]:
    """``indices`` (ascending) in batches of at most ``size`` pages, each with
    whether it is one run to send straight from memory.

    Runs of at least ``_DIRECT_RUN`` pages -- after filling gaps of up to
    ``fill`` pages between pages of ``indices``, which are then sent too
    (a dense dirty set is mostly runs cut by a clean page here and there) --
    become their own batches; the rest is gathered into staged batches.

    ``ordered``: batches come in ascending order and no batch's span
    (first to last page) holds a page of another (scattered pages between
    two runs are batched apart), as :meth:`UffdTracker.rearm` needs;
    otherwise the scattered batches come first.
    """
    n = len(indices)
    if not n:
        return
    idx64 = indices.astype(np.int64)
    starts = np.flatnonzero(np.diff(idx64, prepend=-(fill + 2)) > fill + 1)
    ends = np.append(starts[1:], n)
    spans = idx64[ends - 1] - idx64[starts] + 1
    direct = spans >= _DIRECT_RUN

    def runs(a: int, b: int) -> Iterator[tuple[np.ndarray, bool]]:
        for lo in range(a, b + 1, size):
            yield np.arange(lo, min(lo + size, b + 1), dtype=np.uint32), True

    if ordered:
        pos = 0
        for s, e in zip(starts[direct].tolist(), ends[direct].tolist()):
            for lo in range(pos, s, size):
                yield indices[lo:min(lo + size, s)], False
            yield from runs(int(idx64[s]), int(idx64[e - 1]))
            pos = e
        for lo in range(pos, n, size):
            yield indices[lo:lo + size], False
        return
    if not direct.all():
        rest = indices[~np.repeat(direct, ends - starts)]
        for lo in range(0, len(rest), size):
            yield rest[lo:lo + size], False
    for a, b in zip(idx64[starts[direct]].tolist(), idx64[ends[direct] - 1].tolist()):
        yield from runs(a, b)


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
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._seq = 0
        self._t0 = 0.0
        self._rtt = 0.001
        self._last_scan_s = 0.0
        self._prev_scan_s = 0.0
        self._prev_detect_s = 0.0  # the CPU time of the tracker's detection in the scan before
        self._detect_cpu_s = 0.0  # of the tracker's last scan
        self._scan_detect_cpu_s = 0.0  # of the last round's detection (_track_scan)
        self._settle_seq: int | None = None  # a table asked for by _settle, not yet answered
        self._unsettled = 0  # pages sent since the destination last hashed what it holds (tracked)
        self._closing_in = False  # see _near_switchover
        self._dense = False  # the last digest scan found most chunks changed: scan by page (_page_scan)
        self._written_seen = 0.0  # of the pages of changed chunks, the fraction the last page pass found dirty
        self._page_s = 0.0  # hashing one page, as measured in the last scan that hashed pages
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
        self._asked: dict[int, float] = {}  # digest requests out: seq -> when sent (round trips)
        self._dest_peers = 0  # other migrations the destination receives, as its last table said

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
        #: Per page, the digest of what the destination holds, where ``known``:
        #: pages sent straight from memory are known once the destination
        #: has hashed them for a scan that needed them (see _scan).
        self.sent = np.zeros(mem.npages, dtype=np.uint64)
        self.known = np.zeros(mem.npages, dtype=bool)
        #: Per page, whether the destination is known to hold zeros there (a
        #: zero page was the last thing sent, or its digest says so).  Not
        #: the same as ``sent == ZERO_PAGE_DIGEST`` once chunk tables go by
        #: page: ``sent`` then holds what the region read as last (a hole
        #: read as zeros, then written and sent as data, still has the zero
        #: digest there).  The hole and zero checks of a tracker (a hole
        #: punched turns a page to zeros unreported) resend a page that
        #: reads as zeros where this is False.
        self.held_zero = np.zeros(mem.npages, dtype=bool)
        self.staging = StagingBuffer(opts.batch_pages)
        # Chunks of 128 KiB by default: big enough for xxh3 to run at memory
        # speed with the GIL released, small enough that few clean pages are
        # rehashed inside a chunk that changed.  Larger for huge regions, so
        # one digest table fits a frame.
        self.chunk_pages = opts.chunk_pages
        while -(-mem.npages // self.chunk_pages) * 8 > MAX_PAYLOAD:
            self.chunk_pages *= 2
        self.chunk_bytes = self.chunk_pages * PAGE_SIZE
        await self._choose_tracking()

        sock = await connect(opts.host, opts.port, opts.connect_timeout_s, retry_refused=True)
        self.chan = make_channel(sock, Role.SOURCE, opts.tls_context, opts.host)
        self.chan.send_timeout_s = opts.io_timeout_s
        self.report.source = "%s:%d" % sock.getsockname()[:2]
        await self._handshake(self.chan)
        self._reader = asyncio.create_task(self._read_loop())

        # An adapter may declare what the guest needs on the destination
        # (precopy.session.preflight): checked there before any page moves.
        requirements = getattr(self.workload, "requirements", None)
        requires = dict(requirements()) if callable(requirements) else {}
        await self._send_event(Begin(
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

        if opts.mode == "stop-and-copy":
            # The baseline (Quick Migration, CRIU): pause first, then the
            # final pass finds every page that differs from the (empty)
            # destination and sends it while the workload is stopped.
            await self._switchover(self._expected(mem.npages), None)
            return
        await self._arm_tracking()
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
        ev = await self._expect((Ready, Queued))
        if isinstance(ev, Queued):
            _log.info("migration %s: queued at the destination, position %d (%d of %d moving bytes there)",
                      self.opts.migration_id, ev.position, ev.active, ev.limit)
        while isinstance(ev, Queued):
            self._emit("queued", 0, 0, 0, 0, t, queue_position=ev.position)
            # QUEUED comes every couple of seconds: a shorter --io-timeout must not end the wait.
            ev = await self._expect((Ready, Queued), timeout_s=max(self.opts.io_timeout_s, 10.0))
            self.report.queued_s = time.monotonic() - t
        SENDING.add(str(self.opts.migration_id))
        self.contention.measure(self._dest_peers)  # the first round's contention counts from here
        assert isinstance(ev, Ready)
        return ev

    async def _handshake(self, chan: Channel) -> None:
        self._rtt = await handshake(chan, self.opts.auth_key, self.opts.io_timeout_s)

    async def _read_loop(self) -> None:
        assert self.chan is not None
        try:
            async for ev in self.chan.events():
                if isinstance(ev, DigestTable):
                    ev = DigestTable(seq=ev.seq, digests=ev.digests.copy(), others=ev.others)
                await self._events.put(ev)
            await self._events.put(LinkError(f"{self.chan.peer} closed the connection"))
        except (PrecopyError, OSError) as exc:
            await self._events.put(exc)

    async def _expect(self, typ: type | tuple[type, ...], timeout_s: float | None = None) -> Any:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that arrives as the awaited item completes, and this
        # runs every round, so a cancel (SIGINT, the daemon's cancel) could be
        # lost and the migration go on.
        timeout_s = self.opts.io_timeout_s if timeout_s is None else timeout_s
        name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        try:
            async with asyncio.timeout(timeout_s):
                ev = await self._events.get()
        except TimeoutError:
            raise LinkError(
                f"no answer from the destination within {timeout_s:.0f} s "
                f"(waiting for {name})", AbortCode.TIMEOUT,
            ) from None
        if isinstance(ev, BaseException):
            raise ev
        if not isinstance(ev, typ):
            raise RemoteProtocolError(f"expected {name} from the destination, got {type(ev).__name__}")
        return ev

    async def _expect_table(self, seq: int) -> DigestTable:
        """The next DIGEST_TABLE, which must answer request ``seq``."""
        table: DigestTable = await self._expect(DigestTable)
        if table.seq != seq:
            raise RemoteProtocolError(f"digest table {table.seq} answers request {seq}")
        asked = self._asked.pop(seq, None)
        if asked is not None:
            # An exchange is a round trip and then some: the round trip in
            # every estimate is the fastest seen.  The handshake's alone was
            # taken while many migrations started at once (eight on two
            # cores: ~0.1 s, a "floor" of ~350 ms for one of ~20 alone).
            self._rtt = max(min(self._rtt, time.monotonic() - asked), 1e-4)
        if table.others is not None:
            self._dest_peers = table.others
        return table

    def _check_peer(self) -> None:
        """Raise what the reader saw (an ABORT, a closed link) without waiting."""
        if not self._events.empty():
            ev = self._events.get_nowait()
            if isinstance(ev, BaseException):
                raise ev
            raise RemoteProtocolError(f"unexpected {type(ev).__name__} from the destination")

    async def _send_event(self, ev: Any) -> int:
        assert self.chan is not None
        if isinstance(ev, DigestRequest):
            self._asked[ev.seq] = time.monotonic()
        try:
            return await self.chan.send(ev)
        except LinkError:
            # The peer may have said why before closing: prefer its reason.
            await asyncio.sleep(0.05)
            self._check_peer()
            raise

    # -- sending pages --------------------------------------------------

    async def _send_pages(self, indices: np.ndarray, rnd: RoundReport, phase: str, *,
                          fill: int = 0, live: bool = False,
                          before_batch: Callable[[int], None] | None = None) -> None:
        """Send ``indices`` in batches; record digests of what was sent.

        A run of pages (``_DIRECT_RUN`` or more, see :func:`_plan`; ``fill``
        lets it bridge gaps of that many pages, sent too) that is not to be
        compressed is sent straight from the mapping -- no copy, no hashing:
        the kernel copies the pages into the socket, and the record of what
        it copied comes from the destination, which hashes what it received
        when a later scan needs it (:meth:`_scan`).  That is safe whatever
        the workload writes meanwhile: a page changed during the send differs
        at the next scan from what the destination holds, and is sent again.
        It is most of a full copy, and of a dense dirty set.  The other
        pages are staged (copied into the staging buffer), hashed per page
        from that copy (the record, DESIGN invariant 1), checked for zero
        pages, maybe compressed, and sent from the copy.

        ``live`` (the workload runs): with a kernel tracker, each batch's
        pages are re-protected just before they are read
        (:meth:`UffdTracker.rearm`), so that only writes after their send
        make them dirty again.

        ``before_batch(pages_left)`` is called before each batch (the
        downtime cap's check: it may raise).
        """
        assert self.mem is not None and self.chan is not None
        batch = self.opts.batch_pages
        rearm = self.tracker.rearm if live and self.tracker is not None else None
        t_start = time.monotonic()
        last_progress = last_sample = t_start
        # The link's rate is what it delivered: bytes written minus those
        # still queued in the socket (a round's first writes only fill the
        # send buffer; counting them would overstate the rate).
        unsent = self.chan.unsent_bytes
        sampled = self.report.bytes_on_wire - unsent()
        # Time this thread waited for a CPU: what a pause would give back
        # (LinkEstimator.paused_bytes_per_second).
        waited = _cpu_wait_s()
        # Re-protecting each batch (below) is work only a live round does:
        # like the waits, the pause gives its time back -- where we were the
        # slower end: time spent waiting for room in the socket (the
        # receiver slower) is not ours to speed up (a throttled sweep, whose
        # pause went at 1.1-1.2x the live rate, was taken at up to 2x).
        rearm_s = 0.0
        blocked = blocked_start = self.chan.send_blocked_s
        waited_start = waited

        def given_back(w: float, b: float) -> float:
            """Seconds of the sample since the last one that a pause would not spend."""
            return w - waited + max(0.0, rearm_s - (b - blocked))

        done = 0
        for idx, run in _plan(indices, batch, fill=fill, ordered=rearm is not None):
            if before_batch is not None:
                before_batch(len(indices) - done)
            tried = self.compressor.want()
            t_batch = time.monotonic()
            if rearm is not None:
                try:
                    rearm(idx)
                    rearm_s += time.monotonic() - t_batch
                except TrackingUnavailable as exc:
                    raise PrecopyError(f"kernel write tracking failed mid-migration: {exc}",
                                       AbortCode.GUEST) from exc
            if not run and not tried and self.tracker is not None:
                n, data_pages, zero_pages = await self._send_gathered(idx)
            elif run and not tried and not self._has_zero_page(idx):
                first = int(idx[0]) * PAGE_SIZE
                raw = self.mem.view[first:first + len(idx) * PAGE_SIZE]
                n = await self._send_event(Pages(indices=idx, zeros=idx[:0], payload=raw, checksum=None))
                if not self._by_page:
                    # No record until the destination gives one; never the zero
                    # page's (the tracker's hole check trusts a zero record).
                    self.sent[idx] = 0
                    self.known[idx] = False
                self.held_zero[idx] = False
                data_pages, zero_pages = len(idx), 0
            else:
                n, data_pages, zero_pages = await self._send_staged(idx, tried)
            now = time.monotonic()
            self.compressor.record(tried, data_pages * PAGE_SIZE, now - t_batch)
            done += len(idx)
            rnd.pages_sent += data_pages
            rnd.zero_pages += zero_pages
            rnd.bytes_on_wire += n
            self.report.bytes_on_wire += n
            self.report.pages_sent += data_pages
            self.report.zero_pages += zero_pages
            self._check_peer()
            if now - last_sample > 0.05:
                delivered = self.report.bytes_on_wire - unsent()
                w, b = _cpu_wait_s(), self.chan.send_blocked_s
                self.link.add(delivered - sampled, now - last_sample, given_back(w, b))
                sampled, last_sample, waited, rearm_s, blocked = delivered, now, w, 0.0, b
            if self.progress is not None and now - last_progress > 0.2:
                last_progress = now
                self._emit(phase, rnd.round, done, len(indices), rnd.pages_dirty, t_start)
        end = time.monotonic()
        rnd.send_seconds += end - t_start
        w = _cpu_wait_s()
        self.link.add(self.report.bytes_on_wire - unsent() - sampled, end - last_sample,
                      given_back(w, self.chan.send_blocked_s))
        rnd.send_cpu_wait_seconds += w - waited_start
        rnd.send_blocked_seconds += self.chan.send_blocked_s - blocked_start

    @property
    def _by_page(self) -> bool:
        """Chunk tables by page: the record holds every page's digest as last read (the scan hashed them)."""
        return self.chunks is not None and self.chunks.by_page

    def _has_zero_page(self, run: np.ndarray) -> bool:
        """Whether a run of pages holds an all-zero page (sent as a number, not 4 KiB).

        Looks at each page's first 8 bytes, then reads in full only those
        that start with zeros: a page of data is rejected after one cache
        line, which the send then reads anyway.
        """
        assert self.mem is not None
        lo, hi = int(run[0]), int(run[-1]) + 1
        heads = self.mem.words[lo * (PAGE_SIZE // 8):hi * (PAGE_SIZE // 8):PAGE_SIZE // 8]
        maybe = np.flatnonzero(heads == 0)
        return bool(maybe.size) and not bool(self.mem.pages[lo + maybe].any(axis=1).all())

    async def _send_gathered(self, idx: np.ndarray) -> tuple[int, int, int]:
        """Send scattered pages straight from memory, gathered by ``sendmsg``.

        With a kernel tracker the record of what was sent is not needed to
        find what changes (the kernel says; the final verification compares
        chunk tables of real memory), so scattered pages skip the staging
        copy and their hashing as runs do: the kernel copies them from the
        mapping into the socket, a buffer per run of pages.  Zero pages are
        found from their first 8 bytes (then read in full) and sent as
        numbers.  Returns (bytes written, data pages, zero pages).
        """
        assert self.mem is not None
        pos = idx.astype(np.int64)
        zero = np.zeros(len(idx), dtype=bool)
        maybe = np.flatnonzero(self.mem.words[pos * (PAGE_SIZE // 8)] == 0)
        if maybe.size:
            zero[maybe] = ~self.mem.pages[pos[maybe]].any(axis=1)
        data_idx, zero_idx = idx[~zero], idx[zero]
        d = pos[~zero]
        starts = np.flatnonzero(np.diff(d, prepend=-2) != 1)
        ends = np.append(starts[1:], len(d)) - 1
        view = self.mem.view
        bufs = ([view[a * PAGE_SIZE:(b + 1) * PAGE_SIZE] for a, b in zip(d[starts].tolist(), d[ends].tolist())]
                if len(d) else [])
        n = await self._send_event(Pages(indices=data_idx, zeros=zero_idx, payload=bufs, checksum=None))
        if not self._by_page:
            self.sent[data_idx] = 0  # no record: see _send_pages
            self.known[data_idx] = False
        self.sent[zero_idx] = ZERO_PAGE_DIGEST
        self.known[zero_idx] = True
        self.held_zero[data_idx] = False
        self.held_zero[zero_idx] = True
        return n, len(data_idx), len(zero_idx)

    async def _send_staged(self, idx: np.ndarray, compress: bool) -> tuple[int, int, int]:
        """Stage, hash, check for zeros, maybe compress, send one batch.

        Returns (bytes written, data pages, zero pages).
        """
        assert self.mem is not None
        staged = self.staging.load(self.mem.pages, idx)
        dig = self.staging.digests()
        zero = dig == ZERO_PAGE_DIGEST
        if zero.any():
            zero &= ~staged.any(axis=1)  # never trust a 64-bit digest for zero
        if zero.all():
            data_idx, zero_idx = idx[:0], idx
            raw = memoryview(b"")
        elif zero.any():
            keep = ~zero
            data_idx, zero_idx = idx[keep], idx[zero]
            raw = np.ascontiguousarray(staged[keep]).data.cast("B")
        else:
            data_idx, zero_idx = idx, idx[:0]
            raw = self.staging.view()
        # Whole chunks carry their chunk digests as the checksum: the
        # destination checks them and keeps them as its chunk table, one
        # pass over the bytes for both.
        cd = None
        checksum = 0
        if whole_chunks(data_idx, self.chunk_pages, self.mem.npages) is not None:
            cd = chunk_digests(raw, self.chunk_bytes)
        else:
            checksum = _h64(raw)
        payload: Any = raw
        compressed = False
        if compress and raw.nbytes:
            packed = self.compressor.compress(raw)
            if packed is not None and len(packed) <= MAX_PAYLOAD:
                payload, compressed = packed, True
        n = await self._send_event(Pages(indices=data_idx, zeros=zero_idx, payload=payload,
                                         compressed=compressed, checksum=checksum, chunk_digests=cd))
        self.sent[idx] = dig
        self.known[idx] = True
        self.held_zero[idx] = zero
        return n, len(data_idx), len(zero_idx)

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

    async def _full_copy(self) -> None:
        assert self.mem is not None
        t = time.monotonic()
        rnd = RoundReport(round=0, kind="full", pages_scanned=self.mem.npages,
                          pages_dirty=self.mem.npages, pages_sent=0, zero_pages=0,
                          bytes_on_wire=0, seconds=0.0)
        # Pages in holes of the file were never written: send them as zero
        # pages without reading (reading would allocate them on tmpfs).
        holes = self.mem.hole_pages()
        # Map the region's pages into our page tables ahead of the sends, in
        # a thread (MADV_POPULATE_READ, never the holes: that would allocate
        # them): a fault for every few pages, on the zero-page check's first
        # read or inside sendmsg, costs more than one call per 8 MiB. Into
        # an existing region, 1 GiB: full copy 0.47 -> 0.45 s (6 runs each).
        self.mem.prep.start_map_in(~holes)
        hole_idx = np.flatnonzero(holes).astype(np.uint32)
        for start in range(0, len(hole_idx), MAX_BATCH_PAGES):
            idx = hole_idx[start:start + MAX_BATCH_PAGES]
            n = await self._send_event(Pages(indices=idx[:0], zeros=idx, payload=b"", checksum=_h64(b"")))
            self.sent[idx] = ZERO_PAGE_DIGEST
            self.known[idx] = True
            self.held_zero[idx] = True
            rnd.zero_pages += len(idx)
            rnd.bytes_on_wire += n
            self.report.bytes_on_wire += n
            self.report.zero_pages += len(idx)
        data = np.flatnonzero(~holes).astype(np.uint32)
        if self.report.dest_region == "existing":
            same = await self._held_already(holes)
            if same is not None:
                self.sent[same] = 0  # no record of their own (see _held_already)
                rnd.pages_dirty -= int(same[data].sum())
                data = data[~same[data]]
                self.report.pages_already_there = self.mem.npages - rnd.pages_dirty
        await self._send_pages(data, rnd, "full copy", live=True)
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

    async def _held_already(self, holes: np.ndarray) -> np.ndarray | None:
        """Pages the destination's existing region already holds, as a per-page mask.

        A repeat migration finds most of the region there: only the chunks
        that differ need to move.  A sample of 64 chunks' page digests is
        asked for first; unless a quarter of its pages match, the region is
        taken for stale (a pre-provisioned file) and None returned at once,
        without hashing it here or there.  The pages skipped keep no record
        of their own (``known`` stays False): a later scan that finds their
        chunk changed asks the destination what it holds, as for pages sent
        straight from memory.
        """
        assert self.mem is not None
        cp, npages = self.chunk_pages, self.mem.npages
        nchunks = -(-npages // cp)
        sample = np.sort(np.random.default_rng().choice(nchunks, min(64, nchunks), replace=False)).astype(np.uint32)
        self._seq += 1
        await self._send_event(DigestRequest(seq=self._seq, pages_of=sample))
        pages = chunk_pages_of(sample, cp, npages)
        loop = asyncio.get_running_loop()
        live = await loop.run_in_executor(self._outer_pool, page_digests, self.mem.pages, pages)
        held = await self._expect_table(self._seq)
        match = float((live == held.digests).mean())
        if match < 0.25:
            _log.info("the destination's existing region is stale (%.0f %% of a sample matches): "
                      "sending every page", 100 * match)
            return None
        live, dest_table, _ = await self._chunk_tables(False, None)
        same = np.ones(npages, dtype=bool)
        cand = np.flatnonzero(live != dest_table)
        same[chunk_pages_of(cand, cp, npages)] = False
        same &= ~holes  # holes go as zero pages anyway
        _log.info("the destination already holds %d of %d pages (a repeat migration): sending the rest",
                  int(same.sum()), npages)
        return same

    # -- kernel write tracking ---------------------------------------------

    async def _choose_tracking(self) -> None:
        assert self.mem is not None
        if self.opts.mode == "stop-and-copy":
            self._set_tracking("stop-and-copy pauses first and compares every page: nothing to track")
            return
        try:
            self.tracker, reason = await select_tracker(self.opts.tracking, self.workload, self.mem)
        except TrackingUnavailable as exc:
            raise PrecopyError(str(exc), AbortCode.GUEST) from exc
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
        if self.tracker is None:
            return
        assert self.mem is not None
        try:
            arm_s = await asyncio.get_running_loop().run_in_executor(self._outer_pool, self.tracker.arm)
        except (TrackingUnavailable, OSError) as exc:
            self.tracker.close()
            self.tracker = None
            if self.opts.tracking == "uffd-wp":
                raise PrecopyError(f"--tracking uffd-wp: arming failed: {exc}", AbortCode.GUEST) from exc
            self._set_tracking(f"arming kernel write tracking failed ({exc}); using digests")
            return
        self.chunks = SourceChunks(self.mem, self.chunk_pages, self._hash_pool)
        _log.debug("write tracking armed in %.1f ms", arm_s * 1e3)

    async def _track_scan(self, *, final: bool) -> _Scan:
        """Ask the kernel which pages were written; keep our chunk table current.

        Live: the chunks of reported pages are rehashed now, so that paused,
        only the last scan's chunks are.  The first scan also runs the digest
        comparison with the destination once: it checks the tracker over the
        full copy and gives the starting chunk table.
        Returns ``dirty`` (with the final pass, also the pages decided on
        before the pause), ``live`` (our chunk table; current when paused),
        ``hash_s`` (detection) and ``page_hash_s`` (rehashing the reported
        pages' chunks, estimated for the first scan).
        """
        assert self.tracker is not None and self.chunks is not None and self.mem is not None
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        dirty = await self._tracker_scan()
        detect_s = time.monotonic() - t
        self._scan_detect_cpu_s = self._detect_cpu_s
        # Pages re-protected just before their send (UffdTracker.rearm) went
        # with their writes, but their chunks' digests must follow them.
        written = page_union(self.mem.npages, dirty, self.tracker.take_rewritten())
        if self.chunks.table is None:
            if len(self.chunks.chunks_of(dirty)) >= _FIRST_BY_PAGE_SHARE * len(self.chunks.stale):
                # Written all over during the full copy: compare by page at
                # once (see _first_compare_by_page) rather than hash every
                # chunk now and switch to pages a round or two later.
                found, late, extra = await self._first_compare_by_page(dirty)
                dirty = page_union(self.mem.npages, dirty, late, extra)
            else:
                digest = await self._scan(final=False)
                # What was written while we hashed is reported now: not taken
                # for writes the kernel missed (sent twice), and its chunks are
                # left stale until a rehash that is not deferred.
                late = await self._tracker_scan()
                self.chunks.adopt(digest.live, digest.hash_s)
                self.chunks.rehash(late, self.sent, defer=True, held_zero=self.held_zero)
                # Whole chunks (a dense set) compared no page: every page of
                # a chunk that differs goes, reported or not (one page
                # reported there says nothing of the others).
                found = page_union(self.mem.npages, digest.dirty, digest.odd)
                dirty = page_union(self.mem.npages, dirty, late)
            missed = page_difference(self.mem.npages, found, dirty)
            if missed.size:
                _log.info("first scan: %d pages differ from the destination (or share a chunk that does) "
                          "beyond the %d the kernel reported (holes punched, or writes the kernel did "
                          "not see): sending them too", missed.size, dirty.size)
                dirty = page_union(self.mem.npages, dirty, missed)
            rehash_s = self.chunks.estimate(len(dirty))
        else:
            # Far from a switchover (a fast writer), the chunks it dirtied
            # now would be dirtied again before the pause: their rehash waits.
            defer = not final and not self._near_switchover(len(dirty))
            spread = 0 if defer or final or self.chunks.by_page else self.chunks.would_rehash(written)
            if spread and spread >= _BY_PAGE_SHARE * len(self.chunks.table):
                # The switch hashes every page (what was written included).
                holes = self.mem.hole_pages(max_extents=4096)
                rehash_s, extra = await loop.run_in_executor(self._outer_pool, functools.partial(
                    self.chunks.to_pages, dirty, self.sent, self.known, holes, held_zero=self.held_zero))
                self.report.verification = "pages"
                _log.info("chunk tables by page from now on: %d pages written over %d of %d chunks "
                          "(switching took %.1f ms)", len(dirty), spread, len(self.chunks.table), rehash_s * 1e3)
            else:
                rehash_s, extra = await loop.run_in_executor(
                    self._outer_pool, functools.partial(self.chunks.rehash, written, self.sent, defer=defer,
                                                        sending=dirty, held_zero=self.held_zero))
            if extra.size:
                _log.info("%d unreported pages read as zeros although what was sent was not "
                          "(holes punched): sending them too", extra.size)
                dirty = page_union(self.mem.npages, dirty, extra)
        assert self.chunks.table is not None
        if final:
            dirty = page_union(self.mem.npages, self._pending, dirty)
        empty = np.zeros(0, dtype=np.uint32)
        return _Scan(dirty, empty, self.chunks.table, np.zeros(0, dtype=np.uint64), detect_s, rehash_s)

    async def _first_compare_by_page(self, dirty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first digest comparison, by page: both sides switch to chunk tables by page.

        ``dirty``: what the tracker reported after the full copy.  Both
        sides hash every page (the destination when it gets the request, we
        meanwhile, into our record: :meth:`SourceChunks.to_pages`); chunks
        whose digests differ have their pages' digests asked for and
        compared with ours.  Returns the pages found different, those the
        tracker reported written while we hashed (rehashed already), and the
        pages that read as zeros although what was sent there was not.
        """
        assert self.mem is not None and self.chunks is not None
        loop = asyncio.get_running_loop()
        self._seq += 1
        seq = self._seq
        await self._send_event(DigestRequest(seq=seq, by_page=True))
        holes = self.mem.hole_pages(max_extents=4096)
        hash_s, extra = await loop.run_in_executor(self._outer_pool, functools.partial(
            self.chunks.to_pages, dirty, self.sent, self.known, holes, held_zero=self.held_zero))
        self.report.verification = "pages"
        _log.info("chunk tables by page from the first round: %d pages written during the full copy "
                  "(hashing every page took %.1f ms)", len(dirty), hash_s * 1e3)
        assert self.chunks.table is not None
        dest_table = (await self._expect_table(seq)).digests
        cand = np.flatnonzero(self.chunks.table != dest_table).astype(np.uint32)
        parts = []
        for piece_seq, piece in await self._ask_page_digests(cand, False):
            held = await self._expect_table(piece_seq)
            got = chunk_pages_of(piece, self.chunk_pages, self.mem.npages)
            parts.append(got[held.digests != self.sent[got]])
        found = np.concatenate(parts) if parts else cand[:0]
        late = await self._tracker_scan()
        await loop.run_in_executor(self._outer_pool, functools.partial(
            self.chunks.rehash, late, self.sent, held_zero=self.held_zero))
        return found.astype(np.uint32), late, extra

    def _timed_tracker_scan(self) -> tuple[np.ndarray, float]:
        """The tracker's scan, and the CPU time it took (what it costs paused: see _iterate)."""
        assert self.tracker is not None
        t = time.thread_time()
        dirty = self.tracker.scan(self.sent, held_zero=self.held_zero)
        return dirty, time.thread_time() - t

    async def _tracker_scan(self) -> np.ndarray:
        assert self.tracker is not None
        try:
            dirty, self._detect_cpu_s = await asyncio.get_running_loop().run_in_executor(
                self._outer_pool, self._timed_tracker_scan)
            return dirty
        except TrackingUnavailable as exc:
            raise PrecopyError(f"kernel write tracking failed mid-migration: {exc}", AbortCode.GUEST) from exc

    # -- scanning -------------------------------------------------------

    async def _chunk_tables(self, final: bool, dest_table: np.ndarray | None
                            ) -> tuple[np.ndarray, np.ndarray, float]:
        """Our live chunk digests and the destination's (asked for unless given), and our hashing time."""
        assert self.mem is not None
        if dest_table is None:
            self._seq += 1
            await self._send_event(DigestRequest(seq=self._seq, final=final))
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        # A bounded hole walk: a pathologically fragmented file costs at most
        # a few ms here (the rest is read, which allocates it once).
        holes = self.mem.hole_pages(max_extents=4096)
        live = await loop.run_in_executor(
            self._outer_pool, region_chunk_digests, self.mem.view, self.chunk_pages, holes,
            self._hash_pool,
        )
        hash_s = time.monotonic() - t
        if dest_table is None:
            table = await self._expect_table(self._seq)
            dest_table = table.digests
        return live, dest_table, hash_s

    async def _scan(self, *, final: bool, dest_table: np.ndarray | None = None) -> _Scan:
        """Compare our live chunks with the destination's.

        ``dest_table``: the destination's chunk digests when they are known
        to be current (nothing sent since they were taken); otherwise they
        are requested, in parallel with hashing our own chunks.
        """
        assert self.mem is not None
        live, dest_table, hash_s = await self._chunk_tables(final, dest_table)
        loop = asyncio.get_running_loop()
        empty = np.zeros(0, dtype=np.uint32)
        cand = np.flatnonzero(live != dest_table)
        self._dense = False
        if not cand.size:
            return _Scan(empty, empty, live, dest_table, hash_s, 0.0)
        t = time.monotonic()
        cp = self.chunk_pages
        pages = chunk_pages_of(cand, cp, self.mem.npages)
        whole = _whole_chunks_pay(cand, len(live), cp, self.link.bytes_per_second, self._written_seen)
        if whole:
            # Most of every changed chunk was written: finding the pages
            # inside them would hash them one by one (GIL-bound, and the
            # destination the same for pages without a record) to spare
            # fewer than the link can carry meanwhile; the chunks go whole,
            # as runs straight from memory.
            return _Scan(pages, empty, live, dest_table, hash_s, time.monotonic() - t, whole=True)
        asked = await self._ask_page_digests(sorted_distinct(pages[~self.known[pages]] // cp), final)
        t_pages = time.monotonic()
        now = await loop.run_in_executor(self._outer_pool, page_digests, self.mem.pages, pages)
        if pages.size >= 1024:
            self._page_s = (time.monotonic() - t_pages) / pages.size
        await self._take_page_digests(asked)
        dirty = pages[now != self.sent[pages]]
        # Chunks that differ on the destination but where no page differs
        # from what we sent: our record and the destination disagree.
        dirty_chunks = sorted_distinct(dirty // cp) if dirty.size else dirty
        self._written_seen = dirty.size / pages.size
        # Most chunks changed and a page pass was worth it: the next live
        # scan goes by page straight away (_page_scan).
        self._dense = not final and cand.size >= _DENSE * len(live)
        odd = page_difference(len(live), cand, dirty_chunks)
        odd_pages = empty
        if odd.size:
            spread = (odd[:, None] * cp + np.arange(cp)).ravel()
            odd_pages = spread[spread < self.mem.npages].astype(np.uint32)
        return _Scan(dirty, odd_pages, live, dest_table, hash_s, time.monotonic() - t)

    async def _ask_page_digests(self, chunks: np.ndarray, final: bool) -> list[tuple[int, np.ndarray]]:
        """Ask the destination for the digest of every page of ``chunks`` (ascending).

        Pages sent straight from memory have no record yet: the destination
        hashes what it holds of their chunks while we hash ours, and its
        digests become the record (what it received is exactly what was
        sent).  Returns the requests, for :meth:`_take_page_digests`.
        """
        chunks = np.asarray(chunks, dtype=np.uint32)
        asked = []
        limit = min(MAX_PAGE_DIGEST_CHUNKS, MAX_PAYLOAD // 8 // self.chunk_pages)
        for lo in range(0, len(chunks), limit):
            self._seq += 1
            piece = chunks[lo:lo + limit]
            await self._send_event(DigestRequest(seq=self._seq, final=final, pages_of=piece))
            asked.append((self._seq, piece))
        return asked

    async def _take_page_digests(self, asked: list[tuple[int, np.ndarray]]) -> None:
        """Receive the answers to :meth:`_ask_page_digests` into the record."""
        assert self.mem is not None
        for seq, piece in asked:
            held = await self._expect_table(seq)
            got = chunk_pages_of(piece, self.chunk_pages, self.mem.npages)
            self.sent[got] = held.digests
            self.known[got] = True
            self.held_zero[got] = held.digests == ZERO_PAGE_DIGEST

    async def _page_scan(self) -> _Scan:
        """A live digest scan of a fast writer's region, page by page, with no chunk pass.

        When the last scan found most chunks changed, hashing every chunk
        first only adds a pass over the region (~60-80 ms per GiB here) to
        the page pass that follows over nearly all of it anyway.  Every
        page's digest is compared with the record of what was sent; pages
        without a record (sent straight from memory) get the destination's
        digests of their chunks first, as in :meth:`_scan`.  Holes of the
        file are not read (that would allocate them) and count as zero
        pages.  The destination's chunk table is asked for all the same:
        hashing what changed there meanwhile (while we hash pages) keeps it
        out of the pause, and the final scan, if this one decides it, has
        it at hand.  Sets whether the next scan goes by page
        too (most chunks still hold a dirty page, and not most of their
        pages: else whole chunks are cheaper, which :meth:`_scan` decides).
        """
        assert self.mem is not None
        loop = asyncio.get_running_loop()
        cp, npages = self.chunk_pages, self.mem.npages
        t = time.monotonic()
        holes = self.mem.hole_pages(max_extents=4096)
        data = np.flatnonzero(~holes).astype(np.uint32)
        self._seq += 1
        table_seq = self._seq
        await self._send_event(DigestRequest(seq=table_seq))
        asked = await self._ask_page_digests(sorted_distinct(np.flatnonzero(~self.known) // cp), False)
        now = np.full(npages, ZERO_PAGE_DIGEST, dtype=np.uint64)
        now[data] = await loop.run_in_executor(self._outer_pool, page_digests, self.mem.pages, data)
        if data.size >= 1024:
            self._page_s = (time.monotonic() - t) / data.size
        table = await self._expect_table(table_seq)
        await self._take_page_digests(asked)
        dirty = np.flatnonzero(now != self.sent).astype(np.uint32)
        nchunks = -(-npages // cp)
        touched = sorted_distinct(dirty // cp).size if dirty.size else 0
        self._written_seen = dirty.size / max(1, min(npages, touched * cp))
        self._dense = touched >= _DENSE * nchunks and self._written_seen < _whole_need(self.link.bytes_per_second)
        empty = np.zeros(0, dtype=np.uint32)
        return _Scan(dirty, empty, np.zeros(0, dtype=np.uint64), table.digests, 0.0, time.monotonic() - t,
                     by_page=True)

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
        return 0.002 + 2 * self._rtt + float(getattr(self.workload, "switchover_cost_s", 0.0))

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
            "verify": Part(split["verify"] / 1e3, self._rtt),
            "overhead": Part(split["overhead"] / 1e3, self._rtt),
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
            verify_s = (self._rtt + nchunks * 8 / max(self.link.paused_bytes_per_second, 1.0)
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
            if self.tracker is not None:
                scan = await self._track_scan(final=False)
            elif self._dense:
                scan = await self._page_scan()
            else:
                scan = await self._scan(final=False)
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
                est = chunk_pass + self._page_s * min(self.mem.npages, self.chunk_pages * len(dirty))
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
                scan_sample = self._scan_detect_cpu_s
                scan_estimate = max(self._scan_detect_cpu_s, self._prev_detect_s)
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
                detect_s = max(self._scan_detect_cpu_s, self._prev_detect_s)
                final_scan_s = detect_s + self.chunks.estimate(later)
                self._prev_detect_s = self._scan_detect_cpu_s
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
            contention = self.contention.measure(self._dest_peers)
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
            await self._send_pages(todo, rnd, "iterating", fill=0 if self.tracker is not None else 1, live=True)
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
        await self._send_event(Switchover())

        rnd = RoundReport(round=len(self.report.rounds), kind="final", pages_scanned=self.mem.npages,
                          pages_dirty=0, pages_sent=0, zero_pages=0, bytes_on_wire=0, seconds=0.0)
        # The downtime cap: before every step that still stands between the
        # pause and the commit, what is paused so far and what is expected to
        # follow must stay within it; else roll back.  The last check is right
        # before COMMIT: after it, the commit stands whatever the time.
        self._cap_check("final_scan", expected_s)
        if self.tracker is not None:
            final = await self._track_scan(final=True)
        else:
            final = await self._scan(final=True, dest_table=dest_table)
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
            await self._send_pages(todo, rnd, "switchover",
                                   before_batch=lambda left: self._cap_check("final_pages",
                                                                             self._rest_s(left, len(blob))))
        t3 = time.monotonic()
        phases["final_pages"] = (t3 - t2) * 1e3

        self._cap_check("device_state", self._rest_s(0, len(blob)))
        self.report.device_state_bytes = len(blob)
        view = memoryview(blob)
        for off in range(0, max(len(blob), 1), MAX_PAYLOAD):
            piece = view[off:off + MAX_PAYLOAD]
            rnd.bytes_on_wire += await self._send_event(DeviceState(offset=off, total=len(blob), data=piece))
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
                await self._send_pages(pages, rnd, "repair",
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
        done = await self.committer.commit(self._send_event, self._expect, _h64(blob), self.chan)
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
        self._seq += 1
        self._settle_seq = self._seq
        self._unsettled = 0
        await self._send_event(DigestRequest(seq=self._seq, by_page=self._by_page))

    async def _settled(self) -> None:
        """Wait for the answer to :meth:`_settle`, if one is due (its table itself is not needed)."""
        if self._settle_seq is None:
            return
        t = time.monotonic()
        await self._expect_table(self._settle_seq)
        self._settle_seq = None
        _log.debug("destination settled %.1f ms after the scan", (time.monotonic() - t) * 1e3)

    async def _verify(self, frozen: np.ndarray) -> np.ndarray:
        self._seq += 1
        await self._send_event(DigestRequest(seq=self._seq, final=True, by_page=self._by_page))
        t = time.monotonic()
        table = await self._expect_table(self._seq)
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
            self._outer_pool, self.chunks.recompute, bad, self.sent)
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

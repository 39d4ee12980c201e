"""Finding the dirty pages with the kernel's help (userfaultfd write-protect, docs/TRACKING.md).

:class:`TrackedScanner` has the interface of
:class:`~precopy.session.scanner.DigestScanner`: the kernel names the written
pages, and the source's chunk table for the final verification is kept
current by rehashing only the chunks of reported pages, so the pause
rehashes only what the last scan reported.  The first scan also compares
digests with the destination once (through the digest scanner): it checks
the tracker over the full copy and gives the starting chunk table.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Callable

import numpy as np

from precopy.errors import AbortCode, PrecopyError
from precopy.memory.digest import chunk_digests, chunk_pages_of, page_difference, page_union
from precopy.memory.tracking import SourceChunks, TrackingUnavailable, UffdTracker, select_tracker
from precopy.protocol import PAGE_SIZE
from precopy.session.report import MigrationReport
from precopy.session.scanner import DigestScanner, Scan

__all__ = ["TrackedScanner", "choose_tracker"]

_log = logging.getLogger(__name__)

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
#: The check of the chunk digests taken during the full copy
#: (TrackedScanner._early_table) reads this many of them again at the
#: least (all of a region up to 32 MiB), else one in this many.
_CHECK_MIN_CHUNKS = 256
_CHECK_SHARE = 16


async def choose_tracker(tracking: str, mode: str, workload: object, mem: object
                         ) -> tuple[UffdTracker | None, str]:
    """The tracker for one migration (None: digests) and why; nothing armed yet.

    Raises :class:`PrecopyError` (GUEST) when ``tracking`` is ``uffd-wp``
    and the workload or the kernel cannot have it.
    """
    if mode == "stop-and-copy":
        return None, "stop-and-copy pauses first and compares every page: nothing to track"
    try:
        return await select_tracker(tracking, workload, mem)  # type: ignore[arg-type]
    except TrackingUnavailable as exc:
        raise PrecopyError(str(exc), AbortCode.GUEST) from exc


class TrackedScanner:
    """Dirty pages as the kernel reports them; the chunk table (``chunks``) kept current.

    ``near_switchover(pages)``: whether a round that found ``pages`` dirty
    is close to the switchover (then the chunks it dirtied are rehashed at
    once; before, the rehash waits: a fast writer dirties them again).
    ``report``: where a switch to chunk tables by page is recorded.
    """

    name = "uffd-wp"

    def __init__(self, digests: DigestScanner, tracker: UffdTracker, chunks: SourceChunks, *,
                 near_switchover: Callable[[int], bool], report: MigrationReport) -> None:
        self.digests = digests
        self.exchange = digests.exchange
        self.mem = digests.mem
        self.record = digests.record
        self.pool = digests.pool
        self.tracker = tracker
        self.chunks = chunks
        self.near_switchover = near_switchover
        self.report = report
        #: The CPU time of the detection in the last round's scan (what it costs paused).
        self.detect_cpu_s = 0.0
        self._last_cpu_s = 0.0  # of the tracker's last scan

    @property
    def page_s(self) -> float:
        """Hashing one page, as the digest comparisons last measured it."""
        return self.digests.page_s

    async def held_already(self, holes: np.ndarray) -> np.ndarray | None:
        """What the destination's existing region holds already: see :meth:`DigestScanner.held_already`."""
        return await self.digests.held_already(holes)

    async def scan(self, *, final: bool, dest_table: np.ndarray | None = None,
                   pending: np.ndarray | None = None) -> Scan:
        """Ask the kernel which pages were written; keep our chunk table current.

        Live: the chunks of reported pages are rehashed now, so that paused,
        only the last scan's chunks are.  Returns ``dirty`` (with the final
        pass, also ``pending``: the pages decided on before the pause),
        ``live`` (our chunk table; current when paused), ``hash_s``
        (detection) and ``page_hash_s`` (rehashing the reported pages'
        chunks, estimated for the first scan).  ``dest_table`` is not needed.
        """
        t = time.monotonic()
        dirty = await self.tracker_scan()
        detect_s = time.monotonic() - t
        self.detect_cpu_s = self._last_cpu_s
        # Pages re-protected just before their send (UffdTracker.rearm) went
        # with their writes, but their chunks' digests must follow them.
        written = page_union(self.mem.npages, dirty, self.tracker.take_rewritten())
        if self.chunks.table is None:
            dirty = await self._first(dirty)
            rehash_s = self.chunks.estimate(len(dirty))
        else:
            dirty, rehash_s = await self._later(dirty, written, final)
        assert self.chunks.table is not None
        if final and pending is not None:
            dirty = page_union(self.mem.npages, pending, dirty)
        empty = np.zeros(0, dtype=np.uint32)
        return Scan(dirty, empty, self.chunks.table, np.zeros(0, dtype=np.uint64), detect_s, rehash_s)

    async def _first(self, dirty: np.ndarray) -> np.ndarray:
        """The first scan: compare digests with the destination once; returns every page to send."""
        npages = self.mem.npages
        if len(self.chunks.chunks_of(dirty)) >= _FIRST_BY_PAGE_SHARE * len(self.chunks.stale):
            # Written all over during the full copy: compare by page at
            # once (see first_compare_by_page) rather than hash every
            # chunk now and switch to pages a round or two later.
            found, late, extra = await self.first_compare_by_page(dirty)
            dirty = page_union(npages, dirty, late, extra)
        else:
            # The chunks the full copy sent as runs were hashed then (just
            # after their re-protection: SourceChunks.hash_early); if a
            # sample of them read again agrees, only the others and those
            # reported written since are hashed now (else all of them: see
            # _early_table).
            chunks = self.chunks
            early, checked = await self._early_table(dirty)
            digest = await self.digests.chunk_scan(final=False, known=early)
            # What was written while we hashed is reported now: not taken
            # for writes the kernel missed (sent twice), and its chunks are
            # left stale until a rehash that is not deferred.
            late = page_union(npages, checked, await self.tracker_scan())
            chunks.adopt(digest.live, digest.hash_s + chunks.early_s)
            chunks.rehash(late, self.record.sent, defer=True, held_zero=self.record.held_zero)
            # Whole chunks (a dense set) compared no page: every page of
            # a chunk that differs goes, reported or not (one page
            # reported there says nothing of the others).
            found = page_union(npages, digest.dirty, digest.odd)
            dirty = page_union(npages, dirty, late)
        missed = page_difference(npages, found, dirty)
        if missed.size:
            _log.info("first scan: %d pages differ from the destination (or share a chunk that does) "
                      "beyond the %d the kernel reported (holes punched, or writes the kernel did "
                      "not see): sending them too", missed.size, dirty.size)
            dirty = page_union(npages, dirty, missed)
        return dirty

    async def _early_table(self, dirty: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray]:
        """The chunk digests the full copy took (SourceChunks.hash_early), once a sample agrees.

        They spare the first scan a pass over the region, but a write the
        kernel failed to report after a chunk's early hash would then go
        unseen, where a pass after the full copy finds it.  So a random
        sample of those chunks (all of them up to ``_CHECK_MIN_CHUNKS``,
        else one in ``_CHECK_SHARE``) not reported written is read again:
        any that changed means the tracker missed writes (or a hole was
        punched), and the whole region is hashed as before.  Returns
        ``((digests, per-chunk mask) or None, pages the tracker reported
        meanwhile)``.
        """
        chunks = self.chunks
        empty = np.zeros(0, dtype=np.uint32)
        # The chunks of pages reported written since are hashed again, as
        # all chunks were: those that differ from the destination then have
        # their pages compared with its (written pages the kernel did not
        # report beside one it did are found there).
        quiet = chunks.early_known.copy()
        quiet[chunks.chunks_of(dirty)] = False
        if not quiet.any():
            return None, empty
        cand = np.flatnonzero(quiet)
        n = min(len(cand), max(_CHECK_MIN_CHUNKS, len(cand) // _CHECK_SHARE))
        sample = np.sort(np.random.default_rng().choice(cand, n, replace=False)) if n < len(cand) else cand
        now = await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(
            chunk_digests, self.mem.view, chunks.chunk_pages * PAGE_SIZE, self.digests.hash_pool, sample))
        late = await self.tracker_scan()  # written while we read: not the kernel's miss
        # ... and those chunks are hashed again too (the read may have been
        # before or after that write; a miss there is found as above).
        quiet[chunks.chunks_of(late)] = False
        keep = quiet[sample]
        changed = int(np.count_nonzero(now[keep] != chunks.early[sample[keep]]))
        if changed:
            _log.warning("%d of %d chunks read again after the full copy changed without a write the kernel "
                         "reported (or a hole punched there): hashing the whole region to compare it",
                         changed, n)
            return None, late
        return (chunks.early, quiet), late

    async def _later(self, dirty: np.ndarray, written: np.ndarray, final: bool) -> tuple[np.ndarray, float]:
        """A scan after the first: rehash the chunks of the ``written`` pages (or defer them).

        Returns the pages to send (``dirty``, and any found reading as zeros
        unreported) and the seconds the rehash took.
        """
        loop = asyncio.get_running_loop()
        record, chunks = self.record, self.chunks
        assert chunks.table is not None
        # Far from a switchover (a fast writer), the chunks it dirtied
        # now would be dirtied again before the pause: their rehash waits.
        defer = not final and not self.near_switchover(len(dirty))
        spread = 0 if defer or final or chunks.by_page else chunks.would_rehash(written)
        if spread and spread >= _BY_PAGE_SHARE * len(chunks.table):
            # The switch hashes every page (what was written included).
            holes = self.mem.hole_pages(max_extents=4096)
            rehash_s, extra = await loop.run_in_executor(self.pool, functools.partial(
                chunks.to_pages, dirty, record.sent, record.known, holes, held_zero=record.held_zero))
            self.report.verification = "pages"
            _log.info("chunk tables by page from now on: %d pages written over %d of %d chunks "
                      "(switching took %.1f ms)", len(dirty), spread, len(chunks.table), rehash_s * 1e3)
        else:
            rehash_s, extra = await loop.run_in_executor(
                self.pool, functools.partial(chunks.rehash, written, record.sent, defer=defer,
                                             sending=dirty, held_zero=record.held_zero))
        if extra.size:
            _log.info("%d unreported pages read as zeros although what was sent was not "
                      "(holes punched): sending them too", extra.size)
            dirty = page_union(self.mem.npages, dirty, extra)
        return dirty, rehash_s

    async def first_compare_by_page(self, dirty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first digest comparison, by page: both sides switch to chunk tables by page.

        ``dirty``: what the tracker reported after the full copy.  Both
        sides hash every page (the destination when it gets the request, we
        meanwhile, into our record: :meth:`SourceChunks.to_pages`); chunks
        whose digests differ have their pages' digests asked for and
        compared with ours.  Returns the pages found different, those the
        tracker reported written while we hashed (rehashed already), and the
        pages that read as zeros although what was sent there was not.
        """
        loop = asyncio.get_running_loop()
        record, chunks = self.record, self.chunks
        seq = await self.exchange.request(by_page=True)
        holes = self.mem.hole_pages(max_extents=4096)
        hash_s, extra = await loop.run_in_executor(self.pool, functools.partial(
            chunks.to_pages, dirty, record.sent, record.known, holes, held_zero=record.held_zero))
        self.report.verification = "pages"
        _log.info("chunk tables by page from the first round: %d pages written during the full copy "
                  "(hashing every page took %.1f ms)", len(dirty), hash_s * 1e3)
        assert chunks.table is not None
        dest_table = (await self.exchange.expect_table(seq)).digests
        cand = np.flatnonzero(chunks.table != dest_table).astype(np.uint32)
        parts = []
        for piece_seq, piece in await self.digests.ask_page_digests(cand, False):
            held = await self.exchange.expect_table(piece_seq)
            got = chunk_pages_of(piece, self.digests.chunk_pages, self.mem.npages)
            parts.append(got[held.digests != record.sent[got]])
        found = np.concatenate(parts) if parts else cand[:0]
        late = await self.tracker_scan()
        await loop.run_in_executor(self.pool, functools.partial(
            chunks.rehash, late, record.sent, held_zero=record.held_zero))
        return found.astype(np.uint32), late, extra

    def _timed_tracker_scan(self) -> tuple[np.ndarray, float]:
        """The tracker's scan, and the CPU time it took (what it costs paused)."""
        t = time.thread_time()
        dirty = self.tracker.scan(self.record.sent, held_zero=self.record.held_zero)
        return dirty, time.thread_time() - t

    async def tracker_scan(self) -> np.ndarray:
        """The pages the kernel saw written since the last scan (re-armed by the scan)."""
        try:
            dirty, self._last_cpu_s = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._timed_tracker_scan)
            return dirty
        except TrackingUnavailable as exc:
            raise PrecopyError(f"kernel write tracking failed mid-migration: {exc}", AbortCode.GUEST) from exc

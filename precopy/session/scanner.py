"""Finding the dirty pages by digests: the source's chunks and pages against the destination's.

One interface for both ways of finding them: ``await scanner.scan(final=...,
dest_table=..., pending=...)`` returns a :class:`Scan`.  :class:`DigestScanner`
(here) compares chunk digests with the destination's, then the pages of the
chunks that differ with the record of what was sent; a fast writer's region
is compared page by page.  :class:`~precopy.session.tracked.TrackedScanner`
asks the kernel instead.  Neither touches a socket: they talk to the
destination through an :class:`~precopy.session.exchange.Exchange`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Protocol

import numpy as np

from precopy.memory.digest import (
    ZERO_PAGE_DIGEST,
    chunk_pages_of,
    page_difference,
    page_digests,
    region_chunk_digests,
    sorted_distinct,
)
from precopy.memory.region import GuestMemory
from precopy.policy.switchover import LinkEstimator
from precopy.protocol import MAX_PAGE_DIGEST_CHUNKS, MAX_PAYLOAD
from precopy.session.exchange import Exchange
from precopy.session.record import PageRecord

__all__ = ["Scan", "DirtyScanner", "DigestScanner", "whole_chunks_pay", "written_fraction"]

_log = logging.getLogger(__name__)

#: A scan sends the changed chunks whole when at least this fraction of
#: their pages were written, at the least (see written_fraction) ...
_DENSE = 0.5
#: ... and, on a link slower than hashing pages, the bytes that sends for
#: nothing cost more than finding the pages: the fraction must then be over
#: 1 - link rate / this (bytes/s: hashing pages one by one, both sides).
_PAGE_HASH_BPS = 8e9


@dataclass(frozen=True, slots=True, eq=False)
class Scan:
    """What one search for dirty pages found."""

    dirty: np.ndarray  # pages whose content differs from what we last sent
    odd: np.ndarray  # pages of chunks that differ although no page digest does
    live: np.ndarray  # our chunk digests
    dest_table: np.ndarray  # the destination's chunk digests
    hash_s: float  # hashing our chunks (a tracker: detection)
    page_hash_s: float  # hashing the pages of the chunks that differ (a tracker: rehashing their chunks)
    whole: bool = False  # ``dirty`` is every page of the chunks that differ (a dense set)
    by_page: bool = False  # every page compared with its record, no chunk pass (DigestScanner.page_scan)


class DirtyScanner(Protocol):
    """The one interface of the ways to find dirty pages (digests, kernel tracking)."""

    #: How: "digest" or the kernel tracker's name.
    name: str

    @property
    def page_s(self) -> float:
        """Hashing one page, as last measured (0.0: not yet)."""

    @property
    def detect_cpu_s(self) -> float:
        """The CPU time of a kernel tracker's detection in the last round's scan (0.0 without)."""

    async def scan(self, *, final: bool, dest_table: np.ndarray | None = None,
                   pending: np.ndarray | None = None) -> Scan:
        """The pages that differ from what the destination holds (``final``: the workload is paused).

        ``dest_table``: the destination's chunk digests when known to be
        current; ``pending``: pages decided on before the pause (sent in the
        final pass whatever the scan finds).
        """

    async def held_already(self, holes: np.ndarray) -> np.ndarray | None:
        """Into an existing region: a per-page mask of what the destination holds already (None: stale)."""


def written_fraction(changed: int, nchunks: int, chunk_pages: int) -> float:
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


def whole_need(link_bps: float) -> float:
    """The least fraction of a changed chunk's pages that must be written to send it whole."""
    return max(_DENSE, 1.0 - link_bps / _PAGE_HASH_BPS)


def whole_chunks_pay(cand: np.ndarray, nchunks: int, chunk_pages: int, link_bps: float,
                     written_seen: float) -> bool:
    """Whether the changed chunks ``cand`` (ascending, of ``nchunks``) go whole.

    Sending a changed chunk whole spares hashing its pages one by one
    (GIL-bound, and the destination the same for pages without a record)
    but sends its clean pages too: it pays when most of each was written
    (see written_fraction and whole_need), or when the changed chunks lie
    in a few long runs where even writes would leave many (a sweep writes
    through them) and the link outruns page hashing by far.  Every chunk
    changed says nothing about how much of each -- a sweep writes them
    through, 200,000 random pages/s a third -- so ``written_seen``, the
    fraction of changed chunks' pages the last page pass found written,
    decides (sent whole on a guess, a uniform writer's rounds were four
    times what it wrote).
    """
    need = whole_need(link_bps)
    c = len(cand) / nchunks if nchunks else 0.0
    if c >= 1.0:
        return written_seen >= need
    fast = need <= 0.9  # the link outruns hashing pages by far
    runs = 1 + int(np.count_nonzero(np.diff(cand) > 1))
    clustered = len(cand) >= 16 and runs <= max(2.0, 0.25 * len(cand) * (1.0 - c))
    return written_fraction(len(cand), nchunks, chunk_pages) >= need or (fast and clustered)


async def sample_match(exchange: Exchange, mem: GuestMemory, chunk_pages: int, pool: ThreadPoolExecutor) -> float:
    """The fraction of a sample's pages (64 chunks at random) that the destination's existing region
    holds as we do (see :meth:`DigestScanner.held_already`).

    Only a guess at how stale the region is, so it need not wait for the
    tracker: the source starts it right after READY, beside the arming,
    and the destination hashes its pages meanwhile (~20 ms a GiB here).
    """
    npages = mem.npages
    nchunks = -(-npages // chunk_pages)
    sample = np.sort(np.random.default_rng().choice(nchunks, min(64, nchunks), replace=False)).astype(np.uint32)
    seq = await exchange.request(pages_of=sample)
    pages = chunk_pages_of(sample, chunk_pages, npages)
    live = await asyncio.get_running_loop().run_in_executor(pool, page_digests, mem.pages, pages)
    held = await exchange.expect_table(seq)
    return float((live == held.digests).mean())


class DigestScanner:
    """Dirty pages found by comparing digests with the destination's (no kernel help).

    ``pool`` runs the hashing off the event loop; ``hash_pool`` splits a
    region's chunk hash over its threads.  ``link`` (its rate) decides
    whether changed chunks go whole.
    """

    name = "digest"

    def __init__(self, exchange: Exchange, mem: GuestMemory, record: PageRecord, chunk_pages: int, *,
                 link: LinkEstimator, pool: ThreadPoolExecutor, hash_pool: ThreadPoolExecutor) -> None:
        self.exchange = exchange
        self.mem = mem
        self.record = record
        self.chunk_pages = chunk_pages
        self.link = link
        self.pool = pool
        self.hash_pool = hash_pool
        #: The last scan found most chunks changed: the next live one goes by page (page_scan).
        self.dense = False
        #: Of the pages of changed chunks, the fraction the last page pass found dirty.
        self.written_seen = 0.0
        #: Hashing one page, as measured in the last scan that hashed pages.
        self.page_s = 0.0
        #: The CPU time of a kernel tracker's detection in the last round's scan (none here).
        self.detect_cpu_s = 0.0
        #: :func:`sample_match` for :meth:`held_already`, if it was started before this scanner was made.
        self.sampled: Awaitable[float] | None = None

    async def scan(self, *, final: bool, dest_table: np.ndarray | None = None,
                   pending: np.ndarray | None = None) -> Scan:
        """The pages that differ from what the destination holds.

        Live (``final`` False), page by page when the last scan found most
        chunks changed (:meth:`page_scan`), else by chunk (:meth:`chunk_scan`).
        ``dest_table``: the destination's chunk digests when known to be
        current.  ``pending`` (pages decided on before the pause) is found
        again by the comparison: not needed here.
        """
        if not final and self.dense:
            return await self.page_scan()
        return await self.chunk_scan(final=final, dest_table=dest_table)

    async def chunk_tables(self, final: bool, dest_table: np.ndarray | None,
                           known: tuple[np.ndarray, np.ndarray] | None = None
                           ) -> tuple[np.ndarray, np.ndarray, float]:
        """Our live chunk digests and the destination's (asked for unless given), and our hashing time.

        ``known``: (digests, per-chunk mask) of chunks hashed already (a
        tracker's, taken during the full copy: SourceChunks.hash_early);
        only the others are hashed now.
        """
        seq = await self.exchange.request(final=final) if dest_table is None else 0
        loop = asyncio.get_running_loop()
        t = time.monotonic()
        todo = None if known is None else np.flatnonzero(~known[1])
        if todo is not None and not todo.size:
            assert known is not None
            live = known[0].copy()  # nothing left to read: no hole walk either
        else:
            # A bounded hole walk: a pathologically fragmented file costs at most
            # a few ms here (the rest is read, which allocates it once).
            holes = self.mem.hole_pages(max_extents=4096)
            live = await loop.run_in_executor(
                self.pool, region_chunk_digests, self.mem.view, self.chunk_pages, holes, self.hash_pool, todo,
            )
            if known is not None:
                part, live = live, known[0].copy()
                live[todo] = part
        hash_s = time.monotonic() - t
        if dest_table is None:
            dest_table = (await self.exchange.expect_table(seq)).digests
        return live, dest_table, hash_s

    async def chunk_scan(self, *, final: bool, dest_table: np.ndarray | None = None,
                         known: tuple[np.ndarray, np.ndarray] | None = None) -> Scan:
        """Compare our live chunks with the destination's, then the pages of those that differ.

        ``dest_table``: the destination's chunk digests when they are known
        to be current (nothing sent since they were taken); otherwise they
        are requested, in parallel with hashing our own chunks.  ``known``:
        chunks hashed already (see :meth:`chunk_tables`).
        """
        live, dest_table, hash_s = await self.chunk_tables(final, dest_table, known)
        empty = np.zeros(0, dtype=np.uint32)
        cand = np.flatnonzero(live != dest_table)
        self.dense = False
        if not cand.size:
            return Scan(empty, empty, live, dest_table, hash_s, 0.0)
        t = time.monotonic()
        cp = self.chunk_pages
        pages = chunk_pages_of(cand, cp, self.mem.npages)
        if whole_chunks_pay(cand, len(live), cp, self.link.bytes_per_second, self.written_seen):
            # Most of every changed chunk was written: finding the pages
            # inside them would hash them one by one (GIL-bound, and the
            # destination the same for pages without a record) to spare
            # fewer than the link can carry meanwhile; the chunks go whole,
            # as runs straight from memory.
            return Scan(pages, empty, live, dest_table, hash_s, time.monotonic() - t, whole=True)
        dirty = await self._dirty_pages(pages, final)
        # Chunks that differ on the destination but where no page differs
        # from what we sent: our record and the destination disagree.
        dirty_chunks = sorted_distinct(dirty // cp) if dirty.size else dirty
        self.written_seen = dirty.size / pages.size
        # Most chunks changed and a page pass was worth it: the next live
        # scan goes by page straight away (page_scan).
        self.dense = not final and cand.size >= _DENSE * len(live)
        odd = page_difference(len(live), cand, dirty_chunks)
        odd_pages = empty
        if odd.size:
            spread = (odd[:, None] * cp + np.arange(cp)).ravel()
            odd_pages = spread[spread < self.mem.npages].astype(np.uint32)
        return Scan(dirty, odd_pages, live, dest_table, hash_s, time.monotonic() - t)

    async def _dirty_pages(self, pages: np.ndarray, final: bool) -> np.ndarray:
        """Of ``pages`` (those of changed chunks), the ones whose digest differs from the record."""
        record = self.record
        asked = await self.ask_page_digests(sorted_distinct(pages[~record.known[pages]] // self.chunk_pages), final)
        t_pages = time.monotonic()
        now = await asyncio.get_running_loop().run_in_executor(self.pool, page_digests, self.mem.pages, pages)
        if pages.size >= 1024:
            self.page_s = (time.monotonic() - t_pages) / pages.size
        await self.take_page_digests(asked)
        dirty: np.ndarray = pages[now != record.sent[pages]]
        return dirty

    async def ask_page_digests(self, chunks: np.ndarray, final: bool) -> list[tuple[int, np.ndarray]]:
        """Ask the destination for the digest of every page of ``chunks`` (ascending).

        Pages sent straight from memory have no record yet: the destination
        hashes what it holds of their chunks while we hash ours, and its
        digests become the record (what it received is exactly what was
        sent).  Returns the requests, for :meth:`take_page_digests`.
        """
        chunks = np.asarray(chunks, dtype=np.uint32)
        asked = []
        limit = min(MAX_PAGE_DIGEST_CHUNKS, MAX_PAYLOAD // 8 // self.chunk_pages)
        for lo in range(0, len(chunks), limit):
            piece = chunks[lo:lo + limit]
            asked.append((await self.exchange.request(final=final, pages_of=piece), piece))
        return asked

    async def take_page_digests(self, asked: list[tuple[int, np.ndarray]]) -> None:
        """Receive the answers to :meth:`ask_page_digests` into the record."""
        for seq, piece in asked:
            held = await self.exchange.expect_table(seq)
            self.record.held(chunk_pages_of(piece, self.chunk_pages, self.mem.npages), held.digests)

    async def page_scan(self) -> Scan:
        """A live digest scan of a fast writer's region, page by page, with no chunk pass.

        When the last scan found most chunks changed, hashing every chunk
        first only adds a pass over the region (~60-80 ms per GiB here) to
        the page pass that follows over nearly all of it anyway.  Every
        page's digest is compared with the record of what was sent; pages
        without a record (sent straight from memory) get the destination's
        digests of their chunks first, as in :meth:`chunk_scan`.  Holes of
        the file are not read (that would allocate them) and count as zero
        pages.  The destination's chunk table is asked for all the same:
        hashing what changed there meanwhile (while we hash pages) keeps it
        out of the pause, and the final scan, if this one decides it, has
        it at hand.  Sets whether the next scan goes by page
        too (most chunks still hold a dirty page, and not most of their
        pages: else whole chunks are cheaper, which :meth:`chunk_scan` decides).
        """
        loop = asyncio.get_running_loop()
        cp, npages = self.chunk_pages, self.mem.npages
        t = time.monotonic()
        holes = self.mem.hole_pages(max_extents=4096)
        data = np.flatnonzero(~holes).astype(np.uint32)
        table_seq = await self.exchange.request()
        asked = await self.ask_page_digests(sorted_distinct(np.flatnonzero(~self.record.known) // cp), False)
        now = np.full(npages, ZERO_PAGE_DIGEST, dtype=np.uint64)
        now[data] = await loop.run_in_executor(self.pool, page_digests, self.mem.pages, data)
        if data.size >= 1024:
            self.page_s = (time.monotonic() - t) / data.size
        table = await self.exchange.expect_table(table_seq)
        await self.take_page_digests(asked)
        dirty = np.flatnonzero(now != self.record.sent).astype(np.uint32)
        nchunks = -(-npages // cp)
        touched = sorted_distinct(dirty // cp).size if dirty.size else 0
        self.written_seen = dirty.size / max(1, min(npages, touched * cp))
        self.dense = touched >= _DENSE * nchunks and self.written_seen < whole_need(self.link.bytes_per_second)
        empty = np.zeros(0, dtype=np.uint32)
        return Scan(dirty, empty, np.zeros(0, dtype=np.uint64), table.digests, 0.0, time.monotonic() - t,
                    by_page=True)

    async def held_already(self, holes: np.ndarray) -> np.ndarray | None:
        """Pages the destination's existing region already holds, as a per-page mask.

        A repeat migration finds most of the region there: only the chunks
        that differ need to move.  A sample of 64 chunks' page digests is
        asked for first (:func:`sample_match`; or taken earlier: ``sampled``);
        unless a quarter of its pages match, the region is
        taken for stale (a pre-provisioned file) and None returned at once,
        without hashing it here or there.  The pages skipped keep no record
        of their own (``known`` stays False): a later scan that finds their
        chunk changed asks the destination what it holds, as for pages sent
        straight from memory.
        """
        cp, npages = self.chunk_pages, self.mem.npages
        sampled, self.sampled = self.sampled, None
        match = await (sampled if sampled is not None else sample_match(self.exchange, self.mem, cp, self.pool))
        if match < 0.25:
            _log.info("the destination's existing region is stale (%.0f %% of a sample matches): "
                      "sending every page", 100 * match)
            return None
        live, dest_table, _ = await self.chunk_tables(False, None)
        same = np.ones(npages, dtype=bool)
        cand = np.flatnonzero(live != dest_table)
        same[chunk_pages_of(cand, cp, npages)] = False
        same &= ~holes  # holes go as zero pages anyway
        _log.info("the destination already holds %d of %d pages (a repeat migration): sending the rest",
                  int(same.sum()), npages)
        return same

"""The destination's region writer: received pages into the region, never where no block is.

A :class:`RegionWriter` writes one migration's PAGES into its region and
keeps the region's chunk digests current (:class:`ChunkTracker`).  The
source sends the holes of its region first, as zero pages: a fresh region
is prepared (:class:`~precopy.memory.prepare.Preparation`) when the first
data arrives, skipping them, and no page is written before the file system
has reserved its block (on tmpfs or hugetlbfs that write would be a SIGBUS).
Runs of pages whose memory is mapped in already -- an existing region's
pages, or a fresh tmpfs region's pieces populated ahead -- are received
straight into the mapping (:meth:`RegionWriter.sink`); the rest go in with
``pwrite``.

With several streams each extra stream writes from a thread of its own
(:mod:`precopy.session.dest_streams`): the streams' pages are disjoint
(stripes of whole chunks), so the per-page masks and the chunk tracker's
chunks each have one writer; what they share -- starting the
preparation at the first data, the in-place count -- is under a lock.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

import numpy as np
import xxhash

from precopy.memory.digest import ChunkTracker
from precopy.memory.region import GuestMemory
from precopy.memory.map_in import TMPFS_MAGIC, fs_magic
from precopy.protocol import PAGE_SIZE, Pages, page_payload
from precopy.session.journal import MigrationRecord

__all__ = ["RegionWriter"]

#: A connection's ``payload_sink``: a run's page numbers -> where to receive its payload (None: not in place).
Sink = Callable[[np.ndarray], "memoryview | None"]

_h64 = xxhash.xxh3_64_intdigest


class _InPlaceDigests:
    """Chunk digests of a payload received into the region, hashed as its bytes arrive.

    A chunk is hashed as soon as its last byte is in, while it is still in
    the CPU cache: hashed after the whole batch (4 MiB, twice this machine's
    L2) it is read back from memory, ~30 % of the destination's CPU for an
    idle 1 GiB copy.  The chunks are those :meth:`ChunkTracker.received`
    would hash (the ones the run covers whole), from the same bytes: the
    region's, as they landed.
    """

    __slots__ = ("chunk_pages", "chunk_bytes", "npages", "nchunks", "view", "first", "pos", "end", "digests")

    def __init__(self, chunk_pages: int, npages: int) -> None:
        self.chunk_pages = chunk_pages
        self.chunk_bytes = chunk_pages * PAGE_SIZE
        self.npages = npages
        self.nchunks = -(-npages // chunk_pages)
        self.view: memoryview | None = None
        self.first = self.pos = self.end = 0
        self.digests: list[int] = []

    def start(self, first: int, last: int, view: memoryview) -> None:
        """A run ``first..last`` is to be received into ``view``."""
        cp = self.chunk_pages
        lo, hi = -(-first // cp), (last + 1) // cp
        if last + 1 == self.npages:
            hi = self.nchunks  # a short last chunk is whole when the run reaches the end
        self.view = None
        self.digests = []
        if last - first + 1 < cp or hi <= lo:
            return  # no whole chunk: ChunkTracker.received marks them stale
        self.view, self.first = view, first
        self.pos = (lo * cp - first) * PAGE_SIZE
        self.end = min(self.pos + (hi - lo) * self.chunk_bytes, view.nbytes)

    def progress(self, done: int) -> None:
        """``done`` bytes of the payload are in: hash the chunks they complete."""
        view = self.view
        if view is None:
            return
        pos, end, step, out = self.pos, self.end, self.chunk_bytes, self.digests
        while pos < end and min(pos + step, end) <= done:
            out.append(_h64(view[pos:pos + step]))
            pos += step
        self.pos = pos

    def take(self, first: int) -> np.ndarray | None:
        """The digests of the run starting at ``first`` if it is the one hashed here (then
        forgotten), all of it in; else None.  (With several streams, each connection has its
        own: the run may be another's.)"""
        if self.view is None or first != self.first:
            return None
        self.view = None
        return np.array(self.digests, dtype=np.uint64) if self.pos >= self.end else None

    def forget(self) -> None:
        self.view = None


class RegionWriter:
    """Writes one migration's pages into its region (see the module docstring).

    ``existing``: the region file held data before (its pages exist, its
    holes are zeros); ``populate``: prefault a fresh region (--no-populate
    turns it off); ``rec`` counts the pages received in place.
    """

    def __init__(self, mem: GuestMemory, tracker: ChunkTracker, rec: MigrationRecord, *, existing: bool,
                 populate: bool, chunk_pages: int) -> None:
        self.mem = mem
        self.tracker = tracker
        self.rec = rec
        self.existing = existing
        self.populate = populate
        self.chunk_pages = chunk_pages
        # Pages that may hold something other than zeros, all with a block:
        # none in a fresh file; in an existing region, all but its holes.
        self.written = ~mem.hole_pages() if existing else np.zeros(mem.npages, dtype=bool)
        # The source sends the holes of its region first, as zero pages: the
        # region is prepared when the first data arrives, skipping them.
        self.declared_zero = np.zeros(mem.npages, dtype=bool)
        self.preparing = existing  # an existing region has its blocks
        # A new tmpfs region is mapped in writable ahead of the receiver once
        # data arrives (Preparation.start_populate_ahead): runs received
        # where that is done go straight into the mapping, as into an
        # existing region's pages; the rest by pwrite.
        self.ahead = not existing and populate and fs_magic(mem.path) == TMPFS_MAGIC
        if existing:
            # Its pages exist: runs of them are received straight into the
            # mapping, no second copy (pwrite from the receive buffer).
            mem.prep.start_map_in(self.written)
        self._hashers: list[_InPlaceDigests] = []
        self._lock = threading.Lock()  # the streams' threads: see the module docstring

    def hashing_sink(self) -> tuple[Sink, Callable[[int], None]] | None:
        """For one connection: a :meth:`sink` that also hashes each chunk of a payload as it
        lands, and the ``payload_progress`` that does it (None: nothing is received in place)."""
        hasher = _InPlaceDigests(self.chunk_pages, self.mem.npages)
        sink = self._sink(hasher)
        if sink is None:
            return None
        self._hashers.append(hasher)
        return sink, hasher.progress

    def release(self) -> None:
        """The migration is over: drop any view of the region a payload in progress had."""
        for hasher in self._hashers:
            hasher.forget()

    def sink(self) -> Sink | None:
        """Where a PAGES payload may be received in place (the connection's ``payload_sink``):
        the region's own memory for a run of pages mapped in, None elsewhere.  None when
        nothing is received in place (a fresh region not populated ahead)."""
        return self._sink(None)

    def _sink(self, in_place: _InPlaceDigests | None) -> Sink | None:
        if not (self.existing or self.ahead):
            return None
        # (No reference to self here: the connection holds the sink, and
        # a cycle through it kept each migration's buffers until a full
        # garbage collection, ~5 MiB a migration.)
        mem, written, existing = self.mem, self.written, self.existing

        def sink(indices: np.ndarray) -> memoryview | None:
            first, last = int(indices[0]), int(indices[-1])
            if last - first + 1 != len(indices):
                return None  # scattered
            if not (written[first:last + 1].all() if existing else mem.prep.populated(first, last)):
                return None  # into holes, or not mapped in yet (pwrite: ENOSPC, not SIGBUS)
            view = mem.view[first * PAGE_SIZE:(last + 1) * PAGE_SIZE]
            if in_place is not None:
                in_place.start(first, last, view)
            return view

        return sink

    async def write(self, ev: Pages) -> None:
        """Write one PAGES event into the region and its digests.

        Raises :class:`RegionError` when the file system cannot hold the
        pages (full).
        """
        z, top = self._declare(ev)
        while top >= 0 and not self.mem.prep.reserved_through(top):
            # Never write where the file system has not allocated yet.
            await asyncio.sleep(0.001)
        self._put(ev, z)

    def write_blocking(self, ev: Pages, stop: threading.Event) -> bool:
        """:meth:`write` for a stream's own thread: waits for the reservation asleep.

        False (nothing written) when ``stop`` is set meanwhile.
        """
        z, top = self._declare(ev)
        while top >= 0 and not self.mem.prep.reserved_through(top):
            if stop.wait(0.001):
                return False
        self._put(ev, z)
        return True

    def _declare(self, ev: Pages) -> tuple[np.ndarray, int]:
        """Note what ``ev`` declares zero or data (the first data starts preparing the region);
        returns the zero pages to write and the last page that must be reserved first (-1: none)."""
        mem, written, declared_zero = self.mem, self.written, self.declared_zero
        # Pages never written are still zero in the fresh file.
        z = ev.zeros[written[ev.zeros]] if len(ev.zeros) else ev.zeros
        if len(ev.zeros):
            declared_zero[ev.zeros] = True
        if len(ev.indices):
            declared_zero[ev.indices] = False
            if not self.preparing:
                with self._lock:  # the first data of any stream starts it, once
                    if not self.preparing:
                        mem.prep.start_prepare(populate=self.populate, skip=declared_zero.copy())
                        if self.ahead:
                            mem.prep.start_populate_ahead(~declared_zero)
                        self.preparing = True
        if len(ev.indices) or z.size:
            return z, max(int(ev.indices[-1]) if len(ev.indices) else 0, int(z[-1]) if z.size else 0)
        return z, -1

    def _put(self, ev: Pages, z: np.ndarray) -> None:
        """Write ``ev``'s pages (and its zero pages ``z``) now that their blocks are reserved."""
        mem, tracker, written = self.mem, self.tracker, self.written
        if len(ev.indices) or z.size:
            mem.prep.reserve_skipped(ev.indices)
        if len(ev.indices):
            data = page_payload(ev, chunk_pages=self.chunk_pages)
            digests = ev.chunk_digests
            if ev.in_place:
                with self._lock:
                    self.rec.pages_in_place += len(ev.indices)
                first = int(ev.indices[0])
                for hasher in self._hashers:
                    if digests is None:
                        digests = hasher.take(first)
            else:
                mem.write_pages(ev.indices, data, allocated=written[ev.indices])
            written[ev.indices] = True
            tracker.received(ev.indices, data, digests)
        if z.size:
            mem.zero(z)
            tracker.zeroed_pages(z)

    def stop_populating(self) -> None:
        """Downtime has begun: stop competing with it for CPU and memory bandwidth (the few
        pages still to come fault in)."""
        self.mem.prep.stop_populate(wait=False)

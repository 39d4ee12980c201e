"""Page and chunk digests (xxh3_64), kept in NumPy arrays.

Two granularities:

* **Page digests** (one uint64 per 4 KiB page): the source's record of what
  the destination holds.  They are always computed from the exact bytes that
  were sent (DESIGN invariant 1): the sender copies pages into a staging
  buffer, hashes the copy, sends the copy.
* **Chunk digests** (one uint64 per ``chunk_pages`` pages, 128 KiB by
  default): cheap to compute over a whole region because xxh3 runs at memory
  speed on large inputs and releases the GIL above 64 KiB, so two threads
  hash in parallel.  Both sides compute them over real memory, which makes
  them an end-to-end check: a chunk whose digests agree holds the same bytes
  on both sides.  The source compares its live chunk digests with the
  destination's to find candidate chunks, then compares page digests inside
  those chunks only.

Per-page hashing in Python costs ~0.2 us a page over prebuilt memoryviews
and ~0.6 us when the views are built on the fly, so the hot paths reuse
prebuilt views of fixed staging buffers.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import xxhash

from precopy.memory.region import is_run
from precopy.protocol import PAGE_SIZE

__all__ = [
    "ZERO_PAGE_DIGEST",
    "StagingBuffer",
    "page_digests",
    "chunk_pages_of",
    "page_union",
    "page_difference",
    "sorted_distinct",
    "chunk_digests",
    "live_page_digests",
    "chunks_of_page_digests",
    "ChunkTracker",
    "zero_chunk_digests",
    "region_chunk_digests",
    "changed",
]

_h64 = xxhash.xxh3_64_intdigest
ZERO_PAGE_DIGEST: int = _h64(bytes(PAGE_SIZE))


def changed(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Indices where two digest tables differ (vectorised)."""
    return np.flatnonzero(old != new)


class StagingBuffer:
    """A reusable ``(capacity, PAGE_SIZE)`` buffer with prebuilt page views.

    ``load(pages)`` copies pages in; ``digests(n)`` hashes the first ``n``
    staged pages.  The views are built once, so hashing costs only the
    xxh3 call per page.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.array = np.empty((capacity, PAGE_SIZE), dtype=np.uint8)
        mv = self.array.data.cast("B")
        self._views = [mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(capacity)]
        self.n = 0

    def load(self, src: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Copy ``src[indices]`` into the buffer; returns the staged pages."""
        n = len(indices)
        if n > self.capacity:
            raise ValueError(f"{n} pages do not fit a staging buffer of {self.capacity}")
        out = self.array[:n]
        if is_run(indices):
            np.copyto(out, src[int(indices[0]):int(indices[-1]) + 1])
        else:
            np.take(src, indices, axis=0, out=out)
        self.n = n
        return out

    def digests(self, n: int | None = None) -> np.ndarray:
        n = self.n if n is None else n
        return np.fromiter(map(_h64, self._views[:n]), dtype=np.uint64, count=n)

    def view(self, n: int | None = None) -> memoryview:
        n = self.n if n is None else n
        if n == 0:
            return memoryview(b"")
        return self.array[:n].data.cast("B")


#: The destination's background refresh waits until no page has arrived
#: for this long.  A scattered page costs its whole chunk's rehash, and a
#: refresh while a round streams in rehashed a chunk again for every page
#: that landed in it since the last: at 200,000 pages/s each 1 MiB batch of
#: scattered pages cost ~32 MiB of hashing, most of the destination's CPU.
#: Chunks still stale when the source asks for the table are hashed then,
#: once a round.
_QUIET_S = 0.02

#: Pages hashed per block in :func:`page_digests`: bounds the memoryviews
#: alive at once (~200 bytes each) whatever the number of pages.
_PAGE_BLOCK = 4096


def page_digests(pages: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
    """xxh3_64 of the given pages of a ``(npages, PAGE_SIZE)`` array.

    Builds one view per page, a block of pages at a time (memory stays a
    few hundred KiB however many pages are asked for): use for scattered
    sets (the pages of candidate chunks), not for whole regions.
    """
    flat = np.ascontiguousarray(pages).reshape(-1).data.cast("B")
    if indices is None:
        indices = np.arange(pages.shape[0])
    n = len(indices)
    out = np.empty(n, dtype=np.uint64)
    pos = np.asarray(indices, dtype=np.int64) * PAGE_SIZE
    for lo in range(0, n, _PAGE_BLOCK):
        offs = pos[lo:lo + _PAGE_BLOCK].tolist()
        out[lo:lo + len(offs)] = np.fromiter(
            map(_h64, [flat[o:o + PAGE_SIZE] for o in offs]), dtype=np.uint64, count=len(offs))
    return out


def live_page_digests(pages: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """xxh3_64 of every page of a region; pages where ``zero`` is True get the zero page's, unread.

    ``zero`` (a per-page mask, or None) names pages known to read as zeros
    without reading them: file holes, whose read would allocate them.
    """
    if zero is None or not zero.any():
        return page_digests(pages)
    out = np.full(pages.shape[0], ZERO_PAGE_DIGEST, dtype=np.uint64)
    todo = np.flatnonzero(~zero)
    out[todo] = page_digests(pages, todo)
    return out


def chunks_of_page_digests(table: np.ndarray, chunk_pages: int, chunks: np.ndarray | None = None) -> np.ndarray:
    """Chunk digests *by page*: xxh3_64 of each chunk's page digests (uint64 little endian, in order).

    ``table`` holds one digest per page of the region (the last chunk may be
    short); ``chunks`` limits the work to those chunk numbers.  Two regions
    whose page digests agree agree on these, and a page rewritten costs its
    own hash plus 256 bytes of its chunk's, not the whole chunk's bytes.
    """
    flat = np.ascontiguousarray(table, dtype="<u8").data.cast("B")
    step = chunk_pages * 8
    if chunks is None:
        offs: Sequence[int] = range(0, flat.nbytes, step)
    else:
        offs = (np.asarray(chunks, dtype=np.int64) * step).tolist()
    return np.fromiter(map(_h64, [flat[o:o + step] for o in offs]), dtype=np.uint64, count=len(offs))


# Set operations on page numbers, through a mask of the region: O(n), where
# NumPy 2's np.unique/union1d/setdiff1d cost ~190 ms for 250,000 distinct
# pages here (measured): most of a round at a high dirty rate.


def page_union(npages: int, *sets: np.ndarray) -> np.ndarray:
    """Sorted distinct pages in any of ``sets`` (each within ``0..npages-1``), as uint32."""
    sets = tuple(x for x in sets if len(x))
    if not sets:
        return np.zeros(0, dtype=np.uint32)
    if len(sets) == 1 and _is_strictly_increasing(sets[0]):
        return np.asarray(sets[0], dtype=np.uint32)
    mask = np.zeros(npages, dtype=bool)
    for x in sets:
        mask[x] = True
    return np.flatnonzero(mask).astype(np.uint32)


def page_difference(npages: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted distinct pages of ``a`` not in ``b``, as uint32."""
    if not len(a):
        return np.zeros(0, dtype=np.uint32)
    mask = np.zeros(npages, dtype=bool)
    mask[a] = True
    mask[b] = False
    return np.flatnonzero(mask).astype(np.uint32)


def sorted_distinct(x: np.ndarray) -> np.ndarray:
    """The distinct values of an ascending array (np.unique without its cost)."""
    if len(x) < 2:
        return np.asarray(x)
    keep = np.empty(len(x), dtype=bool)
    keep[0] = True
    np.not_equal(x[1:], x[:-1], out=keep[1:])
    return x[keep]


def _is_strictly_increasing(x: np.ndarray) -> bool:
    return len(x) < 2 or bool((np.diff(x.astype(np.int64)) > 0).all())


def chunk_pages_of(chunks: np.ndarray, chunk_pages: int, npages: int) -> np.ndarray:
    """Every page of the given chunks, in order (the last chunk may be short), as uint32."""
    pages = (np.asarray(chunks, dtype=np.int64)[:, None] * chunk_pages + np.arange(chunk_pages)).ravel()
    return pages[pages < npages].astype(np.uint32)


def _chunk_range(flat: memoryview, offs: Sequence[int], chunk_bytes: int) -> list[int]:
    return [_h64(flat[o:o + chunk_bytes]) for o in offs]


def chunk_digests(
    flat: memoryview,
    chunk_bytes: int,
    executor: ThreadPoolExecutor | None = None,
    chunks: np.ndarray | None = None,
) -> np.ndarray:
    """xxh3_64 of each ``chunk_bytes`` slice of ``flat`` (the last may be short).

    ``chunks`` limits the work to those chunk numbers (the result then has
    one entry per listed chunk).  With an ``executor`` the work is split in
    two halves hashed in parallel threads (xxh3 releases the GIL on inputs
    over 64 KiB).
    """
    size = flat.nbytes
    if chunks is None:
        offs = list(range(0, size, chunk_bytes))
    else:
        offs = (np.asarray(chunks, dtype=np.int64) * chunk_bytes).tolist()
    if executor is None or len(offs) < 8:
        return np.array(_chunk_range(flat, offs, chunk_bytes), dtype=np.uint64)
    half = len(offs) // 2
    parts = executor.map(_chunk_range, (flat, flat), (offs[:half], offs[half:]),
                         (chunk_bytes, chunk_bytes))
    out = np.empty(len(offs), dtype=np.uint64)
    a, b = parts
    out[:half] = a
    out[half:] = b
    return out


def zero_chunk_digests(size: int, chunk_bytes: int) -> np.ndarray:
    """Digests of every chunk of an all-zero region of ``size`` bytes."""
    nchunks = -(-size // chunk_bytes)
    out = np.full(nchunks, _h64(bytes(chunk_bytes)), dtype=np.uint64)
    tail = size - (nchunks - 1) * chunk_bytes
    if nchunks and tail != chunk_bytes:
        out[-1] = _h64(bytes(tail))
    return out


def region_chunk_digests(flat: memoryview, chunk_pages: int, holes: np.ndarray | None,
                         executor: ThreadPoolExecutor | None = None, chunks: np.ndarray | None = None
                         ) -> np.ndarray:
    """Chunk digests of a live region, skipping chunks that lie wholly in file holes.

    ``holes`` is a per-page mask (see ``GuestMemory.hole_pages``); those
    chunks get the zero digest without being read.  ``chunks`` limits the
    work to those chunk numbers (one digest each, in their order).
    """
    chunk_bytes = chunk_pages * PAGE_SIZE
    if holes is None or not holes.any():
        return chunk_digests(flat, chunk_bytes, executor, chunks)
    out = zero_chunk_digests(flat.nbytes, chunk_bytes)
    npages = holes.size
    pad = (-npages) % chunk_pages
    whole = np.asarray(np.concatenate([holes, np.ones(pad, dtype=bool)]).reshape(-1, chunk_pages).all(axis=1))
    which = np.arange(len(out)) if chunks is None else np.asarray(chunks, dtype=np.int64)
    out, whole = out[which], whole[which]
    todo = np.flatnonzero(~whole)
    if todo.size:
        out[todo] = chunk_digests(flat, chunk_bytes, executor, which[todo])
    return out


class ChunkTracker:
    """The destination's chunk digests, kept fresh as pages arrive.

    The receive path calls :meth:`mark` after writing pages; a background
    thread rehashes stale chunks; :meth:`table` brings every chunk up to
    date and returns the digests.  A chunk is marked stale *after* its pages
    are written and unmarked *before* it is hashed, so a write racing with
    the hash leaves it stale, never wrongly fresh.

    After :meth:`by_page` (the source asked for chunk tables by page), it
    keeps a digest per page instead: :meth:`received` hashes the pages it
    is given (read back from the region), and a stale chunk's digest is
    recomputed from its pages' digests (:func:`chunks_of_page_digests`),
    256 bytes instead of 128 KiB.
    """

    #: One digest per page once :meth:`by_page` was called; None before.
    page_table: np.ndarray | None = None
    _pages: np.ndarray

    def __init__(self, flat: memoryview, chunk_pages: int, executor: ThreadPoolExecutor) -> None:
        self.flat = flat
        self.chunk_pages = chunk_pages
        self.chunk_bytes = chunk_pages * PAGE_SIZE
        self.nchunks = -(-flat.nbytes // self.chunk_bytes)
        self.digests = chunk_digests(flat, self.chunk_bytes, executor) if flat.nbytes else np.zeros(0, np.uint64)
        self.stale = np.zeros(self.nchunks, dtype=bool)
        self.cold = np.zeros(self.nchunks, dtype=bool)
        self._executor = executor
        self._lock = threading.Lock()  # one refresher at a time
        self._wake = threading.Event()
        self._stop = threading.Event()  # close() ends the quiet wait at once
        self._closed = False
        self._last_mark = 0.0
        self._thread = threading.Thread(target=self._run, name="precopy-chunks", daemon=True)
        self._thread.start()

    @classmethod
    def zeroed(cls, flat: memoryview, chunk_pages: int, executor: ThreadPoolExecutor) -> ChunkTracker:
        """A tracker for a fresh all-zero region: digests known without reading it."""
        return cls._blank(flat, chunk_pages, executor, zero_chunk_digests(flat.nbytes, chunk_pages * PAGE_SIZE))

    @classmethod
    def unread(cls, flat: memoryview, chunk_pages: int, executor: ThreadPoolExecutor) -> ChunkTracker:
        """A tracker for a region with unknown contents, read only when asked.

        Every chunk is *cold*: :meth:`table` hashes those still cold, but the
        background refresh leaves them alone, so chunks the migration
        overwrites whole (:meth:`received`) are never read at all.
        """
        self = cls._blank(flat, chunk_pages, executor, np.zeros(-(-flat.nbytes // (chunk_pages * PAGE_SIZE)),
                                                                dtype=np.uint64))
        self.cold[:] = True
        return self

    @classmethod
    def _blank(cls, flat: memoryview, chunk_pages: int, executor: ThreadPoolExecutor,
               digests: np.ndarray) -> ChunkTracker:
        self = cls.__new__(cls)
        self.flat = flat
        self.chunk_pages = chunk_pages
        self.chunk_bytes = chunk_pages * PAGE_SIZE
        self.nchunks = -(-flat.nbytes // self.chunk_bytes)
        self.digests = digests
        self.stale = np.zeros(self.nchunks, dtype=bool)
        self.cold = np.zeros(self.nchunks, dtype=bool)
        self._executor = executor
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()  # close() ends the quiet wait at once
        self._closed = False
        self._last_mark = 0.0
        self._thread = threading.Thread(target=self._run, name="precopy-chunks", daemon=True)
        self._thread.start()
        return self

    def by_page(self, maybe_data: np.ndarray) -> int:
        """Keep chunk digests by page from now on; returns the pages read to start the page table.

        Every page is hashed once, from memory, except those ``maybe_data``
        (a per-page mask) says still read as zeros without a block: reading
        them would allocate them.  Idempotent.
        """
        with self._lock:
            if self.page_table is not None:
                return 0
            flat = np.frombuffer(self.flat, dtype=np.uint8)[:self.flat.nbytes // PAGE_SIZE * PAGE_SIZE]
            self._pages = flat.reshape(-1, PAGE_SIZE)
            zero = ~np.asarray(maybe_data, dtype=bool)
            self.page_table = live_page_digests(self._pages, zero)
            self.digests = chunks_of_page_digests(self.page_table, self.chunk_pages)
            self.stale[:] = False
            self.cold[:] = False
            return int(zero.size - np.count_nonzero(zero))

    def mark(self, page_indices: np.ndarray) -> None:
        if len(page_indices):
            self.stale[page_indices // self.chunk_pages] = True
            self._wake_refresh()

    def zeroed_pages(self, page_indices: np.ndarray) -> None:
        """Account pages just set to zeros."""
        if self.page_table is not None and len(page_indices):
            self.page_table[page_indices] = ZERO_PAGE_DIGEST
        self.mark(page_indices)

    def _wake_refresh(self) -> None:
        # Event.set takes a lock and notifies (7 % of a destination's busy
        # time at 200,000 pages/s, once per batch): only when not yet set.
        # The refresher clears the event before it reads ``stale``, so a
        # mark that finds it set is still seen.
        self._last_mark = time.monotonic()
        if not self._wake.is_set():
            self._wake.set()

    def received(self, page_indices: np.ndarray, data: memoryview,
                 digests: np.ndarray | None = None) -> None:
        """Account pages just written from ``data`` (their bytes, in order).

        Chunks the batch covers whole get their digests from ``data`` now,
        while it is in the CPU cache, instead of being read back from memory
        later (or ``digests``, already checked against ``data``, when the
        pages are exactly whole chunks); the rest are marked stale.  Call
        after the write.
        """
        n = len(page_indices)
        if not n:
            return
        if self.page_table is not None:
            # Read back from the region, not taken from ``data``: what landed
            # is what is verified.  Just written, it is still in the CPU
            # cache; the chunks' digests follow on refresh.
            self.page_table[page_indices] = page_digests(self._pages, page_indices)
            self.mark(page_indices)
            return
        cp = self.chunk_pages
        first, last = int(page_indices[0]), int(page_indices[-1])
        npages = self.flat.nbytes // PAGE_SIZE
        if last - first != n - 1 or n < cp:
            self.mark(page_indices)
            return
        lo = -(-first // cp)  # first chunk the run covers whole
        hi = (last + 1) // cp  # one past the last whole chunk
        if last + 1 == npages:
            hi = self.nchunks  # a short last chunk is whole when the run reaches the end
        if hi <= lo:
            self.mark(page_indices)
            return
        if digests is None or len(digests) != hi - lo:
            base = (lo * cp - first) * PAGE_SIZE
            offs = range(base, base + (hi - lo) * self.chunk_bytes, self.chunk_bytes)
            digests = np.array(_chunk_range(data, offs, self.chunk_bytes), dtype=np.uint64)
        with self._lock:  # not while a refresh may be hashing these chunks
            self.digests[lo:hi] = digests
            self.stale[lo:hi] = False
            self.cold[lo:hi] = False
        if first < lo * cp:
            self.stale[first // cp] = True
        if hi < self.nchunks and last >= hi * cp:
            self.stale[hi] = True
        if first < lo * cp or (hi < self.nchunks and last >= hi * cp):
            self._wake_refresh()

    def refresh(self, *, cold: bool = False) -> int:
        """Rehash every stale chunk now (and the cold ones with ``cold``); returns how many."""
        with self._lock:
            todo = np.flatnonzero(self.stale | self.cold if cold else self.stale)
            if not todo.size:
                return 0
            self.stale[todo] = False
            self.cold[todo] = False
            if self.page_table is not None:
                self.digests[todo] = chunks_of_page_digests(self.page_table, self.chunk_pages, todo)
            else:
                self.digests[todo] = chunk_digests(self.flat, self.chunk_bytes, self._executor, todo)
            return int(todo.size)

    def table(self) -> np.ndarray:
        """Fresh digests of every chunk (refreshes first)."""
        self.refresh(cold=True)
        return self.digests

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(0.05)
            # Only in a pause of the stream (see _QUIET_S).
            while not self._closed and (left := self._last_mark + _QUIET_S - time.monotonic()) > 0:
                self._stop.wait(left)
            self._wake.clear()
            if self._closed:
                return
            self.refresh()

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join()

"""Dirty-page tracking for the source: digests, or the kernel's write tracking.

Two trackers answer "which pages changed since I last looked?":

* **digest** (always available): hash every chunk of the live region and
  compare with the destination's chunk table (``precopy.session.scanner.DigestScanner``).
  Costs a full rehash per round and, worse, one while the workload is paused.
* **uffd-wp**: the guest hands the agent a userfaultfd; the agent registers
  the guest's mapping for async write-protect and asks the kernel with
  ``PAGEMAP_SCAN`` (:mod:`precopy.memory.uffd`): ~1-3 ms per GiB, no rehash.

With uffd-wp the digests keep their job (DESIGN invariants 1 and 2): pages
are still hashed from the staged copy as they are sent, and the final
verification still compares the destination's chunk table with the source's
chunk table of the frozen region.  That source table (:class:`SourceChunks`)
is computed once over the live region, then kept current by rehashing, after
every scan, the chunks holding pages the kernel reported; while the
workload is paused only the chunks of the last scan's pages are rehashed.
A chunk the tracker never reports is trusted from its last hash: a write the
kernel missed before that hash is caught and repaired by the verification,
one after it could not be.

What the kernel does not report is handled here: a hole punched into the
region file (``fallocate(PUNCH_HOLE)``, ``MADV_REMOVE``) turns a page to
zeros without a write (and drops a pending "written" mark), so each scan
also walks the file's holes and treats as dirty every page that became a
hole since the previous scan or that is a hole although what we last sent
there was not zero.  A chunk digest left stale by such a race is caught by
the verification, which rehashes the chunks it finds different before
repairing them.  Writes that bypass the guest's
mapping (``write(2)`` to the file, another process's mapping) cannot be
seen: :func:`check_guest_mapping` refuses a guest that maps the region
twice, and docs/TRACKING.md says what a guest must not do.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from precopy.memory.digest import (
    ZERO_PAGE_DIGEST,
    chunk_digests,
    chunk_pages_of,
    chunks_of_page_digests,
    live_page_digests,
    page_difference,
    page_digests,
    page_union,
    sorted_distinct,
)
from precopy.errors import GuestControlError
from precopy.memory.map_in import HUGETLBFS_MAGIC, TMPFS_MAGIC, fs_magic
from precopy.memory.region import GuestMemory
from precopy.memory.uffd import (
    PagemapScanner,
    TrackingUnavailable,
    probe_pagemap_scan,
    register_wp,
    unregister,
    writeprotect,
)
from precopy.protocol import PAGE_SIZE

__all__ = [
    "TRACKING_MODES",
    "TrackingOffer",
    "TrackingUnavailable",
    "UffdTracker",
    "SourceChunks",
    "check_guest_mapping",
    "select_tracker",
]

_log = logging.getLogger(__name__)

TRACKING_MODES = ("auto", "digest", "uffd-wp")

#: Extents of a regular region file walked for holes per scan (tmpfs and
#: hugetlbfs use residency instead); holes past it are not seen.
HOLE_WALK_EXTENTS = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


def maybe_data_held(sent: np.ndarray, held_zero: np.ndarray | None, pages: np.ndarray | slice = slice(None)
                    ) -> np.ndarray:
    """Per page of ``pages``: whether the destination may hold something other than zeros there.

    ``sent``: the source's record (digests; the zero page's digest means
    zeros); ``held_zero``: where the destination is known to hold zeros
    (``PageRecord.held_zero``, precopy.session.record), which is what counts once the record
    holds what the region read as last (chunk tables by page): a page read
    as a hole, then written and sent as data, keeps a zero digest there.
    A page is taken for zeros only where both say so.
    """
    out: np.ndarray = sent[pages] != ZERO_PAGE_DIGEST
    if held_zero is not None:
        out |= ~held_zero[pages]
    return out


class HoleFinder:
    """Which pages of the region are holes of its file, cheaply enough for the pause.

    On tmpfs and hugetlbfs a page is backed exactly when it is in the page
    cache, and punching a hole unmaps it from every mapping, ours included:
    ``mincore`` over our own mapping (ptes present since the full copy read
    every page) answers in ~1 ms per GiB.  Elsewhere a page out of the page
    cache need not be a hole, so the file's holes are walked
    (``SEEK_HOLE``), which costs more (up to ~15 ms per GiB on tmpfs, where
    that walk visits every cached page).
    """

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.by_residency = fs_magic(mem.path) in (TMPFS_MAGIC, HUGETLBFS_MAGIC)
        self._vec = np.zeros(mem.npages, dtype=np.uint8)

    def holes(self) -> np.ndarray:
        """Per-page mask: True where the page is a hole (reads as zeros)."""
        if self.by_residency:
            if _libc.mincore(self.mem.array.ctypes.data, self.mem.size, self._vec.ctypes.data) == 0:
                out: np.ndarray = (self._vec & 1) == 0
                return out
            _log.debug("mincore failed (%s): walking holes instead", os.strerror(ctypes.get_errno()))
        return self.mem.hole_pages(max_extents=HOLE_WALK_EXTENTS)


@dataclass(slots=True)
class TrackingOffer:
    """What a guest handed over: its userfaultfd and its mapping of the region."""

    fd: int  # our copy of the guest's userfaultfd
    pid: int  # the guest, as the control socket's peer credentials name it
    start: int  # address of the region's mapping in the guest
    length: int  # bytes


def check_guest_mapping(pid: int, start: int, length: int, region: os.PathLike[str] | str) -> None:
    """Check that ``pid`` maps ``region`` once, shared, whole, at ``start``.

    Raises :class:`TrackingUnavailable` naming what does not fit: the range
    is not one shared mapping of the region file from offset 0, or the
    region is also mapped elsewhere in the guest (writes there would be
    missed).
    """
    st = os.stat(region)
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TrackingUnavailable(f"cannot read /proc/{pid}/maps: {exc.strerror}") from exc
    covered = 0
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        lo_s, _, hi_s = fields[0].partition("-")
        perms, offset, dev, inode = fields[1], int(fields[2], 16), fields[3], int(fields[4])
        major, _, minor = dev.partition(":")
        if inode != st.st_ino or os.makedev(int(major, 16), int(minor, 16)) != st.st_dev:
            continue
        lo, hi = int(lo_s, 16), int(hi_s, 16)
        inside = start <= lo and hi <= start + length
        overlaps = lo < start + length and start < hi
        if overlaps and not inside:
            raise TrackingUnavailable(
                f"the offered range {start:#x}+{length} is not one whole mapping of {region} in process "
                f"{pid}: its mapping {lo:#x}-{hi:#x} straddles the range's edge"
            )
        if not inside:
            if "w" in perms:
                raise TrackingUnavailable(
                    f"the guest also maps {region} writable at {lo:#x}-{hi:#x}, outside the offered "
                    "range: writes there would not be tracked"
                )
            continue
        if perms[3] != "s" or offset != lo - start:
            raise TrackingUnavailable(
                f"the guest's mapping {lo:#x}-{hi:#x} of {region} is not a shared mapping at offset "
                f"{lo - start} (perms {perms}, offset {offset})"
            )
        covered += hi - lo
    if covered != length or length != st.st_size:
        raise TrackingUnavailable(
            f"the offered range {start:#x}+{length} is not one whole mapping of {region} "
            f"({st.st_size} bytes) in process {pid} ({covered} bytes of it found)"
        )


class UffdTracker:
    """Kernel write tracking of one guest's mapping of the region.

    :meth:`arm` registers and write-protects the range (call it before the
    first page is read for sending); :meth:`scan` returns the pages written
    since the previous scan, plus pages that became holes of the file.
    :meth:`close` unregisters and closes the fd.

    :meth:`rearm` re-protects the pages of a batch just before they are
    read for sending (QEMU clears KVM's dirty log the same way, chunk by
    chunk before sending it): a page written before its send then goes
    once, not once now and again because the next scan reports that
    write.  What ``rearm`` finds written is not lost: pages of the range
    that are not being sent are reported by the next :meth:`scan`, and
    every page it found is in the next :meth:`take_rewritten` (written
    since the last scan, so their chunk digests must be rehashed).
    """

    name = "uffd-wp"

    def __init__(self, offer: TrackingOffer, mem: GuestMemory) -> None:
        self.offer = offer
        self.mem = mem
        self._registered = False
        self.scanner: PagemapScanner | None = None
        self._holes = np.zeros(mem.npages, dtype=bool)
        self._arm_holes: np.ndarray | None = None
        self._hole_finder = HoleFinder(mem)
        self._carried: list[np.ndarray] = []  # found by rearm, not being sent: for the next scan
        self._rewritten: list[np.ndarray] = []  # found by rearm: written since the last scan
        try:
            if offer.length != mem.size:
                raise TrackingUnavailable(
                    f"the guest offered {offer.length} bytes of tracking, the region is {mem.size}"
                )
            if offer.start % PAGE_SIZE:
                raise TrackingUnavailable(f"the guest's mapping address {offer.start:#x} is not page aligned")
            try:
                kind = os.readlink(f"/proc/self/fd/{offer.fd}")
            except OSError as exc:
                raise TrackingUnavailable(f"the fd the guest passed is unusable: {exc.strerror}") from exc
            if kind != "anon_inode:[userfaultfd]":
                raise TrackingUnavailable(f"the guest passed {kind}, not a userfaultfd")
            probe_pagemap_scan()
            check_guest_mapping(offer.pid, offer.start, offer.length, mem.path)
            self.scanner = PagemapScanner(offer.pid, offer.start, offer.length)
        except BaseException:
            self.close()
            raise

    def arm(self) -> float:
        """Register and write-protect the guest's range; returns the seconds it took.

        Pages written before this call are not reported: arm before reading
        any page to send.
        """
        assert self.scanner is not None
        t = time.monotonic()
        register_wp(self.offer.fd, self.offer.start, self.offer.length)
        self._registered = True
        writeprotect(self.offer.fd, self.offer.start, self.offer.length)
        # A first scan proves the kernel tracks the range we will scan (it
        # fails if the fd's address space is not the one of /proc/<pid>).
        self.scanner.scan()
        # The file's holes walked once (SEEK_HOLE), for this baseline and for
        # the full copy (take_arm_holes): mincore here, over a mapping not
        # mapped in yet, looks up every page in the page cache (~10-25 ms a
        # GiB), and the full copy walked the holes again.  The walk takes a
        # swapped-out tmpfs page for data, where mincore says hole: the next
        # scan then reports it (resent by reading it), never the other way.
        self._holes = self._arm_holes = self.mem.hole_pages()
        return time.monotonic() - t

    def take_arm_holes(self) -> np.ndarray | None:
        """The holes found by :meth:`arm` (after arming), once: the full copy's (PageSender.send_all)."""
        holes, self._arm_holes = self._arm_holes, None
        return holes

    def scan(self, sent: np.ndarray | None = None, *, held_zero: np.ndarray | None = None,
             rearm: bool = True) -> np.ndarray:
        """Pages written (or hole-punched) since the previous scan; re-arms them (unless not ``rearm``:
        the last scan of a workload that never runs here again -- write-protecting every page it
        wrote costs ~11 ms per GiB).

        ``sent``: the source's record of digests, per page, and
        ``held_zero``: where the destination is known to hold zeros (see
        :func:`maybe_data_held`); a hole where the destination may hold
        data is reported too, whenever it became a hole.  (Became a hole
        "since the previous scan" is not enough: a page that was a hole
        then, read or written and sent as data since, and punched again,
        was a hole at both scans.)
        """
        assert self.scanner is not None
        written = self.scanner.scan(rearm=rearm)
        if self._carried:
            written = page_union(self.mem.npages, written, *self._carried)
            self._carried.clear()
        holes = self._hole_finder.holes()
        at = np.flatnonzero(holes)  # looked at only where holes are (few, usually: a pass, not four)
        gone = ~self._holes[at]
        if sent is not None:
            gone |= maybe_data_held(sent, held_zero, at)
        punched = at[gone].astype(np.uint32)
        self._holes = holes
        if punched.size:
            _log.info("%d pages became holes of %s since the last scan: resending them as zeros",
                      punched.size, self.mem.path)
            return page_union(self.mem.npages, written, punched)
        return written

    def rearm(self, sending: np.ndarray) -> None:
        """Re-protect the range of ``sending`` (ascending pages, about to be read for sending).

        Every page of the range that is not in ``sending`` must be one the
        caller is not sending at all in this pass: it is reported by the
        next :meth:`scan` if it was written (a write before this call, and
        after the page was last sent).
        """
        assert self.scanner is not None
        if not len(sending):
            return
        lo, hi = int(sending[0]), int(sending[-1]) + 1
        written = self.scanner.scan(first=lo, stop=hi)
        if not written.size:
            return
        self._rewritten.append(written)
        if hi - lo != len(sending):
            rest = written[~np.isin(written, sending, assume_unique=True)]
            if rest.size:
                self._carried.append(rest)

    def take_rewritten(self) -> np.ndarray:
        """Pages :meth:`rearm` found written since the last call (sorted, distinct)."""
        if not self._rewritten:
            return np.zeros(0, dtype=np.uint32)
        out = page_union(self.mem.npages, *self._rewritten)
        self._rewritten.clear()
        return out

    def close(self) -> None:
        if self._registered:
            try:
                unregister(self.offer.fd, self.offer.start, self.offer.length)
            except TrackingUnavailable as exc:
                # The guest exited (its address space is gone): nothing to undo.
                _log.debug("unregistering the guest's range: %s", exc)
            self._registered = False
        if self.scanner is not None:
            self.scanner.close()
            self.scanner = None
        if self.offer.fd >= 0:
            try:
                os.close(self.offer.fd)
            except OSError as exc:
                _log.debug("closing the userfaultfd: %s", exc)
            self.offer.fd = -1


class SourceChunks:
    """The source's chunk digests of its region, for the final verification.

    Computed once over the live region (:meth:`adopt`), then kept current by
    :meth:`rehash` of the chunks whose pages a tracker reported.  Valid as
    long as the tracker reports every write after the hash.

    A rehash may be *deferred* while the workload dirties most chunks every
    round (a fast writer): hashing a chunk that the next round dirties again
    is wasted, and at 200,000 pages/s it was a whole-region hash a round
    (~100 ms of two cores).  Deferred chunks stay in :attr:`stale` until a
    rehash that is not deferred; :meth:`backlog` counts them, and the
    downtime estimate with it, so the pause never inherits them unawares.

    After :meth:`to_pages` the chunk digests are *by page* (see
    :func:`chunks_of_page_digests`): a scattered page costs its own 4 KiB
    hash instead of its chunk's 128 KiB, which is what a writer that
    touches most chunks every round needs.  The page digests are kept in
    the source's record (``sent``), which from then on holds the digest of
    every page as last read from the region.
    """

    def __init__(self, mem: GuestMemory, chunk_pages: int, executor: ThreadPoolExecutor) -> None:
        self.mem = mem
        self.chunk_pages = chunk_pages
        self.executor = executor
        self.table: np.ndarray | None = None
        self.seconds_per_chunk = 0.0
        self.seconds_per_page = 0.0
        self.by_page = False
        self.stale = np.zeros(-(-mem.npages // chunk_pages), dtype=bool)
        #: Chunk digests taken during the full copy (:meth:`hash_early`), which
        #: chunks have one, and the seconds they took.
        self.early = np.zeros(len(self.stale), dtype=np.uint64)
        self.early_known = np.zeros(len(self.stale), dtype=bool)
        self.early_s = 0.0
        self._early_lock = threading.Lock()

    def hash_early(self, first: int, stop: int) -> None:
        """Hash now the chunks that pages ``first`` up to ``stop`` cover whole (for the first table).

        Call after those pages were re-protected (:meth:`UffdTracker.rearm`)
        and before the first scan: a write after the re-protection is
        reported by the tracker, as after the whole-region hash the first
        scan would otherwise take, so the digest is as good a start --
        without a second pass over the region after the full copy (~0.1
        CPU-s and ~0.1 s a GiB here).  The full copy calls it right before
        each run's send, whose copy then reads the run from the CPU cache.
        """
        cp = self.chunk_pages
        lo = -(-first // cp)
        hi = len(self.early) if stop >= self.mem.npages else stop // cp
        if hi <= lo:
            return
        t = time.monotonic()
        self.early[lo:hi] = chunk_digests(self.mem.view, cp * PAGE_SIZE, None, np.arange(lo, hi))
        self.early_known[lo:hi] = True
        with self._early_lock:  # (the extra streams' sending threads hash their runs' chunks too)
            self.early_s += time.monotonic() - t

    def adopt(self, table: np.ndarray, seconds: float) -> None:
        """Take a full live chunk hash (``seconds``: what it cost) as the starting table."""
        self.table = table
        self.seconds_per_chunk = seconds / max(len(table), 1)
        self.stale[:] = False

    def chunks_of(self, pages: np.ndarray) -> np.ndarray:
        return sorted_distinct(np.sort(pages // self.chunk_pages)) if len(pages) else np.zeros(0, dtype=np.uint32)

    @property
    def backlog(self) -> int:
        """Chunks whose rehash was deferred (see the class docstring)."""
        return int(np.count_nonzero(self.stale))

    def would_rehash(self, pages: np.ndarray) -> int:
        """Chunks a rehash of ``pages`` that is not deferred would hash (the backlog included)."""
        touched = self.stale.copy()
        touched[self.chunks_of(pages)] = True
        return int(np.count_nonzero(touched))

    def to_pages(self, pages: np.ndarray, sent: np.ndarray, known: np.ndarray,
                 holes: np.ndarray | None, *, held_zero: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Switch to chunk digests by page: hash every page once.

        Call right after a tracker scan that reported ``pages``, instead of
        its rehash: writes from then on are reported by the next.
        ``sent``/``known``: the source's record, which becomes the page
        table (every page known); ``holes``: pages in file holes, taken as
        zeros unread.  Returns the seconds it took and more pages to send:
        as :meth:`rehash` does for the chunks it reads, the pages not in
        ``pages`` that read as zeros although what was sent there was not
        (reading a hole just punched allocates it, which hides it from the
        next scan's hole check).  ``held_zero``: see :func:`maybe_data_held`.
        """
        t = time.monotonic()
        step = 1 << 16  # bounds the temporary arrays
        zeroed = []
        for lo in range(0, self.mem.npages, step):
            hi = min(lo + step, self.mem.npages)
            now = live_page_digests(self.mem.pages[lo:hi], None if holes is None else holes[lo:hi])
            zeroed.append(lo + np.flatnonzero((now == ZERO_PAGE_DIGEST)
                                              & maybe_data_held(sent, held_zero, slice(lo, hi))))
            sent[lo:hi] = now
        known[:] = True
        self.table = chunks_of_page_digests(sent, self.chunk_pages)
        self.stale[:] = False
        self.by_page = True
        s = time.monotonic() - t
        self.seconds_per_page = s / max(self.mem.npages, 1)
        extra = page_difference(self.mem.npages, np.concatenate(zeroed), pages) if zeroed else pages[:0]
        return s, extra

    def recompute(self, chunks: np.ndarray, sent: np.ndarray) -> np.ndarray:
        """Digests of ``chunks`` from the region as it is now (their pages' digests into ``sent``, by page)."""
        if not self.by_page:
            return chunk_digests(self.mem.view, self.chunk_pages * PAGE_SIZE, self.executor, chunks)
        pages = chunk_pages_of(chunks, self.chunk_pages, self.mem.npages)
        sent[pages] = page_digests(self.mem.pages, pages)
        return chunks_of_page_digests(sent, self.chunk_pages, chunks)

    @property
    def scattered_page_s(self) -> float:
        """What a scattered page written costs to rehash: its chunk, or by page itself."""
        return self.seconds_per_page if self.by_page else self.seconds_per_chunk

    def rehash(self, pages: np.ndarray, sent: np.ndarray, *, defer: bool = False,
               sending: np.ndarray | None = None, held_zero: np.ndarray | None = None
               ) -> tuple[float, np.ndarray]:
        """Rehash the chunks holding ``pages``; returns the seconds it took and more dirty pages.

        ``sending``: those of ``pages`` about to be sent (default: all); the
        others (written, but sent since: :meth:`UffdTracker.take_rewritten`)
        get the zero check below like unreported pages.  ``held_zero``:
        where the destination is known to hold zeros (see
        :func:`maybe_data_held`; by page, ``sent`` alone holds what the
        region read as last, not what was sent).

        With ``defer`` the chunks of ``pages`` are only marked stale, and
        the chunks deferred earlier that ``pages`` does not touch (quiet
        now) are rehashed; without it every stale chunk is rehashed too.

        Reading a chunk allocates the holes in it (tmpfs), which would hide
        a hole punched there a moment before from the next hole check.  So
        inside those chunks, the unreported pages that read as zeros now
        although what was sent there was not zero are returned, to be sent
        too.  Only pages whose first 8 bytes are zero are hashed for that
        (a strided read of 8 bytes per page), so it costs next to nothing.
        """
        assert self.table is not None
        if self.by_page:
            # Only what was written is read: a hole gets allocated here only
            # if it was punched into a page written and sent since the last
            # scan (not in ``sending``): such a page reading as zeros is sent
            # again, as in the chunk case below -- unless the destination
            # holds zeros there already.  Whether it does is not what
            # ``sent`` says: by page that is the page as last read, which
            # for a page read as a hole, written and sent as data since, is
            # the zero digest (``held_zero`` tells).
            t = time.monotonic()
            extra = np.zeros(0, dtype=np.uint32)
            if len(pages):
                now = page_digests(self.mem.pages, pages)
                if sending is not None:
                    zeroed = pages[(now == ZERO_PAGE_DIGEST) & maybe_data_held(sent, held_zero, pages)]
                    extra = page_difference(self.mem.npages, zeroed, sending)
                sent[pages] = now
                touched = self.chunks_of(pages)
                self.table[touched] = chunks_of_page_digests(sent, self.chunk_pages, touched)
                if len(pages) >= 256:
                    self.seconds_per_page = (time.monotonic() - t) / len(pages)
            return time.monotonic() - t, extra
        touched = self.chunks_of(pages)
        if defer:
            quiet = self.stale.copy()
            quiet[touched] = False
            self.stale[touched] = True
            chunks = np.flatnonzero(quiet).astype(np.uint32)
        else:
            self.stale[touched] = True
            chunks = np.flatnonzero(self.stale).astype(np.uint32)
        self.stale[chunks] = False
        if not chunks.size:
            return 0.0, np.zeros(0, dtype=np.uint32)
        t = time.monotonic()
        self.table[chunks] = chunk_digests(self.mem.view, self.chunk_pages * PAGE_SIZE, self.executor, chunks)
        s = time.monotonic() - t
        if chunks.size >= 8:
            self.seconds_per_chunk = s / chunks.size
        around = (chunks[:, None].astype(np.int64) * self.chunk_pages + np.arange(self.chunk_pages)).ravel()
        around = page_difference(self.mem.npages, around[around < self.mem.npages],
                                 pages if sending is None else sending)
        first_words = self.mem.array.view(np.uint64)[::PAGE_SIZE // 8]
        maybe = around[(first_words[around] == 0) & maybe_data_held(sent, held_zero, around)].astype(np.uint32)
        extra = maybe[page_digests(self.mem.pages, maybe) == ZERO_PAGE_DIGEST] if maybe.size else maybe
        return time.monotonic() - t, extra

    def estimate(self, pages: int) -> float:
        """Seconds to rehash the chunks of ``pages`` scattered pages and the backlog (an upper bound)."""
        assert self.table is not None
        if self.by_page:
            return pages * self.seconds_per_page
        return min(pages + self.backlog, len(self.table)) * self.seconds_per_chunk


async def select_tracker(mode: str, workload: object, mem: GuestMemory) -> tuple[UffdTracker | None, str]:
    """Choose the tracker for one migration: ``(tracker or None for digests, reason)``.

    ``auto`` falls back to digests with the reason; ``uffd-wp`` raises
    :class:`TrackingUnavailable` instead.  Never arms anything (see
    :meth:`UffdTracker.arm`).
    """
    if mode == "digest":
        return None, "digest tracking requested"
    offer_tracking = getattr(workload, "offer_tracking", None)
    try:
        if offer_tracking is None:
            describe = getattr(workload, "describe", lambda: "the workload")
            raise TrackingUnavailable(
                f"{describe()} cannot offer write tracking (only a guest-control guest can hand over "
                "a userfaultfd)"
            )
        offer = await offer_tracking()
        tracker = UffdTracker(offer, mem)
    except (TrackingUnavailable, GuestControlError, OSError) as exc:
        if mode == "uffd-wp":
            raise TrackingUnavailable(f"--tracking uffd-wp: {exc}") from exc
        return None, f"kernel write tracking unavailable ({exc}); using digests"
    return tracker, f"the guest offered its userfaultfd (pid {offer.pid}); the kernel supports async write-protect"

"""Background preparation of a region: reserve its blocks, map it in ahead of the receiver.

:class:`Preparation` runs the threads that make a region ready while pages
move: reserving a fresh file's blocks (``fallocate``) so that a write
through the mapping is never a SIGBUS, mapping a fresh tmpfs region in
writable ahead of the receiver (``MADV_POPULATE_WRITE``), and mapping an
existing region's pages in (:mod:`precopy.memory.map_in`) before they are
read or received into.  Each :class:`~precopy.memory.region.GuestMemory` has one,
``mem.prep``, and stops it before it unmaps the region.  The calls go
through ctypes and release the GIL, so they run beside the receive loop.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from pathlib import Path

import numpy as np

from precopy.errors import RegionError
from precopy.memory.map_in import MADV_POPULATE_READ, MapIn
from precopy.protocol import PAGE_SIZE

__all__ = ["MADV_POPULATE_READ", "MADV_POPULATE_WRITE", "Preparation", "reserve"]

_log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def reserve(fd: int, size: int, path: Path) -> bool:
    """Allocate the file's blocks now (``fallocate``, GIL released).

    On tmpfs or hugetlbfs a write into a page that cannot be allocated is a
    SIGBUS that would kill the whole daemon; reserving up front turns that
    into a clear error before any page moves.  Returns False where the file
    system cannot preallocate.
    """
    if _libc.fallocate(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    if err == errno.ENOSPC:
        raise RegionError(
            f"not enough space for a {size >> 20} MiB region in {path.parent} "
            "(free some, or point --memory-dir elsewhere)"
        )
    raise RegionError(f"cannot allocate {size >> 20} MiB for {path}: {os.strerror(err)}")



class Preparation:
    """The background work on one mapped region (see the module docstring).

    Made by :class:`~precopy.memory.region.GuestMemory` with the region's
    file descriptor and the address of its mapping; :meth:`close` stops
    every thread before the mapping goes.  ``by_pwrite``: the region is
    written with ``pwrite`` (see :meth:`GuestMemory.write_pages`), so it
    needs no preparation; ``reserved``: bytes from the start already known
    to be allocated.
    """

    def __init__(self, path: Path, fd: int, size: int, base: int, *, by_pwrite: bool,
                 reserved: int) -> None:
        self.path = path
        self.size = size
        self.npages = size // PAGE_SIZE
        self.by_pwrite = by_pwrite
        self._fd = fd
        self._base = base
        self._populate_thread: threading.Thread | None = None
        self._map_in_thread: threading.Thread | None = None
        self._populate_stop = threading.Event()
        self._prepare_abort = threading.Event()  # set by close()
        self.populate_error: OSError | None = None
        self.prepare_error: RegionError | None = None
        #: Bytes from the start known to be allocated (or skipped, see
        #: :meth:`start_prepare`); writes must stay below.
        self.reserved = reserved
        self._chunk = 1
        self._skipped: np.ndarray | None = None
        #: Bytes from the start that :meth:`start_populate_ahead` mapped in
        #: writable (pieces it skipped excepted: see :meth:`populated`).
        self.populated_upto = 0
        self._ahead_skipped: np.ndarray | None = None
        self._ahead_piece = 1
        #: Maps pages in for the copy (one read per fault-around window on tmpfs).
        self.map_in = MapIn(path, base, size)

    def _mapping(self) -> int:
        """The mapping's address, for a thread to work on; ValueError once the region is closed."""
        if self._prepare_abort.is_set():
            raise ValueError(f"region {self.path} is closed")
        return self._base

    def start_prepare(self, *, populate: bool = True, chunk: int = 8 * 1024 * 1024,
                      skip: np.ndarray | None = None) -> None:
        """Prepare a fresh region for receiving: in a background thread where it pays.

        A region written with ``pwrite`` (see :meth:`GuestMemory.write_pages`) needs
        nothing: ``pwrite`` allocates each page as it copies into it (a full
        file system is an ``ENOSPC`` error, never a signal), and the first
        write is the cheapest first touch there is.  Touching pages ahead in
        a thread was measured slower here: zeroing them first is work the
        copy then repeats (the first write to memory the machine has not used
        yet is the slow part, ~0.5-1 GB/s), and ``fallocate`` contends with
        ``pwrite`` for the file's lock.  So :attr:`reserved` covers the whole
        region at once.

        A region written through its mapping (hugetlbfs: no ``write(2)``) is
        prepared per chunk, in order, by a thread: it first reserves the
        blocks (``fallocate``), which advances :attr:`reserved`, then, with
        ``populate``, maps them writable (``MADV_POPULATE_WRITE``).  Both
        calls go through ctypes and release the GIL, so they run beside the
        receive loop.

        The receive path must not write past :attr:`reserved` (see
        :meth:`reserved_through`): on tmpfs a page that cannot be allocated is a
        SIGBUS, which would kill the process.  A reservation failure (file
        system full) is kept in :attr:`prepare_error`; a prefault failure only
        costs speed and is kept in :attr:`populate_error`.

        ``skip`` is a per-page mask of pages known to stay zero (the source's
        holes): chunks made only of them are neither reserved nor prefaulted,
        so a sparse region stays sparse.  A later write there reserves its
        pages on demand (:meth:`reserve_skipped`).
        """
        if self.by_pwrite:
            self.reserved = self.size
            return
        base = self._mapping()  # the thread is joined before the region is unmapped
        self.reserved = 0
        self._chunk = chunk
        skipped = np.zeros(-(-self.size // chunk), dtype=bool)
        self._skipped = skipped
        chunk_pages = chunk // PAGE_SIZE

        def run() -> None:
            can_reserve = True
            off = 0
            while off < self.size and not self._prepare_abort.is_set():
                n = min(chunk, self.size - off)
                first = off // PAGE_SIZE
                if skip is not None and skip[first:first + chunk_pages].all():
                    skipped[off // chunk] = True  # before the watermark moves past it
                    self.reserved = off + n
                    off += n
                    continue
                if can_reserve and _libc.fallocate(self._fd, 0, off, n) != 0:
                    err = ctypes.get_errno()
                    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                        can_reserve = False  # cannot know: let writes proceed
                    else:
                        self.prepare_error = RegionError(
                            f"cannot allocate the region {self.path} ({self.size >> 20} MiB): "
                            f"{os.strerror(err)}; free space in {self.path.parent} or point "
                            "--memory-dir elsewhere"
                        )
                        return
                if not can_reserve:
                    self.reserved = self.size
                else:
                    self.reserved = off + n
                if populate and not self._populate_stop.is_set() and self.populate_error is None:
                    if _libc.madvise(base + off, n, MADV_POPULATE_WRITE) != 0:
                        err = ctypes.get_errno()
                        self.populate_error = OSError(err, os.strerror(err))
                off += n

        self._populate_thread = threading.Thread(target=run, name="precopy-prepare", daemon=True)
        self._populate_thread.start()

    def reserve_skipped(self, indices: np.ndarray) -> None:
        """Reserve, now, those of ``indices`` that lie in chunks the preparation skipped.

        Raises :class:`RegionError` if the file system is full.
        """
        if self._skipped is None or not len(indices):
            return
        inside = indices[self._skipped[(indices.astype(np.int64) * PAGE_SIZE) // self._chunk]]
        for page in inside.tolist():
            if _libc.fallocate(self._fd, 0, page * PAGE_SIZE, PAGE_SIZE) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                    return
                raise RegionError(
                    f"cannot allocate page {page} of {self.path}: {os.strerror(err)}; free space in "
                    f"{self.path.parent} or point --memory-dir elsewhere"
                )

    def reserved_through(self, page: int) -> bool:
        """True if pages 0..``page`` lie in reserved blocks (safe to write).

        Raises the reservation error if preparing the region failed.
        """
        if self.prepare_error is not None:
            raise self.prepare_error
        return (page + 1) * PAGE_SIZE <= self.reserved

    def start_populate_ahead(self, data: np.ndarray, *, piece: int = 8 * 1024 * 1024) -> None:
        """Map a fresh region in writable ahead of the receiver, in order, in a background thread.

        Receiving straight into pages already mapped saves the second copy
        of ``recv`` + ``pwrite``: 1 GiB into a new /dev/shm file in 409 ms
        against 694 ms here (``python -m benchmarks.rx_paths --fresh``; the
        ``MADV_POPULATE_WRITE`` thread runs beside the receiver, GIL
        released).  :meth:`populated` says where that is safe.  Only pieces
        made entirely of pages that will hold data (``data``, a per-page
        mask) are populated, so a sparse region stays sparse.  Best effort:
        a failure (a full file system: ``madvise`` returns an error, no
        SIGBUS) stops it, and the pages left go by ``pwrite``, which reports it.
        """
        base = self._mapping()  # the thread is joined before the region is unmapped
        piece_pages = piece // PAGE_SIZE
        npieces = -(-self.npages // piece_pages)
        padded = np.zeros(npieces * piece_pages, dtype=bool)
        padded[:self.npages] = ~np.asarray(data, dtype=bool)
        skipped: np.ndarray = np.asarray(padded.reshape(npieces, piece_pages).any(axis=1))
        del padded
        self._ahead_skipped = skipped
        self._ahead_piece = piece

        def run() -> None:
            for i in range(npieces):
                if self._populate_stop.is_set() or self._prepare_abort.is_set():
                    return
                off = i * piece
                n = min(piece, self.size - off)
                if not skipped[i] and _libc.madvise(base + off, n, MADV_POPULATE_WRITE) != 0:
                    err = ctypes.get_errno()
                    self.populate_error = OSError(err, os.strerror(err))
                    return
                self.populated_upto = off + n

        self._populate_thread = threading.Thread(target=run, name="precopy-populate", daemon=True)
        self._populate_thread.start()

    def populated(self, first: int, last: int) -> bool:
        """Whether pages ``first..last`` are mapped in writable by :meth:`start_populate_ahead`."""
        if (last + 1) * PAGE_SIZE > self.populated_upto or self._ahead_skipped is None:
            return False
        return not bool(self._ahead_skipped[first * PAGE_SIZE // self._ahead_piece:
                                            last * PAGE_SIZE // self._ahead_piece + 1].any())

    def stop_populate(self, wait: bool = True) -> None:
        """Stop prefaulting (reserving goes on); join the thread if ``wait``."""
        self._populate_stop.set()
        if wait and self._populate_thread is not None:
            self._populate_thread.join()
            self._populate_thread = None

    def start_map_in(self, pages: np.ndarray) -> None:
        """Map the given pages of the file in, in a background thread (:class:`MapIn`).

        For a region whose pages exist (an existing destination region):
        receiving straight into the mapping then takes no page fault per
        page (~450 ms per GiB of faults here, against ~30 ms to map it all
        in at once; a shared tmpfs mapping populated for reading is
        writable).  The source maps its region in the same way before the
        full copy reads it.  ``pages`` is a per-page mask (not the holes: mapping a
        hole in would allocate it).  Best effort: a kernel without it only
        costs the faults.
        """
        self._mapping()  # (ValueError once closed; read-only mappings too; the thread is joined before the unmapping)
        # Runs of the mask from a byte per page (page-number arrays would be
        # 8 bytes a page: 8 MiB of peak memory more at 4 GiB).
        edges = np.diff(np.asarray(pages, dtype=bool).view(np.int8), prepend=np.int8(0), append=np.int8(0))
        runs = list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))
        del edges
        if not runs:
            return

        # In pieces: while one call maps a range in, the receiver's (and a
        # digest request's) own faults there wait for the whole call (a
        # sample of 2,048 pages answered in 55 ms behind one 1 GiB call, in
        # 8 ms beside 8 MiB ones; the map-in took as long either way).
        piece = 2048

        def run() -> None:
            for a, b in runs:
                for lo in range(a, b, piece):
                    if self._prepare_abort.is_set():
                        return
                    self.map_in.pages(lo, min(lo + piece, b))

        self._map_in_thread = threading.Thread(target=run, name="precopy-map-in", daemon=True)
        self._map_in_thread.start()

    def map_in_now(self, first: int, stop: int) -> None:
        """Map pages ``first`` up to ``stop`` in at once, in this thread (:class:`MapIn`).

        What :meth:`start_map_in` does, one piece at a time, where the
        caller must know the pages were mapped in before it reads them on
        (the source's full copy with kernel tracking: see
        PageSender.send).  The range must hold no hole (it would be
        allocated).  Best effort, as there.
        """
        self._mapping()  # (ValueError once closed)
        self.map_in.pages(first, stop)

    def wait_map_in(self) -> None:
        """Wait until the thread of :meth:`start_map_in` is done (at once if there is none)."""
        if self._map_in_thread is not None:
            self._map_in_thread.join()


    def close(self) -> None:
        """Stop every thread and wait for them (before the region is unmapped)."""
        self._prepare_abort.set()
        self.stop_populate()
        if self._map_in_thread is not None:
            self._map_in_thread.join()

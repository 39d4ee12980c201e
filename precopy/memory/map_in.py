"""Mapping a region's pages into our page tables: one read per fault-around window on tmpfs.

Both agents map their region's pages in before the bulk copy reads them or
receives into them (a fault per few pages inside ``sendmsg``/``recv``
costs more).  ``MADV_POPULATE_READ`` does it in one call but walks the
range page by page through get_user_pages, which marks every page
accessed (the LRU's lock, an activation per page); on tmpfs a read fault
maps its whole fault-around window (64 KiB) in anyway, writable in a
shared mapping, so reading one byte per window -- by the kernel, a
``writev`` of one-byte iovecs into a pipe, the GIL released -- maps the
same pages for less: a new 1 GiB region, map-in plus unmapping,
0.15-0.17 -> 0.10-0.11 CPU-s (benchmarks/RESULTS.md, issue 21, cpu21d).
And the mapping is ``MADV_RANDOM`` there, which tells the kernel our
accesses are no sign of use: unmapping then does not mark each page
accessed either (tmpfs has no readahead for it to turn off).

Whether a read maps the whole window is checked once per mapping in
``/proc/self/pagemap``: a kernel with fault-around turned down (debugfs
``fault_around_bytes``), or a file system other than tmpfs, gets
``MADV_POPULATE_READ`` as before.  Best effort throughout: a page not
mapped in only costs its fault later.
"""

from __future__ import annotations

import ctypes
import logging
import os

import numpy as np

from precopy.protocol import PAGE_SIZE

__all__ = ["HUGETLBFS_MAGIC", "MADV_POPULATE_READ", "TMPFS_MAGIC", "MapIn", "fs_magic"]

_log = logging.getLogger(__name__)

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
MADV_RANDOM = 1
MADV_POPULATE_READ = 22  # Linux 5.14; not exported by Python 3.11's mmap
#: Pages one read fault maps in with the kernel's default fault-around (64 KiB).
WINDOW = 16
_IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.writev.restype = ctypes.c_ssize_t
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_libc.statfs.restype = ctypes.c_int


def fs_magic(path: os.PathLike[str] | str) -> int:
    """``f_type`` of the file system holding ``path`` (statfs(2)); 0 if unknown."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little")


def _present(addr: int, npages: int) -> np.ndarray | None:
    """Per page from ``addr``: whether it is mapped in (``/proc/self/pagemap``); None if unreadable."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 8 * npages, (addr // PAGE_SIZE) * 8)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) != 8 * npages:
        return None
    return (np.frombuffer(raw, dtype=np.uint64) >> np.uint64(63)).astype(bool)


class MapIn:
    """Maps pages of one mapping (``base``, ``size`` bytes, of the file at ``path``) in.

    Thread-safe: each call uses its own pipe.
    """

    def __init__(self, path: os.PathLike[str] | str, base: int, size: int) -> None:
        self.base = base
        self.size = size
        #: None: not known yet whether one read maps a window (checked at the first call).
        self.by_touch: bool | None = None
        if size and fs_magic(path) == TMPFS_MAGIC:
            if _libc.madvise(base, size, MADV_RANDOM) != 0:
                _log.debug("MADV_RANDOM on %s: %s", path, os.strerror(ctypes.get_errno()))
        else:
            self.by_touch = False

    def pages(self, first: int, stop: int) -> None:
        """Map pages ``first`` up to ``stop`` in (no hole among them: it would be allocated)."""
        if stop <= first:
            return
        if self.by_touch is not False:
            self._touch(first, stop)
            if self.by_touch is None:
                self.by_touch = self._windows_mapped(first, stop)
                _log.debug("map-in by one read per %d pages: %s", WINDOW, self.by_touch)
            if self.by_touch:
                return
        addr = self.base + first * PAGE_SIZE
        if _libc.madvise(addr, (stop - first) * PAGE_SIZE, MADV_POPULATE_READ) != 0:
            _log.debug("mapping pages %d-%d in: %s", first, stop, os.strerror(ctypes.get_errno()))

    def _touch(self, first: int, stop: int) -> None:
        """The kernel reads a byte of ``first`` and of each page after it that starts a window."""
        base_page = self.base // PAGE_SIZE
        lo = -(-(base_page + first) // WINDOW) * WINDOW - base_page  # the first window start at or after first
        starts = np.arange(lo, stop, WINDOW, dtype=np.uint64)
        if lo != first:
            starts = np.concatenate((np.array([first], dtype=np.uint64), starts))
        iov = np.ones((len(starts), 2), dtype=np.uint64)  # struct iovec: base, length 1
        iov[:, 0] = starts * np.uint64(PAGE_SIZE) + np.uint64(self.base)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            for i in range(0, len(iov), _IOV_MAX):
                part = iov[i:i + _IOV_MAX]
                if _libc.writev(w, part.ctypes.data, len(part)) < 0:
                    _log.debug("map-in by reads: %s", os.strerror(ctypes.get_errno()))
                    return
                os.read(r, 65536)
        finally:
            os.close(r)
            os.close(w)

    def _windows_mapped(self, first: int, stop: int) -> bool:
        """Whether the reads mapped the pages of ``first..stop`` in (checked in pagemap).

        Most, not all: fault-around skips a page the kernel holds locked at
        that moment (that one faults when it is used); a kernel that maps
        only the page read leaves 1 in ``WINDOW``.
        """
        n = min(stop - first, 64 * WINDOW)
        present = _present(self.base + first * PAGE_SIZE, n)
        return present is not None and int(np.count_nonzero(present)) * 2 > n

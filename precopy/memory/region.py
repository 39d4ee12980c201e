"""Guest memory: a file-backed region mapped ``MAP_SHARED``.

The workload and the source agent map the same file, so the agent sees every
write the workload makes.  The destination creates its region file and
receives pages into it.  Pages are exposed as a NumPy ``(npages, 4096)``
uint8 view so gathers and scatters are one vectorised call each.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import traceback
from pathlib import Path

import numpy as np

from precopy.errors import RegionError
from precopy.memory.prepare import Preparation, reserve
from precopy.protocol import PAGE_SIZE

__all__ = ["GuestMemory", "clear_exception_frames", "users_of"]

_log = logging.getLogger(__name__)

def _can_pwrite(fd: int) -> bool:
    try:
        os.pwrite(fd, b"", 0)
    except OSError:
        return False
    return True


def users_of(path: Path) -> list[int]:
    """Processes (other than this one) that map ``path`` or hold it open.

    Reads ``/proc/*/maps`` (device and inode of every file mapping) and
    ``/proc/*/fd``; processes this one may not inspect are skipped, so an
    unprivileged caller sees only its user's.
    """
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ino = str(st.st_ino)
    me = os.getpid()
    users: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(len(parts) >= 6 and parts[3] == dev and parts[4] == ino
                       for parts in (line.split(maxsplit=5) for line in f)):
                    users.append(pid)
                    continue
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    fst = os.stat(fd.path)
                except OSError:
                    continue
                if fst.st_ino == st.st_ino and fst.st_dev == st.st_dev:
                    users.append(pid)
                    break
        except OSError:  # gone, or not ours to inspect
            continue
    return users


def clear_exception_frames(exc: BaseException | None) -> None:
    """Drop the locals of the finished frames an exception holds (and its causes' and contexts').

    Call it before :meth:`GuestMemory.close` on a path an exception is
    leaving by: the frames it passed through keep their locals, among them
    views of the region (the batch in hand, a payload received in place),
    and :meth:`GuestMemory.close` cannot unmap a region that still has
    views.  Refcounting would free them with the exception, but asyncio
    futures and tracebacks form cycles that only a full garbage collection
    frees -- in a daemon that can be many migrations later, with the whole
    region kept mapped (on tmpfs: in RAM, though its file was removed).
    Frames still running (the caller's) are left alone.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def is_run(indices: np.ndarray) -> bool:
    """True if ``indices`` is one ascending run (k, k+1, ...): a slice will do."""
    n = len(indices)
    if n == 0 or int(indices[-1]) - int(indices[0]) != n - 1:
        return False
    return n < 3 or bool((np.diff(indices) == 1).all())


class GuestMemory:
    """A mapped region.  Use :meth:`open` or :meth:`create`; close when done.

    ``pages`` is a writable ``(npages, PAGE_SIZE)`` uint8 view of the mapping.
    """

    def __init__(self, path: Path, fd: int, size: int, *, writable: bool = True, pwrite: bool = True) -> None:
        self.path = path
        self.size = size
        self.npages = size // PAGE_SIZE
        self._fd = fd
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except OSError as exc:
            os.close(fd)
            raise RegionError(f"cannot map {path} ({size} bytes): {exc.strerror}") from exc
        self.array = np.frombuffer(self._map, dtype=np.uint8) if writable else np.frombuffer(
            self._map, dtype=np.uint8
        )
        self.pages = self.array.reshape(self.npages, PAGE_SIZE)
        #: The region as little-endian uint64 words (8 per cache line).
        self.words = self.array.view(np.uint64)
        self.view = memoryview(self._map)
        #: Whether :meth:`write_pages` may use ``pwrite``: hugetlbfs has no
        #: write(2), and a zero-length write says so (EINVAL) without writing.
        self._pwrite = writable and pwrite and _can_pwrite(fd)
        #: The background threads that reserve, populate and map in the
        #: region (:class:`~precopy.memory.prepare.Preparation`).
        self.prep = Preparation(path, fd, size, self.array.ctypes.data, by_pwrite=self._pwrite,
                                reserved=size)

    # -- construction ---------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = True) -> GuestMemory:
        """Map an existing region file.  Raises :class:`RegionError` if unusable."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise RegionError(f"cannot open memory region {p}: {exc.strerror}") from exc
        size = os.fstat(fd).st_size
        if size == 0 or size % PAGE_SIZE:
            os.close(fd)
            raise RegionError(
                f"memory region {p} is {size} bytes: it must be a non-empty multiple of {PAGE_SIZE}"
            )
        return cls(p, fd, size, writable=writable)

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, preallocate: bool = True,
               pwrite: bool = True) -> GuestMemory:
        """Create (or truncate) a zero-filled region file of ``size`` bytes.

        With ``preallocate`` the blocks are reserved now (see :func:`reserve`):
        a full file system fails here with :class:`RegionError`, never later
        with SIGBUS.  The file is removed if that fails.
        ``pwrite=False`` writes pages through the mapping
        only (as on hugetlbfs, which has no ``write(2)``; see :meth:`write_pages`).
        """
        p = Path(path)
        if size <= 0 or size % PAGE_SIZE:
            raise RegionError(f"region size {size} is not a positive multiple of {PAGE_SIZE}")
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise RegionError(f"cannot create memory region {p}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, size)
            if preallocate:
                reserve(fd, size, p)
        except (OSError, RegionError) as exc:
            os.close(fd)
            p.unlink(missing_ok=True)
            if isinstance(exc, RegionError):
                raise
            raise RegionError(f"cannot size {p} to {size} bytes: {exc.strerror}") from exc
        mem = cls(p, fd, size, pwrite=pwrite)
        if not preallocate:
            mem.prep.reserved = 0  # nothing may be written before prep.start_prepare()
        return mem

    # -- pages ----------------------------------------------------------

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Copy the given pages into a new contiguous ``(n, PAGE_SIZE)`` array."""
        if is_run(indices):
            return self.pages[int(indices[0]):int(indices[-1]) + 1].copy()
        out: np.ndarray = self.pages[indices]
        return out

    def scatter(self, indices: np.ndarray, data: np.ndarray | memoryview | bytes) -> None:
        """Write ``len(indices)`` pages from ``data`` (raw bytes, in order) through the mapping."""
        n = len(indices)
        src = np.frombuffer(data, dtype=np.uint8).reshape(n, PAGE_SIZE)
        if is_run(indices):
            self.pages[int(indices[0]):int(indices[-1]) + 1] = src
        else:
            self.pages[indices] = src

    def write_pages(self, indices: np.ndarray, data: np.ndarray | memoryview | bytes, *,
                    allocated: np.ndarray | None = None) -> None:
        """Write ``len(indices)`` pages from ``data`` (raw bytes, in order) into the file.

        Runs of consecutive pages go in with ``pwrite`` (GIL released), not
        through the mapping: a write through a fresh mapping takes one page
        fault per 4 KiB page (~3-5 us each here, most of a first copy's
        cost), while ``pwrite`` copies into the page cache directly (~4 GB/s
        into touched pages).  A page on its own goes through the mapping when
        ``allocated`` (a mask) says it already has a block -- a
        rewritten page then costs no syscall (~1 us against ~3; ``allocated``
        has one entry per entry of ``indices``) -- and with
        ``pwrite`` otherwise, which turns a full file system into an error
        instead of a SIGBUS.  File systems that cannot ``pwrite`` (hugetlbfs)
        use the mapping throughout (see :meth:`Preparation.start_prepare`).  Raises
        :class:`RegionError` when the file system refuses the write (full).
        """
        n = len(indices)
        if not n:
            return
        if not self._pwrite:
            self.scatter(indices, data)
            return
        flat = data.reshape(-1).data.cast("B") if isinstance(data, np.ndarray) else memoryview(data).cast("B")
        if is_run(indices):
            self._pwrite_run(int(indices[0]), flat)
            return
        idx = np.asarray(indices, dtype=np.int64)
        if allocated is not None and bool(np.all(allocated)):
            # Scattered pages that all have their blocks (rewrites after the
            # full copy): one NumPy scatter through the mapping.  A pwrite
            # per run cost ~1.8 us a page (syscall and the Python loop) and
            # was most of a destination's time at 200,000 pages/s; the
            # scatter ~0.5-1 us, page-table faults on first touch included.
            self.pages[idx] = np.frombuffer(flat, dtype=np.uint8).reshape(n, PAGE_SIZE)
            return
        starts = np.flatnonzero(np.diff(idx, prepend=-2) != 1)
        lengths = np.diff(starts, append=n)
        mapped = lengths == 1
        if allocated is not None:
            mapped &= np.asarray(allocated, dtype=bool)[starts]
        else:
            mapped[:] = False
        for i, length in zip(starts[~mapped].tolist(), lengths[~mapped].tolist()):
            self._pwrite_run(int(idx[i]), flat[i * PAGE_SIZE:(i + length) * PAGE_SIZE])
        if mapped.any():
            pos = starts[mapped]
            src = np.frombuffer(flat, dtype=np.uint8).reshape(n, PAGE_SIZE)
            self.pages[idx[pos]] = src[pos]

    def _pwrite_run(self, page: int, data: memoryview) -> None:
        off = page * PAGE_SIZE
        while data.nbytes:
            try:
                done = os.pwrite(self._fd, data, off)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP) and off == page * PAGE_SIZE:
                    # hugetlbfs has no write(2): use the mapping from now on.
                    self._pwrite = self.prep.by_pwrite = False
                    self.pages[page:page + data.nbytes // PAGE_SIZE] = np.frombuffer(
                        data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
                    return
                raise RegionError(f"cannot write {data.nbytes} bytes at offset {off} of {self.path}: "
                                  f"{exc.strerror}") from exc
            data, off = data[done:], off + done

    def zero(self, indices: np.ndarray) -> None:
        self.pages[indices] = 0

    def hole_pages(self, max_extents: int = 1 << 16) -> np.ndarray:
        """Pages that lie wholly in holes of the file (never written, so zero).

        Found with ``SEEK_DATA``/``SEEK_HOLE``, without touching the pages:
        reading a hole of a tmpfs file through a shared mapping would
        allocate it.  A file system without hole support reports all data.
        After ``max_extents`` data extents the rest is taken as data.  The
        answer is a snapshot: a workload may write into a hole right after.
        """
        holes = np.ones(self.npages, dtype=bool)
        off = 0
        for _ in range(max_extents):
            if off >= self.size:
                return holes
            try:
                data = os.lseek(self._fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past off
                    return holes
                raise RegionError(f"cannot map the holes of {self.path}: {exc.strerror}") from exc
            hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            holes[data // PAGE_SIZE:-(-hole // PAGE_SIZE)] = False
            off = hole
        holes[off // PAGE_SIZE:] = False
        return holes

    def holes_still(self, holes: np.ndarray) -> np.ndarray:
        """Which pages of ``holes`` (a mask from :meth:`hole_pages`) are holes still (a new mask).

        Each run of holes is looked at again with ``SEEK_DATA`` from its
        start: one call for a run still empty, two more per extent written
        into it since.  Pages that held data are not looked at (a page
        punched since reads as zeros anyway).  Cheap where the region has
        few holes, as at a pause after :meth:`hole_pages` was taken live.
        """
        now = np.array(holes, dtype=bool)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], now.view(np.int8), [0]))))
        for first, last in zip(edges[::2].tolist(), edges[1::2].tolist()):
            off, end = first * PAGE_SIZE, min(last * PAGE_SIZE, self.size)
            while off < end:
                try:
                    data = os.lseek(self._fd, off, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data past off
                        break
                    raise RegionError(f"cannot map the holes of {self.path}: {exc.strerror}") from exc
                if data >= end:
                    break
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
                now[data // PAGE_SIZE:-(-min(hole, end) // PAGE_SIZE)] = False
                off = hole
        return now

    # -- lifetime -------------------------------------------------------

    def flush(self) -> None:
        """Write dirty pages back to the file (a no-op cost on tmpfs)."""
        self._map.flush()

    def close(self) -> None:
        self.prep.close()
        self.view.release()
        del self.pages, self.words, self.array
        try:
            self._map.close()
        except BufferError:
            # A caller still holds a view of the pages: the mapping is
            # unmapped when the last view goes.  This object lets go of it
            # now, so that a reference to it (a frame in a traceback, a
            # cycle only a full garbage collection frees) cannot keep the
            # region mapped (see clear_exception_frames).
            _log.debug("region %s still has views; unmapping deferred to GC", self.path)
        del self._map
        os.close(self._fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

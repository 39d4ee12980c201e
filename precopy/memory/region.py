"""Guest memory: a file-backed region mapped ``MAP_SHARED``.

The workload and the source agent map the same file, so the agent sees every
write the workload makes.  The destination creates its region file and
receives pages into it.  Pages are exposed as a NumPy ``(npages, 4096)``
uint8 view so gathers and scatters are one vectorised call each.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import traceback
from pathlib import Path

import numpy as np

from precopy.errors import RegionError
from precopy.protocol import PAGE_SIZE

__all__ = ["GuestMemory", "MADV_POPULATE_READ", "MADV_POPULATE_WRITE", "clear_exception_frames", "users_of"]

_log = logging.getLogger(__name__)

MADV_POPULATE_READ = 22  # Linux 5.14; not exported by Python 3.11's mmap
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
        self._populate_thread: threading.Thread | None = None
        self._map_in_thread: threading.Thread | None = None
        self._populate_stop = threading.Event()
        self._prepare_abort = threading.Event()
        self.populate_error: OSError | None = None
        self.prepare_error: RegionError | None = None
        #: Bytes from the start known to be allocated (or skipped, see
        #: :meth:`start_prepare`); writes must stay below.
        self.reserved = size
        self._chunk = 1
        self._skipped: np.ndarray | None = None
        #: Bytes from the start that :meth:`start_populate_ahead` mapped in
        #: writable (pieces it skipped excepted: see :meth:`populated`).
        self.populated_upto = 0
        self._ahead_skipped: np.ndarray | None = None
        self._ahead_piece = 1
        #: Whether :meth:`write_pages` may use ``pwrite``: hugetlbfs has no
        #: write(2), and a zero-length write says so (EINVAL) without writing.
        self._pwrite = writable and pwrite and _can_pwrite(fd)

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
            mem.reserved = 0  # nothing may be written before start_prepare()
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
        use the mapping throughout (see :meth:`start_prepare`).  Raises
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
                    self._pwrite = False
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

    # -- preparing a fresh region ----------------------------------------

    def start_prepare(self, *, populate: bool = True, chunk: int = 8 * 1024 * 1024,
                      skip: np.ndarray | None = None) -> None:
        """Prepare a fresh region for receiving: in a background thread where it pays.

        A region written with ``pwrite`` (see :meth:`write_pages`) needs
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
        if self._pwrite:
            self.reserved = self.size
            return
        anchor = ctypes.c_char.from_buffer(self._map)
        base = ctypes.addressof(anchor)
        del anchor  # drop the buffer export; the thread is joined before close()
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
        anchor = ctypes.c_char.from_buffer(self._map)
        base = ctypes.addressof(anchor)
        del anchor  # the thread is joined before close()
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
        """Map the given pages of the file in, in a background thread (``MADV_POPULATE_READ``).

        For a region whose pages exist (an existing destination region):
        receiving straight into the mapping then takes no page fault per
        page (~450 ms per GiB of faults here, against ~30 ms to map it all
        in at once; a shared tmpfs mapping populated for reading is
        writable).  The source maps its region in the same way before the
        full copy reads it.  ``pages`` is a per-page mask (not the holes: mapping a
        hole in would allocate it).  Best effort: a kernel without it only
        costs the faults.
        """
        base = self.array.ctypes.data  # (read-only mappings too; the thread is joined before close())
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
                    n = min(piece, b - lo)
                    if _libc.madvise(base + lo * PAGE_SIZE, n * PAGE_SIZE, MADV_POPULATE_READ) != 0:
                        _log.debug("mapping %s in: %s", self.path, os.strerror(ctypes.get_errno()))
                        return

        self._map_in_thread = threading.Thread(target=run, name="precopy-map-in", daemon=True)
        self._map_in_thread.start()

    def wait_map_in(self) -> None:
        """Wait until the thread of :meth:`start_map_in` is done (at once if there is none)."""
        if self._map_in_thread is not None:
            self._map_in_thread.join()

    # -- lifetime -------------------------------------------------------

    def flush(self) -> None:
        """Write dirty pages back to the file (a no-op cost on tmpfs)."""
        self._map.flush()

    def close(self) -> None:
        self._prepare_abort.set()
        self.stop_populate()
        if self._map_in_thread is not None:
            self._map_in_thread.join()
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

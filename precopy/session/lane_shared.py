"""What a post-copy fault lane's process shares with its agent: a lock, counters, per-page arrays.

A fault lane served by a process of its own (:mod:`precopy.session.postcopy_lane_proc`)
claims and places pages beside its agent's page stream, so both must
decide "still wanted?" and mark "sent" / "placed" under one lock, on one
mask:

* :class:`CrossLock`: a ``threading.Lock`` (the threads of one process)
  taken with an open-file-description lock (``F_OFD_SETLKW`` on byte 0 of a
  file each process opened on its own: the processes).  Uncontended it is
  one ``fcntl`` to take and one to give back (~1 us each); a process that
  dies holding it gives it back with its descriptor (the kernel drops OFD
  locks on the last close).
* :class:`SharedArrays`: a memfd mapped shared by both, holding named
  numpy arrays at fixed offsets (the source's "still wanted" mask and the
  lane's counters; the destination's placement times and its last look at
  an empty userfaultfd).  The destination's "still missing" mask is shared
  already: it is the need file (:mod:`precopy.session.postcopy_state`).

No sockets here; nothing an agent reads from the network is trusted by it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from typing import Any

import numpy as np

__all__ = ["CrossLock", "SharedArrays", "source_spec", "dest_spec", "TRACE", "trace", "dump_trace"]

#: ``struct flock`` on Linux x86-64/aarch64: l_type, l_whence (short), l_start, l_len (off_t),
#: l_pid (pid_t, 0 for OFD locks), padded to 32 bytes.
_FLOCK = "hhqqi4x"


def _flock(kind: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 1, 0)


_LOCK, _UNLOCK = _flock(fcntl.F_WRLCK), _flock(fcntl.F_UNLCK)


class CrossLock:
    """A lock held across threads and processes: ``with lock:`` (see the module docstring).

    ``fd``: a descriptor this process opened itself (its own open file
    description) on the file the other processes lock too; this object
    owns it (``close``).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._local = threading.Lock()

    @classmethod
    def open(cls, path: str) -> CrossLock:
        """A lock on ``path`` (a file every party can open: ``/proc/PID/fd/N`` of a memfd too)."""
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def __enter__(self) -> CrossLock:
        self._local.acquire()
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW, _LOCK)
        except BaseException:
            self._local.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _UNLOCK)
        finally:
            self._local.release()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SharedArrays:
    """Named numpy arrays in one shared memfd mapping, laid out by ``spec`` (name -> (dtype, length)).

    The creator makes the memfd (:meth:`create`); the other process maps the
    same descriptor (:meth:`attach`, the same ``spec``).  Each array starts
    on an 8-byte boundary.
    """

    def __init__(self, fd: int, spec: dict[str, tuple[str, int]]) -> None:
        self.fd = fd
        self.spec = dict(spec)
        offsets, off = {}, 0
        for name, (dtype, n) in self.spec.items():
            offsets[name] = off
            off += -(-np.dtype(dtype).itemsize * n // 8) * 8
        self.size = max(off, 8)
        if os.fstat(fd).st_size < self.size:
            raise ValueError(f"a shared lane state of {os.fstat(fd).st_size} bytes, {self.size} expected")
        self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.arrays: dict[str, np.ndarray] = {
            name: np.frombuffer(self._map, dtype=dtype, count=n, offset=offsets[name])
            for name, (dtype, n) in self.spec.items()}

    @classmethod
    def create(cls, name: str, spec: dict[str, tuple[str, int]]) -> SharedArrays:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            size = sum(-(-np.dtype(d).itemsize * n // 8) * 8 for d, n in spec.values())
            os.ftruncate(fd, max(size, 8))
            return cls(fd, spec)
        except BaseException:
            os.close(fd)
            raise

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def path(self) -> str:
        """Where another process of this machine opens the memfd (its own open file description)."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        """Close the memfd; the mapping goes with the last array that refers to it."""
        self.arrays = {}
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def source_spec(npages: int) -> dict[str, tuple[str, int]]:
    """The source's shared state: counters (the last page answered, pages and bytes answered since
    the stream last folded them in) and the "still wanted" mask."""
    return {"counters": ("int64", 4), "need": ("bool", npages)}


def dest_spec(npages: int) -> dict[str, tuple[str, int]]:
    """The destination's: the session's last look at an empty userfaultfd (``clock[0]``,
    CLOCK_MONOTONIC seconds), when each page was placed (0: not yet) and which pages a placer
    claimed (:meth:`~precopy.session.postcopy_pages.PagePlacer.share_claims`)."""
    return {"clock": ("float64", 2), "placed_t": ("float64", npages), "taken": ("bool", npages)}


#: The lane's steps, timed (``PRECOPY_LANE_TRACE=DIR`` in an agent's environment; for the
#: benchmark's profile, benchmarks/RESULTS.md lat22): (step, page, CLOCK_MONOTONIC seconds).
TRACE: list[tuple[str, int, float]] | None = [] if os.environ.get("PRECOPY_LANE_TRACE") else None


def trace(step: str, pages: Any, t: float | None = None) -> None:
    """Note ``step`` for the first of ``pages`` (nothing unless tracing)."""
    if TRACE is not None and len(pages):
        TRACE.append((step, int(pages[0]), time.monotonic() if t is None else t))


def dump_trace(side: str) -> None:
    """Write this process's trace to ``$PRECOPY_LANE_TRACE/lane-SIDE-PID.txt``."""
    if TRACE:
        path = os.path.join(os.environ["PRECOPY_LANE_TRACE"], f"lane-{side}-{os.getpid()}.txt")
        with open(path, "w") as f:
            f.writelines(f"{s} {p} {t:.7f}\n" for s, p, t in TRACE)

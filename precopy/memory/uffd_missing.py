"""Post-copy's kernel calls: userfaultfd in MISSING mode, ``UFFDIO_COPY``, holes punched in the region.

The division of labour mirrors write tracking (:mod:`precopy.memory.uffd`,
docs/TRACKING.md has the guest's side for any language):

* the **guest** resumed on the destination creates a userfaultfd in its own
  address space (:func:`~precopy.memory.uffd.create_userfaultfd`,
  :func:`~precopy.memory.uffd.uffd_api` with no feature), hands a copy to the
  agent over its control socket (``SCM_RIGHTS``) and *keeps its own copy*:
  should the agent die, its faults wait instead of reading zeros;
* the **agent** registers the guest's mapping in MISSING mode
  (:func:`register_missing`), reads fault messages (:func:`read_faults`)
  and places pages with :func:`copy_pages` (``UFFDIO_COPY``), which installs
  a page only where the file has none: a page that is present (placed
  before, so possibly written by the guest since) fails with ``EEXIST`` and
  is never overwritten.

On a tmpfs/memfd region a page the file does not hold faults; one it
holds does not.  So the pages the destination does not hold correctly are
punched out of the file first (:func:`punch_pages`), and the agent must
not touch them through a mapping of its own (a read would allocate them).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import numpy as np

from precopy.memory.uffd import UFFDIO_REGISTER, UFFDIO_UNREGISTER, TrackingUnavailable, _Range

__all__ = [
    "UFFDIO_COPY", "UFFDIO_REGISTER_MODE_MISSING", "UFFD_EVENT_PAGEFAULT", "FAULT_MSG_SIZE",
    "register_missing", "unregister_missing", "copy_pages", "read_faults", "punch_pages", "page_runs",
]

_IOC_WRITE, _IOC_READ = 1, 2
#: ``_IOWR(0xAA, 0x03, struct uffdio_copy)``: dst, src, len, mode, copy (40 bytes).
UFFDIO_COPY = ((_IOC_READ | _IOC_WRITE) << 30) | (40 << 16) | (0xAA << 8) | 0x03
UFFDIO_REGISTER_MODE_MISSING = 1
_UFFDIO_COPY_BIT = 1 << 0x03  # in uffdio_register.ioctls
UFFD_EVENT_PAGEFAULT = 0x12
#: ``struct uffd_msg``: event u8, 7 reserved bytes, then for a page fault flags u64, address u64, ptid u32.
FAULT_MSG_SIZE = 32
_MSG = struct.Struct("<B7xQQ8x")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


assert ctypes.sizeof(_Copy) == 40


def register_missing(fd: int, start: int, length: int) -> None:
    """Register ``[start, start+length)`` of the fd's address space in MISSING mode.

    Raises :class:`TrackingUnavailable` with the kernel's reason (a range
    that is not one mapping, a file system without MISSING support).
    """
    reg = _Register(range=_Range(start, length), mode=UFFDIO_REGISTER_MODE_MISSING, ioctls=0)
    if _libc.ioctl(fd, UFFDIO_REGISTER, ctypes.byref(reg)) < 0:
        err = ctypes.get_errno()
        raise TrackingUnavailable(f"UFFDIO_REGISTER (missing) of {length} bytes at {start:#x} failed: "
                                  f"{os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
    if not reg.ioctls & _UFFDIO_COPY_BIT:
        raise TrackingUnavailable("the kernel registered the range but offers no UFFDIO_COPY on it")


def unregister_missing(fd: int, start: int, length: int) -> None:
    """End MISSING handling of the range: from now on a hole faults in as zeros, as without userfaultfd."""
    if _libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.byref(_Range(start, length))) < 0:
        err = ctypes.get_errno()
        raise TrackingUnavailable(f"UFFDIO_UNREGISTER failed: {os.strerror(err)}")


def copy_pages(fd: int, dst: int, src: int, npages: int, page_size: int = 4096) -> tuple[int, list[int]]:
    """Place ``npages`` pages from our address ``src`` at the guest's ``dst`` (``UFFDIO_COPY``), waking
    the guest's threads that wait on them.

    Returns ``(placed, present)``: pages installed, and the page offsets
    (0-based, within the run) that were present already (``EEXIST``: never
    overwritten).  Raises :class:`OSError` for any other failure (the
    guest's address space is gone: ``ESRCH``; a bad range).
    """
    placed, present = 0, []
    done = 0
    arg = _Copy(dst=0, src=0, len=0, mode=0, copy=0)
    while done < npages:
        arg.dst, arg.src = dst + done * page_size, src + done * page_size
        arg.len, arg.copy = (npages - done) * page_size, 0
        ret = _libc.ioctl(fd, UFFDIO_COPY, ctypes.byref(arg))
        err = ctypes.get_errno() if ret < 0 else 0
        copied = max(int(arg.copy), 0) // page_size
        placed += copied
        done += copied
        if ret == 0:
            break
        if err == errno.EAGAIN and copied:
            continue  # stopped short at a page that is present: the next call says which
        if err == errno.EEXIST:
            present.append(done)
            done += 1
            continue
        if err == errno.EAGAIN:
            continue  # the guest's mm changed under us (mremap): try again
        raise OSError(err, f"UFFDIO_COPY of {npages - done} pages at {dst + done * page_size:#x}: "
                      f"{os.strerror(err)}")
    return placed, present


def read_faults(fd: int, buf: bytearray) -> list[int]:
    """Fault addresses waiting on the (non-blocking) userfaultfd; [] when none.

    ``buf`` is a reusable buffer of a multiple of :data:`FAULT_MSG_SIZE`
    bytes.  Messages other than page faults (none are asked for) are
    skipped.  Raises :class:`OSError` when the fd fails.
    """
    try:
        n = os.readv(fd, [buf])
    except BlockingIOError:
        return []
    out = []
    for off in range(0, n - n % FAULT_MSG_SIZE, FAULT_MSG_SIZE):
        event, _flags, address = _MSG.unpack_from(buf, off)
        if event == UFFD_EVENT_PAGEFAULT:
            out.append(int(address))
    return out


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive pages in ascending ``pages``."""
    if not len(pages):
        return []
    p = np.asarray(pages, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(p)]))
    return [(int(p[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist())]


def punch_pages(fd: int, pages: np.ndarray, page_size: int = 4096) -> int:
    """Punch ``pages`` (ascending) out of the file ``fd``: they read as holes; returns the runs punched.

    Raises :class:`OSError` when the file system cannot punch holes (post-copy
    needs tmpfs, a memfd or hugetlbfs).
    """
    runs = page_runs(pages)
    for first, count in runs:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, first * page_size,
                           count * page_size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot punch pages {first}..{first + count - 1} out of the region: "
                          f"{os.strerror(err)}")
    return len(runs)

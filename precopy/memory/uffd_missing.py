"""Post-copy's kernel calls: userfaultfd in MINOR (+ MISSING) mode, ``UFFDIO_CONTINUE``, ``UFFDIO_COPY``.

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

Two ways to make the guest wait on the pages the destination lacks:

* **MINOR** (shmem and hugetlbfs, Linux >= 5.14; :func:`register_postcopy`
  with ``minor=True``): the guest's mapping starts with no page mapped, and
  with MINOR faults registered *every* first touch of a page the file holds
  waits for the agent, who maps it with :func:`continue_pages`
  (``UFFDIO_CONTINUE``) -- after writing the right bytes into the file
  (``pwrite``) when the page was missing.  Nothing is punched or freed at
  the switchover and no page is allocated afresh: stale pages are simply
  written over while no one maps them.  MISSING is registered beside it for
  the file's holes (a hole the guest touches faults as MISSING; a page that
  is written first then mapped serves both kinds).
* **MISSING** only (the fallback): a page the file holds does not fault, so
  the pages the destination lacks are punched out of the file first
  (:func:`punch_pages`, ~0.4 us a page) and placed with ``UFFDIO_COPY``.

Either way a page is placed once: a page mapped for the guest (``EEXIST``
for either ioctl) is never written again.
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
    "register_missing", "unregister_missing", "copy_pages", "read_faults", "read_fault_batch", "punch_pages", "page_runs",
    "UFFDIO_CONTINUE", "UFFDIO_REGISTER_MODE_MINOR", "register_postcopy", "continue_pages", "data_runs",
    "FaultReader", "Continuer",
]

_IOC_WRITE, _IOC_READ = 1, 2
#: ``_IOWR(0xAA, 0x03, struct uffdio_copy)``: dst, src, len, mode, copy (40 bytes).
UFFDIO_COPY = ((_IOC_READ | _IOC_WRITE) << 30) | (40 << 16) | (0xAA << 8) | 0x03
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_MINOR = 4
#: ``_IOWR(0xAA, 0x07, struct uffdio_continue)``: range (start, len), mode, mapped (32 bytes).
UFFDIO_CONTINUE = ((_IOC_READ | _IOC_WRITE) << 30) | (32 << 16) | (0xAA << 8) | 0x07
_UFFDIO_COPY_BIT = 1 << 0x03  # in uffdio_register.ioctls
_UFFDIO_CONTINUE_BIT = 1 << 0x07
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


class _Continue(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64)]


assert ctypes.sizeof(_Copy) == 40 and ctypes.sizeof(_Continue) == 32


def register_missing(fd: int, start: int, length: int) -> None:
    """Register ``[start, start+length)`` of the fd's address space in MISSING mode.

    Raises :class:`TrackingUnavailable` with the kernel's reason (a range
    that is not one mapping, a file system without MISSING support).
    """
    register_postcopy(fd, start, length, minor=False)


def register_postcopy(fd: int, start: int, length: int, *, minor: bool) -> None:
    """Register the range in MISSING mode, and MINOR too with ``minor`` (see the module docstring).

    Raises :class:`TrackingUnavailable` with the kernel's reason (a range
    that is not one mapping, a file system or kernel without that mode);
    after a failure the range is not registered.
    """
    mode = UFFDIO_REGISTER_MODE_MISSING | (UFFDIO_REGISTER_MODE_MINOR if minor else 0)
    reg = _Register(range=_Range(start, length), mode=mode, ioctls=0)
    what = "missing+minor" if minor else "missing"
    if _libc.ioctl(fd, UFFDIO_REGISTER, ctypes.byref(reg)) < 0:
        err = ctypes.get_errno()
        raise TrackingUnavailable(f"UFFDIO_REGISTER ({what}) of {length} bytes at {start:#x} failed: "
                                  f"{os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
    need = _UFFDIO_COPY_BIT | (_UFFDIO_CONTINUE_BIT if minor else 0)
    if reg.ioctls & need != need:
        _libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.byref(_Range(start, length)))
        raise TrackingUnavailable(f"the kernel registered the range ({what}) but offers no "
                                  f"{'UFFDIO_CONTINUE' if minor else 'UFFDIO_COPY'} on it")


def continue_pages(fd: int, dst: int, npages: int, page_size: int = 4096) -> tuple[int, list[int]]:
    """Map ``npages`` pages the file holds at the guest's ``dst`` (``UFFDIO_CONTINUE``), waking the
    guest's threads that wait on them.

    Returns ``(mapped, skipped)``: pages mapped, and the page offsets (within the run) that were not:
    mapped already (``EEXIST``) or a hole of the file (``EFAULT``: nothing to map).  Raises
    :class:`OSError` for any other failure (the guest's address space is gone: ``ESRCH``).
    """
    mapped, skipped = 0, []
    done = 0
    arg = _Continue(range=_Range(0, 0), mode=0, mapped=0)
    while done < npages:
        arg.range.start, arg.range.len = dst + done * page_size, (npages - done) * page_size
        arg.mapped = 0
        ret = _libc.ioctl(fd, UFFDIO_CONTINUE, ctypes.byref(arg))
        err = ctypes.get_errno() if ret < 0 else 0
        got = max(int(arg.mapped), 0) // page_size
        mapped += got
        done += got
        if ret == 0:
            break
        if err == errno.EAGAIN:
            continue  # stopped short (or the guest's mm changed under us): go on from there
        if err in (errno.EEXIST, errno.EFAULT):
            skipped.append(done)
            done += 1
            continue
        raise OSError(err, f"UFFDIO_CONTINUE of {npages - done} pages at {dst + done * page_size:#x}: "
                      f"{os.strerror(err)}")
    return mapped, skipped


class Continuer:
    """``UFFDIO_CONTINUE`` of one page at a time for a hot loop (a fault lane's child): the ioctl's
    argument allocated once.  :meth:`page` returns 0 or the errno, as :func:`continue_pages` sees it."""

    def __init__(self, fd: int, page_size: int = 4096) -> None:
        self.fd = fd
        self.page_size = page_size
        self.arg = _Continue(range=_Range(0, page_size), mode=0, mapped=0)
        self._ref = ctypes.byref(self.arg)
        self._ioctl = _libc.ioctl

    def page(self, dst: int) -> int:
        """Map the page at the guest's ``dst`` (in the file already), waking its waiters: 0 when
        mapped; ``EEXIST`` (mapped already) or ``EFAULT`` (a hole) when not; else the errno of the
        failure (``ESRCH``: the guest is gone).  ``EAGAIN`` (the guest's mm changed) is tried again."""
        arg = self.arg
        while True:
            arg.range.start, arg.range.len, arg.mapped = dst, self.page_size, 0
            if self._ioctl(self.fd, UFFDIO_CONTINUE, self._ref) == 0:
                return 0
            err = ctypes.get_errno()
            if err != errno.EAGAIN or arg.mapped == self.page_size:
                return 0 if err == errno.EAGAIN else err


class FaultReader:
    """Fault messages read from a (non-blocking) userfaultfd into a buffer allocated once, for a hot
    loop: :meth:`read` returns how many bytes came (0: none waiting), :meth:`pages` appends the
    faults' page numbers relative to ``start`` (an address outside ``npages`` pages goes to
    ``outside``).  A read that did not fill the buffer left none waiting (see
    :func:`read_fault_batch`)."""

    def __init__(self, fd: int, start: int, npages: int, messages: int = 64, page_size: int = 4096) -> None:
        self.fd = fd
        self.start = start
        self.npages = npages
        self.shift = page_size.bit_length() - 1
        self.buf = bytearray(FAULT_MSG_SIZE * messages)
        self._bufs = [self.buf]

    def read(self) -> int:
        try:
            return os.readv(self.fd, self._bufs)
        except BlockingIOError:
            return 0

    def pages(self, n: int, out: list[int], outside: list[int]) -> None:
        for event, _flags, address in _MSG.iter_unpack(memoryview(self.buf)[:n - n % FAULT_MSG_SIZE]):
            if event == UFFD_EVENT_PAGEFAULT:
                page = (address - self.start) >> self.shift
                if 0 <= page < self.npages and address >= self.start:
                    out.append(page)
                else:
                    outside.append(address)


def data_runs(fd: int, size: int, page_size: int = 4096) -> list[tuple[int, int]]:
    """``(first page, count)`` of each run of pages the file holds (not holes), via ``SEEK_DATA``/``SEEK_HOLE``."""
    runs = []
    off = 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here on
                break
            raise
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        first = data // page_size
        runs.append((first, -(-hole // page_size) - first))
        off = hole
    return runs


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
    return read_fault_batch(fd, buf)[0]


def read_fault_batch(fd: int, buf: bytearray) -> tuple[list[int], bool]:
    """:func:`read_faults`, and whether the read emptied the userfaultfd: a read returns every
    message waiting that fits, so one that did not fill ``buf`` left none (no second read needed
    to see it empty: a system call less per fault)."""
    try:
        n = os.readv(fd, [buf])
    except BlockingIOError:
        return [], True
    return _addresses(buf, n), n < len(buf)


def _addresses(buf: bytearray, n: int) -> list[int]:
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

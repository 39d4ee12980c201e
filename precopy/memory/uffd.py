"""Kernel write tracking: userfaultfd write-protect (async mode) + ``PAGEMAP_SCAN``.

The division of labour (docs/TRACKING.md has the guest's side for any
language):

* the **guest** creates a userfaultfd in its own address space
  (:func:`create_userfaultfd`, :func:`uffd_api` with ``WP_ASYNC |
  WP_UNPOPULATED | WP_HUGETLBFS_SHMEM``) and hands a copy of the fd to the
  agent over its control socket (``SCM_RIGHTS``);
* the **agent** registers the guest's mapping of the region for
  write-protect (:func:`register_wp`), arms every page
  (:func:`writeprotect`), and from then on asks the kernel which pages were
  written (:class:`PagemapScanner`): one ``PAGEMAP_SCAN`` ioctl on
  ``/proc/<pid>/pagemap`` returns the written ranges and re-protects them in
  the same call, so a write after the scan is reported by the next one.

Requires Linux >= 6.7.  Only writes through the registered mapping are seen:
``write(2)`` to the file, another process's mapping, or a hole punched into
the file (``fallocate(PUNCH_HOLE)``, ``MADV_REMOVE``) are not reported.
Everything here is a thin, typed wrapper; failures raise
:class:`TrackingUnavailable` with the errno and what it means.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

import numpy as np

from precopy.errors import PrecopyError

__all__ = [
    "TrackingUnavailable",
    "UFFD_API",
    "UFFD_USER_MODE_ONLY",
    "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    "UFFD_FEATURE_WP_UNPOPULATED",
    "UFFD_FEATURE_WP_ASYNC",
    "TRACKING_FEATURES",
    "UFFDIO_API",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WRITEPROTECT",
    "PAGEMAP_SCAN",
    "PAGE_IS_WRITTEN",
    "PM_SCAN_WP_MATCHING",
    "PM_SCAN_CHECK_WPASYNC",
    "syscall_numbers",
    "create_userfaultfd",
    "uffd_api",
    "register_wp",
    "unregister",
    "writeprotect",
    "PagemapScanner",
    "probe_pagemap_scan",
    "ranges_to_pages",
]


class TrackingUnavailable(PrecopyError):
    """Kernel write tracking cannot be used here; the message says why."""


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    # The generic _IOC layout, shared by x86-64 and arm64 (the architectures
    # supported here): dir:2 | size:14 | type:8 | nr:8.
    return (direction << 30) | (size << 16) | (typ << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1  # userfaultfd(2) flag: needed by unprivileged callers when
# vm.unprivileged_userfaultfd is 0; harmless for write-protect in async mode.
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
TRACKING_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM

UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x3F, 24)  # struct uffdio_api
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x00, 32)  # struct uffdio_register
UFFDIO_UNREGISTER = _ioc(_IOC_READ, 0xAA, 0x01, 16)  # struct uffdio_range
UFFDIO_WRITEPROTECT = _ioc(_IOC_READ | _IOC_WRITE, 0xAA, 0x06, 24)  # struct uffdio_writeprotect
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_UFFDIO_WRITEPROTECT_BIT = 1 << 0x06  # in uffdio_register.ioctls

PAGEMAP_SCAN = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 16, 96)  # struct pm_scan_arg
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1

_SYSCALLS = {
    # machine: (userfaultfd, pidfd_open)
    "x86_64": (323, 434),
    "aarch64": (282, 434),
}


def syscall_numbers() -> tuple[int, int]:
    """``(userfaultfd, pidfd_open)`` syscall numbers of this machine.

    Raises :class:`TrackingUnavailable` on an architecture not listed here.
    """
    machine = platform.machine()
    try:
        return _SYSCALLS[machine]
    except KeyError:
        raise TrackingUnavailable(
            f"kernel write tracking is only wired up for {', '.join(_SYSCALLS)}, not {machine}"
        ) from None


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask",
    )]


assert ctypes.sizeof(_PmScanArg) == 96 and ctypes.sizeof(_Register) == 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> int:
    ret = _libc.ioctl(fd, request, ctypes.byref(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise TrackingUnavailable(f"{what} failed: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")
    return int(ret)


def create_userfaultfd(*, user_mode_only: bool | None = None) -> int:
    """Create a userfaultfd (non-blocking, close-on-exec) for the calling process.

    ``user_mode_only=None`` tries without the flag first and retries with
    ``UFFD_USER_MODE_ONLY`` on EPERM (an unprivileged caller while
    ``vm.unprivileged_userfaultfd`` is 0).  Raises :class:`TrackingUnavailable`
    when the kernel or a seccomp filter refuses.
    """
    nr_uffd, _ = syscall_numbers()
    base = os.O_CLOEXEC | os.O_NONBLOCK
    tries = [False, True] if user_mode_only is None else [user_mode_only]
    err = 0
    for umo in tries:
        fd = _libc.syscall(nr_uffd, base | (UFFD_USER_MODE_ONLY if umo else 0))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EPERM:
            break
    hint = {
        errno.ENOSYS: "the kernel has no userfaultfd, or a seccomp filter blocks it",
        errno.EPERM: "not permitted (needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1, "
                     "or a kernel that accepts UFFD_USER_MODE_ONLY)",
    }.get(err, os.strerror(err))
    raise TrackingUnavailable(f"userfaultfd(): {hint} (errno {errno.errorcode.get(err, err)})")


def uffd_api(fd: int, features: int = TRACKING_FEATURES) -> int:
    """``UFFDIO_API`` handshake asking for ``features``; returns the features granted.

    Raises :class:`TrackingUnavailable` if the kernel lacks one of them
    (async write-protect needs Linux >= 6.7).
    """
    api = _Api(api=UFFD_API, features=features, ioctls=0)
    try:
        _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
    except TrackingUnavailable as exc:
        raise TrackingUnavailable(
            f"{exc}: this kernel does not offer userfaultfd features {features:#x} "
            "(async write-protect needs Linux >= 6.7)"
        ) from None
    if api.features & features != features:
        raise TrackingUnavailable(f"kernel granted userfaultfd features {api.features:#x}, need {features:#x}")
    return int(api.features)


def register_wp(fd: int, start: int, length: int) -> None:
    """Register ``[start, start+length)`` of the fd's address space for write-protect."""
    reg = _Register(range=_Range(start, length), mode=UFFDIO_REGISTER_MODE_WP, ioctls=0)
    _ioctl(fd, UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER of {length} bytes at {start:#x}")
    if not reg.ioctls & _UFFDIO_WRITEPROTECT_BIT:
        raise TrackingUnavailable("the kernel registered the range but offers no UFFDIO_WRITEPROTECT on it")


def unregister(fd: int, start: int, length: int) -> None:
    """Undo :func:`register_wp` (the pages lose their write-protection)."""
    _ioctl(fd, UFFDIO_UNREGISTER, _Range(start, length), "UFFDIO_UNREGISTER")


def writeprotect(fd: int, start: int, length: int, on: bool = True) -> None:
    """Arm (``on``) or disarm write-protection of every page of the range."""
    wp = _WriteProtect(range=_Range(start, length), mode=UFFDIO_WRITEPROTECT_MODE_WP if on else 0)
    _ioctl(fd, UFFDIO_WRITEPROTECT, wp, "UFFDIO_WRITEPROTECT")


_PAGE_REGION = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])


def ranges_to_pages(starts: np.ndarray, ends: np.ndarray, base: int, page_size: int) -> np.ndarray:
    """Page indices (uint32, ascending) covered by byte ranges ``[starts, ends)`` relative to ``base``."""
    first = ((starts - base) // page_size).astype(np.int64)
    counts = ((ends - starts) // page_size).astype(np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.uint32)
    ends_c = np.cumsum(counts)
    offsets = np.repeat(first - (ends_c - counts), counts)
    return (offsets + np.arange(total)).astype(np.uint32)


class PagemapScanner:
    """``PAGEMAP_SCAN`` over one range of another process's address space.

    ``scan()`` returns the pages written since the previous scan (or since
    the range was armed) and re-protects them in the same ioctl.
    """

    def __init__(self, pid: int, start: int, length: int, page_size: int = 4096,
                 vec_len: int = 4096) -> None:
        self.pid = pid
        self.start = start
        self.length = length
        self.page_size = page_size
        try:
            self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TrackingUnavailable(
                f"cannot open /proc/{pid}/pagemap: {exc.strerror} (the agent must be allowed to "
                "ptrace-read the guest: same user or root)"
            ) from exc
        self._vec = np.zeros(vec_len, dtype=_PAGE_REGION)
        self._arg = _PmScanArg()

    def scan(self, *, rearm: bool = True, first: int = 0, stop: int | None = None) -> np.ndarray:
        """Page indices (relative to the range, uint32, ascending) written since the last scan.

        ``first``/``stop``: only pages ``first..stop-1`` of the range are
        scanned (and re-protected); by default all of them.  One call at a
        time (the result buffer is shared).  Raises
        :class:`TrackingUnavailable` if the kernel refuses (e.g. the range
        is not registered for async write-protect any more).
        """
        vec = self._vec
        arg = self._arg
        end = self.start + (self.length if stop is None else stop * self.page_size)
        pos = self.start + first * self.page_size
        parts: list[np.ndarray] = []
        while pos < end:
            arg.size = ctypes.sizeof(arg)
            arg.flags = PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if rearm else 0)
            arg.start, arg.end, arg.walk_end = pos, end, 0
            arg.vec, arg.vec_len, arg.max_pages = vec.ctypes.data, len(vec), 0
            arg.category_inverted, arg.category_anyof_mask = 0, 0
            arg.category_mask = arg.return_mask = PAGE_IS_WRITTEN
            n = _ioctl(self.fd, PAGEMAP_SCAN, arg, f"PAGEMAP_SCAN of /proc/{self.pid}/pagemap")
            if n:
                got = vec[:n]
                parts.append(ranges_to_pages(got["start"], got["end"], self.start, self.page_size))
            # Fewer regions than room means the whole range was walked (walk_end
            # can point short of the end when many regions came back).
            if n < len(vec) or arg.walk_end >= end or arg.walk_end <= pos:
                break
            pos = int(arg.walk_end)
        if not parts:
            return np.zeros(0, dtype=np.uint32)
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1:
            # A region cut at walk_end may repeat a page (np.unique costs ~190 ms
            # for 250,000 pages in NumPy 2; a sort of nearly sorted runs, ~1 ms).
            out = np.sort(out)
            keep = np.ones(len(out), dtype=bool)
            np.not_equal(out[1:], out[:-1], out=keep[1:])
            out = out[keep]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def probe_pagemap_scan() -> None:
    """Check that this kernel has ``PAGEMAP_SCAN`` (Linux >= 6.7); raises :class:`TrackingUnavailable`."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TrackingUnavailable(f"cannot open /proc/self/pagemap: {exc.strerror}") from exc
    try:
        arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg), category_mask=PAGE_IS_WRITTEN,
                         return_mask=PAGE_IS_WRITTEN)
        try:
            _ioctl(fd, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
        except TrackingUnavailable as exc:
            raise TrackingUnavailable(f"{exc}: this kernel has no PAGEMAP_SCAN (needs Linux >= 6.7)") from None
    finally:
        os.close(fd)

"""Kernel write tracking for a process that offers none: its userfaultfd, made inside it with ptrace (x86-64).

A userfaultfd tracks the address space of the process that created it
(``../shared/LIMITS.md``), so a process must make its own; memcached does not.
:func:`take_userfaultfd` makes one for it, the way CRIU's compel runs code
in a process: seize one thread (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``),
point its registers at a ``syscall`` instruction already in its memory
(the one its interrupted system call came from, else one in its vDSO),
single-step ``userfaultfd(O_CLOEXEC|O_NONBLOCK)``, take a copy of the new fd
(``pidfd_getfd``), single-step ``close`` of it, put the registers back and
detach.

Before that it can drop the process's page-table entries of the region
(``release``: one ``madvise(MADV_DONTNEED)`` in the same stop).  For a
``MAP_SHARED`` file mapping that loses nothing -- the data stays in the
file, a later access faults the page back from it -- and it must come
before the tracker write-protects the range (nothing is tracked yet, so
no "written" mark can be lost).  It matters at the switchover: CRIU reads
``/proc/PID/smaps``, where the kernel walks every present page of the
mapping (~28 ms for a populated 1 GiB item file, a part of the downtime);
the pages the process has touched again since are all it walks then.  The process keeps no new fd; an interrupted blocking call is
restarted (or returns EINTR, as after any signal).  The copy then serves
:class:`~precopy.memory.tracking.UffdTracker` like a guest's own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import logging
import signal

from precopy.errors import GuestControlError

__all__ = ["take_userfaultfd", "SYS_USERFAULTFD"]

SYS_USERFAULTFD = 323
_SYS_CLOSE = 3
_SYS_MADVISE = 28
_MADV_DONTNEED = 4
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
_PTRACE_PEEKTEXT = 1
_PTRACE_SINGLESTEP = 9
_PTRACE_GETREGS = 12
_PTRACE_SETREGS = 13
_PTRACE_DETACH = 17
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000
_SYSCALL_INSN = b"\x0f\x05"
_UFFD_USER_MODE_ONLY = 1

_log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


class _Regs(ctypes.Structure):
    """x86-64 ``struct user_regs_struct``."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi",
        "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


def _ptrace(req: int, pid: int, addr: int = 0, data: int | ctypes.c_void_p | None = 0) -> int:
    ctypes.set_errno(0)
    res = _libc.ptrace(req, pid, ctypes.c_void_p(addr), data if isinstance(data, ctypes.c_void_p)
                       else ctypes.c_void_p(data))
    err = ctypes.get_errno()
    if res == -1 and err:
        raise GuestControlError(f"ptrace({req:#x}) of pid {pid}: {os.strerror(err)}")
    return int(res)


def _wait_stop(pid: int) -> int:
    """Wait for ``pid``'s next ptrace stop; returns the stop signal."""
    while True:
        got, status = os.waitpid(pid, _WALL)
        if got != pid:
            continue
        if os.WIFSTOPPED(status):
            return os.WSTOPSIG(status)
        raise GuestControlError(f"process {pid} exited while its userfaultfd was being made")


def _syscall_address(pid: int, regs: _Regs) -> int:
    """A ``syscall`` instruction in ``pid``'s code: where its interrupted call came from, or in its vDSO."""
    word = _ptrace(_PTRACE_PEEKTEXT, pid, regs.rip - 2) & 0xFFFF
    if word.to_bytes(2, "little") == _SYSCALL_INSN:
        return int(regs.rip - 2)
    with open(f"/proc/{pid}/maps") as f:
        vdso = [line.split()[0] for line in f if line.rstrip().endswith("[vdso]")]
    if vdso:
        lo, hi = (int(x, 16) for x in vdso[0].split("-"))
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(lo)
            at = mem.read(hi - lo).find(_SYSCALL_INSN)
        if at >= 0:
            return lo + at
    raise GuestControlError(f"no syscall instruction found in process {pid} to run userfaultfd() with")


def _call(pid: int, saved: _Regs, at: int, nr: int, *args: int) -> int:
    """Run one system call in the stopped thread ``pid``; returns its result (-errno on failure)."""
    regs = _Regs.from_buffer_copy(saved)
    regs.rax, regs.orig_rax, regs.rip = nr, 2**64 - 1, at  # orig_rax -1: no syscall restart on the way in
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, value)
    _ptrace(_PTRACE_SETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(regs)))
    _ptrace(_PTRACE_SINGLESTEP, pid, 0, 0)
    sig = _wait_stop(pid)
    if sig != signal.SIGTRAP:
        raise GuestControlError(f"process {pid} stopped with signal {sig} while running a system call for us")
    _ptrace(_PTRACE_GETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(regs)))
    return ctypes.c_longlong(regs.rax).value


def take_userfaultfd(pid: int, *, user_mode_only: bool = False, release: tuple[int, int] | None = None) -> int:
    """Make a userfaultfd in process ``pid`` and return our copy of it (see the module docstring).

    The copy is close-on-exec and non-blocking, with no ``UFFDIO_API`` done
    yet.  ``release``: ``(start, length)`` of a ``MAP_SHARED`` file mapping
    whose page-table entries the process drops first (``MADV_DONTNEED``; a
    failure there is logged, not raised: it only spares CRIU work).  Raises
    :class:`GuestControlError` saying why it could not.
    """
    if platform.machine() != "x86_64":
        raise GuestControlError(f"making a userfaultfd inside a process needs x86-64, not {platform.machine()}")
    _ptrace(_PTRACE_SEIZE, pid)
    saved: _Regs | None = None
    try:
        _ptrace(_PTRACE_INTERRUPT, pid)
        _wait_stop(pid)
        regs = _Regs()
        _ptrace(_PTRACE_GETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(regs)))
        saved = regs
        at = _syscall_address(pid, saved)
        if release is not None:
            rc = _call(pid, saved, at, _SYS_MADVISE, release[0], release[1], _MADV_DONTNEED)
            if rc < 0:
                _log.warning("madvise(MADV_DONTNEED) of %#x+%d in process %d: %s (its page tables stay "
                             "populated: CRIU's dump walks them)", release[0], release[1], pid, os.strerror(-rc))
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (_UFFD_USER_MODE_ONLY if user_mode_only else 0)
        theirs = _call(pid, saved, at, SYS_USERFAULTFD, flags)
        if theirs == -errno.EPERM and not user_mode_only:  # unprivileged, vm.unprivileged_userfaultfd=0
            theirs = _call(pid, saved, at, SYS_USERFAULTFD, flags | _UFFD_USER_MODE_ONLY)
        if theirs < 0:
            raise GuestControlError(f"userfaultfd() in process {pid} failed: {os.strerror(-theirs)}")
        try:
            pidfd = _libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
            if pidfd < 0:
                raise GuestControlError(f"pidfd_open({pid}): {os.strerror(ctypes.get_errno())}")
            try:
                ours = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, theirs, 0)
                if ours < 0:
                    raise GuestControlError(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(pidfd)
        finally:
            _call(pid, saved, at, _SYS_CLOSE, theirs)
        return int(ours)
    finally:
        try:
            if saved is not None:  # the thread goes on exactly where it was stopped
                _ptrace(_PTRACE_SETREGS, pid, 0, ctypes.c_void_p(ctypes.addressof(saved)))
        finally:
            _ptrace(_PTRACE_DETACH, pid, 0, 0)

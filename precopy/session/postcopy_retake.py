"""A restarted destination daemon takes a running post-copy back (docs/FAILURES.md "Post-copy").

A daemon that dies during post-copy (SIGKILL, a crash, the OOM killer)
leaves its guest running with pages missing: the guest keeps its own copy
of its userfaultfd, so a touch of a missing page waits instead of reading
stale bytes or zeros.  At its next start the daemon finds the migration in
its journal (``outcome: committed``, ``postcopy: running``) and, before it
listens:

1. reads the still-missing mask the dead daemon kept
   (:mod:`precopy.session.postcopy_state`);
2. takes the guest's userfaultfd again: with ``pidfd_getfd`` from the
   guest's process (found as the peer of its control socket; a guest
   blocked in a fault cannot answer its control socket -- a Python guest's
   control thread needs the interpreter lock the faulting thread holds),
   or, where that is not allowed, with the guest's ``postcopy`` op (a
   post-copy guest hands out the same userfaultfd each time);
3. registers the range again, as before (the kernel accepts it for the
   userfaultfd that registered it, refuses it for another: the check that
   this is the guest's), resumes the guest (one the dead daemon had not
   resumed yet runs now: the journal says the workload is the
   destination's) and waits for the source's RESUME, as after a broken
   link (:meth:`~precopy.session.postcopy_dest.PostcopyDest.serve`).

A fault the dead daemon had read and not answered is served by the push,
not first.  A guest that is gone, a mask that is not there, a userfaultfd
that cannot be had: the post-copy ends here as ``broken``, loudly.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import numpy as np

from precopy.errors import GuestControlError, PrecopyError
from precopy.memory.uffd import TrackingUnavailable
from precopy.memory.uffd_missing import register_postcopy
from precopy.protocol import Begin
from precopy.protocol.postcopy_codec import bitmap_of
from precopy.session.dest_options import DestOptions
from precopy.session.journal import Journal, MigrationRecord
from precopy.session.postcopy_dest import LIVE, PostcopyDest, Receiving
from precopy.session.postcopy_pages import PagePlacer
from precopy.session.postcopy_state import load_need, need_path
from precopy.workload.control import GuestControl

__all__ = ["retake_postcopies", "guest_userfaultfd"]

_log = logging.getLogger(__name__)

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (the unified syscall table)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class _Retaken:
    """What :class:`PostcopyDest` takes of a receiver, for a post-copy taken back from the journal."""

    begin: Begin
    rec: MigrationRecord
    opts: DestOptions
    journal: Journal


def _record(entry: dict[str, Any]) -> MigrationRecord:
    known = {f.name for f in fields(MigrationRecord)}
    return MigrationRecord(**{k: v for k, v in entry.items() if k in known})


async def retake_postcopies(journal: Journal, opts: DestOptions, tasks: set[asyncio.Task[Any]]) -> None:
    """Take back every post-copy the journal says runs here: each registered in :data:`LIVE` for the
    source's RESUME, and served by a task added to ``tasks`` (the daemon's: cancelled when it stops)."""
    for pc in await _retake_all(journal, opts):
        task = asyncio.create_task(_serve(pc))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _serve(pc: PostcopyDest) -> None:
    """A post-copy taken back, until complete (or broken: recorded, said loudly)."""
    try:
        await pc.serve(None, {})
    except (PrecopyError, OSError) as exc:  # e.g. the source never came back
        _log.error("%s", exc)
    except Exception:  # a bug here must not take the daemon down
        _log.exception("internal error serving post-copy of %s", pc.begin.migration_id)


async def _retake_all(journal: Journal, opts: DestOptions) -> list[PostcopyDest]:
    taken = []
    for entry in journal.entries():
        if entry.get("outcome") != "committed" or entry.get("postcopy") != "running":
            continue
        rec = _record(entry)
        try:
            taken.append(await _retake(rec, opts, journal))
        except (PrecopyError, OSError, ValueError) as exc:
            rec.postcopy, rec.error = "broken", f"the destination daemon restarted and could not take it back: {exc}"
            journal.write(rec)
            assert opts.state_dir is not None
            need_path(opts.state_dir, rec.migration_id).unlink(missing_ok=True)
            _log.critical("migration %s: post-copy BROKEN: %s. The guest (if it still runs) waits on the pages "
                          "it lacks; its source keeps them, paused: stop the guest here and resume the source's "
                          "copy (docs/FAILURES.md, \"Post-copy\")", rec.migration_id, rec.error)
    return taken


async def _retake(rec: MigrationRecord, opts: DestOptions, journal: Journal) -> PostcopyDest:
    if not rec.memory or not rec.postcopy_control:
        raise PrecopyError("its journal record names no region or no guest control socket")
    assert opts.state_dir is not None
    begin = Begin(migration_id=rec.migration_id, name=rec.name, size=rec.size)
    need, minor = load_need(need_path(opts.state_dir, rec.migration_id), begin.npages)
    ctl = Path(rec.postcopy_control)
    # (start() and take_back(), which need the rest of a receiver, are past: never called here)
    recv = cast(Receiving, _Retaken(begin, rec, opts, journal))
    pc = PostcopyDest(recv, bitmap_of(np.flatnonzero(need), begin.npages))
    try:
        pc.region_fd = os.open(rec.memory, os.O_RDWR | os.O_CLOEXEC)
        uffd, start = await _take(ctl, rec.memory, rec.size, minor)
        pc._uffd, pc._range = uffd, (start, rec.size)
        os.set_blocking(uffd, False)
        pc.placer = PagePlacer(uffd, start, begin.npages, pc.missing_mask, pc.region_fd, minor=minor)
        pc.placer.need = need  # mapped from the file: the mask goes on being kept
        # Its resume may wait until a fault is served (the stream must be up): as long as the source may take.
        pc._guest = GuestControl(ctl, timeout_s=opts.postcopy_resume_timeout_s)
    except BaseException:
        pc.close()
        raise
    LIVE[rec.migration_id] = pc
    _log.warning("migration %s: post-copy taken back after a restart: %d pages still missing; waiting for the "
                 "source to resume the page stream", rec.migration_id, pc.placer.left)
    return pc


async def _take(ctl: Path, region: str, size: int, minor: bool) -> tuple[int, int]:
    """The guest's userfaultfd (registered again) and the address of its mapping of ``region``."""
    pid = _peer_pid(ctl)
    start = _mapping_start(pid, region, size)
    try:
        fd = guest_userfaultfd(pid, start, size, minor)
    except OSError as exc:  # not allowed (no CAP_SYS_PTRACE, Yama), or no pidfd_getfd: ask the guest
        _log.warning("cannot take the userfaultfd of guest %d itself (%s): asking it over %s", pid, exc, ctl)
        try:
            offer = await GuestControl(ctl, timeout_s=10.0).offer_postcopy()
        except GuestControlError as gexc:
            raise PrecopyError(f"the guest on {ctl} did not hand over its userfaultfd: {gexc}") from gexc
        fd = offer.fd
        if (offer.start, offer.length) != (start, size):
            os.close(fd)
            raise PrecopyError(f"the guest offers {offer.length} bytes at {offer.start:#x}; it maps the region "
                               f"at {start:#x}")
        try:
            register_postcopy(fd, start, size, minor=minor)
        except TrackingUnavailable as rexc:
            os.close(fd)
            raise PrecopyError(f"registering the guest's range again: {rexc}") from rexc
    return fd, start


def _peer_pid(ctl: Path) -> int:
    """The process listening on the guest's control socket (it need not answer: SO_PEERCRED is set
    by the kernel at connect)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(str(ctl))
        except OSError as exc:
            raise PrecopyError(f"the guest's control socket {ctl}: {exc.strerror or exc} (is the guest gone?)") from exc
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if pid <= 0:
        raise PrecopyError(f"the guest on {ctl} is in a process namespace this daemon cannot see")
    return int(pid)


def _mapping_start(pid: int, region: str, size: int) -> int:
    """Where ``pid`` maps the whole ``region`` (one shared mapping from offset 0)."""
    st = os.stat(region)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5 or int(parts[4]) != st.st_ino or int(parts[2], 16) != 0:
                continue
            major, _, minor = parts[3].partition(":")
            if os.makedev(int(major, 16), int(minor, 16)) != st.st_dev or parts[1][3] != "s":
                continue
            lo, _, hi = parts[0].partition("-")
            if int(hi, 16) - int(lo, 16) == size:
                return int(lo, 16)
    raise PrecopyError(f"process {pid} does not map {region} whole and shared")


def guest_userfaultfd(pid: int, start: int, size: int, minor: bool) -> int:
    """The userfaultfd that registered ``pid``'s range ``start``..``+size``, copied with ``pidfd_getfd``
    and registered again (which only that userfaultfd may: another gets EBUSY and is passed over).

    Raises :class:`OSError` when the guest's descriptors cannot be had (permissions, an old kernel),
    :class:`PrecopyError` when none of its userfaultfds is the one.
    """
    pidfd = os.pidfd_open(pid)
    try:
        candidates = []
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[userfaultfd]":
                    candidates.append(int(name))
            except OSError:
                continue
        for target in candidates:
            fd = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0))
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd of guest {pid}'s fd {target}: {os.strerror(err)}")
            try:
                register_postcopy(fd, start, size, minor=minor)
            except TrackingUnavailable:
                os.close(fd)  # not the one (EBUSY: the range is another userfaultfd's)
                continue
            os.set_inheritable(fd, False)
            return fd
    finally:
        os.close(pidfd)
    raise PrecopyError(f"none of guest {pid}'s {len(candidates)} userfaultfd(s) is the one of its region")


"""The destination's post-copy: from POSTCOPY to COMPLETE (docs/PROTOCOL.md, docs/FAILURES.md).

On POSTCOPY the :class:`~precopy.session.receiver.Receiver` hands over to
:class:`PostcopyDest`, which:

1. lets no page land in the region from the wire but through the placer;
   what reads or populates the region through the agent's own mapping
   (the chunk tracker, the prefault threads) is stopped after COMMITTED
   with MINOR faults (harmless there), before punching without them (a
   read of a punched hole would allocate it);
2. commits as for pre-copy (device state, journal, rename), the record
   saying ``postcopy: running``, and runs the on-resume hook with
   ``PRECOPY_POSTCOPY_CONTROL``: the guest it starts listens there, held;
3. takes the guest's userfaultfd (op ``postcopy``) and registers the
   region's range in MINOR + MISSING mode -- where the kernel or the file
   system cannot, punches the missing pages out of the region file and
   registers MISSING (:mod:`precopy.memory.uffd_missing`); answers
   COMMITTED and resumes the guest (op ``resume``, its faults served from
   then on): the workload runs here;
4. serves the page stream (:class:`~precopy.session.postcopy_pages.PagePlacer`):
   faults become REQUESTs, PAGES are placed (MINOR: the pages it holds are
   mapped for the guest in the background); when none is missing it sends
   COMPLETE, unregisters the range and records ``postcopy: complete``.

A failure in steps 1-3 (no guest within ``postcopy_guest_timeout_s``) ends
the migration before the guest ran: ABORT, the source resumes its own
copy, the damaged region and its record are taken back.  From step 4 on
the workload runs here and nothing is rolled back: a broken link waits
(``postcopy_resume_timeout_s``) for the source to come back with RESUME on
a new connection (:meth:`PostcopyDest.take_over`); a daemon that dies leaves
the still-missing mask in a file (:mod:`precopy.session.postcopy_state`), and
the next one takes the post-copy back (:mod:`precopy.session.postcopy_retake`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from precopy.errors import AbortCode, GuestControlError, PrecopyError, RemoteProtocolError
from precopy.memory.map_in import HUGETLBFS_MAGIC, fs_magic
from precopy.memory.tracking import TrackingOffer
from precopy.memory.uffd import TrackingUnavailable
from precopy.memory.uffd_missing import (FAULT_MSG_SIZE, punch_pages, read_fault_batch, register_missing,
                                         register_postcopy, unregister_missing)
from precopy.net.channel import Channel, LinkError, PeerAborted
from precopy.protocol import MAX_BATCH_PAGES, PAGE_SIZE, Committed, Complete, Missing, Pages, Ready, Request, page_payload
from precopy.protocol.postcopy_codec import bitmap_of, mask_of_bitmap
from precopy.session.postcopy_guest import HeldGuest, control_path, take_guest
from precopy.session.postcopy_backlog import PushBacklog
from precopy.session.postcopy_pages import PagePlacer
from precopy.session.postcopy_state import need_path, persist_need
from precopy.protocol import POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP, POSTCOPY_LANE_CAP, Begin, Resume
from precopy.session.postcopy_lane import DestLane
from precopy.session.postcopy_lane_proc import prestart, process_lane_ok
from precopy.session.dest_options import DestOptions
from precopy.session.journal import Journal, MigrationRecord

from precopy.workload.control import GuestControl

__all__ = ["PostcopyDest", "LIVE", "dest_caps", "resume_postcopy"]

_log = logging.getLogger(__name__)

#: The post-copy stream's socket receive buffer (bytes; see small_window).
RECEIVE_WINDOW = 512 * 1024
#: Pages mapped per step in the background (MINOR; ~0.1 ms of the event loop each).
_MAP_SLICE = 1024
#: Post-copy migrations whose page stream is live or waits for RESUME, by migration id.
LIVE: dict[str, PostcopyDest] = {}


def dest_caps(opts: DestOptions, offered: tuple[str, ...] | None,
              chan: Channel | None = None) -> tuple[str, ...] | None:
    """HELLO_ACK's ``caps``: None to a HELLO without (as before), else what of it is served here
    (recorded as ``chan.caps`` too, when given).

    Post-copy needs a guest the --on-resume hook starts (no workload adapter), and a
    --memory-dir of 4 KiB pages: on hugetlbfs a page is placed 2 MiB at a time, which the page
    stream does not do (the source then sees no post-copy here and says so).
    ``postcopy-immediate`` (the source switches over right after READY): READY waits for the
    guest started early (:meth:`~precopy.session.receiver.Receiver.run`).
    """
    if offered is None:
        return None
    serves = bool(opts.on_resume) and opts.workload is None and not _huge_pages(opts)
    caps = tuple(c for c in offered if c in (POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP, POSTCOPY_LANE_CAP) and serves)
    if chan is not None:
        chan.caps = caps
        if POSTCOPY_LANE_CAP in caps and process_lane_ok(chan):
            prestart()  # the lane's child, ahead: its imports take ~0.5 s (postcopy_lane_proc; not over TLS)
    return caps


def _huge_pages(opts: DestOptions) -> bool:
    if fs_magic(opts.memory_dir) != HUGETLBFS_MAGIC:
        return False
    _log.info("no post-copy here: --memory-dir %s is hugetlbfs (pages placed 4 KiB at a time)", opts.memory_dir)
    return True


async def resume_postcopy(chan: Channel, ev: Resume, opts: DestOptions, journal: Journal | None) -> None:
    """A source takes a broken post-copy page stream up on ``chan`` (docs/FAILURES.md).

    A post-copy finished here already (its COMPLETE lost with the link) is
    answered from the journal: nothing missing, READY, COMPLETE.
    """
    mid = ev.begin.migration_id
    live = LIVE.get(mid)
    chan.send_timeout_s = opts.idle_timeout_s
    if live is None:
        rec = journal.read(mid) if journal is not None else None
        if rec is not None and rec.get("postcopy") == "complete" and rec.get("size") == ev.begin.size:
            bits = bytes(-(-ev.begin.npages // 8))
            for off in range(0, len(bits), MAX_BATCH_PAGES * PAGE_SIZE):
                await chan.send(Missing(offset=off, total=len(bits), data=bits[off:off + MAX_BATCH_PAGES * PAGE_SIZE]))
            await chan.send(Ready())
            await chan.send(Complete(migration_id=mid, pages=0))
            return
    if live is None or live.begin.size != ev.begin.size or live.begin.name != ev.begin.name:
        raise PrecopyError(f"no post-copy of migration {mid} waits here to be resumed", AbortCode.REGION)
    await live.take_over(chan)


def small_window(chan: Channel) -> None:
    """Keep little of the page stream in flight: a requested page cannot overtake what is
    (the source paces its pushes by what its socket holds unsent; a small receive window makes
    that what is in flight)."""
    try:
        chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_WINDOW)
    except OSError as exc:
        _log.debug("post-copy: cannot shrink the receive window: %s", exc)


class Receiving(Protocol):
    """What post-copy needs of the :class:`~precopy.session.receiver.Receiver` that hands over to it."""

    begin: Begin
    rec: MigrationRecord
    opts: DestOptions
    journal: Journal
    device: bytearray
    device_state_path: Path
    partial: Path
    final: Path
    run_hook: Callable[[MigrationRecord, Path, Path], Awaitable[None]]


class PostcopyDest:
    """One post-copy migration on the destination (see the module docstring)."""

    def __init__(self, recv: Receiving, bitmap: bytes | bytearray, held: HeldGuest | None = None,
                 quiesce: Callable[[], None] | None = None) -> None:
        self.recv = recv
        self._quiesce = quiesce  # stops what touches the region through the agent's mapping
        self.held = held  # the guest started when the migration began (--postcopy-guest-early)
        self.begin = recv.begin
        self.missing_mask = mask_of_bitmap(bitmap, self.begin.npages)  # a mask: no index list in the downtime
        self.n_missing = int(np.count_nonzero(self.missing_mask))
        self.placer: PagePlacer | None = None
        self.region_fd = -1
        self._guest: GuestControl | None = None
        self._uffd = -1
        self._range: tuple[int, int] = (0, 0)
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._next_chan: asyncio.Future[Channel] | None = None
        self.t_commit = 0.0
        self._chan: Channel | None = None  # the connection the stream is served on now
        self._resumer: asyncio.Task[None] | None = None
        self._streaming: asyncio.Future[None] | None = None  # the stream on ``_chan``
        self._preempted = False  # it was cancelled for a RESUME on a new connection
        self._punch_ms = 0.0
        self._mapper: asyncio.Task[None] | None = None  # MINOR: maps the held pages in the background
        self._fault_buf = bytearray(FAULT_MSG_SIZE * 64)
        self.backlog = PushBacklog()  # pushes held back while the guest waits on a page not here
        self._faults_failed = False
        self._seen_empty = 0.0  # when the guest's userfaultfd was last read empty (faults came after)
        self.lock = threading.Lock()  # placing pages, reading faults: the session's loop or the lane's thread
        self.lane = DestLane(self)  # the fault lane (postcopy_lane), when the source opened one
        self._why: str | None = None  # why the stream was cancelled (_preempted), when not for a RESUME
        self._cpu_run = 0.0  # process CPU time when the page stream began (COMPLETE's push_cpu_s)

    # -- steps 1-3: from POSTCOPY to the guest running here ----------------

    async def start(self, region: Path) -> dict[str, float]:
        """Commit, take the guest (started now, or held since BEGIN), register; returns the timings
        (ms) for COMMITTED.

        Raises :class:`PrecopyError` before the guest runs (the migration is then
        taken back: see :meth:`take_back`).
        """
        recv, rec = self.recv, self.recv.rec
        t0 = time.monotonic()
        self.region_fd = os.open(region, os.O_RDWR | os.O_CLOEXEC)
        assert recv.opts.state_dir is not None
        held = self.held
        ctl = held.ctl if held is not None else control_path(recv.opts.state_dir, self.begin.migration_id)
        if held is None:
            ctl.unlink(missing_ok=True)
        else:  # it maps the region under its partial name: it must have done so before the rename
            self._guest, offer = await held.take()
        rec.postcopy, rec.postcopy_control = "running", str(ctl)
        t1 = time.monotonic()
        recv.journal.commit(rec, recv.device, recv.device_state_path, recv.partial, recv.final)
        self.t_commit = time.monotonic()
        if held is None:
            await recv.run_hook(rec, recv.final, recv.device_state_path)
            self._guest, offer = await take_guest(ctl, recv.opts.postcopy_guest_timeout_s)
        self._take_offer(offer)
        t2 = time.monotonic()
        return {"postcopy_held": (t1 - t0) * 1e3, "postcopy_journal": (self.t_commit - t1) * 1e3,
                "postcopy_punch": self._punch_ms, "postcopy_guest": (t2 - self.t_commit) * 1e3}

    def _take_offer(self, offer: TrackingOffer) -> None:
        """The guest's userfaultfd: check its range, register it, make the placer."""
        self._uffd = offer.fd
        if offer.length != self.begin.size or offer.start % PAGE_SIZE:
            raise PrecopyError(f"post-copy: the guest offers {offer.length} bytes at {offer.start:#x} for a region "
                               f"of {self.begin.size}", AbortCode.GUEST)
        minor = self._register(offer.fd, offer.start, offer.length)
        self._range = (offer.start, offer.length)
        os.set_blocking(offer.fd, False)
        self.placer = PagePlacer(offer.fd, offer.start, self.begin.npages, self.missing_mask, self.region_fd, minor=minor)

    def _register(self, uffd: int, start: int, length: int) -> bool:
        """Register the guest's range: MINOR (nothing punched) where the kernel and the file system
        offer it, else punch the missing pages out and register MISSING.  Returns whether MINOR."""
        try:
            register_postcopy(uffd, start, length, minor=True)
            _log.info("migration %s: post-copy with %d pages missing (MINOR faults: nothing punched)",
                      self.begin.migration_id, self.n_missing)
            return True
        except TrackingUnavailable as exc:
            _log.info("post-copy: no MINOR faults on this region (%s): punching the missing pages out", exc)
        self._quiet()
        t0 = time.monotonic()
        try:
            runs = punch_pages(self.region_fd, np.flatnonzero(self.missing_mask).astype(np.uint32))
        except OSError as exc:
            raise PrecopyError(f"post-copy: {exc} (it needs a tmpfs, memfd or hugetlbfs region)",
                               AbortCode.REGION) from exc
        self._punch_ms = (time.monotonic() - t0) * 1e3
        _log.info("migration %s: post-copy with %d pages missing (%d runs punched in %.1f ms)",
                  self.begin.migration_id, self.n_missing, runs, self._punch_ms)
        try:
            register_missing(uffd, start, length)
        except TrackingUnavailable as exc:
            raise PrecopyError(f"post-copy: {exc}", AbortCode.GUEST) from exc
        return False

    async def _resume_guest(self) -> None:
        """``resume`` the held guest.  Faults are served meanwhile: its reply may wait on one (a
        Python guest's control thread needs the interpreter lock its work loop holds in a fault)."""
        assert self._guest is not None
        try:
            await self._guest.resume()
        except GuestControlError as exc:
            _log.critical("migration %s: the guest would not resume after the post-copy commit: %s; resume it "
                          "by hand (its control socket: %s)", self.begin.migration_id, exc, self._guest.path)
        finally:
            await self._guest.close()

    def _quiet(self) -> None:
        if self._quiesce is not None:
            quiesce, self._quiesce = self._quiesce, None
            quiesce()

    async def take_back(self, why: BaseException) -> None:
        """Before the guest ran: stop it if it is there, and undo the commit (journal, files)."""
        self._quiet()
        recv, rec = self.recv, self.recv.rec
        if self._guest is not None:
            try:
                await self._guest._request("stop")
            except GuestControlError as exc:
                _log.warning("post-copy: stopping the held guest: %s", exc)
            await self._guest.close()
        rec.outcome, rec.postcopy, rec.error = "aborted", None, f"post-copy did not start: {why}"
        for path in (recv.final, recv.device_state_path):
            path.unlink(missing_ok=True)
        recv.journal.write(rec)
        self.close()

    # -- step 4: the page stream -------------------------------------------

    async def serve(self, chan: Channel | None, timings: dict[str, float]) -> None:
        """COMMITTED, then the page stream until every page is placed (across reconnections).

        ``chan`` None: taken back by a restarted daemon (:mod:`precopy.session.postcopy_retake`):
        the guest is resumed and the stream waits for the source's RESUME.
        """
        assert self.placer is not None
        mid = self.begin.migration_id
        LIVE[mid] = self
        loop = asyncio.get_running_loop()
        first = chan is not None
        if first:
            self._persist()
        self._seen_empty = time.monotonic()  # the guest runs from COMMITTED on
        self._cpu_run = time.process_time()  # COMPLETE says the CPU the page stream took here
        loop.add_reader(self._uffd, self._on_fault)
        try:
            if chan is None:
                self._resumer = asyncio.create_task(self._resume_guest())
                self._mapper = asyncio.create_task(self._map_held())
                chan = await self._wait_resume()
            self._chan = chan
            small_window(chan)
            _log.info("migration %s: the workload runs here; %d pages to come", mid, self.placer.left)
            while self.placer.left:
                try:
                    if first:
                        first = False
                        await chan.send(Committed(migration_id=mid, resumed=True, timings=timings))
                        self._quiet()
                        self._resumer = asyncio.create_task(self._resume_guest())
                        self._mapper = asyncio.create_task(self._map_held())
                    self._streaming = asyncio.ensure_future(self._stream(chan))
                    await self._streaming
                    continue
                except asyncio.CancelledError:
                    if not self._preempted:
                        raise
                    if not self.placer.left:
                        break
                    why = self._why or "the source resumed on a new connection"
                except (LinkError, PeerAborted, OSError, RemoteProtocolError) as exc:
                    if not self.placer.left:
                        break
                    why = str(exc)
                self._preempted, self._why = False, None
                await self.lane.stop()
                _log.warning("migration %s: post-copy link lost with %d pages missing (%s): the guest waits on "
                             "its faults; waiting for the source to resume", mid, self.placer.left, why)
                chan.close()
                self._release_handler()
                self._chan = None
                chan = await self._wait_resume()
                self._chan = chan
                small_window(chan)
            # "complete" only once the guest runs (a daemon dying before it resumed the guest must
            # leave the post-copy "running" in its journal, not a guest held forever), and recorded
            # before it is said: a COMPLETE the source saw is in the journal, should this daemon die
            # right after (a restarted one answers a RESUME from it).
            if self._resumer is not None:
                await self._resumer
            await self.lane.stop()  # (its child's counts are in the placer's once it is stopped)
            self._finish()
            stats = {**self.placer.stats(), "push_cpu_s": time.process_time() - self._cpu_run + self.lane.cpu_s}
            await chan.send(Complete(migration_id=mid, pages=self.n_missing, stats=stats))
        finally:
            await self.lane.stop()
            loop.remove_reader(self._uffd)
            LIVE.pop(mid, None)
            for task in (self._resumer, self._mapper):
                if task is not None:
                    task.cancel()
            self.close()

    async def _stream(self, chan: Channel) -> None:
        """Requests out, pages in, until none is missing; raises when the link fails."""
        assert self.placer is not None
        sender = asyncio.create_task(self._send_requests(chan))
        try:
            events = chan.events(self.recv.opts.idle_timeout_s)
            while self.placer.left:
                # Between frames too: while the socket holds data the loop gets no turn (reader
                # callbacks wait), yet a fault must be seen, and a REQUEST sent, at once.
                (self.lane.peek if self.lane.reading else self._on_fault)()
                if not self._out.empty():
                    await asyncio.sleep(0)  # _send_requests sends it
                if len(self.backlog) and (self.lane.reading or not self.placer.waiting()):
                    with self.lock:
                        self._place_held(self.backlog.oldest())  # a frame at a time, faults looked at between
                    continue
                if not self.placer.left:
                    # A fault above, on a page held back, placed the last held frames: nothing more
                    # comes (the source has sent every page and waits for COMPLETE).
                    break
                ev = await anext(events, None)
                if ev is None:
                    raise LinkError(f"{chan.peer} closed the connection during post-copy")
                if not isinstance(ev, Pages):
                    raise RemoteProtocolError(f"unexpected {type(ev).__name__} during post-copy")
                if ev.checksum is None and ev.chunk_digests is None:
                    raise RemoteProtocolError("post-copy PAGES without a checksum: nothing would check them")
                data = page_payload(ev, chunk_pages=self.begin.chunk_pages) if len(ev.indices) else None
                with self.lock:
                    if (not self.lane.reading and self.placer.waiting() and not self.backlog.full()
                            and not self.placer.awaited(ev.indices, ev.zeros)):
                        self.backlog.hold(ev.indices, data, ev.zeros)  # the awaited page first
                    else:
                        self.placer.place(ev.indices, data, ev.zeros)
            if sender.done():
                sender.result()
        finally:
            sender.cancel()

    async def _map_held(self) -> None:
        """MINOR: map the pages the guest may use as they are, a slice at a time between the stream's
        work (a fault on one is served at once anyway; this spares the guest the round trips)."""
        assert self.placer is not None
        while self.lane.locked(self.placer.map_held, _MAP_SLICE):
            await asyncio.sleep(0)

    def _on_fault(self) -> None:
        """Read the faults waiting on the guest's userfaultfd, until it is empty; queue REQUESTs."""
        assert self.placer is not None
        with self.lock:
            ask: list[int] = []
            while self._uffd >= 0 and not self._faults_failed:
                now = time.monotonic()  # before the read: a fault it does not see comes after this
                try:
                    addrs, drained = read_fault_batch(self._uffd, self._fault_buf)
                except OSError as exc:
                    _log.error("post-copy: reading the guest's faults failed: %s", exc)
                    self._faults_failed = True
                    asyncio.get_running_loop().remove_reader(self._uffd)
                    return
                ask += self.placer.faulted(addrs, now, self._seen_empty)
                if drained:  # (that read saw it empty: no second read to see it)
                    self._seen_empty = now
                    break
            if ask:
                for frame in self.backlog.holding(ask):  # here already, held back: placed now
                    self._place_held(frame)
                self._out.put_nowait(np.array(sorted(ask), dtype=np.uint32))

    def _place_held(self, frame: tuple[np.ndarray, bytes | None, np.ndarray] | None) -> None:
        assert self.placer is not None
        if frame is not None:  # (the caller holds self.lock)
            indices, data, zeros = frame
            self.placer.place(indices, None if data is None else memoryview(data), zeros)

    async def _send_requests(self, chan: Channel) -> None:
        """REQUEST frames for the pages faulted on (coalesced: what is queued goes in one frame)."""
        assert self.placer is not None
        while True:
            pages = [await self._out.get()]
            while not self._out.empty():
                pages.append(self._out.get_nowait())
            want = np.unique(np.concatenate(pages))
            want = want[self.placer.need[want]]
            for i in range(0, len(want), MAX_BATCH_PAGES):
                await chan.send(Request(indices=want[i:i + MAX_BATCH_PAGES]))

    async def _wait_resume(self) -> Channel:
        """The channel of the source's RESUME (:meth:`take_over`), or raise after the timeout."""
        timeout = self.recv.opts.postcopy_resume_timeout_s
        self._next_chan = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                return await self._next_chan
        except TimeoutError:
            self._broken(f"the source did not come back within {timeout:g} s")
            raise PrecopyError(f"post-copy of {self.begin.migration_id} broken: the source did not resume "
                               f"within {timeout:g} s; {self.placer.left if self.placer else '?'} pages are "
                               "missing and the guest waits on them (docs/FAILURES.md)", AbortCode.LINK) from None
        finally:
            self._next_chan = None

    async def take_over(self, chan: Channel) -> None:
        """A RESUME came on ``chan``: tell the source what is still missing, READY, and serve on it."""
        assert self.placer is not None
        if self._next_chan is None and self._streaming is not None and not self._streaming.done():
            # The source came back: the link it left is dead to it, whatever this side saw (a stall).
            _log.warning("post-copy of %s: the source resumes on a new connection; dropping %s",
                         self.begin.migration_id, self._chan.peer if self._chan is not None else "?")
            self._preempted = True
            self._streaming.cancel()
            for _ in range(500):
                if self._next_chan is not None:
                    break
                await asyncio.sleep(0.01)
        if self._next_chan is None or self._next_chan.done():
            raise PrecopyError(f"post-copy of {self.begin.migration_id} is being served on another connection",
                               AbortCode.BUSY)
        # Asked for but not here: asked again on this connection (the held-back pushes placed first).
        again = _place_backlog(self)
        if again.size:
            self._out.put_nowait(again)
        bits = bitmap_of(np.flatnonzero(self.placer.need), self.begin.npages)
        for off in range(0, len(bits), MAX_BATCH_PAGES * PAGE_SIZE):
            await chan.send(Missing(offset=off, total=len(bits), data=bits[off:off + MAX_BATCH_PAGES * PAGE_SIZE]))
        await chan.send(Ready())
        _log.info("migration %s: post-copy resumed from %s, %d pages missing", self.begin.migration_id,
                  chan.peer, self.placer.left)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._served: asyncio.Future[None] | None = done
        self._next_chan.set_result(chan)
        await done  # the session's task serves it; this connection's handler waits

    def _persist(self) -> None:
        """Keep the still-missing mask in a file (:mod:`precopy.session.postcopy_state`): a daemon
        restarted after this one died takes the post-copy back from it."""
        assert self.placer is not None and self.recv.opts.state_dir is not None
        path = need_path(self.recv.opts.state_dir, self.begin.migration_id)
        try:
            self.placer.need = persist_need(self.placer.need, self.placer.minor, path)
        except OSError as exc:
            _log.warning("post-copy of %s: cannot keep its page mask in %s (%s): a daemon restarted after "
                         "this one died could not take it back", self.begin.migration_id, path, exc)

    def _forget(self) -> None:
        """The post-copy is over here (complete or broken): no daemon takes it back."""
        if self.recv.opts.state_dir is not None:
            need_path(self.recv.opts.state_dir, self.begin.migration_id).unlink(missing_ok=True)

    def _finish(self) -> None:
        self._forget()
        rec = self.recv.rec
        start, length = self._range
        try:
            unregister_missing(self._uffd, start, length)
        except TrackingUnavailable as exc:
            _log.debug("unregistering the guest's range: %s", exc)
        rec.postcopy = "complete"
        self.recv.journal.write(rec)
        assert self.placer is not None
        _log.info("migration %s: post-copy complete (%d faults, %d pages pushed, %.1f s after the commit)",
                  self.begin.migration_id, self.placer.faults, self.placer.pushed, time.monotonic() - self.t_commit)

    def _broken(self, why: str) -> None:
        self._forget()
        rec = self.recv.rec
        rec.postcopy, rec.error = "broken", why
        try:
            self.recv.journal.write(rec)
        except PrecopyError as exc:
            _log.error("cannot record that post-copy of %s is broken: %s", rec.migration_id, exc)
        _log.critical("migration %s: post-copy BROKEN (%s): the guest runs with %d pages missing and waits "
                      "on any it touches; the source holds them (its workload stays paused)", rec.migration_id,
                      why, self.placer.left if self.placer else -1)

    def _release_handler(self) -> None:
        """The connection a RESUME came on is done with: its handler may return."""
        served = getattr(self, "_served", None)
        if served is not None and not served.done():
            served.set_result(None)
        self._served = None

    def close(self) -> None:
        self._release_handler()
        self.lane.release()
        for fd in (self._uffd, self.region_fd):
            if fd >= 0:
                os.close(fd)
        self._uffd = self.region_fd = -1


def _place_backlog(pc: PostcopyDest) -> np.ndarray:
    """Place the pushes held back while the guest waited (:mod:`precopy.session.postcopy_backlog`:
    here and checked) before a new connection's MISSING is made -- else it names them and the
    source sends them again (duplicates); returns the pages asked for and still not here."""
    assert pc.placer is not None
    with pc.lock:
        while len(pc.backlog):
            pc._place_held(pc.backlog.oldest())
    return pc.placer.outstanding()

"""The post-copy fault lane: the guest's faults and their answers on a connection of their own.

On the page stream's connection a REQUEST from the destination, and the
source's answer to it, queue behind the pushes (up to ~1 MiB unsent at the
source, the receive window at the destination), and both agents' event
loops serve them only between their pushes.  QEMU's postcopy-preempt
moves those pages to a channel of their own; so does this module, with a
thread on each side that answers without waiting for the event loop:

* the source opens the lane once the workload runs on the destination
  (after COMMITTED, and again after each RESUME), when both named
  ``postcopy-lane`` in HELLO: a new connection, authenticated like every
  other (its own HELLO/AUTH, the same key or TLS), and a JOIN with
  ``lane`` (:func:`open_lane`);
* the destination's thread (:class:`DestLane`) blocks on the guest's
  userfaultfd and the lane together (``poll``): it reads the faults, sends
  the REQUEST on the lane, and places the answer (``pwrite`` +
  ``UFFDIO_CONTINUE``, or ``UFFDIO_COPY``) under the same lock as the
  session's placement of pushes, so a page is placed once and never written
  after the guest could map it (the placer's ``need`` mask decides, as
  before: the later of two copies is a duplicate, counted, not written);
* the source's thread (:func:`serve_lane_requests`) reads REQUESTs and
  answers from the paused region what the push has not sent yet (a page is
  claimed under the page stream's lock: it goes on one connection, once).

A lane that fails (cut, reset, a protocol error) takes the page stream down
with it, on both sides: the same recovery as a broken link (RESUME on a new
connection, then a new lane; docs/FAILURES.md "Post-copy").  A peer that
does not name the capability gets today's single connection.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import os
import struct
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

import numpy as np

from precopy.errors import AbortCode, PrecopyError, RemoteProtocolError
from precopy.memory.uffd_missing import FAULT_MSG_SIZE, read_fault_batch
from precopy.net.channel import Channel, LinkError, connect
from precopy.net.tls import make_channel
from precopy.protocol import MAX_BATCH_PAGES, NEED_DATA, Abort, Begin, Join, Joined, Pages, Request, Role, page_payload
from precopy.session.commit import OutcomeTarget
from precopy.session.handshake import handshake
from precopy.session.lane_shared import trace
from precopy.session.postcopy_backlog import PushBacklog
from precopy.session.postcopy_lane_proc import LANE_FAST, ProcessLane, process_lane_ok, run_lane_process
from precopy.session.postcopy_pages import PagePlacer
from precopy.session.stream_thread import receive_blocking, run_blocking

__all__ = ["open_lane", "serve_lane_requests", "run_source_lane", "stop_lane", "DestLane", "LaneHost", "check_request",
           "join_lane"]

_log = logging.getLogger(__name__)
T = TypeVar("T")
#: Run a lane's thread SCHED_FIFO (priority 1) where the agent may (root, CAP_SYS_NICE): woken by a
#: fault or an answer it then runs at once instead of after the busy event loops' and the guest's
#: time slices (measured: remote p99 4.6 -> 1.8 ms; benchmarks/RESULTS.md, pcpre).  Off: a unit
#: test's lane thread at SCHED_FIFO was seen to stop making progress (not understood yet).
LANE_FIFO = False


def _prioritize() -> None:
    """Called on a lane's thread: run it before the busy threads when it wakes (LANE_FIFO)."""
    if not LANE_FIFO:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # (0: this thread)
    except OSError as exc:
        _log.info("post-copy: the fault lane's thread runs at normal priority (SCHED_FIFO: %s)", exc)


#: The lane's reader waits this long at most in ``poll`` (ms) before it looks whether to stop.
_POLL_MS = 200
#: A lane carries no data while no fault waits: its reads have no idle timeout (the page
#: stream's connection has one); a year, as ``SO_RCVTIMEO``.
_NO_IDLE_S = 365 * 86400.0


def check_request(ev: Any, npages: int) -> np.ndarray:
    """The pages a lane's frame asks for: it must be a REQUEST within the region."""
    if not isinstance(ev, Request):
        raise RemoteProtocolError(f"unexpected {type(ev).__name__} on the post-copy fault lane")
    if ev.indices.size and int(ev.indices.max()) >= npages:
        raise RemoteProtocolError(f"REQUEST for page {int(ev.indices.max())} of a region of {npages} pages")
    return ev.indices


def _send_timeout(chan: Channel, seconds: float) -> None:
    sec = max(seconds, 0.001)
    chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(sec), int(sec % 1 * 1e6)))


# -- the source ------------------------------------------------------------

async def open_lane(target: OutcomeTarget, begin: Begin, child: bool = False) -> tuple[Channel, bool]:
    """Connect, authenticate and JOIN the fault lane of ``begin``'s post-copy; returns its channel
    and whether it carries the lean frames (:mod:`precopy.protocol.lane_frames`): offered when
    ``child`` (this end can go to a child process) and the channel allows one, taken when JOINED
    says so too.

    Raises what connecting and the handshake raise (:class:`~precopy.errors.PrecopyError`,
    ``OSError``, ``TimeoutError``), the channel closed.
    """
    sock = await connect(target.host, target.port, target.connect_timeout_s)
    chan = make_channel(sock, Role.SOURCE, target.tls_context, target.host)
    chan.send_timeout_s = target.io_timeout_s
    offer = child and LANE_FAST and process_lane_ok(chan)
    try:
        await handshake(chan, target.auth_key, target.io_timeout_s)
        await chan.send(Join(migration_id=begin.migration_id, stream=0, size=begin.size,
                             chunk_pages=begin.chunk_pages, lane=True, fast=offer))
        async with asyncio.timeout(target.io_timeout_s):
            joined = await chan.recv(Joined)
        if joined.fast and not offer:
            raise RemoteProtocolError("JOINED says 'fast' to a JOIN that did not offer the lean frames")
    except BaseException:
        chan.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return chan, bool(joined.fast)


class Answering(Protocol):
    """What the source's lane needs of the :class:`~precopy.session.postcopy_stream.PageStream`."""

    def claim(self, indices: np.ndarray) -> np.ndarray: ...

    def frame(self, idx: np.ndarray) -> Pages: ...

    def answered(self, pages: np.ndarray, nbytes: int) -> None: ...


def serve_lane_requests(chan: Channel, stream: Answering, npages: int, io_timeout_s: float,
                        stop: threading.Event) -> None:
    """The source's lane thread: each REQUEST answered at once from the paused region (what the
    push has not sent yet).  Returns when stopped or the peer closes; raises when the lane fails."""
    _send_timeout(chan, io_timeout_s)
    _prioritize()
    for ev in receive_blocking(chan, _NO_IDLE_S, stop):
        trace("request", ev.indices if isinstance(ev, Request) else ())
        want = stream.claim(check_request(ev, npages))
        trace("claimed", want)
        for lo in range(0, len(want), MAX_BATCH_PAGES):
            idx = want[lo:lo + MAX_BATCH_PAGES]
            sent = chan.send_blocking(stream.frame(idx))
            trace("answered", idx)
            stream.answered(idx, sent)
    # The destination closed it: it ends the lane when every page is placed (COMPLETE comes on the
    # page stream's connection) or when it gave the stream up (that connection breaks too).


async def run_source_lane(target: OutcomeTarget, begin: Begin, stream: Answering) -> None:
    """Open the fault lane and serve it until cancelled -- in a child process where it can
    (:mod:`precopy.session.postcopy_lane_proc`), else on a thread; raises when it fails.  When it
    cannot be opened it logs why and returns: the page stream goes on alone."""
    share = getattr(stream, "share", None)
    try:
        chan, fast = await open_lane(target, begin, share is not None)
    except (PrecopyError, OSError, TimeoutError) as exc:
        _log.warning("post-copy: no fault lane (%s): faults are served on the page stream's connection", exc)
        return
    except asyncio.CancelledError:
        # (A small region's push can end before the lane's handshake does: not a fault.)
        _log.info("post-copy: the fault lane was stopped before it opened (the page stream ended first)")
        raise
    _log.info("post-copy: fault lane to %s%s", chan.peer, " (lean frames)" if fast else "")
    try:
        if share is not None and process_lane_ok(chan):
            fd, memory = share()
            setup = {"side": "source", "npages": begin.npages, "memory": memory, "io_timeout_s": target.io_timeout_s,
                     "fast": fast}
            try:
                await run_lane_process(chan, setup, {"shared_fd": fd}, None, getattr(stream, "lane_counted", None))
            finally:
                stream.fold()  # type: ignore[attr-defined]
            return
        if fast:  # (offered only where a child serves: a bug)
            raise PrecopyError("the fault lane's lean frames were agreed but no child process serves the lane")
        await run_blocking(chan, lambda stop: serve_lane_requests(chan, stream, begin.npages,
                                                                  target.io_timeout_s, stop), "postcopy-lane")
    finally:
        chan.close()


async def stop_lane(task: asyncio.Task[None] | None,
                    seen: tuple[type[Exception], ...] = (PrecopyError, OSError)) -> None:
    """Cancel a lane's task and wait for its thread; ``seen``: the failures handled already where
    the task was awaited first (by the page stream), only logged here."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    except seen as exc:
        _log.debug("post-copy: the fault lane ended: %s", exc)


# -- the destination -------------------------------------------------------

class LaneHost(Protocol):
    """What the destination's lane needs of :class:`~precopy.session.postcopy_dest.PostcopyDest`."""

    placer: PagePlacer | None
    backlog: PushBacklog
    lock: threading.Lock
    begin: Begin
    _uffd: int
    _seen_empty: float

    def _place_held(self, frame: Any) -> None: ...

    def _on_fault(self) -> None: ...


class DestLane:
    """The destination's end of the fault lane: the thread's work and its life in the session's loop.

    ``look_first`` / ``spin_s``: see :meth:`_wait` (the child process's lane sets them).

    While a lane runs, the thread alone reads the guest's userfaultfd (the
    loop's reader is removed, and put back when the lane ends); the session
    places pushes and the thread answers under ``host.lock``.  Where the lane
    can go to a child process (:mod:`precopy.session.postcopy_lane_proc`: plain
    TCP, a need file) the child runs :meth:`work` in place of the thread, with a
    placer of its own: the two claim pages on shared memory instead
    (:meth:`~precopy.session.postcopy_pages.PagePlacer.share_claims`), and the
    session reads the faults until the child serves.
    """

    look_first = False
    spin_s = 0.0

    def __init__(self, host: LaneHost) -> None:
        self.host = host
        self.task: asyncio.Task[None] | None = None
        self.chan: Channel | None = None
        self._buf = bytearray(FAULT_MSG_SIZE * 64)
        self.requests = 0  # REQUEST frames sent on lanes
        self._peeker = select.poll()  # the guest's userfaultfd, for peek
        self._peeking = -1
        self._looked = 0.0  # look_first: the userfaultfd's last empty look
        self._lookout: Any = None  # look_first: a poll of the userfaultfd alone
        #: The lane's end in a process of its own (postcopy_lane_proc): the shared state while it runs.
        self.process: ProcessLane | None = None
        self.cpu_s = 0.0  # CPU seconds the lane's processes used (COMPLETE's push_cpu_s)
        self.child = False  # a child process serves the lane now
        self._threaded = False  # a thread serves it now

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def reading(self) -> bool:
        """Whether the lane reads the guest's faults now (its thread runs, or its child serves):
        else the session does (a child starting takes a second on a busy machine)."""
        return self.active and (self.child or self._threaded)

    def peek(self) -> None:
        """While the thread reads the faults, the session notes between its frames when none waits
        (a fault's latency counts from the later of this and the thread's own look)."""
        host = self.host
        if self.child and self.process is not None:
            # The child reads this before it reads the faults: a fault it then reads came after.
            now = time.monotonic()
            if host._uffd >= 0 and not self._peeker.poll(0):
                self.process.clock[0] = now
            return
        with host.lock:
            now = time.monotonic()
            if host._uffd >= 0 and not self._peeker.poll(0):
                host._seen_empty = now

    def locked(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` under the lock the thread places pages under."""
        with self.host.lock:
            return fn(*args)

    def work(self, chan: Channel, stop: threading.Event, io_timeout_s: float) -> None:
        """The thread: faults out as REQUESTs, answers in and placed, until none is missing."""
        host = self.host
        placer = host.placer
        assert placer is not None
        uffd, sock = host._uffd, chan.sock.fileno()
        _send_timeout(chan, io_timeout_s)
        _prioritize()
        poller = select.poll()
        poller.register(uffd, select.POLLIN)
        poller.register(sock, select.POLLIN)
        if self.look_first:
            self._lookout = select.poll()
            self._lookout.register(uffd, select.POLLIN)
        conn = chan.conn
        empty_at = time.monotonic()  # the thread saw the userfaultfd empty then
        while placer.left and not stop.is_set():
            t_poll = time.monotonic()
            ready = () if chan.pending() else self._wait(poller, t_poll)
            t_wake = time.monotonic()
            fds = {fd for fd, _ in ready}
            if uffd in fds and dict(ready)[uffd] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                # The guest's userfaultfd failed (its process is gone): stop looking at it -- a
                # SCHED_FIFO thread must not spin on it; the answers still in flight are placed.
                _log.warning("post-copy: the guest's userfaultfd reports an error: no more faults read")
                poller.unregister(uffd)
            elif uffd in fds:
                empty_at = self._ask(chan, max(empty_at, self._looked))
            else:
                empty_at = max(t_poll, self._looked)  # not readable while poll waited: any fault came after
            if sock not in fds and not chan.pending():
                self.settle(not ready)
                continue
            if chan.recv_blocking() == 0:
                if stop.is_set():
                    return
                conn.next_event()  # raises if a frame was cut short
                raise LinkError(f"{chan.peer} closed the post-copy fault lane")
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Abort):
                    raise LinkError(f"{chan.peer} aborted the post-copy fault lane: {ev.reason}")
                self._place(ev, t_wake)

    def _wait(self, poller: Any, t_poll: float) -> list[tuple[int, int]]:
        """``poll`` the guest's userfaultfd and the lane.  With ``look_first`` (the lane's own
        process: a look costs no interpreter lock) it looks without waiting first, for up to
        ``spin_s``: each empty look is a later "seen empty" (``_looked``: the fault's latency
        counts from the last one) and a fault that comes meanwhile is read at once."""
        if self.look_first:
            end = t_poll + self.spin_s
            while True:
                t = time.monotonic()
                ready: list[tuple[int, int]] = poller.poll(0)
                if ready:
                    return ready
                self._looked = t  # (the look's scan came after t: a fault it missed came after t)
                if t >= end:
                    break
        waited: list[tuple[int, int]] = poller.poll(_POLL_MS)
        return waited

    def settle(self, idle: bool) -> None:
        """After a step of :meth:`work` that placed nothing (``idle``: nothing came for a while):
        the lane's child counts the shared mask here, now and then (a placement counts it too)."""

    def _ask(self, chan: Channel, empty_at: float) -> float:
        """Read every fault waiting; REQUEST the missing pages on the lane.  Returns when the
        userfaultfd was seen empty."""
        host, placer = self.host, self.host.placer
        assert placer is not None
        ask: list[int] = []
        with host.lock:
            since = max(empty_at, host._seen_empty)  # the session looks between its frames too
            while True:
                now = time.monotonic()
                addrs, drained = read_fault_batch(host._uffd, self._buf)
                got = placer.faulted(addrs, now, since)
                trace("since", got, since)
                trace("read", got, now)
                ask += got
                since = now
                if drained:  # (seen empty by that read: a fault it did not take came after ``now``)
                    empty_at = now
                    break
            if ask:
                for frame in host.backlog.holding(ask):  # here already, held back: placed now
                    host._place_held(frame)
                want = np.array(sorted(ask), dtype=np.uint32)
                want = want[placer.need[want]]
            else:
                want = np.zeros(0, dtype=np.uint32)
        for lo in range(0, len(want), MAX_BATCH_PAGES):
            chan.send_blocking(Request(indices=want[lo:lo + MAX_BATCH_PAGES]))
            self.requests += 1
        trace("asked", want)
        return empty_at

    def _place(self, ev: Any, t_wake: float = 0.0) -> None:
        host, placer = self.host, self.host.placer
        assert placer is not None
        trace("woke", getattr(ev, "indices", ()), t_wake)
        trace("parsed", getattr(ev, "indices", ()))
        if not isinstance(ev, Pages):
            raise RemoteProtocolError(f"unexpected {type(ev).__name__} on the post-copy fault lane")
        if ev.checksum is None and ev.chunk_digests is None:
            raise RemoteProtocolError("post-copy PAGES without a checksum: nothing would check them")
        data = page_payload(ev, chunk_pages=host.begin.chunk_pages) if len(ev.indices) else None
        if self.look_first:
            # A look just before the placement wakes the guest: the fault it takes next is timed
            # from here, not from before this answer's round trip (the guest's threads that wait
            # fault no more meanwhile; one that faulted since is seen here, and timed as before).
            t = time.monotonic()
            if self._lookout is not None and not self._lookout.poll(0):
                self._looked = max(self._looked, t)
        with host.lock:
            placer.place(ev.indices, data, ev.zeros)
        trace("placed", ev.indices)

    async def run(self, chan: Channel, io_timeout_s: float, fast: bool = False) -> None:
        """Serve ``chan`` as the lane until stopped (:meth:`stop`) or it fails (raises): in a child
        process where it can (:mod:`precopy.session.postcopy_lane_proc`), else on a thread.
        ``fast``: JOINED agreed on the lean frames (only where :meth:`child_possible`)."""
        self.chan = chan
        chan.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        if self._peeking != self.host._uffd:
            self._peeker.register(self.host._uffd, select.POLLIN)
            self._peeking = self.host._uffd
        try:
            if self.child_possible(chan):
                await self._run_child(chan, io_timeout_s, loop, fast)
            else:
                if fast:  # (agreed only where a child serves: a bug)
                    raise PrecopyError("the fault lane's lean frames were agreed but no child process serves it")
                loop.remove_reader(self.host._uffd)  # the thread reads the faults from now on
                self._threaded = True
                await run_blocking(chan, lambda stop: self.work(chan, stop, io_timeout_s), "postcopy-lane")
        finally:
            self.chan = None
            self._threaded = False
            placer = self.host.placer
            if self.host._uffd >= 0 and placer is not None and placer.left and not loop.is_closed():
                loop.add_reader(self.host._uffd, self.host._on_fault)

    def child_possible(self, chan: Channel) -> bool:
        """Whether a child process can serve ``chan`` as the lane (plain TCP, a need file)."""
        placer = self.host.placer
        if placer is None or not process_lane_ok(chan):
            return False
        if self.process is None:
            need = ProcessLane.need_file(placer)
            if need is None:
                return False
            self.process = ProcessLane(placer, need)
            placer.share_claims(self.process.lock, self.process.shared["taken"])  # beside the child's
        return True

    async def _run_child(self, chan: Channel, io_timeout_s: float, loop: asyncio.AbstractEventLoop,
                         fast: bool) -> None:
        """The lane's end in a child process; the session's loop reads the faults until it serves."""
        host, proc = self.host, self.process
        placer = host.placer
        assert proc is not None and placer is not None
        proc.clock[0] = host._seen_empty

        def ready() -> None:
            loop.remove_reader(host._uffd)  # the child reads the faults from now on
            self.child = True

        def counted(got: dict[str, Any]) -> None:
            self.cpu_s += float(got.get("cpu_s", 0.0))
            self.requests += int(got.get("requests", 0))
            with host.lock:
                placer.merge(got)

        try:
            await run_lane_process(chan, {**proc.setup(placer, host.begin, io_timeout_s), "fast": fast},
                                   {"uffd": host._uffd, "region_fd": placer.region_fd, "shared_fd": proc.shared.fd},
                                   ready, counted)
        finally:
            self.child = False
            with host.lock:
                placer.drop_claims()  # (it is gone: nothing of it is placing)
                placer.recount()

    def release(self) -> None:
        """The post-copy is over here: the state shared with the lane's child goes."""
        if self.process is not None:
            self.process.close()
            self.process = None

    def start(self, chan: Channel, io_timeout_s: float, fast: bool = False) -> asyncio.Task[None]:
        self.task = asyncio.ensure_future(self.run(chan, io_timeout_s, fast))
        return self.task

    async def stop(self) -> None:
        """End the lane (if any) and wait for its thread: nothing reads the guest's faults or places
        a page from it after this returns."""
        task, self.task = self.task, None
        await stop_lane(task, (Exception,))  # its failure was handled where it was awaited first


#: How many loop turns a JOIN waits for the session to take up the connection whose RESUME was just
#: answered (READY sent, the session's task not yet run): the source JOINs right after READY.
_TAKE_UP_TURNS = 100


async def join_lane(live: Any, chan: Channel, ev: Join) -> None:
    """A source opens the fault lane of ``live`` (the
    :class:`~precopy.session.postcopy_dest.PostcopyDest` of ``ev``'s migration, None: none here):
    JOINED, then the lane's thread until the post-copy ends or the lane fails.

    A failed lane cancels the page stream it served beside (the session then waits for RESUME,
    as after a cut link); a lane that placed the last page ends the stream (COMPLETE).
    """
    for _ in range(_TAKE_UP_TURNS):  # a RESUME answered READY: its session serves it on its next turn
        if live is None or live._chan is not None or live._next_chan is None or not live._next_chan.done():
            break
        await asyncio.sleep(0)
    if live is None or live.begin.size != ev.size or live.placer is None or live._chan is None:
        raise PrecopyError(f"no post-copy page stream of migration {ev.migration_id} is served here for a "
                           "fault lane", AbortCode.REGION)
    lane: DestLane = live.lane
    await lane.stop()  # a lane of a connection given up: this one replaces it
    timeout = live.recv.opts.idle_timeout_s
    chan.send_timeout_s = timeout
    fast = ev.fast and LANE_FAST and lane.child_possible(chan)  # (the lean frames: both ends children)
    await chan.send(Joined(fast=fast))
    _log.info("migration %s: post-copy fault lane from %s%s", ev.migration_id, chan.peer,
              " (lean frames)" if fast else "")
    main = live._chan

    def end_stream(why: str | None) -> None:
        if live._chan is main and live._streaming is not None and not live._streaming.done():
            live._preempted, live._why = True, why
            live._streaming.cancel()

    task = lane.start(chan, timeout, fast)
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        return  # stopped by the session (the post-copy ended, or its link did)
    except (PrecopyError, OSError) as exc:
        _log.warning("migration %s: post-copy fault lane lost (%s): the page stream is taken up again",
                     ev.migration_id, exc)
        end_stream(f"the fault lane failed: {exc}")  # the same recovery as a cut link
        raise
    if not live.placer.left:
        end_stream(None)  # the lane placed the last page: COMPLETE

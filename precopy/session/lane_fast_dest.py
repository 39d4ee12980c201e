"""The destination's end of a lean fault lane, in its child process: faults out, pages placed, little Python.

Where JOIN and JOINED agreed on ``fast`` (:mod:`precopy.protocol.lane_frames`),
the destination's lane child (:mod:`precopy.session.postcopy_lane_child`)
runs :class:`FastDestLane` in place of
:meth:`~precopy.session.postcopy_lane.DestLane.work`, over the same
:class:`~precopy.session.postcopy_pages.PagePlacer` state (the need file the
session maps too, the shared placement times and claims, the fault times and
latencies it reports), with the same rules:

* a fault's latency counts from the later of the last empty look at the
  guest's userfaultfd (this loop's, or the session's: ``clock[0]``) and the
  previous read; a look just before each placement times the next fault
  from there (``look_first`` in :class:`~precopy.session.postcopy_lane.DestLane`);
* a page is claimed under the lock the session's placements take (the
  shared ``taken`` mask) before it is written, then written into the file
  (``pwrite``), marked placed in the need file and only then mapped for the
  guest (``UFFDIO_CONTINUE``): placed once, never written after the guest
  could map it; a page placed meanwhile is a duplicate, counted, not
  written;
* an answer places pages only; a fault outside the region is logged and
  ignored, a page beyond it or a bad digest fails the lane (the recovery is
  a cut link's).

What differs is the cost: the fault messages are read into a buffer
allocated once, the REQUEST packed into another, the answer parsed as views
of the receive buffer (no copy before the ``pwrite``), the ioctl's argument
allocated once, and the shared mask counted (the pages left, the faults the
session's push answered) at most every :data:`RECOUNT_S` while placing.
MISSING mode (``UFFDIO_COPY``) is left to the placer's own code.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Any

import numpy as np

from precopy.errors import AbortCode
from precopy.memory.uffd_missing import Continuer, FaultReader
from precopy.net.channel import LinkError
from precopy.protocol.lane_frames import LANE_PAGES, REQUEST_BUF_SIZE, LaneReader, abort_reason, decode_pages, pack_request
from precopy.protocol.limits import MAX_REQUEST_PAGES, PAGE_SIZE
from precopy.protocol.messages import Kind
from precopy.session.lane_fast_source import send_all, set_timeouts
from precopy.session.lane_shared import trace
from precopy.session.postcopy_pages import PagePlacer

__all__ = ["FastDestLane", "RECOUNT_S"]

_log = logging.getLogger(__name__)
#: The shared mask is counted at most this often while answers are placed (a count of a 1 GiB
#: region's mask is ~10 us idle, several times that under load: once per answer it was a fifth of
#: the lane's work), and when the lane is idle.
RECOUNT_S = 0.002
_POLL_MS = 200
_ERR = select.POLLERR | select.POLLHUP | select.POLLNVAL
_ZERO = memoryview(bytes(PAGE_SIZE))


class FastDestLane:
    """The destination child's lean lane loop (see the module docstring): :meth:`run`."""

    def __init__(self, placer: PagePlacer, sock: socket.socket, initial: bytes, clock: np.ndarray,
                 spin_s: float = 0.0) -> None:
        assert placer.claim_lock is not None, "the child places beside the session: claims are shared"
        self.placer = placer
        self.sock = sock
        self.clock = clock  # clock[0]: the session's last look at an empty userfaultfd
        self.spin_s = spin_s
        self.reader = LaneReader(LANE_PAGES, initial)
        self.faults = FaultReader(placer.uffd, placer.start, placer.npages)
        self.cont = Continuer(placer.uffd)
        # The masks and times as memoryviews of the placer's arrays (the same memory, shared with the
        # session): an index costs no numpy scalar.
        self.need: Any = placer.need.data
        self.requested: Any = placer.requested.data
        self.taken: Any = placer.taken.data
        self.placed_t: Any = placer._placed_t.data
        self.out = bytearray(REQUEST_BUF_SIZE)
        self.records: list[tuple[int, memoryview | None]] = []
        self.requests = 0  # LANE_REQUEST frames sent
        self._looked = 0.0  # the userfaultfd's last empty look (the loop's own)
        self._counted = 0.0  # the shared mask's last count
        self._due = False  # placed since the last count
        self._poller = select.poll()
        self._lookout = select.poll()  # the userfaultfd alone

    def run(self, stop: threading.Event, io_timeout_s: float) -> None:
        """Faults out as LANE_REQUESTs, answers placed, until nothing is missing or ``stop``.  Raises
        :class:`LinkError` when the lane fails, :class:`RemoteProtocolError` for a bad frame,
        ``OSError`` when the kernel refuses a placement."""
        placer, sock, uffd = self.placer, self.sock, self.placer.uffd
        set_timeouts(sock, io_timeout_s, io_timeout_s)  # (a read waits only for the rest of a frame begun)
        fd = sock.fileno()
        self._poller.register(uffd, select.POLLIN)
        self._poller.register(fd, select.POLLIN)
        self._lookout.register(uffd, select.POLLIN)
        empty_at = time.monotonic()
        self._answers(0.0)  # (bytes that came with JOINED)
        while placer.left and not stop.is_set():
            t_poll = time.monotonic()
            ready = self._wait(t_poll)
            t_wake = time.monotonic()
            events = dict(ready)
            got = events.get(uffd, 0)
            if got & _ERR:
                # The guest's userfaultfd failed (its process is gone): stop looking at it -- a
                # SCHED_FIFO child must not spin on it; the answers still in flight are placed.
                _log.warning("post-copy: the guest's userfaultfd reports an error: no more faults read")
                self._poller.unregister(uffd)
                self._lookout.unregister(uffd)
            elif got:
                empty_at = self._ask(max(empty_at, self._looked), t_wake)
            else:
                empty_at = max(t_poll, self._looked)  # not readable while poll waited: any fault came after
            if fd not in events:
                self._settle(not ready)
                continue
            if not self._receive(stop):
                return
            self._answers(t_wake)
            self._settle(False)

    def _wait(self, t_poll: float) -> list[tuple[int, int]]:
        """Look without waiting first (for up to ``spin_s``): each empty look is a later "seen
        empty"; then ``poll`` -- shortly when the mask is due a count."""
        end = t_poll + self.spin_s
        while True:
            t = time.monotonic()
            ready: list[tuple[int, int]] = self._poller.poll(0)
            if ready:
                return ready
            self._looked = t  # (the look came after t: a fault it missed came after t)
            if t >= end:
                break
        waited: list[tuple[int, int]] = self._poller.poll(int(RECOUNT_S * 1000) + 1 if self._due else _POLL_MS)
        return waited

    def _settle(self, idle: bool) -> None:
        """Count the shared mask (the pages left; faults the session's push answered) when idle, or
        when placed since and the last count is :data:`RECOUNT_S` old."""
        now = time.monotonic()
        if idle or (self._due and now - self._counted >= RECOUNT_S):
            self.placer.recount()
            self._counted, self._due = now, False

    def _ask(self, empty_at: float, t_wake: float) -> float:
        """Read every fault waiting; LANE_REQUEST the missing pages.  Returns when the userfaultfd
        was seen empty.  (``t_wake``: when ``poll`` returned, for the trace: a fault came between
        ``since`` and then.)"""
        since = max(empty_at, float(self.clock[0]))  # the session looks between its frames too
        ask: list[int] = []
        reader = self.faults
        while True:
            now = time.monotonic()
            n = reader.read()
            got = self._faulted(n, now, since, ask)
            trace("since", got, since)
            trace("polled", got, t_wake)
            trace("read", got, now)
            since = now
            if n < len(reader.buf):  # (seen empty by that read: a fault it did not take came after ``now``)
                empty_at = now
                break
        need = self.need
        want = sorted(p for p in ask if need[p]) if len(ask) > 1 else [p for p in ask if need[p]]
        for lo in range(0, len(want), MAX_REQUEST_PAGES):
            n = pack_request(want[lo:lo + MAX_REQUEST_PAGES], self.out)
            send_all(self.sock, [memoryview(self.out)[:n]], n)
            self.requests += 1
        trace("asked", want)
        return empty_at

    def _faulted(self, n: int, now: float, since: float, ask: list[int]) -> list[int]:
        """:meth:`PagePlacer.faulted` for the messages read: the pages to ask for go to ``ask`` (and
        are returned); the latency of a fault on a page placed since ``since`` is counted; a fault on
        a page not missing is served by the placer."""
        placer = self.placer
        pages: list[int] = []
        outside: list[int] = []
        self.faults.pages(n, pages, outside)
        for addr in outside:
            _log.warning("post-copy: a fault at %#x, outside the region: ignored", addr)
        got = []
        need, requested, placed_t = self.need, self.requested, self.placed_t
        for page in pages:
            if need[page]:
                if not requested[page]:
                    requested[page] = True
                    placer.faults += 1
                    placer._fault_t[page] = since
                    ask.append(page)
                    got.append(page)
            elif placed_t[page] > since:  # placed (the guest woken) after the fault came: in flight
                placer.faults += 1
                late = placed_t[page] - since
                placer.latencies.append(late)
                placer.inflight_latencies.append(late)
            else:
                placer.zero_faults += placer._local(page)
        return got

    def _receive(self, stop: threading.Event) -> bool:
        """Read what the lane holds, and the rest of a frame begun (it is on its way); False when
        stopped.  Raises :class:`LinkError` when the source closed the lane or it failed."""
        reader, sock = self.reader, self.sock
        want = 0
        while True:
            try:
                space = reader.space()
                n = sock.recv_into(space, want, socket.MSG_WAITALL) if want else sock.recv_into(space)
            except BlockingIOError:
                raise LinkError("the source's answer stalled on the fault lane", AbortCode.TIMEOUT) from None
            except OSError as exc:
                if stop.is_set():
                    return False
                raise LinkError(f"the fault lane failed while receiving: {exc}") from exc
            if n == 0:
                if stop.is_set():
                    return False
                cut = " in the middle of a frame" if reader.missing() else ""
                raise LinkError(f"the source closed the post-copy fault lane{cut}")
            reader.took(n)
            want = reader.missing()
            if not want:
                return True

    def _answers(self, t_wake: float) -> None:
        """Place every whole answer the receive buffer holds."""
        while (frame := self.reader.next()) is not None:
            kind, body = frame
            if kind == Kind.ABORT:
                raise LinkError(f"the source aborted the post-copy fault lane: {abort_reason(body)}")
            decode_pages(body, self.placer.npages, self.records)  # (each digest checked)
            trace("woke", [p for p, _ in self.records[:1]], t_wake)
            trace("parsed", [p for p, _ in self.records[:1]])
            self._place(self.records)
            trace("placed", [p for p, _ in self.records[:1]])

    def _place(self, records: list[tuple[int, memoryview | None]]) -> None:
        """Claim, write, mark and map each page of an answer (see the module docstring)."""
        placer = self.placer
        if not placer.minor:
            self._place_general(records)
            return
        t = time.monotonic()
        if not self._lookout.poll(0):  # the guest's next fault is timed from here (see DestLane._place)
            self._looked = max(self._looked, t)
        need, taken, requested = self.need, self.taken, self.requested
        mine: list[tuple[int, memoryview | None]] = []
        with placer.claim_lock:
            reply = all(requested[p] and need[p] for p, _ in records)  # (PagePlacer._answers)
            for rec in records:
                p = rec[0]
                if need[p] and not taken[p]:
                    taken[p] = True
                    mine.append(rec)
        placer.duplicates += len(records) - len(mine)
        fd, start = placer.region_fd, placer.start
        for p, data in mine:
            off, view = p * PAGE_SIZE, _ZERO if data is None else data
            while view:  # (a short write: the rest; a full file system raises ENOSPC)
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
            need[p] = False  # in the file before the guest can see it (PagePlacer._write_map)
            if not placer.guest_gone:
                self._map(start + p * PAGE_SIZE)
        self._mark(mine, reply)

    def _map(self, addr: int) -> None:
        err = self.cont.page(addr)
        if err:
            if err in (errno.EEXIST, errno.EFAULT):
                self.placer.present += 1
            else:
                self.placer._guest_exited(OSError(err, f"UFFDIO_CONTINUE at {addr:#x}: {os.strerror(err)}"))

    def _mark(self, mine: list[tuple[int, memoryview | None]], reply: bool) -> None:
        """The bookkeeping of pages placed (PagePlacer._mark): times, the count left, latencies."""
        placer = self.placer
        now = time.monotonic()
        requested, placed_t = self.requested, self.placed_t
        for p, _ in mine:
            placed_t[p] = now
            if requested[p]:
                t = placer._fault_t.pop(p, None)
                if t is not None:
                    placer.latencies.append(now - t)
                    (placer.remote_latencies if reply else placer.inflight_latencies).append(now - t)
            else:
                placer.pushed += 1
        placer.left -= len(mine)
        if mine:
            self._due = True

    def _place_general(self, records: list[tuple[int, memoryview | None]]) -> None:
        """MISSING mode: the placer's own placement (``UFFDIO_COPY`` into the holes), the pages
        gathered first (they are not consecutive in the receive buffer)."""
        data = [(p, v) for p, v in records if v is not None]
        zeros = np.array([p for p, v in records if v is None], dtype=np.uint32)
        payload = memoryview(b"".join(v for _, v in data)) if data else None
        self.placer.place(np.array([p for p, _ in data], dtype=np.uint32), payload, zeros)

"""The source's end of a lean fault lane, in its child process: REQUESTs in, pages out, little Python between.

Where JOIN and JOINED agreed on ``fast`` (:mod:`precopy.protocol.lane_frames`),
the source's lane child (:mod:`precopy.session.postcopy_lane_child`) runs
:func:`serve_source_fast` in place of
:func:`~precopy.session.postcopy_lane.serve_lane_requests`: the same
contract -- each page asked for and not pushed yet is claimed on the mask
the agent's page stream shares, under the lock it takes too
(:class:`~precopy.session.lane_shared.CrossLock`), and answered at once from
the paused region; the answers are counted in the shared counters the stream
folds in -- but with no Connection, msgpack, numpy or event object per
fault: the socket is read into a preallocated buffer, the answer's records
packed into another, and ``sendmsg`` takes the pages straight from this
process's read-only mapping of the region.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

from precopy.errors import AbortCode
from precopy.net.channel import LinkError
from precopy.protocol.lane_frames import (LANE_BATCH_PAGES, LANE_REQUEST, PAGES_HEAD_SIZE, LaneReader, abort_reason,
                                          decode_request, pack_pages)
from precopy.protocol.limits import PAGE_SIZE
from precopy.protocol.messages import Kind
from precopy.session.lane_shared import trace

__all__ = ["serve_source_fast", "send_all", "set_timeouts"]

#: An idle lane waits for its next REQUEST without a limit (a year, as ``SO_RCVTIMEO``).
_NO_IDLE_S = 365 * 86400.0


def set_timeouts(sock: socket.socket, recv_s: float, send_s: float) -> None:
    """``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` of a blocking socket: a read or a write that waits longer
    fails with ``EAGAIN`` (:class:`BlockingIOError`)."""
    for opt, sec in ((socket.SO_RCVTIMEO, recv_s), (socket.SO_SNDTIMEO, send_s)):
        sec = max(sec, 0.001)
        sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", int(sec), int(sec % 1 * 1e6)))


def send_all(sock: socket.socket, bufs: list[Any], total: int) -> None:
    """Write ``bufs`` (``total`` bytes) with ``sendmsg``, again from where a short write stopped.
    Raises :class:`LinkError` (TIMEOUT when the peer takes nothing for the send timeout)."""
    try:
        sent = sock.sendmsg(bufs)
        while sent < total:
            rest, skip = [], sent
            for b in bufs:
                n = len(b)
                if skip >= n:
                    skip -= n
                    continue
                rest.append(memoryview(b)[skip:])
                skip = 0
            bufs, total = rest, total - sent
            sent = sock.sendmsg(bufs)
    except BlockingIOError:
        raise LinkError("the peer did not take a fault lane frame in time (link stalled)", AbortCode.TIMEOUT) from None
    except OSError as exc:
        raise LinkError(f"the fault lane failed while sending: {exc}") from exc


def _receive(sock: socket.socket, reader: LaneReader, stop: threading.Event) -> bool:
    """Read what came into ``reader``; False when the lane ended (stopped, or the peer closed it
    between frames).  Raises :class:`LinkError` when it failed (cut mid-frame, a socket error)."""
    try:
        n = sock.recv_into(reader.space())
    except OSError as exc:
        if stop.is_set():
            return False
        raise LinkError(f"the fault lane failed while receiving: {exc}") from exc
    if n == 0:
        if not stop.is_set() and reader.missing():
            raise LinkError("the destination closed the fault lane in the middle of a frame")
        return False  # the destination closed it: every page is placed, or it gave the stream up
    reader.took(n)
    return not stop.is_set()


def serve_source_fast(sock: socket.socket, initial: bytes, npages: int, region: memoryview, need: Any,
                      counters: Any, lock: Any, io_timeout_s: float, stop: threading.Event) -> None:
    """Answer each LANE_REQUEST from ``region`` (the paused region's bytes) until stopped or the peer
    closes.  ``need``: the shared "still wanted" mask (bool numpy array), ``counters``: the shared
    counters (the last page answered, pages and bytes answered), both under ``lock``.  Raises
    :class:`~precopy.errors.RemoteProtocolError` for a bad frame, :class:`LinkError` when the lane
    fails."""
    set_timeouts(sock, _NO_IDLE_S, io_timeout_s)
    reader = LaneReader(LANE_REQUEST, initial)
    wanted = need.data  # (a bool per page, as a memoryview: indexing it costs no numpy scalar)
    head = bytearray(PAGES_HEAD_SIZE)
    bufs: list[memoryview] = []
    try:
        while True:
            frame = reader.next()
            if frame is None:
                if stop.is_set() or not _receive(sock, reader, stop):
                    return
                continue
            kind, body = frame
            if kind == Kind.ABORT:
                raise LinkError(f"the destination aborted the fault lane: {abort_reason(body)}")
            pages = decode_request(body, npages)
            trace("request", pages)
            with lock:
                want = [p for p in pages if wanted[p]]
                for p in want:
                    wanted[p] = False
            trace("claimed", want)
            for lo in range(0, len(want), LANE_BATCH_PAGES):
                idx = want[lo:lo + LANE_BATCH_PAGES]
                nbytes = pack_pages(idx, [region[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] for p in idx], head, bufs)
                send_all(sock, bufs, nbytes)
                trace("answered", idx)
                with lock:
                    counters[0] = idx[-1]  # the push goes on after the last page answered
                    counters[1] += len(idx)
                    counters[2] += nbytes
    finally:
        bufs.clear()  # (views of the region's mapping: it is closed after this)
        wanted.release()

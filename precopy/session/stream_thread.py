"""One connection's reads on a thread of its own.

With ``--streams N`` the destination receives each extra stream on its
own thread (:mod:`precopy.session.dest_streams`): the socket reads
(``recv_into`` straight into the region, or into the connection's buffer
and then ``pwrite``), TLS decryption and the chunk hashing as the bytes
land all release the GIL, so N streams use N cores for the bulk of their
work instead of taking turns in the session's one loop.  What is left to
Python per batch (a frame's header, the region writer's bookkeeping)
takes the GIL briefly.

:func:`run_blocking` puts a :class:`~precopy.net.channel.Channel`'s socket
in blocking mode and runs a function on a new thread;
:func:`receive_blocking` is :meth:`Channel.events` for it: a read blocks
in the kernel (no event loop, no wakeup per arrival: a payload going
into the region is read whole, ``MSG_WAITALL``), ``SO_RCVTIMEO`` is the
idle timeout.  Cancelling the caller stops the thread (a ``SHUT_RD`` wakes
its read) and waits for it: nothing reads the connection or writes into
the region after :func:`run_blocking` returns or raises, and the socket is
non-blocking again, so the caller can still ABORT and close it.

:class:`Notifier` wakes the session's loop from such a thread (the SYNC
fence); :class:`WriteGate` holds the threads' writes while the loop makes
a digest table.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from typing import Any, Callable, Iterator, TypeVar

from precopy.errors import AbortCode
from precopy.net.channel import Channel, LinkError, PeerAborted
from precopy.protocol import NEED_DATA, Abort

__all__ = ["run_blocking", "receive_blocking", "Notifier", "WriteGate"]

_log = logging.getLogger(__name__)

T = TypeVar("T")


async def run_blocking(chan: Channel, work: Callable[[threading.Event], T], name: str) -> T:
    """Run ``work(stop)`` on a new thread, ``chan``'s socket in blocking mode meanwhile; returns or
    raises what it did.

    Cancelled, it sets ``stop`` and shuts the socket's reading side
    (``SHUT_RD``: a blocked read returns at once, the peer is told
    nothing), then waits for the thread.  The socket is non-blocking again
    (the session's loop may send an ABORT on it) when this returns.
    """
    main = asyncio.get_running_loop()
    done: asyncio.Future[T] = main.create_future()
    stop = threading.Event()
    chan._unwatch()  # not read by the loop any more
    chan.sock.settimeout(None)

    def settle(result: Any, exc: BaseException | None) -> None:
        if not done.done():
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = work(stop)
        except BaseException as exc:  # handed to the caller: it raises there
            error = exc
        try:
            main.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the caller's loop is closed: nobody waits
            _log.debug("%s ended after its caller's loop", name)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        stop.set()
        try:
            chan.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # not connected any more: the read has returned already
        # Wait for the thread however often we are cancelled meanwhile: the
        # region it writes into must outlive it.
        while not done.done():
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                continue
            except BaseException as exc:  # what the work raised as it stopped: ours is the cancellation
                _log.debug("%s ended with %r as it was stopped", name, exc)
                break
        raise
    finally:
        thread.join()  # it has settled ``done``: it is returning
        if chan.sock.fileno() >= 0:  # (closed: nothing more to hand back)
            chan.sock.setblocking(False)


def receive_blocking(chan: Channel, idle_timeout_s: float, stop: threading.Event) -> Iterator[Any]:
    """:meth:`Channel.events` for a thread of its own (see :func:`run_blocking`): blocking reads.

    Ends when the peer closes or ``stop`` is set; ABORT raises
    :class:`PeerAborted`; nothing for ``idle_timeout_s`` raises
    :class:`LinkError` (TIMEOUT).
    """
    sec = max(idle_timeout_s, 0.001)
    chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                         struct.pack("ll", int(sec), int(sec % 1 * 1e6)))
    conn = chan.conn
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            if stop.is_set():
                return
            try:
                n = chan.recv_blocking()
            except BlockingIOError:
                if stop.is_set():
                    return
                raise LinkError(f"no data from {chan.peer} for {idle_timeout_s:.0f} s", AbortCode.TIMEOUT) from None
            except LinkError:
                if stop.is_set():
                    return
                raise
            if stop.is_set():
                return  # woken by run_blocking's shutdown
            if n == 0:
                conn.next_event()  # raises if a frame was cut short
                return
            continue
        if isinstance(ev, Abort):
            raise PeerAborted(ev.code, ev.reason)
        yield ev


class Notifier:
    """Wakes the session's loop from any thread, and only while it waits.

    The waiter counts itself in (:attr:`waiting`) *before* it checks what
    it waits for; a worker changes that state *before* :meth:`notify`, so
    one of the two sees the other (the GIL orders them): no wakeup is lost,
    and a batch nobody waits for costs an attribute read, not a
    ``call_soon_threadsafe``.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # the waiter's: known once it waits
        self.event = asyncio.Event()
        self.waiting = 0

    def notify(self) -> None:
        if not self.waiting or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the loop is closed: nobody waits
            pass

    async def wait(self, ready: Callable[[], bool], idle_timeout_s: float) -> bool:
        """Wait until ``ready()``; False when no :meth:`notify` came for ``idle_timeout_s``."""
        self.loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            while not ready():
                self.event.clear()
                try:
                    async with asyncio.timeout(idle_timeout_s):
                        await self.event.wait()
                except TimeoutError:
                    return ready()
            return True
        finally:
            self.waiting -= 1


class WriteGate:
    """Holds the streams' writes (from any thread) while the session's loop makes a digest table.

    A worker calls :meth:`enter` before it writes a batch (blocking while
    held: it runs on a thread of its own) and :meth:`leave` after; the loop
    :meth:`hold`-s, waits until no write is under way
    (:attr:`writing`), makes its table, and :meth:`release`-s.
    :meth:`close` lets every held worker go (:meth:`enter` then says False).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = 0
        self.writing = 0
        self.closed = False

    def enter(self) -> bool:
        """Wait while held; False once closed (write nothing more)."""
        with self._cond:
            while self._held and not self.closed:
                self._cond.wait()
            if self.closed:
                return False
            self.writing += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self.writing -= 1

    def hold(self) -> None:
        with self._cond:
            self._held += 1

    def release(self) -> None:
        with self._cond:
            self._held -= 1
            if not self._held:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

"""A thin asyncio shell around :class:`precopy.protocol.connection.Connection`.

It owns a non-blocking TCP socket and does the only I/O of a session:
``recv_into`` straight into the connection's buffer, ``sendmsg`` (then
``sock_sendall`` for what did not fit) of the buffers :meth:`Connection.send`
returns.  Because a send returns only once the kernel holds every byte,
callers may reuse a staging buffer as soon as :meth:`Channel.send` returns.

``Channel.events`` is the read loop as an async iterator; the payload views
of a yielded event stay valid until the iterator is advanced.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import sys
import termios
import time
from typing import Any, AsyncIterator

from precopy.errors import AbortCode, PrecopyError, RemoteProtocolError
from precopy.protocol import NEED_DATA, Abort, Connection, Event, Role
from precopy.protocol.phases import TERMINAL

__all__ = ["Channel", "LinkError", "connect"]

_log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 * 1024 * 1024
#: Buffers one sendmsg may take (Linux's IOV_MAX).
_IOV_MAX = 1024
#: Bytes read without a wait before the event loop gets a turn (see Channel.events).
_YIELD_BYTES = 16 * 1024 * 1024


class LinkError(PrecopyError):
    """The TCP connection failed or was closed by the peer."""

    code = AbortCode.LINK


class PeerAborted(PrecopyError):
    """The peer sent ABORT."""

    def __init__(self, code: int, reason: str) -> None:
        try:
            c = AbortCode(code)
        except ValueError:
            c = AbortCode.INTERNAL
        super().__init__(f"peer aborted ({c.name.lower()}): {reason}", c)
        self.reason = reason


def tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError as exc:  # capped by net.core.*mem_max: not fatal
            _log.debug("cannot set socket buffer: %s", exc)


async def connect(host: str, port: int, timeout_s: float, *, retry_refused: bool = False,
                  bind: str | None = None) -> socket.socket:
    """Open a tuned TCP connection or raise :class:`LinkError`.

    ``bind``: the local address to connect from (a NIC of several; port chosen by the kernel).

    ``retry_refused``: a refused connection (nothing listens yet: a
    destination daemon that is starting) is tried again every 0.2 s until
    ``timeout_s`` has passed, instead of failing at once.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise LinkError(f"cannot resolve {host}:{port}: {exc}") from exc
    deadline = loop.time() + timeout_s
    last: Exception | None = None
    said = False
    while True:
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            tune(sock)
            try:
                if bind is not None:
                    sock.bind((bind, 0))
                await asyncio.wait_for(loop.sock_connect(sock, addr), max(0.01, deadline - loop.time()))
                return sock
            except (OSError, asyncio.TimeoutError) as exc:
                sock.close()
                last = exc
        if not (retry_refused and isinstance(last, ConnectionRefusedError) and loop.time() + 0.2 < deadline):
            break
        if not said:
            _log.info("%s:%d refuses connections (not listening yet?): trying again for up to %.0f s",
                      host, port, deadline - loop.time())
            said = True
        await asyncio.sleep(0.2)
    raise LinkError(
        f"cannot connect to {host}:{port}: {last or 'no address'} "
        "(is precopy-dest running and reachable?)"
    )


class Channel:
    """A connection plus its socket: ``send`` events, iterate ``events``."""

    def __init__(self, sock: socket.socket, role: Role) -> None:
        self.sock = sock
        self.conn = Connection(role)
        self.loop = asyncio.get_running_loop()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        #: A send that makes no progress for this long (the peer stopped
        #: reading, or the path went black without a reset) is a
        #: :class:`LinkError` (code TIMEOUT) instead of a wait without end.
        self.send_timeout_s: float | None = None
        #: The migration's outcome is settled (the destination committed):
        #: from now on :meth:`abort` only closes, it never tells the peer
        #: "aborted" -- that would be a lie the source acts on.
        self.settled = False
        #: What the handshake agreed on (HELLO/HELLO_ACK ``caps``, e.g. ``postcopy``).
        self.caps: tuple[str, ...] = ()
        #: After sending ABORT, wait up to this long for the peer to close
        #: (discarding what it still sends) so our close cannot reset the
        #: connection before the peer has read why.  The destination sets
        #: it; the source does not wait (it has a workload to resume).
        self.linger_s = 0.0
        #: Seconds sends spent waiting for room in the socket (the peer or
        #: the link slower than us), and writing what then fit.  Plain TCP
        #: only: through TLS it stays 0 (its writes encrypt as they wait).
        self.send_blocked_s = 0.0
        #: The read waiting for the socket to turn readable, and whether the
        #: socket is registered with the loop for that (see _read_into).
        self._waiter: asyncio.Future[None] | None = None
        self._watching = False
        # A channel that reads or writes its own way (a subclass's _read_into
        # or _write_all: TLS, a test's in-memory channel) does all of it there.
        cls = type(self)
        self._own_reads = cls._read_into is not Channel._read_into
        self._own_writes = cls._write_all is not Channel._write_all

    def unsent_bytes(self) -> int:
        """Bytes written but still in the kernel's send queue (not yet acknowledged).

        Written minus this is what the link actually carried; 0 when unknown.
        """
        try:
            buf = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return max(0, int.from_bytes(buf, sys.byteorder, signed=True))

    def notsent_lowat(self, nbytes: int) -> int:
        """Make the socket writable (and ``sendmsg`` take more) only while fewer than ``nbytes`` are
        unsent (``TCP_NOTSENT_LOWAT``): a sender may then wait for writability instead of polling
        :meth:`unsent_bytes`.  Returns the socket's descriptor to wait on, or -1 where this cannot
        be (a channel that writes its own way, e.g. TLS; a kernel that refuses)."""
        if self._own_writes or self.closed:
            return -1
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, nbytes)
        except (OSError, AttributeError) as exc:
            _log.debug("no TCP_NOTSENT_LOWAT on %s: %s", self.peer, exc)
            return -1
        return self.sock.fileno()

    @property
    def peer(self) -> str:
        try:
            host, port = self.sock.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "?"

    async def send(self, event: Event) -> int:
        """Send one event; returns bytes written.  Raises :class:`LinkError`.

        What the socket takes at once goes without a wait, and without the
        send timeout's timer (entering ``asyncio.timeout`` per frame was ~3 %
        of the source's CPU): the timer only guards a wait for room.
        """
        views = [memoryview(b).cast("B") for b in self.conn.send(event)]
        n = sum(v.nbytes for v in views)
        deadline: asyncio.Timeout | None = None
        try:
            rest = self._send_now(views)
            if rest:
                deadline = asyncio.timeout(self.send_timeout_s)
                async with deadline:
                    await self._write_all(rest)
        except OSError as exc:  # TimeoutError included
            if deadline is not None and deadline.expired():
                # A frame may be half sent: this connection is unusable now.
                peer = self.peer
                self.close()
                raise LinkError(
                    f"{peer} did not take a frame within {self.send_timeout_s:.0f} s (link stalled)",
                    AbortCode.TIMEOUT,
                ) from None
            raise LinkError(f"connection to {self.peer} failed while sending: {exc}") from exc
        self.bytes_sent += n
        return n

    async def start(self) -> None:
        """Set up the transport before the first frame (TLS: the handshake)."""

    async def _write(self, data: Any) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def _send_now(self, views: list[memoryview]) -> list[memoryview]:
        """Write what the socket takes now of a frame's buffers; returns what is left.

        One ``sendmsg`` of header and payload together (at most ``_IOV_MAX``
        buffers a call): a syscall less per batch, and the kernel gets the
        frame at once.
        """
        if self._own_writes:
            return views
        for lo in range(0, len(views), _IOV_MAX):
            group = views[lo:lo + _IOV_MAX]
            try:
                sent = self.sock.sendmsg(group)
            except (BlockingIOError, InterruptedError):
                sent = 0
            for i, v in enumerate(group):
                if sent < v.nbytes:
                    return [v[sent:], *group[i + 1:], *views[lo + _IOV_MAX:]]
                sent -= v.nbytes
        return []

    async def _write_all(self, views: list[memoryview]) -> None:
        """Write the rest of a frame, waiting for room in the socket (see :meth:`_send_now`)."""
        t = time.monotonic()
        while views:
            await self._write(views[0])  # waits for room, then writes it all
            views = self._send_now(views[1:])
        self.send_blocked_s += time.monotonic() - t

    def _recv_now(self, buf: memoryview) -> int | None:
        """Read what the socket holds now into ``buf``; None when it holds nothing (a TLS
        channel always says None: its records are read by :meth:`_read_into`)."""
        if self._own_reads:
            return None
        try:
            return self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return None

    async def _read_into(self, buf: memoryview) -> int:
        """Wait until the socket is readable, then read into ``buf``.

        Not ``loop.sock_recv_into``: uvloop's adds the socket to epoll and
        removes it again for every read that has to wait (two ``epoll_ctl``
        a wait, ~10 % of the destination's CPU).  Here the socket stays
        registered while reads follow one another; it is dropped only when
        it turns readable with no read waiting (level-triggered, it would
        wake the loop at every turn meanwhile).
        """
        while True:
            try:
                return self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                pass
            fut = self.loop.create_future()
            self._waiter = fut
            if not self._watching:
                self.loop.add_reader(self.sock.fileno(), self._readable)
                self._watching = True
            try:
                await fut
            finally:
                self._waiter = None

    def _readable(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._unwatch()
        else:
            waiter.set_result(None)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self.sock.fileno())

    def _took(self, n: int) -> int:
        """Account ``n`` bytes just read into the connection's buffer (0: the peer closed)."""
        if self.closed:  # closed while the read was in flight: what came is not ours to parse
            raise LinkError(f"connection to {self.peer} was closed")
        if n == 0:
            self.conn.receive_data(b"")
        else:
            self.conn.buffer_updated(n)
            self.bytes_received += n
        return n

    def recv_now(self) -> int | None:
        """Read what is already in the socket, without waiting: the bytes (0: the peer
        closed), or None when there is nothing (then :meth:`recv_some` waits)."""
        if self.closed:
            raise LinkError(f"connection to {self.peer} is closed")
        buf = self.conn.get_buffer()
        try:
            n = self._recv_now(buf)
        except OSError as exc:
            raise LinkError(f"connection to {self.peer} failed while receiving: {exc}") from exc
        finally:
            buf.release()
        return None if n is None else self._took(n)

    async def recv_some(self) -> int:
        if self.closed:
            raise LinkError(f"connection to {self.peer} is closed")
        buf = self.conn.get_buffer()
        try:
            n = await self._read_into(buf)
        except OSError as exc:
            raise LinkError(f"connection to {self.peer} failed while receiving: {exc}") from exc
        finally:
            buf.release()
        return self._took(n)

    def recv_blocking(self) -> int:
        """Read once, waiting, for a thread that owns this channel with its socket in blocking
        mode (``precopy.session.stream_thread``); returns the bytes read (0: the peer closed).

        A payload going into a sink's view (every byte of it owed by the
        frame) is read whole, ``MSG_WAITALL``: one return per piece instead
        of one per arrival.  Raises :class:`BlockingIOError` when the
        socket's ``SO_RCVTIMEO`` passes with nothing read, :class:`LinkError`
        when the connection fails.
        """
        if self.closed:
            raise LinkError(f"connection to {self.peer} is closed")
        buf = self.conn.get_buffer()
        try:
            n = self._recv_blocking(buf, not isinstance(buf.obj, bytearray))
        except BlockingIOError:
            raise
        except OSError as exc:
            raise LinkError(f"connection to {self.peer} failed while receiving: {exc}") from exc
        finally:
            buf.release()
        return self._took(n)

    def _recv_blocking(self, buf: memoryview, owed: bool) -> int:
        return self.sock.recv_into(buf, 0, socket.MSG_WAITALL if owed else 0)

    def pending(self) -> int:
        """Bytes read from the socket but not yet handed to the connection (TLS: decrypted, waiting)."""
        return 0

    def send_blocking(self, event: Event) -> int:
        """:meth:`send` for a thread that owns this channel with its socket in blocking mode (a
        post-copy fault lane: ``precopy.session.postcopy_lane``); returns bytes written.  Raises
        :class:`LinkError` (TIMEOUT when the socket's ``SO_SNDTIMEO`` passes with no room)."""
        if self.closed:
            raise LinkError(f"connection to {self.peer} is closed")
        views = [memoryview(b).cast("B") for b in self.conn.send(event)]
        n = sum(v.nbytes for v in views)
        self.write_blocking(views)
        self.bytes_sent += n
        return n

    def write_blocking(self, views: list[memoryview]) -> None:
        """Write a frame already encoded (:meth:`Connection.send`'s buffers), waiting, for a thread
        that owns this channel's sending with its socket in blocking mode (:meth:`send_blocking`;
        a source's extra stream: ``precopy.session.stream_sender``).  Raises :class:`LinkError`
        (TIMEOUT when the socket's ``SO_SNDTIMEO`` passes with no room)."""
        if self.closed:
            raise LinkError(f"connection to {self.peer} is closed")
        try:
            self._send_blocking(views)
        except BlockingIOError:
            raise LinkError(f"{self.peer} did not take a frame in time (link stalled)", AbortCode.TIMEOUT) from None
        except OSError as exc:
            raise LinkError(f"connection to {self.peer} failed while sending: {exc}") from exc

    def _send_blocking(self, views: list[memoryview]) -> None:
        rest = self._send_now(views)  # one sendmsg for the frame, mostly
        for v in rest:
            self.sock.sendall(v)

    async def events(self, idle_timeout_s: float | None = None) -> AsyncIterator[Event]:
        """Yield events until the peer closes; ABORT raises :class:`PeerAborted`.

        With ``idle_timeout_s``, a peer that sends nothing for that long
        raises :class:`LinkError` (code TIMEOUT).
        """
        unyielded = 0
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                # What the socket holds is read without a wait and without the
                # idle timer (entering asyncio.timeout per read was ~6 % of the
                # destination's CPU); every _YIELD_BYTES so read, the loop gets
                # a turn (other migrations, a cancellation).
                n = self.recv_now() if unyielded < _YIELD_BYTES else None
                if n is not None:
                    unyielded += n
                elif idle_timeout_s is None:
                    n = await self.recv_some()
                    unyielded = 0
                else:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
                    # cancellation that lands as the read completes, and a daemon
                    # shutting down (SIGTERM cancels every migration) would go on
                    # serving this one until the idle timeout.
                    try:
                        async with asyncio.timeout(idle_timeout_s):
                            n = await self.recv_some()
                    except TimeoutError:
                        raise LinkError(
                            f"no data from {self.peer} for {idle_timeout_s:.0f} s", AbortCode.TIMEOUT
                        ) from None
                    unyielded = 0
                if n == 0:
                    self.conn.next_event()  # raises if a frame was cut short
                    return
                continue
            if isinstance(ev, Abort):
                raise PeerAborted(ev.code, ev.reason)
            yield ev  # type: ignore[misc]

    async def recv(self, *expected: type) -> Any:
        """Receive the next event, which must be one of ``expected``."""
        async for ev in self.events():
            if expected and not isinstance(ev, expected):
                raise RemoteProtocolError(
                    f"expected {' or '.join(t.__name__ for t in expected)}, got {type(ev).__name__}"
                )
            return ev
        raise LinkError(f"{self.peer} closed the connection")

    async def abort(self, code: AbortCode, reason: str) -> None:
        """Tell the peer why we are giving up (best effort) and close."""
        if not self.closed and not self.settled and self.conn.phase not in TERMINAL:
            try:
                await asyncio.wait_for(self.send(Abort(int(code), reason[:4000])), 1.0)
            except (PrecopyError, asyncio.TimeoutError) as exc:
                _log.debug("could not send ABORT to %s: %s", self.peer, exc)
            else:
                if self.linger_s > 0:
                    await self._linger(self.linger_s)
        self.close()

    async def _linger(self, timeout_s: float) -> None:
        """Half-close, then discard what the peer still sends until it closes (bounded).

        Closing a socket with unread data in it sends RST, and an RST can
        destroy our ABORT in the peer's receive queue before the peer reads
        it: the peer would see "connection reset" instead of the reason.
        """
        loop = asyncio.get_running_loop()
        buf = bytearray(1 << 16)
        self._unwatch()  # sock_recv_into registers the socket its own way
        try:
            self.sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(timeout_s):
                while await loop.sock_recv_into(self.sock, buf):
                    pass
        except (OSError, TimeoutError) as exc:
            _log.debug("closing %s after ABORT without its close: %s", self.peer, exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._unwatch()
            self.sock.close()
            self.conn.close()  # its receive buffer: see Connection.close

"""The source's conversation with the destination once the handshake is done.

A reader task queues what the destination sends (:meth:`Exchange.read_loop`);
the session's phases send events and wait for the answer they expect
(:meth:`Exchange.expect`, :meth:`Exchange.expect_table`), and a digest
request is numbered here (:meth:`Exchange.request`).  The round trip every
downtime estimate uses and the count of other migrations the destination
serves are learned from the answers.  Anything with the :class:`Channel`
methods used here (``events``, ``send``, ``peer``, ``unsent_bytes``,
``send_blocked_s``) will do: tests drive it with an in-memory channel.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from precopy.errors import AbortCode, PrecopyError, RemoteProtocolError
from precopy.net.channel import Channel, LinkError
from precopy.protocol import DigestRequest, DigestTable

__all__ = ["Exchange"]


class Exchange:
    """Events to and from the destination over one channel (set :attr:`chan` first)."""

    def __init__(self, io_timeout_s: float) -> None:
        self.chan: Channel | None = None
        self.io_timeout_s = io_timeout_s
        #: The fastest round trip seen (s): the handshake's, then digest exchanges'.
        self.rtt = 0.001
        #: The capabilities the destination serves of those offered (HELLO_ACK ``caps``).
        self.caps: tuple[str, ...] = ()
        #: Other migrations the destination receives, as its last table said.
        self.dest_peers = 0
        #: The number of the last digest request.
        self.seq = 0
        #: The migration's extra connections (precopy.session.streams.Streams, opened
        #: after READY): PAGES go by stripe, a SYNC before each digest request, COMMIT and POSTCOPY;
        #: None: one connection.
        self.streams: Any = None
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._asked: dict[int, float] = {}  # digest requests out: seq -> when sent (round trips)

    async def read_loop(self) -> None:
        """Queue every event the destination sends; then the error or the close that ended it."""
        assert self.chan is not None
        try:
            async for ev in self.chan.events():
                if isinstance(ev, DigestTable):
                    ev = DigestTable(seq=ev.seq, digests=ev.digests.copy(), others=ev.others)
                await self._events.put(ev)
            await self._events.put(LinkError(f"{self.chan.peer} closed the connection"))
        except (PrecopyError, OSError) as exc:
            await self._events.put(exc)

    async def expect(self, typ: type | tuple[type, ...], timeout_s: float | None = None) -> Any:
        """The next event, which must be a ``typ``.

        Raises :class:`LinkError` (TIMEOUT) after ``timeout_s`` (default: the
        I/O timeout), what the reader saw (an ABORT, a closed link), or
        :class:`RemoteProtocolError` for an event of another type.
        """
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that arrives as the awaited item completes, and this
        # runs every round, so a cancel (SIGINT, the daemon's cancel) could be
        # lost and the migration go on.
        timeout_s = self.io_timeout_s if timeout_s is None else timeout_s
        name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        try:
            async with asyncio.timeout(timeout_s):
                ev = await self._events.get()
        except TimeoutError:
            raise LinkError(
                f"no answer from the destination within {timeout_s:.0f} s "
                f"(waiting for {name})", AbortCode.TIMEOUT,
            ) from None
        if isinstance(ev, BaseException):
            raise ev
        if not isinstance(ev, typ):
            raise RemoteProtocolError(f"expected {name} from the destination, got {type(ev).__name__}")
        return ev

    async def expect_table(self, seq: int) -> DigestTable:
        """The next DIGEST_TABLE, which must answer request ``seq``."""
        table: DigestTable = await self.expect(DigestTable)
        if table.seq != seq:
            raise RemoteProtocolError(f"digest table {table.seq} answers request {seq}")
        asked = self._asked.pop(seq, None)
        if asked is not None:
            # An exchange is a round trip and then some: the round trip in
            # every estimate is the fastest seen.  The handshake's alone was
            # taken while many migrations started at once (eight on two
            # cores: ~0.1 s, a "floor" of ~350 ms for one of ~20 alone).
            self.rtt = max(min(self.rtt, time.monotonic() - asked), 1e-4)
        if table.others is not None:
            self.dest_peers = table.others
        return table

    def check_peer(self) -> None:
        """Raise what the reader saw (an ABORT, a closed link) without waiting."""
        if not self._events.empty():
            ev = self._events.get_nowait()
            if isinstance(ev, BaseException):
                raise ev
            raise RemoteProtocolError(f"unexpected {type(ev).__name__} from the destination")

    async def send(self, ev: Any) -> int:
        """Send one event; returns the bytes written.  On a broken link, the peer's reason if it gave one."""
        assert self.chan is not None
        if isinstance(ev, DigestRequest):
            self._asked[ev.seq] = time.monotonic()
        try:
            if self.streams is not None:
                return int(await self.streams.send(ev, self.chan.send))
            return await self.chan.send(ev)
        except LinkError:
            # The peer may have said why before closing: prefer its reason.
            await asyncio.sleep(0.05)
            self.check_peer()
            raise

    def after_sent(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the last event sent is written: now, or with an extra stream's sending
        thread on that thread after it (precopy.session.stream_sender)."""
        if self.streams is not None:
            self.streams.after_sent(fn)
        else:
            fn()

    async def drain(self) -> None:
        """Wait until the extra streams' threads, if any, have written all and run all they were given."""
        if self.streams is not None:
            await self.streams.drain()

    async def request(self, **fields: Any) -> int:
        """Send a DIGEST_REQUEST with the next number and ``fields``; returns its number."""
        self.seq += 1
        seq = self.seq
        await self.send(DigestRequest(seq=seq, **fields))
        return seq

    def unsent_bytes(self) -> int:
        """Bytes written but still queued in the socket."""
        assert self.chan is not None
        return self.chan.unsent_bytes() + (self.streams.unsent_bytes() if self.streams is not None else 0)

    @property
    def send_blocked_s(self) -> float:
        """Seconds the sends so far waited for room in the socket."""
        assert self.chan is not None
        return float(self.chan.send_blocked_s) + (self.streams.send_blocked_s if self.streams is not None else 0.0)

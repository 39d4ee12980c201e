"""The destination's extra streams of a migration: JOIN, their PAGES, the SYNC fence.

A migration that READY gave more than one stream has a :class:`StreamHub`,
registered by its id in the server's :class:`StreamRegistry` before READY
goes out.  Each extra connection authenticates on its own and sends JOIN
(docs/PROTOCOL.md, "Streams"); the server hands it to the hub
(:meth:`StreamRegistry.join`), which checks it and then writes the pages
that come on it with the migration's own region writer -- in the same
event loop as the first connection, so the writer's bookkeeping needs no
lock.  A SYNC on the first connection waits (:meth:`StreamHub.synced`)
until every extra stream's pages up to its count are written; a digest
table is computed with the extra streams held (:meth:`StreamHub.quiet`).

A fault on an extra stream (a cut, a stall past the idle timeout, a bad
frame) fails the migration: the hub records it and cancels the receiver's
task, which then ends with that error (ABORT on the first connection, the
partial region removed).  The receiver closes the hub when it ends,
commit or not: the extra streams' tasks stop before the region is unmapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Callable

import numpy as np

from precopy.errors import AbortCode, PrecopyError, RemoteProtocolError
from precopy.net.channel import Channel, LinkError
from precopy.protocol import Begin, Join, Joined, Pages

__all__ = ["StreamHub", "StreamRegistry"]

_log = logging.getLogger(__name__)

#: What writes one PAGES event into the region (RegionWriter.write).
WriteFn = Callable[[Pages], Any]
#: A connection's own payload sink and progress callback (RegionWriter.hashing_sink), or None.
SinksFn = Callable[[], "tuple[Callable[[np.ndarray], memoryview | None], Callable[[int], None]] | None"]


class StreamHub:
    """The extra streams (1 .. ``streams`` - 1) of one migration being received."""

    def __init__(self, begin: Begin, streams: int, receiver: asyncio.Task[Any] | None,
                 idle_timeout_s: float) -> None:
        self.begin = begin
        self.streams = streams
        self.receiver = receiver
        self.idle_timeout_s = idle_timeout_s
        #: PAGES frames written from each extra stream (index i: stream i + 1).
        self.counts = [0] * (streams - 1)
        self.joined: set[int] = set()
        #: The first fault of an extra stream: the migration's error.
        self.error: PrecopyError | None = None
        self.closed = False
        self._write: WriteFn | None = None
        self._sinks: SinksFn | None = None
        self._started = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._quiet = 0  # digest tables being computed: extra streams hold their writes
        self._writing = 0  # extra-stream writes in progress
        self._resume = asyncio.Event()
        self._resume.set()

    def start(self, write: WriteFn, sinks: SinksFn) -> None:
        """The region writer is ready: extra streams may write (those joined already waited for it).

        ``sinks()`` gives each stream its own payload sink and progress
        callback (payloads received straight into the region, their chunks
        hashed as they land), or None where nothing is received in place.
        """
        self._write, self._sinks = write, sinks
        self._started.set()

    def check_join(self, join: Join) -> None:
        """Raise :class:`RemoteProtocolError` unless ``join`` fits this migration."""
        if self.closed:
            raise PrecopyError(f"migration {join.migration_id} is ending: stream {join.stream} comes too late",
                               AbortCode.BUSY)
        if not 1 <= join.stream < self.streams:
            raise RemoteProtocolError(f"JOIN of stream {join.stream}: migration {join.migration_id} took "
                                      f"{self.streams} streams (1..{self.streams - 1} may join)")
        if join.stream in self.joined:
            raise RemoteProtocolError(f"stream {join.stream} of migration {join.migration_id} joined already")
        if (join.size, join.chunk_pages) != (self.begin.size, self.begin.chunk_pages):
            raise RemoteProtocolError(
                f"JOIN of migration {join.migration_id} gives size {join.size}, chunk_pages {join.chunk_pages}; "
                f"its BEGIN said {self.begin.size}, {self.begin.chunk_pages}")

    async def serve(self, chan: Channel, join: Join) -> None:
        """Take stream ``join.stream`` (checked) and write its pages until the hub closes.

        Raises what ended it early (also recorded as the migration's error).
        """
        self.check_join(join)
        index = join.stream
        self.joined.add(index)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await chan.send(Joined())
            _log.info("migration %s: stream %d joined from %s", join.migration_id, index, chan.peer)
            await self._started.wait()
            hashing = self._sinks() if self._sinks is not None else None
            if hashing is not None:
                chan.conn.payload_sink, chan.conn.payload_progress = hashing
            await self._pump(chan, index)
        except asyncio.CancelledError:
            if self.closed:
                return  # the migration ended: closing its streams is the normal end
            raise
        except BaseException as exc:
            self.fail(index, exc)
            raise
        finally:
            chan.conn.release_sink()  # it holds the region
            self._tasks.discard(task)

    async def _pump(self, chan: Channel, index: int) -> None:
        assert self._write is not None
        async for ev in chan.events(self.idle_timeout_s):
            if not isinstance(ev, Pages):  # pragma: no cover - the phase table allows only PAGES
                raise RemoteProtocolError(f"{type(ev).__name__} on stream {index}")
            if self._quiet:
                await self._resume.wait()
            self._writing += 1
            try:
                await self._write(ev)
            finally:
                self._writing -= 1
            self.counts[index - 1] += 1
            self._changed.set()
        raise LinkError(f"stream {index} from {chan.peer} closed before the commit")

    def fail(self, index: int, exc: BaseException) -> None:
        """Stream ``index`` broke: fail the migration (once), waking whoever waits."""
        if self.closed or self.error is not None:
            return
        code = exc.code if isinstance(exc, PrecopyError) else AbortCode.INTERNAL
        self.error = PrecopyError(f"stream {index} of migration {self.begin.migration_id} failed: {exc}", code)
        _log.warning("%s", self.error)
        self._changed.set()
        if self.receiver is not None and not self.receiver.done():
            self.receiver.cancel()

    async def synced(self, counts: tuple[int, ...]) -> None:
        """Wait until every extra stream has written its count of PAGES frames.

        Raises the migration's error if a stream failed, or
        :class:`LinkError` (TIMEOUT) when a stream makes no progress for the
        idle timeout.
        """
        while True:
            if self.error is not None:
                raise self.error
            behind = [i + 1 for i, (have, want) in enumerate(zip(self.counts, counts)) if have < want]
            if not behind:
                return
            self._changed.clear()
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    await self._changed.wait()
            except TimeoutError:
                raise LinkError(f"stream {behind[0]} of migration {self.begin.migration_id} sent no page for "
                                f"{self.idle_timeout_s:.0f} s ({self.counts[behind[0] - 1]} of "
                                f"{counts[behind[0] - 1]} batches in)", AbortCode.TIMEOUT) from None

    @contextlib.asynccontextmanager
    async def quiet(self) -> AsyncIterator[None]:
        """Hold the extra streams' writes (those under way finish first) while a digest table is made."""
        self._quiet += 1
        self._resume.clear()
        try:
            while self._writing:
                await asyncio.sleep(0.0005)
            yield
        finally:
            self._quiet -= 1
            if not self._quiet:
                self._resume.set()

    async def close(self) -> None:
        """End the extra streams (the migration is over, or about to commit): their tasks stop writing."""
        self.closed = True
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class StreamRegistry:
    """The server's hubs, by migration id: where a JOIN finds its migration."""

    def __init__(self, max_streams: int, idle_timeout_s: float) -> None:
        self.max_streams = max_streams
        self.idle_timeout_s = idle_timeout_s
        self._hubs: dict[str, StreamHub] = {}

    def open(self, begin: Begin) -> StreamHub | None:
        """A hub for ``begin`` if it asked for more than one stream and this side takes more (else None)."""
        streams = min(begin.streams, self.max_streams)
        if streams < 2:
            return None
        hub = StreamHub(begin, streams, asyncio.current_task(), self.idle_timeout_s)
        self._hubs[begin.migration_id] = hub
        return hub

    async def drop(self, hub: StreamHub) -> None:
        """The migration ended: close its hub and forget it."""
        await hub.close()
        if self._hubs.get(hub.begin.migration_id) is hub:
            del self._hubs[hub.begin.migration_id]

    async def join(self, chan: Channel, join: Join) -> None:
        """Serve a JOIN: its migration's hub takes the stream, or it is refused (raises)."""
        hub = self._hubs.get(join.migration_id)
        if hub is None:
            raise PrecopyError(f"JOIN of stream {join.stream}: no migration {join.migration_id} is receiving "
                               "here with more than one stream", AbortCode.PROTOCOL)
        await hub.serve(chan, join)

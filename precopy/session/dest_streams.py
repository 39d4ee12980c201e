"""The destination's extra streams of a migration: JOIN, their PAGES, the SYNC fence.

A migration that READY gave more than one stream has a :class:`StreamHub`,
registered by its id in the server's :class:`StreamRegistry` before READY
goes out.  Each extra connection authenticates on its own and sends JOIN
(docs/PROTOCOL.md, "Streams"); the server hands it to the hub
(:meth:`StreamRegistry.join`), which checks it and then receives the pages
that come on it on a thread of its own, with blocking reads
(:func:`~precopy.session.stream_thread.run_blocking`), and writes them
with the migration's own region writer: each stream's socket reads (into
the region), TLS and chunk hashing run on their own core, beside the
first connection's.  The streams' pages are disjoint (stripes), so the
writer's bookkeeping has one writer per page and chunk
(:mod:`precopy.session.region_writer`); the hub holds the source to that
(:meth:`StreamHub.check_pages`): a batch with a page of another stream's
stripe fails the migration before its payload reaches the region.  A SYNC on the first connection
waits (:meth:`StreamHub.synced`) until every extra stream's pages up to
its count are written; a digest table is computed with the extra streams'
writes held (:meth:`StreamHub.quiet`, a
:class:`~precopy.session.stream_thread.WriteGate`).

A fault on an extra stream (a cut, a stall past the idle timeout, a bad
frame) fails the migration: the hub records it and cancels the receiver's
task, which then ends with that error (ABORT on the first connection, the
partial region removed).  The receiver closes the hub when it ends,
commit or not: the extra streams' threads have stopped when
:meth:`StreamHub.close` returns, before the region is unmapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, AsyncIterator, Callable

import numpy as np

from precopy.errors import AbortCode, PrecopyError, RemoteProtocolError
from precopy.net.channel import Channel, LinkError
from precopy.protocol import Begin, Join, Joined, Pages
from precopy.session.stream_thread import Notifier, WriteGate, receive_blocking, run_blocking
from precopy.session.streams import stream_of, stripe_pages

__all__ = ["StreamHub", "StreamRegistry"]

_log = logging.getLogger(__name__)

#: What writes one PAGES event into the region from a stream's thread (RegionWriter.write_blocking):
#: False when stopped (the event) before it could.
WriteFn = Callable[[Pages, threading.Event], bool]
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
        #: Wakes a SYNC waiting in the session's loop when a stream's thread wrote a batch.
        self._progress = Notifier()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gate = WriteGate()  # digest tables being computed: extra streams hold their writes
        self.stripe = stripe_pages(begin.chunk_pages)

    def check_pages(self, index: int, *pages: np.ndarray) -> None:
        """Raise :class:`RemoteProtocolError` unless every page of ``pages`` (arrays of strictly
        increasing page numbers, as the codec checked) is in a stripe of stream ``index``.

        The source cuts its batches at stripes, so a batch lies in one stripe; the extra streams'
        threads and the first connection write the region at once, and only disjoint stripes
        keep a page and its chunk's digest to one writer.
        """
        present = [a for a in pages if len(a)]
        if not present:
            return
        first, last = min(int(a[0]) for a in present), max(int(a[-1]) for a in present)
        owner = stream_of(first, self.stripe, self.streams)
        if last // self.stripe != first // self.stripe or owner != index:
            raise RemoteProtocolError(
                f"PAGES of pages {first}..{last} on stream {index} of migration {self.begin.migration_id}: "
                f"with {self.streams} streams and stripes of {self.stripe} pages, stream {index} carries only "
                f"stripes s with s mod {self.streams} = {index}, one stripe a batch (the source cuts its "
                "batches at stripes: a source that does not is broken)")

    def guard(self, index: int, sink: Callable[[np.ndarray], memoryview | None]
              ) -> Callable[[np.ndarray], memoryview | None]:
        """``sink`` (a connection's payload sink) for stream ``index``: its pages checked first."""
        def guarded(indices: np.ndarray) -> memoryview | None:
            self.check_pages(index, indices)
            return sink(indices)
        return guarded

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
                chan.conn.payload_sink, chan.conn.payload_progress = self.guard(index, hashing[0]), hashing[1]
            await run_blocking(chan, lambda stop: self._pump(chan, index, stop), f"precopy-stream-{index}")
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

    def _pump(self, chan: Channel, index: int, stop: threading.Event) -> None:
        """Stream ``index``'s receive loop, on its own thread (blocking reads) until ``stop``."""
        assert self._write is not None
        write, gate, counts, progress = self._write, self._gate, self.counts, self._progress
        for ev in receive_blocking(chan, self.idle_timeout_s, stop):
            if not isinstance(ev, Pages):  # pragma: no cover - the phase table allows only PAGES
                raise RemoteProtocolError(f"{type(ev).__name__} on stream {index}")
            self.check_pages(index, ev.indices, ev.zeros)
            if not gate.enter():
                return  # the hub closed
            try:
                if not write(ev, stop):
                    return
            finally:
                gate.leave()
            counts[index - 1] += 1  # this thread's own entry
            progress.notify()
        if not stop.is_set():
            raise LinkError(f"stream {index} from {chan.peer} closed before the commit")

    def fail(self, index: int, exc: BaseException) -> None:
        """Stream ``index`` broke: fail the migration (once), waking whoever waits."""
        if self.closed or self.error is not None:
            return
        code = exc.code if isinstance(exc, PrecopyError) else AbortCode.INTERNAL
        self.error = PrecopyError(f"stream {index} of migration {self.begin.migration_id} failed: {exc}", code)
        _log.warning("%s", self.error)
        self._progress.event.set()  # (in the session's loop: serve calls it there)
        if self.receiver is not None and not self.receiver.done():
            self.receiver.cancel()

    async def synced(self, counts: tuple[int, ...]) -> None:
        """Wait until every extra stream has written its count of PAGES frames.

        Raises the migration's error if a stream failed, or
        :class:`LinkError` (TIMEOUT) when a stream makes no progress for the
        idle timeout.
        """
        def done() -> bool:
            return self.error is not None or all(have >= want for have, want in zip(self.counts, counts))

        progressed = await self._progress.wait(done, self.idle_timeout_s)
        if self.error is not None:
            raise self.error
        if not progressed:
            behind = [i + 1 for i, (have, want) in enumerate(zip(self.counts, counts)) if have < want]
            raise LinkError(f"stream {behind[0]} of migration {self.begin.migration_id} sent no page for "
                            f"{self.idle_timeout_s:.0f} s ({self.counts[behind[0] - 1]} of "
                            f"{counts[behind[0] - 1]} batches in)", AbortCode.TIMEOUT)

    @contextlib.asynccontextmanager
    async def quiet(self) -> AsyncIterator[None]:
        """Hold the extra streams' writes (those under way finish first) while a digest table is made."""
        self._gate.hold()
        try:
            while self._gate.writing:
                await asyncio.sleep(0.0005)
            yield
        finally:
            self._gate.release()

    async def close(self) -> None:
        """End the extra streams (the migration is over, or about to commit): their threads stop writing."""
        self.closed = True
        self._gate.close()
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

"""The source's extra streams: several TCP connections for one migration's pages.

``--streams N`` (docs/PROTOCOL.md, "Streams"): BEGIN asks for N, READY
says how many the destination takes; :func:`open_streams` opens the
others, each authenticated on its own and joined by JOIN.  Pages are
partitioned by stripes of the region (:func:`stream_of`): a page always
travels on the same stream, so two sends of it cannot overtake each other.
:class:`Streams` routes each PAGES event to its stripe's stream, counts
what each carried, and puts a SYNC (those counts) before every
DIGEST_REQUEST, COMMIT and POSTCOPY on the first connection, so that the
destination answers, commits and resumes only what every stream delivered.

By default all streams of a migration run in the session's event loop:
the kernel copies each stream's bytes (``sendmsg`` from the mapping) while
the loop serves the next; what one stream adds is a connection, a socket
buffer and a path, not a core.  With sending threads
(``--stream-threads``, :func:`precopy.session.options.stream_threads_wanted`)
each extra stream's writes run on a thread of its own
(:class:`~precopy.session.stream_sender.SendThread`): the loop encodes a
frame and goes on with the next batch while the thread's ``sendmsg`` (GIL
released) copies the pages from the mapping; the first connection is
written from the loop, as without streams.  Before a SYNC every stream's
queue is drained, so a failed stream is known, by its number, before the
fence goes out (docs/ARCHITECTURE.md, "Streams").

:func:`split_at_stripes` cuts the page sender's batches where the stripe
changes.  The default of ``--streams`` is
:func:`precopy.session.options.default_streams`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Iterator, Sequence

import numpy as np
import xxhash

from precopy.errors import LocalProtocolError
from precopy.net.channel import Channel, LinkError, connect
from precopy.net.tls import make_channel
from precopy.protocol import Commit, DigestRequest, Join, Joined, Pages, Postcopy, Role, Sync
from precopy.session.handshake import handshake
from precopy.session.options import stream_threads_wanted
from precopy.session.stream_sender import SendThread, from_memory

if TYPE_CHECKING:
    from precopy.session.options import SourceOptions

__all__ = ["Streams", "open_streams", "stream_of", "stripe_pages", "split_at_stripes", "Address"]

_log = logging.getLogger(__name__)

#: A stripe is at least this many pages (4 MiB): a full copy's batches
#: (runs from page 0, 1 MiB each) never cross one, and a dirty run of
#: pages is cut at most once per 4 MiB.
MIN_STRIPE_PAGES = 1024

Address = tuple[str, int]
SendFn = Callable[[Any], Awaitable[int]]


def stripe_pages(chunk_pages: int) -> int:
    """Pages per stripe: whole chunks (a chunk's pages always on one stream), at least 4 MiB."""
    return max(MIN_STRIPE_PAGES, chunk_pages)


def stream_of(page: int, stripe: int, streams: int) -> int:
    """The stream that carries ``page``: stripe ``page // stripe``, round robin over the streams."""
    return (page // stripe) % streams


def split_at_stripes(batches: Iterable[tuple[np.ndarray, bool]], stripe: int) -> Iterator[tuple[np.ndarray, bool]]:
    """The page sender's batches (ascending page numbers, whether a run), cut where the stripe changes.

    ``stripe`` 0: as they come (one stream).  A cut run stays a run; a cut
    scattered batch stays scattered.
    """
    for idx, run in batches:
        if not stripe or not len(idx) or int(idx[0]) // stripe == int(idx[-1]) // stripe:
            yield idx, run
            continue
        cuts = np.flatnonzero(np.diff(idx // stripe)) + 1
        for part in np.split(idx, cuts):
            yield part, run


class Streams:
    """The extra streams of one migration (1 .. n-1), routing PAGES by stripe and fencing with SYNC."""

    def __init__(self, chans: Sequence[Channel], stripe: int, threads: bool = False,
                 senders: Sequence[Any] | None = None) -> None:
        self.chans = list(chans)
        #: Each extra stream's sending thread (``threads``; tests give their own, with
        #: SendThread's methods), or none: every stream written from the loop.
        self.senders: list[Any] = list(senders) if senders is not None else []
        if threads and senders is None:
            try:
                for k, c in enumerate(self.chans):
                    self.senders.append(SendThread(c, k + 1))
            except BaseException:
                self.close()
                raise
        self.n = len(self.chans) + 1
        self.stripe = stripe
        #: PAGES frames sent on each extra stream (index i: stream i + 1).
        self.counts = [0] * len(self.chans)
        self._synced: list[int] = [0] * len(self.chans)
        #: Bytes and PAGES frames each stream carried (stream 0 first; for the report).
        self.bytes = [0] * self.n
        #: The stream the last PAGES went on (:meth:`after_sent`).
        self._last = 0

    def target(self, ev: Pages) -> int:
        """The stream for a batch; raises :class:`LocalProtocolError` if its pages span stripes."""
        first, last = _span(ev)
        s = first // self.stripe
        if last // self.stripe != s:
            raise LocalProtocolError(f"PAGES batch of pages {first}..{last} crosses a stripe of {self.stripe} "
                                     "pages (the page sender cuts batches at stripes)")
        return s % self.n

    async def send(self, ev: Any, send0: SendFn) -> int:
        """Send ``ev``: PAGES on its stripe's stream, anything else on the first (after a SYNC where needed)."""
        if isinstance(ev, Pages):
            if not len(ev.indices) and _span(ev)[0] // self.stripe != _span(ev)[1] // self.stripe:
                return sum([await self.send(part, send0) for part in self._split_zeros(ev)])
            k = self._last = self.target(ev)
            if k == 0:
                n = await send0(ev)
            elif self.senders:
                n = await self.senders[k - 1].send(ev, wait=not from_memory(ev.payload))
                self.counts[k - 1] += 1
            else:
                try:
                    n = await self.chans[k - 1].send(ev)
                except LinkError as exc:
                    raise LinkError(f"stream {k}: {exc}", exc.code) from exc
                self.counts[k - 1] += 1
            self.bytes[k] += n
            return n
        n = 0
        # POSTCOPY too: the destination resumes the workload on it, so every page sent before it on
        # any stream must be in the region first (a page landing later would overwrite the guest's
        # writes; SYNC is allowed in the pause, before MISSING and POSTCOPY alike).
        if isinstance(ev, (DigestRequest, Commit, Postcopy)) and self.counts != self._synced:
            await self.drain()  # a stream that failed says so now, by its number
            n += await send0(Sync(counts=tuple(self.counts)))
            self._synced = list(self.counts)
        return n + await send0(ev)

    def after_sent(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the last PAGES sent is written: on its stream's thread after it, or now
        (a stream written from the loop: its send returned once the kernel held every byte)."""
        if self.senders and self._last:
            self.senders[self._last - 1].after(fn)
        else:
            fn()

    async def drain(self) -> None:
        """Wait until every stream's thread has written what it was given (and run what it was asked)."""
        for sender in self.senders:
            await sender.drain()

    def _split_zeros(self, ev: Pages) -> list[Pages]:
        """A batch of zero pages only (the holes of the region), cut at stripes."""
        cuts = np.flatnonzero(np.diff(ev.zeros // self.stripe)) + 1
        empty = xxhash.xxh3_64_intdigest(b"")
        return [Pages(indices=ev.indices, zeros=part, payload=b"", checksum=empty)
                for part in np.split(ev.zeros, cuts)]

    @property
    def threaded(self) -> bool:
        """Whether the extra streams are written from threads of their own."""
        return bool(self.senders)

    def unsent_bytes(self) -> int:
        if self.senders:
            return sum(t.unsent_bytes() for t in self.senders)
        return sum(c.unsent_bytes() for c in self.chans)

    @property
    def send_blocked_s(self) -> float:
        if self.senders:
            return sum(float(t.blocked_s) for t in self.senders)
        return sum(float(c.send_blocked_s) for c in self.chans)

    def close(self, report: Any = None, first: Channel | None = None) -> None:
        """Close the extra streams; into ``report``: the bytes each stream carried (``first``'s all it
        sent) and whether they were sent from threads."""
        if report is not None:
            report.stream_bytes = [first.bytes_sent if first is not None else self.bytes[0], *self.bytes[1:]]
            report.stream_threads = self.threaded
        for t in self.senders:
            t.close()  # its thread has stopped: no view of the region is in use
        for c in self.chans:
            c.close()


def _span(ev: Pages) -> tuple[int, int]:
    """First and last page a batch names (data or zero)."""
    lo = [int(a[0]) for a in (ev.indices, ev.zeros) if len(a)]
    hi = [int(a[-1]) for a in (ev.indices, ev.zeros) if len(a)]
    return min(lo), max(hi)


async def _open_one(index: int, addr: Address, bind: str | None, join: Join, *, key: bytes | None,
                    tls_context: Any, connect_timeout_s: float, io_timeout_s: float) -> Channel:
    """Connect, authenticate and JOIN stream ``index``; returns its channel."""
    sock = await connect(addr[0], addr[1], connect_timeout_s, bind=bind)
    chan = make_channel(sock, Role.SOURCE, tls_context, addr[0])
    chan.send_timeout_s = io_timeout_s
    try:
        await handshake(chan, key, io_timeout_s)
        await chan.send(join)
        try:
            async with asyncio.timeout(io_timeout_s):
                await chan.recv(Joined)
        except TimeoutError:
            raise LinkError(f"stream {index}: {chan.peer} did not answer JOIN within {io_timeout_s:.0f} s") from None
    except BaseException:
        chan.close()
        raise
    _log.info("stream %d: %s -> %s", index, "%s:%d" % sock.getsockname()[:2], chan.peer)
    return chan


async def open_streams(opts: SourceOptions, streams: int, size: int, chunk_pages: int) -> Streams:
    """Open streams 1 .. ``streams`` - 1 of the migration ``opts`` describes (concurrently).

    Stream ``k`` goes to the ``k mod count``-th of ``[(opts.host,
    opts.port), *opts.stream_to]``, from the ``k mod count``-th of
    ``opts.bind`` (none: the kernel's choice).  Raises what failed
    (:class:`LinkError`, :class:`AuthError`, the destination's ABORT),
    every stream closed.
    """
    join = Join(migration_id=str(opts.migration_id), stream=1, size=size, chunk_pages=chunk_pages)
    addresses: list[Address] = [(opts.host, opts.port), *opts.stream_to]
    binds, key, tls_context = opts.bind, opts.auth_key, opts.tls_context
    connect_timeout_s, io_timeout_s = opts.connect_timeout_s, opts.io_timeout_s
    tasks = [asyncio.ensure_future(_open_one(
        k, addresses[k % len(addresses)], binds[k % len(binds)] if binds else None,
        Join(migration_id=join.migration_id, stream=k, size=join.size, chunk_pages=join.chunk_pages),
        key=key, tls_context=tls_context, connect_timeout_s=connect_timeout_s, io_timeout_s=io_timeout_s))
        for k in range(1, streams)]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in done if isinstance(r, BaseException)]
    if errors:
        for r in done:
            if isinstance(r, Channel):
                r.close()
        raise errors[0]
    chans = [r for r in done if isinstance(r, Channel)]
    threads = stream_threads_wanted(opts.stream_threads, streams)
    _log.info("%d streams, %s", streams, "each extra one sent from a thread of its own" if threads else
              "all sent from the session's event loop (--stream-threads %s)" % opts.stream_threads)
    return Streams(chans, stripe_pages(join.chunk_pages), threads=threads)

"""The source's post-copy page stream: requested pages first, the rest in order, until COMPLETE.

:class:`PageStream` sends, from the paused region, every page the
destination still lacks: pages the resumed workload faulted on (REQUEST)
before anything else, the others pushed in ascending order from the last
page asked for (wrapping around), each page once.  :func:`resume_stream` takes a broken stream up on a new connection
(RESUME: the destination answers with what it still lacks).  Neither needs
the session: the guardian (:mod:`precopy.session.guardian`) serves the
stream with them when the source agent died during post-copy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from precopy.errors import MigrationInDoubt, PrecopyError, RemoteProtocolError
from precopy.memory.region import GuestMemory
from precopy.net.channel import LinkError, PeerAborted, connect
from precopy.net.tls import make_channel
from precopy.protocol import PAGE_SIZE, POSTCOPY_CAP, Begin, Complete, Missing, Pages, Ready, Request, Resume, Role
from precopy.protocol.postcopy_codec import pages_of_bitmap
from precopy.session.commit import OutcomeTarget, resolve_outcome
from precopy.session.exchange import Exchange
from precopy.session.handshake import handshake
from precopy.session.lane_shared import CrossLock, SharedArrays, source_spec

__all__ = ["PageStream", "StreamStats", "pages_from_mapping", "resume_stream", "finish_stream", "PUSH_PAGES",
           "MAX_UNSENT"]

_log = logging.getLogger(__name__)
#: Pages in a pushed batch.  A fault on a page in flight (a sweep chasing the push) waits for the
#: rest of its frame, but every frame costs both agents a turn of Python and the sweep a fault and
#: a REQUEST at its boundary: 32 pages made the push of 1 GiB ~30 % slower than 128 (pc22l); 512
#: made it ~25 % faster than 128 (2 MiB frames: both agents' CPU 2.2 -> 1.7 CPU-s/GiB, total / idle
#: 1.71 -> 1.32 on a quiet machine) with the in-flight fault p50 806 -> 896 us, p99 4.6 -> 5.7 ms
#: (benchmarks/RESULTS.md, pcpush).
PUSH_PAGES = 512
#: Bytes the socket may hold unsent before the next push waits: what a
#: requested page queues behind (1 MiB: ~0.5 ms at loopback speed).
MAX_UNSENT = 1024 * 1024
#: While the workload faults on pages not sent yet (a REQUEST for one in the last URGENT_S),
#: less is let queue: its next fault waits behind less.  Requests for pages already sent (in
#: flight) do not count.  (Pushes of 16 pages then made the push of 1 GiB ~1.7x slower for no
#: clear gain in the remote faults' latency, now that the destination holds back what is ahead
#: of an answer: benchmarks/RESULTS.md, pc22l.)
URGENT_S, URGENT_PAGES, URGENT_UNSENT = 0.05, 32, 64 * 1024
#: Longest wait for room in the socket before the pacing looks again.  The wait is for the socket
#: to turn writable with TCP_NOTSENT_LOWAT at the limit (a request ends it at once): no polling.
#: (It polled every 0.2 ms: under load, with the destination the slower side, 25 % of the
#: source's samples during the push were that loop: benchmarks/RESULTS.md, pcpush.)
_ROOM_WAIT_S = 0.005
#: Pushes sent between two turns of the reader (each push while URGENT_S lasts).
_YIELD_EVERY = 4
#: Pages of the push order looked at per step when searching for the next wanted ones.
_WINDOW = 8192


@dataclass
class StreamStats:
    """What the source sent in post-copy."""

    pushed: int = 0  # pages sent in order
    requested: int = 0  # pages sent because the destination asked
    bytes_on_wire: int = 0
    reconnects: int = 0
    complete: Complete | None = None
    extra: dict[str, float] = field(default_factory=dict)


class PageStream:
    """Sends the pages ``need`` (a per-page mask: still wanted) of ``mem`` over ``exchange``."""

    def __init__(self, mem: GuestMemory, need: np.ndarray, stats: StreamStats) -> None:
        self.mem = mem
        self.need = need
        self.stats = stats
        self._order = np.flatnonzero(need).astype(np.uint32)
        self._pos = 0
        self._asked: deque[np.ndarray] = deque()
        self._wake = asyncio.Event()
        self._urgent_until = 0.0  # requests came lately: push small (URGENT_S)
        #: The fault lane (precopy.session.postcopy_lane): its thread answers REQUESTs beside the
        #: push; a page is claimed under the lock, so it goes on one connection, once.
        self.lock: Any = threading.Lock()
        self.lane: asyncio.Task[None] | None = None
        self._jump = -1  # the last page the lane answered: the push goes on after it
        self._lane_pages = self._lane_bytes = 0
        self._shared: SharedArrays | None = None  # share(): the mask and counters a lane's child shares
        self._lowat: tuple[Any, int] | None = None  # (channel, limit) TCP_NOTSENT_LOWAT was set for
        self._poke: asyncio.Future[bool] | None = None  # the pacing's wait for room: a request ends it

    def restart(self, need: np.ndarray) -> None:
        """A new link: the destination says what it still lacks (pages in flight were lost)."""
        if self._shared is not None:  # (no lane runs now: it went with the link)
            self.fold()
            self._shared["need"][:] = need
            need = self._shared["need"]
        self.need = need
        self._order = np.flatnonzero(need).astype(np.uint32)
        self._pos = 0
        self._asked.clear()

    async def run(self, exchange: Exchange, io_timeout_s: float) -> Complete:
        """Serve until COMPLETE; raises what the link raises (the caller may resume the stream)."""
        reader = asyncio.create_task(self._read(exchange))
        sent = 0
        try:
            while True:
                batch = self._next()
                if batch is None:
                    break
                await self._send(exchange, batch)
                sent += 1
                if self._urgent() or sent % _YIELD_EVERY == 0:
                    # A turn for the reader: a socket with room never makes the send wait, and a
                    # REQUEST would be read only once it filled (the destination drains it fast).
                    await asyncio.sleep(0)
                if reader.done():
                    break
                self._check_lane()
                await self._paced(exchange, reader, io_timeout_s)
            # Everything is out: COMPLETE (or another request: lost pages are asked again).
            async with asyncio.timeout(io_timeout_s):
                while not reader.done():
                    await self._wake.wait()
                    self._wake.clear()
                    if not reader.done():
                        self._check_lane()
                    batch = self._next()
                    if batch is not None:
                        await self._send(exchange, batch)
            return reader.result()
        finally:
            reader.cancel()

    async def _paced(self, exchange: Exchange, reader: asyncio.Task[Complete], io_timeout_s: float) -> None:
        """Wait while the socket holds more unsent than a push may queue behind (a request, or the
        reader's end, cuts it short).  Raises TimeoutError when nothing drains for ``io_timeout_s``
        (a stalled link: the caller takes the stream up again)."""
        last, since = -1, time.monotonic()
        while not self._asked and not reader.done():
            unsent = exchange.unsent_bytes()
            if unsent <= (URGENT_UNSENT if self._urgent() else MAX_UNSENT):
                return
            now = time.monotonic()
            if last < 0 or unsent < last:
                last, since = unsent, now
            elif now - since > io_timeout_s:
                raise TimeoutError(f"post-copy: {unsent} bytes unsent for {io_timeout_s:g} s (the link stalls)")
            if await self._room(exchange, URGENT_UNSENT if self._urgent() else MAX_UNSENT):
                # Writable: the kernel holds under half the limit not sent yet.  What TIOCOUTQ counts
                # beyond that was sent and is not acknowledged yet: asking again until it is spun
                # the loop (py-spy: ~10 % of the source's samples).
                return

    async def _room(self, exchange: Exchange, limit: int) -> bool:
        """Wait until the socket may hold fewer than ``limit`` bytes unsent: until it turns writable
        with TCP_NOTSENT_LOWAT at ``limit`` (returns True), a request comes, or ``_ROOM_WAIT_S``
        passes.  A channel without a plain socket (TLS, a test's) is looked at again after 0.2 ms."""
        chan: Any = getattr(exchange, "chan", None)
        fd = -1
        if getattr(chan, "notsent_lowat", None) is not None:
            if self._lowat is None or self._lowat[0] is not chan or self._lowat[1] != limit:
                fd = chan.notsent_lowat(limit)
                self._lowat = (chan, limit) if fd >= 0 else None
            elif not chan.closed:
                fd = chan.sock.fileno()
        if fd < 0:
            await asyncio.sleep(0.0002)
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()

        def wake(writable: bool = False) -> None:
            if not fut.done():
                fut.set_result(writable)

        loop.add_writer(fd, wake, True)
        timer = loop.call_later(_ROOM_WAIT_S, wake)
        self._poke = fut
        try:
            return await fut
        finally:
            self._poke = None
            timer.cancel()
            loop.remove_writer(fd)

    async def _read(self, exchange: Exchange) -> Complete:
        try:
            while True:
                ev = await exchange.expect((Request, Complete), timeout_s=1e9)
                if isinstance(ev, Complete):
                    self.stats.complete = ev
                    return ev
                if ev.indices.size and int(ev.indices.max()) >= len(self.need):
                    raise RemoteProtocolError(f"REQUEST for page {int(ev.indices.max())} of a region of "
                                              f"{len(self.need)} pages")
                self._asked.append(ev.indices.copy())
                if self.need[ev.indices].any():
                    # A page not sent yet: the workload waits on the link (a fault on a page in
                    # flight, as a sweep chasing the push takes, is not helped by smaller pushes).
                    self._urgent_until = time.monotonic() + URGENT_S
                self._wake.set()
                self._stop_waiting()
        finally:
            self._wake.set()  # done, or the link failed: the sender looks
            self._stop_waiting()

    def _stop_waiting(self) -> None:
        """End the pacing's wait for room (a request to serve, or the reader's end)."""
        if self._poke is not None and not self._poke.done():
            self._poke.set_result(False)

    def _next(self) -> tuple[np.ndarray, bool] | None:
        """The next batch: what was asked for and is still wanted, else the next pages in order.

        The push goes on from just after what was asked for (QEMU's post-copy does the same): a
        workload that walks its memory faults once where it stands, then finds the pages it
        touches next already pushed; what the push jumped over is sent when it wraps around.
        """
        self.fold()
        if self._jump >= 0:
            self._pos, self._jump = int(np.searchsorted(self._order, self._jump, side="right")), -1
        while self._asked:
            want = self._asked.popleft()
            want = want[self.need[want]]
            if want.size:
                want = want[:1024]
                self._pos = int(np.searchsorted(self._order, want.max(), side="right"))
                return want, True
        picked = self._push(URGENT_PAGES if self._urgent() else PUSH_PAGES)
        return None if picked is None else (picked, False)

    def _push(self, most: int) -> np.ndarray | None:
        """Up to ``most`` wanted pages from the push position on, wrapping around once; None: none left."""
        order, need = self._order, self.need
        wrapped = False
        while True:
            if self._pos >= len(order):
                if wrapped or not len(order):
                    return None
                self._pos, wrapped = 0, True
            window = order[self._pos:self._pos + _WINDOW]
            hit = np.flatnonzero(need[window])
            if hit.size:
                take = hit[:most]
                self._pos += int(take[-1]) + 1
                return window[take]
            self._pos += len(window)

    def frame(self, idx: np.ndarray) -> Pages:
        """PAGES of ``idx`` from the paused region (zero pages apart), checksummed: :func:`pages_from_mapping`."""
        return pages_from_mapping(self.mem, idx)

    def claim(self, indices: np.ndarray) -> np.ndarray:
        """Those of ``indices`` still wanted, now marked sent (any thread): each page goes once."""
        with self.lock:
            want: np.ndarray = indices[self.need[indices]]
            self.need[want] = False
        return want

    def answered(self, pages: np.ndarray, nbytes: int) -> None:
        """The lane's thread sent ``pages`` asked for, in ``nbytes``: the push goes on after them."""
        with self.lock:
            self._jump = int(pages.max())
            self._lane_pages += len(pages)
            self._lane_bytes += nbytes
            self.stats.requested += len(pages)
            self.stats.bytes_on_wire += nbytes

    def share(self) -> tuple[int, str]:
        """Move the mask into memory a lane's child maps too, and claim under a lock it takes too
        (:mod:`precopy.session.postcopy_lane_proc`); returns the memfd to hand it and the region's
        path (it maps the paused region itself)."""
        if self._shared is None:
            shared = SharedArrays.create("precopy-stream", source_spec(len(self.need)))
            shared["need"][:] = self.need
            shared["counters"][0] = -1
            lock = CrossLock.open(shared.path())
            with self.lock:
                self.need, self._shared, self.lock = shared["need"], shared, lock
        return self._shared.fd, str(self.mem.path)

    def fold(self) -> None:
        """Take in what a lane's child answered since the last fold (its shared counters)."""
        if self._shared is None:
            return
        c = self._shared["counters"]
        if c[0] < 0 and not c[1]:
            return  # nothing answered since (read without the lock: a hint, taken again under it)
        with self.lock:
            jump, pages, nbytes = int(c[0]), int(c[1]), int(c[2])
            c[0], c[1], c[2] = -1, 0, 0
        if jump >= 0:
            self._jump = jump
        if pages:
            self._lane_pages += pages
            self._lane_bytes += nbytes
            self.stats.requested += pages
            self.stats.bytes_on_wire += nbytes

    def lane_counted(self, got: dict[str, Any]) -> None:
        """What a lane's child said at its end: its CPU (the report's ``push_cpu_s`` counts it)."""
        self.stats.extra["lane_cpu_s"] = self.stats.extra.get("lane_cpu_s", 0.0) + float(got.get("cpu_s", 0.0))

    def close(self) -> None:
        """Give back what :meth:`share` took (the mask is copied back into private memory)."""
        if self._shared is not None:
            self.fold()
            self.need = self.need.copy()
            lock, self.lock = self.lock, threading.Lock()
            lock.close()
            self._shared.close()
            self._shared = None

    def _check_lane(self) -> None:
        """Raise what ended the fault lane (the stream is taken up again, as after a cut link); a
        lane that never opened ended without one (the stream goes on alone)."""
        lane = self.lane
        if lane is not None and lane.done() and not lane.cancelled() and lane.exception() is not None:
            raise LinkError(f"post-copy: the fault lane failed: {lane.exception()}")

    def _urgent(self) -> bool:
        return time.monotonic() < self._urgent_until

    async def _send(self, exchange: Exchange, batch: tuple[np.ndarray, bool]) -> None:
        idx, asked = batch
        if self.lane is not None:
            idx = self.claim(idx)  # the lane's thread may have sent some
            if not idx.size:
                return
        else:
            self.need[idx] = False
        n = await exchange.send(self.frame(idx))
        with self.lock:
            self.stats.bytes_on_wire += n
            if asked:
                self.stats.requested += len(idx)
            else:
                self.stats.pushed += len(idx)


def pages_from_mapping(mem: GuestMemory, idx: np.ndarray) -> Pages:
    """PAGES of the pages ``idx`` (ascending) of the paused region, its payload views of the mapping.

    No copy here: the kernel gathers the runs of data pages from the mapping
    into the socket (``sendmsg``), as pre-copy's full copy does.  A zero page
    goes as a number: found from its first 8 bytes (then read in full), so a
    page of data costs one cache line before the send reads it.  The checksum
    covers the data pages in order (one xxh3 over the runs: the digest of
    their concatenation, the payload the destination receives).
    """
    words = PAGE_SIZE // 8
    pos = idx.astype(np.int64)
    maybe = np.flatnonzero(mem.words[pos * words] == 0)
    if maybe.size:
        zero = np.zeros(len(idx), dtype=bool)
        zero[maybe] = ~mem.pages[pos[maybe]].any(axis=1)
        data_idx, zeros, pos = idx[~zero], idx[zero], pos[~zero]
    else:
        data_idx, zeros = idx, idx[:0]
    view = mem.view
    if not len(pos):
        return Pages(indices=data_idx, zeros=zeros, payload=b"", checksum=xxhash.xxh3_64_intdigest(b""))
    if int(pos[-1]) - int(pos[0]) == len(pos) - 1:  # one run: the common case
        raw = view[int(pos[0]) * PAGE_SIZE:(int(pos[-1]) + 1) * PAGE_SIZE]
        return Pages(indices=data_idx, zeros=zeros, payload=raw, checksum=xxhash.xxh3_64_intdigest(raw))
    starts = np.flatnonzero(np.diff(pos, prepend=-2) != 1)
    ends = np.append(starts[1:], len(pos)) - 1
    bufs = [view[a * PAGE_SIZE:(b + 1) * PAGE_SIZE] for a, b in zip(pos[starts].tolist(), pos[ends].tolist())]
    h = xxhash.xxh3_64()
    for b in bufs:
        h.update(b)
    return Pages(indices=data_idx, zeros=zeros, payload=bufs, checksum=h.intdigest())


async def resume_stream(target: OutcomeTarget, begin: Begin, lane_cap: tuple[str, ...] = ()
                        ) -> tuple[Exchange, asyncio.Task[None], np.ndarray]:
    """Take a broken post-copy stream up on a new connection: handshake, RESUME, MISSING, READY.

    Returns the exchange (its reader task running) and the per-page mask of
    what the destination still lacks.  Raises what connecting and the
    handshake raise (:class:`PrecopyError`, ``OSError``, ``TimeoutError``).
    ``lane_cap``: ``(POSTCOPY_LANE_CAP,)`` offers the fault lane too (the exchange's ``caps``
    say whether the destination serves it).
    """
    sock = await connect(target.host, target.port, target.connect_timeout_s)
    chan = make_channel(sock, Role.SOURCE, target.tls_context, target.host)
    chan.send_timeout_s = target.io_timeout_s
    try:
        greeting = await handshake(chan, target.auth_key, target.io_timeout_s, caps=(POSTCOPY_CAP, *lane_cap))
        if POSTCOPY_CAP not in greeting.caps:
            raise PrecopyError("the destination no longer offers post-copy (restarted without --on-resume?)")
        exchange = Exchange(target.io_timeout_s)
        exchange.chan = chan
        exchange.caps = greeting.caps
        reader = asyncio.create_task(exchange.read_loop())
        await exchange.send(Resume(begin=begin))
        bits = bytearray()
        while True:
            ev = await exchange.expect((Missing, Ready))
            if isinstance(ev, Ready):
                break
            bits += ev.data
        if len(bits) != -(-begin.npages // 8):
            raise RemoteProtocolError(f"READY after {len(bits)} bytes of the MISSING bitmap")
        need = np.zeros(begin.npages, dtype=bool)
        need[pages_of_bitmap(bits, begin.npages)] = True
        return exchange, reader, need
    except BaseException:
        chan.close()
        raise


async def finish_stream(target: OutcomeTarget, region: dict[str, object]) -> str:
    """The guardian's post-copy: serve the pages the destination still lacks from the paused region.

    ``region``: ``{"memory": path, "name": ..., "size": bytes}``.  Returns
    ``committed`` (every page is there), ``not-committed`` (it never resumed
    the workload: resume it here) or ``unknown`` (the destination committed
    and has no stream to resume, or cannot be reached: the paused copy here
    holds pages it lacks).
    """
    begin = Begin(migration_id=target.migration_id, name=str(region["name"]), size=int(str(region["size"])))
    mem = GuestMemory.open(str(region["memory"]), writable=False)
    stats = StreamStats()
    delay = 0.2
    try:
        for attempt in range(max(target.retries, 1)):
            try:
                exchange, reader, need = await resume_stream(target, begin)
            except PeerAborted as exc:
                _log.warning("the destination has no post-copy stream to resume (%s): asking for the outcome", exc)
                try:
                    await resolve_outcome(target, exc)
                except MigrationInDoubt as doubt:
                    _log.critical("%s", doubt)
                    return "unknown"
                except PrecopyError:
                    return "not-committed"
                # Committed, yet no stream waits and the journal does not say complete (it would have
                # answered so): the destination lost the stream (restarted).  The pages it lacks are
                # only here: in doubt, never "committed" (that would stop this copy).
                _log.critical("post-copy of migration %s is BROKEN: the destination committed it but has no "
                              "page stream to resume (%s)", target.migration_id, exc)
                return "unknown"
            except (PrecopyError, OSError, TimeoutError) as exc:
                _log.warning("post-copy: resume attempt %d failed: %s", attempt + 1, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                _log.warning("the source agent died during post-copy: serving the %d missing pages", int(need.sum()))
                await PageStream(mem, need, stats).run(exchange, target.io_timeout_s)
                _log.info("post-copy complete: %d pages pushed, %d requested", stats.pushed, stats.requested)
                return "committed"
            except (PrecopyError, OSError, TimeoutError) as exc:
                _log.warning("post-copy: the page stream broke again: %s", exc)
            finally:
                reader.cancel()
                if exchange.chan is not None:
                    exchange.chan.close()
        return "unknown"
    finally:
        mem.close()

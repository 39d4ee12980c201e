"""The sans-IO connection: bytes in, events out; events in, bytes out.

A :class:`Connection` turns bytes into events and events into bytes, the way
h11 does for HTTP.  It never touches a socket: the agents feed it what they
read (``get_buffer``/``buffer_updated`` for zero-copy receive, or
``receive_data``), pull events with :meth:`Connection.next_event`, and write
what :meth:`Connection.send` returns.

It owns the receive buffer and the conversation's state; what a frame looks
like is :mod:`~precopy.protocol.framing`'s, what its fields may hold
:mod:`~precopy.protocol.codec`'s, and which frame may come when is
:mod:`~precopy.protocol.phases`' table.  A frame that is not allowed in the
current phase raises :class:`RemoteProtocolError` naming the message, the
sender and the phase.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Final

import numpy as np

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol.codec import (
    chunk_list,
    decode_device_state,
    decode_digest_request,
    decode_digest_table,
    decode_event,
    decode_pages,
    encode_event,
    requires_field,
    table_size,
    u32,
)
from precopy.protocol.framing import PAYLOAD_KINDS, decode_meta, encode_frame, payload_nbytes, read_prefix
from precopy.protocol.limits import (
    HANDSHAKE_BUFFER,
    MAX_BATCH_PAGES,
    MAX_DEVICE_STATE,
    MAX_META,
    MAX_PAYLOAD,
    PREFIX,
    PREFIX_SIZE,
)
from precopy.protocol.messages import (
    Begin, DeviceState, DigestRequest, Event, Join, Kind, Missing, Pages, Ready, Resume, Role, Sync,
)
from precopy.protocol.phases import HANDSHAKE, Phase, check_by_page, check_ready_streams, check_sync, next_phase
from precopy.protocol.postcopy_codec import POSTCOPY_KINDS, check_missing_send, decode_postcopy_frame

__all__ = ["NEED_DATA", "Connection"]


#: Largest read into a sink's view while :attr:`Connection.payload_progress` hashes what
#: lands: one read of a whole 4 MiB payload left its first chunks to be read back from
#: memory (the destination's hashing then cost 0.8x its copy; 0.3x in 256 KiB pieces).
_PROGRESS_READ: Final = 256 * 1024


def _wanted(buf: bytearray, start: int, end: int) -> int:
    """Bytes that complete the header, or else the frame, whose bytes so far are ``buf[start:end]``."""
    avail = end - start
    if avail < PREFIX_SIZE:
        return PREFIX_SIZE - avail
    _, _, _, meta_len, payload_len = PREFIX.unpack_from(buf, start)
    head = PREFIX_SIZE + min(int(meta_len), MAX_META)
    if avail < head:
        return head - avail
    return max(0, head + min(int(payload_len), MAX_PAYLOAD) - avail)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass
class Connection:
    """One side of a precopy conversation, as a pure state machine.

    ``role`` is the side we play.  Bytes in: :meth:`get_buffer` and
    :meth:`buffer_updated` (zero copy) or :meth:`receive_data`; events out:
    :meth:`next_event`.  Events in: :meth:`send`, which returns the buffers
    to write.  Errors: :class:`RemoteProtocolError` for anything the peer
    sent that is malformed or out of place, :class:`LocalProtocolError` when
    the caller tries to send something not allowed now.
    """

    role: Role
    #: Receive buffer once authenticated; 0: by role.  A destination streams
    #: page batches: room for the largest frame plus 1 MiB, so that a batch
    #: (1 MiB by default) can arrive while one is parsed, and the partial
    #: frame moved to the front now and then is small; a source receives
    #: only short answers and digest tables, one at a time.
    buffer_size: int = 0
    #: Zero-copy receive of page batches: called with a batch's page
    #: numbers once its header is in (the batch checked, raw pages, its
    #: payload still to come), it returns a writable view of exactly the
    #: payload's size to receive the payload into, or None for the receive
    #: buffer.  The event then comes with ``in_place``.  With a sink,
    #: :meth:`get_buffer` hands out no more than the frame in progress
    #: needs, so that no payload is read into the buffer only to be copied
    #: out -- while the sink takes payloads.  Once it declines one
    #: (scattered pages), reads are as large as the buffer again until a
    #: payload it takes: frame-sized reads (a read for each frame's prefix,
    #: header and payload) cost a third of the receive rate of scattered
    #: rounds (1.1 against 1.45 GB/s at 200,000 pages/s).  A destination
    #: receiving into a region that has its pages sets it: the second copy
    #: (buffer to region) is gone.
    payload_sink: Callable[[np.ndarray], memoryview | None] | None = None
    #: Called with the bytes of a payload in so far each time more of it
    #: arrives into a sink's view: a destination hashes the chunks that
    #: are complete while they are still in the CPU cache.
    payload_progress: Callable[[int], None] | None = None
    phase: Phase = Phase.HELLO
    #: The conversation's BEGIN (on an extra stream: its JOIN's geometry, :meth:`Join.as_begin`).
    begin: Begin | None = None
    #: Connections READY took for this migration (1: this one alone).
    streams: int = 1
    #: The counts of the last SYNC (none yet: empty).
    synced: tuple[int, ...] = ()
    _buf: bytearray = field(init=False, repr=False)
    _start: int = field(default=0, init=False, repr=False)
    _end: int = field(default=0, init=False, repr=False)
    #: Digests in the answer to each DIGEST_REQUEST not yet answered, in order.
    _expected_tables: deque[int] = field(default_factory=deque, init=False, repr=False)
    #: A chunk table by page was asked for (DIGEST_REQUEST ``bp``): every later one is.
    _by_page: bool = field(default=False, init=False, repr=False)
    _device_received: int = field(default=0, init=False, repr=False)
    _device_sent: int = field(default=0, init=False, repr=False)
    #: MISSING bitmap bytes received and sent (post-copy: pieces in order, as DEVICE_STATE's).
    _missing_received: int = field(default=0, init=False, repr=False)
    _missing_sent: int = field(default=0, init=False, repr=False)
    _eof: bool = field(default=False, init=False, repr=False)
    #: The payload in progress into a sink's view: (view, bytes in, the batch).
    _direct: tuple[memoryview, int, Pages] | None = field(default=None, init=False, repr=False)
    #: Buffer offset of a frame whose payload the sink declined (not asked again).
    _declined: int = field(default=-1, init=False, repr=False)
    #: The sink declined the last payload offered: reads are not limited to the frame.
    _sink_declines: bool = field(default=False, init=False, repr=False)
    #: :meth:`release_sink` dropped a payload in progress: no more events.
    _abandoned: bool = field(default=False, init=False, repr=False)
    #: :meth:`close` dropped the receive buffer.
    _closed: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.buffer_size <= 0:
            frame = PREFIX_SIZE + MAX_META + MAX_PAYLOAD
            self.buffer_size = frame + (1024 if self.role is Role.DEST else 256) * 1024
        # Full size once authenticated (or when a frame needs it): see _grow.
        self._buf = bytearray(min(self.buffer_size, HANDSHAKE_BUFFER))

    def _grow(self, need: int = 0) -> None:
        """Enlarge the receive buffer (keeps buffered bytes).

        A destination's goes to its full ``buffer_size`` at once (it streams
        page batches); a source's only as far as a frame needs (it receives
        short answers and digest tables: a 1 GiB region's chunk table is
        64 KiB, and 4 MiB of zero-filled buffer would be 6 % of the agent's
        memory).
        """
        if len(self._buf) >= self.buffer_size:
            return
        size = self.buffer_size
        if self.role is Role.SOURCE:
            size = min(size, max(need, 2 * len(self._buf)))
        new = bytearray(size)
        n = self._end - self._start
        new[:n] = self._buf[self._start:self._end]
        self._buf, self._start, self._end = new, 0, n

    # -- receiving ------------------------------------------------------

    def get_buffer(self, min_free: int = 256 * 1024) -> memoryview:
        """Return writable space for incoming bytes (invalidates old payload views).

        While a payload goes to a sink's view (see :attr:`payload_sink`),
        the rest of that view.
        """
        if self._closed:
            raise LocalProtocolError("the connection is closed: it receives nothing more")
        if self._direct is not None and self._direct[1] < self._direct[0].nbytes:
            view, done, _ = self._direct
            # With progress, in pieces the CPU cache holds (see _PROGRESS_READ).
            return view[done:done + _PROGRESS_READ] if self.payload_progress is not None else view[done:]
        if len(self._buf) < self.buffer_size and self.phase not in HANDSHAKE and self.role is Role.DEST:
            self._grow()
        sinking = self.payload_sink is not None and not self._sink_declines
        need = _wanted(self._buf, self._start, self._end) if sinking else 0
        free = len(self._buf) - self._end
        if free < max(min_free, need) or self._start == self._end:
            n = self._end - self._start
            if self._start:
                self._buf[0:n] = self._buf[self._start:self._end]
                if self._declined >= 0:
                    self._declined -= self._start
            self._start, self._end = 0, n
        if need:
            if len(self._buf) - self._end < need:
                self._grow(self._end + need)
            return memoryview(self._buf)[self._end:self._end + need]
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None and self._direct[1] < self._direct[0].nbytes:
            view, done, ev = self._direct
            if nbytes < 0 or done + nbytes > view.nbytes:
                raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the payload")
            self._direct = (view, done + nbytes, ev)
            if self.payload_progress is not None:
                self.payload_progress(done + nbytes)
            return
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise LocalProtocolError(f"buffer_updated({nbytes}) beyond the buffer")
        self._end += nbytes

    def receive_data(self, data: bytes) -> None:
        """Feed bytes (copying); ``b""`` means the peer closed the stream."""
        if self._closed:
            raise LocalProtocolError("the connection is closed: it receives nothing more")
        if not data:
            self._eof = True
            return
        view = memoryview(data)
        if len(view) > self.buffer_size - self.buffered:
            raise LocalProtocolError(
                f"receive_data() of {len(view)} bytes: only {self.buffer_size - self.buffered} "
                "bytes free in the receive buffer (call next_event() first)"
            )
        if len(view) > len(self._buf) - self.buffered:
            self._grow(self.buffered + len(view))
        while view:
            buf = self.get_buffer(min(len(view), len(self._buf) // 2))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def close(self) -> None:
        """Let go of the receive buffer (up to ~5 MiB on a destination): nothing more is received.

        A closed connection's object may outlive it for a while -- the
        frames of an exception that ended it, a future, and the cycles they
        form are freed only by a full garbage collection -- and must not
        hold its buffer meanwhile.  Receiving afterwards raises
        :class:`LocalProtocolError`; sending still works (an ABORT).
        """
        self.release_sink()
        self._buf = bytearray()
        self._start = self._end = 0
        self._closed = True

    def release_sink(self) -> None:
        """Stop offering payloads to :attr:`payload_sink` (and progress to
        :attr:`payload_progress`) and drop any view it gave.

        For the end of a receive (the sink's memory is about to go away): a
        payload still arriving into a sink's view is abandoned, and from then
        on :meth:`next_event` raises :class:`LocalProtocolError` -- the rest of
        that frame would be read as the next one.  Without a payload in
        progress the connection goes on as without a sink.
        """
        self.payload_sink = self.payload_progress = None
        if self._direct is not None:
            self._direct = None
            self._abandoned = True


    def next_event(self) -> Event | _NeedData:
        """Parse one event from buffered bytes, or return :data:`NEED_DATA`."""
        if self._abandoned:
            raise LocalProtocolError("a payload was abandoned mid-frame (release_sink): the stream is out of step")
        if self._direct is not None:
            return self._direct_event()
        avail = self._end - self._start
        if avail < PREFIX_SIZE:
            return self._need_data()
        kind, meta_len, payload_len = read_prefix(self._buf, self._start)
        # Refuse from the prefix alone what no body could make acceptable,
        # so an unauthenticated peer never gets a large body buffered.
        next_phase(self.phase, self.role.peer, kind, self.begin, local=False)
        if payload_len and kind not in PAYLOAD_KINDS:
            raise RemoteProtocolError(f"{kind.name} frame must not carry a payload")
        total = PREFIX_SIZE + meta_len + payload_len
        mstart = self._start + PREFIX_SIZE
        pstart = mstart + meta_len
        if avail < total:
            if (self.payload_sink is not None and kind is Kind.PAGES and payload_len
                    and avail >= PREFIX_SIZE + meta_len and self._declined != self._start):
                return self._to_sink(kind, mstart, pstart, payload_len)
            if total > len(self._buf):
                self._grow(total)
            return self._need_data()
        meta = decode_meta(kind, memoryview(self._buf)[mstart:pstart])
        payload = memoryview(self._buf)[pstart:pstart + payload_len]
        self._start += total
        self._advance(self.role.peer, kind, local=False)
        return self._decode(kind, meta, payload)

    def _direct_event(self) -> Event | _NeedData:
        """The batch whose payload a sink's view receives, once all of it is in."""
        assert self._direct is not None
        view, done, ev = self._direct
        if done < view.nbytes:
            if self._eof:
                raise RemoteProtocolError(
                    f"peer closed the connection in the middle of a frame ({done} of {view.nbytes} "
                    "payload bytes in)")
            return NEED_DATA
        self._direct = None
        self._advance(self.role.peer, Kind.PAGES, local=False)
        return ev

    def _to_sink(self, kind: Kind, mstart: int, pstart: int, payload_len: int) -> _NeedData:
        """A PAGES header is in, its payload not: offer the payload to the sink.

        The batch is checked first (as when it is whole): a sink is only
        ever asked for pages of the region, for a payload of their size.
        """
        assert self.payload_sink is not None
        assert self.begin is not None  # guaranteed by the phase table
        meta = decode_meta(kind, memoryview(self._buf)[mstart:pstart])
        ev = decode_pages(meta, None, self.begin, payload_len)
        target = None if ev.compressed or not ev.indices.size else self.payload_sink(ev.indices)
        self._sink_declines = target is None
        if target is None:
            self._declined = self._start
            if PREFIX_SIZE + (pstart - mstart) + payload_len > len(self._buf):
                self._grow(PREFIX_SIZE + (pstart - mstart) + payload_len)
            return self._need_data()
        if target.nbytes != payload_len:
            raise LocalProtocolError(f"payload sink gave {target.nbytes} bytes for a {payload_len}-byte payload")
        have = self._end - pstart
        if have:
            target[:have] = memoryview(self._buf)[pstart:self._end]
        self._start = self._end
        self._direct = (target, have, dataclasses.replace(ev, payload=target, in_place=True))
        if have and self.payload_progress is not None:
            self.payload_progress(have)
        return NEED_DATA

    def _need_data(self) -> _NeedData:
        if self._eof and self._end > self._start:
            raise RemoteProtocolError(
                f"peer closed the connection in the middle of a frame ({self.buffered} bytes left)"
            )
        return NEED_DATA

    def _decode(self, kind: Kind, meta: dict[Any, Any], payload: memoryview) -> Event:
        """The event of a whole frame; the four kinds that answer or continue others are counted here."""
        if kind not in PAYLOAD_KINDS and len(payload):
            raise RemoteProtocolError(f"{kind.name} frame must not carry a payload")
        if kind is Kind.PAGES:
            assert self.begin is not None  # guaranteed by the phase table
            return decode_pages(meta, payload, self.begin)
        if kind is Kind.DIGEST_REQUEST:
            assert self.begin is not None
            req = decode_digest_request(meta, self.begin)
            check_by_page(req.by_page, req.pages_of, self._by_page)
            self._by_page |= req.by_page
            self._expected_tables.append(table_size(self.begin, req.pages_of))
            return req
        if kind is Kind.DIGEST_TABLE:
            table = decode_digest_table(meta, payload, self._expected_tables[0] if self._expected_tables else None)
            self._expected_tables.popleft()
            return table
        if kind is Kind.DEVICE_STATE:
            piece = decode_device_state(meta, payload, self._device_received)
            self._device_received += len(payload)
            return piece
        if kind in POSTCOPY_KINDS:  # (their MISSING bytes counted, as DEVICE_STATE's)
            ev, self._missing_received = decode_postcopy_frame(kind, meta, payload, self.begin, self._missing_received)
        else:
            ev = decode_event(kind, meta)
        self._note(ev)
        return ev

    def _note(self, ev: Event) -> None:
        """What a BEGIN, JOIN, READY or SYNC (sent or received, checked) tells the conversation."""
        if isinstance(ev, Begin):
            self.begin = ev
        elif isinstance(ev, Join):
            self.begin = ev.as_begin()
        elif isinstance(ev, Resume):
            self.begin = ev.begin
        elif isinstance(ev, Ready):
            check_ready_streams(ev.streams, self.begin)
            self.streams = ev.streams
        elif isinstance(ev, Sync):
            check_sync(ev.counts, self.streams, self.synced)
            self.synced = ev.counts

    # -- sending --------------------------------------------------------

    def send(self, event: Event) -> list[Any]:
        """Check ``event`` against the phase and return the buffers to write."""
        kind, meta, payload = encode_event(event)
        # Check everything first: a refused send must leave no trace.
        self._check_send(kind, event, meta, payload)
        self._advance(self.role, kind, local=True)  # raises before changing the phase
        if isinstance(event, (Begin, Join, Ready, Sync, Resume)):
            self._note(event)  # (checked in _check_send)
        elif isinstance(event, Missing):
            self._missing_sent += memoryview(event.data).nbytes
        elif isinstance(event, DigestRequest):
            assert self.begin is not None  # guaranteed by the phase table
            self._by_page |= event.by_page
            self._expected_tables.append(table_size(self.begin, event.pages_of))
        elif kind is Kind.DIGEST_TABLE:
            self._expected_tables.popleft()
        elif isinstance(event, DeviceState):
            self._device_sent += memoryview(event.data).nbytes
        return encode_frame(kind, meta, payload)

    def _check_send(self, kind: Kind, event: Event, meta: dict[str, Any], payload: Any) -> None:
        """Raise :class:`LocalProtocolError` if ``event`` may not go out (whatever the phase)."""
        if isinstance(event, Pages):
            n = len(event.indices) + len(event.zeros)
            if not 0 < n <= MAX_BATCH_PAGES:
                raise LocalProtocolError(f"PAGES batch of {n} pages")
        if payload_nbytes(payload) > MAX_PAYLOAD:
            raise LocalProtocolError(f"{kind.name} payload exceeds {MAX_PAYLOAD} bytes")
        if kind is Kind.DIGEST_TABLE:
            if not self._expected_tables:
                raise LocalProtocolError("DIGEST_TABLE without a request")
            if memoryview(payload).nbytes != 8 * self._expected_tables[0]:
                raise LocalProtocolError(
                    f"DIGEST_TABLE of {memoryview(payload).nbytes // 8} digests answers a request "
                    f"for {self._expected_tables[0]}"
                )
        if isinstance(event, Pages):
            if event.compressed and event.checksum is None and event.chunk_digests is None:
                raise LocalProtocolError("a compressed PAGES batch must carry a checksum")
        if isinstance(event, DigestRequest):
            try:
                check_by_page(event.by_page, event.pages_of, self._by_page)
                if event.pages_of is not None:
                    if self.begin is None:
                        raise LocalProtocolError("DIGEST_REQUEST before BEGIN")
                    chunk_list(u32(event.pages_of), self.begin)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(str(exc)) from None
        if isinstance(event, DeviceState):
            if event.offset != self._device_sent or event.total > MAX_DEVICE_STATE:
                raise LocalProtocolError("DEVICE_STATE pieces must be sent in order, within the limit")
        if isinstance(event, Missing):
            check_missing_send(meta, payload, self._missing_sent, self.begin)
        try:
            if kind is Kind.BEGIN:
                requires_field(meta["requires"])
            elif isinstance(event, (Ready, Sync)):
                next_phase(self.phase, self.role, kind, self.begin, local=True)  # the phase's refusal first
                if isinstance(event, Ready):
                    check_ready_streams(event.streams, self.begin)
                else:
                    check_sync(event.counts, self.streams, self.synced)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None

    def _advance(self, sender: Role, kind: Kind, *, local: bool) -> None:
        """Move to the phase after ``kind`` from ``sender`` (the table's; raises if not allowed)."""
        self.phase = next_phase(self.phase, sender, kind, self.begin, local=local)

"""The fault lane's lean frames: fixed binary payloads a lane's child packs and parses without msgpack.

Negotiated per lane (JOIN ``fast``, answered by JOINED ``fast``: both ends
serve the lane in a child process of their own, docs/PROTOCOL.md "The fault
lane"); without it the lane carries REQUEST and PAGES as before.  After such
a JOINED only these frames travel on the lane, each with the protocol's
12-byte prefix (magic ``PC``, kind, flags 0, ``meta_len`` 0, ``payload_len``
checked against the kind's limit before a byte of the body is buffered):

* **LANE_REQUEST** (26, destination -> source): the payload is 1..1024
  page numbers, uint32 little endian, strictly increasing, below the
  region's page count;
* **LANE_PAGES** (27, source -> destination): 1..64 records in increasing
  page order, each ``page`` u32, ``flags`` u32 (bit 0: the page is all
  zeros, no bytes follow; no other bit), ``digest`` u64 (xxh3_64 of the
  page's 4096 bytes; 0 for a zero page), then the page's 4096 bytes unless
  it is zero.  Every data page's digest is checked on receipt.

The kinds are not :class:`~precopy.protocol.messages.Kind`\\ s: a
:class:`~precopy.protocol.connection.Connection` never sees them (it refuses
kind 26 and 27 as unknown), and on a lean lane nothing else may come, but
for ABORT (its msgpack header: the peer's reason, :func:`abort_reason`).

Pure: no sockets.  :class:`LaneReader` is the receive side (a preallocated
buffer the caller reads into, frames handed out as views of it);
:func:`pack_request` and :func:`pack_pages` the sending side (into
preallocated buffers: the pages themselves are never copied here).
"""

from __future__ import annotations

import struct
from typing import Final, Sequence

import xxhash

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol.limits import MAGIC, MAX_META, MAX_REQUEST_PAGES, PAGE_SIZE, PREFIX, PREFIX_SIZE
from precopy.protocol.messages import Kind

__all__ = ["LANE_REQUEST", "LANE_PAGES", "LANE_BATCH_PAGES", "RECORD", "RECORD_SIZE", "FLAG_ZERO", "ZERO_DIGEST",
           "MAX_REQUEST_PAYLOAD", "MAX_PAGES_PAYLOAD", "REQUEST_BUF_SIZE", "PAGES_HEAD_SIZE", "pack_request",
           "decode_request", "pack_pages", "decode_pages", "LaneReader", "abort_reason"]

LANE_REQUEST: Final = 26
LANE_PAGES: Final = 27
#: Most pages one LANE_PAGES frame carries (an answer of more goes in several frames).
LANE_BATCH_PAGES: Final = 64
#: A LANE_PAGES record's head: page, flags, xxh3_64 of the page.
RECORD: Final = struct.Struct("<IIQ")
RECORD_SIZE: Final = RECORD.size  # 16
FLAG_ZERO: Final = 1
ZERO_PAGE: Final = bytes(PAGE_SIZE)
#: xxh3_64 of a page of zeros (a digest equal to it is confirmed by a compare: no collision trusted).
ZERO_DIGEST: Final = xxhash.xxh3_64_intdigest(ZERO_PAGE)
MAX_REQUEST_PAYLOAD: Final = MAX_REQUEST_PAGES * 4
MAX_PAGES_PAYLOAD: Final = LANE_BATCH_PAGES * (RECORD_SIZE + PAGE_SIZE)
#: Bytes a buffer for :func:`pack_request` needs; for :func:`pack_pages`' heads.
REQUEST_BUF_SIZE: Final = PREFIX_SIZE + MAX_REQUEST_PAYLOAD
PAGES_HEAD_SIZE: Final = PREFIX_SIZE + LANE_BATCH_PAGES * RECORD_SIZE
_LIMITS: Final = {LANE_REQUEST: MAX_REQUEST_PAYLOAD, LANE_PAGES: MAX_PAGES_PAYLOAD}
_NAMES: Final = {LANE_REQUEST: "LANE_REQUEST", LANE_PAGES: "LANE_PAGES"}
_U32: Final = struct.Struct("<I")
_digest = xxhash.xxh3_64_intdigest


def pack_request(pages: Sequence[int], out: bytearray) -> int:
    """Write the LANE_REQUEST of ``pages`` (ascending) at the start of ``out`` (>= REQUEST_BUF_SIZE
    bytes); returns the frame's length.  Raises :class:`LocalProtocolError` for no page, too many or
    an order that is not strictly increasing (a bug here, never sent)."""
    n = len(pages)
    if not 0 < n <= MAX_REQUEST_PAGES:
        raise LocalProtocolError(f"LANE_REQUEST of {n} pages (1..{MAX_REQUEST_PAGES})")
    last = -1
    off = PREFIX_SIZE
    for p in pages:
        if p <= last:
            raise LocalProtocolError("LANE_REQUEST pages are not strictly increasing")
        _U32.pack_into(out, off, p)
        last, off = p, off + 4
    PREFIX.pack_into(out, 0, MAGIC, LANE_REQUEST, 0, 0, 4 * n)
    return off


def decode_request(payload: memoryview, npages: int) -> list[int]:
    """The pages a LANE_REQUEST's payload names, checked (1..1024, strictly increasing, < ``npages``).
    Raises :class:`RemoteProtocolError` otherwise."""
    n, rest = divmod(len(payload), 4)
    if rest or not 0 < n <= MAX_REQUEST_PAGES:
        raise RemoteProtocolError(f"LANE_REQUEST payload of {len(payload)} bytes: not 1..{MAX_REQUEST_PAGES} "
                                  "uint32 page numbers")
    pages = list(struct.unpack_from(f"<{n}I", payload))  # (struct caches the compiled format)
    if pages[-1] >= npages:
        raise RemoteProtocolError(f"LANE_REQUEST for page {pages[-1]} of a region of {npages} pages")
    for a, b in zip(pages, pages[1:]):
        if b <= a:
            raise RemoteProtocolError("LANE_REQUEST pages are not strictly increasing")
    return pages


def pack_pages(pages: Sequence[int], views: Sequence[memoryview], head: bytearray,
               bufs: list[memoryview]) -> int:
    """The LANE_PAGES frame of ``pages`` (strictly increasing, 1..64) whose bytes are ``views`` (4096
    each, e.g. of the paused region's mapping): the prefix and records are written into ``head``
    (>= PAGES_HEAD_SIZE bytes), and ``bufs`` is filled with what to send, in order (pieces of
    ``head`` and the views themselves: no page is copied).  A zero page (its digest the zero
    page's, confirmed by a compare) goes as a record alone.  Returns the frame's length.  Raises
    :class:`LocalProtocolError` for a batch this side must not send."""
    n = len(pages)
    if not 0 < n <= LANE_BATCH_PAGES or len(views) != n:
        raise LocalProtocolError(f"LANE_PAGES of {n} pages and {len(views)} views (1..{LANE_BATCH_PAGES})")
    hv = memoryview(head)
    bufs.clear()
    start, off = 0, PREFIX_SIZE  # (the prefix leads the first piece of ``head``)
    data = 0
    last = -1
    for p, v in zip(pages, views):
        if p <= last or len(v) != PAGE_SIZE:
            raise LocalProtocolError("LANE_PAGES pages not strictly increasing, or not of one page each")
        last = p
        h = _digest(v)
        if h == ZERO_DIGEST and v == ZERO_PAGE:
            RECORD.pack_into(head, off, p, FLAG_ZERO, 0)
            off += RECORD_SIZE
            continue
        RECORD.pack_into(head, off, p, 0, h)
        off += RECORD_SIZE
        bufs.append(hv[start:off])
        bufs.append(v)
        start = off
        data += PAGE_SIZE
    if start < off:
        bufs.append(hv[start:off])
    PREFIX.pack_into(head, 0, MAGIC, LANE_PAGES, 0, 0, n * RECORD_SIZE + data)
    return PREFIX_SIZE + n * RECORD_SIZE + data


def decode_pages(payload: memoryview, npages: int, out: list[tuple[int, memoryview | None]]) -> None:
    """The records of a LANE_PAGES payload into ``out`` (cleared first): ``(page, its bytes)``, None
    for a zero page; each data page's digest checked.  Raises :class:`RemoteProtocolError` for a
    record cut short, a page out of order or past the region (``npages``), an unknown flag, more
    than 64 records, or a digest that does not match (the page was corrupted in transit)."""
    out.clear()
    end = len(payload)
    off = 0
    last = -1
    while off < end:
        if end - off < RECORD_SIZE:
            raise RemoteProtocolError(f"LANE_PAGES record cut short ({end - off} of {RECORD_SIZE} bytes)")
        page, flags, digest = RECORD.unpack_from(payload, off)
        off += RECORD_SIZE
        if page <= last or page >= npages:
            raise RemoteProtocolError(f"LANE_PAGES page {page} out of order or past the region ({npages} pages)")
        last = page
        if flags == FLAG_ZERO:
            if digest:
                raise RemoteProtocolError(f"LANE_PAGES zero page {page} with a digest")
            out.append((page, None))
        elif flags:
            raise RemoteProtocolError(f"LANE_PAGES page {page} has unknown flags {flags:#x}")
        else:
            if end - off < PAGE_SIZE:
                raise RemoteProtocolError(f"LANE_PAGES page {page} cut short ({end - off} of {PAGE_SIZE} bytes)")
            view = payload[off:off + PAGE_SIZE]
            if _digest(view) != digest:
                raise RemoteProtocolError(f"LANE_PAGES page {page} checksum mismatch: the data was corrupted "
                                          "in transit")
            off += PAGE_SIZE
            out.append((page, view))
        if len(out) > LANE_BATCH_PAGES:
            raise RemoteProtocolError(f"LANE_PAGES of more than {LANE_BATCH_PAGES} pages")


def abort_reason(meta: memoryview) -> str:
    """The reason of an ABORT frame that came on a lean lane (its msgpack header), checked."""
    from precopy.protocol.codec import decode_event
    from precopy.protocol.framing import decode_meta

    ev = decode_event(Kind.ABORT, decode_meta(Kind.ABORT, meta))
    return f"{getattr(ev, 'reason', '')} (code {getattr(ev, 'code', '?')})"


class LaneReader:
    """The receive side of a lean lane: the caller reads into :meth:`space` and says how much
    came (:meth:`took`); :meth:`next` hands out each whole frame as ``(kind, body)`` -- a view of
    the buffer, valid until the next :meth:`space` -- or None when none is complete.

    ``expect``: the one lane kind the peer may send (LANE_REQUEST to the source, LANE_PAGES to the
    destination); ABORT comes through too (its body is its msgpack header).  Each prefix is
    checked before its body is waited for (:meth:`missing`): magic, kind, flags, ``meta_len`` 0
    (ABORT: <= 64 KiB and no payload), ``payload_len`` within the kind's limit.  Raises
    :class:`RemoteProtocolError`: the lane is lost (the same recovery as a cut link).
    """

    def __init__(self, expect: int, initial: bytes = b"") -> None:
        if expect not in _LIMITS:
            raise ValueError(f"not a lane kind: {expect}")
        self.expect = expect
        self.frame_max = PREFIX_SIZE + max(_LIMITS[expect], MAX_META)
        self.buf = bytearray(2 * self.frame_max)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self._need = 0  # the frame at ``start``: its whole length once its prefix was checked
        if len(initial) > len(self.buf):
            raise RemoteProtocolError(f"{len(initial)} bytes ahead of the lane's first frame")
        self.buf[:len(initial)] = initial
        self.end = len(initial)

    def space(self) -> memoryview:
        """Where to read into next (room for a whole frame at least)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.end < self.frame_max:
            n = self.end - self.start
            self.buf[:n] = bytes(self.view[self.start:self.end])  # (a partial frame: rare, small)
            self.start, self.end = 0, n
        return self.view[self.end:]

    def took(self, n: int) -> None:
        self.end += n

    def missing(self) -> int:
        """Bytes still to come for the frame begun in the buffer (0: none begun, or it is whole)."""
        have = self.end - self.start
        if not have:
            return 0
        if have < PREFIX_SIZE:
            return PREFIX_SIZE - have
        if not self._need:
            self._check_prefix()
        return max(self._need - have, 0)

    def next(self) -> tuple[int, memoryview] | None:
        """The next whole frame, or None."""
        have = self.end - self.start
        if have < PREFIX_SIZE:
            return None
        if not self._need:
            self._check_prefix()
        if have < self._need:
            return None
        kind = self.buf[self.start + 2]
        body = self.view[self.start + PREFIX_SIZE:self.start + self._need]
        self.start += self._need
        self._need = 0
        return kind, body

    def _check_prefix(self) -> None:
        magic, kind, flags, meta_len, payload_len = PREFIX.unpack_from(self.buf, self.start)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {bytes(magic)!r} on the fault lane: not a precopy peer")
        if kind == Kind.ABORT:
            if meta_len > MAX_META or payload_len:
                raise RemoteProtocolError(f"ABORT on the fault lane with a header of {meta_len} bytes and a "
                                          f"payload of {payload_len}")
        elif kind != self.expect:
            name = _NAMES.get(kind) or (Kind(kind).name if kind in Kind._value2member_map_ else str(kind))
            raise RemoteProtocolError(f"unexpected frame kind {name} on the fault lane (lean frames: "
                                      f"{_NAMES[self.expect]} expected)")
        elif flags or meta_len:
            raise RemoteProtocolError(f"{_NAMES[kind]} frame with flags {flags:#x} and a header of "
                                      f"{meta_len} bytes (neither is allowed)")
        elif payload_len > _LIMITS[kind]:
            raise RemoteProtocolError(f"{_NAMES[kind]} payload of {payload_len} bytes exceeds {_LIMITS[kind]}")
        self._need = PREFIX_SIZE + meta_len + payload_len

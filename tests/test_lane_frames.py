"""The fault lane's lean frames (precopy.protocol.lane_frames), without sockets: round trips, the
reader fed in pieces, and every bad input refused loudly (bounds, wrong kind, truncated, bad checksum,
oversize).  The bytes themselves: tests/test_wire_bytes.py."""

from __future__ import annotations

import struct

import msgpack
import pytest
import xxhash

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol import PAGE_SIZE, Join, Joined
from precopy.protocol.codec import decode_event, encode_event
from precopy.protocol.lane_frames import (FLAG_ZERO, LANE_BATCH_PAGES, LANE_PAGES, LANE_REQUEST, MAX_PAGES_PAYLOAD,
                                          PAGES_HEAD_SIZE, RECORD, REQUEST_BUF_SIZE, LaneReader, abort_reason,
                                          decode_pages, decode_request, pack_pages, pack_request)
from precopy.protocol.limits import MAGIC, PREFIX
from precopy.protocol.messages import Kind

NPAGES = 64


def _page(b: int) -> memoryview:
    return memoryview(bytes([b]) * PAGE_SIZE)


def _pages_frame(pages: list[int], fill: list[int]) -> bytes:
    head, bufs = bytearray(PAGES_HEAD_SIZE), []  # type: ignore[var-annotated]
    pack_pages(pages, [_page(b) for b in fill], head, bufs)
    return b"".join(bytes(b) for b in bufs)


def _read(kind: int, data: bytes, step: int = 0) -> list[tuple[int, bytes]]:
    """Feed ``data`` to a reader (in pieces of ``step`` bytes, 0: at once); the frames it hands out."""
    r, got = LaneReader(kind), []
    for lo in range(0, len(data), step or len(data)):
        piece = data[lo:lo + (step or len(data))]
        r.space()[:len(piece)] = piece
        r.took(len(piece))
        while (f := r.next()) is not None:
            got.append((f[0], bytes(f[1])))
    assert r.missing() == 0
    return got


def test_a_request_round_trips_through_the_reader_in_any_pieces() -> None:
    out = bytearray(REQUEST_BUF_SIZE)
    n = pack_request([0, 5, 63], out)
    frame = bytes(out[:n]) * 3
    for step in (0, 1, 7, 20):
        got = _read(LANE_REQUEST, frame, step)
        assert [decode_request(memoryview(body), NPAGES) for _, body in got] == [[0, 5, 63]] * 3


def test_pages_round_trip_zero_pages_as_records_alone() -> None:
    frame = _pages_frame([1, 2, 9], [0x11, 0, 0x99])
    assert len(frame) == 12 + 3 * 16 + 2 * PAGE_SIZE  # page 2 is zeros: no bytes
    [(kind, body)] = _read(LANE_PAGES, frame, 1000)
    out: list[tuple[int, memoryview | None]] = []
    decode_pages(memoryview(body), NPAGES, out)
    assert [(p, None if v is None else bytes(v[:1])) for p, v in out] == [(1, b"\x11"), (2, None), (9, b"\x99")]


def test_the_reader_says_what_the_frame_begun_still_lacks() -> None:
    frame = _pages_frame([4], [0x44])
    r = LaneReader(LANE_PAGES, frame[:5])  # (bytes read with JOINED, handed over)
    assert r.missing() == 7 and r.next() is None
    r.space()[:20] = frame[5:25]
    r.took(20)
    assert r.missing() == len(frame) - 25 and r.next() is None
    rest = frame[25:]
    r.space()[:len(rest)] = rest
    r.took(len(rest))
    assert r.next() is not None and r.missing() == 0


def test_bad_requests_are_refused() -> None:
    out = bytearray(REQUEST_BUF_SIZE)
    with pytest.raises(LocalProtocolError):
        pack_request([], out)
    with pytest.raises(LocalProtocolError):
        pack_request([5, 5], out)
    with pytest.raises(RemoteProtocolError, match="page 64 of a region of 64"):
        decode_request(memoryview(struct.pack("<2I", 3, 64)), NPAGES)
    with pytest.raises(RemoteProtocolError, match="strictly increasing"):
        decode_request(memoryview(struct.pack("<2I", 9, 3)), NPAGES)
    for bad in (b"", b"\x01\x00\x00", bytes(4 * 1025)):
        with pytest.raises(RemoteProtocolError, match="uint32"):
            decode_request(memoryview(bad), NPAGES)


def _record_payload(*records: tuple[int, int, int, bytes]) -> memoryview:
    return memoryview(b"".join(RECORD.pack(p, f, h) + data for p, f, h, data in records))


def test_bad_pages_are_refused() -> None:
    good = bytes(_page(3))
    h = xxhash.xxh3_64_intdigest(good)
    out: list[tuple[int, memoryview | None]] = []
    cases = {
        "checksum mismatch": _record_payload((1, 0, h ^ 1, good)),
        "past the region": _record_payload((NPAGES, 0, h, good)),
        "out of order": _record_payload((5, FLAG_ZERO, 0, b""), (5, FLAG_ZERO, 0, b"")),
        "unknown flags": _record_payload((1, 2, h, good)),
        "zero page 1 with a digest": _record_payload((1, FLAG_ZERO, 7, b"")),
        "page 1 cut short": _record_payload((1, 0, h, good[:100])),
        "record cut short": memoryview(RECORD.pack(1, FLAG_ZERO, 0)[:10]),
        f"more than {LANE_BATCH_PAGES}": _record_payload(*[(p, FLAG_ZERO, 0, b"") for p in range(65)]),
    }
    for why, payload in cases.items():
        with pytest.raises(RemoteProtocolError, match=why):
            decode_pages(payload, NPAGES if "more than" not in why else 1000, out)
    with pytest.raises(LocalProtocolError):
        pack_pages([1, 1], [_page(1), _page(2)], bytearray(PAGES_HEAD_SIZE), [])
    with pytest.raises(LocalProtocolError):
        pack_pages(list(range(65)), [_page(1)] * 65, bytearray(PAGES_HEAD_SIZE), [])


def _prefix(kind: int, meta_len: int = 0, payload_len: int = 0, flags: int = 0, magic: bytes = MAGIC) -> bytes:
    return PREFIX.pack(magic, kind, flags, meta_len, payload_len)


def test_a_bad_prefix_fails_before_its_body_is_waited_for() -> None:
    cases = [
        (LANE_PAGES, _prefix(LANE_REQUEST, payload_len=4), "unexpected frame kind LANE_REQUEST"),
        (LANE_REQUEST, _prefix(LANE_PAGES, payload_len=16), "unexpected frame kind LANE_PAGES"),
        (LANE_REQUEST, _prefix(Kind.REQUEST, meta_len=13), "unexpected frame kind REQUEST"),  # the old frames
        (LANE_PAGES, _prefix(Kind.PAGES, meta_len=30, payload_len=4096), "unexpected frame kind PAGES"),
        (LANE_PAGES, _prefix(99), "unexpected frame kind 99"),
        (LANE_PAGES, _prefix(LANE_PAGES, payload_len=MAX_PAGES_PAYLOAD + 1), "exceeds"),
        (LANE_REQUEST, _prefix(LANE_REQUEST, payload_len=4097), "exceeds"),
        (LANE_REQUEST, _prefix(LANE_REQUEST, meta_len=1, payload_len=4), "header of 1 bytes"),
        (LANE_REQUEST, _prefix(LANE_REQUEST, flags=1, payload_len=4), "flags 0x1"),
        (LANE_REQUEST, _prefix(LANE_REQUEST, magic=b"XY"), "magic"),
        (LANE_REQUEST, _prefix(Kind.ABORT, meta_len=10, payload_len=1), "ABORT"),
    ]
    for expect, head, why in cases:
        r = LaneReader(expect, head)
        with pytest.raises(RemoteProtocolError, match=why):
            r.missing()
        with pytest.raises(RemoteProtocolError, match=why):
            LaneReader(expect, head).next()


def test_an_abort_on_a_lean_lane_comes_through_with_its_reason() -> None:
    meta = msgpack.packb({"code": 3, "reason": "bye"})
    [(kind, body)] = _read(LANE_PAGES, _prefix(Kind.ABORT, meta_len=len(meta)) + meta)
    assert kind == Kind.ABORT and abort_reason(memoryview(body)) == "bye (code 3)"


def test_join_and_joined_offer_the_lean_frames_only_on_a_lane() -> None:
    fast = Join(migration_id="m", stream=0, size=NPAGES * PAGE_SIZE, chunk_pages=8, lane=True, fast=True)
    kind, meta, _ = encode_event(fast)
    assert meta["fast"] is True and decode_event(kind, meta) == fast
    kind, meta, _ = encode_event(Join(migration_id="m", stream=0, size=NPAGES * PAGE_SIZE, chunk_pages=8, lane=True))
    assert "fast" not in meta and decode_event(kind, meta).fast is False  # type: ignore[attr-defined]
    with pytest.raises(RemoteProtocolError, match="without 'lane'"):
        decode_event(kind, {**meta, "lane": False, "stream": 1, "fast": True})
    with pytest.raises(RemoteProtocolError):
        decode_event(kind, {**meta, "fast": 1})
    assert encode_event(Joined())[1] == {} and decode_event(Kind.JOINED, {}) == Joined()  # as before
    assert decode_event(Kind.JOINED, {"fast": True}) == Joined(fast=True)
    assert decode_event(Kind.JOINED, {"other": 1}) == Joined()  # (unknown fields: ignored, as before)
    with pytest.raises(RemoteProtocolError):
        decode_event(Kind.JOINED, {"fast": "yes"})

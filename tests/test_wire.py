"""Tests of the pure wire protocol (``precopy.protocol``), h11 style.

Two connections talk back to back in memory (see ``helpers.Pair``); invalid
input is hand-made with the frame factory.  Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from collections.abc import Callable
from typing import Any

import lz4.block
import msgpack
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from .helpers import (
    BEGIN,
    CHUNK_PAGES,
    D,
    DEST_NONCE,
    HANDSHAKE,
    NCHUNKS,
    NPAGES,
    S,
    SOURCE_NONCE,
    Pair,
    assert_same_event,
    assert_same_events,
    dest_copying,
    drain,
    feed,
    feed_zero_copy,
    frame,
    freeze,
    join,
    lz4_pages,
    msgpack_bytes,
    page_bytes,
    pages_meta,
    raw_frame,
    raw_pages,
    u32,
)
from precopy.protocol import auth
from precopy.errors import AbortCode, LocalProtocolError, RemoteProtocolError
from precopy.protocol import (
    MAX_BATCH_PAGES,
    MAX_DEVICE_STATE,
    MAX_META,
    MAX_PAYLOAD,
    NEED_DATA,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    AuthOk,
    Begin,
    Commit,
    Committed,
    Connection,
    DeviceState,
    DigestRequest,
    DigestTable,
    Event,
    Hello,
    HelloAck,
    Kind,
    Outcome,
    Pages,
    Phase,
    Query,
    Ready,
    Role,
    Switchover,
    encode_frame,
    page_payload,
)
from precopy.protocol.limits import HANDSHAKE_BUFFER, PREFIX_SIZE

KEY = b"k" * 32


# --------------------------------------------------------------------------
# The happy conversations


def device_pieces(blob: bytes, sizes: list[int]) -> list[DeviceState]:
    out, pos = [], 0
    for n in sizes:
        out.append(DeviceState(offset=pos, total=len(blob), data=blob[pos:pos + n]))
        pos += n
    assert pos == len(blob)
    return out


def migration_script(device: list[DeviceState], blob: bytes) -> list[tuple[Role, Event, Phase]]:
    """A whole migration: (sender, event, phase of both sides afterwards)."""
    table1 = np.arange(NCHUNKS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    table2 = table1[::-1].copy()
    table2[0] = np.uint64(2**64 - 1)  # the top bit must survive
    script: list[tuple[Role, Event, Phase]] = [
        (S, Hello(version=PROTOCOL_VERSION, nonce=SOURCE_NONCE), Phase.HELLO_ACK),
        (D, HelloAck(version=PROTOCOL_VERSION, nonce=DEST_NONCE,
                     mac=auth.dest_mac(KEY, SOURCE_NONCE, DEST_NONCE)), Phase.AUTH),
        (S, Auth(mac=auth.source_mac(KEY, SOURCE_NONCE, DEST_NONCE)), Phase.AUTH_OK),
        (D, AuthOk(), Phase.AUTHENTICATED),
        (S, BEGIN, Phase.BEGIN_SENT),
        (D, Ready(), Phase.COPYING),
        (S, raw_pages([0, 1, 2, NPAGES - 1], seed=1), Phase.COPYING),
        (S, raw_pages([5, 9], zeros=[3, 4, 1000], seed=2), Phase.COPYING),
        (S, raw_pages([], zeros=[6, 7]), Phase.COPYING),
        (S, lz4_pages([10, 11, 12, 500], zeros=[13]), Phase.COPYING),
        (S, DigestRequest(seq=1), Phase.COPYING),
        (D, DigestTable(seq=1, digests=table1), Phase.COPYING),
        (S, Switchover(), Phase.PAUSED),
        (S, raw_pages([1, 2], seed=3), Phase.PAUSED),
        (S, lz4_pages([20], data=page_bytes([20], seed=4)), Phase.PAUSED),  # incompressible
        (S, DigestRequest(seq=2, final=True), Phase.PAUSED),
        (D, DigestTable(seq=2, digests=table2), Phase.PAUSED),
        *[(S, piece, Phase.PAUSED) for piece in device],
        (S, Commit(migration_id=BEGIN.migration_id, checksum=xxhash.xxh3_64_intdigest(blob)),
         Phase.COMMIT_SENT),
        (D, Committed(migration_id=BEGIN.migration_id, resumed=True), Phase.DONE),
    ]
    return script


DEVICE_CASES = {
    "none": (b"", []),
    "empty-total-0": (b"", [0]),
    "one-piece": (b"state!", [6]),
    "multi-piece": (bytes(range(256)) * 40, [1, 0, 4000, 6239]),
}


@pytest.mark.parametrize("case", DEVICE_CASES, ids=list(DEVICE_CASES))
def test_full_migration_conversation(case: str) -> None:
    blob, sizes = DEVICE_CASES[case]
    pair = Pair()
    for sender, ev, phase in migration_script(device_pieces(blob, sizes), blob):
        got = pair.send(sender, ev)
        assert len(got) == 1, (ev, got)
        assert_same_event(freeze(ev), got[0])
        assert pair.src.phase is phase, (ev, pair.src.phase)
        assert pair.dst.phase is phase, (ev, pair.dst.phase)
        if isinstance(ev, Pages):
            # what the destination would write is exactly what was sent
            expected = lz4.block.decompress(ev.payload, uncompressed_size=len(ev.indices) * PAGE_SIZE) \
                if ev.compressed else ev.payload
            assert bytes(page_payload(got[0])) == expected
    assert pair.src.phase is pair.dst.phase is Phase.DONE
    assert pair.src.buffered == pair.dst.buffered == 0


def test_device_state_reassembles() -> None:
    blob = bytes(range(256)) * 40
    pair = Pair()
    pair.start()
    pair.exchange(S, Switchover())
    got = b""
    for piece in device_pieces(blob, [1, 0, 4000, 6239]):
        (ev,) = pair.send(S, piece)
        assert ev.total == len(blob) and ev.offset == len(got)
        got += ev.data
    assert got == blob


@pytest.mark.parametrize("committed,known", [(True, True), (False, True), (False, False)])
def test_query_outcome_conversation(committed: bool, known: bool) -> None:
    pair = Pair()
    pair.handshake()
    assert pair.src.phase is pair.dst.phase is Phase.AUTHENTICATED
    pair.exchange(S, Query(migration_id="mig-0"))
    assert pair.src.phase is pair.dst.phase is Phase.QUERY_SENT
    (ev,) = pair.send(D, Outcome(migration_id="mig-0", committed=committed, known=known))
    assert ev == Outcome(migration_id="mig-0", committed=committed, known=known)
    assert pair.src.phase is pair.dst.phase is Phase.DONE


@pytest.mark.parametrize("sender", [S, D])
def test_abort_from_either_side_ends_both(sender: Role) -> None:
    pair = Pair()
    pair.start()
    (ev,) = pair.send(sender, Abort(code=int(AbortCode.NOT_CONVERGED), reason="too hot"))
    assert ev == Abort(code=8, reason="too hot")
    assert pair.src.phase is pair.dst.phase is Phase.ABORTED
    with pytest.raises(LocalProtocolError):
        pair.src.send(raw_pages([1]))


def test_abort_allowed_mid_handshake_but_not_after_done() -> None:
    pair = Pair()
    pair.exchange(S, HANDSHAKE[0][1])
    pair.exchange(D, Abort(code=int(AbortCode.VERSION), reason="old"))
    assert pair.src.phase is pair.dst.phase is Phase.ABORTED

    done = Pair()
    done.handshake()
    done.exchange(S, Query(migration_id="x"))
    done.exchange(D, Outcome(migration_id="x", committed=True, known=True))
    with pytest.raises(LocalProtocolError, match="ABORT.*'done'"):
        done.src.send(Abort(code=1, reason="late"))
    done.dst.receive_data(frame(Kind.ABORT, {"code": 1, "reason": "late"}))
    with pytest.raises(RemoteProtocolError, match="ABORT from the source.*'done'"):
        done.dst.next_event()


def test_received_payload_is_a_view_into_the_buffer() -> None:
    """Documented contract: payloads are views into the receive buffer."""
    dst = dest_copying()
    batch = raw_pages([3], seed=9)
    dst.receive_data(frame(Kind.PAGES, pages_meta([3], checksum=batch.checksum), batch.payload))
    ev = dst.next_event()
    assert isinstance(ev, Pages)
    assert isinstance(ev.payload, memoryview)
    assert bytes(ev.payload) == batch.payload


# --------------------------------------------------------------------------
# Arbitrary split points


def run_split(sizes: list[int], zero_copy: bool = False) -> None:
    """Replay a whole migration, each run of same-direction frames split by ``sizes``."""
    blob = b"device-state" * 100
    script = migration_script(device_pieces(blob, [7, 0, len(blob) - 7]), blob)
    pair = Pair()
    k = 0
    while k < len(script):
        sender = script[k][0]
        run = []
        while k < len(script) and script[k][0] is sender:
            run.append(script[k][1])
            k += 1
        data = b"".join(join(pair.conn(sender).send(ev)) for ev in run)
        receiver = pair.conn(sender.peer)
        if zero_copy:
            got = feed_zero_copy(receiver, data, read_size=sizes[k % len(sizes)])
        else:
            got = feed(receiver, data, sizes)
        assert_same_events([freeze(ev) for ev in run], got)
    assert pair.src.phase is pair.dst.phase is Phase.DONE


def test_one_byte_at_a_time() -> None:
    run_split([1])


@pytest.mark.parametrize("sizes", [[2], [3], [7, 11], [PREFIX_SIZE - 1], [PREFIX_SIZE + 1],
                                   [4095, 4097], [65537], [1, 5000, 2, 12]])
def test_odd_chunk_sizes(sizes: list[int]) -> None:
    run_split(sizes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=20))
def test_random_split_points(sizes: list[int]) -> None:
    run_split(sizes)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=10))
def test_random_split_points_zero_copy(sizes: list[int]) -> None:
    run_split(sizes, zero_copy=True)


# --------------------------------------------------------------------------
# Zero-copy receive and buffer compaction


def many_batches(n: int) -> list[Pages]:
    out: list[Pages] = []
    for k in range(n):
        idx = [(k * 7 + j) % NPAGES for j in range(1 + k % 4)]
        if k % 3 == 2:
            out.append(lz4_pages(idx, zeros=[(k + 1000) % NPAGES]))
        else:
            out.append(raw_pages(idx, zeros=[(k + 1000) % NPAGES] if k % 2 else [], seed=k))
    return out


@pytest.mark.parametrize("buffer_size,read_size,min_free", [
    (40_000, 4096, 1),
    (40_000, 6000, 20_000),      # get_buffer compacts while a frame is half-buffered
    (17_000, 17_000, 17_000),    # every read fills the buffer
    (None, 256 * 1024, 256 * 1024),  # the channel's defaults
])
def test_zero_copy_matches_receive_data(buffer_size: int | None, read_size: int, min_free: int) -> None:
    batches = many_batches(60)
    pair = Pair()
    pair.start()
    data = b"".join(join(pair.src.send(b)) for b in batches)
    size = buffer_size or 2 * (PREFIX_SIZE + MAX_META + MAX_PAYLOAD)
    reps = -(-size * 3 // len(data))  # comfortably more than the buffer
    data *= reps

    via_copy = feed(dest_copying(), data, [4096])
    via_view = feed_zero_copy(dest_copying(buffer_size=buffer_size), data, read_size, min_free)
    assert len(data) > 2 * size
    assert len(via_view) == len(batches) * reps
    assert_same_events(via_copy, via_view)
    assert_same_events([freeze(b) for b in batches] * reps, via_view)
    for ev in via_view:
        raw = page_payload(ev)
        assert len(raw) == len(ev.indices) * PAGE_SIZE


def test_get_buffer_compacts_partial_frame_to_the_front() -> None:
    dst = dest_copying(buffer_size=10_000)
    batch = raw_pages([1], seed=5)
    data = frame(Kind.PAGES, pages_meta([1], checksum=batch.checksum), batch.payload)
    two = data + data
    assert len(two) < 10_000
    got = feed_zero_copy(dst, two[:6000], read_size=6000)
    assert len(got) == 1 and dst.buffered == 6000 - len(data)
    buf = dst.get_buffer(min_free=9000)  # forces the move of the partial frame
    assert len(buf) == 10_000 - dst.buffered
    buf[:len(two) - 6000] = two[6000:]
    buf.release()
    dst.buffer_updated(len(two) - 6000)
    (ev,) = drain(dst)
    assert_same_event(freeze(batch), ev)
    assert dst.buffered == 0


def test_buffer_updated_beyond_buffer_is_local_error() -> None:
    conn = Connection(Role.DEST, buffer_size=1000)
    buf = conn.get_buffer()
    assert len(buf) == 1000
    buf.release()
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(1001)
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(-1)
    assert conn.buffered == 0


def test_receive_data_more_than_the_buffer_holds_raises_not_hangs() -> None:
    # Before the fix this looped forever once the buffer was full.
    conn = Connection(Role.DEST, buffer_size=1000)
    conn.receive_data(b"P" * 600)
    with pytest.raises(LocalProtocolError, match="buffer"):
        conn.receive_data(b"P" * 600)
    assert conn.buffered == 600  # nothing half-copied
    conn.receive_data(b"P" * 400)  # exactly fills it
    assert conn.buffered == 1000


# --------------------------------------------------------------------------
# page_payload


def received(batch: Pages, meta: dict[str, Any] | None = None, payload: Any = None) -> Pages:
    """Decode ``batch`` (or a doctored frame of it) on a copying DEST."""
    dst = dest_copying()
    m = pages_meta(batch.indices.tolist(), batch.zeros.tolist(),
                   compressed=int(batch.compressed), checksum=batch.checksum)
    m.update(meta or {})
    dst.receive_data(frame(Kind.PAGES, m, batch.payload if payload is None else payload))
    ev = dst.next_event()
    assert isinstance(ev, Pages)
    return ev


@pytest.mark.parametrize("batch", [
    raw_pages([7]),
    raw_pages([0, 1, 2, 3], zeros=[9]),
    lz4_pages([4, 5, 6]),
    lz4_pages([NPAGES - 1], data=page_bytes([1], seed=3)),
    raw_pages([], zeros=[1, 2, 3]),
    raw_pages(list(range(MAX_BATCH_PAGES))),
], ids=["raw1", "raw4+zero", "lz4", "lz4-incompressible", "zeros-only", "full-batch"])
def test_page_payload_accepts_good_batches(batch: Pages) -> None:
    ev = received(batch)
    out = page_payload(ev)
    if batch.compressed:
        expected = lz4.block.decompress(batch.payload, uncompressed_size=len(batch.indices) * PAGE_SIZE)
    else:
        expected = batch.payload
    assert isinstance(out, memoryview)
    assert out.nbytes == len(batch.indices) * PAGE_SIZE
    assert bytes(out) == expected


def test_page_payload_uses_the_given_decompressor() -> None:
    data = page_bytes([1, 2])
    batch = Pages(indices=np.array([1, 2], np.uint32), zeros=np.array([], np.uint32),
                  payload=b"opaque", compressed=True, checksum=xxhash.xxh3_64_intdigest(data))
    calls: list[tuple[bytes, int]] = []

    def codec(payload: Any, raw_len: int) -> bytes:
        calls.append((bytes(payload), raw_len))
        return data

    assert bytes(page_payload(received(batch), codec)) == data
    assert calls == [(b"opaque", 2 * PAGE_SIZE)]

    def broken(payload: Any, raw_len: int) -> bytes:
        raise ValueError("nope")

    with pytest.raises(RemoteProtocolError, match="inflate"):
        page_payload(received(batch), broken)
    with pytest.raises(RemoteProtocolError, match="inflates to"):
        page_payload(received(batch), lambda p, n: data + b"!")


def bad_batches() -> dict[str, tuple[Pages, dict[str, Any], bytes | None, str]]:
    raw = raw_pages([1, 2])
    z = lz4_pages([1, 2])
    bomb_data = bytes(64 * PAGE_SIZE)  # 256 KiB of zeros declared as one page
    bomb = lz4.block.compress(bomb_data, store_size=False)
    short = lz4.block.compress(bytes(PAGE_SIZE), store_size=False)  # one page declared as two
    flipped = bytearray(raw.payload)
    flipped[5000] ^= 1
    return {
        "raw-wrong-checksum": (raw, {"h": raw.checksum ^ 1}, None, "checksum"),
        "raw-bit-flip": (raw, {}, bytes(flipped), "checksum"),
        "lz4-wrong-checksum": (z, {"h": z.checksum + 1}, None, "checksum"),
        "lz4-corrupt-block": (z, {}, b"\xff" * 40, "inflate"),
        "lz4-truncated-block": (z, {}, bytes(z.payload)[:-3], "inflate"),
        "lz4-bomb-declared-small": (lz4_pages([1]), {}, bomb, "inflate"),
        "lz4-inflates-short": (z, {"h": xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))}, short, "inflate"),
        "lz4-random-bytes": (z, {}, bytes(range(256)), "inflate"),
    }


@pytest.mark.parametrize("case", list(bad_batches()))
def test_page_payload_rejects_bad_batches(case: str) -> None:
    batch, meta, payload, match = bad_batches()[case]
    ev = received(batch, meta, payload)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        page_payload(ev)
    assert type(info.value) is RemoteProtocolError
    assert info.value.code is AbortCode.PROTOCOL


# --------------------------------------------------------------------------
# Invalid frames


def fresh() -> Connection:
    return Connection(Role.DEST)


def authenticated() -> Connection:
    pair = Pair()
    pair.handshake()
    return pair.dst


def awaiting_ready() -> Connection:
    pair = Pair()
    pair.handshake()
    pair.exchange(S, BEGIN)
    return pair.dst


def paused() -> Connection:
    dst = dest_copying()
    dst.receive_data(frame(Kind.SWITCHOVER))
    assert isinstance(dst.next_event(), Switchover)
    return dst


def source_copying(requests: int = 0) -> Connection:
    pair = Pair()
    pair.start()
    for k in range(requests):
        pair.exchange(S, DigestRequest(seq=k))
    return pair.src


def begin_meta(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"migration_id": "mig-1", "name": "region", "size": 16 * PAGE_SIZE,
                            "page_size": PAGE_SIZE, "chunk_pages": 4}
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not _DROP}


_DROP = object()
TABLE = np.zeros(NCHUNKS, dtype="<u8").tobytes()
ONE_PAGE = bytes(PAGE_SIZE)
ZERO_SUM = xxhash.xxh3_64_intdigest(ONE_PAGE)


def pages(indices: Any = (1,), zeros: Any = (), *, payload: bytes | None = None, **meta: Any) -> bytes:
    m = pages_meta(indices, zeros, checksum=ZERO_SUM)
    m.update(meta)
    if payload is None:
        payload = ONE_PAGE * len(list(indices))
    return frame(Kind.PAGES, m, payload)


INVALID: dict[str, tuple[Callable[[], Connection], bytes, str]] = {
    # -- framing ---------------------------------------------------------
    "bad-magic": (fresh, raw_frame(Kind.HELLO, magic=b"HT"), "magic"),
    "http-request": (fresh, b"GET / HTTP/1.1\r\n\r\n", "magic"),
    "unknown-kind-0": (fresh, raw_frame(0), "unknown message kind 0"),
    "unknown-kind-26": (dest_copying, raw_frame(26), "unknown message kind 26"),
    "unknown-kind-255": (dest_copying, raw_frame(255), "unknown message kind 255"),
    "nonzero-flags": (dest_copying, raw_frame(Kind.SWITCHOVER, flags=1), "flags"),
    "meta-too-long": (dest_copying, raw_frame(Kind.PAGES, b"", meta_len=MAX_META + 1)[:PREFIX_SIZE],
                      f"{MAX_META + 1} bytes exceeds"),
    "meta-len-max-u32": (fresh, raw_frame(Kind.HELLO, b"", meta_len=2**32 - 1)[:PREFIX_SIZE], "exceeds"),
    "payload-too-long": (dest_copying, raw_frame(Kind.PAGES, b"", payload_len=MAX_PAYLOAD + 1)[:PREFIX_SIZE],
                         f"{MAX_PAYLOAD + 1} bytes exceeds"),
    "payload-len-max-u32": (dest_copying, raw_frame(Kind.PAGES, b"", payload_len=2**32 - 1)[:PREFIX_SIZE],
                            "exceeds"),
    # -- msgpack header --------------------------------------------------
    "meta-array": (dest_copying, raw_frame(Kind.SWITCHOVER, msgpack_bytes([1, 2])), "not a map"),
    "meta-int": (dest_copying, raw_frame(Kind.SWITCHOVER, msgpack_bytes(7)), "not a map"),
    "meta-nil": (dest_copying, raw_frame(Kind.SWITCHOVER, b"\xc0"), "not a map"),
    "meta-empty": (dest_copying, raw_frame(Kind.SWITCHOVER, b""), "msgpack"),
    "meta-garbage": (dest_copying, raw_frame(Kind.SWITCHOVER, b"\xc1"), "msgpack"),
    "meta-truncated": (dest_copying, raw_frame(Kind.SWITCHOVER, b"\x82\xa1i"), "msgpack"),
    "meta-trailing-bytes": (dest_copying, raw_frame(Kind.SWITCHOVER, b"\x80\x80"), "msgpack"),
    "meta-int-keys": (dest_copying, raw_frame(Kind.SWITCHOVER, msgpack_bytes({1: 2})), "msgpack"),
    "meta-bad-utf8": (dest_copying, raw_frame(Kind.SWITCHOVER, b"\x81\xa2\xff\xfe\x01"), "msgpack"),
    "meta-huge-array": (dest_copying, raw_frame(Kind.SWITCHOVER, msgpack_bytes({"x": list(range(65))})),
                        "msgpack"),
    "meta-deep-nesting": (dest_copying, raw_frame(Kind.SWITCHOVER, b"\x91" * 5000 + b"\xc0"), "msgpack"),
    # -- missing fields and wrong types -----------------------------------
    # (a raw batch may come unchecked: sent straight from memory, see test_unchecked_raw_batch)
    "pages-lz4-missing-h": (dest_copying, frame(Kind.PAGES, {"i": u32([1]), "z": b"", "c": 1}, b"\x00" * 16),
                            "compressed PAGES batch without a checksum"),
    "pages-missing-all": (dest_copying, frame(Kind.PAGES, {}, ONE_PAGE), "lacks field"),
    "pages-bytes-keys": (dest_copying, frame(Kind.PAGES, {b"i": u32([1]), b"z": b"", b"c": 0, b"h": 0},
                                             ONE_PAGE), "lacks field"),
    "pages-bool-c": (dest_copying, pages(c=True), "'c' must be an integer"),
    "pages-bool-h": (dest_copying, pages(h=False), "'h' must be an integer"),
    "pages-float-h": (dest_copying, pages(h=1.0), "'h' has type float"),
    "pages-str-i": (dest_copying, frame(Kind.PAGES, {**pages_meta(), "i": "\x01\x00\x00\x00"}, ONE_PAGE),
                    "'i' has type str"),
    "pages-list-i": (dest_copying, frame(Kind.PAGES, {**pages_meta(), "i": [1]}, ONE_PAGE), "'i' has type list"),
    "pages-nil-z": (dest_copying, frame(Kind.PAGES, {**pages_meta([1]), "z": None}, ONE_PAGE), "'z' has type"),
    "pages-c-2": (dest_copying, pages(c=2), "outside"),
    "pages-negative-h": (dest_copying, pages(h=-1), "outside"),
    "digest-request-str-seq": (dest_copying, frame(Kind.DIGEST_REQUEST, {"seq": "1", "final": False}),
                               "'seq' has type str"),
    "digest-request-bool-seq": (dest_copying, frame(Kind.DIGEST_REQUEST, {"seq": True, "final": False}),
                                "'seq' must be an integer"),
    "digest-request-int-final": (dest_copying, frame(Kind.DIGEST_REQUEST, {"seq": 1, "final": 1}),
                                 "'final' has type int"),
    "digest-request-missing-final": (dest_copying, frame(Kind.DIGEST_REQUEST, {"seq": 1}), "lacks field 'final'"),
    "hello-short-nonce": (fresh, frame(Kind.HELLO, {"version": 1, "nonce": b"n" * 31}), "must be 32 bytes"),
    "hello-str-nonce": (fresh, frame(Kind.HELLO, {"version": 1, "nonce": "n" * 32}), "'nonce' has type str"),
    "hello-negative-version": (fresh, frame(Kind.HELLO, {"version": -1, "nonce": SOURCE_NONCE}), "outside"),
    "hello-bool-version": (fresh, frame(Kind.HELLO, {"version": True, "nonce": SOURCE_NONCE}), "integer"),
    "abort-code-256": (dest_copying, frame(Kind.ABORT, {"code": 256, "reason": "x"}), "outside"),
    "abort-reason-bytes": (dest_copying, frame(Kind.ABORT, {"code": 1, "reason": b"x"}), "has type bytes"),
    "abort-reason-too-long": (dest_copying, frame(Kind.ABORT, {"code": 1, "reason": "x" * 4097}), "longer"),
    "commit-negative-checksum": (paused, frame(Kind.COMMIT, {"migration_id": "m", "checksum": -1}), "outside"),
    # -- PAGES contents --------------------------------------------------
    "pages-index-npages": (dest_copying, pages([NPAGES]), f"names page {NPAGES}"),
    "pages-index-max-u32": (dest_copying, pages([2**32 - 1]), "names page 4294967295"),
    "pages-zero-npages": (dest_copying, pages([1], [NPAGES]), f"names page {NPAGES}"),
    "pages-indices-3-bytes": (dest_copying, frame(Kind.PAGES, {**pages_meta(checksum=ZERO_SUM), "i": b"\x01\x00\x00"},
                                                  ONE_PAGE), "whole number"),
    "pages-zeros-5-bytes": (dest_copying, frame(Kind.PAGES, {**pages_meta([1], checksum=ZERO_SUM), "z": b"\0" * 5},
                                                ONE_PAGE), "whole number"),
    "pages-too-many-indices": (dest_copying, pages(range(MAX_BATCH_PAGES + 1), payload=b"", c=1), "exceeds 1024"),
    "pages-too-many-zeros": (dest_copying, pages([], range(MAX_BATCH_PAGES + 1), payload=b""), "exceeds 1024"),
    "pages-too-many-combined": (dest_copying, pages(range(600), range(600, 1200), payload=b"x", c=1),
                                "exceeds 1024"),
    "pages-indices-unsorted": (dest_copying, pages([2, 1]), "'i' is not strictly increasing"),
    "pages-indices-duplicate": (dest_copying, pages([4, 4]), "'i' is not strictly increasing"),
    "pages-zeros-duplicate": (dest_copying, pages([1], [7, 7]), "'z' is not strictly increasing"),
    "pages-empty-batch": (dest_copying, pages([], [], payload=b""), "names no page"),
    "pages-raw-short": (dest_copying, pages([1, 2], payload=ONE_PAGE), "4096 bytes for 2 pages"),
    "pages-raw-long": (dest_copying, pages([1], payload=ONE_PAGE + b"x"), "4097 bytes for 1 pages"),
    "pages-raw-missing": (dest_copying, pages([1], payload=b""), "0 bytes for 1 pages"),
    "pages-zeros-only-with-payload": (dest_copying, pages([], [1], payload=b"x"), "1 bytes for 0 pages"),
    "pages-compressed-no-data": (dest_copying, pages([1], payload=b"", c=1), "without data"),
    "pages-compressed-zeros-only": (dest_copying, pages([], [1], payload=b"x", c=1), "without data"),
    # -- payload where none is allowed ------------------------------------
    "switchover-with-payload": (dest_copying, frame(Kind.SWITCHOVER, {}, b"x"), "must not carry a payload"),
    "digest-request-with-payload": (dest_copying, frame(Kind.DIGEST_REQUEST, {"seq": 1, "final": False}, b"xy"),
                                    "must not carry a payload"),
    "hello-with-payload": (fresh, frame(Kind.HELLO, {"version": 1, "nonce": SOURCE_NONCE}, b"x"),
                           "must not carry a payload"),
    "abort-with-payload": (dest_copying, frame(Kind.ABORT, {"code": 1, "reason": ""}, b"x"),
                           "must not carry a payload"),
    # -- BEGIN -------------------------------------------------------------
    "begin-size-not-page-multiple": (authenticated, frame(Kind.BEGIN, begin_meta(size=5 * PAGE_SIZE + 1)),
                                     "not a multiple"),
    "begin-size-zero": (authenticated, frame(Kind.BEGIN, begin_meta(size=0)), "outside"),
    "begin-size-too-big": (authenticated, frame(Kind.BEGIN, begin_meta(size=(1 << 40) + PAGE_SIZE)), "outside"),
    "begin-page-size-8k": (authenticated, frame(Kind.BEGIN, begin_meta(page_size=8192)), "outside"),
    "begin-name-dotdot": (authenticated, frame(Kind.BEGIN, begin_meta(name="../x")), "plain file name"),
    "begin-name-hidden": (authenticated, frame(Kind.BEGIN, begin_meta(name=".hidden")), "plain file name"),
    "begin-name-slash": (authenticated, frame(Kind.BEGIN, begin_meta(name="a/b")), "plain file name"),
    "begin-name-empty": (authenticated, frame(Kind.BEGIN, begin_meta(name="")), "plain file name"),
    "begin-name-dot": (authenticated, frame(Kind.BEGIN, begin_meta(name=".")), "plain file name"),
    "begin-name-nul": (authenticated, frame(Kind.BEGIN, begin_meta(name="a\0b")), "plain file name"),
    "begin-name-unicode": (authenticated, frame(Kind.BEGIN, begin_meta(name="r\u00e9gion")), "plain file name"),
    "begin-name-too-long": (authenticated, frame(Kind.BEGIN, begin_meta(name="a" * 129)), "longer than 128"),
    "begin-name-bytes": (authenticated, frame(Kind.BEGIN, begin_meta(name=b"region")), "has type bytes"),
    "begin-id-empty": (authenticated, frame(Kind.BEGIN, begin_meta(migration_id="")), "plain token"),
    "begin-id-path": (authenticated, frame(Kind.BEGIN, begin_meta(migration_id="../../etc")), "plain token"),
    "begin-chunk-3": (authenticated, frame(Kind.BEGIN, begin_meta(chunk_pages=3)), "not a power of two"),
    "begin-chunk-96": (authenticated, frame(Kind.BEGIN, begin_meta(chunk_pages=96)), "not a power of two"),
    "begin-chunk-0": (authenticated, frame(Kind.BEGIN, begin_meta(chunk_pages=0)), "outside"),
    "begin-chunk-8192": (authenticated, frame(Kind.BEGIN, begin_meta(chunk_pages=8192)), "outside"),
    "begin-missing-name": (authenticated, frame(Kind.BEGIN, begin_meta(name=_DROP)), "lacks field 'name'"),
    "begin-bool-size": (authenticated, frame(Kind.BEGIN, begin_meta(size=True)), "integer"),
    # -- DIGEST_TABLE --------------------------------------------------------
    "table-short": (lambda: source_copying(1), frame(Kind.DIGEST_TABLE, {"s": 0}, TABLE[:-8]),
                    f"expected {NCHUNKS * 8}"),
    "table-long": (lambda: source_copying(1), frame(Kind.DIGEST_TABLE, {"s": 0}, TABLE + bytes(8)),
                   f"expected {NCHUNKS * 8}"),
    "table-ragged": (lambda: source_copying(1), frame(Kind.DIGEST_TABLE, {"s": 0}, TABLE + b"x"), "expected"),
    "table-empty": (lambda: source_copying(1), frame(Kind.DIGEST_TABLE, {"s": 0}), "expected"),
    "table-unrequested": (source_copying, frame(Kind.DIGEST_TABLE, {"s": 0}, TABLE), "without a request"),
    "table-missing-seq": (lambda: source_copying(1), frame(Kind.DIGEST_TABLE, {}, TABLE), "lacks field 's'"),
    # -- DEVICE_STATE --------------------------------------------------------
    "device-state-skips-ahead": (paused, frame(Kind.DEVICE_STATE, {"o": 5, "t": 10}, b"x"), "expected 0"),
    "device-state-beyond-total": (paused, frame(Kind.DEVICE_STATE, {"o": 0, "t": 3}, b"abcd"),
                                  "past the declared total"),
    "device-state-total-too-big": (paused, frame(Kind.DEVICE_STATE, {"o": 0, "t": MAX_DEVICE_STATE + 1}, b"x"),
                                   "outside"),
    "device-state-negative-offset": (paused, frame(Kind.DEVICE_STATE, {"o": -1, "t": 3}, b"x"), "outside"),
    "device-state-in-copying": (dest_copying, frame(Kind.DEVICE_STATE, {"o": 0, "t": 1}, b"x"),
                                "DEVICE_STATE from the source \\(the peer\\) is not allowed in phase 'copying'"),
    # -- out of phase (message, sender and phase named) -----------------------
    "pages-before-ready": (awaiting_ready, pages([1]),
                           "PAGES from the source \\(the peer\\) is not allowed in phase 'awaiting ready'"),
    "pages-before-hello": (fresh, pages([1]), "PAGES from the source \\(the peer\\) is not allowed in phase 'hello'"),
    "begin-before-auth": (fresh, frame(Kind.BEGIN, begin_meta()), "BEGIN from the source .* phase 'hello'"),
    "second-hello": (awaiting_ready, frame(Kind.HELLO, {"version": 1, "nonce": SOURCE_NONCE}),
                     "HELLO from the source .* phase 'awaiting ready'"),
    "second-begin": (dest_copying, frame(Kind.BEGIN, begin_meta()), "BEGIN from the source .* phase 'copying'"),
    "commit-before-switchover": (dest_copying, frame(Kind.COMMIT, {"migration_id": "mig-1", "checksum": 0}),
                                 "COMMIT from the source \\(the peer\\) is not allowed in phase 'copying'"),
    "query-during-migration": (dest_copying, frame(Kind.QUERY, {"migration_id": "mig-1"}),
                               "QUERY from the source .* phase 'copying'"),
    "switchover-twice": (paused, frame(Kind.SWITCHOVER), "SWITCHOVER from the source .* phase 'paused'"),
    "dest-sends-pages": (source_copying, pages([1]),
                         "PAGES from the dest \\(the peer\\) is not allowed in phase 'copying'"),
    "dest-sends-switchover": (source_copying, frame(Kind.SWITCHOVER),
                              "SWITCHOVER from the dest \\(the peer\\) is not allowed in phase 'copying'"),
    "dest-sends-digest-request": (source_copying, frame(Kind.DIGEST_REQUEST, {"seq": 1, "final": False}),
                                  "DIGEST_REQUEST from the dest .* phase 'copying'"),
    "source-sends-ready": (awaiting_ready, frame(Kind.READY), "READY from the source .* phase 'awaiting ready'"),
    "source-sends-table": (dest_copying, frame(Kind.DIGEST_TABLE, {"s": 0}, TABLE),
                           "DIGEST_TABLE from the source .* phase 'copying'"),
    "source-sends-hello-ack": (fresh, frame(Kind.HELLO_ACK, {"version": 1, "nonce": DEST_NONCE, "mac": b""}),
                               "HELLO_ACK from the source .* phase 'hello'"),
    "source-sends-committed": (paused, frame(Kind.COMMITTED, {"migration_id": "m", "resumed": True}),
                               "COMMITTED from the source .* phase 'paused'"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_frame_is_remote_protocol_error(case: str) -> None:
    make, data, match = INVALID[case]
    conn = make()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        conn.next_event()
    assert type(info.value) is RemoteProtocolError
    assert info.value.code is AbortCode.PROTOCOL


@pytest.mark.parametrize("field,value", [("meta_len", MAX_META + 1), ("payload_len", MAX_PAYLOAD + 1)])
def test_oversized_lengths_rejected_from_prefix_alone(field: str, value: int) -> None:
    dst = dest_copying()
    prefix = raw_frame(Kind.PAGES, b"", **{field: value})[:PREFIX_SIZE]
    dst.receive_data(prefix[:-1])
    assert dst.next_event() is NEED_DATA  # not even a whole prefix yet
    dst.receive_data(prefix[-1:])
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        dst.next_event()
    assert dst.buffered == PREFIX_SIZE  # decided before any body byte arrived


def test_largest_legal_lengths_are_accepted() -> None:
    """The limits are inclusive: MAX_BATCH_PAGES raw pages make MAX_PAYLOAD."""
    batch = raw_pages(list(range(MAX_BATCH_PAGES)))
    dst = dest_copying()
    data = frame(Kind.PAGES, pages_meta(batch.indices.tolist(), checksum=batch.checksum), batch.payload)
    assert struct.unpack_from("<I", data, 8)[0] == MAX_PAYLOAD
    (ev,) = feed(dst, data, [MAX_PAYLOAD // 3 + 1])
    assert_same_event(freeze(batch), ev)


def test_frame_waits_for_its_whole_body() -> None:
    dst = dest_copying()
    batch = raw_pages([4, 5])
    data = frame(Kind.PAGES, pages_meta([4, 5], checksum=batch.checksum), batch.payload)
    dst.receive_data(data[:-1])
    assert dst.next_event() is NEED_DATA
    assert dst.buffered == len(data) - 1
    dst.receive_data(data[-1:])
    (ev,) = drain(dst)
    assert_same_event(freeze(batch), ev)


# --------------------------------------------------------------------------
# Peer closing


@pytest.mark.parametrize("cut", [1, PREFIX_SIZE - 1, PREFIX_SIZE, PREFIX_SIZE + 5, -1])
def test_close_mid_frame_is_remote_protocol_error(cut: int) -> None:
    dst = dest_copying()
    batch = raw_pages([1])
    data = frame(Kind.PAGES, pages_meta([1], checksum=batch.checksum), batch.payload)
    dst.receive_data(data[:cut])
    assert dst.next_event() is NEED_DATA
    dst.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        dst.next_event()


def test_close_between_frames_returns_need_data() -> None:
    dst = dest_copying()
    batch = raw_pages([1])
    data = frame(Kind.PAGES, pages_meta([1], checksum=batch.checksum), batch.payload)
    dst.receive_data(data + frame(Kind.SWITCHOVER))
    dst.receive_data(b"")
    # frames that arrived before the close are still delivered
    first, second = dst.next_event(), dst.next_event()
    assert isinstance(first, Pages) and isinstance(second, Switchover)
    assert dst.next_event() is NEED_DATA
    assert dst.next_event() is NEED_DATA


def test_close_before_anything_returns_need_data() -> None:
    conn = fresh()
    conn.receive_data(b"")
    assert conn.next_event() is NEED_DATA
    assert conn.phase is Phase.HELLO


# --------------------------------------------------------------------------
# LocalProtocolError: the caller sends what the phase does not allow


def sending(phase_setup: Callable[[], Pair], role: Role, event: Event, match: str) -> Pair:
    pair = phase_setup()
    conn = pair.conn(role)
    before = conn.phase
    with pytest.raises(LocalProtocolError, match=match) as info:
        conn.send(event)
    assert type(info.value) is LocalProtocolError
    assert conn.phase is before, "a rejected send must not change the phase"
    return pair


def _new() -> Pair:
    return Pair()


def _started() -> Pair:
    pair = Pair()
    pair.start()
    return pair


def _awaiting_ready() -> Pair:
    pair = Pair()
    pair.handshake()
    pair.exchange(S, BEGIN)
    return pair


def _paused() -> Pair:
    pair = _started()
    pair.exchange(S, Switchover())
    return pair


LOCAL: dict[str, tuple[Callable[[], Pair], Role, Event, str]] = {
    "pages-before-ready": (_awaiting_ready, S, raw_pages([1]),
                           "PAGES from the source \\(we\\) is not allowed in phase 'awaiting ready'"),
    "commit-before-switchover": (_started, S, Commit(migration_id="mig-1", checksum=0),
                                 "COMMIT from the source \\(we\\) is not allowed in phase 'copying'"),
    "dest-sends-hello": (_new, D, Hello(version=1, nonce=SOURCE_NONCE), "HELLO from the dest"),
    "dest-sends-pages": (_started, D, raw_pages([1]), "PAGES from the dest"),
    "source-sends-ready": (_awaiting_ready, S, Ready(), "READY from the source"),
    "begin-before-auth": (_new, S, BEGIN, "BEGIN from the source .* phase 'hello'"),
    "device-state-in-copying": (_started, S, DeviceState(offset=0, total=1, data=b"x"), "DEVICE_STATE"),
    "table-unrequested": (_started, D, DigestTable(seq=0, digests=np.zeros(NCHUNKS, np.uint64)),
                          "without a request"),
    "empty-batch": (_started, S, raw_pages([]), "batch of 0 pages"),
    "batch-too-big": (_started, S, raw_pages([], zeros=list(range(MAX_BATCH_PAGES + 1))), "batch of 1025"),
    "payload-too-big": (_started, S, Pages(indices=np.zeros(1, np.uint32), zeros=np.zeros(0, np.uint32),
                                           payload=bytes(MAX_PAYLOAD + 1)), "exceeds"),
    "device-state-out-of-order": (_paused, S, DeviceState(offset=3, total=10, data=b"x"), "in order"),
    "device-state-too-big": (_paused, S, DeviceState(offset=0, total=MAX_DEVICE_STATE + 1, data=b""),
                             "limit"),
    "abort-after-done": (lambda: _query_done(), S, Abort(code=1, reason=""), "ABORT .* phase 'done'"),
}


def _query_done() -> Pair:
    pair = Pair()
    pair.handshake()
    pair.exchange(S, Query(migration_id="q"))
    pair.exchange(D, Outcome(migration_id="q", committed=False, known=False))
    return pair


@pytest.mark.parametrize("case", list(LOCAL))
def test_local_protocol_error(case: str) -> None:
    setup, role, event, match = LOCAL[case]
    sending(setup, role, event, match)


def test_rejected_sends_leave_no_trace() -> None:
    """A send refused with LocalProtocolError must not half-apply its effects."""
    pair = _started()
    # DEVICE_STATE before SWITCHOVER is refused...
    with pytest.raises(LocalProtocolError):
        pair.src.send(DeviceState(offset=0, total=4, data=b"abcd"))
    # ...so after SWITCHOVER the blob still starts at offset 0.
    pair.exchange(S, Switchover())
    pair.exchange(S, DeviceState(offset=0, total=4, data=b"abcd"))

    pair = Pair()
    pair.handshake()
    # A DIGEST_REQUEST refused before BEGIN must not count as outstanding:
    with pytest.raises(LocalProtocolError):
        pair.src.send(DigestRequest(seq=0))
    pair.exchange(S, BEGIN)
    pair.exchange(D, Ready())
    # the source must still reject a table nobody asked for.
    pair.src.receive_data(frame(Kind.DIGEST_TABLE, {"s": 0}, TABLE))
    with pytest.raises(RemoteProtocolError, match="without a request"):
        pair.src.next_event()

    # A BEGIN refused out of phase must not replace the source's region.
    pair = _started()
    other = Begin(migration_id="other", name="other", size=PAGE_SIZE, chunk_pages=1)
    with pytest.raises(LocalProtocolError):
        pair.src.send(other)
    assert pair.src.begin == BEGIN


def test_digest_requests_are_counted() -> None:
    pair = _started()
    pair.exchange(S, DigestRequest(seq=1))
    pair.exchange(S, DigestRequest(seq=2))
    table = np.arange(NCHUNKS, dtype=np.uint64)
    pair.exchange(D, DigestTable(seq=1, digests=table))
    pair.exchange(D, DigestTable(seq=2, digests=table))
    with pytest.raises(LocalProtocolError, match="without a request"):
        pair.dst.send(DigestTable(seq=3, digests=table))


def test_a_source_receive_buffer_grows_only_as_far_as_a_frame_needs() -> None:
    """A source receives answers and tables: no multi-MiB buffer for a 64 KiB table."""
    npages = 1 << 17  # a 512 MiB region in 1-page chunks: a 1 MiB chunk table
    begin = Begin(migration_id="mig-big", name="big", size=npages * PAGE_SIZE, chunk_pages=1)
    pair = Pair()
    pair.start(begin)
    with pair.src.get_buffer(1) as room:
        assert len(room) <= HANDSHAKE_BUFFER  # still the handshake's after READY
    pair.exchange(S, DigestRequest(seq=1))
    table = np.arange(npages, dtype=np.uint64)
    # As the channel reads: recv_into get_buffer(), 64 KiB at a time.
    got = feed_zero_copy(pair.src, join(pair.dst.send(DigestTable(seq=1, digests=table))), 64 * 1024)
    assert len(got) == 1 and np.array_equal(got[0].digests, table)
    grown = len(pair.src._buf)
    assert npages * 8 <= grown < pair.src.buffer_size  # what the frame needed, not the full 4+ MiB
    with pair.dst.get_buffer(1) as room:
        assert len(room) > 4 * 1024 * 1024  # a destination takes its full buffer at once


# --------------------------------------------------------------------------
# Fuzzing a copying destination

FUZZ_NPAGES = 37  # odd, so indices near the end matter
FUZZ_BEGIN = Begin(migration_id="fz", name="fz", size=FUZZ_NPAGES * PAGE_SIZE, chunk_pages=8)

ints = st.one_of(
    st.integers(-2, 2 * FUZZ_NPAGES),
    st.sampled_from([0, 1, 255, 256, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, -(2**63), MAX_DEVICE_STATE]),
)
page_lists = st.lists(st.integers(0, FUZZ_NPAGES + 2) | st.integers(0, 2**32 - 1), max_size=6).map(u32)
values = st.one_of(
    ints, st.booleans(), st.none(), st.floats(allow_nan=True),
    st.binary(max_size=40), page_lists, st.text(max_size=10),
    st.lists(st.integers(-10, 10), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
FIELDS = ["i", "z", "c", "h", "seq", "final", "s", "o", "t", "migration_id", "checksum", "code", "reason",
          "resumed", "name", "size"]
#: Headers the copying destination accepts, as starting points for the fuzzer.
TEMPLATES: dict[int, dict[str, Any]] = {
    Kind.PAGES: pages_meta([1, 2], [3], checksum=xxhash.xxh3_64_intdigest(ONE_PAGE * 2)),
    Kind.DIGEST_REQUEST: {"seq": 1, "final": False},
    Kind.SWITCHOVER: {},
    Kind.DEVICE_STATE: {"o": 0, "t": 8},
    Kind.COMMIT: {"migration_id": "fz", "checksum": 0},
    Kind.ABORT: {"code": 1, "reason": "x"},
}


def _valid_frames() -> st.SearchStrategy[bytes]:
    """Frames a copying destination accepts (before mutation)."""
    idx = st.lists(st.integers(0, FUZZ_NPAGES - 1), min_size=0, max_size=4).map(lambda v: sorted(set(v)))

    @st.composite
    def pages_frame(draw: Any) -> bytes:
        i, z = draw(idx), draw(idx)
        if not i and not z:
            z = [0]
        data = page_bytes(i, seed=len(i))
        if draw(st.booleans()) and i:
            payload = lz4.block.compress(data, store_size=False)
            c = 1
        else:
            payload, c = data, 0
        return frame(Kind.PAGES, pages_meta(i, z, compressed=c, checksum=xxhash.xxh3_64_intdigest(data)),
                     payload)

    return st.one_of(
        pages_frame(),
        st.builds(lambda s, f: frame(Kind.DIGEST_REQUEST, {"seq": s, "final": f}), st.integers(0, 9), st.booleans()),
        st.just(frame(Kind.SWITCHOVER)),
        st.builds(lambda n: frame(Kind.DEVICE_STATE, {"o": 0, "t": 8}, b"d" * n), st.integers(0, 8)),
        st.just(frame(Kind.COMMIT, {"migration_id": "fz", "checksum": 0})),
        st.just(frame(Kind.ABORT, {"code": 7, "reason": "cancel"})),
    )


VALID_FRAMES = _valid_frames()


@st.composite
def mutated(draw: Any) -> bytes:
    data = bytearray(b"".join(draw(st.lists(VALID_FRAMES, min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
    return bytes(data)


@st.composite
def synthetic(draw: Any) -> bytes:
    """A frame whose header started from a template and had fields edited."""
    pick = draw(st.integers(0, 9))
    if pick < 8:
        kind = draw(st.sampled_from(sorted(TEMPLATES)))
    elif pick == 8:
        kind = draw(st.sampled_from(list(Kind)))
    else:
        kind = draw(st.integers(0, 255))
    meta: dict[Any, Any] = dict(TEMPLATES.get(kind, {}))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(meta) or FIELDS) | st.sampled_from(FIELDS) | st.text(max_size=2))
        if draw(st.integers(0, 3)) == 0:
            meta.pop(key, None)
        else:
            meta[key] = draw(values)
    try:
        meta_bytes = msgpack_bytes(meta)
    except (ValueError, OverflowError):
        meta_bytes = b"\x80"
    if draw(st.booleans()):  # the payload the kind expects
        if kind == Kind.PAGES:
            payload = ONE_PAGE * (len(meta["i"]) // 4 if isinstance(meta.get("i"), bytes) else 0)
        else:
            payload = b"d" * draw(st.integers(0, 8)) if kind == Kind.DEVICE_STATE else b""
    else:
        payload = draw(st.sampled_from([b"", b"x", ONE_PAGE, ONE_PAGE * 2]) | st.binary(max_size=64))
    head = draw(st.sampled_from(["ok"] * 6 + ["meta_len", "payload_len", "flags"]))
    kw: dict[str, int] = {}
    if head == "meta_len":
        kw["meta_len"] = draw(st.integers(0, 2**32 - 1))
    elif head == "payload_len":
        kw["payload_len"] = draw(st.integers(0, 2**32 - 1))
    elif head == "flags":
        kw["flags"] = draw(st.integers(0, 255))
    return raw_frame(int(kind), meta_bytes, payload, **kw)


def _note(label: str) -> None:
    """Label the outcome for ``--hypothesis-show-statistics``."""
    if currently_in_test_context():
        event(label)


def check_fuzz(data: bytes, split: int) -> list[str]:
    """Feed ``data`` to a copying DEST then close; returns what happened.

    The only exception allowed out of the connection (or ``page_payload``)
    is RemoteProtocolError, and decoded batches stay inside the region.
    """
    dst = dest_copying(FUZZ_BEGIN)
    outcome: list[str] = []
    try:
        for piece in [p for p in (data[:split], data[split:]) if p] + [b""]:  # b"": peer closes
            dst.receive_data(piece)
            while True:
                ev = dst.next_event()
                if ev is NEED_DATA:
                    break
                outcome.append(type(ev).__name__)
                _note(f"decoded {type(ev).__name__}")
                if isinstance(ev, Pages):
                    for arr in (ev.indices, ev.zeros):
                        assert arr.dtype == np.dtype("<u4")
                        assert all(int(p) < FUZZ_NPAGES for p in arr)
                    assert 0 < len(ev.indices) + len(ev.zeros) <= MAX_BATCH_PAGES
                    out = page_payload(ev)
                    assert out.nbytes == len(ev.indices) * PAGE_SIZE
                elif isinstance(ev, DigestTable):
                    raise AssertionError("a destination decoded a DIGEST_TABLE")
                elif isinstance(ev, DeviceState):
                    assert 0 <= ev.offset <= ev.offset + len(ev.data) <= ev.total <= MAX_DEVICE_STATE
    except RemoteProtocolError as exc:
        assert type(exc) is RemoteProtocolError
        assert exc.code is AbortCode.PROTOCOL
        outcome.append(f"rejected: {exc}")
        _note("rejected: " + " ".join(w for w in str(exc).split()[:3] if not any(c.isdigit() for c in w)))
    return outcome


FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated(), st.integers(0, 64))
def test_fuzz_mutated_frames(data: bytes, split: int) -> None:
    check_fuzz(data, split)


@FUZZ
@given(st.lists(synthetic(), min_size=1, max_size=3).map(b"".join), st.integers(0, 64))
def test_fuzz_synthetic_frames(data: bytes, split: int) -> None:
    check_fuzz(data, split)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_after_magic(tail: bytes) -> None:
    check_fuzz(b"PC" + tail, 3)


def test_fuzz_harness_sees_valid_pages() -> None:
    """Guard against a vacuous fuzz: good frames decode, bad ones are seen rejected."""
    batch = raw_pages([FUZZ_NPAGES - 1], zeros=[0])
    good = frame(Kind.PAGES, pages_meta([FUZZ_NPAGES - 1], [0], checksum=batch.checksum), batch.payload)
    assert check_fuzz(good + frame(Kind.SWITCHOVER), 5) == ["Pages", "Switchover"]
    outside = frame(Kind.PAGES, pages_meta([FUZZ_NPAGES], checksum=batch.checksum), batch.payload)
    (result,) = check_fuzz(outside, 0)
    assert result.startswith("rejected: PAGES names page 37")
    (result,) = check_fuzz(good[:-1], 0)
    assert "middle of a frame" in result


# --------------------------------------------------------------------------
# encode_frame


def test_encode_frame_layout() -> None:
    bufs = encode_frame(Kind.PAGES, {"a": 1}, b"xyz")
    head = bytes(bufs[0])
    magic, kind, flags, meta_len, payload_len = struct.unpack_from("<2sBBII", head)
    assert (magic, kind, flags) == (b"PC", Kind.PAGES, 0)
    assert meta_len == len(msgpack.packb({"a": 1})) and payload_len == 3
    assert head[PREFIX_SIZE:] == msgpack.packb({"a": 1})
    assert bufs[1] == b"xyz"
    assert len(encode_frame(Kind.SWITCHOVER)) == 1  # no empty payload buffer


def test_begin_whose_digest_table_would_not_fit_a_frame_is_rejected() -> None:
    """1 TiB in 4 KiB chunks would need a 2 GiB digest table: refused at BEGIN."""
    from precopy.errors import RemoteProtocolError as _RPE
    from precopy.protocol import MAX_PAYLOAD as _MP

    pair = Pair()
    pair.handshake()
    huge = 1 << 40
    data = join(pair.src.send(Begin(migration_id="m1", name="big", size=huge, chunk_pages=1)))
    with pytest.raises(_RPE, match="digest table"):
        feed(pair.dst, data)
    # The largest chunk count that fits is accepted.
    pair = Pair()
    pair.handshake()
    ok = Begin(migration_id="m2", name="big", size=(_MP // 8) * 32 * 4096, chunk_pages=32)
    assert len(feed(pair.dst, join(pair.src.send(ok)))) == 1


# --------------------------------------------------------------------------
# Chunk digests in place of the batch checksum


def chunked(indices: list[int], *, digests: Any = None) -> tuple[Pages, dict[str, Any]]:
    """A raw batch carrying the chunk digests of its bytes (``digests`` overrides them)."""
    data = page_bytes(indices)
    step = CHUNK_PAGES * PAGE_SIZE
    cd = [xxhash.xxh3_64_intdigest(data[o:o + step]) for o in range(0, len(data), step)]
    cd_bytes = np.array(cd if digests is None else digests, dtype="<u8").tobytes()
    batch = Pages(indices=np.asarray(indices, np.uint32), zeros=np.zeros(0, np.uint32), payload=data,
                  checksum=0, chunk_digests=np.frombuffer(cd_bytes, dtype="<u8"))
    return batch, {"cd": cd_bytes}


@pytest.mark.parametrize("indices", [
    list(range(CHUNK_PAGES)),
    list(range(3 * CHUNK_PAGES, 5 * CHUNK_PAGES)),
    list(range(NPAGES - CHUNK_PAGES, NPAGES)),
], ids=["first-chunk", "two-chunks", "last-chunk"])
def test_whole_chunk_batches_carry_checked_chunk_digests(indices: list[int]) -> None:
    batch, meta = chunked(indices)
    ev = received(batch, meta)
    assert ev.chunk_digests is not None and (ev.chunk_digests == batch.chunk_digests).all()
    assert bytes(page_payload(ev, chunk_pages=CHUNK_PAGES)) == batch.payload
    with pytest.raises(ValueError, match="chunk_pages"):
        page_payload(ev)  # a receiver that forgot the chunk size must not skip the check


def test_chunk_digests_round_trip_through_endpoints() -> None:
    pair = Pair()
    pair.start()
    batch, _ = chunked(list(range(CHUNK_PAGES, 2 * CHUNK_PAGES)))
    (ev,) = pair.send(Role.SOURCE, batch)
    assert isinstance(ev, Pages) and ev.checksum == 0
    assert ev.chunk_digests is not None and (ev.chunk_digests == batch.chunk_digests).all()
    assert bytes(page_payload(ev, chunk_pages=CHUNK_PAGES)) == batch.payload


def test_whole_chunks() -> None:
    from precopy.protocol import whole_chunks
    a = np.arange
    assert whole_chunks(a(0, 64, dtype=np.uint32), 32, 100) == (0, 2)
    assert whole_chunks(a(96, 100, dtype=np.uint32), 32, 100) == (3, 4)  # the short last chunk
    assert whole_chunks(a(32, 80, dtype=np.uint32), 32, 100) is None  # ends mid-chunk
    assert whole_chunks(a(1, 33, dtype=np.uint32), 32, 100) is None  # starts mid-chunk
    assert whole_chunks(np.array([0, 2] + list(range(3, 33)), dtype=np.uint32), 32, 100) is None  # a gap
    assert whole_chunks(a(0, 0, dtype=np.uint32), 32, 100) is None


def test_bad_chunk_digests_are_refused() -> None:
    idx = list(range(CHUNK_PAGES))
    batch, meta = chunked(idx)
    flipped = bytearray(batch.payload)
    flipped[4321] ^= 1
    with pytest.raises(RemoteProtocolError, match="checksum mismatch") as info:
        page_payload(received(batch, meta, bytes(flipped)), chunk_pages=CHUNK_PAGES)
    assert info.value.code is AbortCode.PROTOCOL
    wrong, wmeta = chunked(idx, digests=[12345])
    with pytest.raises(RemoteProtocolError, match="checksum mismatch"):
        page_payload(received(wrong, wmeta), chunk_pages=CHUNK_PAGES)
    dst = dest_copying()
    m = pages_meta(list(range(1, CHUNK_PAGES + 1)))
    m["cd"] = bytes(8)
    dst.receive_data(frame(Kind.PAGES, m, page_bytes(list(range(1, CHUNK_PAGES + 1)))))
    with pytest.raises(RemoteProtocolError, match="not whole chunks"):
        dst.next_event()
    dst = dest_copying()
    m = pages_meta(idx)
    m["cd"] = bytes(16)
    dst.receive_data(frame(Kind.PAGES, m, page_bytes(idx)))
    with pytest.raises(RemoteProtocolError, match="2 chunk digests for 1 chunks"):
        dst.next_event()


# --------------------------------------------------------------------------
# Pages sent straight from memory, and the destination's page digests


def test_unchecked_raw_batch_is_accepted_as_is() -> None:
    """A raw batch sent straight from memory carries no checksum: its bytes are
    taken as they are (the destination's digests of them become the record)."""
    data = page_bytes([5, 6])
    batch = Pages(indices=np.array([5, 6], np.uint32), zeros=np.zeros(0, np.uint32), payload=data, checksum=None)
    pair = Pair()
    pair.start()
    (ev,) = pair.send(Role.SOURCE, batch)
    assert isinstance(ev, Pages) and ev.checksum is None and ev.chunk_digests is None
    assert bytes(page_payload(ev)) == data


def test_compressed_batch_must_be_checked_on_both_sides() -> None:
    src = Pair()
    src.start()
    z = lz4_pages([4, 5])
    bad = Pages(indices=z.indices, zeros=z.zeros, payload=z.payload, compressed=True, checksum=None)
    with pytest.raises(LocalProtocolError, match="checksum"):
        src.src.send(bad)


def test_page_digest_request_round_trip_and_table_sizes() -> None:
    """A request for the pages of some chunks is answered with one digest per page
    (the region's short last chunk counted short); the table's size is checked
    on both sides, and answers come in the order of the requests."""
    pair = Pair()
    pair.start()
    chunks = np.array([0, 5, NCHUNKS - 1], dtype=np.uint32)
    (req,) = pair.send(Role.SOURCE, DigestRequest(seq=1, pages_of=chunks))
    assert isinstance(req, DigestRequest) and req.pages_of is not None and (req.pages_of == chunks).all()
    (plain,) = pair.send(Role.SOURCE, DigestRequest(seq=2))
    assert plain.pages_of is None
    npages_asked = 3 * CHUNK_PAGES - (NCHUNKS * CHUNK_PAGES - NPAGES)
    with pytest.raises(LocalProtocolError, match="answers a request"):
        pair.dst.send(DigestTable(seq=1, digests=np.zeros(NCHUNKS, dtype=np.uint64)))  # the chunk table's size
    (tab,) = pair.send(Role.DEST, DigestTable(seq=1, digests=np.arange(npages_asked, dtype=np.uint64)))
    assert len(tab.digests) == npages_asked
    (tab2,) = pair.send(Role.DEST, DigestTable(seq=2, digests=np.zeros(NCHUNKS, dtype=np.uint64)))
    assert len(tab2.digests) == NCHUNKS


def test_page_digest_table_of_the_wrong_size_is_refused_by_the_source() -> None:
    pair = Pair()
    pair.start()
    pair.send(Role.SOURCE, DigestRequest(seq=1, pages_of=np.array([2], dtype=np.uint32)))
    pair.dst._expected_tables[0] = NCHUNKS  # a destination that answers with the wrong table
    data = join(pair.dst.send(DigestTable(seq=1, digests=np.zeros(NCHUNKS, dtype=np.uint64))))
    pair.src.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=f"the {CHUNK_PAGES} digests asked for"):
        pair.src.next_event()


@pytest.mark.parametrize("chunks, match", [
    ([], "pages of 0 chunks"),
    ([3, 2], "not strictly increasing"),
    ([1, 1], "not strictly increasing"),
    ([NCHUNKS], f"names chunk {NCHUNKS}"),
], ids=["empty", "decreasing", "repeated", "out-of-range"])
def test_bad_page_digest_requests_are_refused(chunks: list[int], match: str) -> None:
    dst = dest_copying()
    dst.receive_data(frame(Kind.DIGEST_REQUEST, {"seq": 1, "final": False, "p": u32(chunks)}))
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()
    pair = Pair()
    pair.start()
    with pytest.raises(LocalProtocolError, match=match):
        pair.src.send(DigestRequest(seq=1, pages_of=np.asarray(chunks, dtype=np.uint32)))


def test_chunk_tables_by_page_round_trip_and_stay_by_page() -> None:
    """``bp`` asks for chunk digests by page; once asked, every later chunk table is by page
    (page-digest requests are unaffected), on the sending side as on the receiving one."""
    pair = Pair()
    pair.start()
    (plain,) = pair.send(Role.SOURCE, DigestRequest(seq=1))
    assert not plain.by_page
    (req,) = pair.send(Role.SOURCE, DigestRequest(seq=2, by_page=True))
    assert isinstance(req, DigestRequest) and req.by_page and req.pages_of is None
    (pages,) = pair.send(Role.SOURCE, DigestRequest(seq=3, pages_of=np.array([1], dtype=np.uint32)))
    assert not pages.by_page and pages.pages_of is not None
    (final,) = pair.send(Role.SOURCE, DigestRequest(seq=4, final=True, by_page=True))
    assert final.by_page and final.final
    with pytest.raises(LocalProtocolError, match="stay by page"):
        pair.src.send(DigestRequest(seq=5))
    dst = dest_copying()
    dst.receive_data(frame(Kind.DIGEST_REQUEST, {"seq": 1, "final": False, "bp": True}))
    assert dst.next_event().by_page  # type: ignore[union-attr]
    dst.receive_data(frame(Kind.DIGEST_REQUEST, {"seq": 2, "final": True}))
    with pytest.raises(RemoteProtocolError, match="stay by page"):
        dst.next_event()


@pytest.mark.parametrize("meta, match", [
    ({"bp": True, "p": u32([1])}, "at once"),
    ({"bp": 1}, "bp"),
], ids=["with-pages-of", "not-a-boolean"])
def test_bad_by_page_requests_are_refused(meta: dict[str, Any], match: str) -> None:
    dst = dest_copying()
    dst.receive_data(frame(Kind.DIGEST_REQUEST, {"seq": 1, "final": False, **meta}))
    with pytest.raises(RemoteProtocolError, match=match):
        dst.next_event()
    if "p" in meta:
        pair = Pair()
        pair.start()
        with pytest.raises(LocalProtocolError, match=match):
            pair.src.send(DigestRequest(seq=1, by_page=True, pages_of=np.array([1], dtype=np.uint32)))
        assert not pair.src._by_page  # a refused send leaves no trace


# --------------------------------------------------------------------------
# Payloads received in place (Connection.payload_sink)


class RegionSink:
    """A destination region as a NumPy array; the sink takes runs of pages whose ``allowed`` is set."""

    def __init__(self) -> None:
        self.region = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
        self.allowed = np.ones(NPAGES, dtype=bool)
        self.asked: list[list[int]] = []

    def __call__(self, indices: np.ndarray) -> memoryview | None:
        self.asked.append(indices.tolist())
        first, last = int(indices[0]), int(indices[-1])
        if last - first + 1 != len(indices) or not self.allowed[first:last + 1].all():
            return None
        return self.region[first:last + 1].reshape(-1).data


def sink_batches() -> list[Any]:
    return [
        raw_pages(list(range(10, 26)), seed=1),  # a run: in place
        raw_pages([3, 7, 9], zeros=[1], seed=2),  # scattered: the buffer
        lz4_pages(list(range(40, 44))),  # compressed: the buffer, the sink not asked
        DigestRequest(seq=1),
        Pages(indices=np.zeros(0, dtype=np.uint32), zeros=np.array([5, 6], dtype=np.uint32),
              payload=b"", checksum=xxhash.xxh3_64_intdigest(b"")),  # zeros only
        raw_pages(list(range(100, 356)), seed=3),  # 1 MiB run
        raw_pages(list(range(600, 604)), seed=4),  # a run the sink declines (see allowed)
        raw_pages([NPAGES - 1], seed=5),  # the last page
    ]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 70_000), min_size=1, max_size=8))
def test_payload_sink_receives_runs_in_place(sizes: list[int]) -> None:
    """Runs of raw pages land where the sink says, whatever the read sizes;
    everything else arrives as without a sink.  (After a payload the sink
    declined, reads are no longer limited to the frame: a run that then
    arrives whole in the buffer is taken from there.)"""
    batches = sink_batches()
    sink = RegionSink()
    sink.allowed[600:604] = False
    pair = Pair()
    pair.start()
    pair.dst.payload_sink = sink
    data = b"".join(join(pair.src.send(b)) for b in batches)
    got: list[Any] = []
    pos = k = 0
    while pos < len(data):
        buf = pair.dst.get_buffer()
        n = min(len(buf), sizes[k % len(sizes)], len(data) - pos)
        assert n > 0, "get_buffer() returned no room"
        buf[:n] = data[pos:pos + n]
        buf.release()
        pair.dst.buffer_updated(n)
        pos, k = pos + n, k + 1
        while (ev := pair.dst.next_event()) is not NEED_DATA:
            if isinstance(ev, Pages):
                if batches[len(got)] is batches[0]:
                    assert ev.in_place  # reads limited to the frame from the start
                if ev.in_place:
                    assert batches[len(got)] is batches[0] or batches[len(got)] is batches[5] \
                        or batches[len(got)] is batches[7]
                    first = int(ev.indices[0])
                    assert bytes(sink.region[first:first + len(ev.indices)]) == bytes(ev.payload)
                ev = dataclasses.replace(freeze(ev), in_place=False)
            got.append(freeze(ev))
    assert_same_events([freeze(b) for b in batches], got)
    assert [40, 41, 42, 43] not in sink.asked  # compressed: never offered
    assert not sink.region[600:604].any()  # declined: not written there


def test_with_a_sink_the_buffer_asks_for_no_more_than_the_frame_in_progress() -> None:
    """Headers are read on their own, so no payload is read into the buffer only to be copied out."""
    pair = Pair()
    pair.start()
    sink = RegionSink()
    pair.dst.payload_sink = sink
    batch = raw_pages(list(range(8, 16)), seed=6)
    data = join(pair.src.send(batch))
    assert len(pair.dst.get_buffer()) == PREFIX_SIZE
    pair.dst.receive_data(data[:PREFIX_SIZE])
    head = len(data) - len(batch.payload)
    assert len(pair.dst.get_buffer()) == head - PREFIX_SIZE  # the header's meta
    pair.dst.receive_data(data[PREFIX_SIZE:head])
    assert pair.dst.next_event() is NEED_DATA
    buf = pair.dst.get_buffer()
    assert len(buf) == len(batch.payload)  # the rest of the payload, into the region itself
    buf[:] = data[head:]
    buf.release()
    pair.dst.buffer_updated(len(batch.payload))
    ev = pair.dst.next_event()
    assert isinstance(ev, Pages) and ev.in_place
    assert bytes(sink.region[8:16]) == batch.payload


def test_once_the_sink_declines_reads_are_as_large_as_the_buffer_until_it_takes_one() -> None:
    """Scattered pages (declined) must not cost a read for each frame's prefix, header and payload."""
    pair = Pair()
    pair.start()
    sink = RegionSink()
    pair.dst.payload_sink = sink
    scattered = raw_pages([3, 7, 9], seed=2)
    run = raw_pages(list(range(10, 26)), seed=1)
    data = join(pair.src.send(scattered))
    head = len(data) - len(scattered.payload)
    pair.dst.receive_data(data[:head])  # the header: the sink is asked, and declines
    assert pair.dst.next_event() is NEED_DATA
    free = pair.dst.get_buffer()
    assert len(free) > len(data)  # no longer the frame's rest only
    free.release()
    pair.dst.receive_data(data[head:])
    assert isinstance(pair.dst.next_event(), Pages)
    more = join(pair.src.send(run))
    head = len(more) - len(run.payload)
    pair.dst.receive_data(more[:head])  # a run: the sink takes it, and reads are limited again
    assert pair.dst.next_event() is NEED_DATA
    buf = pair.dst.get_buffer()
    assert len(buf) == len(run.payload)
    buf[:] = more[head:]
    buf.release()
    pair.dst.buffer_updated(len(run.payload))
    ev = pair.dst.next_event()
    assert isinstance(ev, Pages) and ev.in_place and bytes(sink.region[10:26]) == run.payload
    assert len(pair.dst.get_buffer()) == PREFIX_SIZE


def test_a_bad_batch_is_refused_before_the_sink_is_asked() -> None:
    dst = dest_copying()
    sink = RegionSink()
    dst.payload_sink = sink
    bad = frame(Kind.PAGES, pages_meta([NPAGES], checksum=0), bytes(PAGE_SIZE))
    dst.receive_data(bad[:len(bad) - PAGE_SIZE])
    with pytest.raises(RemoteProtocolError, match="page"):
        dst.next_event()
    assert sink.asked == []


def test_close_in_the_middle_of_an_in_place_payload_is_a_remote_error() -> None:
    dst = dest_copying()
    dst.payload_sink = RegionSink()
    batch = raw_pages([20, 21], seed=7)
    data = frame(Kind.PAGES, pages_meta([20, 21], checksum=batch.checksum), batch.payload)
    dst.receive_data(data[:-100])
    assert dst.next_event() is NEED_DATA
    dst.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        dst.next_event()


def test_a_sink_view_of_the_wrong_size_is_a_local_error() -> None:
    dst = dest_copying()
    region = np.zeros(8 * PAGE_SIZE, dtype=np.uint8)
    dst.payload_sink = lambda indices: region.data
    batch = raw_pages([1, 2], seed=8)
    data = frame(Kind.PAGES, pages_meta([1, 2], checksum=batch.checksum), batch.payload)
    dst.receive_data(data[:-1])
    with pytest.raises(LocalProtocolError, match="payload sink"):
        dst.next_event()


def test_release_sink_drops_the_view_of_a_payload_in_progress() -> None:
    """The receiver's region goes away at the end of a migration: the connection
    must not keep a view of it, and must not read the rest of that payload as a frame."""
    dst = dest_copying()
    sink = RegionSink()
    dst.payload_sink = sink
    batch = raw_pages([20, 21], seed=7)
    data = frame(Kind.PAGES, pages_meta([20, 21], checksum=batch.checksum), batch.payload)
    dst.receive_data(data[:-100])
    assert dst.next_event() is NEED_DATA  # the payload goes into the sink's view
    region = sink.region
    dst.release_sink()
    assert dst.payload_sink is None
    assert sys.getrefcount(region) == 3  # sink.region, the local, getrefcount's argument: no view kept
    with pytest.raises(LocalProtocolError, match="abandoned"):
        dst.next_event()


def test_release_sink_between_frames_goes_on_without_a_sink() -> None:
    dst = dest_copying()
    sink = RegionSink()
    dst.payload_sink = sink
    first, second = raw_pages(list(range(10, 14)), seed=1), raw_pages(list(range(30, 34)), seed=2)
    dst.receive_data(frame(Kind.PAGES, pages_meta(list(range(10, 14)), checksum=first.checksum), first.payload))
    assert isinstance(dst.next_event(), Pages)
    dst.release_sink()
    dst.receive_data(frame(Kind.PAGES, pages_meta(list(range(30, 34)), checksum=second.checksum), second.payload))
    ev = dst.next_event()
    assert isinstance(ev, Pages) and not ev.in_place and bytes(ev.payload) == second.payload
    assert [30, 31, 32, 33] not in sink.asked


def test_close_drops_the_receive_buffer_and_refuses_more_data() -> None:
    """A closed connection may live on in a reference cycle: it must not keep its buffer."""
    pair = Pair()
    pair.start()
    batch = raw_pages(list(range(10, 26)), seed=1)
    pair.dst.receive_data(join(pair.src.send(batch)))
    assert isinstance(pair.dst.next_event(), Pages)
    assert len(pair.dst._buf) >= 4 << 20  # a destination's buffer: a frame and more
    pair.dst.close()
    assert len(pair.dst._buf) == 0
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.dst.receive_data(b"x")
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.dst.get_buffer()
    assert pair.dst.next_event() is NEED_DATA
    assert join(pair.dst.send(Abort(int(AbortCode.CANCELLED), "bye")))  # an ABORT can still be sent


def test_an_empty_payload_of_any_shape_frames_as_no_bytes() -> None:
    """A post-copy batch of nothing but zero pages carries ``data[nonzero]``: shape (0, 4096), which
    ``memoryview.cast`` refuses (issue 22: the source's push crashed, the migration in doubt)."""
    empty = np.ascontiguousarray(np.zeros((3, PAGE_SIZE), dtype=np.uint8)[np.zeros(3, dtype=bool)])
    assert empty.shape == (0, PAGE_SIZE)
    meta = {"z": 3}
    assert [bytes(b) for b in encode_frame(Kind.PAGES, meta, empty.data)] == \
        [bytes(b) for b in encode_frame(Kind.PAGES, meta, b"")]
    assert [bytes(b) for b in encode_frame(Kind.PAGES, meta, [empty.data, b"x"])] == \
        [bytes(b) for b in encode_frame(Kind.PAGES, meta, b"x")]

"""Post-copy on the wire, without sockets: the capability in HELLO, the new kinds and their checks,
the phases they may come in (two connections back to back, tests/helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol import (
    POSTCOPY_CAP,
    Begin,
    Committed,
    Complete,
    DeviceState,
    Hello,
    HelloAck,
    Kind,
    Missing,
    Pages,
    Phase,
    Postcopy,
    Request,
    Resume,
    Role,
    Switchover,
)
from precopy.protocol.codec import decode_event, encode_event
from precopy.protocol.postcopy_codec import bitmap_of, bitmap_of_mask, decode_resume, pages_of_bitmap

from .helpers import BEGIN, Pair, frame, page_bytes, raw_pages

S, D = Role.SOURCE, Role.DEST


def paused(pair: Pair) -> None:
    pair.start()
    pair.exchange(S, Switchover())


def to_postcopy(pair: Pair, missing: list[int]) -> None:
    """Paused, the bitmap, the device state, POSTCOPY, COMMITTED: both sides in post-copy."""
    paused(pair)
    bits = bitmap_of(np.array(missing, dtype=np.uint32), BEGIN.npages)
    pair.exchange(S, Missing(offset=0, total=len(bits), data=bits))
    pair.exchange(S, DeviceState(offset=0, total=3, data=b"abc"))
    pair.exchange(S, Postcopy(migration_id=BEGIN.migration_id, checksum=7))
    assert pair.src.phase is Phase.POSTCOPY_SENT
    pair.exchange(D, Committed(migration_id=BEGIN.migration_id, resumed=True))
    assert pair.src.phase is pair.dst.phase is Phase.POSTCOPY


def test_hello_caps_round_trip_and_absent_by_default() -> None:
    plain = encode_event(Hello(3, bytes(32)))
    assert "caps" not in plain[1]  # today's bytes: tests/test_wire_bytes.py pins them
    kind, meta, _ = encode_event(Hello(3, bytes(32), caps=(POSTCOPY_CAP,)))
    assert meta["caps"] == ["postcopy"]
    assert decode_event(kind, meta) == Hello(3, bytes(32), caps=("postcopy",))
    kind, meta, _ = encode_event(HelloAck(3, bytes(32), b"", caps=()))
    assert decode_event(kind, meta).caps == ()


@pytest.mark.parametrize("caps", [[1], ["x" * 33], ["ok"] * 17, "postcopy", [""]])
def test_bad_caps_are_refused(caps: object) -> None:
    with pytest.raises(RemoteProtocolError, match="caps"):
        decode_event(Kind.HELLO, {"version": 3, "nonce": bytes(32), "caps": caps})


def test_a_post_copy_conversation_end_to_end() -> None:
    pair = Pair()
    to_postcopy(pair, [1, 5, 9])
    # Pages pushed and requested, the request from the destination, then COMPLETE.
    pair.exchange(S, raw_pages([5]))
    got = pair.exchange(D, Request(indices=np.array([1, 9], dtype=np.uint32)))
    assert got.indices.tolist() == [1, 9]
    pair.exchange(S, raw_pages([1, 9]))
    pair.exchange(D, Complete(migration_id=BEGIN.migration_id, pages=3))
    assert pair.src.phase is pair.dst.phase is Phase.DONE


def test_resume_takes_up_the_page_stream_on_a_new_connection() -> None:
    pair = Pair()
    pair.handshake()
    pair.exchange(S, Resume(begin=BEGIN))
    assert pair.dst.begin == BEGIN and pair.src.phase is Phase.RESUME_SENT
    bits = bitmap_of(np.array([2, 3], dtype=np.uint32), BEGIN.npages)
    got = pair.exchange(D, Missing(offset=0, total=len(bits), data=bits))
    assert pages_of_bitmap(got.data, BEGIN.npages).tolist() == [2, 3]
    from precopy.protocol import Ready
    pair.exchange(D, Ready())
    assert pair.src.phase is Phase.POSTCOPY
    pair.exchange(S, raw_pages([2, 3]))


@pytest.mark.parametrize(("sender", "event", "phase"), [
    (S, Postcopy(migration_id="mig", checksum=0), "copying"),  # not before SWITCHOVER
    (D, Request(indices=np.array([1], dtype=np.uint32)), "paused"),  # not before COMMITTED
    (D, Complete(migration_id="mig", pages=0), "paused"),
])
def test_post_copy_kinds_out_of_phase(sender: Role, event: object, phase: str) -> None:
    pair = Pair()
    pair.start()
    if phase == "paused":
        pair.exchange(S, Switchover())
    with pytest.raises(LocalProtocolError, match="not allowed in phase"):
        pair.conn(sender).send(event)  # type: ignore[arg-type]
    raw = frame(*encode_event(event)[:2])  # type: ignore[arg-type]
    pair.conn(sender.peer).receive_data(raw)
    with pytest.raises(RemoteProtocolError, match="not allowed in phase"):
        pair.conn(sender.peer).next_event()


def test_commit_is_not_allowed_after_postcopy() -> None:
    pair = Pair()
    to_postcopy(pair, [1])
    from precopy.protocol import Commit
    with pytest.raises(LocalProtocolError, match="not allowed"):
        pair.src.send(Commit(migration_id=BEGIN.migration_id, checksum=0))


def missing_frame(offset: int, total: int, data: bytes) -> bytes:
    return frame(Kind.MISSING, {"o": offset, "t": total}, data)


NB = BEGIN.npages // 8  # bytes in BEGIN's bitmap


@pytest.mark.parametrize(("offset", "total", "data", "what"), [
    (0, 1, b"\x01", "bytes for a region"),
    (1, NB, b"\x01", "expected 0"),
    (0, NB, b"\x01" * (NB + 1), "runs past"),
    (0, NB, b"", "empty"),
])
def test_bad_missing_pieces(offset: int, total: int, data: bytes, what: str) -> None:
    pair = Pair()
    paused(pair)
    pair.dst.receive_data(missing_frame(offset, total, data))
    with pytest.raises(RemoteProtocolError, match=what):
        pair.dst.next_event()


def test_missing_past_the_last_page_is_refused() -> None:
    begin = Begin(migration_id="m2", name="g", size=12 * 4096, chunk_pages=4)  # 12 pages: 2 bytes
    pair = Pair()
    pair.start(begin)
    pair.exchange(S, Switchover())
    pair.dst.receive_data(missing_frame(0, 2, b"\x00\x10"))  # page 12
    with pytest.raises(RemoteProtocolError, match="past the end"):
        pair.dst.next_event()
    with pytest.raises(LocalProtocolError, match="past the end"):
        pair.src.send(Missing(offset=0, total=2, data=b"\x00\x10"))


def test_missing_pieces_go_in_order() -> None:
    pair = Pair()
    paused(pair)
    pair.exchange(S, Missing(offset=0, total=NB, data=b"\x01" * 4))
    with pytest.raises(LocalProtocolError, match="expected 4"):
        pair.src.send(Missing(offset=0, total=NB, data=b"\x01" * 4))
    pair.exchange(S, Missing(offset=4, total=NB, data=b"\x01" * (NB - 4)))


@pytest.mark.parametrize(("raw", "what"), [
    (b"\x01\x00\x00", "whole number"),
    (b"", "names 0 pages"),
    (np.array([3, 2], dtype="<u4").tobytes(), "strictly increasing"),
    (np.array([BEGIN.npages], dtype="<u4").tobytes(), f"region has {BEGIN.npages} pages"),
    (np.arange(1025, dtype="<u4").tobytes(), "names 1025 pages"),
])
def test_bad_requests(raw: bytes, what: str) -> None:
    pair = Pair()
    to_postcopy(pair, [1])
    pair.src.receive_data(frame(Kind.REQUEST, {"i": raw}))
    with pytest.raises(RemoteProtocolError, match=what):
        pair.src.next_event()


def test_resume_fields_are_checked_as_begin_s() -> None:
    kind, meta, _ = encode_event(Resume(begin=BEGIN))
    assert kind is Kind.RESUME and decode_resume(meta) == Resume(begin=Begin(
        migration_id=BEGIN.migration_id, name=BEGIN.name, size=BEGIN.size, chunk_pages=BEGIN.chunk_pages,
        streams=BEGIN.streams))
    with pytest.raises(RemoteProtocolError, match="RESUME"):
        decode_resume({**meta, "name": "../x"})
    with pytest.raises(RemoteProtocolError, match="RESUME"):
        decode_resume({**meta, "size": 4097})


def test_pages_in_post_copy_are_checked_as_ever() -> None:
    pair = Pair()
    to_postcopy(pair, [1])
    n = BEGIN.npages
    bad = Pages(indices=np.array([n], dtype=np.uint32), zeros=np.zeros(0, dtype=np.uint32),
                payload=page_bytes([n]), checksum=None)
    pair.dst.receive_data(frame(*encode_event(bad)[:2], bad.payload))
    with pytest.raises(RemoteProtocolError, match=f"region has {n} pages"):
        pair.dst.next_event()


def test_bitmap_helpers() -> None:
    pages = np.array([0, 7, 8, 63], dtype=np.uint32)
    bits = bitmap_of(pages, 64)
    assert len(bits) == 8 and bits[0] == 0x81 and bits[1] == 0x01 and bits[7] == 0x80
    assert pages_of_bitmap(bits, 64).tolist() == pages.tolist()
    for n in (64, 61, 1):  # a mask gives the same bitmap, for any region size
        mask = np.zeros(n, dtype=bool)
        mask[pages[pages < n]] = True
        assert bitmap_of_mask(mask) == bitmap_of(pages[pages < n], n)

"""The destination's queue on the wire (issue 29): BEGIN ``wait``, QUEUED, DIGEST_TABLE ``o``.

Pure, h11 style: two connections back to back in memory, invalid frames
hand-made.  The extension is optional fields of version 3 plus a kind sent
only to a source that offered to wait: old and new peers interoperate.
"""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from .helpers import BEGIN, NCHUNKS, S, D, Pair, frame, join
from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol import DigestRequest, DigestTable, Kind, Phase, Queued, Ready
from precopy.protocol.limits import MAX_QUEUE, PREFIX_SIZE

WAITING = dataclasses.replace(BEGIN, wait=True)


def _queued_pair(begin=WAITING) -> Pair:
    pair = Pair()
    pair.handshake()
    pair.exchange(S, begin)
    return pair


def test_a_queued_migration_hears_its_position_until_ready() -> None:
    pair = _queued_pair()
    for pos in (3, 3, 2, 1):
        assert pair.exchange(D, Queued(position=pos, active=1, limit=1)) == Queued(pos, 1, 1)
        assert pair.src.phase is pair.dst.phase is Phase.BEGIN_SENT
    pair.exchange(D, Ready())
    assert pair.src.phase is pair.dst.phase is Phase.COPYING
    with pytest.raises(LocalProtocolError, match="QUEUED from the dest .* phase 'copying'"):
        pair.dst.send(Queued(position=1, active=1, limit=1))


def test_begin_carries_wait_only_when_set() -> None:
    """A source that cannot wait sends the BEGIN of before the queue, byte for byte."""
    for begin, present in ((BEGIN, False), (WAITING, True)):
        pair = Pair()
        pair.handshake()
        data = join(pair.src.send(begin))
        head = msgpack.unpackb(data[PREFIX_SIZE:], raw=False)
        assert ("wait" in head) is present
        pair.dst.receive_data(data)
        assert pair.dst.next_event().wait is present


@pytest.mark.parametrize("begin", [BEGIN, dataclasses.replace(WAITING, dry_run=True)],
                         ids=["no-wait", "dry-run"])
def test_queued_to_a_begin_that_did_not_offer_to_wait_is_refused(begin) -> None:
    pair = _queued_pair(begin)
    with pytest.raises(LocalProtocolError, match="did not offer to wait"):
        pair.dst.send(Queued(position=1, active=1, limit=1))
    assert pair.dst.phase is Phase.BEGIN_SENT  # a refused send leaves no trace
    # ... and the source refuses one that arrives anyway (an old source would not know the kind).
    pair.src.receive_data(frame(Kind.QUEUED, {"position": 1, "active": 1, "limit": 1}))
    with pytest.raises(RemoteProtocolError, match="did not offer to wait"):
        pair.src.next_event()


@pytest.mark.parametrize("meta,match", [
    ({"active": 1, "limit": 1}, "lacks field 'position'"),
    ({"position": 0, "active": 1, "limit": 1}, "outside"),
    ({"position": MAX_QUEUE + 1, "active": 1, "limit": 1}, "outside"),
    ({"position": 1, "active": -1, "limit": 1}, "outside"),
    ({"position": 1, "active": 1, "limit": 0}, "outside"),
    ({"position": True, "active": 1, "limit": 1}, "must be an integer"),
    ({"position": "1", "active": 1, "limit": 1}, "has type str"),
])
def test_bad_queued_frames_are_protocol_errors(meta, match) -> None:
    pair = _queued_pair()
    pair.src.receive_data(frame(Kind.QUEUED, meta))
    with pytest.raises(RemoteProtocolError, match=match):
        pair.src.next_event()


def test_queued_with_a_payload_is_refused_from_the_prefix() -> None:
    pair = _queued_pair()
    pair.src.receive_data(frame(Kind.QUEUED, {"position": 1, "active": 1, "limit": 1}, b"x"))
    with pytest.raises(RemoteProtocolError, match="must not carry a payload"):
        pair.src.next_event()


def test_only_the_destination_sends_queued() -> None:
    pair = _queued_pair()
    with pytest.raises(LocalProtocolError, match="QUEUED from the source"):
        pair.src.send(Queued(position=1, active=1, limit=1))
    pair.dst.receive_data(frame(Kind.QUEUED, {"position": 1, "active": 1, "limit": 1}))
    with pytest.raises(RemoteProtocolError, match="QUEUED from the source"):
        pair.dst.next_event()


def test_queued_before_begin_is_refused() -> None:
    pair = Pair()
    pair.handshake()
    pair.src.receive_data(frame(Kind.QUEUED, {"position": 1, "active": 1, "limit": 1}))
    with pytest.raises(RemoteProtocolError, match="not allowed in phase 'authenticated'"):
        pair.src.next_event()


def test_bad_begin_wait_is_refused() -> None:
    pair = Pair()
    pair.handshake()
    meta = {"migration_id": "mig-1", "name": "region", "size": BEGIN.size, "page_size": 4096,
            "chunk_pages": BEGIN.chunk_pages, "wait": 1}
    pair.dst.receive_data(frame(Kind.BEGIN, meta))
    with pytest.raises(RemoteProtocolError, match="'wait' must be a boolean"):
        pair.dst.next_event()


@pytest.mark.parametrize("others", [None, 0, 7])
def test_digest_tables_may_say_how_many_other_migrations_the_destination_receives(others) -> None:
    pair = Pair()
    pair.start()
    pair.exchange(S, DigestRequest(seq=0))
    (table,) = pair.send(D, DigestTable(seq=0, digests=np.arange(NCHUNKS, dtype=np.uint64), others=others))
    assert table.others == others and list(table.digests) == list(range(NCHUNKS))


def test_a_bad_others_count_is_a_protocol_error() -> None:
    pair = Pair()
    pair.start()
    pair.exchange(S, DigestRequest(seq=0))
    pair.src.receive_data(frame(Kind.DIGEST_TABLE, {"s": 0, "o": -1}, bytes(8 * NCHUNKS)))
    with pytest.raises(RemoteProtocolError, match="'o'=-1 outside"):
        pair.src.next_event()

"""The streams extension of the protocol (issue 21), without sockets.

BEGIN/READY ``streams``, JOIN/JOINED on an extra connection that then
carries PAGES only, checked against the JOIN's geometry; SYNC's counts;
the source's stripe partition and its router (:class:`Streams`, over fake
channels): which stream a batch goes on, the SYNC before a digest request
and COMMIT.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from precopy.errors import LocalProtocolError, RemoteProtocolError
from precopy.protocol import (
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Auth,
    AuthOk,
    Begin,
    Commit,
    Connection,
    DigestRequest,
    Hello,
    HelloAck,
    Join,
    Joined,
    Pages,
    Phase,
    Ready,
    Role,
    Sync,
)
from precopy.protocol.codec import encode_event
from precopy.protocol.framing import encode_frame
from precopy.session.options import default_streams
from precopy.session.streams import Streams, split_at_stripes, stream_of, stripe_pages

NPAGES = 4096


def deliver(src: Connection, dst: Connection, ev: Any) -> Any:
    dst.receive_data(b"".join(bytes(memoryview(b).cast("B")) for b in src.send(ev)))
    return dst.next_event()


def authenticated() -> tuple[Connection, Connection]:
    s, d = Connection(Role.SOURCE, buffer_size=256 * 1024), Connection(Role.DEST, buffer_size=256 * 1024)
    deliver(s, d, Hello(PROTOCOL_VERSION, bytes(32)))
    deliver(d, s, HelloAck(PROTOCOL_VERSION, bytes(32), b""))
    deliver(s, d, Auth(mac=b""))
    deliver(d, s, AuthOk())
    return s, d


def begun(streams: int, took: int) -> tuple[Connection, Connection]:
    s, d = authenticated()
    deliver(s, d, Begin(migration_id="m", name="r", size=NPAGES * PAGE_SIZE, streams=streams))
    got = deliver(d, s, Ready(streams=took))
    assert got.streams == took and s.streams == d.streams == took
    return s, d


def pages(*idx: int) -> Pages:
    return Pages(indices=np.array(idx, dtype=np.uint32), zeros=np.zeros(0, np.uint32),
                 payload=bytes(PAGE_SIZE * len(idx)), checksum=None)


def test_an_extra_stream_joins_and_carries_pages_checked_against_its_join() -> None:
    s, d = authenticated()
    join = Join(migration_id="m-1", stream=3, size=NPAGES * PAGE_SIZE, chunk_pages=32)
    assert deliver(s, d, join) == join
    assert isinstance(deliver(d, s, Joined()), Joined)
    assert s.phase is d.phase is Phase.STREAMING
    got = deliver(s, d, pages(0, 5, NPAGES - 1))
    assert list(got.indices) == [0, 5, NPAGES - 1]
    # A page outside the region the JOIN named is refused like on the first connection.
    frame = b"".join(bytes(b) for b in encode_frame(*encode_event(pages(NPAGES))))
    d.receive_data(frame)
    with pytest.raises(RemoteProtocolError, match=f"names page {NPAGES} but the region has {NPAGES} pages"):
        d.next_event()
    # Nothing but PAGES on it: the control conversation stays on the first connection.
    with pytest.raises(LocalProtocolError, match="DIGEST_REQUEST from the source .* not allowed in phase 'streaming'"):
        s.send(DigestRequest(seq=1))


@pytest.mark.parametrize("meta, error", [
    ({"stream": 0}, r"'stream'=0 outside \[1, 63\]"),
    ({"stream": 64}, r"'stream'=64 outside"),
    ({"migration_id": "../x"}, "not a plain token"),
    ({"chunk_pages": 3}, "not a power of two"),
    ({"size": 4097}, "not a multiple of 4096"),
])
def test_a_bad_join_is_refused(meta: dict[str, Any], error: str) -> None:
    _, d = authenticated()
    fields = {"migration_id": "m", "stream": 1, "size": NPAGES * PAGE_SIZE, "chunk_pages": 32, **meta}
    d.receive_data(b"".join(bytes(b) for b in encode_frame(18, fields)))
    with pytest.raises(RemoteProtocolError, match=error):
        d.next_event()


def test_ready_takes_no_more_streams_than_begin_asked_for() -> None:
    s, d = authenticated()
    deliver(s, d, Begin(migration_id="m", name="r", size=NPAGES * PAGE_SIZE, streams=2))
    with pytest.raises(LocalProtocolError, match="READY takes 3 streams for a BEGIN that asked for 2"):
        d.send(Ready(streams=3))
    s.receive_data(b"".join(bytes(b) for b in encode_frame(6, {"streams": 3})))
    with pytest.raises(RemoteProtocolError, match="READY takes 3 streams"):
        s.next_event()


def test_sync_counts_one_per_extra_stream_and_never_go_down() -> None:
    s, d = begun(streams=4, took=3)
    assert deliver(s, d, Sync(counts=(2, 0))).counts == (2, 0)
    assert deliver(s, d, Sync(counts=(2, 7))).counts == (2, 7)
    with pytest.raises(LocalProtocolError, match="SYNC counts 3 streams; the migration has 2 extra"):
        s.send(Sync(counts=(2, 7, 0)))
    with pytest.raises(LocalProtocolError, match="go below the last SYNC's"):
        s.send(Sync(counts=(1, 7)))
    d.receive_data(b"".join(bytes(b) for b in encode_frame(20, {"n": [2, 6]})))
    with pytest.raises(RemoteProtocolError, match="go below"):
        d.next_event()


def test_sync_needs_a_migration_of_several_streams() -> None:
    s, d = begun(streams=4, took=1)  # the destination took one: no SYNC
    with pytest.raises(LocalProtocolError, match="SYNC in a migration of one stream"):
        s.send(Sync(counts=(0,)))
    d.receive_data(b"".join(bytes(b) for b in encode_frame(20, {"n": [0]})))
    with pytest.raises(RemoteProtocolError, match="SYNC in a migration of one stream"):
        d.next_event()


@pytest.mark.parametrize("n", [[], [-1], [True], ["1"], list(range(64)), 5])
def test_a_malformed_sync_is_refused(n: Any) -> None:
    _, d = begun(streams=2, took=2)
    d.receive_data(b"".join(bytes(b) for b in encode_frame(20, {"n": n})))
    with pytest.raises(RemoteProtocolError, match="SYNC"):
        d.next_event()


def test_begin_streams_are_bounded() -> None:
    _, d = authenticated()
    d.receive_data(b"".join(bytes(b) for b in encode_frame(5, {
        "migration_id": "m", "name": "r", "size": PAGE_SIZE, "page_size": PAGE_SIZE, "chunk_pages": 32,
        "dry_run": False, "requires": {}, "streams": 65})))
    with pytest.raises(RemoteProtocolError, match=r"'streams'=65 outside \[1, 64\]"):
        d.next_event()


# -- the source's partition and router --------------------------------------


def test_stripes_are_whole_chunks_and_batches_are_cut_where_the_stripe_changes() -> None:
    assert stripe_pages(32) == 1024 and stripe_pages(4096) == 4096
    assert [stream_of(p, 1024, 3) for p in (0, 1023, 1024, 2048, 3072, 5000)] == [0, 0, 1, 2, 0, 1]
    run = np.arange(1000, 1256, dtype=np.uint32)
    scattered = np.array([5, 1023, 1024, 4000], dtype=np.uint32)
    got = list(split_at_stripes([(run, True), (scattered, False)], 1024))
    assert [(list(i[[0, -1]]), r) for i, r in got] == [
        ([1000, 1023], True), ([1024, 1255], True), ([5, 1023], False), ([1024, 1024], False), ([4000, 4000], False)]
    assert list(split_at_stripes([(run, True)], 0))[0][0] is run  # one stream: untouched
    assert default_streams(1) == 1 and default_streams(3) == 3


class FakeChan:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, ev: Any) -> int:
        self.sent.append(ev)
        return 100

    def unsent_bytes(self) -> int:
        return 7

    send_blocked_s = 0.5


def test_the_router_sends_each_stripe_on_its_stream_and_fences_digest_requests_and_commit() -> None:
    chans = [FakeChan(), FakeChan()]
    first = FakeChan()
    st = Streams(chans, 1024)  # type: ignore[arg-type]

    async def go() -> None:
        for lo in (0, 1024, 2048, 3072, 4096):
            await st.send(pages(lo, lo + 1), first.send)
        await st.send(DigestRequest(seq=1), first.send)
        await st.send(DigestRequest(seq=2), first.send)  # nothing new on the extra streams: no SYNC
        await st.send(pages(1030), first.send)
        await st.send(Commit(migration_id="m", checksum=0), first.send)
        with pytest.raises(LocalProtocolError, match="crosses a stripe"):
            await st.send(pages(1023, 1024), first.send)
        # Zero pages only (the region's holes, sent first) are cut at stripes by the router itself.
        await st.send(Pages(indices=np.zeros(0, np.uint32), zeros=np.arange(1000, 2100, dtype=np.uint32),
                            payload=b"", checksum=0), first.send)

    asyncio.run(go())
    assert [list(e.indices) for e in chans[0].sent if len(e.indices)] == [[1024, 1025], [4096, 4097], [1030]]
    assert [list(e.indices) for e in chans[1].sent if len(e.indices)] == [[2048, 2049]]
    kinds = [type(e).__name__ for e in first.sent]
    assert kinds == ["Pages", "Pages", "Sync", "DigestRequest", "DigestRequest", "Sync", "Commit", "Pages"]
    syncs = [e.counts for e in first.sent if isinstance(e, Sync)]
    assert syncs == [(2, 1), (3, 1)]
    zeros = [list(e.zeros[[0, -1]]) for c in (first, *chans) for e in c.sent if isinstance(e, Pages) and len(e.zeros)]
    assert sorted(zeros) == [[1000, 1023], [1024, 2047], [2048, 2099]]
    assert st.unsent_bytes() == 14 and st.send_blocked_s == 1.0

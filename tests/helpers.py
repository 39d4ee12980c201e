"""Shared helpers for the pure wire-protocol tests.

Two :class:`~precopy.protocol.connection.Connection` endpoints wired back to back in
memory (h11/h2 style), a frame factory for hand-made and invalid frames,
and event builders.  No sockets, no threads.

Received events carry views into the receiving connection's buffer that are
only valid until the next receive call, so everything collected here is
*frozen* (copied into owned bytes/arrays) the moment it is decoded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lz4.block
import msgpack
import numpy as np
import xxhash

from precopy.protocol import (
    NEED_DATA,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Auth,
    AuthOk,
    Begin,
    Connection,
    DeviceState,
    DigestTable,
    Event,
    Hello,
    HelloAck,
    Pages,
    Ready,
    Role,
    encode_frame,
)
from precopy.protocol.limits import PREFIX

S, D = Role.SOURCE, Role.DEST

SOURCE_NONCE = bytes(range(32))
DEST_NONCE = bytes(range(100, 132))

#: The migration most tests run: 2048 pages (8 MiB, only declared), 32 chunks.
NPAGES = 2048
CHUNK_PAGES = 64
NCHUNKS = NPAGES // CHUNK_PAGES
BEGIN = Begin(migration_id="mig-1", name="region", size=NPAGES * PAGE_SIZE, chunk_pages=CHUNK_PAGES)

HANDSHAKE: tuple[tuple[Role, Event], ...] = (
    (S, Hello(version=PROTOCOL_VERSION, nonce=SOURCE_NONCE)),
    (D, HelloAck(version=PROTOCOL_VERSION, nonce=DEST_NONCE, mac=b"")),
    (S, Auth(mac=b"")),
    (D, AuthOk()),
)


# --------------------------------------------------------------------------
# Frames


def join(bufs: Iterable[Any]) -> bytes:
    """Concatenate the buffers :meth:`Connection.send` returns."""
    return b"".join(bytes(memoryview(b).cast("B")) for b in bufs)


def frame(kind: int, meta: dict[Any, Any] | None = None, payload: Any = b"") -> bytes:
    """A well-framed frame (the body may still be invalid), as one bytes."""
    return join(encode_frame(kind, meta, payload))


def raw_frame(
    kind: int,
    meta_bytes: bytes = b"\x80",
    payload: bytes = b"",
    *,
    magic: bytes = b"PC",
    flags: int = 0,
    meta_len: int | None = None,
    payload_len: int | None = None,
) -> bytes:
    """A frame built byte by byte: any prefix field may lie."""
    head = PREFIX.pack(
        magic,
        kind,
        flags,
        len(meta_bytes) if meta_len is None else meta_len,
        len(payload) if payload_len is None else payload_len,
    )
    return head + meta_bytes + payload


def u32(values: Iterable[int]) -> bytes:
    return np.asarray(list(values), dtype="<u4").tobytes()


def pages_meta(
    indices: Iterable[int] = (),
    zeros: Iterable[int] = (),
    *,
    compressed: int = 0,
    checksum: int = 0,
) -> dict[str, Any]:
    """The msgpack header of a PAGES frame."""
    return {"i": u32(indices), "z": u32(zeros), "c": compressed, "h": checksum}


# --------------------------------------------------------------------------
# Events


def page_bytes(indices: Sequence[int], seed: int = 0) -> bytes:
    """Deterministic, distinguishable contents for ``indices`` pages."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(len(indices), PAGE_SIZE), dtype=np.uint8)
    for row, page in enumerate(indices):
        out[row, :4] = np.frombuffer(int(page).to_bytes(4, "little"), dtype=np.uint8)
    return out.tobytes()


def raw_pages(indices: Sequence[int], zeros: Sequence[int] = (), seed: int = 0) -> Pages:
    data = page_bytes(indices, seed)
    return Pages(
        indices=np.asarray(indices, dtype=np.uint32),
        zeros=np.asarray(zeros, dtype=np.uint32),
        payload=data,
        compressed=False,
        checksum=xxhash.xxh3_64_intdigest(data),
    )


def lz4_pages(indices: Sequence[int], zeros: Sequence[int] = (), data: bytes | None = None) -> Pages:
    """A compressed batch; ``data`` defaults to compressible page contents."""
    if data is None:
        data = b"".join(bytes([p % 251]) * PAGE_SIZE for p in indices)
    return Pages(
        indices=np.asarray(indices, dtype=np.uint32),
        zeros=np.asarray(zeros, dtype=np.uint32),
        payload=lz4.block.compress(data, store_size=False),
        compressed=True,
        checksum=xxhash.xxh3_64_intdigest(data),
    )


def freeze(ev: Any) -> Any:
    """Copy every buffer view out of a received event."""
    if isinstance(ev, Pages):
        return Pages(
            indices=np.array(ev.indices, copy=True),
            zeros=np.array(ev.zeros, copy=True),
            payload=bytes(ev.payload),
            compressed=ev.compressed,
            checksum=ev.checksum,
            chunk_digests=None if ev.chunk_digests is None else np.array(ev.chunk_digests, copy=True),
        )
    if isinstance(ev, DigestTable):
        return DigestTable(seq=ev.seq, digests=np.array(ev.digests, copy=True), others=ev.others)
    if isinstance(ev, DeviceState):
        return DeviceState(offset=ev.offset, total=ev.total, data=bytes(ev.data))
    return ev


def _norm(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(memoryview(value).cast("B"))
    return value


def assert_same_event(expected: Any, got: Any) -> None:
    """Compare two events field by field (arrays with ``np.array_equal``)."""
    assert type(got) is type(expected), f"expected {type(expected).__name__}, got {type(got).__name__}"
    for f in dataclasses.fields(expected):
        want, have = _norm(getattr(expected, f.name)), _norm(getattr(got, f.name))
        if isinstance(want, np.ndarray) or isinstance(have, np.ndarray):
            assert np.array_equal(np.asarray(want), np.asarray(have)), f"{type(expected).__name__}.{f.name}"
        else:
            assert want == have, f"{type(expected).__name__}.{f.name}: {want!r} != {have!r}"
            assert type(want) is type(have), f"{type(expected).__name__}.{f.name} type"


def assert_same_events(expected: Sequence[Any], got: Sequence[Any]) -> None:
    assert len(got) == len(expected), f"{len(got)} events, expected {len(expected)}: {got!r}"
    for want, have in zip(expected, got):
        assert_same_event(want, have)


# --------------------------------------------------------------------------
# Feeding bytes


def drain(conn: Connection) -> list[Any]:
    """``next_event()`` until NEED_DATA, freezing each event."""
    out: list[Any] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(freeze(ev))


def chunks(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """Split ``data`` cycling through ``sizes`` (each >= 1)."""
    pos, k = 0, 0
    while pos < len(data):
        n = sizes[k % len(sizes)] if sizes else len(data)
        yield data[pos:pos + n]
        pos += n
        k += 1


def feed(conn: Connection, data: bytes, sizes: Sequence[int] = ()) -> list[Any]:
    """Deliver ``data`` with ``receive_data`` in pieces, draining after each."""
    out: list[Any] = []
    for piece in chunks(data, sizes):
        conn.receive_data(piece)
        out.extend(drain(conn))
    return out


def feed_zero_copy(conn: Connection, data: bytes, read_size: int, min_free: int = 1) -> list[Any]:
    """Deliver ``data`` the way the channel does: recv_into ``get_buffer()``."""
    out: list[Any] = []
    pos = 0
    while pos < len(data):
        buf = conn.get_buffer(min_free)
        n = min(len(buf), read_size, len(data) - pos)
        assert n > 0, "get_buffer() returned no room"
        buf[:n] = data[pos:pos + n]
        buf.release()
        conn.buffer_updated(n)
        pos += n
        out.extend(drain(conn))
    return out


# --------------------------------------------------------------------------
# Two endpoints back to back


class Pair:
    """A SOURCE and a DEST connection joined by an in-memory pipe."""

    def __init__(self, buffer_size: int | None = None) -> None:
        kw = {} if buffer_size is None else {"buffer_size": buffer_size}
        self.src = Connection(Role.SOURCE, **kw)
        self.dst = Connection(Role.DEST, **kw)

    def conn(self, role: Role) -> Connection:
        return self.src if role is Role.SOURCE else self.dst

    def send(self, sender: Role, event: Event, sizes: Sequence[int] = ()) -> list[Any]:
        """``sender`` sends ``event``; returns what the other side decoded."""
        data = join(self.conn(sender).send(event))
        return feed(self.conn(sender.peer), data, sizes)

    def exchange(self, sender: Role, event: Event) -> Any:
        """Send one event and check it arrives intact; returns the frozen copy."""
        got = self.send(sender, event)
        assert len(got) == 1, got
        assert_same_event(freeze(event), got[0])
        return got[0]

    def handshake(self) -> None:
        for sender, ev in HANDSHAKE:
            self.exchange(sender, ev)

    def start(self, begin: Begin = BEGIN) -> None:
        """Handshake, BEGIN, READY: both sides copying."""
        self.handshake()
        self.exchange(S, begin)
        self.exchange(D, Ready())


def dest_copying(begin: Begin = BEGIN, buffer_size: int | None = None) -> Connection:
    """A lone DEST connection that has acknowledged ``begin`` (phase COPYING).

    The peer is a scratch SOURCE connection with a small receive buffer (it
    only receives the tiny handshake frames), so this is cheap enough to
    call once per fuzz example.
    """
    kw = {} if buffer_size is None else {"buffer_size": buffer_size}
    dst = Connection(Role.DEST, **kw)
    src = Connection(Role.SOURCE, buffer_size=4096)
    for sender, ev in (*HANDSHAKE, (S, begin), (D, Ready())):
        a, b = (dst, src) if sender is D else (src, dst)
        b.receive_data(join(a.send(ev)))
        assert len(drain(b)) == 1
    return dst


def msgpack_bytes(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)

"""A fast mutation fuzzer for the wire decoder and the destination session.

Hypothesis explores structure well but costs ~1 ms an example; to push
hundreds of thousands of frames through the decoder in CI this module runs a
plain seeded mutation loop instead (AFL-style: bit flips, interesting
integers in the length fields, cuts, splices, duplicated and dropped frames)
seeded from valid transcripts.

* :func:`fuzz_decoder` feeds mutated frame sequences to a lone DEST
  :class:`~precopy.protocol.connection.Connection` in a given phase and checks what comes
  out: only :class:`RemoteProtocolError` may escape, every decoded batch
  lies inside the region and inflates to exactly its declared size.
* :class:`MemChannel` is the real :class:`~precopy.net.channel.Channel` with its
  two socket calls replaced by an in-memory script, so the destination
  server's own handshake and migration code (``_handshake``,
  ``_migrate``, the ``Receiver``) run unmodified on mutated transcripts.
"""

from __future__ import annotations

import random
from collections import deque
import time
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import numpy as np
import xxhash

from precopy.protocol import auth
from precopy.net.channel import Channel
from precopy.errors import AbortCode, RemoteProtocolError
from precopy.protocol import (
    MAX_BATCH_PAGES,
    MAX_DEVICE_STATE,
    NEED_DATA,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    Begin,
    Commit,
    Connection,
    DeviceState,
    DigestRequest,
    DigestTable,
    Hello,
    Pages,
    Role,
    Switchover,
    encode_frame,
    page_payload,
)

KEY = b"fuzzing-key-0123456789abcdef0123"
SOURCE_NONCE = bytes(range(32))
DEST_NONCE = bytes(range(64, 96))

INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 12, 255, 256, 4095, 4096, 4097, 65535, 65536, 65537,
                   (1 << 22) - 1, 1 << 22, (1 << 22) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]


def join(bufs: list[Any]) -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in bufs)


def random_pages(rng: random.Random, npages: int, compress: bool) -> Pages:
    count = rng.randint(0, min(8, npages))
    picked = sorted(rng.sample(range(npages), count))
    cut = rng.randint(0, len(picked))
    idx, zeros = picked[:cut], picked[cut:]
    if not idx and not zeros:
        zeros = [rng.randrange(npages)]
    data = bytearray(len(idx) * PAGE_SIZE)
    for k, p in enumerate(idx):
        fill = rng.randrange(256)
        data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] = bytes([fill]) * PAGE_SIZE
        data[k * PAGE_SIZE:k * PAGE_SIZE + 8] = rng.randbytes(8)
    raw = bytes(data)
    payload: bytes = raw
    c = False
    if compress and idx:
        payload, c = lz4.block.compress(raw, store_size=False), True
    checksum: int | None = xxhash.xxh3_64_intdigest(raw)
    if not c and rng.random() < 0.2:
        checksum = None  # sent straight from memory: unchecked
    return Pages(indices=np.asarray(idx, dtype=np.uint32), zeros=np.asarray(zeros, dtype=np.uint32),
                 payload=payload, compressed=c, checksum=checksum)


def chunk_pages_batch(rng: random.Random, begin: Begin) -> Pages:
    """A batch of whole chunks carrying their chunk digests (as a compressed full copy sends)."""
    cp = begin.chunk_pages
    nchunks = -(-begin.npages // cp)
    first = rng.randrange(nchunks)
    count = max(1, min(rng.randint(1, 2), nchunks - first, 1024 // cp))
    idx = np.arange(first * cp, min((first + count) * cp, begin.npages), dtype=np.uint32)
    raw = rng.randbytes(8) * (len(idx) * PAGE_SIZE // 8)
    step = cp * PAGE_SIZE
    cd = np.array([xxhash.xxh3_64_intdigest(raw[o:o + step]) for o in range(0, len(raw), step)], dtype=np.uint64)
    return Pages(indices=idx, zeros=np.zeros(0, np.uint32), payload=raw, checksum=0, chunk_digests=cd)


def transcript(rng: random.Random, begin: Begin, *, key: bytes | None) -> list[bytes]:
    """A valid source transcript for ``begin``: handshake to COMMIT, as frames."""
    npages = begin.npages
    mac = auth.source_mac(key, SOURCE_NONCE, DEST_NONCE) if key is not None else b""
    evs: list[Any] = [Hello(PROTOCOL_VERSION, SOURCE_NONCE), Auth(mac=mac), begin]
    for _ in range(rng.randint(1, 6)):
        evs.append(random_pages(rng, npages, rng.random() < 0.4))
    if rng.random() < 0.3 and begin.chunk_pages <= 1024:
        evs.append(chunk_pages_batch(rng, begin))
    seq = 0
    if rng.random() < 0.5:
        evs.append(DigestRequest(seq=seq))
        seq += 1
    if rng.random() < 0.3:
        nchunks = -(-begin.npages // begin.chunk_pages)
        chunks = sorted(rng.sample(range(nchunks), min(nchunks, rng.randint(1, 4))))
        evs.append(DigestRequest(seq=seq, pages_of=np.asarray(chunks, dtype=np.uint32)))
        seq += 1
    evs.append(Switchover())
    for _ in range(rng.randint(0, 2)):
        evs.append(random_pages(rng, npages, rng.random() < 0.4))
    blob = rng.randbytes(rng.choice([0, 0, 5, 300]))
    pieces = [blob[:len(blob) // 2], blob[len(blob) // 2:]] if blob else []
    off = 0
    for piece in pieces:
        evs.append(DeviceState(offset=off, total=len(blob), data=piece))
        off += len(piece)
    if rng.random() < 0.5:
        evs.append(DigestRequest(seq=seq, final=True))
    evs.append(Commit(migration_id=begin.migration_id, checksum=xxhash.xxh3_64_intdigest(blob)))
    return _frames_no_replies(evs)


def _frames_no_replies(evs: list[Any]) -> list[bytes]:
    # encode_frame directly: the source's own machine would want the
    # destination's replies (READY, DIGEST_TABLE) in between.
    from precopy.protocol.codec import encode_event

    out = []
    for ev in evs:
        kind, meta, payload = encode_event(ev)
        out.append(join(encode_frame(kind, meta, payload)))
    return out


# --------------------------------------------------------------------------
# Mutations


def _set_u32(data: bytearray, pos: int, value: int) -> None:
    if pos + 4 <= len(data):
        data[pos:pos + 4] = value.to_bytes(4, "little")


def mutate_frame(rng: random.Random, frame: bytes, corpus: list[bytes]) -> bytes:
    """One frame, mutated 1-4 times."""
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(12)
        if not data:
            data = bytearray(rng.randbytes(rng.randint(1, 32)))
            continue
        pos = rng.randrange(len(data))
        if op == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:  # a length field lies
            _set_u32(data, rng.choice([4, 8]), rng.choice(INTERESTING_U32))
        elif op == 3:  # the kind byte
            if len(data) > 2:
                data[2] = rng.randrange(20)
        elif op == 4:
            del data[pos:]
        elif op == 5:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 6:
            del data[pos:pos + rng.randint(1, 16)]
        elif op == 7:  # an interesting integer anywhere (msgpack ints, counts)
            _set_u32(data, pos, rng.choice(INTERESTING_U32))
        elif op == 8:  # splice with another frame
            other = rng.choice(corpus)
            cut = rng.randrange(len(other)) if other else 0
            data = data[:pos] + bytearray(other[cut:])
        elif op == 9:  # msgpack type bytes
            data[pos] = rng.choice([0xC0, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0,
                                    0xD3, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x80, 0x90, 0xA0])
        elif op == 10:  # repeat a slice
            n = rng.randint(1, 64)
            data[pos:pos] = data[pos:pos + n] * rng.randint(1, 4)
        else:  # random tail
            data[pos:] = rng.randbytes(rng.randint(0, 64))
    return bytes(data)


def mutate_sequence(rng: random.Random, frames: list[bytes], corpus: list[bytes],
                    keep_prefix: int = 0) -> list[bytes]:
    """Frame-level mutations (drop, duplicate, swap, corrupt) after ``keep_prefix`` frames."""
    out = list(frames)
    for _ in range(rng.randint(1, 3)):
        if len(out) <= keep_prefix:
            out.append(rng.choice(corpus))
            continue
        i = rng.randrange(keep_prefix, len(out))
        op = rng.randrange(6)
        if op == 0:
            del out[i]
        elif op == 1:
            out.insert(i, out[i])
        elif op == 2:
            j = rng.randrange(keep_prefix, len(out))
            out[i], out[j] = out[j], out[i]
        elif op == 3:
            out.insert(i, rng.choice(corpus))
        else:
            out[i] = mutate_frame(rng, out[i], corpus)
    return out


# --------------------------------------------------------------------------
# Decoder fuzzing


@dataclass
class Stats:
    inputs: int = 0
    frames: int = 0
    events: int = 0
    pages_ok: int = 0
    rejected: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)

    def note(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def copying_dest(begin: Begin) -> Connection:
    """A DEST connection that acknowledged ``begin`` (phase COPYING)."""
    from precopy.protocol import AuthOk, HelloAck, Ready

    dst = Connection(Role.DEST)
    for f in _frames_no_replies([Hello(PROTOCOL_VERSION, SOURCE_NONCE)]):
        dst.receive_data(f)
    assert dst.next_event() is not NEED_DATA
    dst.send(HelloAck(PROTOCOL_VERSION, DEST_NONCE, b""))
    dst.receive_data(_frames_no_replies([Auth(mac=b"")])[0])
    assert dst.next_event() is not NEED_DATA
    dst.send(AuthOk())
    dst.receive_data(_frames_no_replies([begin])[0])
    assert dst.next_event() is not NEED_DATA
    dst.send(Ready())
    return dst


def check_decoded(ev: Any, npages: int, stats: Stats, chunk_pages: int = 0) -> None:
    """Invariants of anything the decoder lets through."""
    if isinstance(ev, Pages):
        for arr in (ev.indices, ev.zeros):
            assert arr.dtype == np.dtype("<u4")
            if arr.size:
                assert int(arr.max()) < npages, "a decoded batch names a page outside the region"
        assert 0 < len(ev.indices) + len(ev.zeros) <= MAX_BATCH_PAGES
        if not ev.compressed:
            assert memoryview(ev.payload).nbytes == len(ev.indices) * PAGE_SIZE
        out = page_payload(ev, chunk_pages=chunk_pages)  # may raise RemoteProtocolError (checksum, inflate)
        assert out.nbytes == len(ev.indices) * PAGE_SIZE
        stats.pages_ok += 1
    elif isinstance(ev, DigestTable):
        raise AssertionError("a destination decoded a DIGEST_TABLE")
    elif isinstance(ev, DeviceState):
        assert 0 <= ev.offset <= ev.offset + len(ev.data) <= ev.total <= MAX_DEVICE_STATE


def feed_decoder(dst: Connection, data: bytes, split: int, npages: int, stats: Stats) -> None:
    """Feed ``data`` (in two pieces, then EOF); only RemoteProtocolError may escape."""
    try:
        for piece in [p for p in (data[:split], data[split:]) if p] + [b""]:
            dst.receive_data(piece)
            while True:
                ev = dst.next_event()
                if ev is NEED_DATA:
                    break
                stats.events += 1
                stats.note(type(ev).__name__)
                if isinstance(ev, Abort):
                    return
                check_decoded(ev, npages, stats, dst.begin.chunk_pages if dst.begin else 0)
    except RemoteProtocolError as exc:
        assert type(exc) is RemoteProtocolError, repr(exc)
        assert exc.code is AbortCode.PROTOCOL
        stats.rejected += 1
        stats.note("rejected")


def fuzz_decoder(seed: int, budget_frames: int, begin: Begin) -> Stats:
    """Mutated copying-phase traffic into fresh DEST connections until ``budget_frames``."""
    rng = random.Random(seed)
    stats = Stats()
    corpus: list[bytes] = []
    for _ in range(40):
        corpus.extend(transcript(rng, begin, key=None)[3:])  # the copying-phase frames
    t0 = time.perf_counter()
    base = copying_dest(begin)
    snapshot = (base.phase, base.begin, tuple(base._expected_tables))
    while stats.frames < budget_frames:
        seqlen = rng.randint(1, 4)
        frames = [rng.choice(corpus) for _ in range(seqlen)]
        frames = mutate_sequence(rng, frames, corpus) if rng.random() < 0.5 else \
            [mutate_frame(rng, f, corpus) if rng.random() < 0.7 else f for f in frames]
        data = b"".join(frames)
        # A fresh connection in COPYING (cheap: reuse the allocation, reset state).
        dst = _reset(base, snapshot)
        feed_decoder(dst, data, rng.randint(0, len(data)), begin.npages, stats)
        stats.inputs += 1
        stats.frames += len(frames)
    stats.seconds = time.perf_counter() - t0
    return stats


def _reset(conn: Connection, snapshot: tuple[Any, Any, tuple[int, ...]]) -> Connection:
    """Put a used connection back into the copying phase with an empty buffer."""
    conn.phase, conn.begin = snapshot[0], snapshot[1]
    conn._expected_tables = deque(snapshot[2])
    conn._start = conn._end = 0
    conn._eof = False
    conn._device_received = 0
    conn._device_sent = 0
    return conn


# --------------------------------------------------------------------------
# The destination session over an in-memory channel


class _NoSocket:
    """Stands in for the socket of a :class:`MemChannel` (never touched for I/O)."""

    def getpeername(self) -> tuple[str, int]:
        return ("fuzz", 0)

    def close(self) -> None:
        pass


class MemChannel(Channel):
    """The real channel, reading a scripted byte string instead of a socket.

    ``pieces`` are the read sizes (cycled); what the destination sends is
    decoded by a SOURCE-side parser only far enough to count it.  Pages
    events handed to the session are recorded (copied) so a test can build
    the region the destination must hold.
    """

    def __init__(self, data: bytes, pieces: list[int]) -> None:
        super().__init__(_NoSocket(), Role.DEST)  # type: ignore[arg-type]
        self.data = memoryview(data)
        self.pos = 0
        self.pieces = pieces or [len(data) or 1]
        self.k = 0
        self.sent: list[int] = []
        self.pages: list[Pages] = []
        self.chunk_pages = 0
        self.device: list[bytes] = []
        self.error = ""

    async def _write(self, data: Any) -> None:
        self.sent.append(memoryview(data).nbytes)

    async def _write_all(self, bufs: list[Any]) -> int:
        for b in bufs:
            await self._write(b)
        return sum(memoryview(b).nbytes for b in bufs)

    def _send_now(self, views: list[memoryview]) -> list[memoryview]:
        self.sent.extend(memoryview(v).nbytes for v in views)
        return []

    def _recv_now(self, buf: memoryview) -> int | None:
        return None  # every read goes through _read_into, in the fuzzer's pieces

    async def _read_into(self, buf: memoryview) -> int:
        n = min(len(buf), self.pieces[self.k % len(self.pieces)], len(self.data) - self.pos)
        self.k += 1
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    async def events(self, idle_timeout_s: float | None = None) -> Any:
        async for ev in super().events(idle_timeout_s):
            if isinstance(ev, Pages):
                self.pages.append(Pages(indices=ev.indices.copy(), zeros=ev.zeros.copy(),
                                        payload=bytes(ev.payload), compressed=ev.compressed,
                                        checksum=ev.checksum,
                                        chunk_digests=None if ev.chunk_digests is None else ev.chunk_digests.copy()))
                assert self.conn.begin is not None
                self.chunk_pages = self.conn.begin.chunk_pages
            elif isinstance(ev, DeviceState):
                self.device.append(bytes(ev.data))
            yield ev


def expected_region(npages: int, batches: list[Pages], chunk_pages: int = 0) -> bytes:
    """What a destination that applied ``batches`` in order must hold."""
    model = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    for b in batches:
        if len(b.indices):
            model[b.indices] = np.frombuffer(page_payload(b, chunk_pages=chunk_pages),
                                             dtype=np.uint8).reshape(-1, PAGE_SIZE)
        if len(b.zeros):
            model[b.zeros] = 0
    return model.tobytes()


@dataclass
class SessionStats:
    sessions: int = 0
    frames: int = 0
    committed: int = 0
    rejected: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


async def run_session(server: Any, frames: list[bytes], pieces: list[int]) -> tuple[str, MemChannel]:
    """Drive the server's own handshake and migration code over a :class:`MemChannel`.

    Returns ("committed" | "query" | "rejected: <error type>", channel).
    Anything but a :class:`~precopy.errors.PrecopyError` propagates: a bug.
    """
    from precopy.errors import PrecopyError
    from precopy.protocol import Query

    chan = MemChannel(b"".join(frames), pieces)
    try:
        ev = await server._handshake(chan)
        if isinstance(ev, Query):
            await server._answer_query(chan, ev)
            return "query", chan
        await server._migrate(chan, ev)
        return "committed", chan
    except PrecopyError as exc:
        chan.error = str(exc)
        return f"rejected: {type(exc).__name__}", chan
    finally:
        chan.close()


def check_after_session(server: Any, outcome: str, chan: MemChannel, begin_name_hint: str) -> None:
    """Nothing outside the region: the memory dir holds a complete region or nothing."""
    mdir = server.opts.memory_dir
    names = sorted(p.name for p in mdir.iterdir())
    if outcome == "committed":
        rec = server.results[-1]
        assert rec.outcome == "committed"
        final = mdir / rec.name
        assert names == [rec.name], names
        data = final.read_bytes()
        assert len(data) == rec.size
        assert data == expected_region(rec.size // PAGE_SIZE, chan.pages, chan.chunk_pages), \
            "region differs from the batches sent"
        dev = server.opts.state_dir / f"{rec.name}.device-state"
        assert dev.read_bytes() == b"".join(chan.device)
        final.unlink()
        dev.unlink()
    else:
        assert names == [], f"{outcome} left {names}"
    state_names = sorted(p.name for p in server.opts.state_dir.iterdir() if p.name != ".precopy")
    assert state_names == [], state_names


# --------------------------------------------------------------------------
# The source's decoder, facing a hostile destination


def dest_frames(rng: random.Random, begin: Begin) -> list[bytes]:
    """Frames a destination sends, valid in some source phase."""
    from precopy.protocol import AuthOk, Committed, HelloAck, Outcome, Ready
    from precopy.protocol.codec import encode_event

    nchunks = -(-begin.npages // begin.chunk_pages)
    evs: list[Any] = [
        HelloAck(PROTOCOL_VERSION, DEST_NONCE, rng.randbytes(32)), AuthOk(), Ready(), Ready(existing=True),
        DigestTable(seq=rng.randrange(10), digests=np.frombuffer(rng.randbytes(nchunks * 8), dtype="<u8")),
        Committed(migration_id=begin.migration_id, resumed=True),
        Outcome(migration_id=begin.migration_id, committed=rng.random() < 0.5, known=True),
        Abort(code=rng.randrange(1, 13), reason="no"),
    ]
    out = []
    for ev in evs:
        kind, meta, payload = encode_event(ev)
        out.append(join(encode_frame(kind, meta, payload)))
    return out


def fuzz_source_decoder(seed: int, budget_frames: int, begin: Begin) -> Stats:
    """Mutated destination traffic into SOURCE connections in every phase where it listens."""
    from precopy.protocol import Phase

    rng = random.Random(seed)
    stats = Stats()
    corpus: list[bytes] = []
    for _ in range(20):
        corpus.extend(dest_frames(rng, begin))
    phases = [Phase.HELLO_ACK, Phase.AUTH_OK, Phase.BEGIN_SENT, Phase.COPYING, Phase.PAUSED,
              Phase.COMMIT_SENT, Phase.QUERY_SENT]
    src = Connection(Role.SOURCE)
    src._grow(src.buffer_size)
    nchunks = -(-begin.npages // begin.chunk_pages)
    t0 = time.perf_counter()
    while stats.frames < budget_frames:
        frames = [rng.choice(corpus) for _ in range(rng.randint(1, 3))]
        frames = [mutate_frame(rng, f, corpus) if rng.random() < 0.7 else f for f in frames]
        data = b"".join(frames)
        _reset(src, (rng.choice(phases), begin, (nchunks,) * rng.randint(0, 2)))
        try:
            for piece in [p for p in (data[:len(data) // 2], data[len(data) // 2:]) if p] + [b""]:
                src.receive_data(piece)
                while (ev := src.next_event()) is not NEED_DATA:
                    stats.events += 1
                    stats.note(type(ev).__name__)
                    if isinstance(ev, DigestTable):
                        assert ev.digests.dtype == np.dtype("<u8") and ev.digests.size == nchunks
                    if isinstance(ev, Abort):
                        break
        except RemoteProtocolError as exc:
            assert type(exc) is RemoteProtocolError and exc.code is AbortCode.PROTOCOL
            stats.rejected += 1
            stats.note("rejected")
        stats.inputs += 1
        stats.frames += len(frames)
    stats.seconds = time.perf_counter() - t0
    return stats

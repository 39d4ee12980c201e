"""In-process engine tests: source session and destination server in one event loop.

The workload is a fake that records calls; the test writes the region
through its own ``np.memmap`` (``MAP_SHARED``), so the source sees every
write.  Raw peers speak the protocol with :class:`precopy.protocol.connection.Connection`
over asyncio streams to poke the server with hand-made or invalid frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine

import lz4.block
import numpy as np
import pytest
import uvloop
import xxhash

import precopy.session.scanner
import precopy.session.sender
import precopy.session.source
from precopy.session.destination import DestinationServer, DestOptions
from precopy.memory.digest import StagingBuffer
from precopy.errors import AbortCode, GuestControlError, MigrationAborted
from precopy.session.report import MigrationReport
from precopy.session.source import SourceOptions
from precopy.protocol import (
    MAX_META,
    NEED_DATA,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    AuthOk,
    Begin,
    Connection,
    DigestRequest,
    DigestTable,
    Event,
    Hello,
    HelloAck,
    Kind,
    Outcome,
    Pages,
    Query,
    Ready,
    Role,
    encode_frame,
)
from precopy.protocol.limits import PREFIX

MiB = 1024 * 1024
_h64 = xxhash.xxh3_64_intdigest


# --------------------------------------------------------------------------
# Helpers


def make_region(path: Path, npages: int, seed: int = 0) -> np.memmap:
    """Write a random region (every fifth page zero) and map it MAP_SHARED, writable."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(npages, PAGE_SIZE), dtype=np.uint8)
    data[::5] = 0
    path.write_bytes(data.tobytes())
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=(npages, PAGE_SIZE))


def page_of(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, size=PAGE_SIZE, dtype=np.uint8)


class FakeWorkload:
    """Records calls; ``pause`` may run a hook, raise, and returns ``blob``."""

    def __init__(self, blob: bytes = b"", *, pause_error: Exception | None = None,
                 on_pause: Callable[[], Awaitable[None]] | None = None) -> None:
        self.blob = blob
        self.pause_error = pause_error
        self.on_pause = on_pause
        self.calls: list[str] = []

    def describe(self) -> str:
        return "fake workload"

    async def pause(self) -> bytes:
        self.calls.append("pause")
        if self.on_pause is not None:
            await self.on_pause()
        if self.pause_error is not None:
            raise self.pause_error
        return self.blob

    async def resume(self) -> None:
        self.calls.append("resume")

    async def stop(self) -> None:
        self.calls.append("stop")


class LiveWriter:
    """Dirties random pages of the region from the event loop until stopped."""

    def __init__(self, mm: np.memmap, seed: int = 1, pages_per_tick: int = 8) -> None:
        self.mm = mm
        self.rng = np.random.default_rng(seed)
        self.pages_per_tick = pages_per_tick
        self.writes = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = self.mm.shape[0]
        while not self._stop.is_set():
            idx = self.rng.integers(0, n, self.pages_per_tick)
            self.mm[idx] = self.rng.integers(0, 256, size=(len(idx), PAGE_SIZE), dtype=np.uint8)
            self.writes += 1
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


@contextlib.asynccontextmanager
async def serve(memory_dir: Path, **kw: Any) -> AsyncIterator[DestinationServer]:
    server = DestinationServer(DestOptions(memory_dir=memory_dir, port=0, **kw))
    await server.start()
    task = asyncio.create_task(server.serve_forever())
    try:
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()


def options(server: DestinationServer, path: Path, **kw: Any) -> SourceOptions:
    kw.setdefault("io_timeout_s", 10.0)
    kw.setdefault("connect_timeout_s", 5.0)
    return SourceOptions(host="127.0.0.1", port=server.port, memory=path, **kw)


async def migrate(server: DestinationServer, path: Path, workload: FakeWorkload,
                  **kw: Any) -> MigrationReport:
    return await asyncio.wait_for(precopy.session.source.migrate(options(server, path, **kw), workload), 30)


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def settled(server: DestinationServer) -> None:
    """Wait until no migration on ``server`` is still running."""
    await wait_until(lambda: all(r.outcome != "running" for r in server.results),
                     what="the destination to finish its migrations")


def partials(d: Path) -> list[Path]:
    return sorted(d.glob(".*.partial"))


def new_id() -> str:
    return uuid.uuid4().hex


class RawClient:
    """A hand-driven source: a protocol Connection over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.SOURCE)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, bufs: list[Any]) -> None:
        await self.send_bytes(b"".join(bytes(memoryview(b).cast("B")) for b in bufs))

    async def send(self, ev: Event) -> None:
        await self.send_frame(self.conn.send(ev))

    async def recv(self, timeout: float = 5.0) -> Event | None:
        """The next event, or None when the server closed the connection."""
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                if isinstance(ev, DigestTable):  # views die on the next receive
                    ev = DigestTable(seq=ev.seq, digests=ev.digests.copy())
                return ev  # type: ignore[return-value]
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)
            if not data:
                self.conn.next_event()  # raises if a frame was cut short
                return None

    async def handshake(self) -> None:
        await self.send(Hello(version=PROTOCOL_VERSION, nonce=os.urandom(32)))
        ack = await self.recv()
        assert isinstance(ack, HelloAck) and ack.mac == b"", ack
        await self.send(Auth(mac=b""))
        assert isinstance(await self.recv(), AuthOk)

    async def begin(self, name: str, npages: int, mid: str | None = None) -> Event | None:
        await self.send(Begin(migration_id=mid or new_id(), name=name, size=npages * PAGE_SIZE))
        return await self.recv()

    async def half_close(self) -> None:
        self.writer.write_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def expect_abort_then_eof(c: RawClient, code: AbortCode, timeout: float = 5.0) -> None:
    ev = await c.recv(timeout)
    assert isinstance(ev, Abort), ev
    assert ev.code == code, ev
    assert await c.recv(timeout) is None


async def query(port: int, mid: str) -> Outcome:
    c = await RawClient.connect(port)
    try:
        await c.handshake()
        await c.send(Query(migration_id=mid))
        out = await c.recv()
        assert isinstance(out, Outcome), out
        return out
    finally:
        await c.close()


async def check_normal_migration(server: DestinationServer, work: Path, name: str = "after.mem") -> None:
    """The server still takes a real migration end to end."""
    src = work / name
    mm = make_region(src, 256, seed=7)
    rep = await migrate(server, src, FakeWorkload(b"state"))
    assert rep.outcome == "committed"
    assert (server.opts.memory_dir / name).read_bytes() == src.read_bytes()
    del mm


# --------------------------------------------------------------------------
# Happy path, under both event loops (8)


async def _happy(shm: Path, compress: str, expect_uvloop: bool) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == expect_uvloop
    src = shm / "vm.mem"
    mm = make_region(src, 2048)  # 8 MiB
    blob = os.urandom(1000)
    async with serve(shm / "dest") as server:
        writer = LiveWriter(mm)
        snapshot: dict[str, bytes] = {}

        async def freeze() -> None:
            await writer.stop()
            snapshot["mem"] = src.read_bytes()

        wl = FakeWorkload(blob, on_pause=freeze)
        rep = await migrate(server, src, wl, compress=compress)
        assert rep.outcome == "committed"
        assert wl.calls == ["pause"]  # keep-stopped: no stop, no resume
        assert writer.writes > 0
        got = (shm / "dest" / "vm.mem").read_bytes()
        assert got == snapshot["mem"] == src.read_bytes()
        assert (shm / "dest" / "vm.mem.device-state").read_bytes() == blob
        assert rep.verify_repairs == 0
        assert rep.rounds[0].kind == "full" and rep.rounds[-1].kind == "final"
        # Where each round's sending time went: parts of it, never more.
        for r in rep.rounds:
            assert 0 <= r.send_cpu_wait_seconds <= r.send_seconds + 0.01
            assert 0 <= r.send_blocked_seconds <= r.send_seconds + 1e-6
        assert rep.zero_pages > 0
        assert rep.device_state_bytes == len(blob)
        assert rep.downtime_ms is not None and rep.downtime_ms > 0
        # The estimate that decided the switchover, in parts to hold against phases_ms.
        assert set(rep.expected_phases_ms) == {"final_scan", "final_pages", "verify", "overhead"}
        assert rep.expected_downtime_ms == pytest.approx(sum(rep.expected_phases_ms.values()))
        await settled(server)
        assert [r.outcome for r in server.results] == ["committed"]
        assert not partials(shm / "dest")
    del mm


@pytest.mark.parametrize("compress", ["off", "lz4"])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_live_migration_commits_byte_exact(shm: Path, loop_name: str, compress: str) -> None:
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run if loop_name == "asyncio" else uvloop.run
    run(_happy(shm, compress, loop_name == "uvloop"))


async def test_a_destination_keeps_nothing_of_a_finished_migration(work: Path, dest_dir: Path) -> None:
    """No reference cycle keeps a migration's buffers alive until a full garbage collection
    (a sink closure over the migration did: ~5 MiB a migration on a long-running destination)."""
    import gc

    from precopy.session.receiver import Receiver
    from precopy.session.region_writer import RegionWriter

    src = work / "c.mem"
    mm = make_region(src, 256)
    gc.collect()
    gc.disable()
    try:
        async with serve(dest_dir) as server:
            for _ in range(3):  # into a new region, then into the existing one
                rep = await migrate(server, src, FakeWorkload())
                assert rep.outcome == "committed"
                await settled(server)
            alive = [o for o in gc.get_objects() if isinstance(o, (Receiver, RegionWriter))]
            assert alive == []
    finally:
        gc.enable()
    del mm


async def test_on_commit_kill_stops_the_source_workload(work: Path, dest_dir: Path) -> None:
    src = work / "k.mem"
    mm = make_region(src, 64)
    async with serve(dest_dir) as server:
        wl = FakeWorkload()
        rep = await migrate(server, src, wl, on_commit="kill")
    assert rep.outcome == "committed"
    assert wl.calls == ["pause", "stop"]
    assert (dest_dir / "k.mem").read_bytes() == src.read_bytes()
    del mm


# --------------------------------------------------------------------------
# Invariant 1: a page's digest is recorded from the exact bytes sent (1)


P = 300  # the page flipped A -> B -> A


def _flip_load(mm: np.memmap, should_flip: Callable[[np.ndarray], bool],
               content_b: np.ndarray, stats: dict[str, int]) -> Callable[..., np.ndarray]:
    orig = StagingBuffer.load

    def load(self: StagingBuffer, src: np.ndarray, indices: np.ndarray) -> np.ndarray:
        if bool(np.any(indices == P)):
            stats["loads_with_p"] += 1
            if should_flip(indices):
                a = mm[P].copy()
                mm[P] = content_b
                out = orig(self, src, indices)  # stages B
                mm[P] = a  # live memory is A again
                stats["flips"] += 1
                return out
        return orig(self, src, indices)

    return load


async def test_aba_during_full_copy_is_caught_by_page_digests(
    work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = work / "aba.mem"
    mm = make_region(src, 1024)  # 4 MiB
    content_a = mm[P].copy()
    stats = {"loads_with_p": 0, "flips": 0}
    monkeypatch.setattr(StagingBuffer, "load",
                        _flip_load(mm, lambda idx: stats["flips"] == 0, page_of(99), stats))
    async with serve(dest_dir) as server:
        rep = await migrate(server, src, FakeWorkload(), batch_pages=64)
    assert stats["flips"] == 1
    assert stats["loads_with_p"] >= 2  # P was sent again after the full copy
    assert rep.outcome == "committed"
    got = np.fromfile(dest_dir / "aba.mem", dtype=np.uint8).reshape(-1, PAGE_SIZE)
    assert np.array_equal(got[P], content_a)
    assert (dest_dir / "aba.mem").read_bytes() == src.read_bytes()
    # A digest of live memory (A) would hide the B on the destination until
    # the final chunk comparison, which would count it as a repair.
    assert rep.verify_repairs == 0
    assert sum(r.pages_dirty for r in rep.rounds[1:]) >= 1
    del mm


async def test_aba_during_iterative_round_is_caught_by_page_digests(
    work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = work / "aba2.mem"
    mm = make_region(src, 1024)
    content_a2 = page_of(5)
    stats = {"loads_with_p": 0, "flips": 0, "dirtied": 0}
    flip = _flip_load(mm, lambda idx: stats["loads_with_p"] == 2 and stats["flips"] == 0,
                      page_of(99), stats)

    def load(self: StagingBuffer, src_pages: np.ndarray, indices: np.ndarray) -> np.ndarray:
        # A real write to P during the full copy, after P's batch went out,
        # so P is dirty in round 1 (where its staging is flipped).
        if stats["loads_with_p"] == 1 and not stats["dirtied"] and int(indices[0]) > P:
            mm[P] = content_a2
            stats["dirtied"] = 1
        return flip(self, src_pages, indices)

    monkeypatch.setattr(StagingBuffer, "load", load)
    async with serve(dest_dir) as server:
        # An unreachable budget forces one iterative round, then a forced switchover.
        rep = await migrate(server, src, FakeWorkload(), batch_pages=64, downtime_ms=0.001,
                            max_rounds=1, on_nonconvergence="force")
    assert stats["dirtied"] == 1 and stats["flips"] == 1
    assert stats["loads_with_p"] >= 3  # full copy, round 1 (flipped), final pass
    assert rep.outcome == "committed" and rep.forced
    assert [r.kind for r in rep.rounds] == ["full", "iterative", "final"]
    assert rep.rounds[1].pages_dirty >= 1 and rep.rounds[2].pages_dirty >= 1
    got = np.fromfile(dest_dir / "aba2.mem", dtype=np.uint8).reshape(-1, PAGE_SIZE)
    assert np.array_equal(got[P], content_a2)
    assert (dest_dir / "aba2.mem").read_bytes() == src.read_bytes()
    assert rep.verify_repairs == 0


# --------------------------------------------------------------------------
# Stop-and-copy baseline


async def test_stop_and_copy_pauses_first_and_sends_everything_paused(work: Path, dest_dir: Path) -> None:
    src = work / "snc.mem"
    mm = make_region(src, 300)
    blob = b"device state of a stopped guest"
    writes: list[int] = []

    async def write_at_pause() -> None:  # the last write before the pause must arrive
        mm[7, :8] = 9
        mm.flush()
        writes.append(7)

    wl = FakeWorkload(blob, on_pause=write_at_pause)
    async with serve(dest_dir) as server:
        rep = await migrate(server, src, wl, mode="stop-and-copy", downtime_ms=50)
        await settled(server)
    assert rep.outcome == "committed" and rep.mode == "stop-and-copy"
    assert writes == [7]
    assert [r.kind for r in rep.rounds] == ["final"]  # no full copy, no iterative rounds
    nonzero = sum(1 for i in range(300) if mm[i].any())
    assert rep.rounds[0].pages_sent >= nonzero - 1  # every non-zero page went while paused
    assert rep.downtime_ms is not None and rep.downtime_ms > 0
    assert rep.expected_downtime_ms is None  # no estimate decided when to pause
    assert (dest_dir / "snc.mem").read_bytes() == src.read_bytes()
    assert (dest_dir / "snc.mem.device-state").read_bytes() == blob


def test_source_options_reject_unknown_mode(work: Path) -> None:
    with pytest.raises(ValueError, match="mode must be"):
        SourceOptions(host="127.0.0.1", port=1, memory=work / "x", mode="postcopy")


# --------------------------------------------------------------------------
# Device state (2)


@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 3])
async def test_device_state_passes_through_byte_exact(work: Path, dest_dir: Path, size: int) -> None:
    src = work / "dev.mem"
    mm = make_region(src, 256)
    blob = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    async with serve(dest_dir) as server:
        rep = await migrate(server, src, FakeWorkload(blob))
        await settled(server)
        assert server.results[-1].device_state_bytes == size
    assert rep.outcome == "committed"
    assert rep.device_state_bytes == size
    assert (dest_dir / "dev.mem.device-state").read_bytes() == blob
    assert not list(dest_dir.glob(".*.tmp"))
    del mm


# --------------------------------------------------------------------------
# Rollback (3)


async def test_pause_failure_rolls_back_and_leaves_nothing(work: Path, dest_dir: Path) -> None:
    src = work / "rb.mem"
    mm = make_region(src, 512)
    wl = FakeWorkload(pause_error=GuestControlError("guest refused to pause"))
    async with serve(dest_dir) as server:
        with pytest.raises(MigrationAborted) as ei:
            await migrate(server, src, wl)
        await settled(server)
        assert [r.outcome for r in server.results] == ["aborted"]
        await check_normal_migration(server, work)
    assert ei.value.code == AbortCode.GUEST
    assert ei.value.report.outcome == "aborted"  # type: ignore[attr-defined]
    assert wl.calls == ["pause"]
    assert not (dest_dir / "rb.mem").exists()
    assert not (dest_dir / "rb.mem.device-state").exists()
    assert not partials(dest_dir)
    del mm


async def test_destination_closing_during_full_copy_aborts(
    work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = work / "cut.mem"
    mm = make_region(src, 2048)
    orig = StagingBuffer.load
    closing: list[asyncio.Task[None]] = []
    calls = [0]

    async with serve(dest_dir) as server:
        def load(self: StagingBuffer, s: np.ndarray, indices: np.ndarray) -> np.ndarray:
            calls[0] += 1
            if calls[0] == 4:
                closing.append(asyncio.get_running_loop().create_task(server.close()))
            return orig(self, s, indices)

        monkeypatch.setattr(StagingBuffer, "load", load)
        wl = FakeWorkload()
        with pytest.raises(MigrationAborted) as ei:
            await migrate(server, src, wl, batch_pages=64)
        await asyncio.gather(*closing)
        assert [r.outcome for r in server.results] == ["aborted"]
    assert closing
    assert ei.value.code in (AbortCode.CANCELLED, AbortCode.LINK)
    assert wl.calls == []  # never paused, nothing to resume
    assert not (dest_dir / "cut.mem").exists()
    assert not partials(dest_dir)
    del mm


async def test_destination_closing_at_pause_resumes_workload(work: Path, dest_dir: Path) -> None:
    src = work / "cut2.mem"
    mm = make_region(src, 512)
    async with serve(dest_dir) as server:
        wl = FakeWorkload(b"dev", on_pause=server.close)
        with pytest.raises(MigrationAborted) as ei:
            await migrate(server, src, wl)
        assert [r.outcome for r in server.results] == ["aborted"]
    assert wl.calls == ["pause", "resume"]
    assert ei.value.report.outcome == "aborted"  # type: ignore[attr-defined]
    assert not (dest_dir / "cut2.mem").exists()
    assert not (dest_dir / "cut2.mem.device-state").exists()
    assert not partials(dest_dir)
    del mm


async def test_source_cancelled_mid_migration_aborts_both_sides(
    work: Path, dest_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = work / "cancel.mem"
    mm = make_region(src, 512)
    wl = FakeWorkload()

    async with serve(dest_dir) as server:
        async def hang() -> None:
            await asyncio.sleep(60)

        wl.on_pause = hang
        task = asyncio.create_task(precopy.session.source.migrate(options(server, src), wl))
        await wait_until(lambda: wl.calls == ["pause"], what="the pause")
        task.cancel()
        with pytest.raises(MigrationAborted) as ei:
            await task
        await settled(server)
        assert [r.outcome for r in server.results] == ["aborted"]
    assert "cancel" in str(ei.value)
    assert "cancelled" in (server.results[0].error or "")  # ABORT(CANCELLED) reached the peer
    # pause() never returned, so the session does not consider it paused.
    assert wl.calls == ["pause"]
    assert not partials(dest_dir) and not (dest_dir / "cancel.mem").exists()
    del mm


async def test_cancelled_migration_carries_code_cancelled(work: Path, dest_dir: Path) -> None:
    src = work / "cancel2.mem"
    mm = make_region(src, 64)

    async def hang() -> None:
        await asyncio.sleep(60)

    wl = FakeWorkload(on_pause=hang)
    async with serve(dest_dir) as server:
        task = asyncio.create_task(precopy.session.source.migrate(options(server, src), wl))
        await wait_until(lambda: wl.calls == ["pause"], what="the pause")
        task.cancel()
        with pytest.raises(MigrationAborted) as ei:
            await task
    del mm
    assert ei.value.code == AbortCode.CANCELLED


async def test_serve_forever_returns_after_close(dest_dir: Path) -> None:
    server = DestinationServer(DestOptions(memory_dir=dest_dir, port=0))
    await server.start()
    task = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0.02)
    await server.close()
    try:
        await asyncio.wait_for(asyncio.shield(task), 0.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.done()


# --------------------------------------------------------------------------
# Busy name (4)


async def test_busy_name_rejected_until_the_first_migration_ends(dest_dir: Path) -> None:
    async with serve(dest_dir) as server:
        first = await RawClient.connect(server.port)
        await first.handshake()
        mid1 = new_id()
        assert isinstance(await first.begin("x", 16, mid1), Ready)
        assert (dest_dir / f".x.{mid1}.partial").exists()

        second = await RawClient.connect(server.port)
        await second.handshake()
        await second.send(Begin(migration_id=new_id(), name="x", size=16 * PAGE_SIZE))
        await expect_abort_then_eof(second, AbortCode.BUSY)
        await second.close()

        # A different name is not busy.
        other = await RawClient.connect(server.port)
        await other.handshake()
        assert isinstance(await other.begin("y", 16), Ready)

        # The first is unaffected: it can still talk, then gives up.
        await first.send(DigestRequest(seq=1, final=False))
        table = await first.recv()
        assert isinstance(table, DigestTable) and table.digests.size == 1
        await first.send(Abort(int(AbortCode.CANCELLED), "test done"))
        await first.close()
        await wait_until(lambda: server.results[0].outcome == "aborted", what="first aborted")
        assert not (dest_dir / f".x.{mid1}.partial").exists()

        third = await RawClient.connect(server.port)
        await third.handshake()
        assert isinstance(await third.begin("x", 16), Ready)
        for c in (third, other):
            await c.send(Abort(int(AbortCode.CANCELLED), "test done"))
            await c.close()
        await settled(server)
    assert not partials(dest_dir)
    assert not (dest_dir / "x").exists()


async def test_reused_migration_id_is_busy(work: Path, dest_dir: Path) -> None:
    src = work / "reuse.mem"
    mm = make_region(src, 64)
    async with serve(dest_dir) as server:
        rep = await migrate(server, src, FakeWorkload())
        c = await RawClient.connect(server.port)
        await c.handshake()
        await c.send(Begin(migration_id=rep.migration_id, name="other", size=16 * PAGE_SIZE))
        await expect_abort_then_eof(c, AbortCode.BUSY)
        await c.close()
    assert not (dest_dir / "other").exists()
    del mm


# --------------------------------------------------------------------------
# Bad input never writes (5)


def _u32(*xs: int) -> bytes:
    return np.array(xs, dtype="<u4").tobytes()


@pytest.mark.parametrize("where", ["indices", "zeros"])
async def test_out_of_range_page_aborts_and_removes_partial(
    work: Path, dest_dir: Path, where: str
) -> None:
    payload = page_of(1).tobytes()
    if where == "indices":
        meta = {"i": _u32(16), "z": b"", "c": 0, "h": _h64(payload)}
    else:
        meta = {"i": _u32(3), "z": _u32(16), "c": 0, "h": _h64(payload)}
    async with serve(dest_dir) as server:
        c = await RawClient.connect(server.port)
        await c.handshake()
        mid = new_id()
        assert isinstance(await c.begin("bad", 16, mid), Ready)
        await c.send_frame(encode_frame(Kind.PAGES, meta, payload))
        await expect_abort_then_eof(c, AbortCode.PROTOCOL)
        await c.close()
        await settled(server)
        assert server.results[0].outcome == "aborted"
        assert not partials(dest_dir)
        assert not (dest_dir / "bad").exists()
        out = await query(server.port, mid)
        assert out.known and not out.committed
        await check_normal_migration(server, work)


def _bad_batch(case: str) -> Pages:
    data = page_of(2).tobytes()
    idx = np.array([3], dtype="<u4")
    empty = np.zeros(0, dtype="<u4")
    if case == "checksum":
        return Pages(indices=idx, zeros=empty, payload=data, checksum=_h64(data) ^ 1)
    if case == "lz4-garbage":
        return Pages(indices=idx, zeros=empty, payload=b"\xff" * 200, compressed=True,
                     checksum=_h64(data))
    assert case == "lz4-short"  # inflates to one page where two are declared
    return Pages(indices=np.array([3, 4], dtype="<u4"), zeros=empty,
                 payload=lz4.block.compress(data, store_size=False), compressed=True,
                 checksum=_h64(data + data))


@pytest.mark.parametrize("case", ["checksum", "lz4-garbage", "lz4-short"])
async def test_corrupt_batch_aborts_without_writing(dest_dir: Path, case: str) -> None:
    async with serve(dest_dir, keep_partial=True) as server:
        c = await RawClient.connect(server.port)
        await c.handshake()
        mid = new_id()
        assert isinstance(await c.begin("corrupt", 16, mid), Ready)
        await c.send(_bad_batch(case))
        await expect_abort_then_eof(c, AbortCode.PROTOCOL)
        await c.close()
        await settled(server)
        out = await query(server.port, mid)
    assert out.known and not out.committed
    assert not (dest_dir / "corrupt").exists()
    kept = dest_dir / f".corrupt.{mid}.partial"
    assert kept.read_bytes() == bytes(16 * PAGE_SIZE)  # not one byte written


async def test_unsorted_batch_is_rejected_and_writes_nothing(dest_dir: Path) -> None:
    """Page lists must be strictly increasing: [0, 5, 2] is a protocol error."""
    pages = np.stack([page_of(10), page_of(11), page_of(12)])
    idx = np.array([0, 5, 2], dtype="<u4")
    async with serve(dest_dir, keep_partial=True) as server:
        c = await RawClient.connect(server.port)
        await c.handshake()
        mid = new_id()
        assert isinstance(await c.begin("unsorted", 16, mid), Ready)
        raw = pages.tobytes()
        await c.send(Pages(indices=idx, zeros=np.zeros(0, "<u4"), payload=raw, checksum=_h64(raw)))
        await expect_abort_then_eof(c, AbortCode.PROTOCOL)
        await c.close()
        await settled(server)
    kept = dest_dir / f".unsorted.{mid}.partial"
    assert kept.read_bytes() == bytes(16 * PAGE_SIZE)


# --------------------------------------------------------------------------
# Garbage and truncated handshakes (6)


async def test_garbage_and_truncated_handshakes_are_dropped(work: Path, dest_dir: Path) -> None:
    async with serve(dest_dir, handshake_timeout_s=0.5) as server:
        port = server.port
        hello = b"".join(bytes(memoryview(b).cast("B")) for b in encode_frame(
            Kind.HELLO, {"version": PROTOCOL_VERSION, "nonce": os.urandom(32)}))

        # Random bytes (no magic).
        c = await RawClient.connect(port)
        await c.send_bytes(b"XY" + os.urandom(998))
        await c.half_close()
        await expect_abort_then_eof(c, AbortCode.PROTOCOL)
        await c.close()

        # A prefix declaring a header far over the limit: rejected from the prefix alone.
        c = await RawClient.connect(port)
        await c.send_bytes(PREFIX.pack(b"PC", int(Kind.HELLO), 0, MAX_META + 1, 0))
        await expect_abort_then_eof(c, AbortCode.PROTOCOL)
        await c.close()

        # Half a Hello, then the write side closes.
        c = await RawClient.connect(port)
        await c.send_bytes(hello[: len(hello) // 2])
        await c.half_close()
        await expect_abort_then_eof(c, AbortCode.PROTOCOL)
        await c.close()

        # Half a Hello, then a full close (nothing to read back).
        c = await RawClient.connect(port)
        await c.send_bytes(hello[:20])
        await c.close()

        # A Hello from the future.
        c = await RawClient.connect(port)
        await c.send_frame(encode_frame(Kind.HELLO, {"version": PROTOCOL_VERSION + 1,
                                                     "nonce": os.urandom(32)}))
        await expect_abort_then_eof(c, AbortCode.VERSION)
        await c.close()

        # Silent peers are timed out, also after a valid Hello (the outer
        # wait_for only keeps a broken timeout from hanging the suite).
        silent = await RawClient.connect(port)
        after_hello = await RawClient.connect(port)
        await after_hello.send(Hello(version=PROTOCOL_VERSION, nonce=os.urandom(32)))
        assert isinstance(await after_hello.recv(), HelloAck)
        await asyncio.wait_for(expect_abort_then_eof(silent, AbortCode.TIMEOUT), 30)
        await asyncio.wait_for(expect_abort_then_eof(after_hello, AbortCode.TIMEOUT), 30)
        await silent.close()
        await after_hello.close()

        # A plain socket that connects and goes away at once.
        s = socket.create_connection(("127.0.0.1", port))
        s.close()

        await check_normal_migration(server, work)
        assert [r.outcome for r in server.results] == ["committed"]
    assert not partials(dest_dir)


# --------------------------------------------------------------------------
# Outcome query (7)


async def test_outcome_query_after_commit_and_for_unknown_id(work: Path, dest_dir: Path) -> None:
    src = work / "q.mem"
    mm = make_region(src, 64)
    async with serve(dest_dir) as server:
        rep = await migrate(server, src, FakeWorkload())
        assert rep.outcome == "committed"
        out = await query(server.port, rep.migration_id)
        assert out == Outcome(migration_id=rep.migration_id, committed=True, known=True)
        unknown = new_id()
        out = await query(server.port, unknown)
        assert out == Outcome(migration_id=unknown, committed=False, known=False)
    # The journal is durable: a new server on the same directory still knows.
    async with serve(dest_dir) as server2:
        out = await query(server2.port, rep.migration_id)
        assert out.committed and out.known
    del mm


async def test_silent_peer_during_handshake_is_a_clear_timeout(work: Path) -> None:
    """A port that accepts but never speaks: the source gives up with a message, not a traceback."""
    src = work / "silent.mem"
    mm = make_region(src, 16)
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        opts = SourceOptions(host="127.0.0.1", port=port, memory=src, io_timeout_s=0.5)
        wl = FakeWorkload()
        with pytest.raises(MigrationAborted, match="did not complete the handshake"):
            await precopy.session.source.migrate(opts, wl)
        assert wl.calls == []
        for w in held:
            w.close()
    del mm


async def test_concurrent_migrations_of_different_regions(work: Path, dest_dir: Path) -> None:
    """One daemon serves several migrations at once, each into its own region."""
    regions = [work / f"vm{i}.mem" for i in range(3)]
    maps = [make_region(p, 512, seed=i) for i, p in enumerate(regions)]
    async with serve(dest_dir) as server:
        reports = await asyncio.gather(*(migrate(server, p, FakeWorkload(blob=p.name.encode()))
                                         for p in regions))
    assert [r.outcome for r in reports] == ["committed"] * 3
    for p in regions:
        assert (dest_dir / p.name).read_bytes() == p.read_bytes()
        assert (dest_dir / f"{p.name}.device-state").read_bytes() == p.name.encode()
    assert len({r.migration_id for r in reports}) == 3
    del maps


# --------------------------------------------------------------------------
# Receiving into a region the destination already holds


@pytest.mark.parametrize("old", ["stale", "same", "sparse"])
async def test_existing_region_is_received_into_and_ends_byte_exact(work: Path, shm: Path, old: str) -> None:
    """A region file already under the name, of the right size and unused, is taken
    over: the migration writes into it (holes and zero pages included) and commits
    exactly the source's memory."""
    npages = 8192
    src = work / "vm.mem"
    mm = make_region(src, npages, seed=1)
    dest = shm / "dest"
    dest.mkdir()
    target = dest / "vm.mem"
    if old == "same":
        target.write_bytes(src.read_bytes())
    elif old == "stale":
        make_region(target, npages, seed=99)
    else:  # a sparse earlier copy: most pages are holes, the rest other data
        with open(target, "wb") as f:
            f.truncate(npages * PAGE_SIZE)
            f.seek(100 * PAGE_SIZE)
            f.write(bytes([9]) * 50 * PAGE_SIZE)
    inode = os.stat(target).st_ino
    async with serve(dest) as server:
        writer = LiveWriter(mm, pages_per_tick=1)
        try:
            rep = await migrate(server, src, FakeWorkload(on_pause=writer.stop), downtime_ms=500)
        finally:
            await writer.stop()
    assert rep.outcome == "committed" and rep.dest_region == "existing"
    assert os.stat(target).st_ino == inode  # the same file, not a new one
    assert target.read_bytes() == src.read_bytes()
    assert rep.verify_repairs == 0
    assert server.results[0].reused_region
    if old == "same":  # a repeat migration: what is already there does not move again
        assert rep.pages_already_there >= npages // 2, rep.pages_already_there
        assert rep.bytes_on_wire < npages * PAGE_SIZE // 2
    else:
        assert rep.pages_already_there == 0


async def test_runs_are_received_straight_into_an_existing_region(work: Path, shm: Path) -> None:
    """Into a region whose pages exist, a run of pages is received in place (no
    second copy from the receive buffer into the file); a region with holes
    gets those pages the ordinary way (a write into a hole must be able to fail
    with ENOSPC, not SIGBUS)."""
    npages = 4096
    src = work / "vm.mem"
    src.write_bytes(np.random.default_rng(3).integers(1, 256, npages * PAGE_SIZE, dtype=np.uint8).tobytes())
    dest = shm / "dest"
    dest.mkdir()
    target = dest / "vm.mem"
    with open(target, "wb") as f:  # stale, and a hole over pages 1024..2047
        f.write(bytes([7]) * 1024 * PAGE_SIZE)
        f.seek(2048 * PAGE_SIZE)
        f.write(bytes([8]) * (npages - 2048) * PAGE_SIZE)
    async with serve(dest) as server:
        rep = await migrate(server, src, FakeWorkload())
    assert rep.outcome == "committed" and rep.dest_region == "existing" and rep.verify_repairs == 0
    assert target.read_bytes() == src.read_bytes()
    # Every page outside the hole went in place but for batches read whole into
    # the receive buffer right after the hole's (declined) ones: reads are not
    # limited to the frame again until the sink takes a payload (protocol.Connection).
    in_place = server.results[0].pages_in_place
    assert npages - 1024 - 4 * 256 <= in_place <= npages - 1024


async def test_region_in_use_or_of_another_size_is_not_received_into(work: Path, shm: Path) -> None:
    """A region some process maps (a workload resumed here earlier) keeps its memory;
    one of another size is left alone too: both migrations get a new file."""
    import mmap as _mmap

    npages = 256
    src = work / "vm.mem"
    make_region(src, npages, seed=1)
    dest = shm / "dest"
    dest.mkdir()
    target = dest / "vm.mem"
    make_region(target, npages, seed=5)
    before = target.read_bytes()
    with open(target, "r+b") as f, _mmap.mmap(f.fileno(), 0) as held:
        # This process maps it: users_of() skips its own pid, so map it in a child.
        import subprocess
        import sys
        child = subprocess.Popen([sys.executable, "-c", "import mmap,sys,time\n"
                                  f"f=open({str(target)!r},'r+b'); m=mmap.mmap(f.fileno(),0)\n"
                                  "print('mapped', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"mapped"
            async with serve(dest) as server:
                rep = await migrate(server, src, FakeWorkload())
            assert rep.dest_region == "new"
            assert bytes(held[:]) == before  # the running workload's memory was not touched
        finally:
            child.kill()
            child.wait()
    assert target.read_bytes() == src.read_bytes()  # the commit replaced the name
    other = work / "other.mem"
    make_region(other, npages * 2, seed=2)
    (dest / "other.mem").write_bytes(bytes(PAGE_SIZE * npages))  # half the size
    async with serve(dest) as server:
        rep = await migrate(server, other, FakeWorkload())
    assert rep.dest_region == "new" and (dest / "other.mem").read_bytes() == other.read_bytes()


async def test_no_reuse_regions_always_creates_a_new_file(work: Path, shm: Path) -> None:
    npages = 256
    src = work / "vm.mem"
    make_region(src, npages, seed=1)
    dest = shm / "dest"
    dest.mkdir()
    make_region(dest / "vm.mem", npages, seed=3)
    inode = os.stat(dest / "vm.mem").st_ino
    async with serve(dest, reuse_regions=False) as server:
        rep = await migrate(server, src, FakeWorkload())
    assert rep.dest_region == "new" and os.stat(dest / "vm.mem").st_ino != inode
    assert (dest / "vm.mem").read_bytes() == src.read_bytes()


async def test_dense_dirty_sets_go_as_whole_chunks_and_stay_exact(work: Path, shm: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """When most chunks differ, a scan sends them whole (no per-page pass); with
    every scan forced to, what commits still equals the paused source."""
    monkeypatch.setattr(precopy.session.scanner, "written_fraction", lambda *a: 1.0)
    npages = 2048
    src = work / "vm.mem"
    mm = make_region(src, npages, seed=4)
    async with serve(shm / "dest") as server:
        writer = LiveWriter(mm, pages_per_tick=4)
        snapshot: dict[str, bytes] = {}

        async def freeze() -> None:
            await writer.stop()
            snapshot["mem"] = src.read_bytes()

        try:
            rep = await migrate(server, src, FakeWorkload(on_pause=freeze), downtime_ms=300)
        finally:
            await writer.stop()
    assert rep.outcome == "committed" and rep.verify_repairs == 0
    assert (shm / "dest" / "vm.mem").read_bytes() == snapshot["mem"]


@pytest.mark.parametrize("cand, seen, link_bps, whole", [
    (np.arange(2048), 0.0, 3e9, False),  # every chunk changed, nothing seen yet: look at the pages
    (np.arange(2048), 0.3, 3e9, False),  # ... a third of their pages were written last time: still look
    (np.arange(2048), 0.9, 3e9, True),  # ... most of them: whole (a sweep)
    (np.arange(2048), 0.9, 1e8, False),  # ... but not on a slow link, which page hashing outruns
    (np.arange(0, 2048, 2), 0.0, 3e9, False),  # half the chunks, evenly spread: a page or two each
    (np.arange(300, 1300), 0.0, 3e9, True),  # half the chunks in one run: written through (a sweep)
    (np.arange(300, 1300), 0.0, 1e8, False),  # ... unless the link is slow
])
def test_whether_changed_chunks_go_whole(cand: np.ndarray, seen: float, link_bps: float, whole: bool) -> None:
    """Whole chunks when most of each was written, by the spread of the changed
    chunks or, when every chunk changed, by what the last page pass saw."""
    assert precopy.session.scanner.whole_chunks_pay(cand, 2048, 32, link_bps, seen) is whole


async def test_a_writer_touching_every_chunk_is_scanned_page_by_page(
        work: Path, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page in every chunk every 5 ms: once a scan has seen most chunks change,
    the next live scans go page by page (no chunk pass), rounds send the pages
    written, not every page of the changed chunks (all of them: the region),
    and the migration ends byte exact."""
    npages = 4096
    src = work / "vm.mem"
    mm = make_region(src, npages, seed=6)
    real = precopy.session.scanner.DigestScanner.page_scan
    page_scans: list[int] = []

    async def page_scan(self: Any) -> Any:
        scan = await real(self)
        page_scans.append(len(scan.dirty))
        return scan

    monkeypatch.setattr(precopy.session.scanner.DigestScanner, "page_scan", page_scan)
    stop = asyncio.Event()

    async def scribble() -> None:
        rng = np.random.default_rng(7)
        pages = mm.reshape(npages, PAGE_SIZE)
        while not stop.is_set():
            idx = np.arange(0, npages, 32) + rng.integers(0, 32, npages // 32)
            pages[idx, :8] = rng.integers(0, 256, (len(idx), 8), dtype=np.uint8)
            await asyncio.sleep(0.005)

    async def freeze() -> None:
        stop.set()
        await writer

    async with serve(shm / "dest") as server:
        writer = asyncio.create_task(scribble())
        try:
            rep = await migrate(server, src, FakeWorkload(on_pause=freeze), downtime_ms=1,
                                max_rounds=5, on_nonconvergence="force")
        finally:
            stop.set()
            await writer
    assert rep.outcome == "committed" and rep.verify_repairs == 0
    assert (shm / "dest" / "vm.mem").read_bytes() == src.read_bytes()
    assert page_scans, "no scan went page by page"
    iterative = [r for r in rep.rounds if r.kind == "iterative"]
    assert all(r.pages_sent < 0.9 * npages for r in iterative[1:]), [r.pages_sent for r in iterative]


@pytest.mark.parametrize("changed, least", [(0, 0.0), (2048, 1.0), (1782, 0.071), (1024, 0.042), (2047, 0.21)])
def test_a_scan_estimates_how_much_of_its_changed_chunks_was_written(changed: int, least: float) -> None:
    """Evenly spread writes are the sparsest way to change that many chunks: 87 %
    of 2,048 chunks of 32 pages changed means at least ~7 % of their pages were
    written -- sending them whole would send ~14 times what was written."""
    got = precopy.session.scanner.written_fraction(changed, 2048, 32)
    assert got == pytest.approx(least, abs=0.01)


@pytest.mark.parametrize("every, hash_bps, whole", [
    (64, 1e3, False),  # half the chunks changed, a page each: found page by page
    (16, 1e3, False),  # every chunk changed (cannot tell how much of each): looked at, page by page
    (16, 1e18, False),  # ... and on a link slower than hashing pages
    (1, 1e3, True),  # every page written: found so, and sent
])
async def test_scattered_writes_over_many_chunks_are_not_sent_whole(
        work: Path, shm: Path, monkeypatch: pytest.MonkeyPatch, every: int, hash_bps: float, whole: bool) -> None:
    """One page in ``every`` written at the pause: a whole-chunk send would be many
    times what was written, so the scan finds the pages, also when every chunk
    changed (no page pass has said how much of each was written)."""
    npages = 2048
    src = work / "vm.mem"
    mm = make_region(src, npages, seed=5)
    monkeypatch.setattr(precopy.session.scanner, "_PAGE_HASH_BPS", hash_bps)
    sent: list[int] = []
    real = precopy.session.sender.PageSender.send

    async def send_pages(self: Any, indices: np.ndarray, rnd: Any, phase: str, **kw: Any) -> None:
        if phase != "full copy":
            sent.append(len(indices))
        await real(self, indices, rnd, phase, **kw)

    monkeypatch.setattr(precopy.session.sender.PageSender, "send", send_pages)

    async def scribble() -> None:
        mm.reshape(npages, 4096)[::every, :8] ^= 0xFF

    async with serve(shm / "dest") as server:
        rep = await migrate(server, src, FakeWorkload(on_pause=scribble), downtime_ms=5000)
    assert rep.outcome == "committed" and rep.verify_repairs == 0
    assert (shm / "dest" / "vm.mem").read_bytes() == src.read_bytes()
    assert sum(sent) == (npages if whole else npages // every), sent


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fill", [0, 1])
def test_send_plan_covers_every_page_once_and_ordered_batches_span_only_their_own(seed: int, fill: int) -> None:
    """The kernel tracker re-protects each batch's span before reading it: no span may hold another batch's page."""
    rng = np.random.default_rng(seed)
    npages = 4096
    dense = rng.random(npages) < (0.2, 0.6, 0.95)[seed % 3]
    dense[rng.integers(0, npages - 300):][:300] = True  # a long run, cut into batches
    indices = np.flatnonzero(dense).astype(np.uint32)
    for ordered in (False, True):
        batches = list(precopy.session.sender.plan(indices, 64, fill=fill, ordered=ordered))
        pages = np.concatenate([b for b, _ in batches])
        assert all(len(b) <= 64 for b, _ in batches)
        assert len(pages) == len(np.unique(pages))
        assert set(indices.tolist()) <= set(pages.tolist())
        for b, run in batches:
            if run:
                assert len(b) and np.array_equal(b, np.arange(b[0], b[-1] + 1))
        extra = np.setdiff1d(pages, indices)
        assert fill or not extra.size  # only gaps of ``fill`` pages are bridged
        if ordered:
            assert np.array_equal(pages, np.sort(pages))  # ascending: spans are disjoint

"""The source's page sender, dirty scanners and exchange, driven without sockets.

A destination in memory (:class:`MemoryDestination`) stands behind a real
:class:`Exchange`: it applies PAGES to its own pages (checking their
checksums as the real one does) and answers DIGEST_REQUEST from what it holds.
The source's region is a real mapped file (tmpfs), written by the tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
import pytest

from precopy.errors import RemoteProtocolError
from precopy.memory.digest import chunk_digests, chunks_of_page_digests, page_digests
from precopy.memory.region import GuestMemory
from precopy.memory.tracking import SourceChunks
from precopy.net.channel import LinkError
from precopy.policy.switchover import LinkEstimator
from precopy.protocol import PAGE_SIZE, DigestRequest, DigestTable, Pages, Ready, page_payload
from precopy.protocol.compress import AdaptiveCompressor
from precopy.session.exchange import Exchange
from precopy.session.record import PageRecord
from precopy.session.report import MigrationReport, RoundReport
from precopy.session.scanner import DigestScanner, DirtyScanner
from precopy.session.sender import PageSender
from precopy.session.tracked import TrackedScanner

NPAGES, CHUNK = 512, 32


class MemoryDestination:
    """A channel whose far end is a destination region in memory."""

    peer = "memory"

    def __init__(self, npages: int, chunk_pages: int) -> None:
        self.pages = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
        self.chunk_pages = chunk_pages
        self.sent: list[Any] = []
        self.page_bytes = 0  # what the PAGES events cost on the "wire"
        self.stuck = False  # nothing leaves the "socket": all that was written stays queued
        self.send_blocked_s = 0.0
        self._out: asyncio.Queue[Any] = asyncio.Queue()

    async def send(self, ev: Any) -> int:
        self.sent.append(ev)
        if isinstance(ev, Pages):
            return self._pages(ev)
        assert isinstance(ev, DigestRequest), ev
        if ev.pages_of is not None:
            pages = (ev.pages_of.astype(np.int64)[:, None] * self.chunk_pages + np.arange(self.chunk_pages)).ravel()
            digests = page_digests(self.pages, pages[pages < len(self.pages)])
        elif ev.by_page:
            digests = chunks_of_page_digests(page_digests(self.pages), self.chunk_pages)
        else:
            digests = chunk_digests(self.pages.reshape(-1).data.cast("B"), self.chunk_pages * PAGE_SIZE)
        await self._out.put(DigestTable(seq=ev.seq, digests=digests))
        return 64

    def _pages(self, ev: Pages) -> int:
        payload = ev.payload
        if isinstance(payload, list):  # gathered straight from memory: one buffer per run
            payload = b"".join(bytes(b) for b in payload)
        raw = page_payload(dataclasses.replace(ev, payload=payload), chunk_pages=self.chunk_pages)
        self.pages[ev.indices.astype(np.int64)] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self.pages[ev.zeros.astype(np.int64)] = 0
        n = 32 + memoryview(payload).nbytes
        self.page_bytes += n
        return n

    def close(self) -> None:
        self._out.put_nowait(None)

    async def events(self) -> AsyncIterator[Any]:
        while (ev := await self._out.get()) is not None:
            yield ev

    def unsent_bytes(self) -> int:
        return self.page_bytes if self.stuck else 0


@dataclasses.dataclass
class Source:
    mem: GuestMemory
    dest: MemoryDestination
    exchange: Exchange
    record: PageRecord
    report: MigrationReport
    sender: PageSender
    digests: DigestScanner
    pool: ThreadPoolExecutor

    def write(self, pages: list[int] | np.ndarray, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with open(self.mem.path, "r+b") as f:
            for p in np.asarray(pages).tolist():
                f.seek(p * PAGE_SIZE)
                f.write(rng.integers(1, 256, PAGE_SIZE, dtype=np.uint8).tobytes())

    def round(self, npages: int = NPAGES) -> RoundReport:
        return RoundReport(round=1, kind="iterative", pages_scanned=npages, pages_dirty=npages, pages_sent=0,
                           zero_pages=0, bytes_on_wire=0, seconds=0.0)


@pytest.fixture
def source(shm: Path) -> Iterator[Source]:
    path = shm / "src.mem"
    path.touch()
    os.truncate(path, NPAGES * PAGE_SIZE)  # holes but where written
    mem = GuestMemory.open(path, writable=False)
    dest = MemoryDestination(NPAGES, CHUNK)
    exchange = Exchange(io_timeout_s=10.0)
    exchange.chan = dest  # type: ignore[assignment]
    record = PageRecord.empty(NPAGES)
    report = MigrationReport(migration_id="m", memory=str(path), destination="memory", workload="none",
                             downtime_budget_ms=100.0, compression="off", mode="precopy")
    link = LinkEstimator()
    pool = ThreadPoolExecutor(2)
    sender = PageSender(exchange, mem, record, batch_pages=64, chunk_pages=CHUNK,
                        compressor=AdaptiveCompressor("off"), link=link, report=report)
    digests = DigestScanner(exchange, mem, record, CHUNK, link=link, pool=pool, hash_pool=pool)
    s = Source(mem, dest, exchange, record, report, sender, digests, pool)
    # Three chunks of data, then data on every third page, holes elsewhere.
    s.write(np.concatenate([np.arange(3 * CHUNK), np.arange(3 * CHUNK, NPAGES, 3)]), seed=1)
    yield s
    mem.close()
    pool.shutdown()


async def _reading(source: Source) -> asyncio.Task[None]:
    return asyncio.create_task(source.exchange.read_loop())


async def test_the_sender_moves_runs_gathers_and_zero_pages_and_keeps_the_record(source: Source) -> None:
    idx = np.concatenate([np.arange(0, 100), np.arange(200, 400, 7), np.arange(450, NPAGES)]).astype(np.uint32)
    rnd = source.round()
    await source.sender.send(idx, rnd, "iterating")
    assert np.array_equal(source.dest.pages[idx], source.mem.pages[idx])
    zero = ~source.mem.pages[idx].any(axis=1)
    assert rnd.pages_sent + rnd.zero_pages == len(idx) and rnd.zero_pages == int(zero.sum())
    assert rnd.bytes_on_wire == source.report.bytes_on_wire == source.dest.page_bytes
    assert source.report.pages_sent == rnd.pages_sent and source.report.zero_pages == rnd.zero_pages
    # Zero pages are held as zeros; staged pages are known by the digest of what went;
    # runs sent straight from memory have no record until the destination gives one.
    assert source.record.held_zero[idx[zero]].all() and not source.record.held_zero[idx[~zero]].any()
    known = source.record.known[idx]
    assert known.any() and not known.all()
    assert np.array_equal(source.record.sent[idx[known]], page_digests(source.mem.pages, idx[known]))
    assert rnd.send_seconds > 0


async def test_with_a_tracker_scattered_pages_are_gathered_straight_from_memory(source: Source) -> None:
    source.sender.tracker = FakeTracker()  # type: ignore[assignment]
    idx = np.array([1, 5, 9, 100, 101, 102, 200, 300, 302], dtype=np.uint32)  # 100, 101, 200, 302: holes
    await source.sender.send(idx, source.round(), "iterating", live=True)
    assert np.array_equal(source.dest.pages[idx], source.mem.pages[idx])
    pages = [ev for ev in source.dest.sent if isinstance(ev, Pages)]
    assert len(pages) == 1 and isinstance(pages[0].payload, list) and pages[0].checksum is None
    assert pages[0].zeros.tolist() == [100, 101, 200, 302]
    # No copy, no hash: no record for the data pages; the zero pages are known.
    assert not source.record.known[[1, 5, 9, 102, 300]].any()
    assert source.record.known[[100, 101, 200, 302]].all() and source.record.held_zero[[100, 101, 200, 302]].all()
    assert source.sender.tracker.rearmed == [idx.tolist()]  # type: ignore[attr-defined]


async def test_with_a_tracker_the_full_copy_takes_the_holes_arming_found(source: Source) -> None:
    """The full copy does not walk the file's holes again where the tracker walked them when armed."""
    tracker = FakeTracker()
    source.sender.tracker = tracker  # type: ignore[assignment]
    holes = source.mem.hole_pages()
    tracker.arm_holes = holes.copy()
    tracker.arm_holes[:3] = True  # (not a hole of the file: taken for one all the same, so the arming's it is)
    walks = 0
    real = source.mem.hole_pages

    def counted(*a: Any, **kw: Any) -> np.ndarray:
        nonlocal walks
        walks += 1
        return real(*a, **kw)

    source.mem.hole_pages = counted  # type: ignore[method-assign]
    rnd = source.round()
    await source.sender.send_all(rnd)
    assert walks == 0 and tracker.arm_holes is None
    assert rnd.zero_pages == int(holes.sum()) + int((~holes[:3]).sum())
    assert np.array_equal(source.dest.pages[3:], source.mem.pages[3:]) and not source.dest.pages[:3].any()


async def test_compressed_batches_arrive_whole(source: Source) -> None:
    source.sender.compressor = AdaptiveCompressor("lz4")
    idx = np.arange(0, NPAGES, 2, dtype=np.uint32)
    with open(source.mem.path, "r+b") as f:  # compressible pages
        for p in idx[::5].tolist():
            f.seek(p * PAGE_SIZE)
            f.write(b"text " * (PAGE_SIZE // 5) + b"t")
    await source.sender.send(idx, source.round(), "iterating")
    assert any(isinstance(ev, Pages) and ev.compressed for ev in source.dest.sent)
    assert np.array_equal(source.dest.pages[idx], source.mem.pages[idx])


async def test_the_link_rate_counts_only_what_left_the_socket(source: Source) -> None:
    idx = np.arange(NPAGES, dtype=np.uint32)
    link = source.sender.link
    source.dest.stuck = True
    await source.sender.send(idx, source.round(), "full copy")
    assert link.bytes_per_second == link.initial_bps and not link.free_samples  # filling a buffer is no rate
    source.dest.stuck = False
    await source.sender.send(idx, source.round(), "iterating")
    assert link.bytes_per_second != link.initial_bps and link.free_samples


async def test_the_check_before_each_batch_can_stop_the_send(source: Source) -> None:
    left: list[int] = []

    def before_batch(pages_left: int) -> None:
        left.append(pages_left)
        if len(left) == 3:
            raise RuntimeError("the cap would be passed")

    idx = np.arange(0, 6 * 64, dtype=np.uint32)  # six batches of 64
    with pytest.raises(RuntimeError, match="cap"):
        await source.sender.send(idx, source.round(), "switchover", before_batch=before_batch)
    assert left == [384, 320, 256]
    assert sum(len(ev.indices) + len(ev.zeros) for ev in source.dest.sent) == 128


def test_a_run_with_a_zero_page_is_found(source: Source) -> None:
    assert source.sender.has_zero_page(np.arange(90, 100, dtype=np.uint32))  # 97, 98 are holes
    assert not source.sender.has_zero_page(np.arange(0, 97, dtype=np.uint32))


async def test_the_full_copy_sends_holes_unread_and_skips_what_is_held(source: Source) -> None:
    reader = await _reading(source)
    try:
        holes = source.mem.hole_pages()
        rnd = source.round()
        await source.sender.send_all(rnd)
        source.mem.prep.wait_map_in()
        assert np.array_equal(source.mem.hole_pages(), holes), "a hole was read (allocated)"
        assert holes.sum() > NPAGES // 2 and not source.dest.pages[holes].any()
        assert np.array_equal(source.dest.pages, source.mem.pages)
        assert source.report.zero_pages == int(holes.sum())
        # A repeat migration into a region holding all but two chunks sends those two.
        source.dest.pages[5 * CHUNK + 2] ^= 1
        source.dest.pages[9 * CHUNK] ^= 1
        before = source.report.pages_sent
        rnd = source.round()
        await source.sender.send_all(rnd, source.digests.held_already)
        assert np.array_equal(source.dest.pages, source.mem.pages)
        data_in_two = int((~holes[5 * CHUNK:6 * CHUNK]).sum() + (~holes[9 * CHUNK:10 * CHUNK]).sum())
        # (the holes were read by the comparison above: zero pages now, no longer holes)
        assert rnd.pages_dirty == rnd.pages_sent + rnd.zero_pages == 2 * CHUNK
        assert source.report.pages_sent - before == data_in_two
        assert source.report.pages_already_there == NPAGES - 2 * CHUNK
    finally:
        reader.cancel()


async def test_the_digest_scanner_finds_exactly_the_pages_written(source: Source) -> None:
    reader = await _reading(source)
    try:
        await source.sender.send(np.arange(NPAGES, dtype=np.uint32), source.round(), "full copy")
        scan = await source.digests.scan(final=False)
        assert scan.dirty.size == 0 and scan.odd.size == 0
        written = np.array([3, 4, 70, 71, 72, 300], dtype=np.uint32)
        source.write(written, seed=2)
        scan = await source.digests.scan(final=False)
        assert np.array_equal(np.sort(scan.dirty), written) and not scan.whole and not scan.by_page
        # Pages sent straight from memory got their record from the destination, where
        # their chunk changed (chunk 0); elsewhere they still have none (chunk 1).
        assert source.record.known[:CHUNK].all() and not source.record.known[CHUNK:2 * CHUNK].any()
        await source.sender.send(scan.dirty, source.round(), "iterating")
        final = await source.digests.scan(final=True)
        assert final.dirty.size == 0 and np.array_equal(final.live, final.dest_table)
        # A fast writer's region, page by page: the same pages, no chunk pass.
        source.digests.dense = True
        source.write(written[:2], seed=3)
        by_page = await source.digests.scan(final=False)
        assert by_page.by_page and np.array_equal(np.sort(by_page.dirty), written[:2])
    finally:
        reader.cancel()


async def test_a_chunk_the_destination_holds_differently_is_odd(source: Source) -> None:
    reader = await _reading(source)
    try:
        await source.sender.send(np.arange(NPAGES, dtype=np.uint32), source.round(), "full copy")
        await source.digests.scan(final=False)  # every record known now
        source.dest.pages[7 * CHUNK + 3] ^= 0xFF  # damaged there, unchanged here
        scan = await source.digests.scan(final=True)
        assert scan.dirty.size == 0
        assert np.array_equal(scan.odd, np.arange(7 * CHUNK, 8 * CHUNK))
    finally:
        reader.cancel()


class FakeTracker:
    """What a kernel tracker reports, set by the test."""

    name = "uffd-wp"

    def __init__(self) -> None:
        self.reports: list[np.ndarray] = []
        self.rearmed: list[list[int]] = []
        self.arm_holes: np.ndarray | None = None  # what arming found (UffdTracker.take_arm_holes)

    def scan(self, sent: np.ndarray | None = None, *, held_zero: np.ndarray | None = None) -> np.ndarray:
        return self.reports.pop(0) if self.reports else np.zeros(0, dtype=np.uint32)

    def take_rewritten(self) -> np.ndarray:
        return np.zeros(0, dtype=np.uint32)

    def rearm(self, sending: np.ndarray) -> None:
        self.rearmed.append(sending.tolist())

    def take_arm_holes(self) -> np.ndarray | None:
        holes, self.arm_holes = self.arm_holes, None
        return holes


async def test_the_tracked_scanner_has_the_same_interface_and_keeps_the_chunk_table(source: Source) -> None:
    reader = await _reading(source)
    try:
        await source.sender.send(np.arange(NPAGES, dtype=np.uint32), source.round(), "full copy")
        tracker = FakeTracker()
        chunks = SourceChunks(source.mem, CHUNK, source.pool)
        scanner: DirtyScanner = TrackedScanner(source.digests, tracker, chunks,  # type: ignore[arg-type]
                                               near_switchover=lambda pages: True, report=source.report)
        # The first scan checks the kernel against the destination: a page the kernel
        # did not report (page 100) is found all the same.
        source.write([10, 100], seed=4)
        tracker.reports = [np.array([10], dtype=np.uint32)]
        first = await scanner.scan(final=False)
        assert set(first.dirty.tolist()) == {10, 100}
        await source.sender.send(first.dirty, source.round(), "iterating")
        # Later scans trust the kernel and rehash the reported pages' chunks.
        source.write([200], seed=5)
        tracker.reports = [np.array([200], dtype=np.uint32)]
        later = await scanner.scan(final=False)
        assert later.dirty.tolist() == [200]
        await source.sender.send(later.dirty, source.round(), "iterating")
        assert np.array_equal(later.live, chunk_digests(source.mem.view, CHUNK * PAGE_SIZE))
        # Paused: what was decided on before the pause goes too.
        final = await scanner.scan(final=True, pending=np.array([5], dtype=np.uint32))
        assert final.dirty.tolist() == [5]
        assert np.array_equal(final.live, chunk_digests(source.dest.pages.reshape(-1).data.cast("B"),
                                                        CHUNK * PAGE_SIZE))
    finally:
        reader.cancel()


async def test_the_exchange_checks_what_answers_what(source: Source) -> None:
    reader = await _reading(source)
    try:
        seq = await source.exchange.request()
        with pytest.raises(RemoteProtocolError, match=f"answers request {seq + 1}"):
            await source.exchange.expect_table(seq + 1)
        await source.exchange.request()
        with pytest.raises(RemoteProtocolError, match="expected Ready from the destination, got DigestTable"):
            await source.exchange.expect(Ready)
        source.exchange.rtt = 1.0
        seq = await source.exchange.request()
        assert (await source.exchange.expect_table(seq)).digests.size == NPAGES // CHUNK
        assert source.exchange.rtt < 1.0  # learned from the exchange
        source.dest.close()
        with pytest.raises(LinkError, match="memory closed the connection"):
            await source.exchange.expect(DigestTable)
    finally:
        reader.cancel()

"""Unit tests of precopy.memory.region (GuestMemory) and precopy.memory.digest."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import xxhash

from precopy.memory.digest import (
    ZERO_PAGE_DIGEST,
    ChunkTracker,
    StagingBuffer,
    changed,
    chunk_digests,
    chunks_of_page_digests,
    live_page_digests,
    page_digests,
)
from precopy.errors import RegionError
from precopy.memory.region import GuestMemory
from precopy.protocol import PAGE_SIZE

_h64 = xxhash.xxh3_64_intdigest


def random_pages(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, PAGE_SIZE), dtype=np.uint8)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    ex = ThreadPoolExecutor(2)
    yield ex
    ex.shutdown(wait=True)


@pytest.fixture
def region(shm: Path) -> Iterator[GuestMemory]:
    """A 40-page region holding random pages."""
    path = shm / "r.mem"
    path.write_bytes(random_pages(40).tobytes())
    mem = GuestMemory.open(path)
    yield mem
    mem.close()


# --------------------------------------------------------------------------
# GuestMemory


def test_open_rejects_a_missing_file(shm: Path) -> None:
    with pytest.raises(RegionError, match="cannot open"):
        GuestMemory.open(shm / "nope.mem")


@pytest.mark.parametrize("size", [0, 1, PAGE_SIZE - 1, PAGE_SIZE + 1, 3 * PAGE_SIZE + 100])
def test_open_rejects_empty_and_unaligned_sizes(shm: Path, size: int) -> None:
    path = shm / "bad.mem"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(RegionError, match="multiple of 4096"):
        GuestMemory.open(path)
    with pytest.raises(RegionError):
        GuestMemory.open(path, writable=False)


@pytest.mark.parametrize("size", [0, -PAGE_SIZE, PAGE_SIZE + 1])
def test_create_rejects_bad_sizes(shm: Path, size: int) -> None:
    with pytest.raises(RegionError):
        GuestMemory.create(shm / "c.mem", size)
    assert not (shm / "c.mem").exists()


def test_create_makes_a_zero_region_and_open_sees_writes(shm: Path) -> None:
    path = shm / "c.mem"
    with GuestMemory.create(path, 8 * PAGE_SIZE) as mem:
        assert mem.npages == 8 and mem.pages.shape == (8, PAGE_SIZE)
        assert not mem.array.any()
        mem.pages[3] = 7
        mem.flush()
        with GuestMemory.open(path, writable=False) as ro:
            assert (ro.pages[3] == 7).all() and not ro.pages[4].any()
            with pytest.raises(ValueError):
                ro.pages[0] = 1  # read-only mapping
    assert path.stat().st_size == 8 * PAGE_SIZE


@pytest.mark.parametrize("indices", [
    [5],
    [0, 1, 2, 3],
    [36, 37, 38, 39],
    [1, 4, 9, 30],
    [2, 3, 7],
    list(range(40)),
])
def test_gather_scatter_round_trip(region: GuestMemory, indices: list[int]) -> None:
    idx = np.array(indices, dtype=np.uint32)
    before = region.pages.copy()
    got = region.gather(idx)
    assert got.shape == (len(idx), PAGE_SIZE)
    assert np.array_equal(got, before[idx])
    got[:] = 0xAB  # a copy: the region is untouched
    assert np.array_equal(region.pages, before)

    new = random_pages(len(idx), seed=123)
    region.scatter(idx, new.tobytes())
    expect = before.copy()
    expect[idx] = new
    assert np.array_equal(region.pages, expect)
    assert np.array_equal(region.gather(idx), new)

    region.zero(idx)
    expect[idx] = 0
    assert np.array_equal(region.pages, expect)


def test_scatter_accepts_memoryview_and_array(region: GuestMemory) -> None:
    new = random_pages(2, seed=9)
    region.scatter(np.array([10, 20], dtype=np.uint32), memoryview(new).cast("B"))
    region.scatter(np.array([11, 12], dtype=np.uint32), new)
    assert np.array_equal(region.pages[[10, 20]], new)
    assert np.array_equal(region.pages[[11, 12]], new)


UNSORTED = [0, 5, 2]  # last - first == n - 1, but not a run


@pytest.mark.parametrize("op", ["gather", "scatter", "load"])
def test_unsorted_indices_are_honoured(region: GuestMemory, op: str) -> None:
    idx = np.array(UNSORTED, dtype=np.uint32)
    before = region.pages.copy()
    if op == "gather":
        assert np.array_equal(region.gather(idx), before[idx])
    elif op == "load":
        sb = StagingBuffer(4)
        assert np.array_equal(sb.load(region.pages, idx), before[idx])
    else:
        new = random_pages(3, seed=77)
        region.scatter(idx, new.tobytes())
        expect = before.copy()
        expect[idx] = new
        assert np.array_equal(region.pages, expect)


# --------------------------------------------------------------------------
# Digests


def test_zero_page_digest() -> None:
    assert ZERO_PAGE_DIGEST == _h64(bytes(PAGE_SIZE))


@pytest.mark.parametrize("indices", [[0, 1, 2, 3, 4], [7, 3, 30], [39]])
def test_staging_buffer_digests_are_per_page_xxh3(region: GuestMemory, indices: list[int]) -> None:
    sb = StagingBuffer(8)
    sb.load(region.pages, np.arange(8, dtype=np.uint32))  # stale content to overwrite
    idx = np.array(indices, dtype=np.uint32)
    staged = sb.load(region.pages, idx)
    assert sb.n == len(idx)
    assert np.array_equal(staged, region.pages[idx])
    dig = sb.digests()
    assert dig.dtype == np.uint64 and dig.shape == (len(idx),)
    assert dig.tolist() == [_h64(region.pages[i].tobytes()) for i in indices]
    assert bytes(sb.view()) == region.pages[idx].tobytes()
    # The staged copy is independent of live memory (what is hashed is what is sent).
    if indices:
        region.pages[indices[0]] ^= 0xFF
        assert sb.digests().tolist() == dig.tolist()


def test_staging_buffer_empty_load_digests(region: GuestMemory) -> None:
    sb = StagingBuffer(4)
    sb.load(region.pages, np.zeros(0, dtype=np.uint32))
    assert sb.n == 0 and sb.digests().size == 0


def test_staging_buffer_empty_view(region: GuestMemory) -> None:
    sb = StagingBuffer(4)
    sb.load(region.pages, np.zeros(0, dtype=np.uint32))
    assert bytes(sb.view()) == b""


def test_staging_buffer_rejects_oversized_batches(region: GuestMemory) -> None:
    with pytest.raises(ValueError):
        StagingBuffer(2).load(region.pages, np.arange(3, dtype=np.uint32))


def test_page_digests(region: GuestMemory) -> None:
    idx = np.array([3, 0, 39], dtype=np.uint32)
    assert page_digests(region.pages, idx).tolist() == [_h64(region.pages[i].tobytes()) for i in idx]
    assert page_digests(region.pages).tolist() == [_h64(p.tobytes()) for p in region.pages]


def direct_chunks(data: bytes, chunk_bytes: int) -> list[int]:
    return [_h64(data[o:o + chunk_bytes]) for o in range(0, len(data), chunk_bytes)]


@pytest.mark.parametrize("npages,chunk_pages", [(40, 4), (37, 4), (40, 64), (3, 1), (100, 8)])
@pytest.mark.parametrize("threads", [False, True])
def test_chunk_digests_match_a_direct_computation(
    pool: ThreadPoolExecutor, npages: int, chunk_pages: int, threads: bool
) -> None:
    data = random_pages(npages, seed=npages).tobytes()
    cb = chunk_pages * PAGE_SIZE
    expect = direct_chunks(data, cb)  # the last chunk is short when npages % chunk_pages
    ex = pool if threads else None
    got = chunk_digests(memoryview(data), cb, ex)
    assert got.dtype == np.uint64
    assert got.tolist() == expect
    nchunks = len(expect)
    subsets = [np.arange(nchunks), np.array([nchunks - 1]), np.arange(0, nchunks, 2)[::-1]]
    for sub in subsets:
        assert chunk_digests(memoryview(data), cb, ex, sub).tolist() == [expect[c] for c in sub]
    assert chunk_digests(memoryview(data), cb, ex, np.zeros(0, np.int64)).size == 0


def test_chunk_digests_threaded_on_a_large_subset(pool: ThreadPoolExecutor) -> None:
    data = random_pages(99, seed=3).tobytes()  # 25 chunks of 4 pages, the last of 3
    cb = 4 * PAGE_SIZE
    expect = direct_chunks(data, cb)
    sub = np.array([24, 0, 5, 6, 7, 11, 12, 13, 20, 23])
    assert chunk_digests(memoryview(data), cb, pool, sub).tolist() == [expect[c] for c in sub]


def test_changed() -> None:
    a = np.array([1, 2, 3, 4], dtype=np.uint64)
    b = np.array([1, 9, 3, 0], dtype=np.uint64)
    assert changed(a, b).tolist() == [1, 3]
    assert changed(a, a).size == 0


@pytest.mark.parametrize("npages,chunk_pages", [(64, 16), (70, 16), (5, 64), (1, 1)])
def test_chunk_tracker_zeroed_and_marked(
    shm: Path, pool: ThreadPoolExecutor, npages: int, chunk_pages: int
) -> None:
    cb = chunk_pages * PAGE_SIZE
    with GuestMemory.create(shm / "t.mem", npages * PAGE_SIZE) as mem:
        tracker = ChunkTracker.zeroed(mem.view, chunk_pages, pool)
        try:
            assert tracker.nchunks == -(-npages // chunk_pages)
            assert tracker.table().tolist() == direct_chunks(bytes(npages * PAGE_SIZE), cb)
            rng = np.random.default_rng(npages)
            for _ in range(3):
                idx = np.unique(rng.integers(0, npages, size=max(1, npages // 8))).astype(np.uint32)
                mem.scatter(idx, random_pages(len(idx), seed=int(idx[0])).tobytes())
                tracker.mark(idx)
                assert tracker.table().tolist() == direct_chunks(bytes(mem.view), cb)
            # A full tracker over the same memory agrees.
            full = ChunkTracker(mem.view, chunk_pages, pool)
            try:
                assert full.table().tolist() == tracker.table().tolist()
            finally:
                full.close()
            # Zeroing pages back is seen too.
            mem.zero(np.arange(npages))
            tracker.mark(np.arange(npages))
            assert tracker.table().tolist() == direct_chunks(bytes(npages * PAGE_SIZE), cb)
        finally:
            tracker.close()



@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only): a file system that runs out of space."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip(reason="mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(reason=f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_prepare_reports_a_full_file_system_instead_of_sigbus(small_tmpfs: Path) -> None:
    # Written through the mapping (as on hugetlbfs): the thread reserves ahead.
    mem = GuestMemory.create(small_tmpfs / "big", 16 * 1024 * 1024, preallocate=False, pwrite=False)
    try:
        mem.prep.start_prepare(chunk=1024 * 1024)
        mem.prep.stop_populate(wait=True)  # joins the thread: it stops at the first failure
        assert isinstance(mem.prep.prepare_error, RegionError)
        assert "free space" in str(mem.prep.prepare_error)
        assert mem.prep.reserved <= 4 * 1024 * 1024
        with pytest.raises(RegionError):
            mem.prep.reserved_through(mem.npages - 1)
    finally:
        mem.close()


def test_create_with_preallocate_fails_cleanly_when_full(small_tmpfs: Path) -> None:
    with pytest.raises(RegionError, match="not enough space"):
        GuestMemory.create(small_tmpfs / "big", 16 * 1024 * 1024)
    assert not (small_tmpfs / "big").exists()


def test_prepare_reserves_everything_on_a_roomy_file_system(tmp_path: Path) -> None:
    mem = GuestMemory.create(tmp_path / "r", 4 * 1024 * 1024, preallocate=False, pwrite=False)
    try:
        mem.prep.start_prepare(chunk=1024 * 1024)
        mem.prep.stop_populate(wait=True)
        assert mem.prep.prepare_error is None
        assert mem.prep.reserved == mem.size and mem.prep.reserved_through(mem.npages - 1)
    finally:
        mem.close()


def test_skipped_chunks_are_reserved_on_demand_or_fail_cleanly(small_tmpfs: Path) -> None:
    mem = GuestMemory.create(small_tmpfs / "sparse", 16 * 1024 * 1024, preallocate=False, pwrite=False)
    try:
        assert not mem.prep.reserved_through(0)  # nothing may be written before preparing
        skip = np.ones(mem.npages, dtype=bool)
        skip[:10] = False  # only the first 1 MiB chunk holds data
        mem.prep.start_prepare(chunk=1024 * 1024, skip=skip)
        mem.prep.stop_populate(wait=True)
        assert mem.prep.prepare_error is None and mem.prep.reserved == mem.size
        used = os.statvfs(small_tmpfs)
        assert (used.f_blocks - used.f_bfree) * used.f_frsize <= 2 * 1024 * 1024
        mem.prep.reserve_skipped(np.array([300, 3000], dtype=np.uint32))  # fine while there is room
        # Fill the file system, then a page in a skipped chunk cannot be had.
        with open(small_tmpfs / "filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(65536))
                    f.flush()
            except OSError:
                pass
        with pytest.raises(RegionError, match="cannot allocate page"):
            mem.prep.reserve_skipped(np.array([3500], dtype=np.uint32))
    finally:
        mem.close()


def test_pwrite_region_needs_no_preparation_and_a_full_file_system_is_an_error(small_tmpfs: Path) -> None:
    """Written with pwrite, a region is allocated page by page as it is written:
    it stays sparse where nothing arrives, and a full file system is a
    RegionError from the write (ENOSPC), never a SIGBUS."""
    mem = GuestMemory.create(small_tmpfs / "big", 16 * 1024 * 1024, preallocate=False)
    try:
        mem.prep.start_prepare(chunk=1024 * 1024)
        assert mem.prep.reserved == mem.size and mem.prep.prepare_error is None  # nothing to wait for
        mem.write_pages(np.arange(256, dtype=np.uint32), random_pages(256, seed=1))
        used = os.statvfs(small_tmpfs)
        assert (used.f_blocks - used.f_bfree) * used.f_frsize <= 2 * 1024 * 1024  # sparse elsewhere
        with pytest.raises(RegionError, match="cannot write"):
            for start in range(256, mem.npages, 256):
                mem.write_pages(np.arange(start, start + 256, dtype=np.uint32), random_pages(256, seed=start))
    finally:
        mem.close()


@pytest.mark.parametrize("pwrite", [True, False])
def test_write_pages_runs_singles_and_allocated_mask(tmp_path: Path, pwrite: bool) -> None:
    """Every mix of runs and lone pages lands where it should, through pwrite,
    the mapping (lone pages the mask calls allocated), or both."""
    npages = 300
    mem = GuestMemory.create(tmp_path / "w", npages * PAGE_SIZE, preallocate=False, pwrite=pwrite)
    ref = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    rng = np.random.default_rng(7)
    try:
        for trial in range(60):
            if trial % 3 == 0:
                a = int(rng.integers(0, npages - 1))
                idx = np.arange(a, min(npages, a + int(rng.integers(1, 80))), dtype=np.uint32)
            else:
                idx = np.sort(rng.choice(npages, int(rng.integers(1, 40)), replace=False)).astype(np.uint32)
            data = random_pages(len(idx), seed=trial)
            allocated = rng.random(len(idx)) < 0.5 if trial % 2 else None
            mem.write_pages(idx, memoryview(data.tobytes()) if trial % 4 else data, allocated=allocated)
            ref[idx] = data
        assert (mem.pages == ref).all()
        assert (np.fromfile(tmp_path / "w", dtype=np.uint8).reshape(npages, PAGE_SIZE) == ref).all()
    finally:
        mem.close()


def test_chunk_tracker_takes_whole_chunks_from_received_bytes(tmp_path: Path) -> None:
    """Digests taken from the batch's bytes (whole chunks, the short last one
    included) or marked stale (partial chunks) always equal the region's."""
    npages = 1000  # not a multiple of the chunk
    mem = GuestMemory.create(tmp_path / "t", npages * PAGE_SIZE, preallocate=False)
    pool = ThreadPoolExecutor(2)
    tracker = ChunkTracker.zeroed(mem.view, 32, pool)
    rng = np.random.default_rng(3)
    try:
        for trial in range(200):
            if trial % 5 == 0:
                idx = np.sort(rng.choice(npages, 10, replace=False)).astype(np.uint32)
            else:
                a = int(rng.integers(0, npages))
                idx = np.arange(a, int(rng.integers(a + 1, min(npages, a + 300) + 1)), dtype=np.uint32)
            data = random_pages(len(idx), seed=trial)
            mem.write_pages(idx, data)
            tracker.received(idx, data.reshape(-1).data.cast("B"))
            if trial % 40 == 0:
                assert (tracker.table() == chunk_digests(mem.view, 32 * PAGE_SIZE)).all(), trial
        assert (tracker.table() == chunk_digests(mem.view, 32 * PAGE_SIZE)).all()
    finally:
        tracker.close()
        pool.shutdown()
        mem.close()


def by_page_table(mem: GuestMemory, chunk_pages: int) -> list[int]:
    """Chunk digests by page, computed directly: xxh3 of each chunk's page digests, little endian."""
    pages = [_h64(bytes(mem.view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])) for i in range(mem.npages)]
    raw = np.array(pages, dtype="<u8").tobytes()
    step = chunk_pages * 8
    return [_h64(raw[o:o + step]) for o in range(0, len(raw), step)]


@pytest.mark.parametrize("npages,chunk_pages", [(64, 16), (70, 16), (5, 64)])
def test_chunks_of_page_digests_match_a_direct_computation(shm: Path, npages: int, chunk_pages: int) -> None:
    with GuestMemory.create(shm / "t.mem", npages * PAGE_SIZE) as mem:
        mem.scatter(np.arange(npages, dtype=np.uint32), random_pages(npages).tobytes())
        table = page_digests(mem.pages)
        assert chunks_of_page_digests(table, chunk_pages).tolist() == by_page_table(mem, chunk_pages)
        some = np.array([0, -(-npages // chunk_pages) - 1], dtype=np.uint32)
        assert chunks_of_page_digests(table, chunk_pages, some).tolist() == [
            by_page_table(mem, chunk_pages)[int(c)] for c in some]
        # A page's position counts: two pages swapped inside a chunk change its digest.
        swapped = table.copy()
        swapped[[0, 1]] = swapped[[1, 0]]
        assert chunks_of_page_digests(swapped, chunk_pages)[0] != chunks_of_page_digests(table, chunk_pages)[0]


def test_live_page_digests_take_known_zeros_unread(region: GuestMemory) -> None:
    zero = np.zeros(region.npages, dtype=bool)
    zero[[2, 5]] = True
    got = live_page_digests(region.pages, zero)
    assert got[2] == got[5] == ZERO_PAGE_DIGEST  # random pages: not what reading them would give
    keep = ~zero
    assert (got[keep] == page_digests(region.pages)[keep]).all()
    assert (live_page_digests(region.pages, None) == page_digests(region.pages)).all()


@pytest.mark.parametrize("existing", [False, True])
def test_chunk_tracker_by_page_follows_received_and_zeroed_pages(tmp_path: Path, existing: bool) -> None:
    """After the switch a tracker's table is the region's chunk table by page, whatever is
    received (runs, scattered pages, whole chunks with their byte digests) or zeroed; pages
    the switch is told were never written are not read."""
    npages, cp = 1000, 32
    mem = GuestMemory.create(tmp_path / "t", npages * PAGE_SIZE, preallocate=False)
    pool = ThreadPoolExecutor(2)
    tracker = ChunkTracker.unread(mem.view, cp, pool) if existing else ChunkTracker.zeroed(mem.view, cp, pool)
    rng = np.random.default_rng(4)
    written = np.zeros(npages, dtype=bool)
    try:
        first = np.arange(0, 600, dtype=np.uint32)
        data = random_pages(600, seed=9)
        mem.write_pages(first, data)
        written[first] = True
        tracker.received(first, data.reshape(-1).data.cast("B"))
        assert tracker.by_page(written) == 600  # only the pages that may hold data are read
        assert tracker.by_page(written) == 0  # once
        assert tracker.table().tolist() == by_page_table(mem, cp)
        for trial in range(60):
            if trial % 3 == 0:
                idx = np.sort(rng.choice(npages, 10, replace=False)).astype(np.uint32)
            else:
                a = int(rng.integers(0, npages - 64))
                idx = np.arange(a, a + int(rng.integers(1, 64)), dtype=np.uint32)
            if trial % 7 == 6:
                mem.zero(idx)
                tracker.zeroed_pages(idx)
            else:
                data = random_pages(len(idx), seed=100 + trial)
                mem.write_pages(idx, data)
                cd = chunk_digests(data.reshape(-1).data.cast("B"), cp * PAGE_SIZE)
                tracker.received(idx, data.reshape(-1).data.cast("B"), cd)
            if trial % 10 == 0:
                assert tracker.table().tolist() == by_page_table(mem, cp), trial
        assert tracker.table().tolist() == by_page_table(mem, cp)
    finally:
        tracker.close()
        pool.shutdown()
        mem.close()


def test_page_set_operations_match_numpy() -> None:
    from precopy.memory.digest import page_difference, page_union, sorted_distinct
    rng = np.random.default_rng(11)
    for _ in range(50):
        n = int(rng.integers(1, 5000))
        a = rng.integers(0, n, int(rng.integers(0, 300)))
        b = rng.integers(0, n, int(rng.integers(0, 300)))
        assert (page_union(n, a, b) == np.union1d(a, b)).all()
        assert page_union(n, a, b).dtype == np.uint32
        assert (page_difference(n, a, b) == np.setdiff1d(a, b)).all()
        s = np.sort(a)
        assert (sorted_distinct(s) == np.unique(s)).all()
    one = np.array([1, 4, 9], dtype=np.uint32)
    assert page_union(10, one) is not None and (page_union(10, one) == one).all()
    assert page_union(10).size == 0 and page_difference(10, np.zeros(0, np.uint32), one).size == 0


def test_populate_ahead_maps_in_only_pieces_that_will_hold_data(shm: Path) -> None:
    """A new region is mapped in writable ahead of the receiver, piece by piece, in order; a piece
    holding a page the source declared zero (a hole there) is left alone, so the region stays sparse."""
    piece = 16 * PAGE_SIZE
    mem = GuestMemory.create(shm / "ahead.mem", 64 * PAGE_SIZE, preallocate=False)
    try:
        assert not mem.prep.populated(0, 0)  # nothing yet
        data = np.ones(64, dtype=bool)
        data[20] = False  # piece 1 holds a hole of the source's
        mem.prep.start_populate_ahead(data, piece=piece)
        assert mem.prep._populate_thread is not None
        mem.prep._populate_thread.join()
        assert mem.prep.populated_upto == 64 * PAGE_SIZE and mem.prep.populate_error is None
        assert mem.prep.populated(0, 15) and mem.prep.populated(32, 63)
        assert not mem.prep.populated(15, 16) and not mem.prep.populated(20, 20)
        holes = mem.hole_pages()
        assert holes[16:32].all() and not holes[:16].any() and not holes[32:].any()
        mem.view[0:PAGE_SIZE] = b"\x07" * PAGE_SIZE  # writable where populated, as the receiver does
        assert (mem.pages[0] == 7).all()
    finally:
        mem.close()

"""The destination's pieces without a socket: the region writer and the commit journal (issue 19)."""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import xxhash

from precopy.errors import RegionError
from precopy.memory.digest import ChunkTracker
from precopy.memory.region import GuestMemory
from precopy.protocol import NEED_DATA, PAGE_SIZE, Pages
from precopy.session.journal import Journal, MigrationRecord
from precopy.session.region_writer import RegionWriter

from .helpers import BEGIN, Pair, join
from .helpers import NPAGES as N

CHUNK_PAGES = 16
NPAGES = 64


@pytest.fixture
def shm() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        yield Path(d)


async def test_the_region_writer_puts_pages_and_zeros_where_they_belong(shm: Path) -> None:
    mem = GuestMemory.create(shm / "r.mem", NPAGES * PAGE_SIZE, preallocate=False)
    pool = ThreadPoolExecutor(1)
    tracker = ChunkTracker.zeroed(mem.view, CHUNK_PAGES, pool)
    rec = MigrationRecord("m1", "r", mem.size, "peer")
    try:
        writer = RegionWriter(mem, tracker, rec, existing=False, populate=False, chunk_pages=CHUNK_PAGES)
        rng = np.random.default_rng(1)
        pages = np.array([3, 4, 5, 40], dtype=np.uint32)
        data = rng.integers(0, 256, len(pages) * PAGE_SIZE, dtype=np.uint8).tobytes()
        await writer.write(Pages(indices=pages, zeros=np.array([0, 1], dtype=np.uint32), payload=data,
                                 checksum=None))
        # a page written, then declared zero: zeros again
        await writer.write(Pages(indices=np.zeros(0, dtype=np.uint32), zeros=np.array([4], dtype=np.uint32),
                                 payload=b"", checksum=None))
        got = (shm / "r.mem").read_bytes()
        want = bytearray(NPAGES * PAGE_SIZE)
        for i, p in enumerate(pages):
            if p != 4:
                want[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        assert got == bytes(want)
        # its chunk digests are the region's, as the final verification will ask
        step = CHUNK_PAGES * PAGE_SIZE
        assert [int(d) for d in tracker.table()] == [xxhash.xxh3_64_intdigest(got[o:o + step])
                                                      for o in range(0, len(got), step)]
        assert rec.pages_in_place == 0  # a fresh region not populated ahead: pwrite
    finally:
        tracker.close()
        mem.close()
        pool.shutdown()


def test_the_journal_commits_write_ahead_and_recovers_what_a_stop_left(shm: Path) -> None:
    state = shm / "state"
    journal = Journal(state)
    partial, final, device = shm / ".r.partial", shm / "r", shm / "r.device-state"
    partial.write_bytes(b"region")
    rec = MigrationRecord("m1", "r", 6, "peer")
    journal.write(rec)
    journal.commit(rec, b"blob", device, partial, final)
    assert (rec.outcome, final.read_bytes(), device.read_bytes()) == ("committed", b"region", b"blob")
    assert not partial.exists()
    entry = journal.read("m1")
    assert entry is not None and entry["outcome"] == "committed" and entry["memory"] == str(final)

    # A daemon stopped after the record, before the rename: recovery completes it.
    final.rename(partial)
    # ... and one stopped while another migration ran: that one is aborted.
    journal.write(MigrationRecord("m2", "other", 1, "peer"))
    (shm / ".stray.partial").write_bytes(b"x")
    Journal(state).recover(shm, keep_partial=False)
    assert final.read_bytes() == b"region" and not partial.exists()
    m2 = journal.read("m2")
    assert m2 is not None and m2["outcome"] == "aborted" and "stopped" in m2["error"]
    assert not (shm / ".stray.partial").exists()
    assert sorted(json.loads(p.read_text())["migration_id"] for p in journal.dir.glob("*.json")) == ["m1", "m2"]


def test_a_device_state_written_ahead_is_what_the_commit_names(shm: Path) -> None:
    """Journal.stage (beside a CRIU restore): the commit then only renames it, writing nothing again."""
    journal = Journal(shm / "state")
    partial, final, device = shm / ".r.partial", shm / "r", shm / "r.device-state"
    partial.write_bytes(b"region")
    rec = MigrationRecord("m1", "r", 6, "peer")
    journal.write(rec)
    Journal.stage(bytearray(b"staged images"), device)
    assert Journal.staged_path(device).read_bytes() == b"staged images" and not device.exists()
    journal.commit(rec, b"not written again", device, partial, final, staged=True)
    assert (rec.outcome, device.read_bytes()) == ("committed", b"staged images")
    assert not Journal.staged_path(device).exists()


def test_a_commit_whose_rename_fails_is_taken_back(shm: Path) -> None:
    journal = Journal(shm / "state")
    rec = MigrationRecord("m1", "r", 6, "peer")
    with pytest.raises(RegionError, match="cannot move the region into place"):
        journal.commit(rec, b"blob", shm / "r.device-state", shm / ".missing.partial", shm / "r")
    entry = journal.read("m1")
    assert rec.outcome == "aborted" and entry is not None and entry["outcome"] == "aborted"


@pytest.mark.parametrize("read", [4096, 100_000, 1 << 22])
async def test_runs_received_in_place_are_hashed_as_they_land_into_the_regions_digests(
        shm: Path, read: int) -> None:
    """Into an existing region, runs go straight into its mapping and each chunk is hashed as
    its bytes arrive (RegionWriter.hashing_sink): whatever the read sizes, the chunk table
    is the region's, and runs that cover no whole chunk, or start mid-chunk, are too."""
    path = shm / "r.mem"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, N * PAGE_SIZE, dtype=np.uint8).tobytes())
    mem = GuestMemory.open(path)
    pool = ThreadPoolExecutor(1)
    cp = BEGIN.chunk_pages
    tracker = ChunkTracker.unread(mem.view, cp, pool)
    rec = MigrationRecord("m1", "r", mem.size, "peer")
    try:
        writer = RegionWriter(mem, tracker, rec, existing=True, populate=False, chunk_pages=cp)
        hashing = writer.hashing_sink()
        assert hashing is not None
        pair = Pair()
        pair.start()
        pair.dst.payload_sink, pair.dst.payload_progress = hashing
        rng = np.random.default_rng(8)
        runs = [(0, 1024), (1024 + 3, 1024 + 3 + 5 * cp), (3000 % N, 3000 % N + cp - 1), (N - 2 * cp - 7, N)]
        want = bytearray(path.read_bytes())
        data = b""
        for lo, hi in runs:
            payload = rng.integers(0, 256, (hi - lo) * PAGE_SIZE, dtype=np.uint8).tobytes()
            want[lo * PAGE_SIZE:hi * PAGE_SIZE] = payload
            data += join(pair.src.send(Pages(indices=np.arange(lo, hi, dtype=np.uint32),
                                             zeros=np.zeros(0, dtype=np.uint32), payload=payload, checksum=None)))
        pos = 0
        while pos < len(data):
            buf = pair.dst.get_buffer()
            n = min(len(buf), read, len(data) - pos)
            buf[:n] = data[pos:pos + n]
            buf.release()
            pair.dst.buffer_updated(n)
            pos += n
            while (ev := pair.dst.next_event()) is not NEED_DATA:
                assert isinstance(ev, Pages) and ev.in_place
                await writer.write(ev)
        pair.dst.release_sink()
        writer.release()
        assert rec.pages_in_place == sum(hi - lo for lo, hi in runs)
        got = path.read_bytes()
        assert got == bytes(want)
        step = cp * PAGE_SIZE
        assert [int(d) for d in tracker.table()] == [xxhash.xxh3_64_intdigest(got[o:o + step])
                                                      for o in range(0, len(got), step)]
    finally:
        tracker.close()
        mem.close()
        pool.shutdown()

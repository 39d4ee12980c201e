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
from precopy.protocol import PAGE_SIZE, Pages
from precopy.session.journal import Journal, MigrationRecord
from precopy.session.region_writer import RegionWriter

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


def test_a_commit_whose_rename_fails_is_taken_back(shm: Path) -> None:
    journal = Journal(shm / "state")
    rec = MigrationRecord("m1", "r", 6, "peer")
    with pytest.raises(RegionError, match="cannot move the region into place"):
        journal.commit(rec, b"blob", shm / "r.device-state", shm / ".missing.partial", shm / "r")
    entry = journal.read("m1")
    assert rec.outcome == "aborted" and entry is not None and entry["outcome"] == "aborted"

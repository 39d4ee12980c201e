"""Sparse regions: holes are sent as zero pages without being read (or allocated)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from precopy.memory.region import GuestMemory
from precopy.protocol import PAGE_SIZE

from .test_engine import FakeWorkload, migrate, serve


def _sparse(path: Path, npages: int, data_pages: list[int]) -> None:
    with open(path, "wb") as f:
        f.truncate(npages * PAGE_SIZE)
        for p in data_pages:
            f.seek(p * PAGE_SIZE)
            f.write(np.random.default_rng(p).integers(1, 256, PAGE_SIZE, dtype=np.uint8).tobytes())


def test_hole_pages_matches_written_pages(work: Path) -> None:
    path = work / "sparse.mem"
    _sparse(path, 4096, [0, 7, 8, 4095])
    with GuestMemory.open(path, writable=False) as mem:
        holes = mem.hole_pages()
    assert holes.dtype == bool and holes.size == 4096
    # tmpfs tracks holes per page: exactly the written pages are data.
    assert sorted(np.flatnonzero(~holes).tolist()) == [0, 7, 8, 4095]


def test_hole_pages_extent_limit_takes_the_rest_as_data(work: Path) -> None:
    path = work / "sparse.mem"
    _sparse(path, 64, [1, 10, 20])
    with GuestMemory.open(path, writable=False) as mem:
        holes = mem.hole_pages(max_extents=1)
    assert not holes[1] and holes[0]
    assert not holes[2:].any()  # unknown past the first extent: treated as data


async def test_sparse_region_migrates_without_inflating_the_source(work: Path, shm: Path) -> None:
    npages = 16384  # 64 MiB, three data pages
    path = work / "sparse.mem"
    _sparse(path, npages, [3, 5000, npages - 1])
    blocks_before = os.stat(path).st_blocks
    async with serve(shm / "dest") as server:
        report = await migrate(server, path, FakeWorkload())
    assert report.outcome == "committed"
    assert report.pages_sent == 3
    assert report.zero_pages == npages - 3
    assert report.bytes_on_wire < 1 << 20
    assert (shm / "dest" / "sparse.mem").read_bytes() == path.read_bytes()
    # The source never read (and so never allocated) its holes, except
    # inside the three 256 KiB chunks that hold data (chunks are hashed whole).
    allocated = (os.stat(path).st_blocks - blocks_before) * 512
    assert allocated <= 3 * 64 * PAGE_SIZE


async def test_memfd_region_migrates(shm: Path) -> None:
    """A memfd shared by the workload is reachable as /proc/PID/fd/N."""
    npages = 512
    fd = os.memfd_create("precopy-test-guest")
    try:
        data = np.random.default_rng(3).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8).tobytes()
        os.write(fd, data)
        path = Path(f"/proc/{os.getpid()}/fd/{fd}")
        async with serve(shm / "dest") as server:
            report = await migrate(server, path, FakeWorkload(), name="memfd-guest")
        assert report.outcome == "committed"
        assert (shm / "dest" / "memfd-guest").read_bytes() == data
    finally:
        os.close(fd)


async def test_destination_without_room_refuses_cleanly(work: Path, tmp_path: Path) -> None:
    """A region that cannot fit is refused before any page moves; the daemon lives on."""
    import subprocess

    from precopy.errors import AbortCode, MigrationAborted

    if os.geteuid() != 0:
        pytest.skip(reason="mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip(reason="cannot mount tmpfs here")
    try:
        big, small = work / "big.mem", work / "small.mem"
        _sparse(big, 4096, [1, 2, 3])      # 16 MiB
        _sparse(small, 256, [1, 2, 3])     # 1 MiB
        async with serve(mnt) as server:
            with pytest.raises(MigrationAborted) as ei:
                await migrate(server, big, FakeWorkload())
            assert ei.value.code == AbortCode.REGION
            assert "MiB free" in str(ei.value)
            report = await migrate(server, small, FakeWorkload())
            assert report.outcome == "committed"
        assert not list(mnt.glob(".*.partial"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_sparse_region_stays_sparse_on_the_destination(work: Path, shm: Path) -> None:
    """Holes declared by the source are neither reserved nor prefaulted on the destination."""
    npages = 32768  # 128 MiB, four data pages far apart
    path = work / "sparse.mem"
    data_pages = [3, 9000, 20000, npages - 1]
    _sparse(path, npages, data_pages)
    mm = np.memmap(path, dtype=np.uint8, mode="r+", shape=(npages, PAGE_SIZE))
    calls = [0]
    from precopy.protocol import Pages
    from precopy.session.exchange import Exchange

    orig = Exchange.send

    async def send_event(self: Exchange, ev: object) -> int:
        # After the holes were sent, the workload writes into one: that
        # page must be reserved on demand on the destination.
        if isinstance(ev, Pages) and len(ev.indices):
            calls[0] += 1
            if calls[0] == 1:
                mm[15000] = 7
        return await orig(self, ev)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Exchange, "send", send_event)
        async with serve(shm / "dest") as server:
            report = await migrate(server, path, FakeWorkload())
    assert report.outcome == "committed"
    dest = shm / "dest" / "sparse.mem"
    assert dest.read_bytes() == path.read_bytes()
    assert bytes(mm[15000]) == bytes([7]) * PAGE_SIZE
    allocated = os.stat(dest).st_blocks * 512
    # Four 8 MiB preparation chunks hold data; the page written later is
    # reserved on its own.  Far less than the 128 MiB region.
    assert allocated <= 4 * 8 * 1024 * 1024 + 64 * PAGE_SIZE, allocated

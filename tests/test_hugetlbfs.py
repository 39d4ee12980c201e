"""A region on hugetlbfs (2 MiB pages) migrates to a destination on hugetlbfs (root only)."""

from __future__ import annotations

import mmap
import os
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from .test_engine import FakeWorkload, migrate, serve

HUGE_PAGES = 48  # 96 MiB: room for a 32 MiB source, its copy, and a refused oversized one


@pytest.fixture
def hugetlbfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip(reason="reserving huge pages and mounting hugetlbfs needs root")
    nr = Path("/proc/sys/vm/nr_hugepages")
    before = nr.read_text().strip()
    try:
        nr.write_text(str(int(before) + HUGE_PAGES))
    except OSError as exc:
        pytest.skip(reason=f"cannot reserve huge pages: {exc}")
    mnt = tmp_path / "huge"
    mnt.mkdir()
    try:
        if subprocess.run(["mount", "-t", "hugetlbfs", "none", str(mnt)], capture_output=True).returncode:
            pytest.skip(reason="cannot mount hugetlbfs here")
        if int(nr.read_text()) < int(before) + HUGE_PAGES:
            pytest.skip(reason="the kernel could not provide the huge pages")
        try:
            yield mnt
        finally:
            subprocess.run(["rm", "-rf", str(mnt / "src"), str(mnt / "dest")], check=False)
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        nr.write_text(before)


async def test_hugetlbfs_region_round_trip(hugetlbfs: Path) -> None:
    (hugetlbfs / "src").mkdir()
    src = hugetlbfs / "src" / "vm.mem"
    size = 32 << 20
    fd = os.open(src, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        data = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8)
        np.frombuffer(m, dtype=np.uint8)[:] = data
        async with serve(hugetlbfs / "dest", state_dir=hugetlbfs.parent / "state") as server:
            report = await migrate(server, src, FakeWorkload(blob=b"dev"))
        assert report.outcome == "committed"
        got = np.fromfile(hugetlbfs / "dest" / "vm.mem", dtype=np.uint8)
        assert np.array_equal(got, data)
        assert (hugetlbfs.parent / "state" / "vm.mem.device-state").read_bytes() == b"dev"
        m.close()
    finally:
        os.close(fd)


async def test_hugetlbfs_memory_dir_without_state_dir_fails_at_start(hugetlbfs: Path) -> None:
    from precopy.session.destination import DestinationServer, DestOptions
    from precopy.errors import RegionError

    server = DestinationServer(DestOptions(memory_dir=hugetlbfs / "dest", port=0))
    with pytest.raises(RegionError, match="state-dir"):
        await server.start()

"""Mapping a region's pages in (precopy.memory.map_in): every page asked for ends up mapped, no hole is allocated."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from precopy.memory import map_in
from precopy.memory.map_in import TMPFS_MAGIC, MapIn, _present, fs_magic
from precopy.memory.region import GuestMemory
from precopy.protocol import PAGE_SIZE

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir() or fs_magic(SHM) != TMPFS_MAGIC, reason="needs a tmpfs /dev/shm")


@pytest.fixture
def region(tmp_path: Path):  # noqa: ARG001 (tmp_path: a unique name)
    path = SHM / f"precopy-test-map-in-{os.getpid()}-{tmp_path.name}.mem"
    with open(path, "wb") as f:  # data, a hole of 256 pages, data
        f.write(os.urandom(PAGE_SIZE) * 384)
        f.seek(640 * PAGE_SIZE)
        f.write(os.urandom(PAGE_SIZE) * 384)
    mem = GuestMemory.open(path, writable=False)
    try:
        yield mem
    finally:
        mem.close()
        path.unlink()


def _blocks(mem: GuestMemory) -> int:
    return os.stat(mem.path).st_blocks


def test_pages_asked_for_are_mapped_in_by_one_read_a_window_and_the_hole_stays_one(region: GuestMemory) -> None:
    m = region.prep.map_in
    blocks = _blocks(region)
    assert not _present(m.base, region.npages).any()
    m.pages(3, 383)  # starts mid-window
    assert m.by_touch is True  # the kernel's default fault-around maps a window a read
    present = _present(m.base, region.npages)
    # (fault-around skips a page the kernel holds locked at that moment: it faults when used)
    assert present is not None and np.count_nonzero(present[3:383]) >= 0.9 * 380
    assert not present[400:640].any()  # nothing in the hole...
    assert _blocks(region) == blocks  # ...and nothing allocated there
    m.pages(640, 1024)
    assert np.count_nonzero(_present(m.base, region.npages)[640:]) >= 0.9 * 384
    assert _blocks(region) == blocks


def test_when_a_read_does_not_map_its_window_populate_does(region: GuestMemory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(map_in, "WINDOW", 1 << 20)  # one read for the whole range: most pages left out
    m = MapIn(region.path, region.prep.map_in.base, region.size)
    m.pages(0, 384)
    assert m.by_touch is False  # one page of 384 read: populate maps them
    present = _present(m.base, region.npages)
    assert present is not None and present[:384].all()
    m.pages(640, 1024)  # MADV_POPULATE_READ from now on
    assert _present(m.base, region.npages)[640:].all()


def test_the_map_in_thread_maps_every_page_of_the_mask(region: GuestMemory) -> None:
    mask = np.zeros(region.npages, dtype=bool)
    mask[:384] = mask[640:] = True
    blocks = _blocks(region)
    region.prep.start_map_in(mask)
    region.prep.wait_map_in()
    present = _present(region.prep.map_in.base, region.npages)
    assert present is not None and np.count_nonzero(present[mask]) >= 0.9 * mask.sum()
    assert not present[400:640].any()
    assert _blocks(region) == blocks


def test_other_file_systems_keep_populate(tmp_path: Path) -> None:
    if fs_magic(tmp_path) == TMPFS_MAGIC:
        pytest.skip("tmp_path is on tmpfs")
    path = tmp_path / "r.mem"
    path.write_bytes(os.urandom(PAGE_SIZE) * 64)
    mem = GuestMemory.open(path, writable=False)
    try:
        assert mem.prep.map_in.by_touch is False
        mem.prep.map_in_now(0, 64)
        assert _present(mem.prep.map_in.base, 64).all()
    finally:
        mem.close()

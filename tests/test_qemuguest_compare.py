"""compare_ram, the QEMU tests' judge of a migrated VM's RAM, on synthetic RAM files (no QEMU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from precopy.qemuguest import DATA_BASE, VER_BASE, expected_page
from precopy.qemuguest.vm import compare_ram

PAGE = 4096
MEM = 16 << 20


def _ram() -> np.ndarray:
    ram = np.zeros(MEM, np.uint8)
    ver = ram[VER_BASE:VER_BASE + MEM // PAGE * 4].view("<u4")
    for p in range(DATA_BASE // PAGE, MEM // PAGE):
        ver[p] = 1
        ram[p * PAGE:(p + 1) * PAGE] = np.frombuffer(expected_page(p, 1), np.uint8)
    return ram


def test_a_page_the_resumed_guest_was_writing_is_in_flight_not_a_difference(tmp_path: Path) -> None:
    src = _ram()
    dst = src.copy()
    first = DATA_BASE // PAGE
    half = first + 3  # stopped in the middle of writing version 2 (its number still says 1)
    dst[half * PAGE:half * PAGE + 2048] = np.frombuffer(expected_page(half, 2), np.uint8)[:2048]
    (tmp_path / "src").write_bytes(src.tobytes())
    (tmp_path / "dst").write_bytes(dst.tobytes())
    cmp = compare_ram(tmp_path / "src", tmp_path / "dst", MEM)
    assert (cmp.dest_in_flight, cmp.differing_same_version, cmp.pages_older) == (1, 0, 0), cmp

    wrong = first + 5  # bytes that belong to no version: a real difference
    dst[wrong * PAGE + 8] ^= 1
    (tmp_path / "dst").write_bytes(dst.tobytes())
    cmp = compare_ram(tmp_path / "src", tmp_path / "dst", MEM)
    assert (cmp.dest_in_flight, cmp.differing_same_version) == (1, 1), cmp

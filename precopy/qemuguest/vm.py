"""Helpers to run the test guest in QEMU and check a migrated copy of its RAM.

Used by the tests, benchmarks/qemu_vm.py and the README walk-through.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import DATA_BASE, VER_BASE, expected_page

__all__ = ["children", "QEMU", "qemu_available", "guest_argv", "backend_argv", "serial_ticks", "Tick",
           "compare_ram", "RamComparison"]

QEMU = "qemu-system-x86_64"
PAGE = 4096
_TICK = re.compile(rb"precopy-guest tick=(\d+) writes=(\d+) sweeps=(\d+) bad=(\d+)")


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (e.g. the VMs a precopy-dest started)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            data = stat.read_bytes()
        except OSError:
            continue  # it exited meanwhile
        fields = data[data.rindex(b")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def qemu_available() -> str | None:
    """The path of qemu-system-x86_64, or None."""
    return shutil.which(QEMU)


def guest_argv(kernel: Path, mem_mib: int, *, rate: int, hot: int) -> list[str]:
    """QEMU options for the test guest (TCG: same behaviour with or without KVM)."""
    return [QEMU, "-accel", "tcg", "-machine", "pc", "-m", f"{mem_mib}M", "-nodefaults",
            "-no-user-config", "-display", "none", "-kernel", str(kernel),
            "-append", f"rate={rate} hot={hot}"]


def backend_argv(mem_path: str, size: str, *, share: bool = True) -> list[str]:
    """Guest RAM in a file: memory-backend-file id=ram0 (the id must match on both sides)."""
    opts = f"id=ram0,size={size},mem-path={mem_path}" + (",share=on" if share else "")
    return ["-object", f"memory-backend-file,{opts}", "-machine", "memory-backend=ram0"]


def command_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) if "{" not in a else a for a in argv)


@dataclass(frozen=True)
class Tick:
    tick: int
    writes: int
    sweeps: int
    bad: int


def serial_ticks(path: Path) -> list[Tick]:
    """The guest's progress lines so far (a missing file: none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [Tick(*map(int, m.groups())) for m in _TICK.finditer(data)]


@dataclass
class RamComparison:
    pages_same_version: int   # data pages the destination has not rewritten since the switchover
    pages_newer: int          # data pages the destination guest rewrote after resuming
    pages_older: int          # must be 0: the destination holds an older page than the source had
    differing_same_version: int  # must be 0: same version, different bytes (in-flight pages aside)
    low_mib_equal: bool       # the first MiB (BIOS data, real-mode area) is identical
    source_inconsistent: int  # source pages whose bytes do not match their version (<= 1: in flight)
    dest_in_flight: int = 0   # same version, but the destination's bytes are the next version's: the
    #                           resumed guest was stopped between a page's data and its version (<= 1)


def compare_ram(source: Path, dest: Path, mem_bytes: int) -> RamComparison:
    """Compare the paused source's RAM file with the destination's (pause it first).

    The guest records every data page's version in a table; a page the
    destination has not rewritten since the switchover must be byte for
    byte what the source held, and no page may be older than the source's.
    """
    src = np.memmap(source, dtype=np.uint8, mode="r")
    dst = np.memmap(dest, dtype=np.uint8, mode="r")
    npages = min(mem_bytes, 0xC0000000) // PAGE
    first = DATA_BASE // PAGE
    sv = src[VER_BASE:VER_BASE + npages * 4].view("<u4")
    dv = dst[VER_BASE:VER_BASE + npages * 4].view("<u4").copy()
    # The guest uses the pages below its top of RAM (multiboot mem_upper); it
    # starts every version at 1.
    pages = np.arange(first, npages)[sv[first:] > 0]
    if pages.size == 0:
        raise ValueError(f"{source} holds no version table: not the precopy test guest's RAM?")
    same = pages[dv[pages] == sv[pages]]
    newer = int(np.count_nonzero(dv[pages] > sv[pages]))
    older = int(np.count_nonzero(dv[pages] < sv[pages]))
    s2 = src[:npages * PAGE].reshape(npages, PAGE)
    d2 = dst[:npages * PAGE].reshape(npages, PAGE)
    differing = in_flight = 0
    for start in range(0, len(same), 4096):
        idx = same[start:start + 4096]
        for p in idx[(s2[idx] != d2[idx]).any(axis=1)]:
            # The guest writes a page's data, then its version: stopped in between (or in
            # the middle of the page), the destination holds the next version's words
            # under the old number, in front of the old version's.
            have = d2[p].view("<u4")
            new_words = have == np.frombuffer(expected_page(int(p), int(dv[p]) + 1), "<u4")
            old_words = have == np.frombuffer(expected_page(int(p), int(dv[p])), "<u4")
            if new_words.any() and (new_words | old_words).all():
                in_flight += 1
            else:
                differing += 1
    inconsistent = 0
    for p in pages:
        if bytes(s2[p]) != expected_page(int(p), int(sv[p])):
            inconsistent += 1
    return RamComparison(len(same), newer, older, differing,
                         bool(np.array_equal(src[:1 << 20], dst[:1 << 20])), inconsistent, in_flight)

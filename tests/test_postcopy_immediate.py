"""``--postcopy immediate``: post-copy before any copy (precopy.session.postcopy_immediate).

The pure parts without sockets (which pages are missing, holes looked at again, the options, the
capabilities), then end to end on loopback with real agents: the det guest (its digest says every
page arrived exactly right) on a full region, on a sparse one into a new destination region and into
an existing one holding stale bytes where the source has holes; and the full-speed sweep guest, whose
invariant is checked byte by byte (benchmarks.postcopy.check_sweep).  No timing assertions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from precopy.memory.region import GuestMemory
from precopy.policy.postcopy import check_postcopy
from precopy.protocol import POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP, POSTCOPY_LANE_CAP
from precopy.session import postcopy_dest
from precopy.session.options import SourceOptions
from precopy.session.postcopy_immediate import immediate_missing
from precopy.session.postcopy_source import offered_caps

from .conftest import Procs, create_region, guest, run_source, start_dest, wait_for
from .test_postcopy import det_hook, det_source, reference_digest

PAGE = 4096


# -- the pure parts ---------------------------------------------------------


def test_missing_is_every_page_but_the_holes() -> None:
    holes = np.zeros(10, dtype=bool)
    holes[[0, 3, 4, 9]] = True
    assert np.flatnonzero(immediate_missing(holes)).tolist() == [1, 2, 5, 6, 7, 8]
    assert immediate_missing(np.zeros(4, dtype=bool)).all()
    assert not immediate_missing(np.ones(4, dtype=bool)).any()
    got = immediate_missing(holes)
    assert got.dtype == bool and got is not holes and holes.sum() == 4  # a mask of its own


def test_holes_are_looked_at_again_after_writes(shm: Path) -> None:
    path = shm / "sparse.mem"
    with open(path, "wb") as f:
        f.truncate(64 * PAGE)
    fd = os.open(path, os.O_RDWR)
    try:
        for page in (2, 3, 20, 63):
            os.pwrite(fd, b"x" * PAGE, page * PAGE)
        mem = GuestMemory.open(path, writable=False)
        try:
            before = mem.hole_pages()
            assert np.flatnonzero(~before).tolist() == [2, 3, 20, 63]
            assert np.array_equal(mem.holes_still(before), before)  # nothing written since
            for page in (0, 21, 22, 40):  # written into holes after the first look (a page of data too)
                os.pwrite(fd, b"y", page * PAGE + 100)
            os.pwrite(fd, b"z" * PAGE, 2 * PAGE)
            now = mem.holes_still(before)
            assert np.flatnonzero(~now).tolist() == [0, 2, 3, 20, 21, 22, 40, 63]
            assert np.array_equal(now, mem.hole_pages())
            assert not mem.holes_still(np.zeros(64, dtype=bool)).any()
        finally:
            mem.close()
    finally:
        os.close(fd)


def test_options_and_capabilities(shm: Path) -> None:
    check_postcopy("immediate", "abort")
    with pytest.raises(ValueError, match="stop-and-copy"):
        check_postcopy("immediate", "abort", "stop-and-copy")
    region = shm / "r.mem"
    region.write_bytes(b"\0" * PAGE)
    opts = SourceOptions(memory=region, host="127.0.0.1", port=1, postcopy="immediate")
    assert opts.streams == 1
    assert offered_caps(opts) == (POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP)
    assert offered_caps(SourceOptions(memory=region, host="127.0.0.1", port=1, postcopy="now")) == (POSTCOPY_CAP,)
    assert offered_caps(SourceOptions(memory=region, host="127.0.0.1", port=1, postcopy="now",
                                      postcopy_lane=True)) == (POSTCOPY_CAP, POSTCOPY_LANE_CAP)
    with pytest.raises(ValueError, match="one connection"):
        SourceOptions(memory=region, host="127.0.0.1", port=1, postcopy="immediate", streams=2)


def test_destination_names_the_immediate_cap_back_unless_hugetlbfs(monkeypatch: pytest.MonkeyPatch,
                                                                 shm: Path) -> None:
    opts = SimpleNamespace(on_resume="guest", workload=None, memory_dir=shm)
    offered = (POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP, "other")
    assert postcopy_dest.dest_caps(opts, offered) == (POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP)  # type: ignore[arg-type]
    assert postcopy_dest.dest_caps(opts, (POSTCOPY_CAP,)) == (POSTCOPY_CAP,)  # type: ignore[arg-type]
    monkeypatch.setattr(postcopy_dest, "fs_magic", lambda path: postcopy_dest.HUGETLBFS_MAGIC)
    assert postcopy_dest.dest_caps(opts, offered) == ()  # type: ignore[arg-type]


def _first_bytes(src: np.ndarray, sweeps: int, at: int) -> np.ndarray:
    """The source's first bytes after a destination sweep of ``sweeps`` whole sweeps, standing at ``at``."""
    d = np.full(len(src), sweeps, dtype=np.int64)
    d[:at] += 1
    return ((src.astype(np.int64) + d) % 256).astype(np.uint8)


@pytest.mark.parametrize("sweeps", [0, 1, 254, 255, 256, 511, 1000])
@pytest.mark.parametrize("at", [0, 1, 2048, 8191])
def test_sweep_check_takes_a_first_byte_mod_256(sweeps: int, at: int) -> None:
    """A 32 MiB sweep runs thousands of times a second: the count of whole sweeps is any residue mod 256.
    255 reads as d = 0 before the guest's page and 255 after (the check's rare false failure, found
    2026-12-07: [[0, 0], [5120, 255]])."""
    from benchmarks.postcopy import sweep_steps

    src = np.random.default_rng(sweeps * 7 + at).integers(0, 256, 8192, dtype=np.uint8)
    dest = _first_bytes(src, sweeps, at)
    got = sweep_steps(dest, src)
    assert got["sweep_ok"] and got["sweeps"] == sweeps % 256, got
    assert got["at_page"] == at, got
    exact = sweep_steps(dest, src, written=sweeps * 8192 + at)
    assert exact["sweep_ok"] and (exact["expected_sweeps"], exact["expected_at_page"]) == (sweeps % 256, at), exact


def test_sweep_check_refuses_what_no_sweep_leaves() -> None:
    from benchmarks.postcopy import sweep_steps

    src = np.random.default_rng(1).integers(0, 256, 8192, dtype=np.uint8)
    step_down = _first_bytes(src, 3, 0)
    step_down[4096:] += 1  # the later pages ahead of the earlier ones
    two_steps = _first_bytes(src, 3, 1024)
    two_steps[6000:] += 1
    jump = _first_bytes(src, 3, 0)
    jump[:1024] += 2  # the earlier pages two sweeps ahead
    lost = _first_bytes(src, 3, 2048)
    lost[5000:5001] -= 1  # one page the destination's guest did not write (or written over after)
    for bad in (step_down, two_steps, jump, lost):
        assert not sweep_steps(bad, src)["sweep_ok"]
    # A copy one whole sweep stale has the right shape; only the guest's own count tells.
    stale = _first_bytes(src, 4, 2048)
    assert sweep_steps(stale, src)["sweep_ok"]
    got = sweep_steps(stale, src, written=5 * 8192 + 2048)
    assert not got["sweep_ok"] and got["expected_sweeps"] == 5 and got["sweeps"] == 4, got


# -- end to end -------------------------------------------------------------

def _check_report(rep: dict, npages: int, holes: int) -> dict:  # type: ignore[type-arg]
    assert rep["outcome"] == "committed", rep
    assert rep["tracking"] == "none" and rep["max_throttle_pct"] == 0, rep
    assert [r["kind"] for r in rep["rounds"]] == ["postcopy"], rep["rounds"]
    pc = rep["postcopy"]
    assert pc["mode"] == "immediate" and pc["holes"] == holes, pc
    assert pc["pages_missing"] == npages - holes, pc
    assert pc["pages_pushed"] + pc["pages_requested"] == pc["pages_missing"], pc  # each page once
    assert pc["duplicates"] == 0 and pc["reconnects"] == 0, pc
    return pc  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.parametrize("early", [True, False], ids=["guest-early", "guest-at-switchover"])
def test_immediate_gives_the_unmigrated_digest(procs: Procs, shm: Path, early: bool) -> None:
    expected = reference_digest(procs, shm)
    out = shm / "resumed.json"
    dest = start_dest(procs, shm, "--on-resume", det_hook(out), *(["--postcopy-guest-early"] if early else []))
    src, ctl = det_source(procs, shm)
    rc, rep, log = run_source(shm, "--to", dest.addr, "--memory", str(src), "--guest-control", str(ctl),
                              "--postcopy", "immediate", "--on-commit", "kill")
    assert rc == 0 and rep is not None, log + dest.log_text()
    _check_report(rep, 2048, 0)
    wait_for(out.exists, timeout=120, what="the resumed det guest to finish")
    assert json.loads(out.read_text()) == {"steps": 20000, "digest": expected}
    records = [json.loads(p.read_text()) for p in (dest.memory_dir / ".precopy" / "journal").glob("*.json")
               if p.name != ".probe.json"]
    assert [(r["outcome"], r["postcopy"]) for r in records] == [("committed", "complete")]


def _sparse_region(path: Path) -> int:
    """8 MiB, random data in every third run of 16 pages, holes elsewhere; returns the holes."""
    create_region(path, "8M", content="zero")
    rng = np.random.default_rng(5)
    fd = os.open(path, os.O_RDWR)
    try:
        for run in range(0, 2048 // 16, 3):
            os.pwrite(fd, rng.integers(0, 256, 16 * PAGE, dtype=np.uint8).tobytes(), run * 16 * PAGE)
    finally:
        os.close(fd)
    mem = GuestMemory.open(path, writable=False)
    try:
        return int(mem.hole_pages().sum())
    finally:
        mem.close()


@pytest.mark.integration
@pytest.mark.parametrize("existing", [False, True], ids=["new-region", "existing-region"])
def test_immediate_sparse_region_holes_not_sent(procs: Procs, shm: Path, existing: bool) -> None:
    """A sparse source: its holes are not missing (the new region reads zeros there; an existing one
    holding stale bytes gets them as zero pages before the pause), and the result is exact."""
    src, ref = shm / "vm.mem", shm / "ref.mem"
    holes = _sparse_region(src)
    assert 0 < holes < 2048
    subprocess.run(["cp", "--sparse=always", str(src), str(ref)], check=True)
    r = procs.start(*guest("det", "--memory", str(ref), "--steps", "20000"), stdout=open(shm / "ref.out", "wb"))
    assert r.wait(120) == 0
    expected = json.loads((shm / "ref.out").read_text())["digest"]
    if existing:
        (shm / "dest").mkdir()
        create_region(shm / "dest" / "vm.mem", "8M", seed=3)  # stale bytes everywhere
    out = shm / "resumed.json"
    dest = start_dest(procs, shm, "--on-resume", det_hook(out), "--postcopy-guest-early")
    ctl = shm / "det.sock"
    # Slowly: each step reads a page, and a hole read through the mapping is allocated.
    procs.start(*guest("det", "--memory", str(src), "--steps", "20000", "--control", str(ctl),
                       "--step-sleep-us", "5000"), stdout=open(shm / "det.out", "wb"))
    wait_for(ctl.exists, what="det guest control socket")
    rc, rep, log = run_source(shm, "--to", dest.addr, "--memory", str(src), "--guest-control", str(ctl),
                              "--postcopy", "immediate", "--on-commit", "kill")
    assert rc == 0 and rep is not None, log + dest.log_text()
    assert rep["dest_region"] == ("existing" if existing else "new"), rep
    pc = rep["postcopy"]
    # The det guest ran a little on the source first: holes it wrote before the pause are missing too.
    assert 0 < pc["holes"] <= holes and pc["pages_missing"] == 2048 - pc["holes"], pc
    if existing:  # the holes went as zero pages before the pause (the stale bytes there zeroed)
        assert rep["zero_pages"] >= pc["holes"], rep
    else:
        assert rep["zero_pages"] == 0, rep
    wait_for(out.exists, timeout=120, what="the resumed det guest to finish")
    assert json.loads(out.read_text()) == {"steps": 20000, "digest": expected}


@pytest.mark.integration
def test_immediate_sweep_invariant_byte_exact(procs: Procs, shm: Path) -> None:
    """The full-speed sweep (never converges) moved by --postcopy immediate: every byte but the first of
    every page is the source's, and every page's first byte is the source's plus exactly what the
    destination's guest added, by its own count of pages written (benchmarks.postcopy)."""
    from benchmarks.postcopy import DestSweep, Run, check_sweep

    work = shm / "bench"
    dest_guest = DestSweep(shm, ["--pattern", "sweep"])
    run = Run(work, 32, ["--pattern", "sweep"], dest_guest.hook, ("--postcopy-guest-early",))
    try:
        rep = run.migrate("--postcopy", "immediate", "--on-commit", "keep-stopped")
        _check_report(rep, 32 * 256, 0)
        dest_guest.pause()
        got = check_sweep(run.src, work / "dest" / "vm.mem", dest_guest.stop())
        assert got["rest_exact"] and got["sweep_ok"], json.dumps({"check": got, "postcopy": rep["postcopy"],
                                                                   "phases_ms": rep["phases_ms"]})
    finally:
        dest_guest.kill()
        run.close()
        shutil.rmtree(work, ignore_errors=True)

"""Preflight: the destination checks a region before any page moves; --dry-run runs only that."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from precopy.session import preflight
from precopy.errors import AbortCode, MigrationAborted, PrecopyError, RegionError, RemoteProtocolError
from precopy.session.source import migrate as engine_migrate
from precopy.protocol import PAGE_SIZE, Begin, Kind, encode_frame

from .conftest import Procs, create_region, guest, proc_state, run_source, start_dest
from .helpers import HANDSHAKE, Pair, S, dest_copying, feed, frame, join
from .test_engine import FakeWorkload, make_region, options, serve

MiB = 1 << 20


# -- the checks, pure -------------------------------------------------------


def test_checks_pass_and_say_what_they_checked(tmp_path: Path) -> None:
    passed = preflight.check_destination(size=MiB, page_size=PAGE_SIZE, memory_dir=tmp_path,
                                         requires={"executables": ["sh"]})
    assert any("free space" in p for p in passed)
    assert "executables: sh" in passed


def test_region_larger_than_free_space_names_both_sizes(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(RegionError, match=r"MiB free, the region needs") as err:
        preflight.check_destination(size=free + 64 * MiB, page_size=PAGE_SIZE, memory_dir=tmp_path, requires={})
    assert str(tmp_path) in str(err.value)



def test_an_existing_region_needs_no_new_space(tmp_path: Path) -> None:
    """Received into a region file the destination already holds, the region needs
    no room beyond it: a repeat migration fits a directory without space for a copy."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    size = free + 64 * MiB
    passed = preflight.check_destination(size=size, page_size=PAGE_SIZE, memory_dir=tmp_path, requires={},
                                         have=size, mem_available_fn=lambda: None)
    assert any("existing region" in p for p in passed)
    with pytest.raises(RegionError, match="the region needs"):  # only part of it is held
        preflight.check_destination(size=size, page_size=PAGE_SIZE, memory_dir=tmp_path, requires={},
                                    have=32 * MiB, mem_available_fn=lambda: None)

def test_region_larger_than_available_memory_on_tmpfs() -> None:
    shm = Path("/dev/shm")
    if preflight.fs_type(shm) != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    with pytest.raises(RegionError, match=r"tmpfs \(RAM\) and this host has 1 MiB of memory available, "
                                          r"the region needs 8 MiB"):
        preflight.check_destination(size=8 * MiB, page_size=PAGE_SIZE, memory_dir=shm, requires={},
                                    mem_available_fn=lambda: MiB)


def test_guest_requirements() -> None:
    flags = lambda: frozenset({"sse2", "avx2"})  # noqa: E731
    preflight.check_destination(size=MiB, page_size=PAGE_SIZE, memory_dir=Path("/tmp"),
                                requires={"cpu_flags": ["sse2", "avx2"]}, cpu_flags_fn=flags)
    with pytest.raises(PrecopyError, match="CPUs lack flag.*avx512f") as err:
        preflight.check_destination(size=MiB, page_size=PAGE_SIZE, memory_dir=Path("/tmp"),
                                    requires={"cpu_flags": ["sse2", "avx512f"]}, cpu_flags_fn=flags)
    assert err.value.code is AbortCode.GUEST
    with pytest.raises(PrecopyError, match="not on this host's PATH: no-such-vmm"):
        preflight.check_destination(size=MiB, page_size=PAGE_SIZE, memory_dir=Path("/tmp"),
                                    requires={"executables": ["sh", "no-such-vmm"]})
    with pytest.raises(PrecopyError, match="requirement 'gpu' is unknown"):
        preflight.check_destination(size=MiB, page_size=PAGE_SIZE, memory_dir=Path("/tmp"),
                                    requires={"gpu": ["a100"]})


def test_this_host_has_cpu_flags() -> None:
    assert "fpu" in preflight.cpu_flags() or not Path("/proc/cpuinfo").exists()


# -- the wire ------------------------------------------------------------------


def test_begin_carries_dry_run_and_requirements() -> None:
    pair = Pair()
    pair.handshake()
    got = pair.send(S, Begin(migration_id="m", name="r", size=8 * PAGE_SIZE, dry_run=True,
                             requires={"cpu_flags": ("sse2",)}))
    assert got[0].dry_run is True and got[0].requires == {"cpu_flags": ("sse2",)}


@pytest.mark.parametrize("requires", [
    ["not", "a", "map"],
    {"k": "not a list"},
    {"k": [1]},
    {"": ["x"]},
    {f"k{i}": ["x"] for i in range(17)},
    {"k": ["x" * 129]},
])
def test_invalid_requirements_are_protocol_errors(requires: object) -> None:
    pair = Pair()
    pair.handshake()
    meta = {"migration_id": "m", "name": "r", "size": 8 * PAGE_SIZE, "page_size": PAGE_SIZE,
            "chunk_pages": 32, "requires": requires}
    with pytest.raises(RemoteProtocolError, match="requires|requirement"):
        feed(pair.dst, frame(Kind.BEGIN, meta))


def test_dry_run_must_be_a_boolean() -> None:
    pair = Pair()
    pair.handshake()
    meta = {"migration_id": "m", "name": "r", "size": 8 * PAGE_SIZE, "page_size": PAGE_SIZE,
            "chunk_pages": 32, "dry_run": 1}
    with pytest.raises(RemoteProtocolError, match="dry_run"):
        feed(pair.dst, frame(Kind.BEGIN, meta))


def test_old_begin_without_the_new_fields_still_decodes() -> None:
    dst = dest_copying()
    assert dst.begin is not None and dst.begin.dry_run is False and dst.begin.requires == {}
    assert HANDSHAKE and join(encode_frame(Kind.READY))


# -- in the engine ----------------------------------------------------------------


class NeedsGpu(FakeWorkload):
    def requirements(self) -> dict[str, list[str]]:
        return {"executables": ["sh", "precopy-no-such-vmm"]}


async def test_failed_guest_requirement_leaves_workload_running_and_says_what(tmp_path: Path) -> None:
    region = tmp_path / "g.mem"
    make_region(region, 64)
    wl = NeedsGpu()
    async with serve(tmp_path / "in") as server:
        with pytest.raises(MigrationAborted, match="precopy-no-such-vmm") as err:
            await engine_migrate(options(server, region), wl)
    assert wl.calls == []  # never paused
    assert err.value.report.pages_sent == 0  # type: ignore[attr-defined]
    assert not list((tmp_path / "in").glob("*g.mem*"))


async def test_dry_run_moves_nothing_and_creates_nothing(tmp_path: Path) -> None:
    region = tmp_path / "g.mem"
    make_region(region, 64)
    wl = FakeWorkload()
    async with serve(tmp_path / "in") as server:
        rep = await engine_migrate(options(server, region, dry_run=True), wl)
        assert rep.outcome == "preflight-ok" and rep.bytes_on_wire == 0
        assert server.results == []
    assert wl.calls == []
    assert not [p for p in (tmp_path / "in").iterdir() if p.name != ".precopy"]


# -- the command ----------------------------------------------------------------------


def test_dry_run_command_ok_and_refused(procs: Procs, work: Path, shm: Path) -> None:
    region = work / "g.mem"
    create_region(region, "4M")
    g = procs.start(*guest("dirty", "--memory", str(region), "--rate", "200"))
    dest = start_dest(procs, work)
    code, rep, out = run_source(work, "--to", dest.addr, "--memory", str(region), "--pid", str(g.pid), "--dry-run")
    assert code == 0, out
    assert rep is not None and rep["outcome"] == "preflight-ok"
    assert "preflight" in out and "nothing was paused or sent" in out
    assert proc_state(g.pid) != "T"
    assert not (dest.memory_dir / "g.mem").exists()


def test_dry_run_refused_by_a_full_memory_dir(procs: Procs, work: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = work / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "ops-preflight", str(small)], check=True)
    try:
        region = work / "g.mem"
        create_region(region, "8M")
        g = procs.start(*guest("dirty", "--memory", str(region), "--rate", "200"))
        dest = start_dest(procs, work, "--memory-dir", str(small / "in"))
        for extra in (["--dry-run"], []):
            code, rep, out = run_source(work, "--to", dest.addr, "--memory", str(region), "--pid", str(g.pid),
                                        *extra)
            assert code == 3, out
            assert "has 2 MiB free, the region needs 8 MiB" in out
            assert rep is not None and rep["pages_sent"] == 0
            assert proc_state(g.pid) != "T"  # never paused
        dest.proc.terminate()
        dest.proc.wait(10)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)

"""The generic adapter hooks the QEMU adapter uses, driven with fakes in process.

Source: a workload's ``phases_ms`` land in the report, its
``switchover_cost_s`` in the downtime estimate.  Destination: a
DestWorkload is prepared at BEGIN, checked before the commit, resumed after
it (its timings reach the source's report), discarded when there is none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from precopy.errors import GuestControlError, MigrationAborted

from .test_engine import FakeWorkload, make_region, migrate, serve, settled


class TimedWorkload(FakeWorkload):
    phases_ms = {"vmm_save": 1.5}
    switchover_cost_s = 0.25


class FakeDest:
    def __init__(self, *, refuse: bool = False) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.refuse = refuse
        self.prepared_existed = False

    async def prepare(self, migration_id: str, name: str, region: Path, size: int) -> None:
        self.prepared_existed = region.exists() and region.stat().st_size == size
        self.calls.append(("prepare", name, region.name))

    async def check(self, migration_id: str) -> None:
        self.calls.append(("check",))
        if self.refuse:
            raise GuestControlError("test: the destination VM cannot run")

    async def resume(self, migration_id: str, memory: Path, device_state: Path) -> dict[str, float]:
        self.calls.append(("resume", memory.name, device_state.read_bytes().decode()))
        return {"vmm_load": 2.5}

    async def discard(self, migration_id: str) -> None:
        self.calls.append(("discard",))


async def test_adapters_are_prepared_checked_resumed_and_report_their_timings(tmp_path: Path) -> None:
    src = tmp_path / "vm.mem"
    make_region(src, 256)
    dest = FakeDest()
    async with serve(tmp_path / "in", workload=dest) as server:
        rep = await migrate(server, src, TimedWorkload(b"cpu"), downtime_ms=1000)
    assert rep.outcome == "committed"
    assert [c[0] for c in dest.calls] == ["prepare", "check", "resume"]
    assert dest.prepared_existed and dest.calls[0][2].endswith(".partial")
    assert dest.calls[2][1:] == ("vm.mem", "cpu")
    assert rep.phases_ms["vmm_save"] == 1.5 and rep.phases_ms["dest_vmm_load"] == 2.5
    assert rep.expected_downtime_ms is not None and rep.expected_downtime_ms >= 250


async def test_adapter_refusing_before_commit_rolls_back(tmp_path: Path) -> None:
    src = tmp_path / "vm.mem"
    make_region(src, 256)
    dest, wl = FakeDest(refuse=True), FakeWorkload(b"cpu")
    async with serve(tmp_path / "in", workload=dest) as server:
        with pytest.raises(MigrationAborted, match="cannot run"):
            await migrate(server, src, wl, downtime_ms=1000)
        await settled(server)
    assert wl.calls == ["pause", "resume"]
    assert [c[0] for c in dest.calls] == ["prepare", "check", "discard"]
    assert not (tmp_path / "in" / "vm.mem").exists()
    assert not list((tmp_path / "in").glob(".*.partial"))


async def test_adapter_is_discarded_when_the_source_fails_to_pause(tmp_path: Path) -> None:
    src = tmp_path / "vm.mem"
    make_region(src, 64)
    dest = FakeDest()
    async with serve(tmp_path / "in", workload=dest) as server:
        with pytest.raises(MigrationAborted):
            await migrate(server, src, FakeWorkload(pause_error=GuestControlError("test: no pause")))
        await settled(server)
    assert [c[0] for c in dest.calls] == ["prepare", "discard"]

"""Property: whatever the workload writes while pages are in flight, the
destination ends equal to the paused source and no verification repair is
needed (DESIGN invariants 1 and 2).

Writes are injected at random points of the send path — before and after a
batch is staged, into pages of that very batch (A -> B -> A flips included),
as zero pages, as pages that become non-zero — and stop when the workload is
paused, as a real paused guest would.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import precopy.session.source
from precopy.session.destination import DestinationServer, DestOptions
from precopy.memory.digest import StagingBuffer
from precopy.session.source import SourceOptions
from precopy.protocol import PAGE_SIZE


class PausableWorkload:
    def __init__(self) -> None:
        self.paused = False

    def describe(self) -> str:
        return "property-test workload"

    async def pause(self) -> bytes:
        self.paused = True
        return b"state"

    async def resume(self) -> None:
        self.paused = False

    async def stop(self) -> None:
        pass


async def _migrate_with_writes(root: Path, npages: int, seed: int, write_prob: float,
                               budget_ms: float, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, np.ndarray]:
    src = root / "vm.mem"
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(npages, PAGE_SIZE), dtype=np.uint8)
    data[rng.random(npages) < 0.2] = 0
    src.write_bytes(data.tobytes())
    mm = np.memmap(src, dtype=np.uint8, mode="r+", shape=(npages, PAGE_SIZE))
    wl = PausableWorkload()
    orig = StagingBuffer.load

    def write_some(batch: np.ndarray) -> None:
        for _ in range(int(rng.integers(1, 4))):
            pick = rng.random()
            if pick < 0.4 and len(batch):
                p = int(batch[rng.integers(len(batch))])  # a page of the batch in flight
            else:
                p = int(rng.integers(npages))
            what = rng.random()
            if what < 0.2:
                mm[p] = 0
            elif what < 0.5:
                mm[p, rng.integers(PAGE_SIZE)] ^= 0xFF  # small change
            else:
                mm[p] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)

    def load(self: StagingBuffer, pages: np.ndarray, indices: np.ndarray) -> np.ndarray:
        if wl.paused or rng.random() >= write_prob:
            return orig(self, pages, indices)
        if rng.random() < 0.3 and len(indices):
            # A -> B -> A: the copy sees B, memory is A again right after.
            p = int(indices[rng.integers(len(indices))])
            a = mm[p].copy()
            mm[p] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
            out = orig(self, pages, indices)
            mm[p] = a
            return out
        write_some(indices)
        out = orig(self, pages, indices)
        write_some(indices)
        return out

    monkeypatch.setattr(StagingBuffer, "load", load)
    server = DestinationServer(DestOptions(memory_dir=root / "dest", port=0))
    await server.start()
    serving = asyncio.create_task(server.serve_forever())
    try:
        report = await precopy.session.source.migrate(SourceOptions(
            host="127.0.0.1", port=server.port, memory=src, batch_pages=16, chunk_pages=8,
            downtime_ms=budget_ms, max_rounds=4, on_nonconvergence="force", io_timeout_s=10,
        ), wl)
    finally:
        await server.close()
        await serving
    frozen = np.array(mm)
    mm._mmap.close()  # type: ignore[attr-defined]  # release the mapping before cleanup
    return report, frozen


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(npages=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       write_prob=st.sampled_from([0.0, 0.3, 1.0]), budget_ms=st.sampled_from([0.01, 1000.0]),
       loop=st.sampled_from(["asyncio", "uvloop"]))
def test_destination_equals_paused_source_whatever_the_writes(
    shm: Path, monkeypatch: pytest.MonkeyPatch, npages: int, seed: int, write_prob: float,
    budget_ms: float, loop: str,
) -> None:
    root = shm / f"case-{seed}-{npages}"
    root.mkdir()
    try:
        run = asyncio.run if loop == "asyncio" else uvloop.run
        with monkeypatch.context() as mp:
            report, frozen = run(_migrate_with_writes(root, npages, seed, write_prob, budget_ms, mp))
        assert report.outcome == "committed"
        got = np.fromfile(root / "dest" / "vm.mem", dtype=np.uint8).reshape(npages, PAGE_SIZE)
        assert np.array_equal(got, frozen)
        assert report.verify_repairs == 0
        assert (root / "dest" / "vm.mem.device-state").read_bytes() == b"state"
    finally:
        shutil.rmtree(root, ignore_errors=True)

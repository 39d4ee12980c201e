"""A failed migration lets go of its region at once (found by the soak, benchmarks/soak.py).

When the source went away mid-copy (SIGKILL of the agent, a cut link), the
destination removed the partial file but kept it mapped and open: the
exception that ended the receive loop held its frames, whose locals are
views of the mapping (the batch in hand, a payload received in place), so
``GuestMemory.close`` could not unmap, and the traceback's reference cycle
freed it only at the next full garbage collection -- in the soak, 20
migrations later, with the deleted region's pages still taking RAM on
tmpfs (the whole region, per failed migration). The channel of such a
migration lives on in such cycles too; its ~5 MiB receive buffer must not
(Connection.close drops it). These tests run with the cyclic collector
off, so only what is freed at once counts.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import precopy.session.source
from precopy.errors import MigrationAborted
from precopy.protocol import PAGE_SIZE, Connection, Kind

from .faultproxy import Fault, FaultProxy
from .test_engine import FakeWorkload, serve, settled, wait_until

NPAGES = 4096  # 16 MiB: several PAGES frames (a run goes in 4 MiB frames)


def _region(path: Path, seed: int) -> None:
    """Random pages, none of them zero: the full copy goes in runs (received in place)."""
    data = np.random.default_rng(seed).integers(1, 256, size=NPAGES * PAGE_SIZE, dtype=np.uint8)
    path.write_bytes(data.tobytes())


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _buffers_kept() -> list[int]:
    """Receive buffers (bytes) of connections still alive: a failed migration's
    channel lives on in reference cycles until a full collection; its ~5 MiB
    destination buffer must not (the soak saw RSS grow ~5 MiB per failed
    migration: 43 -> 60 MiB over 16)."""
    return [len(o._buf) for o in gc.get_objects() if isinstance(o, Connection) and len(o._buf)]


async def _released(dest_dir: Path) -> None:
    """The region and the receive buffer go once the connection has ended (its
    record says aborted a little before: the ABORT is still being sent), without
    the cyclic collector: waited for, bounded, as this is not about time."""
    try:
        await wait_until(lambda: not _held(dest_dir) and not _buffers_kept(), timeout=15.0,
                         what="the failed migration's region and buffer to be released")
    except AssertionError:
        raise AssertionError(f"still mapped or open: {_held(dest_dir)}; receive buffers kept: "
                             f"{_buffers_kept()}") from None


def _held(dest_dir: Path) -> list[str]:
    """Files under ``dest_dir`` this process still maps or holds open."""
    out = [line.split(None, 5)[-1].strip() for line in Path("/proc/self/maps").read_text().splitlines()
           if str(dest_dir) in line]
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if str(dest_dir) in target:
            out.append(target)
    return out


@pytest.mark.parametrize("existing", [False, True], ids=["new-region", "existing-region"])
@pytest.mark.parametrize("keep", [0, 300_000], ids=["between-frames", "mid-payload"])
@pytest.mark.parametrize("how", ["cut", "reset"])
async def test_region_unmapped_when_the_source_goes_away(work: Path, dest_dir: Path, no_cyclic_gc: None,
                                                         existing: bool, keep: int, how: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="precopy.memory.region")
    src = work / "vm.mem"
    _region(src, 1)
    if existing:
        # A region already under the name (the back-and-forth case): received
        # in place, straight into its mapping (the payload sink).
        dest_dir.mkdir()
        _region(dest_dir / "vm.mem", 7)
    async with serve(dest_dir) as server:
        # The third PAGES frame of the full copy: the link closes (FIN) or is
        # reset (RST: a SIGKILLed source with unread data) after it (keep=0:
        # at a frame boundary) or 300,000 bytes into it (mid-payload).
        fault = Fault(how, kind=Kind.PAGES, nth=3, keep=keep)
        with FaultProxy(("127.0.0.1", server.port), [fault]) as proxy:
            opts = precopy.session.source.SourceOptions(host="127.0.0.1", port=proxy.port, memory=src, io_timeout_s=10.0,
                                                connect_timeout_s=5.0)
            with pytest.raises(MigrationAborted):
                await precopy.session.source.migrate(opts, FakeWorkload())
            assert fault.fired.is_set()
            await settled(server)
        assert [r.outcome for r in server.results] == ["aborted"]
        if existing:
            assert server.results[0].pages_in_place > 0  # the case that held views of the mapping
        assert not list(dest_dir.glob(".*.partial"))
        await _released(dest_dir)
    # Unmapped by GuestMemory.close itself, not left to the garbage collector.
    deferred = [m for m in (r.getMessage() for r in caplog.records) if "unmapping deferred" in m and str(dest_dir) in m]
    assert deferred == []


@pytest.mark.parametrize("existing", [False, True], ids=["new-region", "existing-region"])
async def test_region_unmapped_when_a_query_stops_the_migration(work: Path, dest_dir: Path, no_cyclic_gc: None,
                                                                existing: bool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """COMMIT lost in a stalled link: the source asks, which stops the migration on the
    destination (a cancellation): its region must go at once too."""
    caplog.set_level(logging.DEBUG, logger="precopy.memory.region")
    src = work / "vm.mem"
    _region(src, 1)
    if existing:
        dest_dir.mkdir()
        _region(dest_dir / "vm.mem", 7)
    async with serve(dest_dir) as server:
        fault = Fault("stall", kind=Kind.COMMIT)
        with FaultProxy(("127.0.0.1", server.port), [fault]) as proxy:
            opts = precopy.session.source.SourceOptions(host="127.0.0.1", port=proxy.port, memory=src, io_timeout_s=1.0,
                                                connect_timeout_s=5.0)
            with pytest.raises(MigrationAborted, match="not committed"):
                await precopy.session.source.migrate(opts, FakeWorkload())
            assert fault.fired.is_set()
            await settled(server)
            assert [r.outcome for r in server.results] == ["aborted"]
            assert not list(dest_dir.glob(".*.partial"))
            await _released(dest_dir)
    deferred = [m for m in (r.getMessage() for r in caplog.records) if "unmapping deferred" in m and str(dest_dir) in m]
    assert deferred == []

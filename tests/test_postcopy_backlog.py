"""The destination's held-back pushes (precopy.session.postcopy_backlog, and how
precopy.session.postcopy_dest's stream loop uses them): pure, no sockets, no userfaultfd."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import numpy as np
import pytest
import xxhash

from precopy.protocol import PAGE_SIZE, Begin, Pages, Request
from precopy.protocol.postcopy_codec import bitmap_of
from precopy.session import postcopy_dest
from precopy.session.postcopy_backlog import PushBacklog
from precopy.session.postcopy_pages import PagePlacer


def u32(*pages: int) -> np.ndarray:
    return np.array(pages, dtype=np.uint32)


def test_frames_come_out_by_page_or_oldest_first_each_once() -> None:
    log = PushBacklog(limit=3 * 4096)
    buf = bytearray(b"a" * 4096 + b"b" * 4096)
    log.hold(u32(1, 2), memoryview(buf), u32(3))
    buf[:] = b"z" * len(buf)  # the connection's buffer is reused: the frame kept a copy
    log.hold(u32(7), b"c" * 4096, u32())
    log.hold(u32(), None, u32(9, 10))
    assert len(log) == 3 and log.bytes == 3 * 4096 and log.full()
    (frame,) = log.holding([7, 100])
    assert frame[0].tolist() == [7] and frame[1] == b"c" * 4096 and not log.full()
    assert log.holding([7]) == []  # taken out once
    got = log.holding(u32(10, 3))  # both remaining frames, in arrival order
    assert [f[0].tolist() for f in got] == [[1, 2], []] and got[0][1] == b"a" * 4096 + b"b" * 4096
    assert got[0][2].tolist() == [3] and got[1][2].tolist() == [9, 10]
    assert len(log) == 0 and log.bytes == 0 and log.oldest() is None


def test_oldest_first() -> None:
    log = PushBacklog()
    log.hold(u32(5), b"x" * 4096, u32())
    log.hold(u32(2), b"y" * 4096, u32())
    first = log.oldest()
    assert first is not None and first[0].tolist() == [5]
    assert log.holding([5]) == [] and len(log) == 1


class _Link:
    """The source's side of a page stream: ``frames`` in order, then nothing more (it waits for
    COMPLETE) -- a read past them is the hang this stands for, raised at once instead."""

    def __init__(self, frames: list[Pages]) -> None:
        self.frames, self.sent, self.peer = frames, [], "source"

    async def events(self, idle_timeout_s: float | None = None) -> AsyncIterator[Any]:
        for ev in self.frames:
            yield ev
        raise AssertionError("the destination waits for a frame with every page placed: the source sends "
                             "none (it waits for COMPLETE, then its --io-timeout takes the stream up again)")

    async def send(self, ev: Any) -> int:
        self.sent.append(ev)
        return 0


def _frame(pages: list[int], fill: bytes) -> Pages:
    data = b"".join(fill * PAGE_SIZE for _ in pages)
    return Pages(indices=np.array(pages, dtype=np.uint32), zeros=np.zeros(0, dtype=np.uint32), payload=data,
                 checksum=xxhash.xxh3_64_intdigest(data))


def test_a_fault_that_places_the_last_held_frame_ends_the_stream(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 22's race (``--postcopy immediate`` under load, a stream taken up again after 60 s): the
    guest waits on page 2 (REQUEST), the push of pages 0-1 comes first and is held back, 2 comes and
    is placed; then the guest faults on page 0, still held: the fault, read between frames, places
    the held frame -- the last missing pages.  The loop must end there (COMPLETE), not wait for a
    frame that the source, which has sent everything, never sends."""
    npages, base = 3, 1 << 30
    fd = _region_fd(tmp_path, npages)
    try:
        pc, placer = _dest_over(fd, npages, base)
        pc._uffd = 1 << 20  # read by the fake below only

        def read_fault_batch(uffd: int, buf: bytearray) -> tuple[list[int], bool]:
            if not placer.requested[2]:
                return [base + 2 * PAGE_SIZE], True  # the guest touches page 2 first
            if not placer.need[2] and not placer.requested[0]:
                return [base + 100], True  # then page 0, held back by then
            return [], True

        monkeypatch.setattr(postcopy_dest, "read_fault_batch", read_fault_batch)
        link = _Link([_frame([0, 1], b"a"), _frame([2], b"c")])
        asyncio.run(pc._stream(link))  # type: ignore[arg-type]
        assert placer.left == 0 and not placer.need.any() and len(pc.backlog) == 0
        assert [type(ev) for ev in link.sent] == [Request] and link.sent[0].indices.tolist() == [2]
        assert placer.faults == 2 and placer.duplicates == 0
        with open(tmp_path / "vm.mem", "rb") as f:
            assert f.read() == b"a" * 2 * PAGE_SIZE + b"c" * PAGE_SIZE
    finally:
        os.close(fd)


def test_a_resumed_stream_s_missing_does_not_name_the_pushes_held_back(tmp_path: Path) -> None:
    """The link broke while pushes were held back (the guest waited on another page): RESUME's answer
    places them first, so its MISSING bitmap does not name them -- else the source sends them again
    and each second copy is a duplicate (seen in the fault matrix's lane-joined cells, lean22)."""
    from precopy.protocol import Missing, Ready
    from precopy.protocol.postcopy_codec import pages_of_bitmap

    npages, base = 4, 1 << 30
    fd = _region_fd(tmp_path, npages)
    try:
        pc, placer = _dest_over(fd, npages, base)
        frame = _frame([0, 1], b"a")
        pc.backlog.hold(frame.indices, frame.payload, frame.zeros)  # held when the link broke
        link = _Link([])

        async def run() -> None:
            pc._next_chan = asyncio.get_running_loop().create_future()  # (the stream waits for a RESUME)
            task = asyncio.ensure_future(pc.take_over(link))  # type: ignore[arg-type]
            while not any(isinstance(ev, Ready) for ev in link.sent):
                await asyncio.sleep(0.01)
            task.cancel()

        asyncio.run(run())
        bits = b"".join(bytes(ev.data) for ev in link.sent if isinstance(ev, Missing))
        assert pages_of_bitmap(bits, npages).tolist() == [2, 3]  # not 0, 1: placed from the backlog
        assert len(pc.backlog) == 0 and placer.left == 2 and placer.duplicates == 0
        with open(tmp_path / "vm.mem", "rb") as f:
            assert f.read(2 * PAGE_SIZE) == b"a" * 2 * PAGE_SIZE
    finally:
        os.close(fd)


def _region_fd(tmp_path: Path, npages: int) -> int:
    """A sparse region file of ``npages`` pages, opened read-write."""
    region = tmp_path / "vm.mem"
    with open(region, "wb") as f:
        f.truncate(npages * PAGE_SIZE)
    return os.open(region, os.O_RDWR)


def _dest_over(fd: int, npages: int, base: int) -> tuple[Any, PagePlacer]:
    """A PostcopyDest with every page missing, its placer writing into ``fd``'s holes (no userfaultfd)."""
    mask = np.ones(npages, dtype=bool)
    recv = SimpleNamespace(begin=Begin(migration_id="m", name="vm.mem", size=npages * PAGE_SIZE),
                           opts=SimpleNamespace(idle_timeout_s=None))
    pc = postcopy_dest.PostcopyDest(recv, bitmap_of(np.flatnonzero(mask), npages))  # type: ignore[arg-type]
    placer = pc.placer = PagePlacer(-1, base, npages, mask, fd)
    placer.guest_gone = True  # (no userfaultfd: pages go into the file's holes)
    return pc, placer

"""The fault lane's lean frames in use (precopy.session.lane_fast_source / lane_fast_dest): each end's
child over a socket pair speaking them -- the source's answers from its own mapping, the destination's
placing a page a real guest faulted on (a userfaultfd in MINOR mode) -- bad input failing the lane
loudly; and a post-copy whose lane takes them when both ends offer them, and the old frames with a
destination that does not (an old peer ignores JOIN's ``fast``).  The frames alone:
tests/test_lane_frames.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from precopy.net.channel import LinkError
from precopy.protocol import PAGE_SIZE, Kind, Request
from precopy.protocol.lane_frames import (LANE_PAGES, LANE_REQUEST, PAGES_HEAD_SIZE, RECORD, REQUEST_BUF_SIZE,
                                          LaneReader, decode_pages, decode_request, pack_pages, pack_request)
from precopy.protocol.limits import MAGIC, PREFIX
from precopy.session.postcopy_lane import DestLane
from precopy.session.postcopy_state import persist_need

from . import conftest
from .conftest import Procs, start_dest, run_source, wait_for
from .faultproxy import S2C, Fault, FaultProxy
from .test_faults import dport
from .test_postcopy import det_hook, det_source, reference_digest
from .test_postcopy_lane import _joined, _pair
from .test_postcopy_lane_proc import _Host, _run_and_release, source_child
from .test_postcopy_pages import NPAGES, page, setup_minor


@pytest.fixture
def region(tmp_path: Path) -> Iterator[Path]:
    """A region of NPAGES pages of 7s on /dev/shm (MINOR faults)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = base / f"pc-lean-{os.getpid()}.mem"
    path.write_bytes(bytes([7]) * NPAGES * PAGE_SIZE)
    yield path
    path.unlink(missing_ok=True)


def _send_request(sock: socket.socket, pages: list[int]) -> None:
    out = bytearray(REQUEST_BUF_SIZE)
    sock.sendall(memoryview(out)[:pack_request(pages, out)])


def _read_frame(sock: socket.socket, kind: int) -> memoryview:
    """The next lean frame of ``kind`` from the test's end (blocking, 30 s at most a read)."""
    sock.setblocking(True)
    sock.settimeout(30)
    r = LaneReader(kind)
    while (frame := r.next()) is None:
        n = sock.recv_into(r.space())
        assert n, "the child's end closed"
        r.took(n)
    return frame[1]


def test_the_source_s_lean_child_answers_from_its_own_mapping(tmp_path: Path) -> None:
    async def run() -> None:
        async with source_child(tmp_path, fast=True, pushed=(2,)) as (lane, stream, dst):  # 2: went with the push
            _send_request(dst.sock, [2, 3, 9])
            body = await asyncio.to_thread(_read_frame, dst.sock, LANE_PAGES)
            got: list[tuple[int, Any]] = []
            decode_pages(body, NPAGES, got)  # (every digest checked)
            assert [(p, None if v is None else bytes(v)) for p, v in got] == [(3, bytes([4]) * PAGE_SIZE), (9, None)]
            _send_request(dst.sock, [NPAGES + 5])  # past the region: the lane fails, loudly
            with pytest.raises(LinkError, match=f"LANE_REQUEST for page {NPAGES + 5}"):
                await asyncio.wait_for(lane, 120)
            stream.fold()
            assert stream.stats.requested == 2 and not stream.need[[2, 3, 9]].any()
            assert stream.stats.extra["lane_cpu_s"] > 0  # its CPU came back

    asyncio.run(run())


def test_the_source_s_lean_child_refuses_the_old_frames(tmp_path: Path) -> None:
    async def run() -> None:
        async with source_child(tmp_path, fast=True) as (lane, stream, dst):
            dst.sock.setblocking(True)
            dst.send_blocking(Request(indices=np.array([3], dtype=np.uint32)))  # a REQUEST, not a LANE_REQUEST
            with pytest.raises(LinkError, match="unexpected frame kind REQUEST"):
                await asyncio.wait_for(lane, 120)
            assert stream.need[3]  # nothing claimed

    asyncio.run(run())


async def _lean_child(lane: DestLane, dst: Any) -> asyncio.Task[None]:
    task = lane.start(dst, 5.0, fast=True)
    for _ in range(12000):  # (the child imports the engine: seconds on a busy machine)
        if lane.child or task.done():
            break
        await asyncio.sleep(0.01)
    assert lane.child, task
    return task


def _answer(pages: list[int], fill: list[int]) -> bytes:
    head, bufs = bytearray(PAGES_HEAD_SIZE), []  # type: ignore[var-annotated]
    pack_pages(pages, [memoryview(page(b).tobytes()) for b in fill], head, bufs)
    return b"".join(bytes(b) for b in bufs)


def test_the_destination_s_lean_child_places_what_a_real_guest_faulted_on(region: Path, tmp_path: Path) -> None:
    guest, placer, fd = setup_minor(region, [3, 4, 9])
    placer.need = persist_need(placer.need, True, tmp_path / "mig-1.need")
    host = _Host(placer)
    lane = DestLane(host)  # type: ignore[arg-type]

    async def run() -> None:
        src, dst = await _pair()
        _joined(src, dst)
        task = await _lean_child(lane, dst)
        guest.ask("r", 4)  # a real fault, read by the child: LANE_REQUEST on the lane
        body = await asyncio.to_thread(_read_frame, src.sock, LANE_REQUEST)
        assert decode_request(body, NPAGES) == [4]
        with host.lock:  # the session's push of 3 meanwhile, under the lock it shares with the child
            placer.place(np.array([3], dtype=np.uint32), memoryview(page(0x33)), np.zeros(0, dtype=np.uint32))
        src.sock.sendall(_answer([3], [0x55]) + _answer([4], [0x44]))  # 3: placed already, a duplicate, not written
        assert await asyncio.to_thread(guest.answer) == b"\x44"  # placed by the child: the guest woke
        with host.lock:  # the last page, pushed: the child sees none missing and ends
            placer.place(np.zeros(0, dtype=np.uint32), None, np.array([9], dtype=np.uint32))
        await asyncio.wait_for(task, 120)  # nothing missing: the child ends, its counts merged
        assert placer.left == 0 and not placer.need.any() and placer.faults == 1
        assert len(placer.remote_latencies) == 1 and placer.duplicates == 1
        guest.ask("r", 3)
        assert await asyncio.to_thread(guest.answer) == b"\x33"  # the push's, never the duplicate's
        assert lane.cpu_s > 0 and lane.requests == 1
        src.close()
        dst.close()

    _run_and_release(run, lane, guest, fd)


@pytest.mark.parametrize("bad", ["digest", "past", "old"])
def test_the_destination_s_lean_child_fails_the_lane_on_bad_input(region: Path, tmp_path: Path, bad: str) -> None:
    guest, placer, fd = setup_minor(region, [3, 4, 9])
    placer.need = persist_need(placer.need, True, tmp_path / "mig-1.need")
    lane = DestLane(_Host(placer))  # type: ignore[arg-type]
    why = {"digest": "checksum mismatch", "past": "out of order or past the region",
           "old": "unexpected frame kind PAGES"}[bad]

    async def run() -> None:
        src, dst = await _pair()
        _joined(src, dst)
        task = await _lean_child(lane, dst)
        guest.ask("r", 9)
        await asyncio.to_thread(_read_frame, src.sock, LANE_REQUEST)
        if bad == "digest":
            frame = bytearray(_answer([9], [0x99]))
            frame[-1] ^= 1  # a byte flipped in transit
        elif bad == "past":
            frame = bytearray(PREFIX.pack(MAGIC, LANE_PAGES, 0, 0, 16) + RECORD.pack(NPAGES, 1, 0))
        else:
            head = PREFIX.pack(MAGIC, 7, 0, 30, PAGE_SIZE)  # (a PAGES frame's prefix: refused before its body)
            frame = bytearray(head + bytes(30))
        src.sock.sendall(frame)
        with pytest.raises(LinkError, match=why):
            await asyncio.wait_for(task, 120)
        assert placer.need[9] and placer.outstanding().tolist() == [9]  # not placed: asked again on a new link
        placer.place(np.array([9], dtype=np.uint32), memoryview(page(0x98)), np.zeros(0, dtype=np.uint32))
        assert await asyncio.to_thread(guest.answer) == b"\x98"
        src.close()
        dst.close()

    _run_and_release(run, lane, guest, fd)


def _lane_logs(text: str) -> list[str]:
    return [json.loads(ln).get("msg", "") for ln in text.splitlines()
            if ln.startswith("{") and "fault lane" in ln]


@pytest.mark.integration
@pytest.mark.parametrize("dest_fast", [True, False], ids=["both-lean", "old-destination"])
def test_the_lane_takes_the_lean_frames_only_when_both_ends_offer_them(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch, dest_fast: bool) -> None:
    """--postcopy immediate --postcopy-lane over plain TCP: both ends' lanes are children; the lean
    frames when the destination answers JOINED ``fast`` (else, as from a destination before them --
    ``PRECOPY_LANE_FAST=0`` there: it ignores JOIN's ``fast`` -- the old frames); every page exact.
    Through a fault proxy that holds the first push until the lane's JOINED has passed: an 8 MiB push
    would otherwise end before the lane opens (its child starts in ~0.25-1 s)."""
    expected = reference_digest(procs, shm)
    out = shm / "resumed.json"
    with monkeypatch.context() as m:
        if not dest_fast:
            m.setitem(conftest.ENV, "PRECOPY_LANE_FAST", "0")
        dest = start_dest(procs, shm, "--on-resume", det_hook(out), "--postcopy-guest-early")
    src, ctl = det_source(procs, shm)
    switched, joined = threading.Event(), threading.Event()
    faults = [Fault("call", kind=Kind.POSTCOPY, callback=switched.set),
              Fault("call", kind=Kind.JOINED, direction=S2C, conn=None, callback=joined.set),
              Fault("delay", kind=Kind.PAGES, where=lambda meta: switched.is_set(), conn=None,
                    callback=lambda: None if joined.wait(120) else None)]
    with FaultProxy(("127.0.0.1", dport(dest)), faults) as proxy:
        rc, rep, log = run_source(shm, "--to", proxy.addr, "--memory", str(src), "--guest-control", str(ctl),
                                  "--postcopy", "immediate", "--postcopy-lane", "--on-commit", "kill")
    assert rc == 0 and rep is not None, log + dest.log_text()
    assert joined.is_set(), "the lane's JOINED never passed"
    pc = rep["postcopy"]
    assert pc["pages_missing"] == 2048 and pc["pages_pushed"] + pc["pages_requested"] == 2048, pc
    assert pc["duplicates"] == 0 and pc["reconnects"] == 0, log + dest.log_text()
    wait_for(out.exists, timeout=120, what="the resumed det guest to finish")
    assert json.loads(out.read_text()) == {"steps": 20000, "digest": expected}
    opened = [m for m in _lane_logs(log) if m.startswith("post-copy: fault lane to")]
    assert opened, _lane_logs(log)
    assert opened[0].endswith("(lean frames)") == dest_fast, opened
    wait_for(lambda: any("post-copy fault lane from" in m for m in _lane_logs(dest.log_text())),
             what="the destination to log the lane")
    served = [m for m in _lane_logs(dest.log_text()) if "post-copy fault lane from" in m]
    assert served[0].endswith("(lean frames)") == dest_fast, served


def test_the_fault_reader_reads_into_its_buffer_and_sorts_out_the_region_s_pages() -> None:
    from precopy.memory.uffd_missing import _MSG, UFFD_EVENT_PAGEFAULT, FaultReader

    r, w = os.pipe()  # (a pipe of fault messages plays the userfaultfd, as in test_postcopy_lane)
    os.set_blocking(r, False)
    start = 0x10000
    reader = FaultReader(r, start, NPAGES, messages=4)
    try:
        assert reader.read() == 0  # none waiting
        msgs = bytearray(32 * 4)
        for k, (event, addr) in enumerate([(UFFD_EVENT_PAGEFAULT, start + 3 * PAGE_SIZE + 17),
                                           (0x13, start),  # not a page fault: skipped
                                           (UFFD_EVENT_PAGEFAULT, start - PAGE_SIZE),  # below the region
                                           (UFFD_EVENT_PAGEFAULT, start + NPAGES * PAGE_SIZE)]):  # past it
            _MSG.pack_into(msgs, 32 * k, event, 0, addr)
        os.write(w, bytes(msgs))
        n = reader.read()
        pages: list[int] = []
        outside: list[int] = []
        reader.pages(n, pages, outside)
        assert n == len(reader.buf) and pages == [3] and outside == [start - PAGE_SIZE, start + NPAGES * PAGE_SIZE]
    finally:
        os.close(r)
        os.close(w)

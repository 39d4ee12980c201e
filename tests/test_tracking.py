"""Kernel write tracking (userfaultfd async write-protect + PAGEMAP_SCAN).

Three tiers: the kernel interface in one process; the guest's ``track`` op
and the agent's checks of what a guest offers; whole migrations with a real
guest process writing adversarially (heavy, random, A -> B -> A, holes
punched), where the destination must equal the paused source byte for
byte.  Then the choice of tracker: auto-selection, and every way of falling
back to digests (kernel without PAGEMAP_SCAN, seccomp, a guest that does not
offer, a SIGSTOP workload, a non-root agent) without a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import mmap
import os
import platform
import socket
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import precopy.session.exchange
import precopy.session.rounds
import precopy.session.sender
import precopy.session.source
import precopy.session.tracked
from precopy.session.tracked import TrackedScanner
import precopy.memory.tracking
import precopy.memory.uffd as uffd
from precopy.session.destination import DestinationServer, DestOptions
from precopy.memory.digest import page_union
from precopy.errors import GuestControlError, MigrationAborted
from precopy.memory.prepare import Preparation
from precopy.memory.region import GuestMemory
from precopy.session.source import SourceOptions
from precopy.memory.tracking import TrackingOffer, TrackingUnavailable, UffdTracker, check_guest_mapping
from precopy.protocol import PAGE_SIZE
from precopy.workload.control import GuestControl
from precopy.workload.signals import SignalWorkload

from .conftest import ENV, PY, ROOT, Procs, create_region, guest, run_source, start_dest, wait_for


def _kernel_reason() -> str | None:
    try:
        uffd.syscall_numbers()
        uffd.probe_pagemap_scan()
        fd = uffd.create_userfaultfd()
        try:
            uffd.uffd_api(fd)
        finally:
            os.close(fd)
    except TrackingUnavailable as exc:
        return str(exc)
    return None


_REASON = _kernel_reason()
needs_uffd = pytest.mark.skipif(_REASON is not None, reason=f"no kernel write tracking here: {_REASON}")
needs_root_x86 = pytest.mark.skipif(
    os.geteuid() != 0 or platform.machine() != "x86_64", reason="needs root on x86-64 (uid switch, seccomp)"
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch(fd: int, page: int) -> None:
    assert _libc.fallocate(fd, 3, page * PAGE_SIZE, PAGE_SIZE) == 0  # PUNCH_HOLE | KEEP_SIZE


class SelfTracked:
    """This process tracks its own mapping of a region file (same kernel calls as across processes)."""

    def __init__(self, path: Path, npages: int, punched: tuple[int, ...] = ()) -> None:
        path.write_bytes(np.random.default_rng(1).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8).tobytes())
        self.fd = os.open(path, os.O_RDWR)
        for page in punched:  # holes before arming
            punch(self.fd, page)
        self.mm = mmap.mmap(self.fd, npages * PAGE_SIZE, mmap.MAP_SHARED)
        self.pages = np.frombuffer(self.mm, dtype=np.uint8).reshape(npages, PAGE_SIZE)
        self.start = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.uffd = uffd.create_userfaultfd()
        uffd.uffd_api(self.uffd)
        self.mem = GuestMemory.open(path, writable=False)
        self.tracker = UffdTracker(TrackingOffer(self.uffd, os.getpid(), self.start, len(self.mm)), self.mem)
        self.tracker.arm()

    def close(self) -> None:
        self.tracker.close()
        self.mem.close()
        del self.pages
        os.close(self.fd)


# --------------------------------------------------------------------------
# The kernel interface


def test_ranges_to_pages() -> None:
    starts = np.array([0x1000, 0x5000, 0x9000], dtype=np.uint64)
    ends = np.array([0x3000, 0x6000, 0xC000], dtype=np.uint64)
    got = uffd.ranges_to_pages(starts, ends, 0x1000, PAGE_SIZE)
    assert got.tolist() == [0, 1, 4, 8, 9, 10]
    assert uffd.ranges_to_pages(starts[:0], ends[:0], 0, PAGE_SIZE).size == 0


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    assert uffd.UFFDIO_API == 0xC018AA3F
    assert uffd.UFFDIO_REGISTER == 0xC020AA00
    assert uffd.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert uffd.PAGEMAP_SCAN == 0xC0606610


@needs_uffd
def test_scan_reports_exactly_the_written_pages_and_rearms(shm: Path) -> None:
    t = SelfTracked(shm / "r.mem", 512)
    try:
        assert t.tracker.scan().size == 0
        t.pages[[3, 4, 200, 511], 7] += 1
        a = t.pages[100].copy()
        t.pages[100] = 0xAB
        t.pages[100] = a  # A -> B -> A is still a write
        assert t.tracker.scan().tolist() == [3, 4, 100, 200, 511]
        assert t.tracker.scan().size == 0  # re-armed by the scan
        _ = int(t.pages[5].sum())  # reads are not writes
        assert t.tracker.scan().size == 0
    finally:
        t.close()


@needs_uffd
def test_scan_continues_past_a_full_result_vector(shm: Path) -> None:
    t = SelfTracked(shm / "r.mem", 2048)
    assert t.tracker.scanner is not None
    t.tracker.scanner._vec = t.tracker.scanner._vec[:7]  # force many ioctl calls
    try:
        every_other = np.arange(0, 2048, 2)
        t.pages[every_other, 0] += 1
        assert np.array_equal(t.tracker.scan(), every_other)
        assert t.tracker.scan().size == 0
    finally:
        t.close()


@needs_uffd
def test_rearm_before_a_send_keeps_writes_before_it_out_of_the_next_scan(shm: Path) -> None:
    """Pages re-protected as they are sent go once; written pages of the range not sent are still reported."""
    t = SelfTracked(shm / "r.mem", 512)
    try:
        t.pages[[10, 11, 12, 40, 41, 300], 0] += 1
        t.tracker.rearm(np.arange(8, 16, dtype=np.uint32))  # a run about to be sent: 10-12 go with it
        t.tracker.rearm(np.array([38, 41, 45], dtype=np.uint32))  # scattered: 40 is in range, not sent
        t.pages[11, 0] += 1  # after its send: dirty again
        assert t.tracker.scan().tolist() == [11, 40, 300]
        assert t.tracker.take_rewritten().tolist() == [10, 11, 12, 40, 41]  # their chunks need rehashing
        assert t.tracker.take_rewritten().size == 0
        assert t.tracker.scan().size == 0
        t.tracker.rearm(np.array([5], dtype=np.uint32))  # nothing written: nothing found
        assert t.tracker.take_rewritten().size == 0
    finally:
        t.close()


@needs_uffd
def test_holes_punched_are_reported_though_the_kernel_does_not(shm: Path) -> None:
    t = SelfTracked(shm / "r.mem", 256)
    try:
        punch(t.fd, 10)
        punch(t.fd, 11)
        assert t.tracker.scanner is not None
        assert t.tracker.scanner.scan(rearm=False).size == 0  # the kernel's view: nothing written
        assert t.tracker.scan().tolist() == [10, 11]
        assert not t.pages[10].any()
        assert t.tracker.scan().size == 0
        t.pages[10, 0] = 1  # writing into the hole is an ordinary write
        assert t.tracker.scan().tolist() == [10]
    finally:
        t.close()


@needs_uffd
def test_the_holes_found_when_arming_go_to_the_full_copy_once(shm: Path) -> None:
    """Arming walks the file's holes once, after write-protecting (a write into one later is
    reported); the full copy takes that walk instead of its own (UffdTracker.take_arm_holes)."""
    t = SelfTracked(shm / "r.mem", 64, punched=(3, 40, 41))
    try:
        holes = t.tracker.take_arm_holes()
        assert holes is not None and np.flatnonzero(holes).tolist() == [3, 40, 41]
        assert t.tracker.take_arm_holes() is None
        t.pages[40, 0] = 1  # written after arming: reported, though it was a hole then
        assert t.tracker.scan().tolist() == [40]
    finally:
        t.close()


@needs_uffd
def test_unregister_ends_write_protection(shm: Path) -> None:
    t = SelfTracked(shm / "r.mem", 64)
    t.tracker.close()
    t.pages[1, 0] += 1  # no fault handler involved any more; the write just lands
    assert t.pages[1, 0] == (np.frombuffer((shm / "r.mem").read_bytes(), np.uint8)[PAGE_SIZE])
    t.mem.close()
    os.close(t.fd)


# --------------------------------------------------------------------------
# What a guest offers, and the agent's checks of it


def test_mapping_check_refuses_a_second_writable_mapping(shm: Path) -> None:
    path = shm / "r.mem"
    path.write_bytes(bytes(16 * PAGE_SIZE))
    with open(path, "r+b") as f:
        a = mmap.mmap(f.fileno(), 16 * PAGE_SIZE, mmap.MAP_SHARED)
        start = ctypes.addressof(ctypes.c_char.from_buffer(a))
        check_guest_mapping(os.getpid(), start, 16 * PAGE_SIZE, path)
        with pytest.raises(TrackingUnavailable, match="not one whole mapping"):
            check_guest_mapping(os.getpid(), start, 8 * PAGE_SIZE, path)
        with pytest.raises(TrackingUnavailable, match="not one whole mapping"):
            check_guest_mapping(os.getpid(), start + PAGE_SIZE, 16 * PAGE_SIZE, path)
        b = mmap.mmap(f.fileno(), 16 * PAGE_SIZE, mmap.MAP_SHARED)
        with pytest.raises(TrackingUnavailable, match="writes there would not be tracked"):
            check_guest_mapping(os.getpid(), start, 16 * PAGE_SIZE, path)
        b.close()
        p = mmap.mmap(f.fileno(), 16 * PAGE_SIZE, mmap.MAP_PRIVATE)
        pstart = ctypes.addressof(ctypes.c_char.from_buffer(p))
        with pytest.raises(TrackingUnavailable, match="not a shared mapping"):
            check_guest_mapping(os.getpid(), pstart, 16 * PAGE_SIZE, path)


def test_tracker_refuses_an_fd_that_is_not_a_userfaultfd(shm: Path) -> None:
    path = shm / "r.mem"
    path.write_bytes(bytes(4 * PAGE_SIZE))
    mem = GuestMemory.open(path, writable=False)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(TrackingUnavailable, match="not a userfaultfd"):
            UffdTracker(TrackingOffer(fd, os.getpid(), 0x10000, 4 * PAGE_SIZE), mem)
        with pytest.raises(OSError):
            os.fstat(fd)  # the tracker closed our copy
    finally:
        mem.close()


def _start_guest(procs: Procs, shm: Path, *extra: str, pattern: str = "random", npages: int = 4096,
                 size: str | None = None, **kw: Any) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    mem, ctl = shm / "g.mem", shm / "g.sock"
    create_region(mem, size or f"{npages * 4}K")
    g = procs.start("-m", "tests.uffd_guest", "--memory", str(mem), "--control", str(ctl),
                    "--pattern", pattern, *extra, **kw)
    wait_for(lambda: ctl.exists() or g.poll() is not None, what="the test guest's control socket")
    assert g.poll() is None
    return mem, ctl, g


@needs_uffd
def test_track_op_hands_over_a_userfaultfd_and_other_ops_still_work(procs: Procs, shm: Path) -> None:
    mem, ctl, g = _start_guest(procs, shm)

    async def go() -> TrackingOffer:
        gc = GuestControl(ctl)
        try:
            assert await gc.pause() == b"uffd-guest"
            offer = await gc.offer_tracking()
            await gc.resume()
            return offer
        finally:
            await gc.close()

    offer = asyncio.run(go())
    try:
        assert offer.pid == g.pid and offer.length == os.path.getsize(mem)
        assert os.readlink(f"/proc/self/fd/{offer.fd}") == "anon_inode:[userfaultfd]"
        check_guest_mapping(offer.pid, offer.start, offer.length, mem)
    finally:
        os.close(offer.fd)


def test_guest_that_does_not_offer_says_so(procs: Procs, shm: Path) -> None:
    _, ctl, _ = _start_guest(procs, shm, "--no-tracking")
    with pytest.raises(GuestControlError, match="does not offer write tracking"):
        asyncio.run(GuestControl(ctl).offer_tracking())


def _fake_guest(path: Path, reply: bytes, fds: list[int]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        socket.send_fds(conn, [reply], fds) if fds else conn.sendall(reply)
        conn.close()
        srv.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return th


@pytest.mark.parametrize("reply,nfds,match", [
    (b'{"ok": true, "start": 4096, "length": 4096}\n', 0, "carried 0 file descriptors"),
    (b'{"ok": true, "start": 4096, "length": 4096}\n', 2, "carried 2 file descriptors"),
    (b'{"ok": true, "start": -1, "length": 4096}\n', 1, "positive start and length"),
    (b'not json\n', 1, "invalid JSON"),
    (b'{"ok": true', 0, "closed the control socket"),
])
def test_offer_with_a_bad_reply_is_a_clear_error_and_leaks_no_fd(tmp_path: Path, reply: bytes, nfds: int,
                                                                  match: str) -> None:
    path = tmp_path / "fake.sock"
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    th = _fake_guest(path, reply, fds)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(GuestControlError, match=match):
        asyncio.run(GuestControl(path, timeout_s=5).offer_tracking())
    th.join(5)
    for fd in fds:
        os.close(fd)
    assert len(os.listdir("/proc/self/fd")) <= before


# --------------------------------------------------------------------------
# Whole migrations: the destination equals the paused source, byte for byte


async def _migrate(shm: Path, workload: Any, mem: Path, **opts: Any) -> precopy.session.source.MigrationReport:
    server = DestinationServer(DestOptions(memory_dir=shm / "dest", port=0))
    await server.start()
    serving = asyncio.create_task(server.serve_forever())
    try:
        kw: dict[str, Any] = dict(downtime_ms=50, max_rounds=6, on_nonconvergence="force", io_timeout_s=20)
        kw.update(opts)
        return await precopy.session.source.migrate(SourceOptions(host="127.0.0.1", port=server.port, memory=mem, **kw),
                                            workload)
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await server.close()


def _migrate_guest(shm: Path, ctl: Path, mem: Path, **opts: Any) -> precopy.session.source.MigrationReport:
    async def go() -> precopy.session.source.MigrationReport:
        gc = GuestControl(ctl)
        try:
            return await _migrate(shm, gc, mem, **opts)
        finally:
            await gc.close()

    return asyncio.run(go())


@pytest.fixture(params=["chunks", "pages", "pages-later"])
def verification(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Chunk tables of chunk bytes throughout; by page from the first comparison if the full copy
    saw a write; or compared by chunk first, then by page from the first round that writes any page."""
    first, later = {"chunks": (2.0, 2.0), "pages": (1e-9, 2.0), "pages-later": (2.0, 1e-9)}[request.param]
    monkeypatch.setattr(precopy.session.tracked, "_FIRST_BY_PAGE_SHARE", first)
    monkeypatch.setattr(precopy.session.tracked, "_BY_PAGE_SHARE", later)
    if request.param != "chunks":
        # Which mode a migration ends in depends on the guest writing during
        # the full copy ("pages") or in a live round after the first
        # comparison ("pages-later"). A guest starved of CPU on a busy machine
        # may write nothing there, and the migration rightly stays by chunk.
        # One page reported written by every scan (page 0: sent again, which
        # is always safe) makes the switch happen whatever the guest's share
        # of the CPU; its real writes are tracked as ever.
        real_scan = TrackedScanner.tracker_scan

        async def scan_with_page_0(self: TrackedScanner) -> np.ndarray:
            dirty = await real_scan(self)
            return page_union(self.mem.npages, dirty, np.zeros(1, dtype=dirty.dtype))

        monkeypatch.setattr(TrackedScanner, "tracker_scan", scan_with_page_0)
    if request.param == "pages-later":
        # ... and the switch is made by a round that rehashes what it saw written, which a
        # round far from its switchover leaves for later: on a slow (busy) machine every
        # live round of a full-speed sweep was that far, and the pause came by chunk.
        monkeypatch.setattr(precopy.session.rounds.Rounds, "near_switchover", lambda self, pages: True)
    return str(request.param).split("-")[0]


@needs_uffd
@pytest.mark.parametrize("pattern", ["sweep", "random", "abab", "punch"])
def test_no_write_is_missed(procs: Procs, shm: Path, pattern: str, verification: str) -> None:
    mem, ctl, g = _start_guest(procs, shm, pattern=pattern, npages=8192)
    time.sleep(0.2)  # let it write for a while first
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp", rep.tracking_reason
    assert rep.verification == verification
    # The guest is paused (keep-stopped): its memory is frozen.
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()
    assert rep.verify_repairs == 0
    assert rep.pages_sent + rep.zero_pages > 8192  # it did write during the migration
    assert g.poll() is None


@needs_uffd
@pytest.mark.parametrize("sleep, expected", [("0.001", "pages"), ("0.2", "chunks")], ids=["fast", "slow"])
def test_chunk_tables_go_by_page_only_for_a_writer_scattered_over_most_chunks(
        procs: Procs, shm: Path, sleep: str, expected: str) -> None:
    """~64,000 random pages/s over 256 chunks touch most of them every round: by page; ~300 pages/s do not."""
    mem, ctl, _ = _start_guest(procs, shm, "--sleep", sleep, pattern="random", npages=8192)
    time.sleep(0.2)
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp"
    assert rep.verification == expected
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()
    assert rep.verify_repairs == 0


@needs_uffd
@pytest.mark.parametrize("lost", ["all", "every other"])
def test_writes_missing_from_the_first_report_are_found_by_the_first_digest_comparison(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch, verification: str, lost: str) -> None:
    mem, ctl, _ = _start_guest(procs, shm, pattern="random", npages=4096)
    real_scan = UffdTracker.scan
    calls = [0]

    def lossy_scan(self: UffdTracker, sent: np.ndarray | None = None, **kw: Any) -> np.ndarray:
        pages = real_scan(self, sent, **kw)
        calls[0] += 1
        if calls[0] > 1:
            return pages
        return pages[:0] if lost == "all" else pages[::2]  # writes during the full copy: lost

    monkeypatch.setattr(UffdTracker, "scan", lossy_scan)
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp"
    # By page from the first comparison only if what was reported covers chunks.
    assert rep.verification == verification or (verification == "pages" and lost == "all")
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()
    assert rep.verify_repairs == 0


@needs_uffd
def test_a_wrong_page_on_the_destination_is_repaired_and_counted(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch, verification: str) -> None:
    """Verification still runs with a tracker: a page that lands wrong in the final pass is caught.

    (With a tracker, scattered pages go straight from the guest's memory, not
    through a staging copy: the corruption is made where they land.)
    """
    mem, ctl, _ = _start_guest(procs, shm, pattern="random", npages=4096)
    real_write = GuestMemory.write_pages
    paused = [False]
    real_pause = GuestControl.pause

    async def pause(self: GuestControl) -> bytes:
        paused[0] = True
        return await real_pause(self)

    def write_pages(self: GuestMemory, indices: np.ndarray, data: Any, **kw: Any) -> None:
        if paused[0] and len(indices):
            wrong = bytearray(memoryview(data).cast("B"))
            wrong[:16] = bytes(b ^ 0x5A for b in wrong[:16])  # what lands differs from what was sent, once
            data = wrong
            paused[0] = False
        real_write(self, indices, data, **kw)

    monkeypatch.setattr(GuestControl, "pause", pause)
    monkeypatch.setattr(GuestMemory, "write_pages", write_pages)
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp"
    assert rep.verification == verification
    assert rep.verify_repairs > 0
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


@needs_uffd
def test_the_destination_hashes_the_last_rounds_before_the_pause_not_in_it(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tracker, the destination is asked for its table just before the pause.

    Its rehash of the last rounds' chunks then happens while the workload
    runs: the verification in the downtime rehashes only the chunks of the
    pages sent paused (the estimate counts those alone).
    """
    from precopy.memory.digest import ChunkTracker

    mem, ctl, _ = _start_guest(procs, shm, pattern="random", npages=8192)
    time.sleep(0.2)
    paused = [False]
    real_pause = GuestControl.pause

    async def pause(self: GuestControl) -> bytes:
        paused[0] = True
        return await real_pause(self)

    tables: list[tuple[bool, int]] = []  # (asked for while paused, stale chunks then)
    real_table = ChunkTracker.table

    def table(self: ChunkTracker) -> np.ndarray:
        tables.append((paused[0], int(self.stale.sum())))
        return real_table(self)

    monkeypatch.setattr(GuestControl, "pause", pause)
    monkeypatch.setattr(ChunkTracker, "table", table)
    monkeypatch.setattr(ChunkTracker, "_run", lambda self: None)  # no background refresh: all is backlog
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp"
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()
    iterative = [r for r in rep.rounds if r.kind == "iterative"]
    assert iterative and iterative[-1].pages_sent > 0, "the test needs a round that sent pages"
    live, final = tables[-2], tables[-1]
    assert not live[0] and live[1] > 0  # settled while running: the last round's chunks were hashed then
    assert final[0] and final[1] <= rep.rounds[-1].pages_sent  # paused: only the final pages' chunks


@needs_uffd
def test_a_stale_chunk_digest_of_ours_is_rechecked_not_repaired(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch, verification: str) -> None:
    mem, ctl, _ = _start_guest(procs, shm, pattern="random", npages=4096)
    real = TrackedScanner.scan

    async def track_scan(self: TrackedScanner, *, final: bool, **kw: Any) -> Any:
        scan = await real(self, final=final, **kw)
        if final:
            scan.live[3] ^= 1  # our table says chunk 3 changed; the destination holds it right
        return scan

    monkeypatch.setattr(TrackedScanner, "scan", track_scan)
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.verify_repairs == 0
    assert rep.verification == verification
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


# --------------------------------------------------------------------------
# Choosing the tracker, and falling back without a crash


def test_auto_uses_uffd_wp_when_offered_and_digests_otherwise(procs: Procs, shm: Path) -> None:
    mem, ctl, _ = _start_guest(procs, shm, pattern="random", npages=2048)
    rep = _migrate_guest(shm, ctl, mem, tracking="auto")
    assert rep.outcome == "committed"
    if _REASON is None:
        assert rep.tracking == "uffd-wp"
        assert "offered" in rep.tracking_reason
    else:
        assert rep.tracking == "digest"
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


def test_auto_falls_back_when_the_guest_does_not_offer(procs: Procs, shm: Path) -> None:
    mem, ctl, _ = _start_guest(procs, shm, "--no-tracking", npages=2048)
    rep = _migrate_guest(shm, ctl, mem, tracking="auto")
    assert rep.outcome == "committed" and rep.tracking == "digest"
    assert "does not offer write tracking" in rep.tracking_reason
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


@needs_uffd
def test_auto_falls_back_on_a_kernel_without_pagemap_scan(procs: Procs, shm: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # An ioctl number this kernel does not know: the same ENOTTY a pre-6.7 kernel gives.
    monkeypatch.setattr(uffd, "PAGEMAP_SCAN", uffd._ioc(3, ord("f"), 99, 96))
    mem, ctl, _ = _start_guest(procs, shm, npages=2048)
    rep = _migrate_guest(shm, ctl, mem, tracking="auto")
    assert rep.outcome == "committed" and rep.tracking == "digest"
    assert "no PAGEMAP_SCAN" in rep.tracking_reason
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


@needs_uffd
def test_auto_falls_back_when_arming_fails(procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uffd, "UFFDIO_REGISTER", uffd._ioc(3, 0xAA, 0x3E, 32))
    mem, ctl, _ = _start_guest(procs, shm, npages=2048)
    rep = _migrate_guest(shm, ctl, mem, tracking="auto")
    assert rep.outcome == "committed" and rep.tracking == "digest"
    assert "arming kernel write tracking failed" in rep.tracking_reason
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


@needs_uffd
@needs_root_x86
def test_seccomp_guest_falls_back_to_digests(procs: Procs, shm: Path) -> None:
    mem, ctl, _ = _start_guest(procs, shm, "--seccomp-deny-uffd", npages=2048)
    rep = _migrate_guest(shm, ctl, mem, tracking="auto")
    assert rep.outcome == "committed" and rep.tracking == "digest"
    assert "seccomp" in rep.tracking_reason
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


@needs_uffd
@needs_root_x86
def test_non_root_guest_offers_tracking_in_user_mode(procs: Procs, shm: Path) -> None:
    os.chmod(shm, 0o777)
    mem, ctl = shm / "g.mem", shm / "g.sock"
    create_region(mem, "8M")
    os.chmod(mem, 0o666)
    g = procs.start("-m", "tests.uffd_guest", "--memory", str(mem), "--control", str(ctl), "--user", "65534",
                    stderr=subprocess.PIPE)
    wait_for(lambda: ctl.exists() or g.poll() is not None, what="the non-root guest's control socket")
    assert g.poll() is None, f"the uid-65534 guest died: {g.stderr.read().decode(errors='replace')}"  # type: ignore[union-attr]
    rep = _migrate_guest(shm, ctl, mem, tracking="auto")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp", rep.tracking_reason
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


def test_sigstop_workload_uses_digests(procs: Procs, shm: Path) -> None:
    mem = shm / "g.mem"
    create_region(mem, "8M")
    g = procs.start(*guest("dirty", "--memory", str(mem), "--rate", "500"))

    async def go() -> precopy.session.source.MigrationReport:
        return await _migrate(shm, SignalWorkload(g.pid), mem, tracking="auto")

    rep = asyncio.run(go())
    assert rep.outcome == "committed" and rep.tracking == "digest"
    assert "cannot offer write tracking" in rep.tracking_reason


def test_uffd_wp_required_but_not_offered_aborts_and_the_guest_keeps_running(procs: Procs, shm: Path) -> None:
    mem, ctl, g = _start_guest(procs, shm, "--no-tracking", npages=2048)
    with pytest.raises(MigrationAborted, match="--tracking uffd-wp"):
        _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    before = mem.read_bytes()
    # still writing: never paused (waited for: a starved guest writes late, not never)
    wait_for(lambda: mem.read_bytes() != before, timeout=30, what="the guest to write (was it left paused?)")


@needs_uffd
@needs_root_x86
def test_non_root_agent_falls_back_without_a_crash(procs: Procs, shm: Path) -> None:
    """The agent may not read a root guest's maps and pagemap: digests, committed.

    The agent runs in a forked child that drops to uid 65534 (no exec: the
    interpreter may live where that user cannot read).
    """
    os.chmod(shm, 0o777)
    mem, ctl, _ = _start_guest(procs, shm, npages=2048)
    os.chmod(mem, 0o644)
    os.chmod(ctl, 0o777)
    dest = start_dest(procs, shm)
    report = shm / "report.json"
    host, port = dest.addr.rsplit(":", 1)
    pid = os.fork()
    if pid == 0:  # the agent, unprivileged
        code = 1
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: its own /proc stays readable

            async def go() -> precopy.session.source.MigrationReport:
                gc = GuestControl(ctl)
                try:
                    return await precopy.session.source.migrate(SourceOptions(
                        host=host, port=int(port), memory=mem, downtime_ms=1000, tracking="auto"), gc)
                finally:
                    await gc.close()

            rep = asyncio.run(go())
            report.write_text(rep.to_json())
            code = 0
        except BaseException:
            traceback.print_exc()  # the child must not return into pytest
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, dest.log_text()
    rep = json.loads(report.read_text())
    assert rep["outcome"] == "committed" and rep["tracking"] == "digest"
    assert "Permission denied" in rep["tracking_reason"], rep["tracking_reason"]


def test_cli_tracking_option(procs: Procs, shm: Path) -> None:
    r = subprocess.run([PY, "-m", "precopy_agents.source_main", "--help"], env=ENV, cwd=ROOT, capture_output=True)
    assert b"--tracking {auto,digest,uffd-wp}" in r.stdout
    mem, ctl, _ = _start_guest(procs, shm, "--no-tracking", npages=1024)
    dest = start_dest(procs, shm)
    code, rep, out = run_source(shm, "--to", dest.addr, "--memory", str(mem), "--guest-control", str(ctl),
                                "--tracking", "uffd-wp")
    assert code == 3, out
    assert rep is not None and rep["outcome"] == "aborted"
    assert "does not offer write tracking" in rep["error"]


def test_source_options_reject_an_unknown_tracking(shm: Path) -> None:
    with pytest.raises(ValueError, match="tracking must be one of"):
        SourceOptions(host="h", port=1, memory=shm / "x", tracking="soft-dirty")
    assert precopy.memory.tracking.TRACKING_MODES == ("auto", "digest", "uffd-wp")


def test_expected_downtime_with_a_tracker_counts_its_scan_and_the_verification(shm: Path) -> None:
    """The switchover estimate uses the tracker's measured cost, not a whole-region rehash."""
    from concurrent.futures import ThreadPoolExecutor

    from precopy.policy.switchover import expected_downtime
    from precopy.memory.tracking import SourceChunks

    opts = SourceOptions(host="h", port=1, memory=shm / "x")
    s = precopy.session.source.SourceSession(opts, SignalWorkload(os.getpid()))
    m = s.model
    s.exchange.rtt = 0.001
    m.last_scan_s = 0.002  # what a tracked round measured (scan + rehash of its chunks)
    base = expected_downtime(remaining_pages=100, bandwidth_bps=s.link.bytes_per_second,
                             final_scan_s=0.002, overhead_s=0.002 + 2 * 0.001)
    mem = type("M", (), {"npages": 8192 * 32})()
    m.region(mem.npages, 32, None)
    verify = 0.001 + 8192 * 8 / s.link.bytes_per_second
    assert m.expected(0) == pytest.approx(base - 100 * PAGE_SIZE / s.link.bytes_per_second)  # digests: no pages, no verification
    assert m.expected(100) == pytest.approx(base + verify)  # pages sent paused are verified
    m.chunk_hash_s = 1e-5  # and the destination rehashes their chunks first
    assert m.expected(100) == pytest.approx(base + verify + 100 * 1e-5)
    m.chunk_hash_s = 0.0
    chunks = SourceChunks(mem, 32, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    m.region(mem.npages, 32, chunks)
    chunks.adopt(np.zeros(8192, dtype=np.uint64), 0.05)
    assert m.expected(100) == pytest.approx(base + verify)
    m.chunk_hash_s = 1e-5  # the last round's chunks are settled before the pause: not counted
    assert m.expected(100) == pytest.approx(base + verify + 100 * 1e-5)
    m.chunk_hash_s = 0.0
    assert m.expected(100) < 0.015  # a 1 GiB region's estimate is not a 60-110 ms rehash


@pytest.mark.parametrize("where", ["shm", "tmp_path"])
def test_hole_finder_sees_punched_pages_on_tmpfs_and_on_a_disk_file(where: str, request: pytest.FixtureRequest) -> None:
    from precopy.memory.tracking import TMPFS_MAGIC, HoleFinder, fs_magic

    root: Path = request.getfixturevalue(where)
    path = root / "r.mem"
    path.write_bytes(np.random.default_rng(3).integers(1, 256, 64 * PAGE_SIZE, dtype=np.uint8).tobytes())
    mem = GuestMemory.open(path, writable=False)
    fd = os.open(path, os.O_RDWR)
    try:
        _ = int(mem.pages[:, 0].sum())  # the agent's mapping, populated as after a full copy
        finder = HoleFinder(mem)
        assert finder.by_residency == (fs_magic(path) == TMPFS_MAGIC)
        assert not finder.holes().any()
        punch(fd, 5)
        punch(fd, 40)
        assert np.flatnonzero(finder.holes()).tolist() == [5, 40]
    finally:
        os.close(fd)
        mem.close()


@contextlib.contextmanager
def _random_source_chunks(path: Path, npages: int, cp: int, *, seed: int) -> Iterator[tuple[GuestMemory, Any]]:
    """A region of random pages and a SourceChunks over it, its table adopted (zeros: not hashed)."""
    from concurrent.futures import ThreadPoolExecutor

    from precopy.memory.tracking import SourceChunks

    path.write_bytes(np.random.default_rng(seed).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8).tobytes())
    with ThreadPoolExecutor(2) as pool, GuestMemory.open(path) as mem:
        chunks = SourceChunks(mem, cp, pool)
        chunks.adopt(np.zeros(-(-npages // cp), dtype=np.uint64), 0.01)
        yield mem, chunks


def test_source_chunks_by_page_follow_the_region_and_resend_zeroed_pages(shm: Path) -> None:
    """After the switch our table is the region's chunk table by page, kept so by rehashing the
    reported pages alone; pages that read as zeros where what was sent was not are returned."""
    from precopy.memory.digest import ZERO_PAGE_DIGEST, chunks_of_page_digests, page_digests

    npages, cp = 1000, 32  # a short last chunk
    with _random_source_chunks(shm / "s.mem", npages, cp, seed=5) as (mem, chunks):
        sent = np.zeros(npages, dtype=np.uint64)  # sent straight from memory: no record
        known = np.zeros(npages, dtype=bool)
        sent[10] = ZERO_PAGE_DIGEST  # sent as a zero page, and still one
        mem.pages[[7, 10, 500]] = 0  # 7, 500: zeroed since they were sent (a hole punched, then read)
        reported = np.array([500, 600], dtype=np.uint32)
        assert chunks.would_rehash(reported) == 2
        _, extra = chunks.to_pages(reported, sent, known, None)
        assert chunks.by_page and known.all()
        assert extra.tolist() == [7]  # 500 was reported: it is sent anyway
        assert chunks.table is not None
        assert (chunks.table == chunks_of_page_digests(page_digests(mem.pages), cp)).all()
        rng = np.random.default_rng(6)
        for _ in range(5):
            written = np.unique(rng.integers(0, npages, 40)).astype(np.uint32)
            mem.pages[written, :8] = rng.integers(0, 256, (len(written), 8), dtype=np.uint8)
            _, more = chunks.rehash(written, sent)
            assert more.size == 0
            assert (chunks.table == chunks_of_page_digests(page_digests(mem.pages), cp)).all()
        assert chunks.estimate(100) == pytest.approx(100 * chunks.seconds_per_page)
        mem.pages[3, 0] ^= 1  # not reported: only a recompute from the region sees it
        bad = np.array([0], dtype=np.uint32)
        assert chunks.recompute(bad, sent)[0] == chunks_of_page_digests(page_digests(mem.pages), cp)[0]


def test_chunks_hashed_during_the_full_copy_are_those_a_run_covers_whole(shm: Path) -> None:
    """SourceChunks.hash_early: the chunks a run of the full copy covers whole (the short last one
    when the run reaches the end), hashed as the region holds them; a run's partial chunks are left
    for the first scan (DigestScanner.chunk_tables hashes only those, holes unread)."""
    from concurrent.futures import ThreadPoolExecutor

    from precopy.memory.digest import chunk_digests, region_chunk_digests
    from precopy.memory.tracking import SourceChunks

    npages, cp = 1000, 32  # 32 chunks, the last of 8 pages
    path = shm / "e.mem"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8).tobytes())
    with ThreadPoolExecutor(2) as pool, GuestMemory.open(path) as mem:
        chunks = SourceChunks(mem, cp, pool)
        want = chunk_digests(mem.view, cp * PAGE_SIZE)
        chunks.hash_early(10, 100)  # chunks 1, 2 whole; 0 and 3 in part
        chunks.hash_early(970, npages)  # chunk 30 in part, the short last one whole
        assert np.flatnonzero(chunks.early_known).tolist() == [1, 2, 31]
        assert (chunks.early[[1, 2, 31]] == want[[1, 2, 31]]).all() and chunks.early_s > 0
        holes = np.zeros(npages, dtype=bool)
        holes[64:96] = True  # chunk 2 wholly in a hole: the zero digest, unread
        got = region_chunk_digests(mem.view, cp, holes, pool, np.array([2, 0, 31]))
        assert got.tolist() == [region_chunk_digests(mem.view, cp, holes)[2], want[0], want[31]]


@pytest.mark.parametrize("by_page", [False, True])
def test_a_page_written_sent_and_zeroed_since_is_resent_by_the_rehash(shm: Path, by_page: bool) -> None:
    """A page the tracker found written just before its send (UffdTracker.rearm) is rehashed, not
    resent -- unless it reads as zeros now although it did not then: a hole punched after the send,
    which reading it allocated (the next hole check would not see it)."""
    from precopy.memory.digest import ZERO_PAGE_DIGEST, page_digests

    npages, cp = 256, 32
    with _random_source_chunks(shm / "z.mem", npages, cp, seed=7) as (mem, chunks):
        sent = np.zeros(npages, dtype=np.uint64)
        if by_page:
            chunks.to_pages(np.zeros(0, dtype=np.uint32), sent, np.zeros(npages, dtype=bool), None)
        assert not (sent == ZERO_PAGE_DIGEST).any()
        mem.pages[[40, 41]] = 0  # 40: reported, sent now; 41: written and sent before the scan, zeroed since
        mem.pages[42, 0] ^= 1  # 42: written and sent before the scan, still data
        written = np.array([40, 41, 42], dtype=np.uint32)
        _, extra = chunks.rehash(written, sent, sending=np.array([40], dtype=np.uint32))
        assert extra.tolist() == [41]
        if by_page:
            assert (sent[written] == page_digests(mem.pages, written)).all()


def test_by_page_a_hole_read_as_zeros_then_sent_as_data_and_punched_again_is_resent(shm: Path) -> None:
    """By page, the record holds each page as last read, not what was sent: a page read as a hole
    (zero digest), written and sent as data (by the rearm, unrecorded), then punched again and read
    by the rehash of the rearm's pages (allocating the hole: the next hole check cannot see it) is
    resent, because the destination is not known to hold zeros there (``held_zero``).  Before,
    the rehash compared with the zero digest read earlier and let it be: the final verification
    repaired its chunk (test_no_write_is_missed[pages-punch], 1 run in 4-7)."""
    from precopy.memory.digest import ZERO_PAGE_DIGEST

    npages, cp = 256, 32
    with _random_source_chunks(shm / "h.mem", npages, cp, seed=11) as (mem, chunks):
        sent = np.zeros(npages, dtype=np.uint64)
        held_zero = np.zeros(npages, dtype=bool)  # every page sent as data by the full copy
        mem.pages[[50, 51]] = 0  # holes punched; reported (50 and 51), they read as zeros by page
        chunks.to_pages(np.array([50, 51], dtype=np.uint32), sent, np.zeros(npages, dtype=bool), None,
                        held_zero=held_zero)
        assert sent[50] == sent[51] == ZERO_PAGE_DIGEST
        held_zero[[50, 51]] = True  # and go as zero pages
        mem.pages[[50, 51], :8] = 7  # written before their send, which the rearm found: sent as data
        held_zero[[50, 51]] = False  # (sending as data does not touch the record by page)
        mem.pages[50] = 0  # punched again, then read by the rehash of the rearm's pages
        written = np.array([50, 51], dtype=np.uint32)
        _, extra = chunks.rehash(written, sent, sending=written[:0], held_zero=held_zero)
        assert extra.tolist() == [50]
        assert sent[50] == ZERO_PAGE_DIGEST and sent[51] != ZERO_PAGE_DIGEST  # the region as read
        # Where the destination does hold zeros, a page reading as zeros is not resent.
        held_zero[50] = True
        mem.pages[51] = 0
        _, extra = chunks.rehash(written, sent, sending=written[:0], held_zero=held_zero)
        assert extra.tolist() == [51]
        _, extra = chunks.rehash(written, sent, sending=written[:0], held_zero=np.ones(npages, dtype=bool))
        assert extra.size == 0


@needs_uffd
def test_a_hole_at_two_scans_is_reported_where_the_destination_holds_data(shm: Path) -> None:
    """A page that is a hole at one scan, then written, sent as data and punched again before the
    next is a hole at both: "became a hole since the last scan" misses it, and by page the record
    says zeros (read as a hole).  Where the destination is not known to hold zeros the scan reports it."""
    from precopy.memory.digest import ZERO_PAGE_DIGEST

    t = SelfTracked(shm / "r.mem", 64)
    try:
        sent = np.full(64, 1, dtype=np.uint64)  # data, as sent by the full copy
        held_zero = np.zeros(64, dtype=bool)
        punch(t.fd, 9)
        assert t.tracker.scan(sent, held_zero=held_zero).tolist() == [9]
        sent[9] = ZERO_PAGE_DIGEST  # read as a hole (not allocated: holes are taken as zeros unread)
        held_zero[9] = True  # and sent as a zero page
        assert t.tracker.scan(sent, held_zero=held_zero).size == 0
        t.pages[9, :8] = 7  # written; the rearm before its send finds it: it goes as data
        t.tracker.rearm(np.array([9], dtype=np.uint32))
        assert t.tracker.take_rewritten().tolist() == [9]
        held_zero[9] = False  # (by page, sending as data leaves the record as it was read: zeros)
        punch(t.fd, 9)  # punched again: a hole at this scan as at the last one
        assert t.tracker.scan(sent, held_zero=held_zero).tolist() == [9]
        held_zero[9] = True  # resent as a zero page: nothing more
        assert t.tracker.scan(sent, held_zero=held_zero).size == 0
    finally:
        t.close()


@needs_uffd
def test_with_a_tracker_each_run_is_mapped_in_before_its_send_never_after(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mapping a page in reads it: a page sent, then punched, then mapped in is allocated again as
    zeros, and no hole check sees it afterwards (a map-in thread starved past the full copy on a busy
    machine left the destination the page's old data).  With a tracker the full copy maps each run
    in after its re-protection, hashes it and then sends it (one batch ahead of the sends): nothing
    maps pages in behind the sends.  A guest punching holes all along migrates exactly."""
    threads: list[object] = []
    events: list[tuple[str, int, int]] = []
    real_map_in_now = Preparation.map_in_now
    real_send_batch = precopy.session.sender.PageSender._send_batch

    def map_in_now(self: Preparation, first: int, stop: int) -> None:
        events.append(("map", first, stop))
        real_map_in_now(self, first, stop)

    async def send_batch(self: Any, idx: np.ndarray, run: bool, compress: bool) -> tuple[int, int, int]:
        events.append(("send", int(idx[0]), int(idx[-1]) + 1))
        return await real_send_batch(self, idx, run, compress)

    real_hash_early = precopy.memory.tracking.SourceChunks.hash_early

    def hash_early(self: Any, first: int, stop: int) -> None:
        events.append(("hash", first, stop))
        real_hash_early(self, first, stop)

    monkeypatch.setattr(Preparation, "start_map_in", lambda self, pages: threads.append(pages))
    monkeypatch.setattr(Preparation, "map_in_now", map_in_now)
    monkeypatch.setattr(precopy.session.sender.PageSender, "_send_batch", send_batch)
    monkeypatch.setattr(precopy.memory.tracking.SourceChunks, "hash_early", hash_early)
    mem, ctl, _ = _start_guest(procs, shm, pattern="punch", npages=2048)
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp"
    assert not threads
    maps = [i for i, e in enumerate(events) if e[0] == "map"]
    assert maps
    for i in maps:  # each run mapped in is sent after, and no page of it was sent before
        assert ("send", *events[i][1:]) in events[i + 1:]
        assert not any(e[0] == "send" and e[1] < events[i][2] and events[i][1] < e[2] for e in events[:i])
        # its chunks hashed in between, right before its send (the send then reads it from the
        # cache; the thread may map the next run in meanwhile)
        sent = events.index(("send", *events[i][1:]), i + 1)
        assert [e for e in events[i:sent] if e[0] != "map"][-1:] == [("hash", *events[i][1:])]
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


@needs_uffd
def test_the_arming_runs_beside_the_connection_and_the_sample_of_an_existing_region_beside_it(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arming the tracker (tens of ms a GiB) runs in a thread while the source connects, and into an
    existing region the destination is asked for its sample of pages while the arming still runs
    (the arming here waits to see that request go): neither waits for the other.  The pages are
    read for sending only after the arming, and the region ends exact."""
    sample_sent = threading.Event()
    seen: list[str] = []
    real_arm, real_request = UffdTracker.arm, precopy.session.exchange.Exchange.request

    def arm(self: UffdTracker) -> float:
        seen.append("sample asked during the arming" if sample_sent.wait(30) else "no sample during the arming")
        s = real_arm(self)
        seen.append("armed")
        return s

    async def request(self: Any, **fields: Any) -> int:
        if fields.get("pages_of") is not None:
            sample_sent.set()
        return await real_request(self, **fields)

    real_send_all = precopy.session.sender.PageSender.send_all

    async def send_all(self: Any, *a: Any, **kw: Any) -> None:
        seen.append("full copy")
        await real_send_all(self, *a, **kw)

    monkeypatch.setattr(UffdTracker, "arm", arm)
    monkeypatch.setattr(precopy.session.exchange.Exchange, "request", request)
    monkeypatch.setattr(precopy.session.sender.PageSender, "send_all", send_all)
    mem, ctl, _ = _start_guest(procs, shm, npages=2048)
    (shm / "dest").mkdir(exist_ok=True)
    create_region(shm / "dest" / "g.mem", f"{2048 * 4}K", seed=7)  # of the right size, other contents
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp")
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp" and rep.dest_region == "existing"
    assert seen == ["sample asked during the arming", "armed", "full copy"]
    assert rep.verify_repairs == 0
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()


@needs_uffd
def test_a_connection_that_fails_while_arming_waits_for_the_arming_before_the_tracker_closes(
        procs: Procs, shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No destination: the connection fails while the arming's thread still runs; the tracker is
    closed only once that thread is done (closing its userfaultfd under an ioctl would be a race),
    and the guest runs on."""
    seen: list[str] = []
    real_arm, real_close = UffdTracker.arm, UffdTracker.close

    def arm(self: UffdTracker) -> float:
        time.sleep(0.5)  # still arming when the connection is refused
        s = real_arm(self)
        seen.append("armed")
        return s

    def close(self: UffdTracker) -> None:
        seen.append("closed")
        real_close(self)

    monkeypatch.setattr(UffdTracker, "arm", arm)
    monkeypatch.setattr(UffdTracker, "close", close)
    mem, ctl, g = _start_guest(procs, shm, npages=256)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there

    async def go() -> None:
        gc = GuestControl(ctl)
        try:
            await precopy.session.source.migrate(SourceOptions(
                host="127.0.0.1", port=port, memory=mem, tracking="uffd-wp", connect_timeout_s=0.1), gc)
        finally:
            await gc.close()

    with pytest.raises(MigrationAborted, match="cannot connect"):
        asyncio.run(go())
    assert seen[:2] == ["armed", "closed"]
    assert g.poll() is None

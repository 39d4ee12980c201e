"""The destination's page placement (precopy.session.postcopy_pages) against a real guest process:
a child maps a tmpfs region, offers its userfaultfd as a post-copy guest does, and touches pages;
this process registers the range, reads its faults and places pages -- MISSING mode (holes punched,
UFFDIO_COPY) and MINOR mode (nothing punched: pwrite, then UFFDIO_CONTINUE).  No sockets to the
source, no timing assertions."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from precopy.memory.uffd import TrackingUnavailable, create_userfaultfd, uffd_api
from precopy.memory.uffd_missing import (FAULT_MSG_SIZE, data_runs, page_runs, punch_pages, read_faults,
                                         register_missing, register_postcopy)
from precopy.protocol import PAGE_SIZE
from precopy.session.postcopy_pages import PagePlacer, latency_stats

NPAGES = 16


class Guest:
    """A child process mapping ``path``: it reads the first byte of the pages it is told to."""

    def __init__(self, path: Path) -> None:
        self.sock, child = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            self.sock.close()
            try:
                fd = os.open(path, os.O_RDWR)
                mm = mmap.mmap(fd, NPAGES * PAGE_SIZE)
                start = ctypes.addressof(ctypes.c_char.from_buffer(mm))
                uffd = create_userfaultfd()
                uffd_api(uffd, 0)
                socket.send_fds(child, [str(start).encode()], [uffd])
                arr = np.frombuffer(mm, dtype=np.uint8)
                while True:
                    cmd = child.recv(64)
                    if not cmd:
                        break
                    op, page = cmd.split()
                    if op == b"r":
                        child.send(bytes([int(arr[int(page) * PAGE_SIZE])]))
                    else:  # write
                        arr[int(page) * PAGE_SIZE] = 0xEE
                        child.send(b"k")
            finally:
                os._exit(0)
        child.close()
        msg, fds, _, _ = socket.recv_fds(self.sock, 64, 1)
        self.start, self.uffd = int(msg), fds[0]

    def ask(self, op: str, page: int) -> None:
        self.sock.send(f"{op} {page}".encode())

    def answer(self) -> bytes:
        return self.sock.recv(1)

    def stop(self) -> None:
        self.sock.close()
        os.waitpid(self.pid, 0)

    def close(self) -> None:
        self.stop()
        os.close(self.uffd)


@pytest.fixture
def region(tmp_path: Path) -> Iterator[Path]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = base / f"pc-pages-{os.getpid()}.mem"
    with open(path, "wb") as f:
        f.write(bytes([7]) * NPAGES * PAGE_SIZE)
    yield path
    path.unlink(missing_ok=True)


def setup(region: Path, missing: list[int]) -> tuple[Guest, PagePlacer, int]:
    try:
        guest = Guest(region)
    except TrackingUnavailable as exc:  # pragma: no cover
        pytest.skip(f"no userfaultfd here: {exc}")
    fd = os.open(region, os.O_RDWR)
    punch_pages(fd, np.array(missing, dtype=np.uint32))
    register_missing(guest.uffd, guest.start, NPAGES * PAGE_SIZE)
    os.set_blocking(guest.uffd, False)
    return guest, PagePlacer(guest.uffd, guest.start, NPAGES, np.array(missing, dtype=np.uint32), fd), fd


def wait_faults(placer: PagePlacer, guest: Guest) -> list[int]:
    """The pages to ask for, once the guest's next fault came (generous timeout: not about time)."""
    buf = bytearray(FAULT_MSG_SIZE * 8)
    while True:
        assert select.select([guest.uffd], [], [], 60)[0], "the guest never faulted"
        addrs = read_faults(guest.uffd, buf)
        if addrs:
            return placer.faulted(addrs, 0.0)


def page(value: int) -> np.ndarray:
    return np.full(PAGE_SIZE, value, dtype=np.uint8)


def test_a_fault_is_asked_for_once_and_resolved_by_the_page(region: Path) -> None:
    guest, placer, fd = setup(region, [3, 4, 9])
    try:
        guest.ask("r", 4)
        assert wait_faults(placer, guest) == [4]
        assert placer.faults == 1 and placer.requested[4]
        # Pushed pages 3 and 4 arrive as one batch (a run): the guest's read gets page 4's bytes.
        placed = placer.place(np.array([3, 4], dtype=np.uint32), memoryview(np.concatenate([page(0x33), page(0x44)])),
                              np.zeros(0, dtype=np.uint32))
        assert placed == 2 and guest.answer() == b"\x44"
        assert placer.left == 1 and len(placer.latencies) == 1 and placer.pushed == 1
        # A page not missing that the guest touches is not asked for: its bytes are the file's.
        guest.ask("r", 5)
        assert guest.answer() == b"\x07"
    finally:
        guest.close()
        os.close(fd)


def test_a_page_the_guest_wrote_is_never_overwritten(region: Path) -> None:
    guest, placer, fd = setup(region, [2, 6])
    try:
        placer.place(np.array([2], dtype=np.uint32), memoryview(page(0x22)), np.zeros(0, dtype=np.uint32))
        guest.ask("w", 2)
        assert guest.answer() == b"k"
        # The same page again (a source bug, or a resent batch): skipped, not written over the guest's write.
        placer.place(np.array([2, 6], dtype=np.uint32), memoryview(np.concatenate([page(0x99), page(0x66)])),
                     np.zeros(0, dtype=np.uint32))
        assert placer.duplicates == 1 and placer.left == 0
        guest.ask("r", 2)
        assert guest.answer() == b"\xee"
        guest.ask("r", 6)
        assert guest.answer() == b"\x66"
        # UFFDIO_COPY itself refuses a present page: EEXIST, counted, nothing written.
        placer.need[2] = True
        placer.left += 1
        placer.place(np.array([2], dtype=np.uint32), memoryview(page(0x55)), np.zeros(0, dtype=np.uint32))
        assert placer.present == 1
        guest.ask("r", 2)
        assert guest.answer() == b"\xee"
    finally:
        guest.close()
        os.close(fd)


def test_zero_pages_and_holes(region: Path) -> None:
    guest, placer, fd = setup(region, [1, 8])
    try:
        placer.place(np.zeros(0, dtype=np.uint32), None, np.array([8], dtype=np.uint32))
        guest.ask("r", 8)
        assert guest.answer() == b"\x00"
        # A hole that is not missing (zeros the source sent long ago, or never wrote): filled here.
        punch_pages(fd, np.array([12], dtype=np.uint32))
        guest.ask("r", 12)
        assert wait_faults(placer, guest) == [] and placer.zero_faults == 1
        assert guest.answer() == b"\x00"
    finally:
        guest.close()
        os.close(fd)


def test_after_the_guest_exits_pages_go_into_the_file_s_holes(region: Path) -> None:
    guest, placer, fd = setup(region, [0, 10])
    guest.stop()  # it exited: its address space is gone (our copy of its fd stays)
    placed = placer.place(np.array([0, 10], dtype=np.uint32), memoryview(np.concatenate([page(0xA0), page(0xAA)])),
                          np.zeros(0, dtype=np.uint32))
    assert placer.guest_gone and placed == 2 and placer.left == 0
    data = region.read_bytes()
    assert data[0] == 0xA0 and data[10 * PAGE_SIZE] == 0xAA and data[PAGE_SIZE] == 7
    os.close(fd)
    os.close(guest.uffd)


def test_helpers() -> None:
    assert page_runs(np.array([1, 2, 3, 7, 9, 10], dtype=np.uint32)) == [(1, 3), (7, 1), (9, 2)]
    assert page_runs(np.zeros(0, dtype=np.uint32)) == []
    stats = latency_stats([0.001, 0.002, 0.003])
    assert stats["fault_p50_us"] == pytest.approx(2000) and stats["fault_max_us"] == pytest.approx(3000)
    assert latency_stats([]) == {}


def setup_minor(region: Path, missing: list[int]) -> tuple[Guest, PagePlacer, int]:
    """MINOR mode: nothing punched, the missing pages hold stale bytes (7) until placed."""
    try:
        guest = Guest(region)
    except TrackingUnavailable as exc:  # pragma: no cover
        pytest.skip(f"no userfaultfd here: {exc}")
    guest.sock.settimeout(60)  # a fault left unserved fails the test instead of hanging it
    try:
        register_postcopy(guest.uffd, guest.start, NPAGES * PAGE_SIZE, minor=True)
    except TrackingUnavailable as exc:  # pragma: no cover - kernels before 5.14
        guest.close()
        pytest.skip(f"no MINOR faults on tmpfs here: {exc}")
    os.set_blocking(guest.uffd, False)
    fd = os.open(region, os.O_RDWR)
    return guest, PagePlacer(guest.uffd, guest.start, NPAGES, np.array(missing, dtype=np.uint32), fd, minor=True), fd


def no_fault_pending(guest: Guest) -> bool:
    return not select.select([guest.uffd], [], [], 0)[0]


def test_minor_a_fault_is_asked_for_once_and_held_pages_are_served_here(region: Path) -> None:
    guest, placer, fd = setup_minor(region, [3, 4, 9])
    try:
        guest.ask("r", 4)  # its stale 7 is never seen: the guest waits
        assert wait_faults(placer, guest) == [4]
        assert placer.faults == 1 and placer.requested[4]
        placed = placer.place(np.array([3, 4], dtype=np.uint32), memoryview(np.concatenate([page(0x33), page(0x44)])),
                              np.zeros(0, dtype=np.uint32))
        assert placed == 2 and guest.answer() == b"\x44"
        assert placer.left == 1 and len(placer.latencies) == 1 and placer.pushed == 1
        guest.ask("r", 3)  # placed: mapped, no fault
        assert guest.answer() == b"\x33" and no_fault_pending(guest)
        # A page that is not missing faults too (MINOR: nothing is mapped yet) and is mapped here at once.
        guest.ask("r", 5)
        assert wait_faults(placer, guest) == [] and placer.zero_faults == 1
        assert guest.answer() == b"\x07"
    finally:
        guest.close()
        os.close(fd)


def test_minor_a_page_the_guest_wrote_is_never_written_again(region: Path) -> None:
    guest, placer, fd = setup_minor(region, [2, 6])
    try:
        placer.place(np.array([2], dtype=np.uint32), memoryview(page(0x22)), np.zeros(0, dtype=np.uint32))
        guest.ask("w", 2)
        assert guest.answer() == b"k"
        placer.place(np.array([2, 6], dtype=np.uint32), memoryview(np.concatenate([page(0x99), page(0x66)])),
                     np.zeros(0, dtype=np.uint32))
        assert placer.duplicates == 1 and placer.left == 0
        guest.ask("r", 2)
        assert guest.answer() == b"\xee"
        guest.ask("r", 6)
        assert guest.answer() == b"\x66"
        data = region.read_bytes()
        assert data[2 * PAGE_SIZE] == 0xEE and data[2 * PAGE_SIZE + 1] == 0x22 and data[6 * PAGE_SIZE] == 0x66
    finally:
        guest.close()
        os.close(fd)


def test_minor_holes_missing_or_not(region: Path) -> None:
    guest, placer, fd = setup_minor(region, [1, 8])
    try:
        punch_pages(fd, np.array([1, 12], dtype=np.uint32))  # 1: a missing page that is a hole; 12: zeros
        guest.ask("r", 1)
        assert wait_faults(placer, guest) == [1]
        placer.place(np.array([1], dtype=np.uint32), memoryview(page(0x11)), np.zeros(0, dtype=np.uint32))
        assert guest.answer() == b"\x11"
        guest.ask("r", 12)
        assert wait_faults(placer, guest) == [] and placer.zero_faults == 1
        assert guest.answer() == b"\x00"
        placer.place(np.zeros(0, dtype=np.uint32), None, np.array([8], dtype=np.uint32))
        guest.ask("r", 8)
        assert guest.answer() == b"\x00" and no_fault_pending(guest)
    finally:
        guest.close()
        os.close(fd)


def test_minor_held_pages_are_mapped_in_the_background(region: Path) -> None:
    guest, placer, fd = setup_minor(region, [5])
    try:
        punch_pages(fd, np.array([9], dtype=np.uint32))  # a hole: nothing to map there
        assert data_runs(fd, NPAGES * PAGE_SIZE) == [(0, 9), (10, 6)]
        assert placer.map_held(4) == 4 and placer.map_held(100) == NPAGES - 2 - 4 and placer.map_held(100) == 0
        for p in (0, 3, 15):
            guest.ask("r", p)
            assert guest.answer() == b"\x07" and no_fault_pending(guest)
        assert placer.zero_faults == 0
        guest.ask("r", 5)  # missing: still waits for its page
        assert wait_faults(placer, guest) == [5]
        placer.place(np.array([5], dtype=np.uint32), memoryview(page(0x55)), np.zeros(0, dtype=np.uint32))
        assert guest.answer() == b"\x55"
    finally:
        guest.close()
        os.close(fd)


def test_minor_after_the_guest_exits_pages_go_into_the_file(region: Path) -> None:
    guest, placer, fd = setup_minor(region, [0, 10])
    guest.stop()
    placed = placer.place(np.array([0, 10], dtype=np.uint32), memoryview(np.concatenate([page(0xA0), page(0xAA)])),
                          np.zeros(0, dtype=np.uint32))
    assert placer.guest_gone and placed == 2 and placer.left == 0 and placer.map_held(100) == 0
    data = region.read_bytes()
    assert data[0] == 0xA0 and data[10 * PAGE_SIZE] == 0xAA and data[PAGE_SIZE] == 7
    os.close(fd)
    os.close(guest.uffd)


def test_without_minor_faults_the_missing_pages_are_punched(region: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostcopyDest._register's fallback: MINOR refused -> what touches the region is stopped first, the
    missing pages are punched out, MISSING is registered (the placer then works as above)."""
    from types import SimpleNamespace

    from precopy.session import postcopy_dest

    try:
        guest = Guest(region)
    except TrackingUnavailable as exc:  # pragma: no cover
        pytest.skip(f"no userfaultfd here: {exc}")
    real = postcopy_dest.register_postcopy

    def no_minor(uffd: int, start: int, length: int, *, minor: bool) -> None:
        if minor:
            raise TrackingUnavailable("no MINOR faults here (the test says so)")
        real(uffd, start, length, minor=False)

    monkeypatch.setattr(postcopy_dest, "register_postcopy", no_minor)
    fd = os.open(region, os.O_RDWR)
    try:
        pc = object.__new__(postcopy_dest.PostcopyDest)
        quiesced: list[int] = []
        pc.region_fd, pc._punch_ms = fd, 0.0
        pc.missing_mask = np.zeros(NPAGES, dtype=bool)
        pc.missing_mask[[3, 4]] = True
        pc.n_missing = 2
        pc._quiesce = lambda: quiesced.append(1)
        pc.begin = SimpleNamespace(migration_id="t")  # type: ignore[assignment]
        assert pc._register(guest.uffd, guest.start, NPAGES * PAGE_SIZE) is False
        assert quiesced == [1] and data_runs(fd, NPAGES * PAGE_SIZE) == [(0, 3), (5, 11)]
    finally:
        guest.close()
        os.close(fd)


def test_minor_faults_are_told_apart_remote_or_in_flight(region: Path) -> None:
    """A fault whose page comes in a frame of nothing but faulted pages (the answer to its REQUEST)
    is remote; one whose page comes in a push is in flight; a fault read only after its page was
    placed (the placement woke the guest) is an in-flight fault too, timed from ``since``."""
    guest, placer, fd = setup_minor(region, [2, 3, 4, 9, 11])
    buf = bytearray(FAULT_MSG_SIZE * 8)
    try:
        guest.ask("r", 9)
        assert select.select([guest.uffd], [], [], 60)[0]
        assert placer.faulted(read_faults(guest.uffd, buf), 10.0, since=9.0) == [9]
        placer.place(np.array([9], dtype=np.uint32), memoryview(page(0x99)), np.zeros(0, dtype=np.uint32))
        assert guest.answer() == b"\x99"
        assert len(placer.remote_latencies) == 1 and placer._fault_t == {}
        assert placer.remote_latencies[0] >= 0  # timed from since (9.0): monotonic time is far past it
        guest.ask("r", 3)
        assert select.select([guest.uffd], [], [], 60)[0]
        assert placer.faulted(read_faults(guest.uffd, buf), 0.0) == [3]
        placer.place(np.array([2, 3, 4], dtype=np.uint32), memoryview(np.concatenate([page(2), page(3), page(4)])),
                      np.zeros(0, dtype=np.uint32))  # a push: 2 and 4 never faulted on
        assert guest.answer() == b"\x03"
        assert len(placer.inflight_latencies) == 1 and len(placer.remote_latencies) == 1
        # A fault read after its page was placed: counted from when the fd was last seen empty.
        placer.place(np.zeros(0, dtype=np.uint32), None, np.array([11], dtype=np.uint32))
        t_placed = float(placer._placed_t[11])
        assert placer.faulted([guest.start + 11 * PAGE_SIZE], t_placed + 1, since=t_placed - 0.5) == []
        assert placer.faults == 3 and placer.inflight_latencies[-1] == pytest.approx(0.5)
        # ... but not a fault on a page placed before the fd was seen empty: that one is served here.
        assert placer.faulted([guest.start + 11 * PAGE_SIZE], t_placed + 2, since=t_placed + 1) == []
        assert placer.faults == 3
        stats = placer.stats()
        assert stats["remote_faults"] == 1 and "remote_p50_us" in stats and "inflight_p99_us" in stats
        assert stats["faults"] == 3 and placer.left == 0
    finally:
        guest.close()
        os.close(fd)


def test_waiting_and_awaited_frames(region: Path) -> None:
    guest, placer, fd = setup_minor(region, [1, 2, 6])
    try:
        assert not placer.waiting() and not placer.awaited(np.array([1, 2]), np.zeros(0))
        guest.ask("r", 6)
        assert wait_faults(placer, guest) == [6]
        assert placer.waiting() and not placer.awaited(np.array([1, 2]), np.zeros(0))
        assert placer.awaited(np.zeros(0, dtype=np.uint32), np.array([6], dtype=np.uint32))
        placer.place(np.zeros(0, dtype=np.uint32), None, np.array([6], dtype=np.uint32))
        assert guest.answer() == b"\x00" and not placer.waiting()
    finally:
        guest.close()
        os.close(fd)

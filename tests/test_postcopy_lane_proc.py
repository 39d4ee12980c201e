"""The fault lane's ends in processes of their own (precopy.session.postcopy_lane_proc): the lock and
the memory they share with their agent, the source's claim and counters across processes, the
destination's placer counts merged back; then each end's child over a socket pair -- the source's
answers from its own mapping of the region, the destination's placing a page a real guest faulted
on (a userfaultfd in MINOR mode, as in tests/test_postcopy_pages.py).  A cut or killed lane with
its children: the fault matrix's ``lane`` cells (tests/test_postcopy_matrix.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
import pytest
import xxhash

from precopy.memory.region import GuestMemory
from precopy.net.channel import Channel, LinkError
from precopy.protocol import PAGE_SIZE, Begin, Pages, Request
from precopy.session.lane_shared import _LOCK, CrossLock, SharedArrays, source_spec
from precopy.session.postcopy_backlog import PushBacklog
from precopy.session.postcopy_lane import DestLane
from precopy.session.postcopy_lane_child import SharedAnswering, placer_stats
from precopy.session import postcopy_lane_proc
from precopy.session.postcopy_lane_proc import lane_cpu, run_lane_process
from precopy.session.postcopy_pages import PagePlacer
from precopy.session.postcopy_state import mapped_from, persist_need
from precopy.session.postcopy_stream import PageStream, StreamStats

from .test_postcopy_lane import _joined, _pair, _receive
from .test_postcopy_pages import NPAGES, page, setup_minor

BEGIN = Begin(migration_id="mig-1", name="guest", size=NPAGES * PAGE_SIZE, chunk_pages=8)


@pytest.fixture
def region(tmp_path: Path) -> Iterator[Path]:
    """A region of NPAGES pages of 7s (tests/test_postcopy_pages.py's, on /dev/shm: MINOR faults)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = base / f"pc-lane-{os.getpid()}.mem"
    path.write_bytes(bytes([7]) * NPAGES * PAGE_SIZE)
    yield path
    path.unlink(missing_ok=True)


def test_the_cross_lock_excludes_another_process_and_is_given_back_with_it() -> None:
    shared = SharedArrays.create("t", {"x": ("int64", 1)})
    mine = CrossLock.open(shared.path())
    took, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            theirs = CrossLock.open(f"/proc/{os.getppid()}/fd/{shared.fd}")
            with theirs:
                os.write(took[1], b"t")
                os.read(go[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(took[0], 1) == b"t"
        with pytest.raises(OSError) as held:  # the child holds it: a try without waiting fails
            fcntl.fcntl(mine.fd, fcntl.F_OFD_SETLK, _LOCK)
        assert held.value.errno in (errno.EAGAIN, errno.EACCES)
        os.write(go[1], b"g")
        with mine:  # given back (the child left its ``with``, then exited)
            shared["x"][0] += 1
    finally:
        os.waitpid(pid, 0)
        mine.close()
        shared.close()
    for fd in (*took, *go):
        os.close(fd)


def test_shared_arrays_are_one_memory_for_every_mapping() -> None:
    spec = source_spec(100)
    a = SharedArrays.create("t", spec)
    b = SharedArrays(os.open(a.path(), os.O_RDWR), spec)
    a["need"][5] = True
    b["counters"][2] = 77
    assert b["need"][5] and a["counters"][2] == 77 and a["need"].sum() == 1
    with pytest.raises(ValueError):
        SharedArrays(os.open(a.path(), os.O_RDWR), source_spec(10_000))
    b.close()
    a.close()


class _Mem:
    """GuestMemory's views over bytes: page i holds the byte i (page 7 and up: zeros)."""

    def __init__(self) -> None:
        data = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
        data[:7] = np.arange(7, dtype=np.uint8)[:, None]
        self.pages = data
        self.words = data.reshape(-1).view(np.uint64)
        self.view = memoryview(data.reshape(-1))
        self.path = Path("/nonexistent")


def test_a_shared_stream_claims_across_processes_and_folds_the_child_s_answers_in() -> None:
    stream = PageStream(_Mem(), np.ones(NPAGES, dtype=bool), StreamStats())  # type: ignore[arg-type]
    stream.claim(np.array([1], dtype=np.uint32))  # pushed before the lane
    fd, _ = stream.share()
    assert not stream.need[1] and stream.need[2]  # the mask moved, as it was
    theirs = SharedArrays(os.open(f"/proc/self/fd/{fd}", os.O_RDWR), source_spec(NPAGES))
    child = SharedAnswering(stream.mem, theirs, CrossLock.open(f"/proc/self/fd/{fd}"))  # (as the child's)
    assert child.claim(np.array([1, 2, 3], dtype=np.uint32)).tolist() == [2, 3]
    assert stream.claim(np.array([3, 4], dtype=np.uint32)).tolist() == [4]  # 3 went on the lane
    child.answered(np.array([2, 3]), 9000)
    batch = stream._next()  # folds the child's answers in: counted, the push goes on after them
    assert stream.stats.requested == 2 and stream.stats.bytes_on_wire == 9000
    assert batch is not None and batch[0][0] == 5
    need = np.ones(NPAGES, dtype=bool)
    need[:3] = False
    stream.restart(need)  # a new link: the shared mask takes what the destination still lacks
    assert theirs["need"][3] and not theirs["need"][2]
    stream.close()
    assert not stream.need[2] and stream.need[3]
    child.lock.close()  # type: ignore[attr-defined]
    theirs.close()


def test_a_child_placer_s_counts_merge_into_the_session_s(tmp_path: Path) -> None:
    r, w = os.pipe()
    region_fd = os.open(tmp_path / "r", os.O_RDWR | os.O_CREAT)
    try:
        mine = PagePlacer(r, 0, NPAGES, np.arange(NPAGES, dtype=np.uint32), region_fd)
        theirs = PagePlacer(r, 0, NPAGES, np.arange(NPAGES, dtype=np.uint32), region_fd)
        theirs.need = mine.need  # (shared, as the need file is)
        theirs._placed_t = mine._placed_t
        theirs.faulted([4 * PAGE_SIZE, 5 * PAGE_SIZE, 6 * PAGE_SIZE], 10.0, 9.0)
        theirs.need[4] = False  # the child placed 4 (its answer) ...
        theirs.faults, theirs.remote_latencies, theirs.latencies = 3, [0.001], [0.001]
        del theirs._fault_t[4]
        mine.need[5], mine._placed_t[5] = False, 9.5  # ... the session's push 5, after the fault
        mine.merge(placer_stats(theirs))
        assert mine.faults == 3 and mine.remote_latencies == [0.001]
        assert mine.inflight_latencies == [0.5]  # 5: from the fault's look to the push's placement
        assert mine.left == NPAGES - 2 and mine.outstanding().tolist() == [6]  # asked again on a new link
    finally:
        for fd in (r, w, region_fd):
            os.close(fd)


@contextlib.asynccontextmanager
async def source_child(tmp_path: Path, *, fast: bool = False, pushed: tuple[int, ...] = (),
                       on_stats: Any = None) -> AsyncIterator[tuple[asyncio.Future[None], PageStream, Channel]]:
    """A source's lane child started over a loopback pair (the lane task, the page stream it shares,
    the destination's end), serving a region whose pages 0-6 hold 1-7 and the rest zeros; ``pushed``:
    pages the push claimed first.  Everything goes at the end, the child too."""
    path = tmp_path / "vm.mem"
    data = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    data[:7] = np.arange(1, 8, dtype=np.uint8)[:, None]
    path.write_bytes(data.tobytes())
    mem = GuestMemory.open(str(path), writable=False)
    src, dst = await _pair()
    _joined(src, dst)
    stream = PageStream(mem, np.ones(NPAGES, dtype=bool), StreamStats())
    if pushed:
        stream.claim(np.array(pushed, dtype=np.uint32))
    fd, memory = stream.share()
    setup = {"side": "source", "npages": NPAGES, "memory": memory, "io_timeout_s": 5.0, **({"fast": True} if fast else {})}
    lane = asyncio.ensure_future(run_lane_process(src, setup, {"shared_fd": fd}, None,
                                                  on_stats or stream.lane_counted))
    try:
        yield lane, stream, dst
    finally:
        lane.cancel()  # (ended already in every test that passes: then a no-op)
        await asyncio.gather(lane, return_exceptions=True)
        stream.close()
        src.close()
        dst.close()
        mem.close()


def test_the_source_s_child_answers_from_its_own_mapping(tmp_path: Path) -> None:
    async def run() -> None:
        async with source_child(tmp_path, pushed=(2,)) as (lane, stream, dst):  # 2: went with the push
            dst.sock.setblocking(True)
            dst.send_blocking(Request(indices=np.array([2, 3, 9], dtype=np.uint32)))
            got = await asyncio.to_thread(_receive, dst, lambda evs: any(isinstance(e, Pages) for e in evs))
            ans = [e for e in got if isinstance(e, Pages)][0]
            assert ans.indices.tolist() == [3] and ans.zeros.tolist() == [9]  # not 2: it went with the push
            assert bytes(ans.payload) == bytes([4]) * PAGE_SIZE
            dst.send_blocking(Request(indices=np.array([NPAGES + 5], dtype=np.uint32)))  # past the region
            with pytest.raises(LinkError, match="REQUEST for page"):
                await asyncio.wait_for(lane, 120)
            stream.fold()
            assert stream.stats.requested == 2 and not stream.need[[2, 3, 9]].any()
            assert stream.stats.extra["lane_cpu_s"] > 0  # its CPU came back

    asyncio.run(run())


def _run_and_release(run: Any, lane: Any, guest: Any, fd: int) -> None:
    """Run a destination child's test body, then free its lane, guest and userfaultfd whatever happened."""
    try:
        asyncio.run(run())
    finally:
        lane.release()
        guest.close()
        os.close(fd)


class _Host:
    """PostcopyDest's part in its lane (postcopy_lane.LaneHost), over a real placer."""

    def __init__(self, placer: PagePlacer) -> None:
        self.placer: PagePlacer | None = placer
        self.backlog = PushBacklog()
        self.lock: Any = threading.Lock()
        self.begin = BEGIN
        self._uffd = placer.uffd
        self._seen_empty = 0.0
        self.faults_read = 0

    def _place_held(self, frame: Any) -> None:
        raise AssertionError("nothing is held back while a lane runs")

    def _on_fault(self) -> None:
        self.faults_read += 1


def test_the_destination_s_child_places_what_a_real_guest_faulted_on(region: Path, tmp_path: Path) -> None:
    guest, placer, fd = setup_minor(region, [3, 4, 9])
    placer.need = persist_need(placer.need, True, tmp_path / "mig-1.need")
    host = _Host(placer)
    lane = DestLane(host)  # type: ignore[arg-type]

    async def run() -> None:
        src, dst = await _pair()
        _joined(src, dst)
        task = lane.start(dst, 5.0)
        for _ in range(12000):  # (the child imports the engine: seconds on a busy machine)
            if lane.child or task.done():
                break
            await asyncio.sleep(0.01)
        assert lane.child, task
        guest.ask("r", 4)  # a real fault, read by the child: REQUEST on the lane
        src.sock.setblocking(True)
        got = await asyncio.to_thread(_receive, src, lambda evs: any(isinstance(e, Request) for e in evs))
        assert [int(p) for e in got if isinstance(e, Request) for p in e.indices] == [4]
        with host.lock:  # the session's push of 3 meanwhile, under the lock it shares with the child
            placer.place(np.array([3], dtype=np.uint32), memoryview(page(0x33)), np.zeros(0, dtype=np.uint32))
        payload = page(0x44).tobytes()
        src.send_blocking(Pages(indices=np.array([4], dtype=np.uint32), zeros=np.array([], dtype=np.uint32),
                                payload=payload, checksum=xxhash.xxh3_64_intdigest(payload)))
        assert await asyncio.to_thread(guest.answer) == b"\x44"  # placed by the child: the guest woke
        with host.lock:  # the last page, pushed: the child sees none missing and ends
            placer.place(np.zeros(0, dtype=np.uint32), None, np.array([9], dtype=np.uint32))
        await asyncio.wait_for(task, 120)  # nothing missing: the child ends, its counts merged
        assert placer.left == 0 and not placer.need.any() and placer.remote_latencies and placer.faults == 1
        guest.ask("r", 3)
        assert await asyncio.to_thread(guest.answer) == b"\x33"
        assert lane.cpu_s > 0 and lane.requests == 1
        src.close()
        dst.close()

    _run_and_release(run, lane, guest, fd)


def test_the_destination_s_child_fails_the_lane_when_the_source_goes(region: Path, tmp_path: Path) -> None:
    guest, placer, fd = setup_minor(region, [3, 4, 9])
    placer.need = persist_need(placer.need, True, tmp_path / "mig-1.need")
    lane = DestLane(_Host(placer))  # type: ignore[arg-type]

    async def run() -> None:
        src, dst = await _pair()
        _joined(src, dst)
        task = lane.start(dst, 5.0)
        for _ in range(12000):
            if lane.child or task.done():
                break
            await asyncio.sleep(0.01)
        guest.ask("r", 9)
        src.sock.setblocking(True)
        await asyncio.to_thread(_receive, src, lambda evs: any(isinstance(e, Request) for e in evs))
        src.sock.shutdown(socket.SHUT_RDWR)
        src.close()
        with pytest.raises(LinkError):
            await asyncio.wait_for(task, 120)
        assert placer.outstanding().tolist() == [9]  # asked for and not here: asked again on a new link
        placer.place(np.array([9], dtype=np.uint32), memoryview(page(0x99)), np.zeros(0, dtype=np.uint32))
        assert await asyncio.to_thread(guest.answer) == b"\x99"
        dst.close()

    _run_and_release(run, lane, guest, fd)


def test_a_tls_or_thread_lane_stays_on_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from precopy.session import postcopy_lane_proc

    class Tls(Channel):
        pass

    a, b = socket.socketpair()
    try:
        chan = Channel.__new__(Tls)
        chan.sock = a
        assert not postcopy_lane_proc.process_lane_ok(chan)
        plain = Channel.__new__(Channel)
        plain.sock = b
        assert postcopy_lane_proc.process_lane_ok(plain) == postcopy_lane_proc.LANE_PROCESS
        monkeypatch.setattr(postcopy_lane_proc, "LANE_PROCESS", False)
        assert not postcopy_lane_proc.process_lane_ok(plain)
    finally:
        a.close()
        b.close()


def test_the_need_mask_is_a_plain_array_over_its_file_and_says_which(tmp_path: Path) -> None:
    path = tmp_path / "m.need"
    need = persist_need(np.ones(8, dtype=bool), True, path)
    assert type(need) is np.ndarray and mapped_from(need) == str(path)  # (no memmap subclass per operation)
    need[3] = False
    assert path.read_bytes() == b"m" + bytes([1, 1, 1, 0, 1, 1, 1, 1])
    assert mapped_from(np.ones(8, dtype=bool)) is None


def test_the_lane_s_steps_are_traced_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from precopy.session import lane_shared

    lane_shared.trace("read", [5])  # off: nothing kept
    assert lane_shared.TRACE is None or ("read", 5) not in [(s, p) for s, p, _ in lane_shared.TRACE]
    monkeypatch.setattr(lane_shared, "TRACE", [])
    monkeypatch.setenv("PRECOPY_LANE_TRACE", str(tmp_path))
    lane_shared.trace("read", np.array([5, 6]), 1.5)
    lane_shared.trace("asked", [])  # no page: nothing
    lane_shared.dump_trace("dest")
    assert (tmp_path / f"lane-dest-{os.getpid()}.txt").read_text() == "read 5 1.5000000\n"


def test_a_lane_s_child_is_started_ahead_only_where_a_child_will_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from precopy.protocol import POSTCOPY_CAP, POSTCOPY_LANE_CAP
    from precopy.session import postcopy_source

    started: list[int] = []
    monkeypatch.setattr(postcopy_source, "prestart", lambda: started.append(1))

    class Tls(Channel):
        pass

    a, b = socket.socketpair()
    try:
        plain, tls = Channel.__new__(Channel), Channel.__new__(Tls)
        plain.sock, tls.sock = a, b
        caps = (POSTCOPY_CAP, POSTCOPY_LANE_CAP)
        assert postcopy_source.lane_ahead(caps, tls) == caps and not started  # TLS: a thread serves it
        assert postcopy_source.lane_ahead((POSTCOPY_CAP,), plain) == (POSTCOPY_CAP,) and not started
        assert postcopy_source.lane_ahead(None, plain) is None and not started
        postcopy_source.lane_ahead(caps, plain)
        assert started == ([1] if postcopy_source.process_lane_ok(plain) else [])
    finally:
        a.close()
        b.close()


def test_a_fault_read_that_did_not_fill_its_buffer_says_it_left_none() -> None:
    from precopy.memory.uffd_missing import FAULT_MSG_SIZE, read_fault_batch

    from .test_postcopy_lane import _fault

    r, w = os.pipe()  # (a pipe of fault messages plays the userfaultfd, as in test_postcopy_lane)
    os.set_blocking(r, False)
    buf = bytearray(FAULT_MSG_SIZE * 2)
    try:
        assert read_fault_batch(r, buf) == ([], True)
        _fault(w, 3)
        assert read_fault_batch(r, buf) == ([0x10000 + 3 * PAGE_SIZE], True)
        for page in (4, 5, 6):
            _fault(w, page)
        assert read_fault_batch(r, buf) == ([0x10000 + 4 * PAGE_SIZE, 0x10000 + 5 * PAGE_SIZE], False)  # full: look again
        assert read_fault_batch(r, buf) == ([0x10000 + 6 * PAGE_SIZE], True)
    finally:
        os.close(r)
        os.close(w)


def test_the_lane_s_two_ends_share_a_cpu_only_when_both_are_on_this_host() -> None:
    cpus = {0, 1, 3}
    assert lane_cpu("auto", "127.0.0.1", "127.0.0.1", cpus) == (3, True)  # the highest: the same rule both ends
    assert lane_cpu("auto", "::1", "::1", cpus) == (3, True)
    assert lane_cpu("auto", "10.0.0.2", "10.0.0.2", cpus) == (3, True)  # its own address: this host
    assert lane_cpu("auto", "10.0.0.2", "10.0.0.1", cpus) == (None, False)  # another host: never
    assert lane_cpu("off", "127.0.0.1", "127.0.0.1", cpus) == (None, False)
    assert lane_cpu("1", "10.0.0.2", "10.0.0.1", cpus) == (1, False)  # asked for: always, at any priority
    with pytest.raises(ValueError, match="not one of this agent's CPUs"):
        lane_cpu("2", "127.0.0.1", "127.0.0.1", cpus)
    with pytest.raises(ValueError, match="use auto, off or a CPU number"):
        lane_cpu("fast", "127.0.0.1", "127.0.0.1", cpus)


@pytest.mark.parametrize("how", ["auto", "off"])
def test_a_lane_s_child_runs_where_it_was_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    allowed = os.sched_getaffinity(0)
    monkeypatch.setattr(postcopy_lane_proc, "LANE_CPU", how)
    said: dict[str, Any] = {}

    async def run() -> None:
        async with source_child(tmp_path, on_stats=said.update) as (lane, _, dst):  # (loopback: this host)
            dst.sock.close()  # the destination goes: the child ends and says where it ran
            await asyncio.wait_for(lane, 120)  # (the destination closing is a lane's normal end)

    asyncio.run(run())
    fifo = _may_fifo()
    if how == "auto" and fifo and len(allowed) > 1:
        assert said["cpus"] == [max(allowed)]
    else:
        assert said["cpus"] == sorted(allowed)


def _may_fifo() -> bool:
    """Whether this process may run SCHED_FIFO (root or CAP_SYS_NICE): the lane's children then do."""
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1] == 0

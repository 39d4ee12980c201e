"""The post-copy fault lane (precopy.session.postcopy_lane): its frames, the page claim that keeps
each page on one connection, and both ends' threads over a socket pair (the guest's userfaultfd
played by a pipe of fault messages, the placer by a recorder), and a post-copy over TLS and a key
with ``--postcopy-lane``.  A cut, stalled or killed lane: the fault matrix's ``lane`` cells
(tests/test_postcopy_matrix.py: the REQUEST travels on the lane)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import xxhash

from precopy.errors import PrecopyError, RemoteProtocolError
from precopy.memory.uffd_missing import _MSG, UFFD_EVENT_PAGEFAULT
from precopy.net.channel import Channel, LinkError
from precopy.protocol import NEED_DATA, PAGE_SIZE, Begin, Connection, Join, Joined, Pages, Request, Role
from precopy.protocol.codec import decode_event, encode_event
from precopy.protocol.messages import Kind
from precopy.protocol.phases import Phase
from precopy.session.postcopy_backlog import PushBacklog
from precopy.session.postcopy_lane import DestLane, check_request, join_lane, serve_lane_requests
from precopy.session.postcopy_stream import PageStream, StreamStats

from .conftest import Procs, start_dest, run_source, wait_for
from .test_postcopy import det_hook, det_source, reference_digest
from .tlscerts import make_pki

NPAGES = 64
BEGIN = Begin(migration_id="mig-1", name="guest", size=NPAGES * PAGE_SIZE, chunk_pages=8)


def test_a_lane_join_round_trips_and_a_plain_join_is_unchanged() -> None:
    lane = Join(migration_id="mig-1", stream=0, size=BEGIN.size, chunk_pages=8, lane=True)
    kind, meta, _ = encode_event(lane)
    assert kind == Kind.JOIN and meta["lane"] is True
    assert decode_event(kind, meta) == lane
    kind, meta, _ = encode_event(Join(migration_id="mig-1", stream=2, size=BEGIN.size, chunk_pages=8))
    assert "lane" not in meta  # the bytes tests/test_wire_bytes.py pins
    with pytest.raises(RemoteProtocolError):
        decode_event(kind, {**meta, "stream": 0})  # stream 0 only on a lane
    with pytest.raises(RemoteProtocolError):
        decode_event(kind, {**meta, "lane": True})  # a lane is stream 0
    with pytest.raises(RemoteProtocolError):
        decode_event(kind, {**meta, "lane": 1})


def test_a_lane_carries_requests_one_way_and_answers_the_other() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DEST)
    _authenticated(src, dst)
    for ev, a, b in ((Join(migration_id="mig-1", stream=0, size=BEGIN.size, chunk_pages=8, lane=True), src, dst),
                     (Joined(), dst, src), (Request(indices=np.array([3, 9], dtype=np.uint32)), dst, src)):
        for buf in a.send(ev):
            b.receive_data(bytes(buf))
        got = b.next_event()
        assert type(got) is type(ev)
    assert src.phase is Phase.STREAMING and dst.phase is Phase.STREAMING
    with pytest.raises(RemoteProtocolError):  # a REQUEST past the region (the JOIN's geometry)
        for buf in dst.send(Request(indices=np.array([NPAGES], dtype=np.uint32))):
            src.receive_data(bytes(buf))
        src.next_event()


def test_check_request() -> None:
    assert check_request(Request(indices=np.array([1, 2], dtype=np.uint32)), 4).tolist() == [1, 2]
    with pytest.raises(RemoteProtocolError, match="page 4"):
        check_request(Request(indices=np.array([4], dtype=np.uint32)), 4)
    with pytest.raises(RemoteProtocolError, match="unexpected Joined"):
        check_request(Joined(), 4)


class _Mem:
    """The paused region: page p holds the byte p + 1 (page 7 is zeros); what the push reads of a
    GuestMemory (its pages, as words, as bytes)."""

    def __init__(self) -> None:
        self.pages = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
        for p in range(NPAGES):
            if p != 7:
                self.pages[p] = p + 1
        self.words = self.pages.reshape(-1).view(np.uint64)
        self.view = memoryview(self.pages.reshape(-1))


def _stream() -> PageStream:
    return PageStream(_Mem(), np.ones(NPAGES, dtype=bool), StreamStats())  # type: ignore[arg-type]


def test_a_page_is_claimed_once_and_the_push_goes_on_after_the_answer() -> None:
    stream = _stream()
    assert stream.claim(np.array([5, 6, 7], dtype=np.uint32)).tolist() == [5, 6, 7]
    assert stream.claim(np.array([6, 8], dtype=np.uint32)).tolist() == [8]  # 6 went already
    stream.answered(np.array([5, 6, 7, 8]), 1000)
    assert stream.stats.requested == 4 and stream.stats.bytes_on_wire == 1000
    batch = stream._next()
    assert batch is not None and not batch[1]
    assert batch[0][0] == 9  # after the last page answered, not from 0
    frame = stream.frame(np.array([6, 7], dtype=np.uint32))
    assert frame.indices.tolist() == [6] and frame.zeros.tolist() == [7]
    assert frame.checksum == xxhash.xxh3_64_intdigest(bytes(frame.payload))


async def _pair() -> tuple[Channel, Channel]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    a.setblocking(False)
    b.setblocking(False)
    return Channel(a, Role.SOURCE), Channel(b, Role.DEST)


def _authenticated(*conns: Connection) -> None:
    for c in conns:
        c.phase = Phase.AUTHENTICATED  # (the handshake is tested elsewhere)


def _joined(src: Channel, dst: Channel) -> None:
    """Both ends as after a lane's JOIN and JOINED."""
    _authenticated(src.conn, dst.conn)
    for ev, a, b in ((Join(migration_id="mig-1", stream=0, size=BEGIN.size, chunk_pages=8, lane=True), src, dst),
                     (Joined(), dst, src)):
        for buf in a.conn.send(ev):
            b.conn.receive_data(bytes(buf))
        assert type(b.conn.next_event()) is type(ev)


def _receive(chan: Channel, done: Callable[[list[Any]], bool]) -> list[Any]:
    """The test's own end: events read (blocking, 30 s at most a read) until ``done(events)``.

    Every event a read brought counts: a thread's two frames can come in one read (two REQUESTs
    when the faults were read apart, as on a loaded machine) -- taking one event a read then
    waited for a read that never came."""
    chan.sock.setblocking(True)
    chan.sock.settimeout(30)
    events: list[Any] = []
    while not done(events):
        if chan.recv_blocking() == 0:
            raise AssertionError(f"the thread's end closed; events so far: {events}")
        while (ev := chan.conn.next_event()) is not NEED_DATA:
            events.append(ev)
    return events


def test_the_source_thread_answers_what_the_push_has_not_sent() -> None:
    async def run() -> None:
        src, dst = await _pair()
        _joined(src, dst)
        stream = _stream()
        stream.claim(np.array([2], dtype=np.uint32))  # pushed already
        stop = threading.Event()
        src.sock.setblocking(True)
        failed: list[BaseException] = []

        def work() -> None:
            try:
                serve_lane_requests(src, stream, NPAGES, 5.0, stop)
            except BaseException as exc:  # noqa: BLE001 -- checked below
                failed.append(exc)

        worker = threading.Thread(target=work)
        worker.start()
        dst.sock.setblocking(True)
        dst.send_blocking(Request(indices=np.array([2, 3, 7], dtype=np.uint32)))
        got = [ev for ev in _receive(dst, lambda evs: any(isinstance(e, Pages) for e in evs))
               if isinstance(ev, Pages)]
        assert got[0].indices.tolist() == [3] and got[0].zeros.tolist() == [7]  # not 2: it went with the push
        assert bytes(got[0].payload) == bytes([4]) * PAGE_SIZE
        for _ in range(500):  # (counted once the send returned)
            if stream.stats.requested == 2:
                break
            await asyncio.sleep(0.01)
        assert stream.stats.requested == 2 and not stream.need[[2, 3, 7]].any()
        dst.send_blocking(Request(indices=np.array([NPAGES + 5], dtype=np.uint32)))  # past the region
        worker.join(10)
        assert not worker.is_alive()
        assert failed and isinstance(failed[0], RemoteProtocolError), failed  # it fails the lane
        src.close()
        dst.close()

    asyncio.run(run())


class _Placer:
    """PagePlacer's bookkeeping, without a guest: records what it was asked for and what it placed."""

    def __init__(self) -> None:
        self.need = np.ones(NPAGES, dtype=bool)
        self.left = NPAGES
        self.placed: list[int] = []
        self.start = 0x10000

    def faulted(self, addrs: list[int], now: float, since: float | None = None) -> list[int]:
        return [(a - self.start) // PAGE_SIZE for a in addrs if self.need[(a - self.start) // PAGE_SIZE]]

    def place(self, indices: np.ndarray, data: Any, zeros: np.ndarray) -> int:
        pages = [*np.asarray(indices).tolist(), *np.asarray(zeros).tolist()]
        fresh = [p for p in pages if self.need[p]]
        self.need[fresh] = False
        self.left -= len(fresh)
        self.placed += fresh
        return len(fresh)


class _Host:
    def __init__(self, uffd: int) -> None:
        self.placer = _Placer()
        self.backlog = PushBacklog()
        self.lock = threading.Lock()
        self.begin = BEGIN
        self._uffd = uffd
        self._seen_empty = 0.0

    def _place_held(self, frame: Any) -> None:
        self.placer.place(frame[0], frame[1], frame[2])

    def _on_fault(self) -> None:
        pass


def _fault(w: int, page: int) -> None:
    msg = bytearray(32)
    _MSG.pack_into(msg, 0, UFFD_EVENT_PAGEFAULT, 0, 0x10000 + page * PAGE_SIZE)
    os.write(w, bytes(msg))


def test_the_destination_thread_asks_on_the_lane_and_places_the_answer() -> None:
    async def run() -> None:
        src, dst = await _pair()
        _joined(src, dst)
        r, w = os.pipe()
        os.set_blocking(r, False)
        host = _Host(r)
        lane = DestLane(host)  # type: ignore[arg-type]
        stop = threading.Event()
        dst.sock.setblocking(True)
        failed: list[BaseException] = []

        def work() -> None:
            try:
                lane.work(dst, stop, 5.0)
            except BaseException as exc:  # noqa: BLE001 -- checked below
                failed.append(exc)

        worker = threading.Thread(target=work)
        worker.start()
        _fault(w, 9)
        _fault(w, 4)
        def asked_of(evs: list[Any]) -> list[int]:
            return [int(p) for e in evs if isinstance(e, Request) for p in e.indices]

        asked = asked_of(_receive(src, lambda evs: len(asked_of(evs)) >= 2))
        assert sorted(asked) == [4, 9]
        payload = bytes([5]) * PAGE_SIZE
        src.send_blocking(Pages(indices=np.array([4], dtype=np.uint32), zeros=np.array([9], dtype=np.uint32),
                                payload=payload, checksum=xxhash.xxh3_64_intdigest(payload)))
        for _ in range(500):
            if len(host.placer.placed) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(host.placer.placed) == [4, 9]
        src.sock.close()  # the source's end goes: the lane fails (the stream is then taken up again)
        worker.join(10)
        assert not worker.is_alive()
        assert failed and isinstance(failed[0], LinkError), failed
        os.close(r)
        os.close(w)
        dst.close()

    asyncio.run(run())


@pytest.mark.integration
def test_the_lane_is_authenticated_like_the_stream_over_tls_with_a_key(procs: Procs, shm: Path,
                                                                        tmp_path: Path) -> None:
    """--postcopy immediate (every page missing: the resumed guest faults on pages not sent yet) over
    mutual TLS and a shared key: the lane opens (its own handshake, both checks) and every page is
    exact."""
    pki = make_pki(tmp_path / "pki")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    expected = reference_digest(procs, shm)
    out = shm / "resumed.json"
    dest = start_dest(procs, shm, "--on-resume", det_hook(out), "--postcopy-guest-early", "--auth-key-file",
                      str(key), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                      "--tls-ca", str(pki.ca))
    src, ctl = det_source(procs, shm)
    rc, rep, log = run_source(shm, "--to", dest.addr, "--memory", str(src), "--guest-control", str(ctl),
                              "--postcopy", "immediate", "--postcopy-lane", "--on-commit", "kill",
                              "--auth-key-file", str(key),
                              "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                              "--tls-key", str(pki.client_key))
    assert rc == 0 and rep is not None, log + dest.log_text()
    pc = rep["postcopy"]
    assert pc["pages_missing"] == 2048 and pc["pages_pushed"] + pc["pages_requested"] == 2048, pc
    assert pc["duplicates"] == 0 and pc["reconnects"] == 0, log + dest.log_text()
    # The lane opens beside the push: a push of 8 MiB can end first on a busy machine (then the lane
    # is stopped while it opens, or the destination, done, refuses its JOIN) -- never a failed check.
    failed = [ln for ln in log.splitlines() if "no fault lane" in ln and "is served here for a fault lane" not in ln]
    assert not failed, log
    if "stopped before it opened" not in log and "is served here for a fault lane" not in log:
        wait_for(lambda: "post-copy fault lane from" in dest.log_text(), what="the destination to log the lane")
    wait_for(out.exists, timeout=120, what="the resumed det guest to finish")
    assert json.loads(out.read_text()) == {"steps": 20000, "digest": expected}


class _Live:
    """A PostcopyDest just after take_over answered a RESUME with READY: its session task has not run
    yet, so the new connection is not ``_chan`` yet (the ``_next_chan`` future holds it)."""

    def __init__(self) -> None:
        self.begin, self.placer = BEGIN, SimpleNamespace(left=5)
        self._chan: Any = None
        self._next_chan: asyncio.Future[Any] | None = asyncio.get_running_loop().create_future()
        self._next_chan.set_result("resumed-connection")
        self._streaming = None
        self.recv = SimpleNamespace(opts=SimpleNamespace(idle_timeout_s=5.0))
        self.lane = SimpleNamespace(stop=_nothing, child_possible=lambda chan: False, start=self._start)
        self.started: list[Any] = []

    def _start(self, chan: Any, timeout: float, fast: bool) -> asyncio.Future[None]:
        self.started.append(chan)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def take_up(self) -> None:  # what the session's task does on its turn (PostcopyDest.run)
        self._next_chan, self._chan = None, "resumed-connection"


async def _nothing() -> None:
    return None


class _LaneChan:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.peer, self.send_timeout_s = "127.0.0.1:1", 0.0

    async def send(self, ev: Any) -> None:
        self.sent.append(ev)


@pytest.mark.parametrize("turns", [1, 3])
def test_a_join_right_after_ready_waits_for_the_session_to_take_up_its_connection(turns: int) -> None:
    async def go() -> tuple[_Live, _LaneChan]:
        live, chan = _Live(), _LaneChan()

        async def session() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            live.take_up()

        task = asyncio.ensure_future(session())
        await join_lane(live, chan, Join(migration_id="mig-1", stream=0, size=BEGIN.size, chunk_pages=8, lane=True))
        await task
        return live, chan

    live, chan = asyncio.run(go())
    assert [type(ev) for ev in chan.sent] == [Joined] and live.started == [chan]


def test_a_join_is_refused_when_no_connection_is_served() -> None:
    async def go(taken_up: bool | None) -> _LaneChan:
        live, chan = _Live(), _LaneChan()
        if taken_up is None:  # between connections: no RESUME answered yet
            live._next_chan = asyncio.get_running_loop().create_future()
        with pytest.raises(PrecopyError, match="no post-copy page stream"):  # (never taken up: refused)
            await join_lane(live, chan, Join(migration_id="mig-1", stream=0, size=BEGIN.size, chunk_pages=8,
                                             lane=True))
        return chan

    for case in (False, None):
        assert asyncio.run(go(case)).sent == []

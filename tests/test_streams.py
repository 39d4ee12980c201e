"""--streams N (issue 21): one migration's pages over several TCP connections.

Loopback migrations in one event loop (source session and destination
server), byte-exact with a workload writing meanwhile; a destination that
takes fewer streams than asked; a data stream cut mid-migration rolls back
(workload running, nothing left on the destination); a JOIN that fits no
migration is refused; kernel write tracking (whose rounds do not wait for a
table between them) misses no write over three streams.  The protocol's frames themselves: tests/test_streams_protocol.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from precopy.errors import MigrationAborted
from precopy.net.channel import Channel, PeerAborted, connect
from precopy.protocol import Join, Role
from precopy.session.handshake import handshake
from precopy.session.streams import Streams
from tests.conftest import Procs
from tests.test_engine import FakeWorkload, LiveWriter, make_region, migrate, partials, serve, settled
from tests.test_tracking import _migrate_guest, _start_guest, needs_uffd
from tests.test_tracking import verification  # noqa: F401 (a fixture)


@pytest.mark.parametrize("streams", [2, 4])
async def test_a_live_migration_over_several_streams_is_byte_exact(shm: Path, streams: int) -> None:
    src = shm / "vm.mem"
    mm = make_region(src, 4096 + 77)  # 16 MiB and a bit: four stripes and a short one
    blob = os.urandom(500)
    async with serve(shm / "dest") as server:
        writer = LiveWriter(mm, pages_per_tick=16)
        snapshot: dict[str, bytes] = {}

        async def freeze() -> None:
            await writer.stop()
            snapshot["mem"] = src.read_bytes()

        wl = FakeWorkload(blob, on_pause=freeze)
        rep = await migrate(server, src, wl, streams=streams)
        assert rep.outcome == "committed" and rep.streams == streams
        assert writer.writes > 0
        assert (shm / "dest" / "vm.mem").read_bytes() == snapshot["mem"] == src.read_bytes()
        assert (shm / "dest" / "vm.mem.device-state").read_bytes() == blob
        assert rep.verify_repairs == 0
        # Every stream carried pages (each holds a stripe of the full copy).
        assert len(rep.stream_bytes) == streams and min(rep.stream_bytes) > 2 << 20
        await settled(server)
        assert [r.outcome for r in server.results] == ["committed"]
        assert not partials(shm / "dest")
    del mm


async def test_the_destination_takes_no_more_streams_than_its_limit(shm: Path) -> None:
    src = shm / "vm.mem"
    mm = make_region(src, 2048)
    async with serve(shm / "dest", max_streams=2) as server:
        rep = await migrate(server, src, FakeWorkload(), streams=4)
        assert rep.outcome == "committed" and rep.streams == 2
        assert (shm / "dest" / "vm.mem").read_bytes() == src.read_bytes()
    async with serve(shm / "dest1", max_streams=1) as server:
        rep = await migrate(server, src, FakeWorkload(), streams=3)
        assert rep.outcome == "committed" and rep.streams == 1 and rep.stream_bytes == []
        assert (shm / "dest1" / "vm.mem").read_bytes() == src.read_bytes()
    del mm


@pytest.mark.parametrize("stream_threads", ["off", "on"])
async def test_a_cut_data_stream_rolls_back_with_the_workload_running(
        shm: Path, monkeypatch: pytest.MonkeyPatch, stream_threads: str) -> None:
    """Stream 2 of 3 is cut (its socket shut down) in the middle of the full copy -- with the source's
    sending threads, its thread's write fails: the migration aborts before any commit, naming the
    stream, the workload is never left paused, the source region is untouched, the destination keeps
    no file of it, and every sending thread has stopped."""
    src = shm / "vm.mem"
    mm = make_region(src, 8192)  # 32 MiB
    before = src.read_bytes()
    sends = {"n": 0}
    real = Streams.send

    async def cutting_send(self: Streams, ev: object, send0: object) -> int:
        sends["n"] += 1
        if sends["n"] == 20:
            assert self.threaded == (stream_threads == "on")
            self.chans[1].sock.shutdown(2)  # socket.SHUT_RDWR: the link to stream 2 is cut
        return await real(self, ev, send0)  # type: ignore[arg-type]

    monkeypatch.setattr(Streams, "send", cutting_send)
    async with serve(shm / "dest") as server:
        wl = FakeWorkload()
        with pytest.raises(MigrationAborted) as info:
            await migrate(server, src, wl, streams=3, stream_threads=stream_threads)
        rep = info.value.report  # type: ignore[attr-defined]
        assert rep.outcome == "aborted" and rep.stream_threads == (stream_threads == "on")
        assert "stream 2" in rep.error
        assert "pause" not in wl.calls or wl.calls[-1] == "resume"
        await settled(server)
        assert [r.outcome for r in server.results] == ["aborted"]
        assert not partials(shm / "dest") and not (shm / "dest" / "vm.mem").exists()
    assert src.read_bytes() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("precopy-send-")]
    del mm


async def test_a_source_that_sends_a_stripe_on_the_wrong_stream_fails_before_any_commit(
        shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken source sends stripe 1 on stream 2 (two writers for one chunk on the destination): the
    destination refuses the batch, the migration rolls back and nothing is left on the destination."""
    src = shm / "vm.mem"
    mm = make_region(src, 8192)  # 32 MiB: stripes 0..7
    real = Streams.target
    monkeypatch.setattr(Streams, "target", lambda self, ev: min(real(self, ev) * 2, self.n - 1))
    async with serve(shm / "dest") as server:
        with pytest.raises(MigrationAborted) as info:
            await migrate(server, src, FakeWorkload(), streams=3)
        assert info.value.report.outcome == "aborted"  # type: ignore[attr-defined]
        await settled(server)
        assert [r.outcome for r in server.results] == ["aborted"]
        assert "stripes of 1024 pages" in server.results[0].error
        assert not partials(shm / "dest") and not (shm / "dest" / "vm.mem").exists()
    del mm


async def test_a_join_that_fits_no_migration_is_refused(shm: Path) -> None:
    async with serve(shm / "dest") as server:
        sock = await connect("127.0.0.1", server.port, 5.0)
        chan = Channel(sock, Role.SOURCE)
        try:
            await handshake(chan, None, 5.0)
            await chan.send(Join(migration_id="nobody", stream=1, size=1 << 20, chunk_pages=32))
            with pytest.raises(PeerAborted, match="no migration nobody is receiving"):
                await asyncio.wait_for(chan.recv(), 5.0)
        finally:
            chan.close()
        assert list(server.results) == []


async def test_a_source_without_streams_talks_to_this_destination_as_before(shm: Path) -> None:
    """streams=1 sends no 'streams' field and opens no other connection (the frames pinned in test_wire_bytes)."""
    src = shm / "vm.mem"
    mm = make_region(src, 512)
    async with serve(shm / "dest") as server:
        rep = await migrate(server, src, FakeWorkload(), streams=1)
        assert rep.outcome == "committed" and rep.streams == 1
        assert (shm / "dest" / "vm.mem").read_bytes() == src.read_bytes()
    del mm


@needs_uffd
@pytest.mark.parametrize("pattern", ["sweep", "random"])
def test_kernel_write_tracking_over_three_streams_misses_no_write(
        procs: Procs, shm: Path, pattern: str, verification: str) -> None:  # noqa: F811 (the fixture)
    """uffd-wp rounds send the next round's pages without waiting for a table: a page's sends must
    stay on one stream (its stripe's), and every table must follow its SYNC -- chunk tables of chunk
    bytes, by page from the first comparison, and by page from a later round."""
    mem, ctl, g = _start_guest(procs, shm, pattern=pattern, npages=12288)  # 48 MiB: 12 stripes
    time.sleep(0.2)
    rep = _migrate_guest(shm, ctl, mem, tracking="uffd-wp", streams=3)
    assert rep.outcome == "committed" and rep.tracking == "uffd-wp" and rep.streams == 3, rep.tracking_reason
    assert rep.verification == verification
    assert (shm / "dest" / "g.mem").read_bytes() == mem.read_bytes()
    assert rep.verify_repairs == 0
    assert g.poll() is None


async def test_each_stream_runs_its_own_mutual_tls_session_and_key_handshake(shm: Path, tmp_path: Path) -> None:
    from precopy.net.tls import client_context, server_context
    from tests.tlscerts import make_pki

    pki = make_pki(tmp_path / "pki")
    key = b"streams-test-key-of-32-bytes-ok!"
    src = shm / "vm.mem"
    mm = make_region(src, 3000)
    sctx = server_context(pki.server_cert, pki.server_key, pki.ca)
    async with serve(shm / "dest", tls_context=sctx, auth_key=key) as server:
        rep = await migrate(server, src, FakeWorkload(b"dev"), streams=3, auth_key=key,
                            tls_context=client_context(pki.ca, pki.client_cert, pki.client_key))
        assert rep.outcome == "committed" and rep.streams == 3 and min(rep.stream_bytes) > 0
        assert (shm / "dest" / "vm.mem").read_bytes() == src.read_bytes()
        # A client without a certificate cannot even reach the JOIN.
        with pytest.raises(MigrationAborted):
            await migrate(server, src, FakeWorkload(), streams=2, auth_key=key,
                          tls_context=client_context(pki.ca), migration_id="no-cert")
    del mm


def test_the_options_reach_the_session_from_the_command_line(shm: Path) -> None:
    from precopy_agents.source_args import build_parser, make_migration

    region = shm / "r.mem"
    region.write_bytes(bytes(8192))
    args = build_parser().parse_args(["--to", "10.0.0.2:7070", "--memory", str(region), "--pid", str(os.getpid()),
                                      "--streams", "3", "--stream-to", "10.1.0.2:7071", "--bind", "10.0.0.1",
                                      "--bind", "10.1.0.1"])
    opts, _ = make_migration(args)
    assert (opts.streams, opts.stream_to, opts.bind) == (3, [("10.1.0.2", 7071)], ["10.0.0.1", "10.1.0.1"])
    args = build_parser().parse_args(["--to", "h:1", "--memory", str(region), "--pid", str(os.getpid()),
                                      "--stream-to", "h2:1", "--stream-to", "h3:1"])
    assert make_migration(args)[0].streams == 3  # the default: one per destination address
    with pytest.raises(ValueError, match="streams must be 1..64"):
        make_migration(build_parser().parse_args(["--to", "h:1", "--memory", str(region),
                                                  "--pid", str(os.getpid()), "--streams", "0"]))


async def test_into_an_existing_region_every_stream_receives_in_place(shm: Path) -> None:
    """A repeat migration receives into the region the destination holds: each stream's runs go straight
    into it, their chunks hashed as they land (each connection its own hasher), byte-exact."""
    src = shm / "vm.mem"
    mm = make_region(src, 6144)  # 24 MiB: six stripes, two on each of three streams
    async with serve(shm / "dest") as server:
        assert (await migrate(server, src, FakeWorkload(), streams=3)).outcome == "committed"
        await settled(server)
        mm[1024:5120] = 7  # 16 MiB change: runs on every stream (stripes 1-4)
        mm.flush()
        rep = await migrate(server, src, FakeWorkload(), streams=3)
        assert rep.outcome == "committed" and rep.dest_region == "existing" and rep.streams == 3
        assert (shm / "dest" / "vm.mem").read_bytes() == src.read_bytes()
        assert rep.verify_repairs == 0
        await settled(server)
        assert server.results[-1].reused_region and server.results[-1].pages_in_place > 0
    del mm


async def test_each_extra_stream_is_received_and_written_on_a_thread_of_its_own(
        shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination receives each extra stream in a thread of its own (its reads, the region
    writes, the chunk hashing off the session's loop), the first connection in the loop; byte-exact."""
    from precopy.session.region_writer import RegionWriter

    src = shm / "vm.mem"
    mm = make_region(src, 6144)  # 24 MiB: six stripes, two on each of three streams
    writers: dict[str, set[int]] = {}
    real = RegionWriter._put

    def put(self: RegionWriter, ev: Any, z: Any) -> None:
        writers.setdefault(threading.current_thread().name, set()).add(
            int(ev.indices[0]) // 1024 if len(ev.indices) else -1)
        real(self, ev, z)

    monkeypatch.setattr(RegionWriter, "_put", put)
    async with serve(shm / "dest") as server:
        rep = await migrate(server, src, FakeWorkload(), streams=3)
        assert rep.outcome == "committed" and rep.streams == 3
        assert (shm / "dest" / "vm.mem").read_bytes() == src.read_bytes()
    loop_thread = threading.current_thread().name
    assert set(writers) == {loop_thread, "precopy-stream-1", "precopy-stream-2"}, writers
    # Each thread wrote its own stripes (stripe k on stream k % 3) and no other's.
    assert writers["precopy-stream-1"] - {-1} == {1, 4}
    assert writers["precopy-stream-2"] - {-1} == {2, 5}
    assert writers[loop_thread] - {-1} == {0, 3}
    assert not [t for t in threading.enumerate() if t.name.startswith("precopy-stream-")]  # all ended
    del mm


def test_the_summary_names_the_streams_and_what_each_carried() -> None:
    from precopy.session.report import MigrationReport, RoundReport
    from precopy_agents.summary import summary

    rnd = RoundReport(round=0, kind="full", pages_scanned=1, pages_dirty=1, pages_sent=1, zero_pages=0,
                      bytes_on_wire=4096, seconds=0.1)
    rep = MigrationReport(migration_id="m", outcome="committed", rounds=[rnd], bytes_on_wire=3 << 20,
                          streams=2, stream_bytes=[2 << 20, 1 << 20])
    line = [x for x in summary(rep).splitlines() if x.startswith("  streams")]
    assert line == ["  streams     2, carrying 2.0 MiB, 1.0 MiB"], summary(rep)
    assert not [x for x in summary(MigrationReport(migration_id="m", outcome="committed", rounds=[rnd]))
                .splitlines() if x.startswith("  streams")]

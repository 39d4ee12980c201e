"""Hostile peers on the daemon's port: slowloris, garbage, floods; busy refusals.

The daemon drops them with a logged reason and keeps serving real
migrations at the same time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from precopy.errors import AbortCode, MigrationAborted
from precopy.protocol import PROTOCOL_VERSION, Kind, encode_frame

from .conftest import Procs, create_region, guest, run_source, start_dest, wait_for
from .test_engine import (
    FakeWorkload,
    RawClient,
    check_normal_migration,
    make_region,
    migrate,
    serve,
    settled,
)


def _hello_bytes() -> bytes:
    return b"".join(bytes(memoryview(b).cast("B")) for b in encode_frame(
        Kind.HELLO, {"version": PROTOCOL_VERSION, "nonce": os.urandom(32)}))


async def _slowloris(port: int, stop: asyncio.Event, interval: float = 0.1) -> tuple[bytes, float]:
    """Trickle a HELLO one byte at a time (never finishing); returns what the
    server sent back and how long the connection lived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    hello = _hello_bytes()
    got = b""
    try:
        for i in range(len(hello) - 1):
            writer.write(hello[i:i + 1])
            try:
                await writer.drain()
            except ConnectionError:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(4096), interval)
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            got += chunk
            if stop.is_set():
                break
        # Read what remains until the server closes.
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 10)
            except (asyncio.TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            got += chunk
    finally:
        writer.close()
    return got, time.monotonic() - t0


async def test_slowloris_peers_are_dropped_while_a_real_migration_succeeds(
        work: Path, dest_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="precopy.session.destination")
    stop = asyncio.Event()
    async with serve(dest_dir, handshake_timeout_s=1.5) as server:
        lorises = [asyncio.create_task(_slowloris(server.port, stop)) for _ in range(6)]
        # Garbage and a truncated handshake at the same time.
        garbage = await RawClient.connect(server.port)
        await garbage.send_bytes(os.urandom(5000))
        truncated = await RawClient.connect(server.port)
        await truncated.send_bytes(_hello_bytes()[:30])
        await asyncio.sleep(0.2)
        # A real migration while all of them are connected.
        await check_normal_migration(server, work)
        results = await asyncio.wait_for(asyncio.gather(*lorises), 30)
        stop.set()
        for got, lived in results:
            # Each got an ABORT (timeout) before the close, within the timeout
            # plus slack, instead of being served forever.
            assert b"handshake timed out" in got, got
            assert lived < 15
        assert await garbage.recv() is not None  # ABORT (protocol)
        await garbage.close()
        await truncated.close()
        await settled(server)
        assert [r.outcome for r in server.results] == ["committed"]
    text = caplog.text
    assert text.count("handshake not completed within 1.5 s") >= 6
    assert "bad frame magic" in text


async def test_connection_flood_is_capped_and_logged(work: Path, dest_dir: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Beyond --max-connections pending handshakes, new connections are closed
    at once (no memory, no task); once the silent ones time out, migrations work."""
    caplog.set_level(logging.WARNING, logger="precopy.session.destination")
    async with serve(dest_dir, handshake_timeout_s=1.0, max_connections=3) as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        await asyncio.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(5)
        assert await asyncio.to_thread(extra.recv, 100) == b""  # closed unread, no ABORT
        extra.close()
        assert "connections are already in the handshake (--max-connections)" in caplog.text
        await asyncio.sleep(1.5)  # the silent ones time out and free their slots
        await check_normal_migration(server, work)
        for s in silent:
            s.close()


async def test_over_max_migrations_is_a_clean_busy_refusal(work: Path, dest_dir: Path) -> None:
    regions = [work / f"b{i}.mem" for i in range(2)]
    maps = [make_region(p, 256, seed=i) for i, p in enumerate(regions)]
    third = work / "b2.mem"
    mm3 = make_region(third, 16, seed=9)
    gate = asyncio.Event()
    paused = 0

    async def hold() -> None:
        nonlocal paused
        paused += 1
        await gate.wait()

    async with serve(dest_dir, max_migrations=2, max_active=2) as server:
        running = [asyncio.create_task(migrate(server, p, FakeWorkload(on_pause=hold))) for p in regions]
        deadline = time.monotonic() + 20
        while paused < 2:
            assert time.monotonic() < deadline, "the two migrations never reached their pause"
            await asyncio.sleep(0.02)
        wl = FakeWorkload()
        with pytest.raises(MigrationAborted) as info:
            await migrate(server, third, wl)
        msg = str(info.value)
        assert "busy" in msg and "--max-migrations is 2" in msg and "retry" in msg
        assert wl.calls == []  # never paused: it keeps running on the source
        assert info.value.code is AbortCode.BUSY or "busy" in msg
        gate.set()
        reps = await asyncio.gather(*running)
        assert [r.outcome for r in reps] == ["committed"] * 2
        # With a slot free again, the refused one goes through.
        assert (await migrate(server, third, FakeWorkload())).outcome == "committed"
    del maps, mm3


def test_dest_daemon_drops_slowloris_with_the_handshake_timeout_flag(procs: Procs, shm: Path) -> None:
    src = shm / "vm.mem"
    create_region(src, "4M")
    dest = start_dest(procs, shm, "--handshake-timeout", "0.5")
    host, port = dest.addr.rsplit(":", 1)
    lorises = []
    for _ in range(4):
        s = socket.create_connection((host, int(port)))
        s.sendall(_hello_bytes()[:5])
        lorises.append(s)
    g = procs.start(*guest("dirty", "--memory", str(src), "--rate", "100"))
    rc, rep, out = run_source(shm, "--to", dest.addr, "--memory", str(src), "--pid", str(g.pid))
    assert rc == 0, out
    wait_for(lambda: dest.log_text().count("handshake not completed within 0.5 s") >= 4,
             what="the daemon to drop the slow peers")
    msgs = [json.loads(line)["msg"] for line in dest.log_text().splitlines() if line.startswith("{")]
    assert sum("dropping" in m and "handshake not completed" in m for m in msgs) >= 4
    for s in lorises:
        s.close()

"""Workload adapters: SIGSTOP/SIGCONT and the guest-control client against misbehaving guests."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from precopy.errors import GuestControlError
from precopy.workload.base import process_state
from precopy.workload.control import GuestControl
from precopy.workload.signals import SignalWorkload

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _guest(path: Path, handler: Handler) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(handler, path=str(path))


async def test_signal_workload_pauses_and_resumes_a_process() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"])
    try:
        w = SignalWorkload(p.pid)
        assert await w.pause() == b""
        assert process_state(p.pid) == "T"
        await w.resume()
        for _ in range(200):  # SIGCONT lands in microseconds; poll up to ~2 s
            if process_state(p.pid) != "T":
                break
            await asyncio.sleep(0.01)
        assert process_state(p.pid) != "T"
        await w.stop()
        assert p.wait(5) == -9
        with pytest.raises(GuestControlError, match="gone|exist"):
            await w.pause()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_signal_workload_refuses_init_and_missing_pids() -> None:
    with pytest.raises(GuestControlError):
        SignalWorkload(1)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(GuestControlError, match="does not exist"):
        SignalWorkload(p.pid)


async def test_guest_control_round_trip(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 1000
    seen: list[str] = []

    async def good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            op = json.loads(line)["op"]
            seen.append(op)
            if op == "pause":
                writer.write(json.dumps({"ok": True, "device_state_len": len(blob)}).encode() + b"\n" + blob)
            else:
                writer.write(b'{"ok": true}\n')
            await writer.drain()
        writer.close()

    server = await _guest(tmp_path / "g.sock", good)
    async with server:
        gc = GuestControl(tmp_path / "g.sock", timeout_s=2)
        assert await gc.pause() == blob
        await gc.resume()
        await gc.stop()
        await gc.close()
    assert seen == ["pause", "resume", "stop"]


@pytest.mark.parametrize("reply,match", [
    (b"not json\n", "invalid JSON"),
    (b'{"ok": false, "error": "busy"}\n', "refused"),
    (b'{"ok": true, "device_state_len": -1}\n', "device state"),
    (b'{"ok": true, "device_state_len": "12"}\n', "device state"),
    (b'{"ok": true, "device_state_len": 10}\nabc', "3 of 10"),
    (b"", "closed"),
])
async def test_guest_control_misbehaving_guest(tmp_path: Path, reply: bytes, match: str) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await _guest(tmp_path / "g.sock", bad)
    async with server:
        gc = GuestControl(tmp_path / "g.sock", timeout_s=1)
        with pytest.raises(GuestControlError, match=match):
            await gc.pause()
        await gc.close()


async def test_guest_control_silent_guest_times_out(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await _guest(tmp_path / "g.sock", silent)
    async with server:
        gc = GuestControl(tmp_path / "g.sock", timeout_s=0.3)
        with pytest.raises(GuestControlError, match="did not answer"):
            # The guest sleeps 5 s: only the client's own timeout ends this first.
            await asyncio.wait_for(gc.pause(), 4)
        await gc.close()


async def test_guest_control_blob_over_the_limit_is_refused(tmp_path: Path) -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b'{"ok": true, "device_state_len": 1000001}\n')
        await writer.drain()

    server = await _guest(tmp_path / "g.sock", huge)
    async with server:
        gc = GuestControl(tmp_path / "g.sock", timeout_s=1, max_device_state=1_000_000)
        with pytest.raises(GuestControlError, match="limit"):
            await gc.pause()
        await gc.close()


async def test_guest_control_missing_socket(tmp_path: Path) -> None:
    gc = GuestControl(tmp_path / "nope.sock", timeout_s=0.5)
    with pytest.raises(GuestControlError, match="cannot connect"):
        await gc.pause()

"""A misbehaving guest on the control socket: the migration rolls back and the
guest is left running on the source, with an error that says what went wrong."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import precopy.session.source
from precopy.errors import AbortCode, GuestControlError, MigrationAborted
from precopy.workload.control import MAX_REPLY_LINE, GuestControl

from .test_engine import make_region, options, partials, serve, settled


class FakeGuest:
    """A guest-control server whose answer to ``pause`` misbehaves as told.

    It pauses itself on every ``pause`` request (whatever it answers) and
    runs again on ``resume``: the test checks it ends up running.
    """

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.paused = False
        self.log: list[tuple[int, str]] = []  # (connection number, op)
        self._conns = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn = self._conns
        try:
            while line := await reader.readline():
                op = json.loads(line)["op"]
                self.log.append((conn, op))
                if op == "pause":
                    self.paused = True
                    await self._answer_pause(writer)
                    if self.behaviour in ("close-mid-reply", "short-blob"):
                        break
                elif op == "resume":
                    self.paused = False
                    writer.write(b'{"ok": true}\n')
                else:
                    writer.write(b'{"ok": true}\n')
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer_pause(self, writer: asyncio.StreamWriter) -> None:
        b = self.behaviour
        if b == "no-reply":
            await asyncio.sleep(3600)
        elif b == "late-reply":
            await asyncio.sleep(0.6)  # after the client's timeout
            writer.write(b'{"ok": true, "device_state_len": 3}\nabc')
        elif b == "bad-json":
            writer.write(b"{'ok': True}\n")
        elif b == "not-a-dict":
            writer.write(b"[1, 2, 3]\n")
        elif b == "close-mid-reply":
            writer.write(b'{"ok": tr')
        elif b == "short-blob":
            writer.write(b'{"ok": true, "device_state_len": 100}\n' + b"x" * 10)
        elif b == "stalled-blob":
            writer.write(b'{"ok": true, "device_state_len": 100}\n' + b"x" * 10)
        elif b == "oversized-reply":
            writer.write(b'{"ok": true, "pad": "' + b"a" * (MAX_REPLY_LINE * 2))
        elif b == "oversized-blob":
            writer.write(b'{"ok": true, "device_state_len": 1099511627776}\n')
        elif b == "bad-length":
            writer.write(b'{"ok": true, "device_state_len": 1.5}\n')
        elif b == "refuse":
            self.paused = False  # it really did not pause
            writer.write(b'{"ok": false, "error": "busy"}\n')
        await writer.drain()


CASES = {
    "no-reply": "did not answer 'pause'",
    "late-reply": "did not answer 'pause'",
    "bad-json": "invalid JSON",
    "not-a-dict": "not a JSON object",
    "close-mid-reply": "in the middle of its 'pause' reply",
    "short-blob": "10 of 100 device-state bytes",
    "stalled-blob": "did not send its 100-byte device state",
    "oversized-reply": f"longer than {MAX_REPLY_LINE} bytes",
    "oversized-blob": "device state of 1099511627776 bytes",
    "bad-length": "device state of 1.5 bytes",
    "refuse": "refused 'pause'",
}


@pytest.mark.parametrize("behaviour", sorted(CASES))
async def test_misbehaving_guest_rolls_back_and_keeps_running(work: Path, dest_dir: Path,
                                                              behaviour: str) -> None:
    guest = FakeGuest(behaviour)
    sock = work / "guest.sock"
    server = await asyncio.start_unix_server(guest.handle, str(sock))
    src = work / "g.mem"
    mm = make_region(src, 64)
    try:
        async with server, serve(dest_dir) as dest:
            gc = GuestControl(sock, timeout_s=0.4)
            with pytest.raises(MigrationAborted) as info:
                await asyncio.wait_for(precopy.session.source.migrate(options(dest, src), gc), 30)
            await gc.close()
            await settled(dest)
            assert [r.outcome for r in dest.results] == ["aborted"]
    finally:
        server.close()
    err = str(info.value)
    assert CASES[behaviour] in err, err
    assert info.value.code is AbortCode.GUEST
    assert not guest.paused, f"the guest was left paused: {guest.log}"
    # (``track``: tracking=auto asks first; this guest's answer carries no fd,
    # so the migration uses digests.)
    log = [(c, op) for c, op in guest.log if op != "track"]
    ops = [op for _, op in log]
    assert ops[0] == "pause"
    if behaviour != "refuse":
        # A resume on a fresh connection: never read as the late pause reply.
        assert "resume" in ops
        resume_conn = [c for c, op in log if op == "resume"][0]
        assert resume_conn != log[0][0]
        assert "asked to resume and confirmed" in err
    assert not (dest_dir / "g.mem").exists() and not partials(dest_dir)
    del mm


async def test_late_pause_reply_is_never_taken_for_the_next_answer(tmp_path: Path) -> None:
    guest = FakeGuest("late-reply")
    sock = tmp_path / "g.sock"
    server = await asyncio.start_unix_server(guest.handle, str(sock))
    async with server:
        gc = GuestControl(sock, timeout_s=0.3)
        with pytest.raises(GuestControlError, match="did not answer"):
            await gc.pause()
        # The client resumed the guest itself; a second resume is answered by
        # the guest on the current connection, not by the stale pause reply.
        await asyncio.sleep(0.5)
        await gc.resume()
        await gc.close()
    assert not guest.paused
    assert [op for _, op in guest.log] == ["pause", "resume", "resume"]

"""precopy's QMP connection (qemu.qmp inside) against a scripted QMP server: what
precopy adds -- timeouts, and errors that say what failed and what to do; COMMITTED's
timings on the wire."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from precopy.errors import GuestControlError, RemoteProtocolError
from precopy.workload.qemu import check_dest_command
from precopy.workload.qmp import MAX_LINE, QemuMonitor, QMPError
from precopy.protocol import Commit, Committed, Kind, Switchover

from .helpers import BEGIN, D, S, Pair, frame

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}

Handler = Callable[[dict[str, Any]], list[bytes]]


async def serve(path: Path, handler: Handler, greeting: bytes | None = None) -> asyncio.AbstractServer:
    """A QMP server: greets, then answers every request with handler(request).

    Requests are a stream of JSON objects, as QEMU reads them (qemu.qmp ends
    them with no newline)."""
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting if greeting is not None else json.dumps(GREETING).encode() + b"\n")
        buf, decoder = "", json.JSONDecoder()
        while data := await reader.read(65536):
            buf += data.decode()
            while buf.strip():
                try:
                    req, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break  # the rest of the object has not arrived yet
                buf = buf.lstrip()[end:]
                for out in handler(req):
                    writer.write(out)
                await writer.drain()
        writer.close()
    return await asyncio.start_unix_server(conn, str(path))


def ok(req: dict[str, Any], value: Any = None) -> bytes:
    return json.dumps({"return": {} if value is None else value, "id": req.get("id")}).encode() + b"\n"


def event(name: str) -> bytes:
    return json.dumps({"event": name, "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}).encode() + b"\n"


async def test_commands_replies_and_interleaved_events(tmp_path: Path) -> None:
    sent: list[dict[str, Any]] = []

    def handler(req: dict[str, Any]) -> list[bytes]:
        sent.append(req)
        if req["execute"] == "query-status":
            # An event before the reply must not be taken for it.
            return [event("STOP"), ok(req, {"status": "paused", "running": False})]
        return [ok(req)]

    server = await serve(tmp_path / "q.sock", handler)
    c = QemuMonitor(tmp_path / "q.sock", timeout_s=5)
    await c.connect()
    assert c.connected and c.greeting == GREETING
    assert await c.execute("query-status") == {"status": "paused", "running": False}
    await c.execute("migrate", {"uri": "exec:cat > /x"})
    assert [r["execute"] for r in sent] == ["qmp_capabilities", "query-status", "migrate"]
    assert sent[2]["arguments"] == {"uri": "exec:cat > /x"}
    assert sent[1]["id"] != sent[2]["id"]
    await c.close()
    assert not c.connected
    await c.close()  # twice is harmless
    server.close()


async def test_events_heard_inside_a_listen_block(tmp_path: Path) -> None:
    def handler(req: dict[str, Any]) -> list[bytes]:
        if req["execute"] == "migrate-incoming":  # the reply, then what the migration does
            return [ok(req), event("MIGRATION"), event("RESUME")]
        return [ok(req)]

    server = await serve(tmp_path / "q.sock", handler)
    c = QemuMonitor(tmp_path / "q.sock", timeout_s=5)
    await c.connect()
    with c.listen("MIGRATION") as events:
        await c.execute("migrate-incoming", {"uri": "exec:cat /x"})
        got = await events.next(30)
        assert got is not None and got["event"] == "MIGRATION"
        assert await events.next(0.05) is None  # RESUME is not listened to; nothing else came
    await c.close()
    with pytest.raises(QMPError, match="not connected"):
        with c.listen("MIGRATION"):
            pass
    server.close()


async def test_error_reply_names_the_command_and_qemus_reason(tmp_path: Path) -> None:
    def handler(req: dict[str, Any]) -> list[bytes]:
        if req["execute"] == "cont":
            return [json.dumps({"error": {"class": "GenericError", "desc": "migration in progress"},
                                "id": req["id"]}).encode() + b"\n"]
        return [ok(req)]

    server = await serve(tmp_path / "q.sock", handler)
    c = QemuMonitor(tmp_path / "q.sock", timeout_s=5)
    await c.connect()
    with pytest.raises(QMPError, match="refused 'cont': GenericError: migration in progress") as info:
        await c.execute("cont")
    assert isinstance(info.value, GuestControlError)
    assert await c.execute("query-status") == {}  # the connection goes on
    await c.close()
    server.close()


@pytest.mark.parametrize("reply, match", [
    (lambda req: b"not json\n", "not QMP.*a line that is not JSON: b'not json"),
    (lambda req: b"[1, 2]\n", "not QMP.*a JSON list, not an object"),
    (lambda req: json.dumps({"id": req["id"]}).encode() + b"\n", "neither 'return' nor"),
    (lambda req: b"x" * (MAX_LINE + 10) + b"\n", "a line longer than"),
    # A reply to another request is dropped (as QMP says): then nothing came.
    (lambda req: b'{"return": {}, "id": "someone-else"}\n', "sent nothing for 0.5 s .* 'query-status'"),
    (lambda req: b"", "sent nothing for 0.5 s .* 'query-status'"),  # no answer at all: the timeout
])
async def test_bad_or_missing_replies_are_qmp_errors(tmp_path: Path, reply: Callable[[Any], bytes],
                                                     match: str) -> None:
    def handler(req: dict[str, Any]) -> list[bytes]:
        return [ok(req)] if req["execute"] == "qmp_capabilities" else [reply(req)]

    server = await serve(tmp_path / "q.sock", handler)
    c = QemuMonitor(tmp_path / "q.sock", timeout_s=0.5)
    await c.connect()
    with pytest.raises(QMPError, match=match):
        await c.execute("query-status")
    await c.close()
    server.close()


async def test_peer_closing_and_wrong_greeting_and_no_socket(tmp_path: Path) -> None:
    def closing(req: dict[str, Any]) -> list[bytes]:
        raise ConnectionResetError  # the server task ends: the connection closes

    server = await serve(tmp_path / "q.sock", closing)
    with pytest.raises(QMPError, match="closed its QMP socket .* the greeting .*did QEMU exit"):
        await QemuMonitor(tmp_path / "q.sock", timeout_s=2).connect()
    server.close()

    def closing_later(req: dict[str, Any]) -> list[bytes]:
        if req["execute"] == "query-status":
            raise ConnectionResetError
        return [ok(req)]

    server = await serve(tmp_path / "l.sock", closing_later)
    c = QemuMonitor(tmp_path / "l.sock", timeout_s=2)
    await c.connect()
    with pytest.raises(QMPError, match="closed its QMP socket .* the answer to 'query-status'"):
        await c.execute("query-status")
    assert not c.connected
    with pytest.raises(QMPError, match="'cont': not connected to"):
        await c.execute("cont")
    server.close()

    server = await serve(tmp_path / "h.sock", lambda r: [ok(r)], greeting=b'{"hello": 1}\n')
    with pytest.raises(QMPError, match="not a QMP socket"):
        await QemuMonitor(tmp_path / "h.sock", timeout_s=2).connect()
    server.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never greets: as QEMU with another client connected
    server = await asyncio.start_unix_server(silent, str(tmp_path / "s.sock"))
    with pytest.raises(QMPError, match="did not greet .* within 0.3 s .*another one connected"):
        await QemuMonitor(tmp_path / "s.sock", timeout_s=0.3).connect()
    server.close()

    with pytest.raises(QMPError, match="is QEMU running with -qmp"):
        await QemuMonitor(tmp_path / "none.sock", timeout_s=2).connect(wait_s=0.05)


async def test_connect_waits_for_a_qemu_that_is_starting(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"

    async def start_late() -> asyncio.AbstractServer:
        await asyncio.sleep(0.2)
        return await serve(path, lambda r: [ok(r)])

    late = asyncio.create_task(start_late())
    c = QemuMonitor(path, timeout_s=30)
    await c.connect(wait_s=30)
    assert await c.execute("query-status") == {}
    await c.close()
    (await late).close()


def test_dest_command_must_name_memory_qmp_and_incoming_defer() -> None:
    good = "qemu-system-x86_64 -object memory-backend-file,id=ram0,size={size},mem-path={memory},share=on " \
           "-qmp unix:{qmp},server=on,wait=off -incoming defer -append 'a b'"
    assert check_dest_command(good)[-1] == "a b"
    for bad, match in [(good.replace("{memory}", "/x"), r"\{memory\}"), (good.replace("{qmp}", "/q"), r"\{qmp\}"),
                       (good.replace("-incoming defer", ""), "-incoming defer"), ("", "empty"),
                       (good + " 'unclosed", "split")]:
        with pytest.raises(ValueError, match=match):
            check_dest_command(bad)


def _commit_sent() -> Pair:
    p = Pair()
    p.start()
    p.exchange(S, Switchover())
    p.exchange(S, Commit(migration_id=BEGIN.migration_id, checksum=0))
    return p


def test_committed_carries_timings_and_stays_compatible_without() -> None:
    p = _commit_sent()
    got = p.send(D, Committed(migration_id=BEGIN.migration_id, resumed=True,
                              timings={"qemu_load": 6.5, "qemu_cont": 1}))
    assert got[0].timings == {"qemu_load": 6.5, "qemu_cont": 1.0}
    p = _commit_sent()
    p.src.receive_data(frame(Kind.COMMITTED, {"migration_id": BEGIN.migration_id, "resumed": True}))
    assert p.src.next_event().timings == {}


@pytest.mark.parametrize("timings", [
    [1, 2], {"x": "fast"}, {"x": -1.0}, {"x": float("nan")}, {"x": True}, {"": 1.0}, {"y" * 33: 1.0},
    {f"k{i}": 1.0 for i in range(17)}, {1: 1.0},
])
def test_committed_rejects_bad_timings(timings: Any) -> None:
    p = _commit_sent()
    p.src.receive_data(frame(Kind.COMMITTED, {"migration_id": BEGIN.migration_id, "resumed": True,
                                              "timings": timings}))
    with pytest.raises(RemoteProtocolError, match="COMMITTED"):
        p.src.next_event()


async def test_a_destination_qemu_that_exited_is_named_though_its_attach_gave_up_first(tmp_path: Path) -> None:
    """A migration slower than the attach's patience: by the commit the attach has failed
    (socket missing) and QEMU has long exited; the error names the exit, not the socket."""
    from precopy.workload.qemu import QemuDestination

    dest = QemuDestination("sh -c 'exit 7' qemu {memory} {qmp} -incoming defer", timeout_s=0.2)
    await dest.prepare("m1", "vm", tmp_path / "vm.ram", 1 << 20)
    vm = dest._vms["m1"]
    await vm.proc.wait()
    with pytest.raises(QMPError):
        assert vm.ready is not None
        await vm.ready  # the attach gave up: no socket
    with pytest.raises(GuestControlError, match="exited with status 7"):
        await dest.check("m1")

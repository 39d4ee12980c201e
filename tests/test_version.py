"""precopy's version on the wire (HELLO, HELLO_ACK), in the report and in the error on a protocol mismatch.

``software`` is an optional field of version 3: without it HELLO and
HELLO_ACK are exactly the frames of before; a peer of another protocol is
refused with both sides' precopy versions named.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import precopy
from precopy._version import __version__
from precopy.errors import AbortCode, MigrationAborted, RemoteProtocolError
from precopy.protocol import PROTOCOL_VERSION, Connection, Hello, HelloAck, Kind, Role, encode_frame
from precopy.protocol.codec import encode_event
from precopy.protocol.messages import Abort
from precopy.session.report import MigrationReport

from .helpers import drain, join
from .test_engine import FakeWorkload, RawClient, make_region, migrate, serve

NONCE = bytes(range(32))


def test_a_hello_without_software_is_the_frame_of_before() -> None:
    for ev, keys in ((Hello(PROTOCOL_VERSION, NONCE), ["version", "nonce"]),
                     (HelloAck(PROTOCOL_VERSION, NONCE, b""), ["version", "nonce", "mac"])):
        kind, meta, _ = encode_event(ev)
        assert list(meta) == keys, kind
    kind, meta, _ = encode_event(Hello(PROTOCOL_VERSION, NONCE, software="0.1.0"))
    assert meta == {"version": PROTOCOL_VERSION, "nonce": NONCE, "software": "0.1.0"}


def _received(kind: Kind, meta: dict[str, object], role: Role) -> list[object]:
    conn = Connection(role)
    conn.receive_data(join(encode_frame(kind, meta)))
    return drain(conn)


def test_software_is_read_and_checked() -> None:
    got = _received(Kind.HELLO, {"version": PROTOCOL_VERSION, "nonce": NONCE, "software": "0.2.0rc1"}, Role.DEST)
    assert got == [Hello(PROTOCOL_VERSION, NONCE, "0.2.0rc1")]
    assert _received(Kind.HELLO, {"version": PROTOCOL_VERSION, "nonce": NONCE}, Role.DEST) == [
        Hello(PROTOCOL_VERSION, NONCE, None)]
    for bad in (7, "", "x" * 65, "0.1\n0", b"0.1.0"):
        with pytest.raises(RemoteProtocolError, match="software"):
            _received(Kind.HELLO, {"version": PROTOCOL_VERSION, "nonce": NONCE, "software": bad}, Role.DEST)


async def test_the_destination_refuses_another_protocol_naming_both_versions(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        for software, named in (("9.9.9", "precopy 9.9.9 (protocol 99)"),
                                (None, "a precopy from before versions were announced (protocol 99)")):
            c = await RawClient.connect(server.port)
            meta = {"version": 99, "nonce": os.urandom(32)} | ({"software": software} if software else {})
            await c.send_frame(encode_frame(Kind.HELLO, meta))
            ev = await c.recv()
            await c.close()
            assert isinstance(ev, Abort) and ev.code == AbortCode.VERSION, ev
            assert ev.reason == (f"the source runs {named}; this side runs precopy {__version__} "
                                 f"(protocol {PROTOCOL_VERSION}): install the same precopy version on both hosts")


async def test_the_source_refuses_another_protocol_before_anything_moves(tmp_path: Path) -> None:
    region = tmp_path / "r"
    make_region(region, 4)

    async def old_dest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)  # the HELLO
        meta = {"version": PROTOCOL_VERSION + 1, "nonce": os.urandom(32), "mac": b"", "software": "7.0"}
        writer.write(join(encode_frame(Kind.HELLO_ACK, meta)))
        await writer.drain()
        await reader.read(4096)  # the source's ABORT, then its close
        writer.close()

    srv = await asyncio.start_server(old_dest, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    workload = FakeWorkload()
    try:
        opts = precopy.SourceOptions(host="127.0.0.1", port=port, memory=region, io_timeout_s=10,
                                     connect_timeout_s=5)
        with pytest.raises(MigrationAborted) as info:
            await asyncio.wait_for(precopy.migrate(opts, workload), 30)
    finally:
        srv.close()
        await srv.wait_closed()
    rep: MigrationReport = info.value.report  # type: ignore[attr-defined]
    assert f"the destination runs precopy 7.0 (protocol {PROTOCOL_VERSION + 1}); this side runs precopy " \
           f"{__version__} (protocol {PROTOCOL_VERSION})" in str(rep.error)
    assert "pause" not in workload.calls and rep.paused_ms is None


async def test_the_report_names_both_versions(tmp_path: Path) -> None:
    region = tmp_path / "r"
    make_region(region, 8)
    async with serve(tmp_path / "dest") as server:
        rep = await migrate(server, region, FakeWorkload())
    assert rep.outcome == "committed"
    assert rep.precopy_version == __version__ == precopy.__version__
    assert rep.dest_version == __version__
    # A report written before versions were recorded does not claim this one.
    old = {k: v for k, v in rep.to_dict().items() if k not in ("precopy_version", "dest_version")}
    again = MigrationReport.from_dict(old)
    assert again.precopy_version is None and again.dest_version is None

"""Security: key files, replayed handshakes, TLS / mutual TLS, exposure refusal."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

import precopy.protocol.auth as auth
import precopy.session.source
from precopy.session.commit import query_outcome
from precopy_agents import dest_main
from precopy_agents.common import EXIT_USAGE
from precopy.errors import AbortCode, AuthError, MigrationAborted
from precopy.net.tls import TlsConfigError, client_context, server_context
from precopy.protocol import PROTOCOL_VERSION, Auth, AuthOk, Connection, Hello, HelloAck, Role

from .conftest import Procs, create_region, guest, run_source, start_dest
from .test_engine import (
    FakeWorkload,
    RawClient,
    expect_abort_then_eof,
    make_region,
    migrate,
    options,
    serve,
    settled,
)
from .tlscerts import Pki, make_pki

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _keep_logging() -> Any:
    """The agents' main() installs its own log handler: put the test's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------
# Key files


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_key_file_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    p = tmp_path / "key"
    p.write_bytes(KEY)
    p.chmod(mode)
    with pytest.raises(AuthError) as info:
        auth.load_key(p)
    msg = str(info.value)
    assert f"{mode:04o}" in msg and f"chmod 600 {p}" in msg and "other users" in msg


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_file_is_accepted(tmp_path: Path, mode: int) -> None:
    p = tmp_path / "key"
    p.write_bytes(KEY)
    p.chmod(mode)
    assert auth.load_key(p) == KEY


def test_loose_key_file_is_a_usage_error_for_both_agents(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "key"
    p.write_bytes(KEY)
    p.chmod(0o644)
    rc = dest_main.main(["--listen", "127.0.0.1:0", "--memory-dir", str(tmp_path / "d"),
                         "--auth-key-file", str(p)])
    assert rc == EXIT_USAGE
    assert "chmod 600" in capsys.readouterr().err
    from precopy_agents import source_main

    region = tmp_path / "r"
    region.write_bytes(bytes(4096))
    rc = source_main.main(["--to", "127.0.0.1:1", "--memory", str(region), "--pid", str(os.getpid()),
                           "--auth-key-file", str(p)])
    assert rc == EXIT_USAGE
    assert "chmod 600" in capsys.readouterr().err


def test_loose_tls_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    loose = tmp_path / "server.key"
    loose.write_bytes(pki.server_key.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        server_context(pki.server_cert, loose)


# --------------------------------------------------------------------------
# Replay protection and constant-time comparison


async def _keyed_handshake(port: int, key: bytes) -> tuple[bytes, bytes, bytes]:
    """Authenticate as a source; returns (hello bytes, auth bytes, destination nonce)."""
    c = RawClient(*await asyncio.open_connection("127.0.0.1", port))
    nonce = os.urandom(32)
    hello = b"".join(bytes(memoryview(b).cast("B")) for b in c.conn.send(Hello(PROTOCOL_VERSION, nonce)))
    await c.send_bytes(hello)
    ack = await c.recv()
    assert isinstance(ack, HelloAck)
    assert auth.verify(auth.dest_mac(key, nonce, ack.nonce), ack.mac)
    mac = auth.source_mac(key, nonce, ack.nonce)
    auth_bytes = b"".join(bytes(memoryview(b).cast("B")) for b in c.conn.send(Auth(mac=mac)))
    await c.send_bytes(auth_bytes)
    assert isinstance(await c.recv(), AuthOk)
    await c.close()
    return hello, auth_bytes, ack.nonce


async def test_replayed_handshake_transcript_is_refused(work: Path, dest_dir: Path) -> None:
    """A recorded, successful source handshake sent again byte for byte fails:
    the destination's nonce is fresh, so the recorded MAC no longer matches."""
    async with serve(dest_dir, auth_key=KEY) as server:
        hello, auth_bytes, nonce1 = await _keyed_handshake(server.port, KEY)
        c = await RawClient.connect(server.port)
        c.conn.send(Hello(PROTOCOL_VERSION, os.urandom(32)))  # our state machine only
        await c.send_bytes(hello)
        ack = await c.recv()
        assert isinstance(ack, HelloAck)
        assert ack.nonce != nonce1  # fresh per connection
        c.conn.send(Auth(mac=bytes(32)))
        await c.send_bytes(auth_bytes)  # the recorded proof, replayed
        await expect_abort_then_eof(c, AbortCode.AUTH)
        await c.close()
        # The destination's proof is bound to the source's fresh nonce too: a
        # replayed HELLO_ACK would not verify for a new source nonce.
        assert not auth.verify(auth.dest_mac(KEY, os.urandom(32), ack.nonce), ack.mac)
    assert not list(dest_dir.glob(".*.partial"))


async def test_source_refuses_a_replayed_destination_proof(work: Path, dest_dir: Path) -> None:
    """An impostor replaying a real destination's HELLO_ACK: the source's nonce
    is fresh, so the recorded MAC does not verify and nothing is paused or sent."""
    async with serve(dest_dir, auth_key=KEY) as server:
        c = await RawClient.connect(server.port)
        await c.send(Hello(PROTOCOL_VERSION, os.urandom(32)))
        recorded = await c.recv()
        assert isinstance(recorded, HelloAck)
        await c.close()
    seen: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(1 << 16))
        conn = Connection(Role.DEST)
        conn.receive_data(seen[-1])
        conn.next_event()
        writer.write(b"".join(bytes(memoryview(b).cast("B")) for b in conn.send(recorded)))
        await writer.drain()
        seen.append(await reader.read(1 << 16))  # an AUTH here would be a failure
        writer.close()

    fake = await asyncio.start_server(impostor, "127.0.0.1", 0)
    src = work / "imp.mem"
    mm = make_region(src, 16)
    async with fake:
        port = fake.sockets[0].getsockname()[1]
        wl = FakeWorkload()
        opts = precopy.session.source.SourceOptions(host="127.0.0.1", port=port, memory=src, auth_key=KEY,
                                            io_timeout_s=5)
        with pytest.raises(MigrationAborted, match="did not prove it holds our key"):
            await asyncio.wait_for(precopy.session.source.migrate(opts, wl), 20)
        assert wl.calls == []
    # The source never answered with its own proof (only an ABORT, or nothing).
    assert len(seen) == 2 and b"mac" not in seen[1]
    del mm


async def test_destination_compares_macs_in_constant_time(work: Path, dest_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    src = work / "ct.mem"
    mm = make_region(src, 32)
    async with serve(dest_dir, auth_key=KEY) as server:
        rep = await migrate(server, src, FakeWorkload(), auth_key=KEY)
    assert rep.outcome == "committed"
    assert calls.count((32, 32)) >= 2  # the source checks the dest's MAC, the dest the source's
    del mm


# --------------------------------------------------------------------------
# TLS


async def test_migration_over_mutual_tls(pki: Pki, work: Path, dest_dir: Path) -> None:
    src = work / "tls.mem"
    mm = make_region(src, 512)
    sctx = server_context(pki.server_cert, pki.server_key, pki.ca)
    cctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    async with serve(dest_dir, tls_context=sctx, auth_key=KEY) as server:
        rep = await migrate(server, src, FakeWorkload(b"device"), tls_context=cctx, auth_key=KEY,
                            compress="lz4")
        assert rep.outcome == "committed"
        assert (dest_dir / "tls.mem").read_bytes() == src.read_bytes()
        assert (dest_dir / "tls.mem.device-state").read_bytes() == b"device"
        # The outcome query reconnects over TLS as well.
        session = precopy.session.source.SourceSession(options(server, src, tls_context=cctx, auth_key=KEY,
                                                       migration_id=rep.migration_id), FakeWorkload())
        out = await query_outcome(session.committer.target)
        assert out.committed and out.known
    del mm


@pytest.mark.parametrize("client", ["no-cert", "other-ca", "plain-tcp"])
async def test_tls_destination_refuses_clients_without_a_valid_certificate(
        pki: Pki, work: Path, dest_dir: Path, client: str) -> None:
    src = work / "r.mem"
    mm = make_region(src, 64)
    sctx = server_context(pki.server_cert, pki.server_key, pki.ca)
    cctx: ssl.SSLContext | None
    if client == "no-cert":
        cctx = client_context(pki.ca)
    elif client == "other-ca":
        cctx = client_context(pki.ca, pki.rogue_cert, pki.rogue_key)
    else:
        cctx = None
    async with serve(dest_dir, tls_context=sctx, handshake_timeout_s=5) as server:
        wl = FakeWorkload()
        with pytest.raises(MigrationAborted) as info:
            await migrate(server, src, wl, tls_context=cctx)
        assert wl.calls == []  # never paused
        if client != "plain-tcp":
            assert "TLS" in str(info.value) and "certificate" in str(info.value)
        else:
            assert "this destination requires TLS" in str(info.value), info.value
        await settled(server)
        assert server.results == []  # no migration ever began
    assert not list(dest_dir.glob("*.mem")) and not list(dest_dir.glob(".*.partial"))
    del mm


async def test_source_refuses_a_destination_with_an_untrusted_certificate(
        pki: Pki, work: Path, dest_dir: Path) -> None:
    src = work / "u.mem"
    mm = make_region(src, 16)
    sctx = server_context(pki.server_cert, pki.server_key)
    async with serve(dest_dir, tls_context=sctx) as server:
        wl = FakeWorkload()
        with pytest.raises(MigrationAborted, match="certificate verify failed"):
            await migrate(server, src, wl, tls_context=client_context(pki.other_ca))
        assert wl.calls == []
    del mm


async def test_tls_source_to_a_plain_destination_says_so(pki: Pki, work: Path, dest_dir: Path) -> None:
    src = work / "p.mem"
    mm = make_region(src, 16)
    async with serve(dest_dir, handshake_timeout_s=5) as server:
        with pytest.raises(MigrationAborted, match="answered in plain precopy, without TLS") as info:
            await migrate(server, src, FakeWorkload(), tls_context=client_context(pki.ca))
        await settled(server)
        assert server.results == []
    del mm, info


def test_tls_config_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match=str(bad)):
        client_context(bad)
    with pytest.raises(TlsConfigError, match="go together"):
        client_context(pki.ca, pki.client_cert)
    with pytest.raises(TlsConfigError, match="cannot load TLS certificate"):
        server_context(pki.server_cert, pki.client_key)  # key of another certificate


def test_agents_migrate_over_mutual_tls(pki: Pki, procs: Procs, shm: Path) -> None:
    src = shm / "vm.mem"
    create_region(src, "8M")
    dest = start_dest(procs, shm, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                      "--tls-ca", str(pki.ca))
    g = procs.start(*guest("dirty", "--memory", str(src), "--rate", "200"))
    rc, rep, out = run_source(shm, "--to", dest.addr, "--memory", str(src), "--pid", str(g.pid),
                              "--tls-ca", str(pki.ca))
    assert rc == 3, out  # no client certificate: refused, guest keeps running
    assert "TLS" in rep["error"]
    rc, rep, out = run_source(shm, "--to", dest.addr, "--memory", str(src), "--pid", str(g.pid),
                              "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                              "--tls-key", str(pki.client_key))
    assert rc == 0, out
    assert (dest.memory_dir / "vm.mem").read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------
# Exposure: no key, no TLS, not loopback


@pytest.mark.parametrize("host,key,tls,insecure,refused", [
    ("127.0.0.1", False, False, False, False),
    ("::1", False, False, False, False),
    ("localhost", False, False, False, False),
    ("0.0.0.0", False, False, False, True),
    ("", False, False, False, True),
    ("10.1.2.3", False, False, False, True),
    ("example.org", False, False, False, True),
    ("0.0.0.0", True, False, False, False),
    ("0.0.0.0", False, True, False, False),
    ("0.0.0.0", False, False, True, False),
])
def test_exposure_refusal(host: str, key: bool, tls: bool, insecure: bool, refused: bool) -> None:
    why = dest_main.exposure_refusal(host, key, tls, insecure)
    assert (why is not None) == refused
    if why:
        assert "--insecure" in why and "--auth-key-file" in why and "anyone" in why


def test_dest_refuses_public_listen_without_key_or_tls(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = dest_main.main(["--listen", "0.0.0.0:0", "--memory-dir", str(tmp_path / "d")])
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and "--insecure" in err
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_dest_listens_publicly_with_insecure(procs: Procs, shm: Path) -> None:
    dest = start_dest(procs, shm, "--listen", "0.0.0.0:0", "--insecure")
    port = int(dest.addr.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert "any peer" in dest.log_text()  # the warning still says what it means

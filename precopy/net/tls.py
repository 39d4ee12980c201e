"""TLS for the migration link, with the standard :mod:`ssl` module.

The channel reads and writes a non-blocking socket with the event loop's
``sock_*`` calls; :class:`TlsChannel` keeps that shape and puts an
:class:`ssl.SSLObject` between the frames and the socket, over two memory
BIOs: encrypted bytes go out with ``sock_sendall``, come in with
``sock_recv`` and decrypt straight into the wire connection's buffer.  No
thread, no second transport; the cost is the encryption itself (AES-GCM
with AES-NI), measured in ``benchmarks/tls_cost.py``.

Contexts are built once at start from PEM files, so a bad certificate or
key is a usage error before any connection:

* :func:`server_context` (``precopy-dest``): ``--tls-cert``/``--tls-key``
  present the daemon's certificate; with ``--tls-ca`` every client must
  present a certificate signed by that CA (mutual TLS).
* :func:`client_context` (``precopy-source``): verifies the destination
  against ``--tls-ca`` (or the system CAs) including its host name or IP;
  ``--tls-cert``/``--tls-key`` present a client certificate.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from precopy.protocol.auth import check_private_file
from precopy.net.channel import Channel, LinkError
from precopy.errors import AbortCode, AuthError, PrecopyError
from precopy.protocol import Kind, Role, encode_frame
from precopy.protocol.limits import MAGIC

__all__ = ["server_context", "client_context", "TlsChannel", "make_channel"]

#: Encrypt and send in pieces of this size, so the first records are on the
#: wire while the rest of a 1 MiB batch is still being encrypted.
SEND_PIECE = 1024 * 1024
RECV_SIZE = 1024 * 1024


class TlsConfigError(PrecopyError):
    """A certificate, key or CA file cannot be used."""

    code = AbortCode.AUTH


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    check_private_file(Path(key), "TLS key file")
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load TLS certificate {cert} with key {key}: {exc} (both PEM; the key must "
            "match the certificate)"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load TLS CA file {ca}: {exc} (expected PEM certificates)") from exc


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """The destination's context; with ``ca``, clients must present a certificate it signed.

    Raises :class:`TlsConfigError` when a file cannot be used.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: Path | None = None, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:
    """The source's context: verifies the destination's certificate and name.

    Without ``ca`` the system's trusted CAs are used.  ``cert``/``key``
    present a client certificate (needed when the destination has a CA).
    Raises :class:`TlsConfigError` when a file cannot be used.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        _load_ca(ctx, ca)
    else:
        ctx.load_default_certs()
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise TlsConfigError("--tls-cert and --tls-key go together")
        _load_chain(ctx, cert, key)
    return ctx


class TlsChannel(Channel):
    """A :class:`Channel` whose bytes pass through TLS (memory BIOs, no thread)."""

    def __init__(self, sock: socket.socket, role: Role, context: ssl.SSLContext,
                 server_hostname: str | None = None) -> None:
        super().__init__(sock, role)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=role is Role.DEST,
                                    server_hostname=server_hostname)
        self._first = b""  # the peer's first bytes, to recognise a plain precopy peer

    async def start(self) -> None:
        """Run the TLS handshake.  Raises :class:`AuthError` (refused) or :class:`LinkError`."""
        if self.conn.role is Role.DEST:
            await self._refuse_plain_peer()
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise LinkError(f"{self.peer} closed the connection during the TLS handshake") from None
            except ssl.SSLError as exc:
                await self._flush_quietly()  # carry our alert to the peer
                raise self._refused(exc) from exc
        await self._flush()

    async def _refuse_plain_peer(self) -> None:
        """A source without TLS opens with a plain precopy frame: answer it in
        plain text, so it learns why, instead of a TLS alert it cannot read."""
        head = b""
        while len(head) < len(MAGIC):
            data = await self.loop.sock_recv(self.sock, RECV_SIZE)
            if not data:
                self._in.write(head)
                self._in.write_eof()
                return
            head += data
        if head.startswith(MAGIC):
            reason = ("this destination requires TLS: give precopy-source --tls-ca (and --tls-cert/"
                      "--tls-key if it requires client certificates)")
            frame = encode_frame(Kind.ABORT, {"code": int(AbortCode.AUTH), "reason": reason})
            try:
                for b in frame:
                    await self.loop.sock_sendall(self.sock, b)
            except OSError:
                pass  # the refusal below is logged either way
            self.closed = True
            self.sock.close()
            raise AuthError(f"{self.peer} spoke plain precopy to this TLS destination: refused")
        self._in.write(head)

    def _refused(self, exc: ssl.SSLError) -> AuthError:
        if self._first.startswith(MAGIC):
            return AuthError(
                f"TLS with {self.peer} failed: the peer answered in plain precopy, without TLS (give "
                "precopy-dest --tls-cert/--tls-key, or drop the TLS options here)"
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            what = f"certificate verify failed: {exc.verify_message}"
        elif "ALERT" in str(exc.reason):
            what = f"the peer refused the connection ({exc.reason}; a missing or untrusted certificate?)"
        else:
            what = str(exc.reason or exc)
        return AuthError(
            f"TLS with {self.peer} failed: {what} (check --tls-cert/--tls-key/--tls-ca on both sides; "
            "the peer's certificate must be signed by the CA given here)"
        )

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except OSError:
            pass  # the alert is a courtesy; the error that follows says what failed

    async def _fill(self) -> bool:
        """Read encrypted bytes into the TLS object; False at end of stream."""
        data = await self.loop.sock_recv(self.sock, RECV_SIZE)
        if not data:
            self._in.write_eof()
            return False
        if len(self._first) < len(MAGIC):
            self._first += data[:len(MAGIC)]
        self._in.write(data)
        return True

    def _send_now(self, views: list[memoryview]) -> list[memoryview]:
        return views  # every byte is encrypted first: _write_all

    def _recv_now(self, buf: memoryview) -> int | None:
        return None  # records are decrypted by _read_into

    async def _write_all(self, views: list[memoryview]) -> None:
        for v in views:
            await self._write(v)

    async def _write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        try:
            for pos in range(0, len(view), SEND_PIECE):
                self.tls.write(view[pos:pos + SEND_PIECE])
                await self._flush()
        except ssl.SSLError as exc:
            raise LinkError(f"TLS connection to {self.peer} failed while sending: {exc}") from exc

    async def _read_into(self, buf: memoryview) -> int:
        # One TLS record (<= 16 KiB) per SSLObject.read: take every record
        # already here in one call, so the frame parser runs per buffer, not
        # per record.  Only wait on the socket when nothing is decrypted yet.
        got = 0
        while got < len(buf):
            n = self._decrypt(buf[got:])
            if n is None:
                if got:
                    return got
                await self._flush()  # e.g. TLS 1.3 session tickets
                if not await self._fill():
                    return 0
                continue
            if n == 0:
                return got
            got += n
        return got

    def _decrypt(self, view: memoryview) -> int | None:
        """Decrypt what is here into ``view``: the bytes it took, 0 at the end of the
        stream, None when a record is still to come from the socket."""
        try:
            # With a buffer, read() returns a count (typeshed says bytes).
            n: int = self.tls.read(len(view), view)  # type: ignore[assignment]
            return n
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # close_notify, or a close without it (a cut link, as for
            # plain TCP): the end of the stream after what we have.
            return 0
        except ssl.SSLError as exc:
            # TLS 1.3: a server that refuses our certificate says so in
            # an alert we only read after our side of the handshake.
            raise self._refused(exc) from exc


    def _recv_blocking(self, buf: memoryview, owed: bool) -> int:
        """:meth:`Channel.recv_blocking` through TLS: decrypt what is here, wait on the socket
        (blocking) only when nothing is; with ``owed``, until ``buf`` is full."""
        got = 0
        while got < len(buf):
            n = self._decrypt(buf[got:])
            if n is None:
                if got and not owed:
                    return got
                data = self._out.read()  # e.g. TLS 1.3 session tickets
                if data:
                    self.sock.sendall(data)
                try:
                    data = self.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    if got:
                        return got  # something came within the timeout
                    raise
                if not data:
                    self._in.write_eof()
                else:
                    self._in.write(data)
                continue
            if n == 0:
                return got
            got += n
        return got


    def _send_blocking(self, views: list[memoryview]) -> None:
        """:meth:`Channel.send_blocking` through TLS: encrypt, then write it all (blocking)."""
        try:
            for view in views:
                for pos in range(0, len(view), SEND_PIECE):
                    self.tls.write(view[pos:pos + SEND_PIECE])
                    self.sock.sendall(self._out.read())
        except ssl.SSLError as exc:
            raise LinkError(f"TLS connection to {self.peer} failed while sending: {exc}") from exc

    def pending(self) -> int:
        """Decrypted bytes waiting in the TLS object (a reader must take them before it polls)."""
        return self.tls.pending()


def make_channel(sock: socket.socket, role: Role, context: ssl.SSLContext | None,
                 server_hostname: str | None = None) -> Channel:
    """A plain :class:`Channel`, or a :class:`TlsChannel` when ``context`` is given."""
    if context is None:
        return Channel(sock, role)
    return TlsChannel(sock, role, context, server_hostname)

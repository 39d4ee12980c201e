"""The source's side of the handshake: HELLO, the destination's proof of the key, AUTH.

Used by the migration's own connection and by every outcome query
(:mod:`precopy.session.commit`), which is why it needs no session.
"""

from __future__ import annotations

import asyncio
import time

from precopy.errors import AbortCode, AuthError, PrecopyError
from precopy.net.channel import Channel, LinkError
from precopy.protocol import PROTOCOL_VERSION, Auth, AuthOk, Hello, HelloAck, auth

__all__ = ["handshake"]


async def handshake(chan: Channel, key: bytes | None, io_timeout_s: float) -> float:
    """Start ``chan`` (TLS, when configured) and authenticate; returns the round trip (s).

    Raises :class:`LinkError` (code TIMEOUT) when the peer does not finish
    within ``io_timeout_s`` a step, :class:`AuthError` on a key mismatch
    and :class:`PrecopyError` (code VERSION) on another protocol version.
    """
    try:
        return await _authenticate(chan, key, io_timeout_s)
    except asyncio.TimeoutError:
        raise LinkError(
            f"{chan.peer} did not complete the handshake within {io_timeout_s:.0f} s "
            "(is it a precopy-dest?)", AbortCode.TIMEOUT,
        ) from None


async def _authenticate(chan: Channel, key: bytes | None, io_timeout_s: float) -> float:
    await asyncio.wait_for(chan.start(), io_timeout_s)  # TLS, when configured
    nonce = auth.new_nonce()
    t = time.monotonic()
    await chan.send(Hello(version=PROTOCOL_VERSION, nonce=nonce))
    ack: HelloAck = await asyncio.wait_for(chan.recv(HelloAck), io_timeout_s)
    rtt = max(time.monotonic() - t, 1e-4)
    if ack.version != PROTOCOL_VERSION:
        raise PrecopyError(
            f"destination speaks protocol {ack.version}, we speak {PROTOCOL_VERSION}: "
            "upgrade one side", AbortCode.VERSION,
        )
    if key is not None:
        if not ack.mac or not auth.verify(auth.dest_mac(key, nonce, ack.nonce), ack.mac):
            raise AuthError("the destination did not prove it holds our key (wrong --auth-key-file?)")
        mac = auth.source_mac(key, nonce, ack.nonce)
    else:
        if ack.mac:
            raise AuthError("the destination requires authentication: pass --auth-key-file")
        mac = b""
    t = time.monotonic()
    await chan.send(Auth(mac=mac))
    await asyncio.wait_for(chan.recv(AuthOk), io_timeout_s)
    # The first exchange also pays for the destination accepting us; the
    # round trip in every downtime estimate is the faster of the two.
    return max(min(rtt, time.monotonic() - t), 1e-4)

"""The source's side of the handshake: HELLO, the destination's proof of the key, AUTH.

Used by the migration's own connection and by every outcome query
(:mod:`precopy.session.commit`), which is why it needs no session.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

from precopy._version import __version__
from precopy.errors import AbortCode, AuthError, PrecopyError
from precopy.net.channel import Channel, LinkError
from precopy.protocol import PROTOCOL_VERSION, Auth, AuthOk, Hello, HelloAck, auth

__all__ = ["Greeting", "handshake", "version_mismatch"]


class Greeting(NamedTuple):
    """What the handshake learned of the destination."""

    rtt_s: float  #: the round trip (s)
    dest_version: str | None  #: its precopy version (None: it did not say)
    #: The capabilities it serves of those offered (HELLO_ACK ``caps``; () if none or not said).
    caps: tuple[str, ...] = ()


def version_mismatch(peer: str, peer_protocol: int, peer_software: str | None) -> str:
    """The error for a peer of another protocol version: both sides' versions and what to do."""
    theirs = f"precopy {peer_software}" if peer_software else "a precopy from before versions were announced"
    return (f"the {peer} runs {theirs} (protocol {peer_protocol}); this side runs precopy {__version__} "
            f"(protocol {PROTOCOL_VERSION}): install the same precopy version on both hosts")


async def handshake(chan: Channel, key: bytes | None, io_timeout_s: float,
                    caps: tuple[str, ...] | None = None) -> Greeting:
    """Start ``chan`` (TLS, when configured) and authenticate; the round trip and the destination's version.

    Raises :class:`LinkError` (code TIMEOUT) when the peer does not finish
    within ``io_timeout_s`` a step, :class:`AuthError` on a key mismatch
    and :class:`PrecopyError` (code VERSION) on another protocol version.
    ``caps``: capabilities to offer in HELLO (None: none, the HELLO as before).
    """
    try:
        return await _authenticate(chan, key, io_timeout_s, caps)
    except asyncio.TimeoutError:
        raise LinkError(
            f"{chan.peer} did not complete the handshake within {io_timeout_s:.0f} s "
            "(is it a precopy-dest?)", AbortCode.TIMEOUT,
        ) from None


async def _authenticate(chan: Channel, key: bytes | None, io_timeout_s: float,
                        caps: tuple[str, ...] | None) -> Greeting:
    await asyncio.wait_for(chan.start(), io_timeout_s)  # TLS, when configured
    nonce = auth.new_nonce()
    t = time.monotonic()
    await chan.send(Hello(version=PROTOCOL_VERSION, nonce=nonce, software=__version__, caps=caps))
    ack: HelloAck = await asyncio.wait_for(chan.recv(HelloAck), io_timeout_s)
    rtt = max(time.monotonic() - t, 1e-4)
    if ack.version != PROTOCOL_VERSION:
        raise PrecopyError(version_mismatch("destination", ack.version, ack.software), AbortCode.VERSION)
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
    served = tuple(c for c in (ack.caps or ()) if caps and c in caps)
    return Greeting(max(min(rtt, time.monotonic() - t), 1e-4), ack.software, served)

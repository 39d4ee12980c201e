"""A peer that stops reading (a black hole, a zero window) cannot hang a sender."""

from __future__ import annotations

import socket
import time

import pytest

from precopy.net.channel import Channel, LinkError
from precopy.errors import AbortCode
from precopy.protocol import Role

from .helpers import Pair, raw_pages


async def test_send_to_a_peer_that_stops_reading_times_out() -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()  # b never reads
    lsock.close()
    a.setblocking(False)
    try:
        chan = Channel(a, Role.SOURCE)
        pair = Pair()
        pair.start()  # an in-memory source endpoint in the copying phase
        chan.conn = pair.src
        chan.send_timeout_s = 0.5
        batch = raw_pages(list(range(1024)))  # 4 MiB per frame
        t = time.monotonic()
        with pytest.raises(LinkError) as ei:
            for _ in range(64):  # far more than any socket buffer holds
                await chan.send(batch)
        assert ei.value.code is AbortCode.TIMEOUT
        assert "did not take a frame within" in str(ei.value)
        assert time.monotonic() - t < 30  # bounded (loose: a loaded machine)
        assert chan.closed  # a half-sent frame makes the connection unusable
    finally:
        a.close()
        b.close()




async def test_connect_waits_for_a_destination_that_is_starting() -> None:
    """retry_refused: a refused connection is tried again until the timeout; without it, it fails at once."""
    import asyncio

    from precopy.net.channel import connect

    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connecting is refused
    with pytest.raises(LinkError, match="cannot connect"):
        await connect("127.0.0.1", port, 30.0)  # no retry: refused is final
    listening: list[socket.socket] = []

    async def start_listening() -> None:
        await asyncio.sleep(0.5)
        listening.append(socket.create_server(("127.0.0.1", port)))

    starter = asyncio.create_task(start_listening())
    sock = await connect("127.0.0.1", port, 60.0, retry_refused=True)
    await starter
    try:
        assert sock.getpeername()[1] == port and listening
    finally:
        sock.close()
        listening[0].close()
    with pytest.raises(LinkError, match="cannot connect"):
        await connect("127.0.0.1", port, 0.5, retry_refused=True)  # past the timeout it still ends

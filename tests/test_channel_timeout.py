"""A peer that stops reading (a black hole, a zero window) cannot hang a sender."""

from __future__ import annotations

import socket
import time

import pytest

from precopy.channel import Channel, LinkError
from precopy.errors import AbortCode
from precopy.wire import Role

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



"""A connection read on a thread of its own (precopy.session.stream_thread), over loopback TCP:
the idle timeout, a peer that closes, a cancellation that wakes a blocked read and hands the
socket back non-blocking; the Notifier and the WriteGate between threads and the loop."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from precopy.errors import AbortCode
from precopy.net.channel import Channel, LinkError
from precopy.protocol import Role
from precopy.session.stream_thread import Notifier, WriteGate, receive_blocking, run_blocking


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (a Channel names its peer by address)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        b = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
    a.setblocking(False)
    return a, b


def _drain(chan: Channel, idle_s: float) -> Any:
    def work(stop: threading.Event) -> list[Any]:
        return list(receive_blocking(chan, idle_s, stop))
    return work


def test_a_silent_peer_is_an_idle_timeout_and_a_closed_one_ends_the_stream() -> None:
    async def go() -> None:
        a, b = _pair()
        chan = Channel(a, Role.DEST)
        with pytest.raises(LinkError, match="no data from") as info:
            await run_blocking(chan, _drain(chan, 0.2), "test-stream")
        assert info.value.code is AbortCode.TIMEOUT
        assert a.gettimeout() == 0.0  # non-blocking again: the loop may send an ABORT on it
        b.close()
        assert await run_blocking(chan, _drain(chan, 5.0), "test-stream") == []
        chan.close()

    asyncio.run(go())


def test_cancelling_wakes_the_blocked_read_and_waits_for_the_thread() -> None:
    async def go() -> None:
        a, b = _pair()
        chan = Channel(a, Role.DEST)
        task = asyncio.ensure_future(run_blocking(chan, _drain(chan, 60.0), "test-stream"))
        await asyncio.sleep(0.2)  # the thread blocks in recv
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10.0)  # not the 60 s idle timeout
        assert not [t for t in threading.enumerate() if t.name == "test-stream"]
        assert a.gettimeout() == 0.0
        b.close()
        chan.close()

    asyncio.run(go())


def test_the_notifier_wakes_a_waiter_from_a_thread_and_times_out_without_progress() -> None:
    async def go() -> None:
        n = Notifier()
        box = {"count": 0}

        def worker() -> None:
            for _ in range(50):
                box["count"] += 1
                n.notify()

        t = threading.Thread(target=worker)
        assert n.notify() is None  # nobody waits: nothing scheduled
        t.start()
        assert await n.wait(lambda: box["count"] >= 50, 10.0)
        t.join()
        assert not await n.wait(lambda: box["count"] >= 51, 0.05)

    asyncio.run(go())


def test_the_write_gate_holds_writers_until_released_and_lets_them_go_when_closed() -> None:
    gate = WriteGate()
    entered: list[bool] = []
    gate.hold()
    t = threading.Thread(target=lambda: entered.append(gate.enter()))
    t.start()
    t.join(0.1)
    assert t.is_alive() and not entered and gate.writing == 0  # held
    gate.release()
    t.join(5.0)
    assert entered == [True] and gate.writing == 1
    gate.leave()
    gate.hold()
    t = threading.Thread(target=lambda: entered.append(gate.enter()))
    t.start()
    gate.close()
    t.join(5.0)
    assert entered == [True, False] and gate.writing == 0

"""The source's post-copy push order (precopy.session.postcopy_stream.PageStream._next): pure, no
sockets -- requested pages first, the push going on from just after them, wrapping around to what
it jumped over, every page once."""

from __future__ import annotations

import numpy as np

from precopy.session.postcopy_stream import PUSH_PAGES, PageStream, StreamStats


def stream(need: np.ndarray) -> PageStream:
    return PageStream(None, need, StreamStats())  # type: ignore[arg-type]  # _next never reads memory


def drain(s: PageStream) -> list[tuple[list[int], bool]]:
    out = []
    while (batch := s._next()) is not None:
        idx, asked = batch
        s.need[idx] = False  # as _send does
        out.append((idx.tolist(), asked))
    return out


def test_the_push_goes_on_after_a_requested_page_and_wraps_around() -> None:
    npages = 3 * PUSH_PAGES
    s = stream(np.ones(npages, dtype=bool))
    first, asked = s._next()  # type: ignore[misc]
    assert first.tolist() == list(range(PUSH_PAGES)) and not asked
    s.need[first] = False
    s._asked.append(np.array([2 * PUSH_PAGES + 5, 3], dtype=np.uint32))  # 3: sent already
    idx, asked = s._next()  # type: ignore[misc]
    assert asked and idx.tolist() == [2 * PUSH_PAGES + 5]
    s.need[idx] = False
    rest = drain(s)
    sent = [p for batch, _ in rest for p in batch]
    # From just after the requested page to the end, then what was jumped over.
    assert sent[:5] == list(range(2 * PUSH_PAGES + 6, 2 * PUSH_PAGES + 11))
    assert sorted(sent) == sorted(set(range(PUSH_PAGES, npages)) - {2 * PUSH_PAGES + 5})
    assert len(sent) == len(set(sent)) and not s.need.any() and s._next() is None


def test_the_push_skips_pages_not_wanted_and_ends() -> None:
    need = np.zeros(50_000, dtype=bool)
    need[[7, 9000, 20_000, 49_999]] = True
    s = stream(need)
    assert drain(s) == [([7, 9000, 20_000, 49_999], False)]
    s.restart(np.zeros(50_000, dtype=bool))
    assert s._next() is None


class _Requests:
    """An exchange that yields the given REQUEST/COMPLETE events (what ``_read`` expects)."""

    def __init__(self, events: list[object]) -> None:
        self.events = events

    async def expect(self, kinds: object, timeout_s: float) -> object:
        return self.events.pop(0)


def test_only_a_request_for_a_page_not_sent_yet_makes_the_push_small() -> None:
    import asyncio

    import pytest

    from precopy.errors import RemoteProtocolError
    from precopy.protocol import Complete, Request

    need = np.ones(4 * PUSH_PAGES, dtype=bool)
    need[:PUSH_PAGES] = False  # sent already (in flight)
    s = stream(need)
    done = Complete(migration_id="m", pages=0)
    asyncio.run(s._read(_Requests([Request(indices=np.array([3, 7], dtype=np.uint32)), done])))  # type: ignore[arg-type]
    assert not s._urgent() and len(s._next()[0]) == PUSH_PAGES  # type: ignore[index]
    s._asked.clear()
    asyncio.run(s._read(_Requests([Request(indices=np.array([5, 3 * PUSH_PAGES], dtype=np.uint32)), done])))  # type: ignore[arg-type]
    assert s._urgent()
    with pytest.raises(RemoteProtocolError, match="REQUEST for page"):
        asyncio.run(s._read(_Requests([Request(indices=np.array([len(need)], dtype=np.uint32))])))  # type: ignore[arg-type]


class _Stuck:
    """An exchange whose socket never drains (a stalled link): ``unsent`` bytes, for ever."""

    def __init__(self, unsent: list[int]) -> None:
        self.unsent = unsent

    def unsent_bytes(self) -> int:
        return self.unsent.pop(0) if len(self.unsent) > 1 else self.unsent[0]


def test_the_pacing_wait_gives_up_on_a_link_that_does_not_drain() -> None:
    """More than MAX_UNSENT queued and nothing leaving: TimeoutError after the io timeout (the caller
    takes the stream up again), not a wait for ever; a socket that drains ends the wait."""
    import asyncio

    import pytest

    from precopy.session.postcopy_stream import MAX_UNSENT

    async def paced(unsent: list[int], timeout_s: float) -> None:
        s = stream(np.ones(8, dtype=bool))
        reader = asyncio.ensure_future(asyncio.sleep(3600))
        try:
            await s._paced(_Stuck(unsent), reader, timeout_s)  # type: ignore[arg-type]
        finally:
            reader.cancel()

    with pytest.raises(TimeoutError, match="unsent"):
        asyncio.run(paced([4 * MAX_UNSENT], 0.05))
    asyncio.run(paced([4 * MAX_UNSENT, 3 * MAX_UNSENT, 2 * MAX_UNSENT, MAX_UNSENT], 0.05))  # drains: returns


def test_a_push_is_sent_from_the_mapping_zero_pages_as_numbers_checked_as_one_payload(tmp_path) -> None:
    """pages_from_mapping: the data pages' bytes are views of the region (runs, in order), the zero
    pages only numbers, and the checksum is that of the payload the destination receives."""
    import dataclasses

    from precopy.memory.region import GuestMemory
    from precopy.protocol import PAGE_SIZE
    from precopy.protocol.framing import page_payload
    from precopy.session.postcopy_stream import pages_from_mapping

    mem = GuestMemory.create(tmp_path / "r.mem", 64 * PAGE_SIZE)
    try:
        rng = np.random.default_rng(1)
        mem.pages[:] = rng.integers(1, 255, size=(64, PAGE_SIZE), dtype=np.uint8)
        mem.pages[[3, 10, 11, 40]] = 0  # zero pages
        mem.pages[20, 8:] = 0  # starts with data, the rest zeros: data
        mem.pages[21, :PAGE_SIZE - 1] = 0  # zeros but for its last byte: data (its first 8 bytes are zero)
        for idx in (np.arange(0, 32, dtype=np.uint32), np.array([1, 3, 4, 5, 10, 11, 20, 21, 33, 40, 63], dtype=np.uint32),
                    np.array([3, 10, 11], dtype=np.uint32), np.arange(16, 24, dtype=np.uint32)):
            ev = pages_from_mapping(mem, idx)
            zeros = [p for p in idx.tolist() if p in (3, 10, 11, 40)]
            assert ev.zeros.tolist() == zeros
            assert ev.indices.tolist() == [p for p in idx.tolist() if p not in zeros]
            bufs = ev.payload if isinstance(ev.payload, list) else [ev.payload]
            whole = b"".join(bytes(b) for b in bufs)
            assert whole == mem.pages[ev.indices.astype(np.int64)].tobytes()
            got = page_payload(dataclasses.replace(ev, payload=memoryview(whole)))  # raises on a bad checksum
            assert bytes(got) == whole
    finally:
        mem.close()


def test_the_pacing_waits_for_room_on_a_real_socket_and_a_request_ends_the_wait() -> None:
    """With a plain TCP channel the pacing waits for the socket to turn writable under the limit
    (TCP_NOTSENT_LOWAT), not a poll: it returns once the peer reads, and a request ends it at once."""
    import asyncio
    import socket

    from precopy.net.channel import Channel, tune
    from precopy.protocol import Role
    from precopy.session.postcopy_stream import MAX_UNSENT

    class _Ex:
        def __init__(self, chan: Channel) -> None:
            self.chan = chan

        def unsent_bytes(self) -> int:
            return self.chan.unsent_bytes()

    async def main() -> None:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
        lsock.close()
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        tune(a)
        chan = Channel(a, Role.SOURCE)
        try:
            a.setblocking(False)
            blob = b"x" * (4 * MAX_UNSENT)
            sent = 0
            while sent < len(blob):  # fill: the peer reads nothing yet
                try:
                    sent += a.send(blob[sent:])
                except BlockingIOError:
                    break
            assert chan.unsent_bytes() > MAX_UNSENT
            s = stream(np.ones(8, dtype=bool))
            reader = asyncio.ensure_future(asyncio.sleep(3600))
            paced = asyncio.ensure_future(s._paced(_Ex(chan), reader, 60.0))  # type: ignore[arg-type]
            await asyncio.sleep(0.2)
            assert not paced.done()  # nothing drains: it waits
            s._asked.append(np.array([1], dtype=np.uint32))
            s._stop_waiting()  # what the reader does on a REQUEST
            await asyncio.wait_for(paced, 30)
            assert s._lowat is not None  # it waited on the socket (TCP_NOTSENT_LOWAT), not a poll
            s._asked.clear()
            paced = asyncio.ensure_future(s._paced(_Ex(chan), reader, 60.0))  # type: ignore[arg-type]
            await asyncio.sleep(0.2)
            assert not paced.done()
            loop = asyncio.get_running_loop()
            b.setblocking(False)

            def drain() -> None:
                try:
                    while b.recv(1 << 20):
                        pass
                except BlockingIOError:
                    pass

            loop.add_reader(b.fileno(), drain)
            await asyncio.wait_for(paced, 30)  # the peer reads: room, the wait ends
            loop.remove_reader(b.fileno())
            reader.cancel()
        finally:
            chan.close()
            b.close()

    asyncio.run(main())

"""The destination's hub of a migration's extra streams (precopy.session.dest_streams), without sockets:
what a JOIN must match, the SYNC wait, a failed stream failing the migration."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from precopy.errors import AbortCode, PrecopyError, RemoteProtocolError
from precopy.net.channel import LinkError
from precopy.protocol import PAGE_SIZE, Begin, Join
from precopy.session.dest_streams import StreamHub, StreamRegistry

BEGIN = Begin(migration_id="m", name="r", size=64 * PAGE_SIZE, chunk_pages=8, streams=3)


def join(stream: int, **kw: int) -> Join:
    return Join(migration_id="m", stream=stream, size=kw.get("size", BEGIN.size),
                chunk_pages=kw.get("chunk_pages", BEGIN.chunk_pages))


def test_a_join_must_fit_its_migration() -> None:
    hub = StreamHub(BEGIN, 3, None, 5.0)
    hub.check_join(join(1))
    hub.check_join(join(2))
    with pytest.raises(RemoteProtocolError, match=r"took 3 streams \(1..2 may join\)"):
        hub.check_join(join(3))
    with pytest.raises(RemoteProtocolError, match="its BEGIN said 262144, 8"):
        hub.check_join(join(1, size=BEGIN.size * 2))
    with pytest.raises(RemoteProtocolError, match="its BEGIN said"):
        hub.check_join(join(1, chunk_pages=16))
    hub.joined.add(1)
    with pytest.raises(RemoteProtocolError, match="stream 1 of migration m joined already"):
        hub.check_join(join(1))
    hub.closed = True
    with pytest.raises(PrecopyError, match="is ending"):
        hub.check_join(join(2))


def test_each_stream_may_carry_only_its_own_stripes_one_a_batch() -> None:
    """Stripes of 1,024 pages (4 MiB at 8-page chunks) over 3 streams: stripe s is stream s mod 3's."""
    hub = StreamHub(Begin(migration_id="m", name="r", size=4096 * PAGE_SIZE, chunk_pages=8, streams=3), 3, None, 5.0)
    assert hub.stripe == 1024

    def pages(*p: int) -> np.ndarray:
        return np.array(p, dtype=np.uint32)

    hub.check_pages(0, pages(0, 5, 1023), pages(7))
    hub.check_pages(1, pages(1024, 2047), pages())
    hub.check_pages(2, pages(), pages(2048))
    hub.check_pages(0, pages(3072, 4095))  # stripe 3: stream 0 again
    hub.check_pages(1, pages(), pages())  # nothing named: nothing to check
    with pytest.raises(RemoteProtocolError, match=r"pages 0..0 on stream 1 .* stripes of 1024 pages"):
        hub.check_pages(1, pages(0))
    with pytest.raises(RemoteProtocolError, match=r"pages 1000..1030 on stream 0"):
        hub.check_pages(0, pages(1000), pages(1030))  # one batch across two stripes
    with pytest.raises(RemoteProtocolError, match="stream 2"):
        hub.check_pages(2, pages(3072))
    # The payload sink of a stream is asked only for its own pages: another's fail first.
    asked: list[int] = []
    sink = hub.guard(1, lambda idx: asked.append(int(idx[0])) or None)
    assert sink(pages(1024, 1025)) is None and asked == [1024]
    with pytest.raises(RemoteProtocolError):
        sink(pages(5))
    assert asked == [1024]


def test_the_registry_takes_at_most_its_limit_and_none_for_one_stream() -> None:
    async def go() -> None:
        reg = StreamRegistry(max_streams=2, idle_timeout_s=5.0)
        hub = reg.open(BEGIN)
        assert hub is not None and hub.streams == 2
        assert reg.open(Begin(migration_id="x", name="x", size=PAGE_SIZE)) is None
        assert StreamRegistry(1, 5.0).open(BEGIN) is None
        await reg.drop(hub)
        assert hub.closed

    asyncio.run(go())


def test_sync_waits_for_every_stream_and_a_failed_stream_fails_the_migration() -> None:
    async def go() -> None:
        receiver = asyncio.current_task()
        hub = StreamHub(BEGIN, 3, None, 5.0)
        waiting = asyncio.create_task(hub.synced((2, 1)))
        await asyncio.sleep(0.01)
        hub.counts[:] = [2, 0]
        hub._progress.notify()
        await asyncio.sleep(0.01)
        assert not waiting.done()  # stream 2 is behind
        hub.counts[1] = 1
        hub._progress.notify()
        await asyncio.wait_for(waiting, 1.0)
        # A failed stream: its error ends the wait and cancels the receiver's task.
        hub.receiver = asyncio.create_task(asyncio.sleep(10))
        waiting = asyncio.create_task(hub.synced((5, 5)))
        await asyncio.sleep(0.01)
        hub.fail(2, LinkError("reset by peer"))
        with pytest.raises(PrecopyError, match="stream 2 of migration m failed: reset by peer") as info:
            await waiting
        assert info.value.code is AbortCode.LINK
        await asyncio.sleep(0.01)
        assert hub.receiver.cancelled()
        assert receiver is not None

    asyncio.run(go())


def test_sync_gives_up_on_a_stream_without_progress() -> None:
    async def go() -> None:
        hub = StreamHub(BEGIN, 2, None, 0.05)
        with pytest.raises(LinkError, match=r"stream 1 of migration m sent no page for 0 s \(0 of 3 batches in\)"):
            await hub.synced((3,))

    asyncio.run(go())

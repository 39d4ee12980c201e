"""The destination's held-back pushes (precopy.session.postcopy_backlog): pure, no sockets."""

from __future__ import annotations

import numpy as np

from precopy.session.postcopy_backlog import PushBacklog


def u32(*pages: int) -> np.ndarray:
    return np.array(pages, dtype=np.uint32)


def test_frames_come_out_by_page_or_oldest_first_each_once() -> None:
    log = PushBacklog(limit=3 * 4096)
    buf = bytearray(b"a" * 4096 + b"b" * 4096)
    log.hold(u32(1, 2), memoryview(buf), u32(3))
    buf[:] = b"z" * len(buf)  # the connection's buffer is reused: the frame kept a copy
    log.hold(u32(7), b"c" * 4096, u32())
    log.hold(u32(), None, u32(9, 10))
    assert len(log) == 3 and log.bytes == 3 * 4096 and log.full()
    (frame,) = log.holding([7, 100])
    assert frame[0].tolist() == [7] and frame[1] == b"c" * 4096 and not log.full()
    assert log.holding([7]) == []  # taken out once
    got = log.holding(u32(10, 3))  # both remaining frames, in arrival order
    assert [f[0].tolist() for f in got] == [[1, 2], []] and got[0][1] == b"a" * 4096 + b"b" * 4096
    assert got[0][2].tolist() == [3] and got[1][2].tolist() == [9, 10]
    assert len(log) == 0 and log.bytes == 0 and log.oldest() is None


def test_oldest_first() -> None:
    log = PushBacklog()
    log.hold(u32(5), b"x" * 4096, u32())
    log.hold(u32(2), b"y" * 4096, u32())
    first = log.oldest()
    assert first is not None and first[0].tolist() == [5]
    assert log.holding([5]) == [] and len(log) == 1

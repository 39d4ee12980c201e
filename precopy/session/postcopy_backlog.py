"""The destination's held-back pushes: a faulted page does not wait behind pages nobody waits for.

While the resumed guest waits on a page the source has not sent yet (a
REQUEST is out), whatever the connection holds ahead of the answer are
pushes of pages nobody touched.  Placing each of them (``pwrite`` and
``UFFDIO_CONTINUE`` per run of pages: most of the destination's work when
the pages are scattered) before reading on makes the answer wait for all of
it.  :class:`PushBacklog` keeps such frames instead (their bytes copied out
of the connection's buffer, checked already), in arrival order, so that the
answer is read and placed first; the session places them as soon as no
fault waits, one frame at a time between its looks at the guest's faults,
and at once a frame holding a page the guest then faults on.

Nothing in it is placed or marked: a page held back here is still missing
(:attr:`~precopy.session.postcopy_pages.PagePlacer.need`), so a fault on it
is seen, and a daemon that dies with frames held loses nothing (they are
asked for again).  No I/O here.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["PushBacklog", "MAX_BACKLOG_BYTES"]

#: Bytes of pushed pages held back at most; beyond, frames are placed as they come.
MAX_BACKLOG_BYTES = 32 * 1024 * 1024

Frame = tuple[np.ndarray, "bytes | None", np.ndarray]


class PushBacklog:
    """Pushed frames held back, in arrival order, and which frame holds which page."""

    def __init__(self, limit: int = MAX_BACKLOG_BYTES) -> None:
        self.limit = limit
        self.bytes = 0
        self._frames: OrderedDict[int, Frame] = OrderedDict()
        self._page_frame: dict[int, int] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._frames)

    def full(self) -> bool:
        return self.bytes >= self.limit

    def hold(self, indices: np.ndarray, data: memoryview | bytes | None, zeros: np.ndarray) -> None:
        """Keep a frame (its data copied: the connection's buffer is reused)."""
        frame = (np.array(indices, dtype=np.int64), None if data is None or not len(indices) else bytes(data),
                 np.array(zeros, dtype=np.int64))
        key = self._seq
        self._seq += 1
        self._frames[key] = frame
        for p in (*frame[0].tolist(), *frame[2].tolist()):
            self._page_frame[p] = key
        self.bytes += len(frame[1]) if frame[1] is not None else 0

    def holding(self, pages: list[int] | np.ndarray) -> list[Frame]:
        """Take out the frames holding any of ``pages`` (in arrival order)."""
        keys = sorted({k for p in pages if (k := self._page_frame.get(int(p))) is not None})
        return [self._take(k) for k in keys]

    def oldest(self) -> Frame | None:
        """Take out the oldest frame (None: none held)."""
        if not self._frames:
            return None
        return self._take(next(iter(self._frames)))

    def _take(self, key: int) -> Frame:
        frame = self._frames.pop(key)
        for p in (*frame[0].tolist(), *frame[2].tolist()):
            if self._page_frame.get(p) == key:
                del self._page_frame[p]
        self.bytes -= len(frame[1]) if frame[1] is not None else 0
        return frame

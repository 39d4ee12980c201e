"""The source's extra streams, each one's writes on a thread of its own (``--stream-threads``).

:class:`SendThread` takes a stream's frames from the session's loop and
writes them, in order, on its own thread with blocking ``sendmsg`` (TLS:
encrypted there), which releases the GIL: the kernel's copy of one
stream's pages out of the region's mapping runs beside the loop's work on
the next batch and beside the other streams' copies -- on as many cores as
there are streams, where the loop alone copies every stream's bytes on
one.  The frame is encoded in the loop (the connection's phase machine and
its counts stay the loop's; an event that breaks the protocol raises
there); only its buffers cross over.

A frame whose payload is the region's own mapping (runs and gathered
pages sent straight from memory) or immutable bytes (compressed, zero
pages) is queued and the loop goes on, at most :data:`DEPTH` frames ahead
of the socket; one whose payload is a buffer the page sender reuses (the
staging buffer) is waited for (:func:`from_memory`).  What goes on the wire
is the mapping as it is when the thread writes it: as with ``sendmsg``
from the loop, a page written meanwhile differs at the next scan (or the
kernel reports it: it was re-protected before it was queued) and is sent
again.

:meth:`SendThread.after` queues a function to run on the thread once the
frames queued before it are written: the full copy's hash of each run's
chunks (``SourceChunks.hash_early``) then runs on the stream's core, from
the cache its own ``sendmsg`` just filled, as the loop's does after a
send of its own.

The thread wakes the loop only while the loop waits for it
(:class:`~precopy.session.stream_thread.Notifier`), so a frame costs the
loop an encode and a queue put.  A failed write (a cut, a reset, no room
for the socket's ``SO_SNDTIMEO``: the send timeout) is kept, the frames
behind it dropped, and raised at the stream's next send or at
:meth:`SendThread.drain` -- the fence the router runs on every stream
before each SYNC, so a failed stream is known, by its number, before a
digest request or COMMIT goes out.  :meth:`SendThread.close` shuts the
socket if a write is under way (it returns at once) and waits for the
thread: no view of the region is in use once it returns, and the region
can be unmapped.
"""

from __future__ import annotations

import logging
import mmap
import queue
import socket
import struct
import threading
import time
from typing import Any, Callable

from precopy.errors import AbortCode, PrecopyError
from precopy.net.channel import Channel, LinkError
from precopy.session.stream_thread import Notifier

__all__ = ["SendThread", "DEPTH", "from_memory"]

_log = logging.getLogger(__name__)

#: Frames a stream's loop side may be ahead of its socket (runs go in 4 MiB
#: frames: 8 MiB queued beside the socket's 4 MiB buffer).
DEPTH = 2


def from_memory(payload: Any) -> bool:
    """Whether a PAGES payload may be written later: views of a mapping (the region) or bytes.

    Anything else (a NumPy array, a ``bytearray``: the staging buffer the
    page sender fills again for its next batch) must be written before the
    send returns.
    """
    parts = payload if isinstance(payload, (list, tuple)) else (payload,)
    for p in parts:
        obj = p.obj if isinstance(p, memoryview) else p
        if not isinstance(obj, (mmap.mmap, bytes)):
            return False
    return True


class SendThread:
    """Stream ``index``'s writes on a thread of its own (see the module docstring).

    Made in the session's loop once the stream has joined; from then on
    only this object writes the channel (nothing reads it: the source's
    extra streams carry pages one way).
    """

    def __init__(self, chan: Channel, index: int) -> None:
        self.chan = chan
        self.index = index
        #: The first failed write (raised at the next send or drain), naming the stream.
        self.error: LinkError | None = None
        #: Items (frames and functions, :meth:`after`) handed to the thread (the loop counts) and done
        #: or dropped (the thread); the frames and bytes among them.
        self.queued = self.written = 0
        self.frames_queued = self.frames_written = 0
        self.queued_bytes = self.written_bytes = 0
        #: Seconds the loop waited for this stream's thread (its socket full: the link or the peer slower).
        self.blocked_s = 0.0
        self._notifier = Notifier()
        self._q: queue.SimpleQueue[tuple[list[memoryview], int, Callable[[], None] | None] | None] = \
            queue.SimpleQueue()
        timeout = chan.send_timeout_s
        #: How long the loop waits without a frame written before it calls the stream stalled: the
        #: thread's own timeout (SO_SNDTIMEO, at most twice in one frame) and a margin.
        self._stall_s = None if timeout is None else 2 * timeout + 5.0
        chan._unwatch()  # not the loop's any more
        chan.sock.settimeout(None)  # blocking; SO_SNDTIMEO bounds a write that makes no progress
        if timeout is not None:
            sec = max(timeout, 0.001)
            chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 struct.pack("ll", int(sec), int(sec % 1 * 1e6)))
        self._thread = threading.Thread(target=self._run, name=f"precopy-send-{index}", daemon=True)
        self._thread.start()

    def unsent_bytes(self) -> int:
        """Bytes queued for the thread or in the kernel's send queue, not yet acknowledged."""
        return self.queued_bytes - self.written_bytes + self.chan.unsent_bytes()

    async def send(self, ev: Any, wait: bool) -> int:
        """Queue ``ev`` (encoded here); returns its bytes.  With ``wait`` (its payload is reused
        after) return only once it is written.  Raises the stream's failure, if it had one."""
        self.check()
        views = [memoryview(b).cast("B") for b in self.chan.conn.send(ev)]
        n = sum(v.nbytes for v in views)
        self.queued += 1
        self.frames_queued += 1
        self.queued_bytes += n
        self._q.put((views, n, None))
        del views
        await self._wait(0 if wait else DEPTH)
        self.chan.bytes_sent += n
        return n

    def after(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the thread once the frames queued so far are written (not at all if the
        stream failed: the migration is failing); :meth:`drain` waits for it too."""
        self.queued += 1
        self._q.put(([], 0, fn))

    async def drain(self) -> None:
        """Wait until every queued frame is written and function run; raises the stream's failure,
        if it had one."""
        await self._wait(0, drain=True)

    async def _wait(self, keep: int, drain: bool = False) -> None:
        """Until at most ``keep`` frames (``drain``: items) are queued and not done (or the stream failed)."""
        def ready() -> bool:
            if drain:
                return self.queued == self.written or self.error is not None
            return self.frames_queued - self.frames_written <= keep or self.error is not None

        if not ready():
            t = time.monotonic()
            ok = await self._notifier.wait(ready, self._stall_s)  # type: ignore[arg-type]  # None: no bound
            self.blocked_s += time.monotonic() - t
            if not ok:
                raise LinkError(f"stream {self.index}: {self.chan.peer} took no frame for "
                                f"{self._stall_s:.0f} s (link stalled)", AbortCode.TIMEOUT)
        self.check()

    def check(self) -> None:
        """Raise the stream's failure, if it had one (a new exception each time: the one kept
        gathers no traceback, whose frames would hold views of the region)."""
        if self.error is not None:
            raise LinkError(str(self.error), self.error.code)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            views, n, fn = item
            del item
            if self.error is None:
                try:
                    if views:
                        self.chan.write_blocking(views)
                    if fn is not None:
                        fn()
                except (PrecopyError, OSError) as exc:
                    # A new error, not the one caught: that one's traceback holds the frame's views.
                    code = exc.code if isinstance(exc, PrecopyError) else AbortCode.LINK
                    self.error = LinkError(f"stream {self.index}: {exc}", code)
                except Exception as exc:  # a bug: handed to the loop (it rolls back), never lost
                    _log.exception("stream %d: its sending thread failed", self.index)
                    self.error = LinkError(f"stream {self.index}: internal error while sending: {exc!r}",
                                           AbortCode.INTERNAL)
            del views, fn  # (after a failure: dropped undone, the migration is failing)
            self.written_bytes += n
            self.frames_written += 1 if n else 0
            self.written += 1  # last: the loop reads it as "done with that item"
            self._notifier.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and wait for it; a write under way fails (its socket is shut)."""
        self._q.put(None)
        if self._thread.is_alive() and self.frames_queued != self.frames_written:
            try:
                self.chan.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more: the write has failed already
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            _log.warning("stream %d: its sending thread did not stop within %.0f s (the region stays "
                         "mapped until it does)", self.index, timeout_s)

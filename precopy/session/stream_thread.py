"""One connection's work on a thread of its own, in an event loop of its own.

With ``--streams N`` the destination receives each extra stream on its
own thread (:mod:`precopy.session.dest_streams`): the socket reads
(``recv_into`` straight into the region, or into the connection's buffer
and then ``pwrite``), TLS decryption and the chunk hashing as the bytes
land all release the GIL, so N streams use N cores for the bulk of their
work instead of taking turns in the session's one loop.  What is left to
Python per batch (a frame's header, the region writer's bookkeeping)
takes the GIL briefly.

:func:`run_in_thread` moves a :class:`~precopy.net.channel.Channel` to a
new thread with a new event loop (the same kind as the caller's: uvloop
where the daemon installed it), runs a coroutine there, and moves the
channel back when it ends, so the caller can still ABORT and close it.
Cancelling the caller cancels the coroutine in the thread and waits for
the thread to end: nothing runs on the connection (or writes into the
region) after :func:`run_in_thread` returns or raises.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable, TypeVar

from precopy.net.channel import Channel

__all__ = ["run_in_thread", "Notifier"]

_log = logging.getLogger(__name__)

T = TypeVar("T")


async def run_in_thread(chan: Channel, work: Callable[[Channel], Awaitable[T]], name: str) -> T:
    """Run ``work(chan)`` in a new thread's own event loop; returns or raises what it did.

    The channel's socket is taken off this loop first and handed back
    (``chan.loop`` restored) once the thread is done.
    """
    main = asyncio.get_running_loop()
    loop = asyncio.new_event_loop()
    done: asyncio.Future[T] = main.create_future()
    chan._unwatch()  # not read by this loop any more: the thread's loop watches it
    chan.loop = loop
    task = loop.create_task(_run(work, chan))

    def settle(result: Any, exc: BaseException | None) -> None:
        if done.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            done.cancel()
        elif exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = loop.run_until_complete(task)
        except BaseException as exc:  # handed to the caller: it raises there
            error = exc
        finally:
            try:
                chan._unwatch()
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                chan.loop = main
                try:
                    main.call_soon_threadsafe(settle, result, error)
                except RuntimeError:  # the caller's loop is closed: nobody waits
                    _log.debug("%s ended after its caller's loop", name)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        _cancel(loop, task)
        # Wait for the thread however often we are cancelled meanwhile: the
        # region it writes into must outlive it.
        while not done.done():
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                continue
            except BaseException as exc:  # what the work raised as it was cancelled: ours is the cancellation
                _log.debug("%s ended with %r as it was cancelled", name, exc)
                break
        raise
    finally:
        if done.done():
            thread.join()  # it has settled ``done``: it is returning, no wait to speak of


async def _run(work: Callable[[Channel], Awaitable[T]], chan: Channel) -> T:
    return await work(chan)


def _cancel(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
    try:
        loop.call_soon_threadsafe(task.cancel)
    except RuntimeError:  # its loop is closed: the work is over
        pass


class Notifier:
    """Wakes the session's loop from any thread, and only while it waits.

    The waiter counts itself in (:attr:`waiting`) *before* it checks what
    it waits for; a worker changes that state *before* :meth:`notify`, so
    one of the two sees the other (the GIL orders them): no wakeup is lost,
    and a batch nobody waits for costs an attribute read, not a
    ``call_soon_threadsafe``.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # the waiter's: known once it waits
        self.event = asyncio.Event()
        self.waiting = 0

    def notify(self) -> None:
        if not self.waiting or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the loop is closed: nobody waits
            pass

    async def wait(self, ready: Callable[[], bool], idle_timeout_s: float) -> bool:
        """Wait until ``ready()``; False when no :meth:`notify` came for ``idle_timeout_s``."""
        self.loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            while not ready():
                self.event.clear()
                try:
                    async with asyncio.timeout(idle_timeout_s):
                        await self.event.wait()
                except TimeoutError:
                    return ready()
            return True
        finally:
            self.waiting -= 1


class WriteGate:
    """Holds the streams' writes (from any thread) while the session's loop makes a digest table.

    A worker calls :meth:`enter` before it writes a batch (blocking while
    held: it runs on a thread of its own) and :meth:`leave` after; the loop
    :meth:`hold`-s, waits until no write is under way
    (:attr:`writing`), makes its table, and :meth:`release`-s.
    :meth:`close` lets every held worker go (:meth:`enter` then says False).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = 0
        self.writing = 0
        self.closed = False

    def enter(self) -> bool:
        """Wait while held; False once closed (write nothing more)."""
        with self._cond:
            while self._held and not self.closed:
                self._cond.wait()
            if self.closed:
                return False
            self.writing += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self.writing -= 1

    def hold(self) -> None:
        with self._cond:
            self._held += 1

    def release(self) -> None:
        with self._cond:
            self._held -= 1
            if not self._held:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

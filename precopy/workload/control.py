"""Client of a cooperative guest's control socket (Unix stream, JSON lines; DESIGN.md).

``pause`` returns the guest's device-state blob.  A guest may also offer
kernel write tracking (``{"op": "track"}``, its userfaultfd passed with
``SCM_RIGHTS``; docs/TRACKING.md) and a throttle (``{"op": "throttle",
"pct": N}``, optional for a guest); a guest that does not offer the
throttle is throttled with the SIGSTOP/SIGCONT duty cycle of
:mod:`precopy.workload.signals` on the process serving the control socket
(its ``SO_PEERCRED`` pid).  ``throttle_method`` says which: ``"sigstop"``
or ``"guest-op"`` (None before the first throttle).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Callable

from precopy.errors import GuestControlError
from precopy.memory.tracking import TrackingOffer
from precopy.protocol import MAX_DEVICE_STATE
from precopy.workload.base import check_fraction
from precopy.workload.signals import SignalWorkload, continue_process

__all__ = ["GuestControl", "MAX_REPLY_LINE"]

#: Longest reply line accepted from a guest (replies are short JSON objects).
MAX_REPLY_LINE = 1 << 16

_log = logging.getLogger(__name__)


class GuestControl:
    """Client of a guest's control socket (Unix stream, JSON lines).

    Every call has a timeout; a guest that does not answer, answers with
    bad JSON, or sends a short blob raises :class:`GuestControlError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout_s: float = 5.0,
                 max_device_state: int = MAX_DEVICE_STATE) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.max_device_state = max_device_state
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        #: The process serving the control socket (SO_PEERCRED of the last
        #: connection; 0 when it is in a pid namespace we cannot see).
        self.peer_pid: int | None = None
        #: How the guest is throttled: "guest-op" (it throttles itself),
        #: "sigstop" (it does not offer the op: a duty cycle on ``peer_pid``),
        #: None until a throttle was put on it.
        self.throttle_method: str | None = None
        self._signals: SignalWorkload | None = None  # the duty cycle's, once "sigstop"

    def describe(self) -> str:
        return f"guest-control socket {self.path}"

    async def connect(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=MAX_REPLY_LINE), self.timeout_s
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise GuestControlError(
                f"cannot connect to guest-control socket {self.path}: {exc or 'timed out'}"
            ) from exc
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        try:
            self.peer_pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except (OSError, AttributeError) as exc:  # not a Unix socket after all, or a transport without one
            _log.debug("the guest's pid is unknown (SO_PEERCRED: %s)", exc)

    async def _request(self, op: str, *, after_send: Callable[[], None] | None = None,
                       **fields: object) -> dict[str, object]:
        """Send one request (``{"op": op, **fields}``) and read its JSON reply line.

        ``after_send`` is called once the request is written (before the
        reply is awaited).  Any failure closes the connection, so a late or
        partial answer can never be read as the reply to the next request;
        the next request connects afresh.
        """
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            await asyncio.wait_for(self._writer.drain(), self.timeout_s)
            if after_send is not None:
                after_send()
            line = await asyncio.wait_for(self._reader.readline(), self.timeout_s)
        except asyncio.TimeoutError:
            await self._drop()
            raise GuestControlError(f"guest did not answer {op!r} within {self.timeout_s} s") from None
        except ValueError:  # asyncio's LimitOverrunError: no newline within the limit
            await self._drop()
            raise GuestControlError(
                f"guest answered {op!r} with a line longer than {MAX_REPLY_LINE} bytes "
                "(a reply is one short JSON object per line)"
            ) from None
        except OSError as exc:
            await self._drop()
            raise GuestControlError(f"guest-control {op!r} failed: {exc}") from exc
        if not line.endswith(b"\n"):
            await self._drop()
            if not line:
                raise GuestControlError(f"guest closed the control socket during {op!r}")
            raise GuestControlError(f"guest closed the control socket in the middle of its {op!r} reply")
        try:
            reply = json.loads(line)
        except ValueError:
            await self._drop()
            raise GuestControlError(f"guest answered {op!r} with invalid JSON: {line[:200]!r}") from None
        if not isinstance(reply, dict):
            await self._drop()
            raise GuestControlError(f"guest answered {op!r} with {reply!r}, not a JSON object"[:500])
        if reply.get("ok") is not True:
            await self._drop()
            raise GuestControlError(f"guest refused {op!r}: {reply!r}"[:500])
        return reply

    async def pause(self) -> bytes:
        """Pause the guest and read its device state.

        If the guest may have paused but its answer is unusable (timeout,
        bad JSON, short or oversized blob), it is asked to resume, on a fresh
        connection, before :class:`GuestControlError` is raised: a failed
        pause must not leave the workload stopped.  An explicit refusal
        (``"ok": false``) is not followed by a resume.

        A guest under the SIGSTOP duty cycle is stopped straight from it and
        continued (SIGCONT) only once the ``pause`` request is written, so
        its work loop barely runs between the throttle and the pause: a
        stopped guest could not answer.
        """
        signals = self._signals
        cont: Callable[[], None] | None = None
        if signals is not None and signals.throttled:
            await signals.pause()  # ends the duty cycle holding the process stopped
            pending = [signals.pid]

            def cont() -> None:  # once: after the request is written, or on any failure before
                while pending:
                    continue_process(pending.pop())

        try:
            return await self._pause(cont)
        except GuestControlError as exc:
            if cont is not None:
                cont()  # before asking it to resume: a stopped guest could not answer
            if exc.args and str(exc.args[0]).startswith("guest refused"):
                raise
            raise GuestControlError(f"{exc}; {await self._resume_after_failed_pause()}") from exc
        finally:
            if cont is not None:
                cont()  # e.g. cancelled before the request went out: never left stopped

    async def _resume_after_failed_pause(self) -> str:
        await self._drop()
        try:
            await self._request("resume")
        except GuestControlError as rexc:
            return f"asking it to resume failed too ({rexc}): check the guest"
        return "the guest was asked to resume and confirmed"

    async def _pause(self, after_send: Callable[[], None] | None = None) -> bytes:
        reply = await self._request("pause", after_send=after_send)
        n = reply.get("device_state_len", 0)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.max_device_state:
            raise GuestControlError(
                f"guest declared a device state of {n!r} bytes (limit {self.max_device_state})"
            )
        assert self._reader is not None
        try:
            return await asyncio.wait_for(self._reader.readexactly(n), self.timeout_s)
        except asyncio.IncompleteReadError as exc:
            raise GuestControlError(
                f"guest sent {len(exc.partial)} of {n} device-state bytes, then closed"
            ) from None
        except asyncio.TimeoutError:
            raise GuestControlError(
                f"guest did not send its {n}-byte device state within {self.timeout_s} s"
            ) from None
        except OSError as exc:
            raise GuestControlError(f"reading the guest's device state failed: {exc}") from exc

    async def resume(self) -> None:
        await self._end_duty_cycle()
        await self._request("resume")

    async def throttle(self, fraction: float) -> None:
        """Keep the guest stopped ``fraction`` of the time (0: end the throttle).

        The guest is asked first (``{"op": "throttle", "pct": N}``); a guest
        ends that throttle on ``resume`` and when this connection closes.
        The op is optional: a guest that refuses the first throttle is
        throttled from then on with the SIGSTOP/SIGCONT duty cycle of
        :class:`SignalWorkload` on the process serving the control socket
        (``throttle_method`` says which).  Raises :class:`GuestControlError`
        when neither works (its message starts "guest refused" when nothing
        was changed on the guest), ValueError for a fraction outside 0..0.99.
        """
        check_fraction(fraction)
        if self._signals is not None:
            await self._signals.throttle(fraction)
            return
        try:
            await self._request("throttle", pct=round(fraction * 100))
        except GuestControlError as exc:
            if self.throttle_method is not None or not fraction or not str(exc).startswith("guest refused"):
                raise
            signals = self._peer_process(exc)
            await signals.throttle(fraction)  # nothing started if this raises
            self._signals, self.throttle_method = signals, "sigstop"
            _log.info("the guest does not offer the throttle op (%s): throttling its process %d "
                      "with SIGSTOP/SIGCONT instead", exc, signals.pid)
            return
        if fraction:
            self.throttle_method = "guest-op"

    def _peer_process(self, refused: GuestControlError) -> SignalWorkload:
        """The process serving the control socket, to be throttled by signals; raises
        :class:`GuestControlError` (starting with ``refused``'s message) if it cannot be."""
        pid = self.peer_pid
        why = None
        if pid is None:
            why = "its pid is unknown (no SO_PEERCRED)"
        elif pid == 0:
            why = "its process is in a pid namespace this agent cannot see"
        elif pid == os.getpid():
            why = "the control socket is served by this agent's own process"
        if why is None:
            assert pid is not None
            try:
                return SignalWorkload(pid)
            except GuestControlError as exc:
                why = str(exc)
        raise GuestControlError(f"{refused}; and it cannot be throttled with SIGSTOP instead: {why}")

    @property
    def throttled(self) -> bool:
        """Whether the SIGSTOP duty cycle runs (a guest throttling itself is not counted)."""
        return self._signals is not None and self._signals.throttled

    def ran_since(self, t: float) -> bool | None:
        """Under the SIGSTOP duty cycle: whether the guest may have run at or after monotonic
        time ``t``.  None when that cannot be told (a guest throttling itself)."""
        if self._signals is None:
            return None
        return self._signals.ran_since(t)

    async def hold(self) -> bool:
        """Under the SIGSTOP duty cycle: stop the guest now until the next throttle, pause,
        resume or stop (see :meth:`SignalWorkload.hold`); returns True.  False, doing
        nothing, for a guest throttling itself (no way to hold it)."""
        if self._signals is None or not self._signals.throttled:
            return False
        await self._signals.hold()
        return True

    async def _end_duty_cycle(self) -> None:
        if self._signals is not None:
            await self._signals.throttle(0.0)  # ends with SIGCONT; raises nothing then

    def guardian_spec(self) -> dict[str, object]:
        """How a guardian process resumes this guest (see precopy.session.guardian).

        ``sigcont``: the guardian continues the process serving the socket
        first -- the duty cycle may have died with the agent in a stop.
        """
        return {"kind": "control", "path": str(self.path), "timeout": self.timeout_s, "sigcont": True}

    async def stop(self) -> None:
        await self._end_duty_cycle()
        await self._request("stop")

    async def _drop(self) -> None:
        """Forget the connection (the next request opens a new one)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass  # closing a broken connection: nothing left to report

    async def offer_tracking(self) -> TrackingOffer:
        """Ask the guest for its userfaultfd (``{"op": "track"}``, docs/TRACKING.md).

        Uses a connection of its own (the fd arrives as ``SCM_RIGHTS`` with
        the reply line; the guest serves one connection at a time, so an
        open one is closed first).  Raises :class:`GuestControlError` saying
        why when the guest does not offer tracking or answers wrongly.
        """
        await self.close()
        try:
            return await asyncio.to_thread(self._offer_tracking)
        finally:
            # Reconnect now, so the pause does not wait for a new connection
            # to be accepted (downtime); a failure here surfaces at the pause.
            try:
                await self.connect()
            except GuestControlError as exc:
                _log.debug("reconnecting after 'track': %s (retried at the pause)", exc)

    async def offer_postcopy(self) -> TrackingOffer:
        """Ask a guest resumed for post-copy for its userfaultfd (``{"op": "postcopy"}``, docs/TRACKING.md).

        On a connection of its own, as :meth:`offer_tracking`.  Raises
        :class:`GuestControlError` saying why.
        """
        await self.close()
        return await asyncio.to_thread(self._offer_tracking, "postcopy")

    def _offer_tracking(self, op: str = "track") -> TrackingOffer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(str(self.path))
                pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                sock.sendall(json.dumps({"op": op}).encode() + b"\n")
                line = b""
                while not line.endswith(b"\n"):
                    if len(line) > 1 << 16:
                        raise GuestControlError(f"guest answered {op!r} with a line over 64 KiB")
                    data, got, _, _ = socket.recv_fds(sock, 4096, 4, socket.MSG_CMSG_CLOEXEC)
                    fds.extend(got)
                    if not data:
                        raise GuestControlError(f"guest closed the control socket during {op!r}")
                    line += data
            except TimeoutError:
                raise GuestControlError(f"guest did not answer {op!r} within {self.timeout_s} s") from None
            except OSError as exc:
                raise GuestControlError(f"guest-control {op!r} failed: {exc}") from exc
            try:
                reply = json.loads(line)
            except ValueError:
                raise GuestControlError(f"guest answered {op!r} with invalid JSON: {line[:200]!r}") from None
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                why = reply.get("error") if isinstance(reply, dict) else None
                raise GuestControlError(f"guest does not offer {'write tracking' if op == 'track' else op}: {why or reply!r}"[:500])
            start, length = reply.get("start"), reply.get("length")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (start, length)):
                raise GuestControlError(f"guest's {op!r} reply lacks a positive start and length: {reply!r}"[:500])
            if len(fds) != 1:
                raise GuestControlError(f"guest's {op!r} reply carried {len(fds)} file descriptors, expected 1")
            assert isinstance(start, int) and isinstance(length, int)
            offer = TrackingOffer(fd=fds.pop(), pid=pid, start=start, length=length)
            return offer
        finally:
            for fd in fds:
                os.close(fd)
            sock.close()

    async def close(self) -> None:
        await self._end_duty_cycle()
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass  # the guest may already have exited (e.g. after "stop")
            self._writer = self._reader = None

"""Pause, resume and stop a workload; fetch its device state.

Two adapters:

* :class:`SignalWorkload` — any process, paused with SIGSTOP and resumed with
  SIGCONT.  It has no device state (empty blob).
* :class:`GuestControl` — a cooperative guest serving the JSON-lines
  control socket of DESIGN.md; ``pause`` returns its device-state blob.
  A guest may also offer kernel write tracking (``{"op": "track"}``, its
  userfaultfd passed with ``SCM_RIGHTS``; docs/TRACKING.md).

Either may be *throttled* (auto-converge, :mod:`precopy.policy.switchover`): the
optional ``async def throttle(fraction)`` keeps the workload stopped that
fraction of the time (0 ends the throttle; a workload without the method is
simply not throttled).  :class:`SignalWorkload` runs a SIGSTOP/SIGCONT duty
cycle in a thread; :class:`GuestControl` asks the guest
(``{"op": "throttle", "pct": N}``, optional for a guest), and for a guest
that does not offer it runs the same duty cycle on the process serving the
control socket (its ``SO_PEERCRED`` pid).  ``throttle_method`` says which:
``"sigstop"`` or ``"guest-op"`` (None before the first throttle).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Protocol

from precopy.errors import GuestControlError
from precopy.memory.tracking import TrackingOffer
from precopy.protocol import MAX_DEVICE_STATE

__all__ = ["Workload", "DestWorkload", "SignalWorkload", "GuestControl", "process_state"]

#: Longest reply line accepted from a guest (replies are short JSON objects).
MAX_REPLY_LINE = 1 << 16
#: How long a throttled process runs between stops (QEMU's CPU throttle
#: timeslice): at a fraction f it is then stopped RUN x f / (1 - f).
THROTTLE_RUN_S = 0.010
#: The largest throttle a workload accepts: 1.0 would stop it for good.
MAX_THROTTLE = 0.99

_log = logging.getLogger(__name__)


class Workload(Protocol):
    """What the source needs of a workload.

    Optional: ``async def throttle(fraction: float) -> None`` keeps the
    workload stopped that fraction (0..0.99) of the time, 0 ending it;
    raises :class:`GuestControlError` if it cannot.  ``pause`` stops a
    throttled workload straight from its throttle, and ``resume`` lets it
    run unthrottled.
    """

    async def pause(self) -> bytes:
        """Stop the workload (ending any throttle); return its device-state blob (may be empty)."""

    async def resume(self) -> None:
        """Let the workload run again, unthrottled (rollback)."""

    async def stop(self) -> None:
        """End the workload for good (after a commit, with --on-commit kill)."""

    def describe(self) -> str:
        ...


class DestWorkload(Protocol):
    """The destination's side of a workload (e.g. :class:`~precopy.workload.qemu.QemuDestination`).

    The destination calls ``prepare`` once the region file of a migration
    exists (it is then being received), ``check`` when COMMIT arrives, before
    anything is committed (raise :class:`GuestControlError` if the workload
    could not be resumed here: the migration then aborts and the source
    resumes its workload), ``resume`` after the commit (the region is
    complete under its final name, the device state written) and before it
    confirms the commit, and ``discard`` when the migration ends without a
    commit.  ``resume`` returns timings (ms) for the report.
    """

    async def prepare(self, migration_id: str, name: str, region: Path, size: int) -> None:
        ...

    async def check(self, migration_id: str) -> None:
        ...

    async def resume(self, migration_id: str, memory: Path, device_state: Path) -> dict[str, float]:
        ...

    async def discard(self, migration_id: str) -> None:
        ...


def process_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat`` ('R', 'S', 'T', ...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise GuestControlError(f"process {pid} does not exist (it exited?)") from None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2:][:1].decode()


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= MAX_THROTTLE:
        raise ValueError(f"throttle fraction must be 0..{MAX_THROTTLE}, not {fraction!r}")


class _DutyCycle:
    """Stop a process ``fraction`` of the time: a thread sending SIGSTOP and SIGCONT.

    The thread runs the process for ``run_s``, stops it for ``run_s x f /
    (1 - f)``, and so on; it sleeps in between (no polling: SIGSTOP lands in
    ~50 us).  The state (stopped or running, since when) changes only under
    the lock, signal and all, so no call is ever overtaken by a signal of
    the thread.  :meth:`hold` keeps the process stopped until
    :meth:`release`.  :meth:`stop` ends with the process continued
    (SIGCONT) -- or, with ``keep_stopped``, stopped, for a pause to take
    over without letting the process run in between.
    """

    def __init__(self, pid: int, fraction: float, run_s: float = THROTTLE_RUN_S) -> None:
        self.pid = pid
        self.run_s = run_s
        self.error: str | None = None
        self._fraction = fraction
        self._stopping = False
        self._keep_stopped = False
        self._held = False
        self._stopped = False  # by this cycle, now
        self._since = time.monotonic()  # the current phase began
        self._last_run = self._since  # the process last ran (was running, or was continued)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"precopy-throttle-{pid}", daemon=True)
        _ACTIVE.add(self)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def fraction(self) -> float:
        return self._fraction

    def ran_since(self, t: float) -> bool:
        """Whether the process may have run at or after monotonic time ``t``."""
        with self._cond:
            return not self._stopped or self._last_run >= t

    def set(self, fraction: float) -> None:
        """A new fraction; a stop in progress is cut or lengthened to it.  Ends a hold."""
        with self._cond:
            self._fraction, self._held = fraction, False
            self._cond.notify_all()

    def hold(self) -> None:
        """Stop the process now (if it runs) and keep it stopped until :meth:`set` or :meth:`stop`.

        Raises OSError if it cannot be stopped (gone, not ours).
        """
        with self._cond:
            self._held = True
            if not self._stopped:
                self._stop_now()
            self._cond.notify_all()

    def stop(self, *, keep_stopped: bool = False) -> None:
        """End the cycle; the process runs afterwards, or with ``keep_stopped`` is left stopped.

        ``keep_stopped`` raises OSError if the SIGSTOP cannot be sent; without
        it nothing is raised.
        """
        try:
            with self._cond:
                self._stopping, self._keep_stopped = True, keep_stopped
                self._cond.notify_all()
                if keep_stopped and not self._stopped:
                    self._stop_now()
        finally:
            if self._thread is not threading.current_thread():
                self._thread.join()
            _ACTIVE.discard(self)
        if not keep_stopped:
            _cont(self.pid)

    def _stop_now(self) -> None:  # holding the lock
        self._last_run = time.monotonic()
        os.kill(self.pid, signal.SIGSTOP)
        self._stopped, self._since = True, time.monotonic()

    def _cont_now(self) -> None:  # holding the lock
        os.kill(self.pid, signal.SIGCONT)
        self._stopped, self._since = False, time.monotonic()
        self._last_run = self._since

    def _loop(self) -> None:
        try:
            with self._cond:
                while not self._stopping:
                    f = self._fraction
                    if self._stopped:
                        end = float("inf") if self._held else self._since + self.run_s * f / (1.0 - f)
                    else:
                        end = self._since + self.run_s
                    left = end - time.monotonic()
                    if left > 0:
                        # Woken early by set / hold / stop: the phase's end is recomputed.
                        self._cond.wait(None if left == float("inf") else left)
                    elif self._stopped:
                        self._cont_now()
                    else:
                        self._stop_now()
        except ProcessLookupError:
            self.error = f"process {self.pid} is gone"
        except OSError as exc:
            self.error = f"cannot signal process {self.pid}: {exc}"
        finally:
            with self._cond:
                if not self._keep_stopped:
                    _cont(self.pid)


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except OSError:
        pass  # gone (nothing is left stopped), or not ours (nothing was stopped by us)


#: Duty cycles running in this process: stopped at interpreter exit, so that
#: an agent exiting without ending its throttle (a bug, an uncaught error)
#: never leaves its workload stopped.  SIGKILL is the guardian's business.
_ACTIVE: weakref.WeakSet[_DutyCycle] = weakref.WeakSet()


@atexit.register
def _stop_all_throttles() -> None:
    for cycle in list(_ACTIVE):
        cycle.stop()


class SignalWorkload:
    """A process paused with SIGSTOP and resumed with SIGCONT; throttled by a duty cycle of both."""

    throttle_method = "sigstop"

    def __init__(self, pid: int, *, stop_timeout_s: float = 2.0) -> None:
        if pid <= 1:
            raise GuestControlError(f"refusing to control pid {pid}")
        self.pid = pid
        self.stop_timeout_s = stop_timeout_s
        self._cycle: _DutyCycle | None = None
        process_state(pid)  # fails early if the process is gone

    def describe(self) -> str:
        return f"pid {self.pid} (SIGSTOP/SIGCONT)"

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise GuestControlError(f"process {self.pid} is gone; cannot send {sig.name}") from None
        except PermissionError:
            raise GuestControlError(
                f"not allowed to signal process {self.pid}; run as its user or root"
            ) from None

    async def throttle(self, fraction: float) -> None:
        """Keep the process stopped ``fraction`` of the time (0: end the throttle).

        Ending it returns with the process continued (SIGCONT).  Raises
        :class:`GuestControlError` if the process cannot be signalled (gone,
        not ours), and ValueError for a fraction outside 0..0.99.
        """
        _check_fraction(fraction)
        if not fraction:
            self._end_throttle()
            return
        if self._cycle is not None and not self._cycle.alive:
            why = self._cycle.error or "the throttle thread ended"
            self._end_throttle()
            raise GuestControlError(f"throttling process {self.pid} failed: {why}")
        if self._cycle is None:
            self._signal(signal.SIGCONT)  # it exists and we may signal it (harmless while it runs)
            self._cycle = _DutyCycle(self.pid, fraction)
        else:
            self._cycle.set(fraction)

    @property
    def throttled(self) -> bool:
        return self._cycle is not None

    def ran_since(self, t: float) -> bool:
        """Whether the process may have run at or after monotonic time ``t`` (True unless throttled
        and stopped by the duty cycle since before ``t``)."""
        return self._cycle is None or self._cycle.ran_since(t)

    async def hold(self) -> None:
        """While throttled: stop the process now and keep it stopped until the next
        :meth:`throttle`, :meth:`pause`, :meth:`resume` or :meth:`stop` (a no-op unthrottled).

        Raises :class:`GuestControlError` if the process cannot be signalled.
        """
        cycle = self._cycle
        if cycle is None:
            return
        try:
            cycle.hold()
        except ProcessLookupError:
            raise GuestControlError(f"process {self.pid} is gone; cannot send SIGSTOP") from None
        except PermissionError:
            raise GuestControlError(f"not allowed to signal process {self.pid}") from None
        if not await self._stopped():
            cycle.set(cycle.fraction)  # release it: the cycle goes on
            raise GuestControlError(f"process {self.pid} did not stop within {self.stop_timeout_s} s")

    def _end_throttle(self) -> None:
        cycle, self._cycle = self._cycle, None
        if cycle is not None:
            cycle.stop()

    async def pause(self) -> bytes:
        """SIGSTOP; wait until it took effect.  Ends a throttle first.

        A throttled process is stopped straight from the duty cycle (the
        cycle ends holding it stopped, then this pause owns the stop): it
        never runs between the throttle's last stop and the pause, which
        would dirty pages inside the downtime.
        """
        cycle, self._cycle = self._cycle, None
        if cycle is not None:
            try:
                cycle.stop(keep_stopped=True)
            except ProcessLookupError:
                raise GuestControlError(f"process {self.pid} is gone; cannot send SIGSTOP") from None
            except PermissionError:
                raise GuestControlError(f"not allowed to signal process {self.pid}") from None
        else:
            self._signal(signal.SIGSTOP)
        if not await self._stopped():
            self._signal(signal.SIGCONT)
            raise GuestControlError(f"process {self.pid} did not stop within {self.stop_timeout_s} s")
        return b""

    async def _stopped(self) -> bool:
        """Wait until a SIGSTOP sent took effect; False after ``stop_timeout_s``."""
        # SIGSTOP lands in ~50-70 us; poll with short sleeps (a tight loop
        # reading /proc can itself delay the stop on a 2-core machine).
        # The first polls sleep in place (sub-millisecond, this is downtime);
        # a process slow to stop then yields the event loop between polls.
        deadline = time.monotonic() + self.stop_timeout_s
        delay = 20e-6
        while process_state(self.pid) not in ("T", "t"):
            if time.monotonic() > deadline:
                return False
            if delay < 1e-3:
                time.sleep(delay)
                delay *= 2
            else:
                await asyncio.sleep(1e-3)
        return True

    async def resume(self) -> None:
        self._end_throttle()
        self._signal(signal.SIGCONT)

    async def stop(self) -> None:
        self._end_throttle()
        self._signal(signal.SIGKILL)

    def guardian_spec(self) -> dict[str, object]:
        """How a guardian process resumes this workload (see precopy.session.guardian)."""
        return {"kind": "pid", "pid": self.pid}


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
                    _cont(pending.pop())

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
        _check_fraction(fraction)
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

    def _offer_tracking(self) -> TrackingOffer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(str(self.path))
                pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                sock.sendall(b'{"op": "track"}\n')
                line = b""
                while not line.endswith(b"\n"):
                    if len(line) > 1 << 16:
                        raise GuestControlError("guest answered 'track' with a line over 64 KiB")
                    data, got, _, _ = socket.recv_fds(sock, 4096, 4, socket.MSG_CMSG_CLOEXEC)
                    fds.extend(got)
                    if not data:
                        raise GuestControlError("guest closed the control socket during 'track'")
                    line += data
            except TimeoutError:
                raise GuestControlError(f"guest did not answer 'track' within {self.timeout_s} s") from None
            except OSError as exc:
                raise GuestControlError(f"guest-control 'track' failed: {exc}") from exc
            try:
                reply = json.loads(line)
            except ValueError:
                raise GuestControlError(f"guest answered 'track' with invalid JSON: {line[:200]!r}") from None
            if not isinstance(reply, dict) or reply.get("ok") is not True:
                why = reply.get("error") if isinstance(reply, dict) else None
                raise GuestControlError(f"guest does not offer write tracking: {why or reply!r}"[:500])
            start, length = reply.get("start"), reply.get("length")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (start, length)):
                raise GuestControlError(f"guest's 'track' reply lacks a positive start and length: {reply!r}"[:500])
            if len(fds) != 1:
                raise GuestControlError(f"guest's 'track' reply carried {len(fds)} file descriptors, expected 1")
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

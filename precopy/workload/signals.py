"""A process paused with SIGSTOP, resumed with SIGCONT, throttled by a duty cycle of both.

:class:`SignalWorkload` works on any process; it has no device state (empty
blob).  Its throttle (auto-converge) is a SIGSTOP/SIGCONT duty cycle run by
a thread (:class:`_DutyCycle`), which
:class:`~precopy.workload.control.GuestControl` also puts on a guest that
does not offer the throttle op.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import threading
import time
import weakref

from precopy.errors import GuestControlError
from precopy.workload.base import check_fraction, process_state

__all__ = ["SignalWorkload", "continue_process"]

#: How long a throttled process runs between stops (QEMU's CPU throttle
#: timeslice): at a fraction f it is then stopped RUN x f / (1 - f).
THROTTLE_RUN_S = 0.010


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
            continue_process(self.pid)

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
                    continue_process(self.pid)


def continue_process(pid: int) -> None:
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
        check_fraction(fraction)
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


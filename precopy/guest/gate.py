"""Pause/resume/stop coordination between the work loop, control and signals."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from .common import POLL_S, GuestError

__all__ = ["WorkGate", "install_stop_signals"]

_PAUSE_TIMEOUT_S = 30.0
"""How long a pause request waits for the work loop to reach a pause point."""

THROTTLE_RUN_S = 0.010
"""How long a throttled loop works between rests (as the agent's SIGSTOP duty cycle)."""

MAX_THROTTLE = 0.99
"""The largest throttle accepted: 1.0 would never let the loop work again."""


class WorkGate:
    """Coordinates the main work loop with control requests and signals.

    The main loop calls :meth:`checkpoint` between batches/steps (never in the
    middle of a memory write) and :meth:`sleep` for pacing.  The control
    thread calls :meth:`pause`, :meth:`resume` and :meth:`request_stop`.
    Signal handlers call :meth:`request_stop_from_signal`, which takes no lock;
    every blocking wait polls at least every 50 ms so it notices that flag.

    :meth:`set_throttle` makes :meth:`checkpoint` a duty cycle: after at
    least ``THROTTLE_RUN_S`` of work the loop rests ``W x f / (1 - f)`` for
    the ``W`` it worked since its last rest (a batch between checkpoints may
    take longer than ``THROTTLE_RUN_S``, e.g. on a busy machine), so it
    works ``1 - f`` of the time.  A pause, a stop or a new throttle ends a
    rest early; a pause's time is not work.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pause_wanted = False
        self._parked = False
        self._finished = False
        self.stop_requested = False
        self._throttle = 0.0
        self._throttle_changes = 0
        self._run_start = time.monotonic()
        #: Seconds the loop spent in the throttle's rests so far (a paced loop does not make them up).
        self.rested_s = 0.0

    def hold(self) -> None:
        """Start paused: the loop waits at its first checkpoint until :meth:`resume` (a post-copy
        guest, which must touch nothing before its agent is ready)."""
        with self._cond:
            self._pause_wanted = True

    # -- main-loop side -----------------------------------------------------

    def checkpoint(self) -> bool:
        """Block while a pause is requested, rest while throttled; ``False`` if the loop must stop."""
        if self._throttle:
            self._rest()
        if not self._pause_wanted:
            return not self.stop_requested
        with self._cond:
            while self._pause_wanted and not self.stop_requested:
                if not self._parked:
                    self._parked = True
                    self._cond.notify_all()
                self._cond.wait(POLL_S)
            self._parked = False
            self._run_start = time.monotonic()  # the pause was no work: no rest owed for it
            return not self.stop_requested

    def _rest(self) -> None:
        """The throttle's rest, once ``THROTTLE_RUN_S`` of work is done since the last one."""
        now = time.monotonic()
        worked = now - self._run_start
        if worked < THROTTLE_RUN_S:
            return
        with self._cond:
            fraction, changes = self._throttle, self._throttle_changes
            deadline = now + worked * fraction / (1.0 - fraction) if fraction else now
            while not (self._pause_wanted or self.stop_requested) and changes == self._throttle_changes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, POLL_S))
        self._run_start = time.monotonic()
        self.rested_s += self._run_start - now

    @property
    def throttle(self) -> float:
        """The fraction of time the loop rests (0: not throttled)."""
        return self._throttle

    def set_throttle(self, fraction: float) -> None:
        """Rest ``fraction`` of the time from now on (0 ends the throttle).

        Raises:
            GuestError: if ``fraction`` is outside 0..0.99.
        """
        if not 0.0 <= fraction <= MAX_THROTTLE:
            raise GuestError(f"throttle must be 0..{MAX_THROTTLE * 100:.0f} %, not {fraction * 100:g} %")
        with self._cond:
            self._throttle = fraction
            self._throttle_changes += 1
            self._run_start = time.monotonic()
            self._cond.notify_all()

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early if a pause or stop is requested."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not (self._pause_wanted or self.stop_requested):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(min(remaining, POLL_S))

    def finish(self) -> None:
        """Declare that the main loop will not write guest memory any more."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    # -- control side ---------------------------------------------------------

    def pause(self, timeout: float = _PAUSE_TIMEOUT_S) -> bool:
        """Request a pause and wait until the main loop is blocked.

        Returns:
            ``True`` if this call paused a running guest, ``False`` if it was
            already paused (or finished).

        Raises:
            GuestError: if the guest is stopping or does not reach a pause
                point within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            newly_paused = not self._pause_wanted
            self._pause_wanted = True
            self._cond.notify_all()
            while not (self._parked or self._finished or self.stop_requested):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if newly_paused:
                        self._pause_wanted = False
                    raise GuestError(
                        f"guest did not reach a pause point within {timeout:.0f} s; "
                        "it may be overloaded, retry the pause"
                    )
                self._cond.wait(min(remaining, POLL_S))
            if self.stop_requested:
                raise GuestError("guest is stopping; it cannot be paused any more")
            return newly_paused and not self._finished

    def resume(self) -> None:
        """Let the main loop continue (no-op if it is running)."""
        with self._cond:
            self._pause_wanted = False
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Ask the main loop to exit and wake it up."""
        with self._cond:
            self.stop_requested = True
            self._cond.notify_all()

    def request_stop_from_signal(self) -> None:
        """Ask the main loop to exit; safe inside a signal handler (no locks)."""
        self.stop_requested = True


def install_stop_signals(gate: WorkGate) -> None:
    """Make SIGTERM and SIGINT stop the main loop cleanly (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def _handler(signum: int, frame: FrameType | None) -> None:
        gate.request_stop_from_signal()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handler)

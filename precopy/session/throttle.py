"""Auto-converge on the source: throttle, hold and release the workload, the guardian armed to match.

The decision of how hard to throttle is the policy's
(:class:`precopy.policy.switchover.SwitchoverPolicy`); this applies it to
the workload and makes sure no exit leaves the workload throttled.
"""

from __future__ import annotations

import logging
from typing import Callable

from precopy.errors import GuestControlError
from precopy.policy.switchover import SwitchoverPolicy
from precopy.session.guardian import ARMED, IDLE, Guardian
from precopy.session.report import MigrationReport
from precopy.workload.base import Workload

__all__ = ["Throttle"]

_log = logging.getLogger(__name__)


class Throttle:
    """The throttle on one migration's workload.

    ``pct``: the throttle in effect (percent of its time stopped; 0: none).
    ``paused()`` says whether the migration has the workload paused (the
    guardian then stays armed whatever the throttle).  ``guardian`` is set
    once the session has one.
    """

    def __init__(self, workload: Workload, policy: SwitchoverPolicy, report: MigrationReport,
                 paused: Callable[[], bool]) -> None:
        self.workload = workload
        self.policy = policy
        self.report = report
        self.paused = paused
        self.guardian: Guardian | None = None
        self.pct = 0

    async def hold_for_scan(self) -> bool:
        """At the highest throttle there is, keep the workload stopped from the scan to the decision.

        At 99 % a workload that can dirty its whole region in one 10 ms run
        converges only on a quiet scan that stays true until the pause; a
        run between the two (likely when a round takes about the 1 s duty
        cycle, e.g. on a slow link) would leave the pause all to send.  A
        held workload is paused straight from the hold, or released (the
        next :meth:`set`) to go on.  Below 99 % a hold would stop the
        workload beyond its ``--throttle-max``.  Returns whether it is held.
        """
        hold = getattr(self.workload, "hold", None)
        if hold is None or self.pct < 99:
            return False
        try:
            # A workload that cannot hold (a guest throttling itself) says False.
            return await hold() is not False
        except GuestControlError as exc:
            _log.warning("could not hold the throttled workload for the scan: %s", exc)
            return False

    async def set(self, pct: int, *, release: bool = False) -> None:
        """Throttle the workload to ``pct`` % of its time stopped (0: not at all).

        ``release``: it is held (:meth:`hold_for_scan`): set the throttle
        even if unchanged, which ends the hold.  A workload without a
        ``throttle`` method, or one that refuses or fails it (a guest
        answering not-ok), is not throttled: that is said once and the
        migration goes on without.  The guardian is armed while a throttle
        is on, so a crash of this process cannot leave the workload stopped.
        """
        if pct == self.pct and not release:
            return
        throttle = getattr(self.workload, "throttle", None)
        if throttle is None:
            self._unavailable(f"{self.workload.describe()} cannot be throttled")
            return
        if pct and self.guardian is not None:
            self.guardian.declare(ARMED)  # before the first stop: a crash from here on resumes it
        try:
            await throttle(pct / 100)
        except GuestControlError as exc:
            self._unavailable(str(exc))
            if self.pct or not str(exc).startswith("guest refused"):
                # It may be throttled now (no answer, a broken one, or an
                # earlier throttle on): end it as any throttle is ended.
                self.pct = max(self.pct, 1)
                await self.end()
            elif self.guardian is not None and not self.paused():
                self.guardian.declare(IDLE)  # an explicit refusal changed nothing
            return
        self.pct = pct
        self.report.max_throttle_pct = max(self.report.max_throttle_pct, pct)
        if pct and self.report.throttle_method is None:
            self.report.throttle_method = str(getattr(self.workload, "throttle_method", None) or "adapter")
        if not pct and self.guardian is not None and not self.paused():
            self.guardian.declare(IDLE)

    def _unavailable(self, why: str) -> None:
        if self.policy.throttle != "off":
            _log.warning("throttling unavailable (%s): iterating without", why)
            self.policy.disable_throttle()

    async def end(self) -> None:
        """End any throttle: the workload runs at full speed again.

        Never raises for the workload: a failure is logged (the guardian
        stays armed; the resume of a rollback follows).
        """
        if not self.pct:
            return
        self.pct = 0
        throttle = getattr(self.workload, "throttle", None)
        try:
            if throttle is not None:
                await throttle(0.0)
        except GuestControlError as exc:
            _log.error("could not end the workload's throttle: %s", exc)
            return  # the guardian stays armed
        if self.guardian is not None and not self.paused():
            self.guardian.declare(IDLE)

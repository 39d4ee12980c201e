"""What the agents need of a workload: the :class:`Workload` and :class:`DestWorkload` interfaces.

The adapters: :class:`~precopy.workload.signals.SignalWorkload` (any
process, SIGSTOP/SIGCONT), :class:`~precopy.workload.control.GuestControl`
(a cooperative guest's control socket) and
:class:`~precopy.workload.qemu.QemuWorkload` / ``QemuDestination`` (QEMU over
QMP).

Either may be *throttled* (auto-converge, :mod:`precopy.policy.switchover`): the
optional ``async def throttle(fraction)`` keeps the workload stopped that
fraction of the time (0 ends the throttle; a workload without the method is
simply not throttled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from precopy.errors import GuestControlError

__all__ = ["Workload", "DestWorkload", "process_state", "check_fraction", "MAX_THROTTLE"]

#: The largest throttle a workload accepts: 1.0 would stop it for good.
MAX_THROTTLE = 0.99


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


def check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= MAX_THROTTLE:
        raise ValueError(f"throttle fraction must be 0..{MAX_THROTTLE}, not {fraction!r}")


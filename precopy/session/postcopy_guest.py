"""The destination's post-copy guest: where it listens, taking its userfaultfd, and starting it early.

The ``--on-resume`` hook starts the guest that takes part in post-copy
(docs/TRACKING.md "Post-copy"): it listens on ``PRECOPY_POSTCOPY_CONTROL``,
held, and hands over its userfaultfd (op ``postcopy``).  By default the
hook runs at the post-copy switchover, so the guest's start (a Python guest:
~220 ms) is part of the downtime.  With ``precopy-dest --postcopy-guest-early``
(:attr:`~precopy.session.dest_options.DestOptions.postcopy_guest_early`) a
:class:`HeldGuest` runs the hook when a migration that may end in post-copy
*begins* (``PRECOPY_MEMORY`` is then the region being received, under its
partial name: the commit waits for the guest to listen, its region mapped,
before renaming it; the device state is written before the guest is
resumed, so the guest reads it when resumed, not when started) and takes
its userfaultfd while pre-copy runs.  The held guest is then resumed
at the switchover (post-copy) or after the commit (pre-copy: every page is
there), and stopped when the migration ends without a commit -- the shape
QEMU's incoming VM has.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

from precopy.errors import AbortCode, GuestControlError, PrecopyError
from precopy.memory.tracking import TrackingOffer
from precopy.session.journal import MigrationRecord
from precopy.workload.control import GuestControl

__all__ = ["HeldGuest", "control_path", "take_guest"]

_log = logging.getLogger(__name__)


def control_path(state_dir: Path, migration_id: str) -> Path:
    """Where the resumed guest must listen: the state dir, or /tmp when that path is too long for a socket."""
    path = state_dir / f".pc-{migration_id}.sock"
    if len(os.fsencode(path)) > 100:
        path = Path(tempfile.gettempdir()) / f"precopy-pc-{migration_id[:40]}.sock"
    return path


async def take_guest(ctl: Path, timeout_s: float) -> tuple[GuestControl, TrackingOffer]:
    """Wait up to ``timeout_s`` for a guest on ``ctl``; take its userfaultfd (op ``postcopy``).

    Raises :class:`PrecopyError` (abort code GUEST) saying what the hook or the guest must do.
    """
    deadline = time.monotonic() + timeout_s
    while not ctl.exists():
        if time.monotonic() > deadline:
            raise PrecopyError(f"post-copy: no guest listened on {ctl} within {timeout_s:g} s (does the "
                               "--on-resume hook start it with --control \"$PRECOPY_POSTCOPY_CONTROL\" "
                               "--postcopy?)", AbortCode.GUEST)
        await asyncio.sleep(0.002)
    guest = GuestControl(ctl, timeout_s=max(5.0, deadline - time.monotonic()))
    try:
        return guest, await guest.offer_postcopy()
    except GuestControlError as exc:
        try:
            await guest._request("stop")  # it never ran: it must not run later
        except GuestControlError as why:
            _log.warning("post-copy: stopping the guest on %s: %s", ctl, why)
        await guest.close()
        raise PrecopyError(f"post-copy: the guest on {ctl} did not hand over its userfaultfd: {exc}",
                           AbortCode.GUEST) from exc


RunHook = Callable[[MigrationRecord, Path, Path], Awaitable[None]]
#: How long stopping a held guest waits for one still starting (seconds).
_STOP_WAIT_S = 10.0


class HeldGuest:
    """A post-copy guest started when its migration began, held (see the module docstring)."""

    def __init__(self, ctl: Path, task: asyncio.Task[tuple[GuestControl, TrackingOffer]]) -> None:
        self.ctl = ctl
        self._task = task
        self._taken = False  # handed over to post-copy: its owner closes it

    @classmethod
    async def launch(cls, run_hook: RunHook, rec: MigrationRecord, region: Path, device_state: Path,
                     state_dir: Path, timeout_s: float) -> HeldGuest:
        """Run the hook (not waiting for it) and start taking the guest's userfaultfd in the background."""
        ctl = control_path(state_dir, rec.migration_id)
        ctl.unlink(missing_ok=True)
        rec.postcopy_control = str(ctl)
        try:
            await run_hook(rec, region, device_state)
        finally:
            rec.postcopy_control = None  # set again when post-copy starts
        _log.info("migration %s: post-copy guest started ahead, held (%s)", rec.migration_id, ctl)
        return cls(ctl, asyncio.create_task(take_guest(ctl, timeout_s)))

    async def ready(self) -> None:
        """Wait until the guest listens, its region mapped (raises :class:`PrecopyError` if it never
        does): the region may then be renamed under its final name."""
        await asyncio.shield(self._task)

    async def take(self) -> tuple[GuestControl, TrackingOffer]:
        """The guest and its userfaultfd, for post-copy (the caller owns both from here on).

        Raises :class:`PrecopyError` when the guest never offered it.
        """
        got = await asyncio.shield(self._task)
        self._taken = True
        return got

    async def resume(self) -> None:
        """Pre-copy committed: every page is there, nothing to register; let the guest run."""
        guest, offer = await self.take()
        os.close(offer.fd)
        try:
            await guest.resume()
        finally:
            await guest.close()

    async def stop(self) -> None:
        """The migration ended without a commit: stop the guest (it never ran).  A guest still
        starting is waited for (at most ``_STOP_WAIT_S``): left alone, it would stay held forever."""
        if self._taken:
            return
        try:
            guest, offer = await asyncio.wait_for(asyncio.shield(self._task), _STOP_WAIT_S)
        except (TimeoutError, PrecopyError) as exc:
            self._task.cancel()
            _log.warning("the post-copy guest held on %s is not there to stop (%s)", self.ctl, exc or "timeout")
            return
        os.close(offer.fd)
        try:
            await guest._request("stop")
        except GuestControlError as exc:
            _log.warning("stopping the held post-copy guest on %s: %s", self.ctl, exc)
        finally:
            await guest.close()

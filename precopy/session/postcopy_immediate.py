"""``--postcopy immediate``: post-copy before anything is copied (docs/FAILURES.md "Post-copy").

Where ``--postcopy now`` and ``auto`` switch over after the full copy (a
workload that writes everything moves the region twice: the full copy,
then the post-copy push of what it rewrote), ``immediate`` switches over
right after READY:

1. the holes of the source's file are found while the workload runs
   (:meth:`~precopy.memory.region.GuestMemory.hole_pages`, never reading
   them), before connecting, and the other pages are mapped in, in a thread
   (:mod:`precopy.memory.map_in`: the push then takes no page fault per page),
   while the destination gets ready; into a region the destination held
   already (READY ``existing``) the holes go at once as zero pages (no
   payload), as pre-copy's full copy sends them;
2. the workload is paused (:class:`~precopy.session.postcopy_source.PostcopySource`);
   the holes are looked at again (:meth:`~precopy.memory.region.GuestMemory.holes_still`:
   one ``SEEK_DATA`` per run of holes, none for a region without) -- no
   dirty scan: nothing was sent, so every page the file holds is missing
   (:func:`immediate_missing`);
3. MISSING, device state, POSTCOPY, COMMITTED: the workload runs on the
   destination;
4. the page stream is the copy: faulted pages first, the rest in order,
   each page once (:class:`~precopy.session.postcopy_stream.PageStream`).

A hole is not missing: the destination's new region is a fresh sparse file
(its holes read as zeros; a fault there gets a zero page), an existing one
had them zeroed in step 1.  No kernel write tracking is armed and no
digest is taken: the report's ``tracking`` says ``none``.

The destination that names :data:`~precopy.protocol.POSTCOPY_IMMEDIATE_CAP`
back holds READY until the guest it starts early (``--postcopy-guest-early``)
has handed over its userfaultfd, so the guest's start is not in the pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import numpy as np

from precopy.errors import AbortCode, PrecopyError
from precopy.memory.region import GuestMemory
from precopy.protocol import POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP
from precopy.session.postcopy_source import _Session, postcopy_parts
from precopy.session.report import RoundReport

__all__ = ["immediate_missing", "switch_over_at_once", "IMMEDIATE_TRACKING"]

_log = logging.getLogger(__name__)
#: The report's ``tracking`` with ``--postcopy immediate`` (nothing is tracked: nothing is copied live).
IMMEDIATE_TRACKING = "none"


class _Immediate(_Session, Protocol):
    async def _connect(self, mem: GuestMemory) -> None: ...

    def _make_sender_and_scanner(self) -> None: ...


def immediate_missing(holes: np.ndarray) -> np.ndarray:
    """The pages the destination lacks when nothing was sent, as a per-page mask (a new array): those
    that are not holes of the source's file, taken with the workload paused."""
    return ~np.asarray(holes, dtype=bool)


async def switch_over_at_once(session: _Immediate, mem: GuestMemory) -> None:
    """The migration of a session with ``--postcopy immediate``, its region ``mem`` open: connect
    (handshake, BEGIN, READY), then steps 1-4 of the module docstring; returns once COMPLETE came.

    Raises :class:`PrecopyError` before the destination ran the workload (the
    session rolls back: nothing moved yet), :class:`~precopy.errors.MigrationInDoubt`
    after it, as for ``--postcopy now``.
    """
    report = session.report
    report.tracking, report.tracking_reason = IMMEDIATE_TRACKING, "--postcopy immediate: nothing is copied live"
    loop = asyncio.get_running_loop()
    holes = await loop.run_in_executor(session._outer_pool, mem.hole_pages)
    if not session.opts.dry_run:  # the push reads every page: mapped in while the destination gets ready
        mem.prep.start_map_in(~holes)  # (in a thread; never the holes: that would allocate them)
    await session._connect(mem)
    if session.opts.dry_run:
        _log.info("preflight of %s (%d MiB) -> %s: the destination accepts it", session.opts.memory,
                  mem.size >> 20, report.destination)
        return
    _log.info("migration %s: %s (%d MiB) -> %s, post-copy at once", session.opts.migration_id,
              session.opts.memory, mem.size >> 20, report.destination)
    caps = session.exchange.caps
    if POSTCOPY_CAP not in caps:
        raise PrecopyError("--postcopy immediate: the destination does not serve post-copy (it needs a "
                           "precopy-dest with --on-resume starting a guest that takes part, its --memory-dir on "
                           "tmpfs: docs/TRACKING.md)", AbortCode.GUEST)
    if POSTCOPY_IMMEDIATE_CAP not in caps:
        _log.warning("--postcopy immediate: the destination does not wait for its guest before READY (an "
                     "older precopy-dest, or no --postcopy-guest-early): the guest's start falls in the pause")
    session._make_sender_and_scanner()  # (the switchover's parts; nothing is scanned)
    session.model.region(mem.npages, session.chunk_pages, None)
    if session.report.dest_region == "existing":
        # Stale bytes there: the holes become zeros now, before the pause (no payload, nothing read).
        scratch = RoundReport(round=0, kind="holes", pages_scanned=mem.npages, pages_dirty=0, pages_sent=0,
                              zero_pages=0, bytes_on_wire=0, seconds=0.0)
        await session.sender.send_holes(np.flatnonzero(holes).astype(np.uint32), scratch)
    n_holes = int(holes.sum())
    at_pause = [0]
    every = immediate_missing(holes) if not n_holes else None  # no holes: known before the pause

    async def find_missing() -> np.ndarray:
        if every is not None:
            return every
        still = mem.holes_still(holes)  # (inline: a thread hop costs more)
        at_pause[0] = int(still.sum())
        return immediate_missing(still)

    _log.info("--postcopy immediate: switching over before any copy (%d of %d pages are holes)",
              n_holes, mem.npages)
    session._emit("post-copy", 0, 0, 0, 0, time.monotonic())
    pc, sw = postcopy_parts(session, find_missing)
    await pc.run(sw, np.zeros(0, dtype=np.uint32), None, str(session.opts.memory))
    if session.report.postcopy is not None:
        session.report.postcopy["mode"] = "immediate"
        session.report.postcopy["holes"] = at_pause[0]  # (not missing: zeros there)
    await session._hand_over(0.0)

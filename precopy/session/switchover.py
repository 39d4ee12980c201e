"""The switchover: pause, final pass, device state, verification, commit -- each step timed.

The decision to get here is the policy's (pure, in
:mod:`precopy.policy.switchover`); this carries it out while the workload
is paused.  Before every step that still stands between the pause and the
commit, the downtime cap (``--max-downtime-ms``) is checked: a pause that
would pass it rolls back instead.  The last check is right before COMMIT:
after it, the commit stands whatever the time (DESIGN invariant 3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

import numpy as np
import xxhash

from precopy.errors import AbortCode, PrecopyError
from precopy.memory.digest import page_union
from precopy.memory.tracking import SourceChunks
from precopy.policy.downtime import DowntimeCap, DowntimeCapExceeded
from precopy.protocol import MAX_PAYLOAD, DeviceState
from precopy.protocol import Switchover as SwitchoverEvent
from precopy.session.commit import Committer
from precopy.session.estimate import DowntimeModel
from precopy.session.exchange import Exchange
from precopy.session.guardian import ARMED, COMMIT, Guardian
from precopy.session.record import PageRecord
from precopy.session.report import MigrationReport, RoundReport
from precopy.session.scanner import DirtyScanner
from precopy.session.sender import PageSender
from precopy.session.throttle import Throttle
from precopy.workload.base import Workload

__all__ = ["Switchover", "VERIFY_ATTEMPTS"]

_log = logging.getLogger(__name__)
#: Repairs of chunks that still differ before the migration gives up (VERIFY_FAILED).
VERIFY_ATTEMPTS = 3


class Switchover:
    """The paused part of one migration, step by step; ``phases`` gets each step's time (ms).

    ``chunks``: a kernel tracker's chunk table (None: digests, where the
    final scan itself compares both tables).
    """

    def __init__(self, *, workload: Workload, guardian: Guardian | None, throttle: Throttle,
                 exchange: Exchange, scanner: DirtyScanner, sender: PageSender, record: PageRecord,
                 model: DowntimeModel, committer: Committer, report: MigrationReport,
                 cap: DowntimeCap | None, npages: int, chunk_pages: int, chunks: SourceChunks | None,
                 pool: Executor) -> None:
        self.workload = workload
        self.guardian = guardian
        self.throttle = throttle
        self.exchange = exchange
        self.scanner = scanner
        self.sender = sender
        self.record = record
        self.model = model
        self.committer = committer
        self.report = report
        self.cap = cap
        self.npages = npages
        self.chunk_pages = chunk_pages
        self.chunks = chunks
        self.pool = pool
        self.phases: dict[str, float] = {}
        self.t_pause = 0.0
        self._t_paused = 0.0  # when the workload was paused (the pause's own time after t_pause)
        self._t = 0.0  # when the last step ended
        self._dest_table = np.zeros(0, dtype=np.uint64)  # from the last verification

    def cap_check(self, step: str, rest_s: float) -> None:
        """Before a switchover step: roll back (raise) if the pause would pass ``--max-downtime-ms``."""
        if self.cap is None:
            return
        try:
            self.cap.check(step, rest_s)
        except DowntimeCapExceeded:
            self.report.cap_hit = step
            raise

    def _lap(self, step: str) -> float:
        """The time of ``step`` (since the last one ended) into ``phases``; returns now."""
        now = time.monotonic()
        self.phases[step] = (now - self._t) * 1e3
        self._t = now
        return now

    async def pause(self) -> bytes:
        """Arm the guardian and pause the workload; returns its device state.

        The pause ends a throttle itself, stopping the workload straight
        from it: ending it first would let the workload run (and dirty
        pages inside the downtime) between its last stop and the pause.
        """
        if self.guardian is not None:
            self.guardian.declare(ARMED)  # before the pause: a crash from here on resumes it
        self.t_pause = self._t = time.monotonic()
        if self.cap is not None:
            self.cap.start()
        blob = await self.workload.pause()
        self.throttle.pct = 0
        self._t_paused = self._lap("pause")
        self.phases.update(getattr(self.workload, "phases_ms", {}))  # e.g. QEMU's stop and save
        return blob

    async def final_pass(self, expected_s: float, dest_table: np.ndarray | None, pending: np.ndarray,
                         device_state_bytes: int) -> tuple[RoundReport, np.ndarray, np.ndarray]:
        """SWITCHOVER, the final scan of the frozen region and what it finds.

        ``dest_table``: the destination's chunk digests from the last round
        (still current), or None to ask for them (stop-and-copy);
        ``pending``: pages the last round decided on.  Returns the final
        round's report, our frozen chunk table and the pages sent.
        """
        t = self._t
        await self.exchange.send(SwitchoverEvent())
        rnd = RoundReport(round=len(self.report.rounds), kind="final", pages_scanned=self.npages,
                          pages_dirty=0, pages_sent=0, zero_pages=0, bytes_on_wire=0, seconds=0.0)
        self.cap_check("final_scan", expected_s)
        final = await self.scanner.scan(final=True, dest_table=dest_table, pending=pending)
        dirty, odd = final.dirty, final.odd
        t2 = self._lap("final_scan")
        rnd.scan_seconds = t2 - t
        rnd.detect_seconds = final.hash_s if self.chunks is not None else final.hash_s + final.page_hash_s
        rnd.pages_dirty = len(dirty)
        if odd.size:
            _log.warning("final pass: %d pages in chunks the destination holds differently "
                         "although our record says otherwise; resending them", len(odd))
            self.report.verify_repairs += len(odd)
        todo = page_union(self.npages, dirty, odd)
        if todo.size:
            await self.sender.send(todo, rnd, "switchover",
                                   before_batch=lambda left: self.cap_check(
                                       "final_pages", self.model.rest_s(left, device_state_bytes)))
        self._lap("final_pages")
        return rnd, final.live, todo

    async def state_and_verify(self, blob: bytes, frozen: np.ndarray, sent: np.ndarray, rnd: RoundReport) -> bytes:
        """The device state (:meth:`send_device_state`) and the verification (:meth:`verify`); returns the state.

        A state the workload finishes beside the final pass (CRIU's dump) is
        sent after the verification, which then runs beside it too: the
        region is frozen and its final pass done, it does not depend on
        that state (and the destination, which restores as soon as the state
        is complete, then restores beside nothing of ours).
        """
        if getattr(self.workload, "device_state", None) is None:
            blob = await self.send_device_state(blob, rnd)
            await self.verify(frozen, sent, rnd)
            return blob
        await self.verify(frozen, sent, rnd)
        return await self.send_device_state(blob, rnd)

    async def late_device_state(self, blob: bytes) -> bytes:
        """A device state the workload finishes beside the final pass (CRIU's dump): wait for it.

        Returns ``blob`` unchanged for a workload without ``device_state()``.
        """
        finish = getattr(self.workload, "device_state", None)
        if finish is None:
            return blob
        self.cap_check("device_state", self.model.rest_s(0))
        blob = await finish()
        self._lap("device_state_wait")
        self.phases.update(getattr(self.workload, "phases_ms", {}))  # e.g. CRIU's dump
        return blob if isinstance(blob, (bytes, bytearray)) else bytes(blob)  # (no copy of the images)

    async def send_device_state(self, blob: bytes, rnd: RoundReport) -> bytes:
        """The workload's device state, in frames of at most MAX_PAYLOAD (one, empty, if none).

        Returns what was sent: ``blob``, or the one the workload finished
        beside the final pass (:meth:`late_device_state`).
        """
        blob = await self.late_device_state(blob)
        self.cap_check("device_state", self.model.rest_s(0, len(blob)))
        self.report.device_state_bytes = len(blob)
        view = memoryview(blob)
        for off in range(0, max(len(blob), 1), MAX_PAYLOAD):
            piece = view[off:off + MAX_PAYLOAD]
            rnd.bytes_on_wire += await self.exchange.send(DeviceState(offset=off, total=len(blob), data=piece))
        self._lap("device_state")
        return blob

    async def verify(self, frozen: np.ndarray, sent: np.ndarray, rnd: RoundReport) -> None:
        """The destination's chunk table must equal our ``frozen`` one; chunks that differ are repaired.

        (Digests: a final scan that ``sent`` nothing has just compared both
        tables.  A tracker compares nothing by itself: always verify.)
        Raises :class:`PrecopyError` (VERIFY_FAILED) when repairs do not help.
        """
        if sent.size or self.chunks is not None:
            for attempt in range(VERIFY_ATTEMPTS):
                self.cap_check("verify", self.model.rest_s(0))
                bad = await self._compare(frozen)
                if bad.size and self.chunks is not None:
                    bad = await self._recheck(frozen, bad)
                if not bad.size:
                    break
                _log.warning("verification: %d chunks differ; repairing (attempt %d)", bad.size, attempt + 1)
                cp = self.chunk_pages
                pages = (bad[:, None] * cp + np.arange(cp)).ravel()
                pages = pages[pages < self.npages].astype(np.uint32)
                self.report.verify_repairs += len(pages)
                await self.sender.send(pages, rnd, "repair",
                                       before_batch=lambda left: self.cap_check("verify", self.model.rest_s(left)))
            else:
                raise PrecopyError(f"destination memory still differs after {VERIFY_ATTEMPTS} repairs",
                                   AbortCode.VERIFY_FAILED)
        t5 = self._lap("verify")
        rnd.seconds = t5 - self._t_paused
        self.report.rounds.append(rnd)

    async def _compare(self, frozen: np.ndarray) -> np.ndarray:
        """The chunks whose digests differ between ``frozen`` and the destination's table."""
        by_page = self.chunks is not None and self.chunks.by_page
        seq = await self.exchange.request(final=True, by_page=by_page)
        t = time.monotonic()
        table = await self.exchange.expect_table(seq)
        self._dest_table = table.digests
        bad = np.flatnonzero(frozen != table.digests)
        _log.debug("verification: the destination's table in %.1f ms, %d chunks differ",
                   (time.monotonic() - t) * 1e3, bad.size)
        return bad

    async def _recheck(self, frozen: np.ndarray, bad: np.ndarray) -> np.ndarray:
        """Rehash our ``bad`` chunks from the paused region; returns those the destination really lacks.

        With a tracker our table is kept current from its reports; a race the
        kernel cannot report (a hole punched over a fresh write) can leave a
        chunk digest stale while the destination is right.
        """
        assert self.chunks is not None
        frozen[bad] = await asyncio.get_running_loop().run_in_executor(
            self.pool, self.chunks.recompute, bad, self.record.sent)
        still: np.ndarray = bad[frozen[bad] != self._dest_table[bad]]
        if still.size < bad.size:
            _log.info("verification: %d chunk digests of ours were stale (holes punched while tracked); "
                      "the destination holds them right", bad.size - still.size)
        return still

    async def commit(self, blob: bytes) -> float:
        """COMMIT (the device state's checksum with it) and its outcome; returns when it was confirmed.

        Raises as :meth:`Committer.commit` does.
        """
        self.cap_check("commit", self.model.overhead_s())
        if self.guardian is not None:
            self.guardian.declare(COMMIT)  # from here on a crash must ask, never resume blindly
        done = await self.committer.commit(self.exchange.send, self.exchange.expect,
                                           xxhash.xxh3_64_intdigest(blob), self.exchange.chan)
        if done is not None:
            self.phases.update({f"dest_{k}": v for k, v in done.timings.items()})
        return self._lap("commit")

"""The source's post-copy switchover and page stream (docs/PROTOCOL.md "Post-copy", docs/FAILURES.md).

Chosen by the rounds (:mod:`precopy.policy.postcopy`), :class:`PostcopySource`:

1. pauses the workload (as a pre-copy switchover does) and sends SWITCHOVER;
2. finds the pages the destination does not hold correctly: with kernel
   write tracking one scan of what was written since the last one (a few
   ms), with digests the final comparison of both chunk tables; plus the
   pages the last round decided on and did not send;
3. sends their bitmap (MISSING), the device state and POSTCOPY, and waits
   for COMMITTED: the workload runs on the destination, the downtime ends;
4. serves the page stream (:class:`~precopy.session.postcopy_stream.PageStream`)
   until COMPLETE, taking it up on a new connection (RESUME) when the link
   breaks, up to ``outcome_retries`` times in a row.

From POSTCOPY on nothing is rolled back.  An ABORT in answer to POSTCOPY
is a definite "not committed" (the destination never resumed the guest):
the session rolls back as for COMMIT.  A lost answer asks for the outcome.
When the stream cannot be taken up again the migration ends in doubt
(exit 4) with the workload left paused here: it holds the only copy of the
pages the destination lacks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Protocol

import numpy as np
import xxhash

from precopy.errors import AbortCode, MigrationInDoubt, PrecopyError
from precopy.memory.region import GuestMemory
from precopy.memory.tracking import SourceChunks, UffdTracker
from precopy.net.channel import Channel, PeerAborted
from precopy.policy.downtime import DowntimeCap
from precopy.policy.postcopy import postcopy_wanted
from precopy.protocol import (MAX_PAYLOAD, POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP, POSTCOPY_LANE_CAP, Begin, Committed,
                              Missing, Postcopy)
from precopy.protocol import Switchover as SwitchoverEvent
from precopy.protocol.postcopy_codec import bitmap_of_mask
from precopy.session.commit import Committer, OutcomeTarget, describe
from precopy.session.estimate import DowntimeModel
from precopy.session.exchange import Exchange
from precopy.session.guardian import COMMIT, Guardian
from precopy.session.options import SourceOptions
from precopy.session.postcopy_lane import run_source_lane, stop_lane
from precopy.session.postcopy_lane_proc import prestart, process_lane_ok
from precopy.session.postcopy_stream import PageStream, StreamStats, resume_stream
from precopy.session.record import PageRecord
from precopy.session.report import MigrationReport, RoundReport
from precopy.session.scanner import DirtyScanner
from precopy.session.sender import PageSender
from precopy.session.switchover import Switchover
from precopy.session.throttle import Throttle
from precopy.workload.base import Workload

__all__ = ["PostcopySource", "offered_caps", "lane_ahead", "postcopy_modes", "postcopy_parts", "switch_over"]

_log = logging.getLogger(__name__)
#: COMPLETE's stats the report's ``postcopy`` section carries as they are: the faults whose page
#: was not sent yet (remote: fetched on REQUEST) and those whose page was in flight, apart.
_FAULT_KINDS = ("remote_faults", "remote_p50_us", "remote_p99_us", "remote_max_us", "inflight_p50_us",
                "inflight_p99_us", "inflight_max_us")


class _Session(Protocol):
    """What :func:`switch_over` takes of the source session (:class:`~precopy.session.source.SourceSession`)."""

    opts: SourceOptions
    workload: Workload
    exchange: Exchange
    mem: GuestMemory | None
    record: PageRecord
    scanner: DirtyScanner
    sender: PageSender
    tracker: UffdTracker | None
    chunks: SourceChunks | None
    throttle: Throttle
    model: DowntimeModel
    report: MigrationReport
    committer: Committer
    rounds: Any
    paused: bool
    chunk_pages: int
    _guardian: Guardian | None
    _cap: DowntimeCap | None
    _outer_pool: ThreadPoolExecutor
    _t_pause: float

    def _emit(self, phase: str, rnd: int, done: int, todo: int, dirty: int, t_start: float) -> None: ...

    async def _switchover(self, expected_s: float, dest_table: np.ndarray | None, pending: np.ndarray) -> None: ...

    async def _hand_over(self, expected_s: float) -> None: ...


def offered_caps(opts: SourceOptions) -> tuple[str, ...] | None:
    """What HELLO offers: post-copy when these options may end in it (None: nothing, the HELLO as before)."""
    if not postcopy_wanted(opts.postcopy, opts.on_nonconvergence) or opts.dry_run:
        return None
    lane = (POSTCOPY_LANE_CAP,) if opts.postcopy_lane else ()
    return (POSTCOPY_CAP, POSTCOPY_IMMEDIATE_CAP, *lane) if opts.postcopy == "immediate" else (POSTCOPY_CAP, *lane)


def lane_ahead(caps: tuple[str, ...] | None, chan: Channel) -> tuple[str, ...] | None:
    """Returns ``caps``; when they offer the fault lane and it would be served by a child process
    (``chan`` plain TCP, as the lane's will be: not TLS), that child is started now (its imports
    take ~0.5 s: precopy.session.postcopy_lane_proc)."""
    if caps is not None and POSTCOPY_LANE_CAP in caps and process_lane_ok(chan):
        prestart()
    return caps


def postcopy_modes(opts: SourceOptions, caps: tuple[str, ...]) -> tuple[str, str]:
    """The rounds' (--postcopy, --on-nonconvergence): as asked where the destination serves post-copy
    (HELLO_ACK ``caps``), else pre-copy's; ``--postcopy now`` without it raises (before the full copy)."""
    if offered_caps(opts) is None or POSTCOPY_CAP in caps:
        return opts.postcopy, opts.on_nonconvergence
    why = ("the destination does not serve post-copy (it needs a precopy-dest with --on-resume starting a "
           "guest that takes part: docs/TRACKING.md)")
    if opts.postcopy in ("now", "immediate"):
        raise PrecopyError(f"--postcopy {opts.postcopy}: {why}", AbortCode.GUEST)
    _log.warning("%s: pre-copy only", why)
    return "off", "abort"


async def switch_over(session: _Session, expected_s: float, dest_table: np.ndarray | None) -> None:
    """The session's switchover once its rounds end: pre-copy's, or post-copy's when they chose it."""
    rounds = session.rounds
    if not rounds.postcopy_chosen:
        await session._switchover(expected_s, dest_table, rounds.pending)
        return
    assert session.mem is not None
    await rounds.settled()
    session._emit("post-copy", len(session.report.rounds), 0, 0, 0, time.monotonic())
    pc, sw = postcopy_parts(session)
    await pc.run(sw, rounds.pending, dest_table, str(session.opts.memory))
    await session._hand_over(expected_s)


def postcopy_parts(session: _Session, find_missing: Callable[[], Awaitable[np.ndarray]] | None = None
                   ) -> tuple[PostcopySource, Switchover]:
    """The session's post-copy switchover and the pre-copy switchover steps it reuses (pause, device
    state).  ``find_missing``: what the destination lacks, found once paused, a per-page mask (None:
    the final scan)."""
    assert session.mem is not None
    opts = session.opts

    def paused(t: float) -> None:
        session.paused, session._t_pause = True, t

    pc = PostcopySource(
        exchange=session.exchange, mem=session.mem, record=session.record, scanner=session.scanner,
        tracker=session.tracker, report=session.report, committer=session.committer, guardian=session._guardian,
        begin=Begin(migration_id=str(opts.migration_id), name=str(opts.name), size=session.mem.size,
                    chunk_pages=session.chunk_pages),
        target=session.committer.target, on_paused=paused, find_missing=find_missing)
    sw = Switchover(
        workload=session.workload, guardian=session._guardian, throttle=session.throttle, exchange=session.exchange,
        scanner=session.scanner, sender=session.sender, record=session.record, model=session.model,
        committer=session.committer, report=session.report, cap=session._cap, npages=session.mem.npages,
        chunk_pages=session.chunk_pages, chunks=session.chunks, pool=session._outer_pool)
    return pc, sw


class PostcopySource:
    """One post-copy switchover and its page stream (see the module docstring)."""

    def __init__(self, *, exchange: Exchange, mem: GuestMemory, record: PageRecord, scanner: DirtyScanner,
                 tracker: UffdTracker | None, report: MigrationReport, committer: Committer,
                 guardian: Guardian | None, begin: Begin, target: OutcomeTarget,
                 on_paused: Callable[[float], None],
                 find_missing: Callable[[], Awaitable[np.ndarray]] | None = None) -> None:
        self.exchange = exchange
        self.mem = mem
        self.record = record
        self.scanner = scanner
        self.tracker = tracker
        self.report = report
        self.committer = committer
        self.guardian = guardian
        self.begin = begin
        self.target = target
        self.on_paused = on_paused
        #: What the destination lacks, found once paused, as a per-page mask of its own (``--postcopy
        #: immediate``: every page the source's file holds, precopy.session.postcopy_immediate);
        #: None: the final scan.
        self.find_missing = find_missing
        self.stats = StreamStats()
        self._readers: list[asyncio.Task[None]] = []
        self._lost = False  # the answer to POSTCOPY was lost (the outcome query said committed)
        self._lane_cap = (POSTCOPY_LANE_CAP,) if POSTCOPY_LANE_CAP in exchange.caps else ()  # offered, served

    async def run(self, sw: Switchover, pending: np.ndarray, dest_table: np.ndarray | None, memory: str) -> None:
        """Pause, switch over to post-copy, serve every missing page; returns once COMPLETE came.

        Raises :class:`PrecopyError` before the destination ran the workload
        (roll back), :class:`MigrationInDoubt` after it, when the page
        stream cannot be finished.
        """
        need = np.zeros(self.begin.npages, dtype=bool)
        need[pending] = True  # before the pause: what the last round decided on and did not send
        blob = await sw.pause()
        self.on_paused(sw.t_pause)
        await self.exchange.send(SwitchoverEvent())
        if self.find_missing is not None:
            need = await self.find_missing()
            sw._lap("holes")
        else:
            await self._missing(need, dest_table)
            sw._lap("final_scan")
        missing = int(np.count_nonzero(need))
        rnd = RoundReport(round=len(self.report.rounds), kind="postcopy", pages_scanned=self.begin.npages,
                          pages_dirty=missing, pages_sent=0, zero_pages=0, bytes_on_wire=0, seconds=0.0)
        bits = bitmap_of_mask(need)
        for off in range(0, len(bits), MAX_PAYLOAD):
            rnd.bytes_on_wire += await self.exchange.send(Missing(offset=off, total=len(bits),
                                                                  data=bits[off:off + MAX_PAYLOAD]))
        await sw.send_device_state(blob, rnd)
        done = await self._commit(blob, memory)
        t_run, cpu_run = time.monotonic(), time.process_time()
        sw.phases.update({f"dest_{k}": v for k, v in done.timings.items()} if done is not None else {})
        sw._lap("postcopy")
        self.report.downtime_ms = self.report.paused_ms = (t_run - sw.t_pause) * 1e3
        self.report.phases_ms = sw.phases
        _log.info("post-copy: the workload runs on the destination %.1f ms after the pause; %d pages to send",
                  self.report.downtime_ms, missing)
        try:
            await self._stream(need)
        finally:
            for task in self._readers:
                task.cancel()
        t_end, cpu_push = time.monotonic(), time.process_time() - cpu_run
        rnd.pages_sent = self.stats.pushed + self.stats.requested
        rnd.seconds = t_end - sw.t_pause
        rnd.bytes_on_wire += self.stats.bytes_on_wire
        self.report.rounds.append(rnd)
        self.report.pages_sent += rnd.pages_sent
        self.report.bytes_on_wire += rnd.bytes_on_wire
        got = self.stats.complete.stats if self.stats.complete is not None else {}
        self.report.postcopy = {
            "switchover_ms": self.report.downtime_ms, "pages_missing": missing,
            "pages_faulted": int(got.get("faults", 0)), "pages_pushed": self.stats.pushed,
            "pages_requested": self.stats.requested, "zero_faults": int(got.get("zero_faults", 0)),
            "fault_p50_us": got.get("fault_p50_us"), "fault_p99_us": got.get("fault_p99_us"),
            "fault_max_us": got.get("fault_max_us"), "last_page_s": t_end - sw.t_pause,
            **{k: got.get(k) for k in _FAULT_KINDS},
            "reconnects": self.stats.reconnects, "duplicates": int(got.get("duplicates", 0)),
            # CPU seconds each agent spent from COMMITTED to the last page (all its threads).
            "push_cpu_s": cpu_push + self.stats.extra.get("lane_cpu_s", 0.0), "dest_push_cpu_s": got.get("push_cpu_s"),
        }
        self.committer.confirmed = True

    async def _missing(self, need: np.ndarray, dest_table: np.ndarray | None) -> None:
        """Mark in ``need`` (the pending pages marked) what else the destination does not hold
        correctly, the workload paused."""
        if self.tracker is not None:
            # Here, not in a thread: nothing else runs during the pause, and waking the event loop
            # from a worker cost ~2-3 ms of the downtime on a busy machine.
            need[self.tracker.scan(self.record.sent, held_zero=self.record.held_zero, rearm=False)] = True
            return
        final = await self.scanner.scan(final=True, dest_table=dest_table, pending=np.flatnonzero(need))
        need[final.dirty] = True
        need[final.odd] = True

    async def _commit(self, blob: bytes, memory: str) -> Committed | None:
        """POSTCOPY and its COMMITTED; None when the answer was lost and the outcome says committed."""
        if self.guardian is not None:  # from here on a dead agent's guardian serves the pages
            self.guardian.postcopy({"memory": memory, "name": self.begin.name, "size": self.begin.size})
        self.committer.sent = self.committer.postcopy = True
        try:
            # A send that fails may have sent it or not: asked for as a lost answer is.
            await self.exchange.send(Postcopy(migration_id=self.begin.migration_id,
                                              checksum=xxhash.xxh3_64_intdigest(blob)))
            done: Committed = await self.exchange.expect(Committed)
        except PeerAborted as exc:
            self.committer.not_committed = True  # it records the abort before saying so
            if self.guardian is not None:
                self.guardian.declare(COMMIT)  # (the session's rollback declares it idle)
            raise PrecopyError(f"the destination refused post-copy: {exc}", exc.code) from exc
        except PrecopyError as exc:
            await self.committer.resolve(exc, self.exchange.chan, postcopy_answer=True)  # raises unless committed
            self._lost = True
            return None
        if done.migration_id != self.begin.migration_id or not done.resumed:
            raise MigrationInDoubt(f"the destination answered POSTCOPY for {done.migration_id!r} "
                                   f"(resumed: {done.resumed}); the workload is left PAUSED here", AbortCode.PROTOCOL)
        return done

    async def _stream(self, need: np.ndarray) -> None:
        """The page stream until COMPLETE, taken up again on a new connection when the link breaks."""
        stream = PageStream(self.mem, need, self.stats)
        exchange = self.exchange
        if self._lost:
            exchange = await self._reconnect(stream, PrecopyError("the answer to POSTCOPY was lost"))
        while True:
            try:
                if POSTCOPY_LANE_CAP in exchange.caps:  # the faults on a connection of their own
                    stream.lane = asyncio.ensure_future(run_source_lane(self.target, self.begin, stream))
                    stream.lane.add_done_callback(lambda _: stream._wake.set())
                await stream.run(exchange, self.target.io_timeout_s)
                return
            except (PrecopyError, OSError, TimeoutError) as exc:
                _log.warning("post-copy: the page stream broke (%s); taking it up again", describe(exc))
                if exchange.chan is not None:
                    exchange.chan.close()
                await stop_lane(stream.lane)
                stream.lane = None
                exchange = await self._reconnect(stream, exc)
            finally:
                await stop_lane(stream.lane)
                stream.close()

    async def _reconnect(self, stream: PageStream, cause: BaseException) -> Exchange:
        """RESUME on a new connection, ``outcome_retries`` attempts; else in doubt, loudly."""
        delay = 0.2
        last: BaseException = cause
        for attempt in range(max(self.target.retries, 1)):
            try:
                exchange, reader, need = await resume_stream(self.target, self.begin, self._lane_cap)
            except (PrecopyError, OSError, TimeoutError) as exc:
                last = exc
                _log.warning("post-copy: resume attempt %d failed: %s", attempt + 1, describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._readers.append(reader)
            self.stats.reconnects += 1
            stream.restart(need)
            _log.info("post-copy: resumed the page stream, %d pages still missing", int(need.sum()))
            return exchange
        raise MigrationInDoubt(
            f"post-copy of migration {self.begin.migration_id} is BROKEN: the page stream could not be taken up "
            f"again ({describe(last)}); the workload runs on the destination ({self.target.destination}) with "
            f"{int(stream.need.sum())} pages or more missing, and its guest waits on any it touches. This "
            "workload is left PAUSED here and holds them: do not resume or kill it (docs/FAILURES.md, "
            "\"Post-copy\").",
            AbortCode.LINK) from last

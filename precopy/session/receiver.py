"""One migration's receiving side: from READY to COMMITTED.

A :class:`Receiver` opens the region (``<memory-dir>/.<name>.<id>.partial``,
or the existing region under ``<name>`` renamed to that), writes the pages
received into it (:class:`~precopy.session.region_writer.RegionWriter`),
answers the source's digest requests from chunk digests it keeps fresh,
collects the device state, and on COMMIT:

1. checks the device state is complete and intact (and asks the
   workload adapter, if any, whether it can resume here),
2. writes ``<name>.device-state``,
3. persists the commit record (fsync'd journal entry naming both files),
4. renames the partial region to ``<name>``,
5. resumes the workload adapter (e.g. loads a QEMU VM's device state,
   waiting since BEGIN on the region file) and runs the on-resume hook,
6. confirms COMMITTED to the source.

Steps 2-4 are :meth:`Journal.commit <precopy.session.journal.Journal.commit>`.
Anything that ends a migration before step 3 removes its partial file: a
region file under its final name is always complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import xxhash

from precopy.errors import AbortCode, PrecopyError, RegionError, RemoteProtocolError
from precopy.memory.digest import ChunkTracker, chunk_pages_of, page_digests
from precopy.memory.region import GuestMemory, clear_exception_frames
from precopy.net.channel import Channel, LinkError
from precopy.policy.admission import Admission
from precopy.protocol import (
    POSTCOPY_CAP,
    POSTCOPY_IMMEDIATE_CAP,
    Begin,
    Commit,
    Committed,
    DeviceState,
    DigestRequest,
    DigestTable,
    Missing,
    Pages,
    Postcopy,
    Ready,
    Switchover,
    Sync,
)
from precopy.session.dest_options import DestOptions
from precopy.session.dest_streams import StreamHub, StreamRegistry
from precopy.session.journal import DEVICE_STATE_SUFFIX, Journal, MigrationRecord
from precopy.session.postcopy_dest import PostcopyDest
from precopy.session.postcopy_guest import HeldGuest
from precopy.session.region_writer import RegionWriter

__all__ = ["Receiver"]

_log = logging.getLogger(__name__)

#: Starts the on-resume hook: (record, region, device-state file).
RunHook = Callable[[MigrationRecord, Path, Path], Awaitable[None]]


class Receiver:
    """Receiving one region (see the module docstring).

    What it needs of its server is passed in: the settings, the journal,
    the admission (how many others move bytes here: contention, told to
    the source), the thread pools (``hash_pool`` for the digests,
    ``outer_pool`` for work off the event loop) and ``run_hook``.
    """

    def __init__(self, chan: Channel, begin: Begin, rec: MigrationRecord, existing: bool = False, *,
                 opts: DestOptions, journal: Journal, admission: Admission, hash_pool: ThreadPoolExecutor,
                 outer_pool: ThreadPoolExecutor, run_hook: RunHook, streams: StreamRegistry | None = None) -> None:
        #: Receive into the region file already under the final name (see
        #: DestinationServer._reusable): renamed to the partial name first.
        self.existing = existing
        self.opts = opts
        self.journal = journal
        self.admission = admission
        self.hash_pool = hash_pool
        self.outer_pool = outer_pool
        self.run_hook = run_hook
        self.chan = chan
        self.begin = begin
        self.rec = rec
        self.partial = self.opts.memory_dir / f".{begin.name}.{begin.migration_id}.partial"
        self.final = self.opts.memory_dir / begin.name
        assert self.opts.state_dir is not None
        self.device_state_path = self.opts.state_dir / f"{begin.name}{DEVICE_STATE_SUFFIX}"
        self.device = bytearray()
        self.device_total: int | None = None
        self._staging: asyncio.Future[None] | None = None  # the device state's file, written once complete
        self.t_switchover: float | None = None
        self.registry = streams
        #: The migration's extra streams (None: one connection).
        self.hub: StreamHub | None = None
        self.missing = bytearray()  # post-copy: the MISSING bitmap, as it comes
        self.held: HeldGuest | None = None  # post-copy's guest, started ahead (--postcopy-guest-early)

    def _others(self) -> int:
        """Other migrations moving bytes here now (told to the source: contention)."""
        return max(self.admission.active - 1, 0)

    def _open_region(self) -> GuestMemory:
        if self.existing:
            try:
                os.replace(self.final, self.partial)
                mem = GuestMemory.open(self.partial)
            except (OSError, RegionError) as exc:
                _log.warning("cannot take over %s (%s): receiving into a new region", self.final, exc)
                self.existing = False
            else:
                _log.info("migration %s: receiving into the existing region %s", self.begin.migration_id,
                          self.final)
                self.rec.reused_region = True
                return mem
        return GuestMemory.create(self.partial, self.begin.size, preallocate=False)

    async def run(self) -> None:
        mem = self._open_region()
        committed = False
        tracker: ChunkTracker | None = None
        try:
            if self.existing:
                # What it holds is hashed when first asked for, and only where
                # the migration has not overwritten whole chunks by then.
                tracker = ChunkTracker.unread(mem.view, self.begin.chunk_pages, self.hash_pool)
            else:
                tracker = ChunkTracker.zeroed(mem.view, self.begin.chunk_pages, self.hash_pool)
            if self.opts.workload is not None:
                await self.opts.workload.prepare(self.begin.migration_id, self.begin.name, self.partial,
                                                 self.begin.size)
            self.journal.write(self.rec)
            await self._start_held_guest()
            if self.held is not None and POSTCOPY_IMMEDIATE_CAP in self.chan.caps:
                await self.held.ready()  # --postcopy immediate pauses right after READY: the guest first
            self.hub = self.registry.open(self.begin) if self.registry is not None else None
            await self.chan.send(Ready(existing=self.existing, streams=self.hub.streams if self.hub else 1))
            _log.info("migration %s from %s: receiving %s (%d MiB)", self.begin.migration_id,
                      self.chan.peer, self.begin.name, self.begin.size >> 20)
            committed = await self._receive(mem, tracker)
        finally:
            if self.hub is not None and self.registry is not None:
                await asyncio.shield(self.registry.drop(self.hub))  # before the region goes
            if tracker is not None:
                tracker.close()
            clear_exception_frames(sys.exc_info()[1])  # their views of the region: see there
            mem.close()
            if not committed and self.opts.workload is not None:
                await asyncio.shield(self.opts.workload.discard(self.begin.migration_id))
            if not committed and self.held is not None:
                await asyncio.shield(self.held.stop())
            if not committed:
                if self._staging is not None:  # the device state's file written ahead goes too
                    await asyncio.shield(self._staged())
                    self.journal.staged_path(self.device_state_path).unlink(missing_ok=True)
                if self.opts.keep_partial:
                    _log.warning("kept partial region %s (--keep-partial)", self.partial)
                else:
                    self.partial.unlink(missing_ok=True)

    async def _start_held_guest(self) -> None:
        """--postcopy-guest-early: a migration that may end in post-copy starts its guest now, held."""
        if not (self.opts.postcopy_guest_early and POSTCOPY_CAP in self.chan.caps):
            return
        assert self.opts.state_dir is not None
        self.held = await HeldGuest.launch(self.run_hook, self.rec, self.partial, self.device_state_path,
                                           self.opts.state_dir, self.opts.postcopy_guest_timeout_s)

    async def _receive(self, mem: GuestMemory, tracker: ChunkTracker) -> bool:
        """Serve the migration's events until COMMIT (True, committed) or the end of the link."""
        writer = RegionWriter(mem, tracker, self.rec, existing=self.existing, populate=self.opts.populate,
                              chunk_pages=self.begin.chunk_pages)
        hashing = writer.hashing_sink()  # this stream's: hashes chunks as they land
        hub = self.hub
        if hashing is not None:
            sink = hub.guard(0, hashing[0]) if hub is not None else hashing[0]
            self.chan.conn.payload_sink, self.chan.conn.payload_progress = sink, hashing[1]
        if hub is not None:
            hub.start(writer.write_blocking, writer.hashing_sink)  # each extra stream its own, on its own thread
        try:
            async for ev in self.chan.events(self.opts.idle_timeout_s):
                if isinstance(ev, Pages):
                    if hub is not None:
                        hub.check_pages(0, ev.indices, ev.zeros)
                    await writer.write(ev)
                elif isinstance(ev, Sync):
                    assert hub is not None  # a SYNC needs READY's streams: the connection checked
                    await hub.synced(ev.counts)
                elif isinstance(ev, DigestRequest):
                    async with hub.quiet() if hub is not None else contextlib.nullcontext():
                        if ev.pages_of is not None:
                            await self._answer_pages_of(ev, mem, tracker)
                        else:
                            await self._answer_digests(ev, tracker, writer.written)
                elif isinstance(ev, Switchover):
                    self.t_switchover = time.monotonic()
                    _log.info("migration %s: source paused the workload", self.begin.migration_id)
                    writer.stop_populating()
                elif isinstance(ev, DeviceState):
                    self._device_state(ev)
                elif isinstance(ev, Missing):
                    self.missing += ev.data
                elif isinstance(ev, Postcopy):
                    await self._postcopy(ev, mem, tracker)
                    return True
                elif isinstance(ev, Commit):
                    _log.debug("migration %s: %d pages received straight into the region", self.begin.migration_id,
                               self.rec.pages_in_place)
                    if hub is not None:
                        await hub.close()  # all synced: nothing more is written
                    await self._commit(ev)
                    return True
                else:
                    raise RemoteProtocolError(f"unexpected {type(ev).__name__} during a migration")
            raise LinkError(f"{self.chan.peer} closed the connection mid-migration")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if hub is not None and hub.error is not None and task is not None and task.uncancel() == 0:
                raise hub.error from None  # an extra stream failed: the migration ends with its error
            raise
        finally:
            self.chan.conn.release_sink()  # it holds the region: not past the migration
            writer.release()

    async def _answer_pages_of(self, ev: DigestRequest, mem: GuestMemory, tracker: ChunkTracker) -> None:
        """The source's record of pages it sent without hashing them: their digests, by page."""
        assert ev.pages_of is not None
        pages = chunk_pages_of(ev.pages_of, self.begin.chunk_pages, mem.npages)
        if tracker.page_table is not None:
            # By page, every page's digest is kept as it landed
            # (read back from the region): no need to read them again.
            held = tracker.page_table[pages]
        else:
            held = await asyncio.get_running_loop().run_in_executor(self.outer_pool, page_digests, mem.pages, pages)
        await self.chan.send(DigestTable(seq=ev.seq, digests=held, others=self._others()))

    async def _answer_digests(self, ev: DigestRequest, tracker: ChunkTracker, written: np.ndarray) -> None:
        """A round's (or the final) digest table of every chunk, stale chunks rehashed first."""
        loop = asyncio.get_running_loop()
        if not ev.final:
            self.rec.rounds += 1
        t = time.monotonic()
        if ev.by_page and tracker.page_table is None:
            # From now on chunk digests derive from page digests;
            # pages never written in a fresh file read as zeros
            # unread (reading would allocate them).
            hashed = await loop.run_in_executor(self.outer_pool, tracker.by_page, written.copy())
            _log.debug("chunk tables by page for %s: %d pages hashed in %.1f ms", self.begin.migration_id,
                       hashed, (time.monotonic() - t) * 1e3)
        stale = int(tracker.stale.sum() + tracker.cold.sum())
        table = await loop.run_in_executor(self.outer_pool, tracker.table)
        _log.debug("digest table for %s: %d stale chunks rehashed in %.1f ms", self.begin.migration_id,
                   stale, (time.monotonic() - t) * 1e3)
        await self.chan.send(DigestTable(seq=ev.seq, digests=table, others=self._others()))

    def _device_state(self, ev: DeviceState) -> None:
        if ev.total > self.opts.max_device_state:
            raise RemoteProtocolError(
                f"device state of {ev.total} bytes exceeds this destination's limit "
                f"({self.opts.max_device_state})"
            )
        if self.device_total is not None and ev.total != self.device_total:
            raise RemoteProtocolError("DEVICE_STATE pieces disagree on the total size")
        if len(self.device) + len(ev.data) > ev.total:
            raise RemoteProtocolError(f"DEVICE_STATE pieces exceed their total of {ev.total} bytes")
        self.device_total = ev.total
        self.device += ev.data
        if len(self.device) != ev.total or self._staging is not None:
            return
        complete = getattr(self.opts.workload, "device_state_complete", None)
        if complete is None:
            return
        # E.g. CRIU restores from here on; and (no post-copy with such a
        # workload) the state's file is written meanwhile, in a thread: the
        # commit then only renames it.
        complete(self.begin.migration_id, self.partial, self.device)
        self._staging = asyncio.get_running_loop().run_in_executor(
            None, self.journal.stage, self.device, self.device_state_path)

    async def _staged(self) -> bool:
        """Whether the device state's file was written ahead (:meth:`Journal.stage`) and may be used."""
        staging, self._staging = self._staging, None
        if staging is None:
            return False
        try:
            await staging
        except OSError as exc:
            _log.warning("migration %s: the device state could not be written ahead (%s); writing it at "
                         "the commit", self.begin.migration_id, exc)
            return False
        return True

    def _check_device(self, ev: Commit | Postcopy) -> None:
        """The commit (or post-copy's) names this migration and the device state is whole and intact."""
        if ev.migration_id != self.begin.migration_id:
            raise RemoteProtocolError(f"{type(ev).__name__.upper()} names migration {ev.migration_id!r}")
        total = self.device_total or 0
        if len(self.device) != total:
            raise RemoteProtocolError(f"device state incomplete: {len(self.device)} of {total} bytes")
        if xxhash.xxh3_64_intdigest(self.device) != ev.checksum:
            raise RemoteProtocolError("device state checksum mismatch")

    async def _postcopy(self, ev: Postcopy, mem: GuestMemory, tracker: ChunkTracker) -> None:
        """Post-copy (:mod:`precopy.session.postcopy_dest`): the workload resumes here with pages missing."""
        self._check_device(ev)
        if len(self.missing) != -(-self.begin.npages // 8):
            raise RemoteProtocolError(f"POSTCOPY after {len(self.missing)} bytes of the MISSING bitmap")
        if self.opts.workload is not None or not self.opts.on_resume:
            raise PrecopyError("post-copy needs a guest the --on-resume hook starts (docs/TRACKING.md)",
                               AbortCode.GUEST)
        # No page may land in the region from the wire but through the placer.  The
        # chunk tracker and the prefault threads read and populate through our
        # mapping: harmless with MINOR faults (stopped after COMMITTED), but a read
        # of a punched hole would allocate it (stopped before punching).
        t0 = time.monotonic()
        self.chan.conn.release_sink()

        def quiesce() -> None:
            tracker.close()
            mem.prep.close()

        pc = PostcopyDest(self, self.missing, self.held, quiesce)
        try:
            timings = await pc.start(self.partial)
            timings["postcopy_stop"] = (time.monotonic() - t0) * 1e3 - sum(timings.values())
        except BaseException as exc:
            await asyncio.shield(pc.take_back(exc))
            raise
        self.chan.settled = True  # the workload runs here: nothing is rolled back any more
        if self.t_switchover is not None:
            self.rec.downtime_ms = (time.monotonic() - self.t_switchover) * 1e3
        await pc.serve(self.chan, timings)

    async def _commit(self, ev: Commit) -> None:
        self._check_device(ev)
        if self.opts.workload is not None:
            accept = getattr(self.opts.workload, "accept", None)
            if accept is not None:  # e.g. CRIU: restored (stopped) from the device state before the commit
                await accept(self.begin.migration_id, self.partial, self.device)
            await self.opts.workload.check(self.begin.migration_id)  # last chance to say no
        if self.held is not None:  # it maps the region under its partial name: before the rename
            await self.held.ready()
        self.journal.commit(self.rec, self.device, self.device_state_path, self.partial, self.final,
                            staged=await self._staged())
        self.chan.settled = True  # an ABORT from here on would tell the source to resume
        # Not even a cancellation (the daemon shutting down) may stop the
        # workload from resuming now, nor its source from being told: a
        # source left without COMMITTED while this daemon is gone would end
        # in doubt.  The confirmation is bounded by the send timeout.
        finish = asyncio.ensure_future(self._resume_and_confirm())
        cancelled = False
        while not finish.done():
            try:
                await asyncio.shield(finish)
            except asyncio.CancelledError:
                if not cancelled:
                    _log.warning("migration %s is committed: confirming it before shutting down",
                                 self.begin.migration_id)
                cancelled = True
        finish.result()
        if cancelled:
            raise asyncio.CancelledError()

    async def _resume_and_confirm(self) -> None:
        resumed, timings = True, {}
        if self.opts.workload is not None:
            try:
                timings = await self.opts.workload.resume(
                    self.begin.migration_id, self.final, self.device_state_path)
            except PrecopyError as exc:
                resumed = False
                _log.critical("migration %s is committed here but its workload did not resume: %s; "
                              "resume it by hand from %s and %s", self.begin.migration_id, exc,
                              self.final, self.device_state_path)
        if self.held is not None:  # started ahead for post-copy; pre-copy committed: it runs as it is
            try:
                await self.held.resume()
            except PrecopyError as exc:
                _log.critical("migration %s is committed here but its held guest did not resume: %s",
                              self.begin.migration_id, exc)
        else:
            await self.run_hook(self.rec, self.final, self.device_state_path)
        if self.t_switchover is not None:
            self.rec.downtime_ms = (time.monotonic() - self.t_switchover) * 1e3
        _log.info("migration %s committed: %s", self.begin.migration_id, self.final)
        # Confirm after the hook is spawned: the source measures downtime
        # up to this message, i.e. until the workload resumes here.
        try:
            await self.chan.send(Committed(migration_id=self.begin.migration_id, resumed=resumed,
                                           timings=timings))
        except PrecopyError as exc:
            _log.warning("could not confirm commit of %s (the source will ask): %s",
                         self.begin.migration_id, exc)

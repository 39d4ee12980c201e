"""Migrate any process with CRIU: the source side (``precopy-source --pid PID --criu``).

The process is paused, throttled and resumed with signals exactly as
:class:`~precopy.workload.signals.SignalWorkload` does, while precopy
pre-copies its region.  At the pause, :class:`CriuWorkload` starts
``criu dump --leave-stopped`` of the stopped process; the dump runs beside
the final pass and the verification (it never touches the region: CRIU
records that mapping by path and size) and its images become the device-state blob
(:mod:`precopy.workload.criu_images`).  The process offers no kernel write
tracking of its own, so :meth:`CriuWorkload.offer_tracking` makes a
userfaultfd inside it (:mod:`precopy.workload.inject`): the final pass then
reads the written pages from the kernel (milliseconds) instead of rehashing
the region; where that fails, digests.  Rollback is SIGCONT of the very
process, still there and stopped; after a commit it stays stopped (or is
killed with ``--on-commit kill``).

What the process must be (checked by :meth:`CriuWorkload.preflight`): the
init of its own PID namespace and a session leader (``precopy-guest run``
starts it so), mapping the region ``MAP_SHARED`` from a linked file (on
tmpfs: a region on disk would be flushed, not moved), its fds opened in its
own mount namespace.  CRIU runs inside the process's mount and network
namespaces (``nsenter``), so those are not dumped: they are the hosts'.
Established TCP connections are closed (``--tcp-close``): clients reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from precopy.errors import GuestControlError
from precopy.memory.tracking import TrackingOffer, TrackingUnavailable
from precopy.memory.uffd import uffd_api
from precopy.workload.criu import CriuTool, find_criu, process_facts, ram_dir
from precopy.workload.criu_rpc import DUMP, CriuWorker, encode_request
from precopy.workload.inject import take_userfaultfd
from precopy.workload.criu_images import pack_images, prefaulted
from precopy.protocol import MAX_DEVICE_STATE
from precopy.workload.signals import SignalWorkload

__all__ = ["CriuWorkload", "DUMP_ARGS", "criu_workload"]

_log = logging.getLogger(__name__)

#: The dump: leave the process stopped (rollback is SIGCONT), close its
#: established TCP connections on restore rather than freeze them.
DUMP_ARGS = ("--leave-stopped", "--tcp-close")
#: CRIU's fixed cost (seizing, kernel-feature probe, restore's forks) and
#: its cost per MiB of private memory dumped and restored (../shared/CRIU.md).
_FIXED_S = 0.05
_PER_MIB_S = 0.0008


class CriuWorkload(SignalWorkload):
    """A process checkpointed by CRIU at the switchover (see the module docstring)."""

    throttle_method = "sigstop"

    def __init__(self, pid: int, memory: Path, criu: CriuTool, *, work_dir: Path | None = None,
                 dump_timeout_s: float = 60.0, stop_timeout_s: float = 2.0) -> None:
        super().__init__(pid, stop_timeout_s=stop_timeout_s)
        self.memory = Path(os.path.abspath(memory))
        self.criu = criu
        #: Where the images are written and read back: RAM (/dev/shm) unless told otherwise.
        self.work_dir = work_dir or ram_dir()
        self.dump_timeout_s = dump_timeout_s
        self.phases_ms: dict[str, float] = {}
        self._dump: asyncio.Task[bytearray] | None = None
        self._images: Path | None = None
        self._worker: CriuWorker | None = None  # CRIU started ahead (criu_rpc), for the dump
        facts = process_facts(pid, self.memory)
        #: Expected dump + restore time, for the downtime estimate.
        self.switchover_cost_s = _FIXED_S + _PER_MIB_S * facts.private_kib / 1024

    def describe(self) -> str:
        return f"pid {self.pid} (SIGSTOP/SIGCONT, CRIU {self.criu.version_text})"

    def preflight(self) -> list[str]:
        """Check the process and CRIU before anything moves; returns what passed.

        Raises :class:`GuestControlError` saying what to change.
        """
        facts = process_facts(self.pid, self.memory)
        if facts.pid_in_ns != 1 or not facts.session_leader:
            raise GuestControlError(
                f"process {self.pid} is not the init of its own PID namespace and a session leader: "
                "CRIU could not restore it on another host; start it with 'precopy-guest run --memory "
                f"{self.memory} -- CMD' (unshare --pid --fork setsid)")
        if not facts.region_mapped_shared:
            raise GuestControlError(f"process {self.pid} does not map {self.memory} shared: CRIU would dump "
                                    "the region in full (or it is not the region of this process)")
        st = os.stat(self.memory)
        if st.st_nlink < 1:
            raise GuestControlError(f"{self.memory} is unlinked: CRIU would dump it in full")
        passed = [f"pid {self.pid}: PID-namespace init, session leader, maps {self.memory} shared",
                  f"CRIU {self.criu.version_text} at {self.criu.path}",
                  self.criu.check(self._nsenter()) + " (in the process's namespaces)"]
        return passed

    def start_worker(self) -> None:
        """Start CRIU now, in the process's namespaces, for the dump at the pause (:mod:`criu_rpc`).

        Where it cannot start, the dump runs ``criu dump`` as a command (and
        says why here).
        """
        if self._worker is not None and self._worker.alive:
            return
        try:
            self._worker = CriuWorker.start(self.criu.path, self._nsenter())
        except GuestControlError as exc:
            _log.warning("CRIU could not be started ahead (%s): the dump will start it at the pause", exc)

    def requirements(self) -> dict[str, list[str]]:
        """Checked by the destination's preflight: the same CRIU, at the same path."""
        return {"criu": [self.criu.path, self.criu.version_text]}

    def _nsenter(self) -> list[str]:
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise GuestControlError("nsenter is not installed (Debian: util-linux)")
        return [nsenter, "-t", str(self.pid), "-m", "-n", "--"]

    async def offer_tracking(self) -> TrackingOffer:
        """Kernel write tracking of the region: a userfaultfd made inside the process (ptrace, x86-64).

        The tracker keeps it registered through the dump: CRIU dumps such a
        mapping as a plain one (checked: the restored mapping carries no
        userfaultfd flags).  Raises :class:`GuestControlError` or
        :class:`TrackingUnavailable` (the migration then finds dirty pages
        by digests).
        """
        start, length = _mapping_of(self.pid, self.memory)
        # The process drops its page-table entries of the region first (the
        # data stays in the file): CRIU's smaps read at the dump then walks
        # only the pages touched since (~28 ms less for a 1 GiB item file).
        ours = await asyncio.to_thread(take_userfaultfd, self.pid, release=(start, length))
        try:
            uffd_api(ours)
        except BaseException:
            os.close(ours)
            raise
        return TrackingOffer(fd=ours, pid=self.pid, start=start, length=length)

    async def pause(self) -> bytes:
        """SIGSTOP (ending any throttle), then start the dump beside the final pass; returns b"".

        The images come from :meth:`device_state`.
        """
        blob = await super().pause()
        self.phases_ms = {}
        self._dump = asyncio.ensure_future(self._dump_images())
        return blob

    async def device_state(self) -> bytearray:
        """Wait for the dump started at the pause; returns the images as one blob.

        Raises :class:`GuestControlError` when the dump failed (the process is
        still there, stopped: rollback resumes it).
        """
        if self._dump is None:
            raise GuestControlError("no CRIU dump was started (the workload was not paused)")
        return await asyncio.shield(self._dump)

    async def _dump_images(self) -> bytearray:
        images = Path(tempfile.mkdtemp(prefix=f"precopy-criu-{self.pid}-", dir=self.work_dir))
        self._images = images
        log = images / "dump.log"
        # CRIU runs in the process's mount namespace: it reaches our
        # directory through our root, whatever that namespace mounts.
        seen_from_there = f"/proc/{os.getpid()}/root{images}"
        buffer = asyncio.ensure_future(asyncio.to_thread(self._pack_buffer))  # beside the dump
        try:
            worker, self._worker = self._worker, None
            if worker is not None and worker.alive:
                took, _ = await self.criu.request(
                    worker, encode_request(DUMP, images_dir=seen_from_there, log_file=log.name, pid=self.pid),
                    timeout_s=self.dump_timeout_s, log=log)
            else:
                took = await self.criu.run(
                    ["dump", "-t", str(self.pid), "-D", seen_from_there, *DUMP_ARGS, "-o", log.name, "-v2"],
                    timeout_s=self.dump_timeout_s, log=log, prefix=self._nsenter())
            self.phases_ms["criu_dump"] = round(took * 1e3, 3)
            t = time.monotonic()
            st = os.stat(self.memory)
            # In a thread: the event loop serves the final pass and the verification meanwhile.
            blob = await asyncio.to_thread(pack_images, images, region=str(self.memory), size=st.st_size,
                                           mode=stat.S_IMODE(st.st_mode), pid=self.pid,
                                           criu=self.criu.version_text, into=await buffer)
            self.phases_ms["criu_pack"] = round((time.monotonic() - t) * 1e3, 3)
            _log.info("criu dump of pid %d: %.1f ms, images %.1f MiB", self.pid, took * 1e3, len(blob) / 2**20)
            return blob
        finally:
            buffer.cancel()  # (a dump that failed: the buffer, made or not, is dropped)
            # In a thread (freeing the images' pages takes ~1 ms): the images go on the wire meanwhile.
            asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, images, True)

    def _pack_buffer(self) -> bytearray | None:
        """A prefaulted buffer for the images, sized from the process's private memory (what CRIU dumps)."""
        try:
            private = process_facts(self.pid, self.memory).private_kib * 1024
        except GuestControlError as exc:
            _log.debug("no buffer made ahead for the images: %s", exc)
            return None
        want = private + private // 8 + (1 << 20)  # the pages image, and the rest of the images
        return prefaulted(want) if want <= MAX_DEVICE_STATE else None

    async def _settle_dump(self) -> None:
        """Wait for a dump still running (never cut short: its parasite would stay in the process)."""
        dump, self._dump = self._dump, None
        if dump is not None and not dump.done():
            _log.info("waiting for the CRIU dump of pid %d to end before resuming it", self.pid)
        if dump is not None:
            try:
                await asyncio.shield(dump)
            except (GuestControlError, OSError) as exc:
                _log.warning("CRIU dump of pid %d failed: %s", self.pid, exc)

    async def resume(self) -> None:
        """Rollback: let the dump end, then SIGCONT (the dump leaves the process stopped)."""
        await self._settle_dump()
        await super().resume()

    async def stop(self) -> None:
        await self._settle_dump()
        self._let_worker_go()
        await super().stop()

    def _let_worker_go(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def _mapping_of(pid: int, region: Path) -> tuple[int, int]:
    """Start and length of ``pid``'s shared mapping of ``region`` (whole, from offset 0)."""
    st = os.stat(region)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 5 and p[1][3] == "s" and p[3] == want and int(p[4]) == st.st_ino and int(p[2], 16) == 0:
                lo, hi = (int(x, 16) for x in p[0].split("-"))
                if hi - lo == st.st_size:
                    return lo, hi - lo
    raise TrackingUnavailable(f"process {pid} does not map all of {region} shared from offset 0")


def criu_workload(pid: int, memory: Path, criu_bin: str | None = None) -> CriuWorkload:
    """The CRIU workload for ``precopy-source --pid PID --criu``, preflighted.

    Raises :class:`GuestControlError` saying what to install or change.
    """
    workload = CriuWorkload(pid, memory, find_criu(criu_bin))
    for line in workload.preflight():
        _log.info("criu preflight: %s", line)
    workload.start_worker()
    return workload

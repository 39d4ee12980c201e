"""Migrate any process with CRIU: the destination side (``precopy-dest --criu``).

As soon as the images are complete (:meth:`CriuDestination.device_state_complete`;
the source verified the region beside its dump, before sending them), and at the latest at COMMIT
(:meth:`CriuDestination.accept`, which waits for it) -- before anything is
committed:

1. unpacks the images (:mod:`precopy.workload.criu_images`, checked whole),
2. puts the received region at the path it had on the source (a hard link
   to the file being received, so the restored process maps the very inode
   that becomes the committed region; the path must be on the same file
   system as ``--memory-dir``, and not be the region's final name),
3. runs ``criu restore --restore-detached``: the process comes back
   stopped, as it was dumped.

A failed restore raises: the destination answers ABORT, the source resumes
its own process (exactly one owner), and :meth:`discard` removes what step
2 placed.  After the commit, :meth:`resume` sends the restored process
SIGCONT.  CRIU runs in this daemon's mount and network namespaces: the
restored process lives in them, its listening sockets bound here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from precopy.errors import AbortCode, GuestControlError, PrecopyError
from precopy.workload.base import process_state
from precopy.workload.criu import CriuTool, ram_dir
from precopy.workload.criu_rpc import RESTORE, CriuWorker, encode_request
from precopy.workload.criu_images import unpack_images

__all__ = ["CriuDestination", "RESTORE_ARGS"]

_log = logging.getLogger(__name__)

#: Detached (the restored root is re-parented), left stopped whatever state it
#: was dumped in (it must not run before the commit), connections restored closed.
RESTORE_ARGS = ("--restore-detached", "--leave-stopped", "--tcp-close")


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1e3, 3)


@dataclass
class _Restored:
    images: Path
    final: Path
    placed: Path | None = None  # the link we put at the region's source path
    inode: tuple[int, int] | None = None
    pid: int | None = None
    timings: dict[str, float] | None = None
    task: asyncio.Future[None] | None = None  # the restore, once started
    worker: CriuWorker | None = None  # CRIU started ahead, for the restore


class CriuDestination:
    """Restores each migration's process with CRIU before its commit (see the module docstring)."""

    def __init__(self, criu: CriuTool, *, work_dir: Path | None = None, restore_timeout_s: float = 60.0) -> None:
        self.criu = criu
        self.work_dir = work_dir or ram_dir()  # the images, unpacked: RAM unless told otherwise
        self.restore_timeout_s = restore_timeout_s
        self._check_line = criu.check()  # fails the daemon's start, not a migration
        self._live: dict[str, _Restored] = {}

    def requirement_checks(self) -> dict[str, Callable[[Sequence[str]], str]]:
        """The preflight's ``criu`` requirement: the same CRIU executable at the same path."""
        return {"criu": self._same_criu}

    def _same_criu(self, values: Sequence[str]) -> str:
        if len(values) != 2:
            raise PrecopyError("preflight: the criu requirement must name a path and a version", AbortCode.GUEST)
        path, version = values
        if path != self.criu.path or version != self.criu.version_text:
            raise PrecopyError(
                f"preflight: the source dumps with CRIU {version} at {path}, this destination restores with "
                f"CRIU {self.criu.version_text} at {self.criu.path}: install the same CRIU at the same path on "
                "both hosts ('make criu')", AbortCode.GUEST)
        return f"criu {version} at {path} ({self._check_line})"

    async def prepare(self, migration_id: str, name: str, region: Path, size: int) -> None:
        images = Path(tempfile.mkdtemp(prefix=f"precopy-criu-{migration_id}-", dir=self.work_dir))
        r = self._live[migration_id] = _Restored(images=images, final=region.parent / name)
        try:  # started now, it restores at once when the images are here (precopy.workload.criu_rpc)
            r.worker = CriuWorker.start(self.criu.path)
        except GuestControlError as exc:
            _log.warning("CRIU could not be started ahead (%s): the restore will start it", exc)

    def device_state_complete(self, migration_id: str, region: Path, blob: bytes | bytearray) -> None:
        """All the images are here: start the restore now, while COMMIT is on its way.

        (The restored process maps the region being received: pages a repair
        still writes land in the very pages it will see.)  Its outcome is
        :meth:`accept`'s, at COMMIT.
        """
        r = self._live.get(migration_id)
        if r is not None and r.task is None:
            r.task = asyncio.ensure_future(self._restore(r, migration_id, region, blob))

    async def accept(self, migration_id: str, region: Path, blob: bytes | bytearray) -> None:
        """At COMMIT: the restore (started when the images were complete, or now) must have worked.

        Raises :class:`GuestControlError` (the migration is then not committed).
        """
        r = self._live.get(migration_id)
        if r is None:
            raise GuestControlError(f"migration {migration_id} was not prepared for CRIU")
        if r.task is None:
            r.task = asyncio.ensure_future(self._restore(r, migration_id, region, blob))
        t = time.monotonic()
        await asyncio.shield(r.task)
        if r.timings is not None:
            r.timings["criu_wait"] = _ms(t, time.monotonic())

    async def _restore(self, r: _Restored, migration_id: str, region: Path, blob: bytes | bytearray) -> None:
        """Unpack, place the region, restore the process stopped; raises :class:`GuestControlError`."""
        t0 = time.monotonic()
        images = unpack_images(blob, r.images / "img")
        size = os.stat(region).st_size
        if images.size != size:
            raise GuestControlError(f"the images say the region is {images.size} bytes, {size} were received")
        try:
            os.chmod(region, images.mode)  # CRIU checks the mode of each file it maps
        except OSError as exc:
            raise GuestControlError(f"cannot give {region} mode {images.mode:o}: {exc.strerror}") from exc
        t1 = time.monotonic()
        self._place(r, region, Path(images.region))
        t2 = time.monotonic()
        r.pid = await self._run_restore(r)
        t3 = time.monotonic()
        r.timings = {"criu_unpack": _ms(t0, t1), "criu_place": _ms(t1, t2), "criu_restore": _ms(t2, t3)}
        _log.info("migration %s: restored pid %d (stopped) in %.1f ms", migration_id, r.pid, (t3 - t2) * 1e3)

    async def _run_restore(self, r: _Restored) -> int:
        """``criu restore`` (by the CRIU started ahead, else as a command); returns the restored pid."""
        log = r.images / "img" / "restore.log"
        worker, r.worker = r.worker, None
        if worker is not None and worker.alive:
            # (RPC restores detached, as --restore-detached)
            _, answer = await self.criu.request(
                worker, encode_request(RESTORE, images_dir=str(r.images / "img"), log_file=log.name),
                timeout_s=self.restore_timeout_s, log=log)
            if answer.pid is None or answer.pid <= 0:
                raise GuestControlError(f"criu restore answered no pid ({answer.pid})")
            return answer.pid
        pidfile = r.images / "restored.pid"
        await self.criu.run(["restore", "-D", str(r.images / "img"), *RESTORE_ARGS, "--pidfile", str(pidfile),
                             "-o", log.name, "-v2"], timeout_s=self.restore_timeout_s, log=log)
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise GuestControlError(f"criu restore wrote no pid file ({exc})") from exc

    @staticmethod
    def _place(r: _Restored, region: Path, path: Path) -> None:
        """A hard link to ``region`` at ``path``, replacing whatever is there (CRIU maps what it finds)."""
        if path == r.final:
            # (the commit's rename of the received file onto its own link would do nothing)
            raise GuestControlError(f"the region's path {path} is its final name in --memory-dir: give "
                                    "precopy-dest another --memory-dir on the same file system")
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.precopy")
        try:
            os.link(region, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise GuestControlError(
                f"cannot put the region at {path} ({exc.strerror}): on this host that path must be on the "
                f"same file system as --memory-dir ({region.parent})") from exc
        st = os.stat(path)
        r.placed, r.inode = path, (st.st_dev, st.st_ino)

    async def check(self, migration_id: str) -> None:
        r = self._live.get(migration_id)
        if r is None or r.pid is None:
            raise GuestControlError(f"no process was restored for migration {migration_id}")
        deadline = time.monotonic() + 2.0
        while (state := process_state(r.pid)) not in ("T", "t"):
            if time.monotonic() > deadline:
                raise GuestControlError(f"the restored process {r.pid} is not stopped (state {state})")
            await asyncio.sleep(0.001)

    async def resume(self, migration_id: str, memory: Path, device_state: Path) -> dict[str, float]:
        """Committed: SIGCONT the restored process; returns the CRIU timings (ms)."""
        r = self._live.pop(migration_id, None)
        if r is None or r.pid is None:
            raise GuestControlError(f"no process was restored for migration {migration_id}")
        t = time.monotonic()
        try:
            os.kill(r.pid, signal.SIGCONT)
        except ProcessLookupError:
            raise GuestControlError(f"the restored process {r.pid} is gone") from None
        finally:
            # The images go in a thread: no part of the downtime.
            asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, r.images, True)
        timings = dict(r.timings or {})
        timings["criu_continue"] = _ms(t, time.monotonic())
        _log.info("migration %s: process %d runs here", migration_id, r.pid)
        return timings

    async def discard(self, migration_id: str) -> None:
        """Not committed: kill a restored process, remove the placed link and the images."""
        r = self._live.pop(migration_id, None)
        if r is None:
            return
        if r.worker is not None:
            r.worker.close()
        if r.task is not None:  # a restore under way ends first: what it restores is killed below
            await asyncio.gather(r.task, return_exceptions=True)
        if r.pid is not None:
            try:
                os.kill(r.pid, signal.SIGKILL)
                _log.warning("migration %s not committed: killed the restored process %d", migration_id, r.pid)
            except ProcessLookupError:
                pass
        if r.placed is not None:
            try:
                st = os.stat(r.placed)
                if (st.st_dev, st.st_ino) == r.inode:
                    r.placed.unlink()
            except OSError as exc:
                _log.debug("the region link %s: %s", r.placed, exc)
        await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, r.images, True)

    async def close(self) -> None:
        for mid in list(self._live):
            await self.discard(mid)

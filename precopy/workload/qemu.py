"""Migrate a QEMU VM: its RAM is the region, its device state the blob.

The VM keeps its guest RAM in a shared file (``-object memory-backend-file,
id=ram0,size=...,mem-path=FILE,share=on -machine memory-backend=ram0``),
which precopy pre-copies while the VM runs.  With the ``x-ignore-shared``
migration capability, QEMU's own migration stream then carries only the
device state (CPU, devices, ROM blocks: ~320 KB whatever the RAM size).

* :class:`QemuWorkload` (source, ``precopy-source --qmp SOCKET``): ``pause``
  is QMP ``stop`` then ``migrate`` to ``exec:cat > FILE``, whose bytes become
  the device-state blob; ``resume`` (rollback) is ``cont``; ``stop`` is
  ``quit``.  :meth:`QemuWorkload.guardian_spec` lets the guardian process
  (precopy.session.guardian) do the same over QMP, and restore the VM's migration
  settings, if the agent is killed.
* :class:`QemuDestination` (destination, ``precopy-dest --qemu-cmd CMD``):
  when a migration begins it starts the destination QEMU with ``-incoming
  defer`` on the region file being received (starting QEMU costs ~0.1 s,
  kept out of the downtime); after the commit it runs ``migrate-incoming``
  from ``exec:cat DEVICE_STATE`` and ``cont``.  A migration that does not
  commit has its QEMU ended.

The destination QEMU maps the file precopy is receiving into: the commit
renames that file, so QEMU keeps the very inode that holds the committed
RAM.  (Attaching to a QEMU started earlier on another file cannot work:
its mapping would not see the received pages.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shlex
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precopy.errors import GuestControlError
from precopy.workload.qmp import Events, QemuMonitor, QMPError

__all__ = ["QemuWorkload", "QemuDestination", "check_dest_command"]

_log = logging.getLogger(__name__)

#: QEMU's max-bandwidth (128 MiB/s by default in 7.2) would slow the device-state save.
SAVE_BANDWIDTH = 64 << 30
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
#: The destination QEMU (ours) also tells when its load ends: MIGRATION events.
_DEST_CAPABILITIES = {"capabilities": [{"capability": "x-ignore-shared", "state": True},
                                       {"capability": "events", "state": True}]}


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1e3, 3)


async def _wait_migration(qmp: QemuMonitor, what: str, timeout_s: float, events: Events | None = None) -> None:
    """Poll ``query-migrate`` until ``completed``; raise on failed/cancelled/timeout.

    With ``events`` (QEMU's MIGRATION events, its ``events`` capability on)
    the wait between two polls ends when QEMU says its migration changed
    state, instead of after 1 ms: fewer round trips inside the downtime.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QMPError(f"QEMU's {what} {status}: {info.get('error-desc', 'no reason given')}")
        if loop.time() > deadline:
            raise QMPError(f"QEMU's {what} did not complete within {timeout_s} s (status {status!r})")
        if events is None:
            await asyncio.sleep(0.001)
        else:
            await events.next(0.05)  # nothing within 50 ms: ask again (a closed connection shows there)


class QemuWorkload:
    """The source VM, driven over its QMP socket."""

    def __init__(self, qmp_path: str | os.PathLike[str], *, memory: Path | None = None,
                 timeout_s: float = 10.0, state_dir: Path | None = None,
                 switchover_cost_s: float = 0.03) -> None:
        self.qmp = QemuMonitor(qmp_path, timeout_s=timeout_s)
        self.memory = memory
        self.timeout_s = timeout_s
        self.state_dir = state_dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
        #: Timings of the last pause: ``qemu_stop`` and ``qemu_save`` (ms).
        self.phases_ms: dict[str, float] = {}
        #: What the switchover adds to the downtime estimate: QEMU's stop and
        #: device-state save here, its load and cont on the destination
        #: (~10-25 ms and ~10-20 ms with QEMU 7.2 on a 2-core host).
        self.switchover_cost_s = switchover_cost_s
        self._was_running = True
        self._restore: list[tuple[str, dict[str, Any]]] = []
        self._quit = False
        # Our own prefix for the device-state save file, so that a guardian
        # can remove the file a killed agent leaves behind (and only that).
        self._state_prefix = f"precopy-qemu-state-{secrets.token_hex(6)}-"

    def describe(self) -> str:
        return f"QEMU VM (QMP {self.qmp.path})"

    async def connect(self) -> None:
        """Connect and check the VM can be migrated this way.

        Its RAM backend must be ``share=on`` (and be ``memory`` when given),
        else the RAM would go into the device state.  Sets ``x-ignore-shared``.
        Raises :class:`GuestControlError` with what to change.
        """
        await self.qmp.connect()
        status = await self.qmp.execute("query-status")
        self._was_running = bool(status.get("running"))
        if not self._was_running:
            _log.warning("the QEMU VM is not running (status %s): it will be migrated as it is",
                         status.get("status"))
        memdevs = await self.qmp.execute("query-memdev")
        if not isinstance(memdevs, list) or not memdevs:
            raise GuestControlError("this QEMU has no memory backend object: start it with "
                                    "-object memory-backend-file,id=ram0,...,share=on "
                                    "-machine memory-backend=ram0")
        ours = None
        for dev in memdevs:
            if self.memory is None:
                break
            path = await self.qmp.execute("qom-get", {"path": f"/objects/{dev.get('id')}",
                                                      "property": "mem-path"})
            if isinstance(path, str) and path and os.path.realpath(path) == os.path.realpath(self.memory):
                ours = dev
        if self.memory is not None and ours is None:
            raise GuestControlError(f"no memory backend of this QEMU maps {self.memory}: give the "
                                    "mem-path of its memory-backend-file as --memory")
        for dev in [ours] if ours is not None else memdevs:
            if not dev.get("share"):
                raise GuestControlError(
                    f"QEMU memory backend {dev.get('id')!r} is not share=on: precopy cannot see its "
                    "pages and QEMU would put all RAM into the device state; start QEMU with "
                    "memory-backend-file,...,share=on"
                )
        # Put the VM's own settings back in close(): left on, x-ignore-shared
        # would make a later ordinary QEMU migration of this VM skip its RAM.
        caps = await self.qmp.execute("query-migrate-capabilities")
        was = any(c.get("capability") == "x-ignore-shared" and c.get("state") for c in caps)
        params = await self.qmp.execute("query-migrate-parameters")
        self._restore = [
            ("migrate-set-capabilities",
             {"capabilities": [{"capability": "x-ignore-shared", "state": bool(was)}]}),
            ("migrate-set-parameters", {"max-bandwidth": int(params.get("max-bandwidth", 32 << 20))}),
        ]
        await self.qmp.execute("migrate-set-capabilities", _IGNORE_SHARED)
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": SAVE_BANDWIDTH})

    async def pause(self) -> bytes:
        if not self.qmp.connected:
            await self.connect()
        fd, name = tempfile.mkstemp(prefix=self._state_prefix, dir=self.state_dir)
        os.close(fd)
        t0 = time.monotonic()
        await self.qmp.execute("stop")
        t1 = time.monotonic()
        try:
            await self.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(name)}"})
            await _wait_migration(self.qmp, "device-state save", self.timeout_s)
            blob = Path(name).read_bytes()
        except (GuestControlError, OSError) as exc:
            if self._was_running:
                try:
                    await self.qmp.execute("cont")
                except QMPError as cexc:
                    _log.error("could not resume the VM after the failed save: %s", cexc)
            raise GuestControlError(f"saving the VM's device state failed (VM resumed): {exc}") from exc
        finally:
            os.unlink(name)
        t2 = time.monotonic()
        self.phases_ms = {"qemu_stop": _ms(t0, t1), "qemu_save": _ms(t1, t2)}
        if not blob:
            raise GuestControlError("QEMU saved an empty device state")
        return blob

    async def resume(self) -> None:
        # After a completed "migrate" the VM is "postmigrate"; cont runs it.
        if self._was_running:
            await self.qmp.execute("cont")

    def guardian_spec(self) -> dict[str, object]:
        """How a guardian process settles this VM (see precopy.session.guardian).

        Call it after :meth:`connect`: the settings to restore are recorded there.
        """
        state_dir = self.state_dir if self.state_dir is not None else Path(tempfile.gettempdir())
        return {"kind": "qmp", "path": str(self.qmp.path), "timeout": self.timeout_s,
                "was_running": self._was_running,
                "restore": [[cmd, args] for cmd, args in self._restore],
                "state_files": str(state_dir / self._state_prefix)}

    async def stop(self) -> None:
        self._quit = True
        await self.qmp.execute("quit")

    async def close(self) -> None:
        """Restore the VM's migration settings (unless it quit) and disconnect."""
        if self.qmp.connected and not self._quit:
            try:
                for cmd, args in self._restore:
                    await self.qmp.execute(cmd, args)
            except QMPError as exc:
                _log.error("could not restore the VM's migration settings (x-ignore-shared, "
                           "max-bandwidth): %s", exc)
        self._restore = []
        await self.qmp.close()


PLACEHOLDERS = ("{memory}", "{qmp}", "{size}", "{name}", "{migration_id}")


def check_dest_command(command: str) -> list[str]:
    """Split a destination QEMU command line; raise ValueError if unusable."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"--qemu-cmd cannot be split like a shell would: {exc}") from exc
    if not argv:
        raise ValueError("--qemu-cmd is empty")
    joined = " ".join(argv)
    for needed in ("{memory}", "{qmp}"):
        if needed not in joined:
            raise ValueError(f"--qemu-cmd must contain {needed} (see precopy-dest --help)")
    if "-incoming defer" not in joined:
        raise ValueError("--qemu-cmd must contain '-incoming defer'")
    return argv


@dataclass
class _DestVM:
    proc: asyncio.subprocess.Process
    qmp: QemuMonitor
    sock_dir: Path | None
    ready: asyncio.Task[None] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class QemuDestination:
    """Starts a destination QEMU per migration; resumes it after the commit.

    ``command`` is the QEMU command line (split like a shell would) with
    placeholders: ``{memory}`` the region file (its mem-path), ``{qmp}`` a
    QMP socket path, optionally ``{size}`` (bytes), ``{name}``,
    ``{migration_id}``.  It must contain ``-incoming defer``.
    """

    def __init__(self, command: str, *, timeout_s: float = 10.0, load_timeout_s: float = 60.0) -> None:
        self.argv = check_dest_command(command)
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self._vms: dict[str, _DestVM] = {}
        self._letting_go: set[asyncio.Task[None]] = set()

    async def prepare(self, migration_id: str, name: str, region: Path, size: int) -> None:
        """Start the destination QEMU on ``region`` (being received) with -incoming defer."""
        sock_dir = Path(tempfile.mkdtemp(prefix="precopy-qmp-"))
        qmp_path = sock_dir / "qmp.sock"
        subst = {"{memory}": str(region), "{qmp}": str(qmp_path), "{size}": str(size),
                 "{name}": name, "{migration_id}": migration_id}
        argv = []
        for arg in self.argv:
            for key, value in subst.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        try:
            # Its own session: the VM outlives this daemon and its signals.
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        start_new_session=True)
        except OSError as exc:
            os.rmdir(sock_dir)
            raise GuestControlError(f"cannot start the destination QEMU {argv[0]!r}: {exc}") from exc
        _log.info("migration %s: started destination QEMU (pid %d) on %s", migration_id, proc.pid, region)
        vm = _DestVM(proc, QemuMonitor(qmp_path, timeout_s=self.timeout_s), sock_dir)
        vm.ready = asyncio.create_task(self._attach(vm))
        self._vms[migration_id] = vm

    async def _attach(self, vm: _DestVM) -> None:
        await vm.qmp.connect(wait_s=self.timeout_s)
        await vm.qmp.execute("migrate-set-capabilities", _DEST_CAPABILITIES)

    async def _ready(self, migration_id: str, vm: _DestVM) -> None:
        assert vm.ready is not None
        waiter = asyncio.create_task(vm.proc.wait())
        done, _ = await asyncio.wait({vm.ready, waiter}, timeout=self.timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        # A QEMU that exited says more than the socket it never opened: on a slow
        # migration the attach gives up (socket missing) long before this is asked.
        if vm.proc.returncode is not None:
            vm.ready.cancel()
            raise GuestControlError(f"the destination QEMU for {migration_id} exited with status "
                                    f"{vm.proc.returncode} (see its messages above)")
        if vm.ready in done:
            vm.ready.result()  # raises QMPError if attaching failed
            return
        raise GuestControlError(f"the destination QEMU for {migration_id} did not open its QMP "
                                f"socket within {self.timeout_s} s")

    async def check(self, migration_id: str) -> None:
        """Raise :class:`GuestControlError` unless the destination QEMU waits, attached."""
        vm = self._vms.get(migration_id)
        if vm is None:
            raise GuestControlError(f"no destination QEMU was started for migration {migration_id}")
        await self._ready(migration_id, vm)

    async def resume(self, migration_id: str, memory: Path, device_state: Path) -> dict[str, float]:
        """Load the committed device state into the waiting QEMU and run it.

        Returns timings in ms: ``qemu_load`` (migrate-incoming until
        completed) and ``qemu_cont``.  Raises :class:`GuestControlError`.
        """
        vm = self._vms.get(migration_id)
        if vm is None:
            raise GuestControlError(f"no destination QEMU was started for migration {migration_id}")
        try:
            await self._ready(migration_id, vm)
            with vm.qmp.listen("MIGRATION") as events:
                t0 = time.monotonic()
                await vm.qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(device_state))}"})
                await _wait_migration(vm.qmp, "device-state load", self.load_timeout_s, events)
                t1 = time.monotonic()
            status = await vm.qmp.execute("query-status")
            if not status.get("running"):
                await vm.qmp.execute("cont")
            t2 = time.monotonic()
        except BaseException:
            # Committed: never kill it here (a QEMU whose load failed exits by itself).
            del self._vms[migration_id]
            await vm.qmp.close()
            raise
        del self._vms[migration_id]
        # Hanging up is no part of the downtime: a task beside the caller's COMMITTED.
        done = asyncio.create_task(self._let_go(vm))
        self._letting_go.add(done)
        done.add_done_callback(self._letting_go.discard)
        _log.info("migration %s: destination QEMU (pid %d) runs", migration_id, vm.proc.pid)
        return {"qemu_load": _ms(t0, t1), "qemu_cont": _ms(t1, t2)}

    async def _let_go(self, vm: _DestVM) -> None:
        """Disconnect from a destination QEMU that runs; remove precopy's socket."""
        await vm.qmp.close()
        self._remove_sock_dir(vm)

    async def discard(self, migration_id: str) -> None:
        """End the destination QEMU of a migration that will not commit."""
        vm = self._vms.pop(migration_id, None)
        if vm is None:
            return
        if vm.ready is not None:
            vm.ready.cancel()
            await asyncio.gather(vm.ready, return_exceptions=True)  # its error, if any, was reported
        await vm.qmp.close()
        if vm.proc.returncode is None:
            try:
                vm.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass  # it exited just now
            await vm.proc.wait()
        _log.info("migration %s: destination QEMU (pid %d) ended", migration_id, vm.proc.pid)
        self._remove_sock_dir(vm)

    @staticmethod
    def _remove_sock_dir(vm: _DestVM) -> None:
        if vm.sock_dir is not None:
            for p in vm.sock_dir.iterdir():
                p.unlink(missing_ok=True)
            vm.sock_dir.rmdir()
            vm.sock_dir = None

    async def close(self) -> None:
        """End every QEMU still waiting for a migration that did not commit;
        finish disconnecting from the ones that run."""
        for mid in list(self._vms):
            await self.discard(mid)
        await asyncio.gather(*self._letting_go)

    def pending(self) -> list[Any]:
        return list(self._vms)

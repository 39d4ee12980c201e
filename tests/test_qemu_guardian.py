"""The guardian and a QEMU VM: a killed ``precopy-source --qmp`` never strands the VM.

Real QEMU (the test guest of tests/test_qemu.py, 64 MiB), a real
``precopy-dest`` starting the destination QEMU, and the fault proxy to
SIGKILL the source agent at an exact point of the protocol.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from precopy.session import guardian
from precopy.workload.qemu import QemuWorkload
from precopy.qemuguest.vm import backend_argv, children, command_line, guest_argv, serial_ticks
from precopy.protocol import Kind

from .conftest import Procs, start_dest, wait_for
from .faultproxy import S2C, Fault, FaultProxy
from .test_qemu import kernel, qmp, start_vm, vms  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

MIB_VM = 64
#: Not QEMU's default (128 MiB/s) nor precopy's save bandwidth: its return proves the restore.
OWN_BANDWIDTH = 50 << 20


def settings(path: Path) -> tuple[bool, int]:
    """(x-ignore-shared, max-bandwidth) of the VM."""
    caps = {c["capability"]: c["state"] for c in qmp(path, "query-migrate-capabilities")}
    return caps["x-ignore-shared"], qmp(path, "query-migrate-parameters")["max-bandwidth"]


def dest_command(kernel: Path, serial: Path, monitor: Path) -> str:  # noqa: F811
    """The destination QEMU, with the test's own second QMP monitor."""
    return command_line([*guest_argv(kernel, MIB_VM, rate=2000, hot=4096), *backend_argv("{memory}", "{size}"),
                         "-serial", f"file:{serial}", "-qmp", "unix:{qmp},server=on,wait=off",
                         "-qmp", f"unix:{monitor},server=on,wait=off", "-incoming", "defer"])


def start_source(procs: Procs, shm: Path, proxy: FaultProxy, ram: Path, monitor: Path,
                 log: Path) -> subprocess.Popen[bytes]:
    return procs.start("-m", "precopy_agents.source_main", "--to", proxy.addr, "--memory", str(ram),
                       "--qmp", str(monitor), "--downtime-ms", "300", "--on-nonconvergence", "force",
                       "--migration-id", "m-qemu-kill", "--log-format", "json", "--progress", "off",
                       "--connect-timeout", "2", "--io-timeout", "5",
                       stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def end_dest_vms(dest_pid: int) -> None:
    for pid in children(dest_pid):  # a destination VM precopy-dest started
        os.kill(pid, signal.SIGKILL)


def test_source_sigkill_while_the_vm_is_paused_resumes_it(procs: Procs, shm: Path, kernel: Path,  # noqa: F811
                                                          vms: list[subprocess.Popen[bytes]]) -> None:  # noqa: F811
    """Killed with the VM stopped and its device state saved, before COMMIT: the guardian
    runs it again with QMP cont and puts its migration settings back; the destination
    ends its QEMU and removes the partial region."""
    ram = shm / "vm.ram"
    src = start_vm(vms, kernel, ram, shm, mib=MIB_VM)
    qmp(src.qmp, "migrate-set-parameters", {"max-bandwidth": OWN_BANDWIDTH})
    dest = start_dest(procs, shm, "--qemu-cmd", dest_command(kernel, shm / "dst.serial", shm / "dst.qmp"))
    log = shm / "source.log"
    paused_at: list[Any] = []

    def kill_source() -> None:
        paused_at.append(src.ticks()[-1])
        os.kill(source.pid, signal.SIGKILL)

    fault = Fault(action="kill", kind=Kind.DEVICE_STATE, callback=kill_source)
    try:
        with FaultProxy(("127.0.0.1", int(dest.addr.rsplit(":", 1)[1])), [fault]) as proxy:
            source = start_source(procs, shm, proxy, ram, src.qmp, log)
            assert source.wait(120) == -signal.SIGKILL, log.read_text()
            assert fault.fired.is_set()
            wait_for(lambda: "restored the VM's migration settings" in log.read_text(), timeout=30,
                     what=f"the guardian to settle the VM: {log.read_text()}")
        text = log.read_text()
        assert "died before sending COMMIT" in text and "QMP cont" in text, text
        assert qmp(src.qmp, "query-status")["running"] is True
        wait_for(lambda: src.ticks()[-1].tick >= paused_at[0].tick + 4, timeout=30,
                 what="the guest to go on on the source")
        after = src.ticks()[-1]
        assert after.writes > paused_at[0].writes and after.bad == 0
        assert settings(src.qmp) == (False, OWN_BANDWIDTH)
        # The destination saw the link close: its QEMU is ended, nothing committed.
        wait_for(lambda: not children(dest.proc.pid), timeout=30, what="the destination QEMU to be ended")
        wait_for(lambda: not list(dest.memory_dir.glob(".*.partial")), timeout=30,
                 what="the destination to remove the partial region")
        assert not (dest.memory_dir / "vm.ram").exists()
    finally:
        end_dest_vms(dest.proc.pid)


def test_source_sigkill_after_the_destination_committed_leaves_the_vm_paused(
        procs: Procs, shm: Path, kernel: Path, vms: list[subprocess.Popen[bytes]]) -> None:  # noqa: F811
    """Killed after the destination committed (COMMITTED never arrives): the guardian asks,
    learns 'committed', leaves the source VM paused (settings restored); the destination VM runs."""
    ram = shm / "vm.ram"
    src = start_vm(vms, kernel, ram, shm, mib=MIB_VM)
    qmp(src.qmp, "migrate-set-parameters", {"max-bandwidth": OWN_BANDWIDTH})
    dst_serial, dst_qmp = shm / "dst.serial", shm / "dst.qmp"
    dest = start_dest(procs, shm, "--qemu-cmd", dest_command(kernel, dst_serial, dst_qmp))
    log = shm / "source.log"
    fault = Fault(action="kill", kind=Kind.COMMITTED, direction=S2C,
                  callback=lambda: os.kill(source.pid, signal.SIGKILL))
    try:
        with FaultProxy(("127.0.0.1", int(dest.addr.rsplit(":", 1)[1])), [fault]) as proxy:
            source = start_source(procs, shm, proxy, ram, src.qmp, log)
            assert source.wait(120) == -signal.SIGKILL, log.read_text()
            assert fault.fired.is_set()
            # The guardian asks through the proxy (a new connection: not faulted).
            wait_for(lambda: "restored the VM's migration settings" in log.read_text(), timeout=60,
                     what=f"the guardian to settle the VM: {log.read_text()}")
        text = log.read_text()
        assert "migration m-qemu-kill committed" in text and "stays paused" in text, text
        assert "resuming" not in text, text
        assert qmp(src.qmp, "query-status")["status"] == "postmigrate"
        assert settings(src.qmp) == (False, OWN_BANDWIDTH)
        last_src = src.ticks()[-1]
        # The guest goes on on the destination, from where the source stopped.
        assert qmp(dst_qmp, "query-status")["running"] is True
        wait_for(lambda: len(serial_ticks(dst_serial)) >= 3, timeout=30, what="the destination guest to tick")
        dticks = serial_ticks(dst_serial)
        assert dticks[0].tick > last_src.tick and dticks[-1].writes > last_src.writes
        assert all(t.bad == 0 for t in dticks), dticks
        assert src.ticks()[-1] == last_src  # still paused
        assert (dest.memory_dir / "vm.ram").exists()
    finally:
        end_dest_vms(dest.proc.pid)


def test_guardian_cancels_a_save_in_flight_and_resumes(shm: Path, kernel: Path,  # noqa: F811
                                                       vms: list[subprocess.Popen[bytes]],  # noqa: F811
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The agent died during QEMU's device-state save (here: blocked on a FIFO nobody reads):
    the guardian cancels the save, runs the VM at once, restores the settings once the save
    has ended, and removes the agent's save file."""
    ram = shm / "vm.ram"
    src = start_vm(vms, kernel, ram, shm, mib=MIB_VM)
    qmp(src.qmp, "migrate-set-parameters", {"max-bandwidth": OWN_BANDWIDTH})
    fifo = shm / "save.fifo"
    os.mkfifo(fifo)

    async def agent_dies_mid_save() -> dict[str, Any]:
        wl = QemuWorkload(src.qmp, memory=ram, state_dir=shm)
        await wl.connect()  # sets x-ignore-shared and precopy's bandwidth
        spec = wl.guardian_spec()
        await wl.qmp.execute("stop")
        await wl.qmp.execute("migrate", {"uri": f"exec:cat > {fifo}"})
        for _ in range(500):
            if (await wl.qmp.execute("query-migrate"))["status"] == "active":
                break
            await asyncio.sleep(0.01)
        await wl.qmp.close()  # what the agent's death does: no restore
        return spec

    spec = asyncio.run(agent_dies_mid_save())
    leftover = Path(str(spec["state_files"]) + "x1y2z3")
    leftover.write_bytes(b"half a device state")
    before = src.ticks()[-1]
    result: list[int] = []
    caplog.set_level(logging.INFO, logger="precopy-guardian")
    t = threading.Thread(target=lambda: result.append(guardian._on_agent_death(guardian.ARMED, {"workload": spec})))
    t.start()
    try:
        # The VM runs while the cancelled save still hangs on the FIFO.
        wait_for(lambda: src.ticks()[-1].tick >= before.tick + 2, timeout=30, what="the guest to run again")
        assert t.is_alive()
        assert "cancelling it" in caplog.text
    finally:
        with open(fifo, "rb") as f:  # let the save end: cat gets its output
            f.read()
        t.join(30)
    assert result == [0], caplog.text
    assert qmp(src.qmp, "query-migrate")["status"] == "cancelled"
    assert qmp(src.qmp, "query-status")["running"] is True
    assert settings(src.qmp) == (False, OWN_BANDWIDTH)
    assert not leftover.exists()
    time.sleep(0.5)
    assert src.ticks()[-1].bad == 0

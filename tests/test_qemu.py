"""A real VM: QEMU guest RAM on a shared file, migrated live by precopy.

The guest is our own multiboot kernel (precopy/qemuguest), built here with
gcc: it fills its 256 MiB, keeps rewriting pages, verifies every page
against a version table and prints its progress on the serial port.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from precopy.session.destination import DestinationServer, DestOptions
from precopy.errors import MigrationAborted
from precopy.workload.qemu import QemuDestination, QemuWorkload
from precopy.qemuguest import BuildError, build
from precopy.qemuguest.vm import backend_argv, children, command_line, compare_ram, guest_argv, serial_ticks
from precopy.workload.qmp import QemuMonitor
from precopy.session.source import SourceOptions, migrate

from .conftest import Procs, run_source, start_dest, wait_for

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86; .ci/run does)")
    try:
        return build(tmp_path_factory.mktemp("qemuguest") / "guest.elf")
    except BuildError as exc:
        pytest.skip(f"cannot build the test guest: {exc}")


class VM:
    """A QEMU process we started; killed by PID at teardown."""

    def __init__(self, proc: subprocess.Popen[bytes], serial: Path, qmp: Path) -> None:
        self.proc, self.serial, self.qmp = proc, serial, qmp

    def ticks(self):  # type: ignore[no-untyped-def]
        return serial_ticks(self.serial)


@pytest.fixture
def vms() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def start_vm(vms: list[subprocess.Popen[bytes]], kernel: Path, ram: Path, d: Path, *, mib: int = 256,
             rate: int = 2000, hot: int = 4096) -> VM:
    serial, qmp, log = d / "src.serial", d / "src.qmp", d / "src-qemu.log"
    argv = [*guest_argv(kernel, mib, rate=rate, hot=hot), *backend_argv(str(ram), f"{mib}M"),
            "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    vms.append(p)
    vm = VM(p, serial, qmp)
    wait_for(lambda: len(vm.ticks()) >= 2 or p.poll() is not None, timeout=60, what="the guest to boot")
    assert p.poll() is None, f"QEMU exited: {log.read_text()}"
    return vm


def qmp(path: Path, command: str, arguments: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
    async def run():  # type: ignore[no-untyped-def]
        c = QemuMonitor(path, timeout_s=10)
        await c.connect()
        try:
            return await c.execute(command, arguments)
        finally:
            await c.close()
    return asyncio.run(run())


def test_live_migration_of_a_qemu_vm(procs: Procs, shm: Path, kernel: Path,
                                     vms: list[subprocess.Popen[bytes]]) -> None:
    ram = shm / "vm.ram"
    src = start_vm(vms, kernel, ram, shm)
    dst_serial, dst_qmp = shm / "dst.serial", shm / "dst.qmp"
    # The test's own second QMP monitor on the destination VM: precopy uses {qmp}.
    qemu_cmd = command_line([*guest_argv(kernel, 256, rate=2000, hot=4096),
                             *backend_argv("{memory}", "{size}"),
                             "-serial", f"file:{dst_serial}", "-qmp", "unix:{qmp},server=on,wait=off",
                             "-qmp", f"unix:{dst_qmp},server=on,wait=off", "-incoming", "defer"])
    dest = start_dest(procs, shm, "--state-dir", str(shm / "state"), "--qemu-cmd", qemu_cmd)
    try:
        rc, rep, out = run_source(shm, "--to", dest.addr, "--memory", str(ram), "--qmp", str(src.qmp),
                                  "--downtime-ms", "300", "--on-nonconvergence", "force")
        assert rc == 0, out + dest.log_text()
        assert rep is not None and rep["outcome"] == "committed"
        # Only device state went through QEMU's stream: RAM was pre-copied.
        assert 0 < rep["device_state_bytes"] < 4 * MIB
        assert rep["verify_repairs"] == 0
        ph = rep["phases_ms"]
        for key in ("qemu_stop", "qemu_save", "final_scan", "device_state", "dest_qemu_load", "commit"):
            assert key in ph, key
        assert "downtime split (ms)" in out and "dest_qemu_load" in out
        assert qmp(dst_qmp, "query-status")["running"] is True

        # The source VM stays paused for good (keep-stopped) ...
        assert qmp(src.qmp, "query-status")["status"] == "postmigrate"
        last_src = src.ticks()[-1]
        # ... and the guest runs on the destination: its clock and counters go on,
        # and it verifies every page of its RAM (two full sweeps) without a bad one.
        wait_for(lambda: len(serial_ticks(dst_serial)) >= 2
                 and serial_ticks(dst_serial)[-1].sweeps >= serial_ticks(dst_serial)[0].sweeps + 2,
                 timeout=60, what="the guest on the destination to sweep its RAM twice")
        dticks = serial_ticks(dst_serial)
        assert dticks[0].tick > last_src.tick and dticks[0].writes > last_src.writes
        assert all(t.bad == 0 for t in dticks), dticks
        assert b"BAD" not in dst_serial.read_bytes()

        # RAM: pause the destination and compare it with the paused source.
        qmp(dst_qmp, "stop")
        cmp = compare_ram(ram, dest.memory_dir / "vm.ram", 256 * MIB)
        assert cmp.pages_older == 0 and cmp.differing_same_version == 0, cmp
        assert cmp.low_mib_equal, cmp
        assert cmp.source_inconsistent <= 1, cmp  # a page the source was rewriting at the pause
        assert cmp.dest_in_flight <= 1, cmp  # ... and one the destination was rewriting at the stop
        assert cmp.pages_same_version > 50_000, cmp  # nearly all: most pages are never rewritten
        assert not list(dest.memory_dir.glob(".*.partial"))
        journal = json.loads(next((shm / "state" / ".precopy" / "journal").glob("*.json")).read_text())
        assert journal["outcome"] == "committed"
    finally:
        for pid in children(dest.proc.pid):  # the destination VM precopy-dest started
            os.kill(pid, signal.SIGKILL)


def test_rollback_before_commit_resumes_the_source_vm(shm: Path, kernel: Path,
                                                      vms: list[subprocess.Popen[bytes]]) -> None:
    """The destination refuses the device state after the source paused: `cont` on the source,
    the destination's QEMU is ended, the guest goes on where it was."""
    ram = shm / "vm.ram"
    src = start_vm(vms, kernel, ram, shm)
    dst_serial = shm / "dst.serial"
    cmd = command_line([*guest_argv(kernel, 256, rate=2000, hot=4096), *backend_argv("{memory}", "{size}"),
                        "-serial", f"file:{dst_serial}", "-qmp", "unix:{qmp},server=on,wait=off",
                        "-incoming", "defer"])

    async def run() -> tuple[MigrationAborted, QemuDestination]:
        qdest = QemuDestination(cmd)
        server = DestinationServer(DestOptions(memory_dir=shm / "dest", port=0, workload=qdest,
                                               max_device_state=1000))  # QEMU's is ~320 KB: refused
        await server.start()
        serving = asyncio.create_task(server.serve_forever())
        c = QemuMonitor(src.qmp)
        await c.connect()
        bandwidth_before = (await c.execute("query-migrate-parameters"))["max-bandwidth"]
        await c.close()
        wl = QemuWorkload(src.qmp, memory=ram)
        await wl.connect()
        try:
            with pytest.raises(MigrationAborted) as info:
                await migrate(SourceOptions(host="127.0.0.1", port=server.port, memory=ram,
                                            downtime_ms=300, on_nonconvergence="force"), wl)
            assert (await wl.qmp.execute("query-status"))["running"] is True
        finally:
            await wl.close()
            await server.close()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        # The VM's own migration settings are back: a later ordinary
        # migration of it must not skip its (shared) RAM.
        c = QemuMonitor(src.qmp)
        await c.connect()
        caps = {x["capability"]: x["state"] for x in await c.execute("query-migrate-capabilities")}
        assert caps["x-ignore-shared"] is False
        assert (await c.execute("query-migrate-parameters"))["max-bandwidth"] == bandwidth_before
        await c.close()
        return info.value, qdest

    before = src.ticks()[-1]
    exc, qdest = asyncio.run(run())
    assert "device state" in str(exc)
    assert qdest.pending() == []  # its QEMU was ended
    assert not list((shm / "dest").glob(".*.partial"))
    wait_for(lambda: src.ticks()[-1].tick >= before.tick + 4, timeout=30, what="the source guest to go on")
    after = src.ticks()[-1]
    assert after.writes > before.writes and after.bad == 0
    assert dst_serial.read_bytes() == b"" if dst_serial.exists() else True


def test_source_refuses_a_vm_whose_ram_is_not_shared(shm: Path, kernel: Path,
                                                     vms: list[subprocess.Popen[bytes]]) -> None:
    ram = shm / "vm.ram"
    serial, qmp_path = shm / "s.serial", shm / "s.qmp"
    p = subprocess.Popen([*guest_argv(kernel, 64, rate=100, hot=16), *backend_argv(str(ram), "64M", share=False),
                          "-serial", f"file:{serial}", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vms.append(p)
    wait_for(qmp_path.exists, timeout=30, what="the QMP socket")
    rc, rep, out = run_source(shm, "--to", "127.0.0.1:9", "--memory", str(ram), "--qmp", str(qmp_path))
    assert rc == 2, out
    assert "share=on" in out
    rc, rep, out = run_source(shm, "--to", "127.0.0.1:9", "--memory", str(shm / "other"), "--qmp", str(qmp_path))
    assert rc == 2 and "does not exist" in out, out
    assert p.poll() is None  # the VM was left alone, running
    assert qmp(qmp_path, "query-status")["running"] is True


def test_destination_qemu_that_cannot_start_rolls_back(procs: Procs, shm: Path, kernel: Path,
                                                       vms: list[subprocess.Popen[bytes]]) -> None:
    """The destination QEMU exits at start (a bad option): COMMIT is refused before anything is
    committed, the source VM is resumed with cont (exit 3) and keeps running."""
    ram = shm / "vm.ram"
    src = start_vm(vms, kernel, ram, shm)
    cmd = command_line([*guest_argv(kernel, 256, rate=2000, hot=4096), *backend_argv("{memory}", "{size}"),
                        "-qmp", "unix:{qmp},server=on,wait=off", "-incoming", "defer", "-no-such-option"])
    dest = start_dest(procs, shm, "--qemu-cmd", cmd)
    rc, rep, out = run_source(shm, "--to", dest.addr, "--memory", str(ram), "--qmp", str(src.qmp),
                              "--downtime-ms", "300", "--on-nonconvergence", "force")
    assert rc == 3, out
    assert rep is not None and rep["outcome"] == "aborted"
    assert "destination QEMU" in out and "exited with status" in out, out
    assert qmp(src.qmp, "query-status")["running"] is True
    before = src.ticks()[-1]
    wait_for(lambda: src.ticks()[-1].tick >= before.tick + 2, timeout=30, what="the source guest to go on")
    assert src.ticks()[-1].bad == 0
    assert not (dest.memory_dir / "vm.ram").exists()
    assert not list(dest.memory_dir.glob(".*.partial"))

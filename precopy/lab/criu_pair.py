"""A memcached moved with CRIU between two network namespaces: the lab behind the proof and the benchmark.

:class:`CriuPair` makes two "hosts" (:class:`~precopy.lab.netns.TwoHosts`),
a service address (``VIP``) on the source host's loopback, memcached
started there by ``precopy-guest run`` with its item memory in
``/dev/shm/NAME.cache``, and ``precopy-dest --criu`` on the destination
host, in a mount namespace of its own with a private tmpfs on ``/dev/shm``
(so the path the region has on the source is free there, as on another
machine).  :meth:`CriuPair.migrate` runs ``precopy-source --criu``;
:meth:`CriuPair.move_address` moves the service address to the destination
host (the source host then routes it over the link).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from precopy.lab.netns import TwoHosts, unavailable_reason
from precopy.workload.criu import find_criu

__all__ = ["CriuPair", "VIP", "unavailable"]

#: The service address (inside the two namespaces only: it collides with nothing outside).
VIP = "10.99.99.1"


def unavailable() -> str | None:
    """Why the pair cannot be made here (and the command that fixes it), or None."""
    reason = unavailable_reason()
    if reason:
        return reason
    for tool, pkg in (("memcached", "memcached"), ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: apt-get install {pkg}"
    try:
        find_criu()
    except Exception as exc:  # noqa: BLE001 - any reason CRIU cannot run is a reason to skip, said whole
        return f"{exc} -- run 'make criu'"
    return None


class CriuPair:
    """See the module docstring.  A context manager; everything it made goes in :meth:`down`."""

    def __init__(self, name: str, *, cache_mib: int = 64, dest_shm_mib: int | None = None,
                 run_tmpfs: bool = True) -> None:
        self.hosts = TwoHosts(name, rate=None)
        self.name = name
        self.cache_mib = cache_mib
        #: Give each host a tmpfs /run (as systemd hosts have): CRIU keeps its kernel probe there.
        self.run_mount = "mount -t tmpfs -o size=16m precopy-run /run && " if run_tmpfs else ""
        self.dest_shm_mib = dest_shm_mib or 3 * cache_mib + 256
        self.region = Path(f"/dev/shm/{name}.cache")
        self.tmp = Path(tempfile.mkdtemp(prefix=f"precopy-{name}-"))
        self.pid: int | None = None
        self.port: int | None = None
        self._dest: subprocess.Popen[bytes] | None = None

    def _py(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]

    def up(self, memcached_args: tuple[str, ...] = ()) -> CriuPair:
        self.down()
        self.tmp.mkdir(exist_ok=True)
        self.hosts.up()
        try:
            subprocess.run(["ip", "-n", self.hosts.src_ns, "addr", "add", f"{VIP}/32", "dev", "lo"], check=True)
            self._start_dest()
            self._start_memcached(memcached_args)
        except BaseException:
            self.down()
            raise
        return self

    def _start_dest(self) -> None:
        ready = self.tmp / "dest.ready"
        script = (f"{self.run_mount}mount -t tmpfs -o size={self.dest_shm_mib}m precopy-{self.name} /dev/shm && "
                  "mkdir -p /dev/shm/precopy-in && exec " + shlex.join(self._py(
                      "precopy_agents.dest_main", "--listen", f"{self.hosts.dst_ip}:0", "--memory-dir",
                      "/dev/shm/precopy-in", "--criu", "--insecure", "--ready-file", str(ready),
                      "--log-level", "info")))
        log = open(self.tmp / "dest.log", "ab")
        self._dest = subprocess.Popen(["ip", "netns", "exec", self.hosts.dst_ns, "sh", "-c", script],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
        log.close()
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text().strip():
            if self._dest.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"precopy-dest did not start: {self.dest_log()[-2000:]}")
            time.sleep(0.05)
        self.port = int(ready.read_text().strip().rsplit(":", 1)[1])

    def _start_memcached(self, extra: tuple[str, ...]) -> None:
        self.region.unlink(missing_ok=True)
        launch = self._py("precopy.guest", "run", "--memory", str(self.region), "--wait", "60", "--",
                          shutil.which("memcached") or "memcached", "-u", "root", "-l", "0.0.0.0", "-m",
                          str(self.cache_mib), "-e", str(self.region), *extra)
        cmd = ["ip", "netns", "exec", self.hosts.src_ns, "sh", "-c", self.run_mount + 'exec "$@"', "sh", *launch]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"precopy-guest run failed: {out.stderr.strip()}")
        self.pid = int(out.stdout.split()[-1])

    @property
    def dest_pid(self) -> int | None:
        """precopy-dest's PID (``ip netns exec`` and ``sh -c`` exec it: the very process started)."""
        return self._dest.pid if self._dest is not None and self._dest.poll() is None else None

    def dest_log(self) -> str:
        try:
            return (self.tmp / "dest.log").read_text(errors="replace")
        except OSError:
            return ""

    def migrate(self, *args: str, timeout_s: float = 300.0) -> tuple[int, dict[str, Any], str]:
        """``precopy-source --criu`` of the memcached; returns (exit code, report, its stderr)."""
        report = self.tmp / "report.json"
        report.unlink(missing_ok=True)
        assert self.pid is not None and self.port is not None
        cmd = ["ip", "netns", "exec", self.hosts.src_ns, *self._py(
            "precopy_agents.source_main", "--to", f"{self.hosts.dst_ip}:{self.port}", "--memory", str(self.region),
            "--pid", str(self.pid), "--criu", "--report", str(report), "--progress", "off", *args)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rep = json.loads(report.read_text()) if report.exists() else {}
        return out.returncode, rep, out.stderr

    def move_address(self) -> None:
        """The service address leaves the source host for the destination's; the source routes to it."""
        h = self.hosts
        for argv in (["ip", "-n", h.src_ns, "addr", "del", f"{VIP}/32", "dev", "lo"],
                     ["ip", "-n", h.dst_ns, "addr", "add", f"{VIP}/32", "dev", "lo"],
                     ["ip", "-n", h.src_ns, "route", "add", f"{VIP}/32", "via", h.dst_ip]):
            subprocess.run(argv, check=True)

    def restored_pids(self) -> list[int]:
        """memcached processes in the destination's network namespace (the restored one)."""
        out = subprocess.run(["ip", "netns", "pids", self.hosts.dst_ns], capture_output=True, text=True)
        pids = []
        for p in out.stdout.split():
            try:
                if Path(f"/proc/{p}/comm").read_text().strip() == "memcached":
                    pids.append(int(p))
            except OSError:
                continue
        return pids

    def down(self) -> None:
        for pid in ([self.pid] if self.pid else []) + self.restored_pids_safe():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid = None
        if self._dest is not None and self._dest.poll() is None:
            self._dest.send_signal(signal.SIGTERM)
            try:
                self._dest.wait(20)
            except subprocess.TimeoutExpired:
                self._dest.kill()
                self._dest.wait()
        self._dest = None
        self.hosts.down()
        self.region.unlink(missing_ok=True)

    def restored_pids_safe(self) -> list[int]:
        try:
            return self.restored_pids() if Path(f"/run/netns/{self.hosts.dst_ns}").exists() else []
        except OSError:
            return []

    def __enter__(self) -> CriuPair:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
        shutil.rmtree(self.tmp, ignore_errors=True)

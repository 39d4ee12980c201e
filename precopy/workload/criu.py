"""CRIU, the program: find it, check it, run it -- shared by the source and destination adapters.

A plain Linux process has no "device state" of its own to hand over; its
registers, threads, open files and sockets are what CRIU checkpoints.  The
region (a linked file on tmpfs, mapped ``MAP_SHARED``) is pre-copied by
precopy while the process runs; CRIU records that mapping by path and size
only, so its images hold just what is left (``../shared/CRIU.md``).

CRIU >= 4.2 is required here: 3.17 (Debian 12) fails kernel detection on
Linux >= 6.13 and 4.1 (Debian 13) cannot dump a TCP socket on Linux >= 6.16
(``SO_PASSCRED`` is refused on inet sockets there).  :func:`find_criu`
looks, in order, at ``--criu-bin``, ``$PRECOPY_CRIU``, ``criu`` on PATH
and the private root ``make criu`` installs (:data:`DEFAULT_CRIU`);
``python -m precopy.lab.criu_root install`` builds that root from Debian's
packages.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from precopy.errors import GuestControlError
from precopy.workload.criu_rpc import DUMP, RESTORE, CriuWorker, RpcAnswer

__all__ = ["CriuTool", "find_criu", "parse_version", "MIN_CRIU", "DEFAULT_CRIU", "INSTALL_HINT",
           "process_facts", "ProcessFacts", "ram_dir"]

#: The oldest CRIU that dumps this kernel's processes (see the module docstring).
MIN_CRIU = (4, 2)
#: Where ``make criu`` (``python -m precopy.lab.criu_root install``) puts its wrapper.
DEFAULT_CRIU = Path("/var/lib/precopy/criu/criu")
INSTALL_HINT = ("install CRIU >= %d.%d: 'make criu' (or 'python -m precopy.lab.criu_root install', root) "
                "fetches Debian's package into %s; or point --criu-bin / $PRECOPY_CRIU at one"
                % (*MIN_CRIU, DEFAULT_CRIU.parent))
#: ``criu check`` and ``--version`` are quick; a dump or restore is bounded by the caller.
_QUICK_TIMEOUT_S = 30.0


def parse_version(text: str) -> tuple[int, ...] | None:
    """``(4, 2, 1)`` from ``criu --version`` output (``Version: 4.2.1``); None if absent."""
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if m is None:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


@dataclass(frozen=True)
class CriuTool:
    """One CRIU executable (``path``: as given, an absolute path) and its version."""

    path: str
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @classmethod
    def probe(cls, path: str) -> CriuTool:
        """Run ``PATH --version``; raises :class:`GuestControlError` if it does not run or is too old."""
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=_QUICK_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GuestControlError(f"CRIU at {path} does not run ({exc}); {INSTALL_HINT}") from exc
        version = parse_version(out.stdout + out.stderr)
        if out.returncode != 0 or version is None:
            raise GuestControlError(f"CRIU at {path} does not run: {(out.stderr or out.stdout).strip()[-300:]}; "
                                    f"{INSTALL_HINT}")
        if version[:2] < MIN_CRIU:
            raise GuestControlError(
                f"CRIU at {path} is {'.'.join(map(str, version))}, this kernel needs >= "
                f"{MIN_CRIU[0]}.{MIN_CRIU[1]}; {INSTALL_HINT}")
        return cls(path, version)

    def check(self, prefix: list[str] | None = None) -> str:
        """``criu check`` (after ``prefix``, e.g. nsenter): returns its verdict; raises :class:`GuestControlError`.

        Where ``/run`` is tmpfs (systemd hosts) this also leaves CRIU's cache
        of kernel features there, which spares each later dump or restore in
        the same mount namespace its probe (25-150 ms here).
        """
        try:
            out = subprocess.run([*(prefix or []), self.path, "check"], capture_output=True, text=True,
                                 timeout=_QUICK_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GuestControlError(f"'criu check' did not run: {exc}") from exc
        text = (out.stdout + out.stderr).strip()
        if out.returncode != 0 or "Looks good" not in text:
            raise GuestControlError(f"'{self.path} check' fails on this host: {text[-500:]}")
        return "criu check: Looks good"

    async def run(self, args: list[str], *, timeout_s: float, log: Path | None = None,
                  prefix: list[str] | None = None) -> float:
        """Run ``criu ARGS`` (after ``prefix``, e.g. nsenter); returns its wall time (s).

        Raises :class:`GuestControlError` naming the failure and the tail of
        ``log`` (CRIU's own log file) when it exits non-zero.  A timeout is
        reported, but CRIU is never killed: a dump cut short would leave its
        parasite in the process.
        """
        t = time.monotonic()
        argv = [*(prefix or []), self.path, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            raise GuestControlError(f"cannot start {argv[0]}: {exc}") from exc
        try:
            out, _ = await asyncio.wait_for(asyncio.shield(proc.communicate()), timeout_s)
        except asyncio.TimeoutError:
            raise GuestControlError(f"criu {args[0]} still runs after {timeout_s:.0f} s (left running, pid "
                                    f"{proc.pid})") from None
        if proc.returncode != 0:
            raise GuestControlError(f"criu {args[0]} failed (exit {proc.returncode}): "
                                    f"{_tail(log) or out.decode(errors='replace').strip()[-600:]}")
        return time.monotonic() - t


    async def request(self, worker: CriuWorker, message: bytes, *, timeout_s: float, log: Path
                      ) -> tuple[float, RpcAnswer]:
        """One request to a CRIU started ahead (:mod:`precopy.workload.criu_rpc`): its wall time (s) and answer.

        Raises :class:`GuestControlError` as :meth:`run` does (``criu dump
        failed: ...``, with the tail of ``log``).
        """
        t = time.monotonic()
        answer = await worker.request(message, timeout_s=timeout_s)
        if not answer.success:
            what = {DUMP: "dump", RESTORE: "restore"}.get(answer.kind, f"request {answer.kind}")
            raise GuestControlError(f"criu {what} failed (errno {answer.errno}): "
                                    f"{_tail(log) or answer.error.strip()[-600:] or 'no log'}")
        return time.monotonic() - t, answer


def ram_dir() -> Path | None:
    """``/dev/shm`` where it can be written (the images then never touch a disk), else None (the default temp dir)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def _tail(log: Path | None) -> str:
    """The error lines of a CRIU log (its last ones if none say Error)."""
    if log is None:
        return ""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    return " | ".join((errors or lines)[-4:])


def find_criu(explicit: str | None = None) -> CriuTool:
    """The CRIU to use (see the module docstring); raises :class:`GuestControlError` saying what to install."""
    if explicit:
        return CriuTool.probe(explicit)
    env = os.environ.get("PRECOPY_CRIU")
    if env:
        return CriuTool.probe(env)
    tried: list[str] = []
    on_path = shutil.which("criu")
    for cand in (on_path, str(DEFAULT_CRIU) if DEFAULT_CRIU.exists() else None):
        if cand is None:
            continue
        try:
            return CriuTool.probe(os.path.abspath(cand))
        except GuestControlError as exc:
            tried.append(str(exc))
    raise GuestControlError("no usable CRIU: " + ("; ".join(tried) if tried else INSTALL_HINT))


@dataclass(frozen=True)
class ProcessFacts:
    """What a CRIU migration needs to know of the source process (from /proc)."""

    pid: int
    pid_in_ns: int  # its pid in its own PID namespace (1: the namespace's init)
    session_leader: bool
    region_mapped_shared: bool
    private_kib: int  # RssAnon: what the images will hold, about


def process_facts(pid: int, region: Path) -> ProcessFacts:
    """Read ``/proc/PID`` for :class:`ProcessFacts`; raises :class:`GuestControlError` if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError as exc:
        raise GuestControlError(f"cannot read /proc/{pid} ({exc.strerror}): is the process there?") from exc
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    nspid = fields.get("NSpid", str(pid)).split()
    sid = int(stat[stat.rindex(")") + 2:].split()[3])
    try:
        st = os.stat(region)
    except OSError as exc:
        raise GuestControlError(f"region {region}: {exc.strerror}") from exc
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} {st.st_ino}"
    shared = any(len(p := line.split()) >= 5 and p[1][3] == "s" and f"{p[3]} {p[4]}" == want
                 for line in maps.splitlines())
    private = int(fields.get("RssAnon", "0 kB").split()[0])
    return ProcessFacts(pid=pid, pid_in_ns=int(nspid[-1]), session_leader=(sid == pid),
                        region_mapped_shared=shared, private_kib=private)

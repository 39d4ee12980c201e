"""``precopy-guest run``: start a program so that CRIU can move it (``precopy-source --criu``).

The program is started as ``unshare --pid --fork setsid CMD``: the init of
its own PID namespace (CRIU restores it with the same PID and thread ids
even where those numbers are taken) and a session leader (CRIU must dump a
whole session), with stdin, stdout and stderr on ``/dev/null`` (or stdout and
stderr appended to ``--log``) and no other inherited file descriptor
(CRIU would checkpoint those too).  Run this inside the network and mount
namespaces the program is to live in: its files must be opened there.

It waits until the program maps ``--memory`` shared, prints the PID to give
to ``precopy-source --pid`` (the namespace's init, as this host sees it) and
exits; the program runs on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from precopy.errors import GuestControlError
from precopy.guest.common import GuestError
from precopy.workload.criu import process_facts

__all__ = ["launch", "run_launch", "add_run_parser"]


def _child_of(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def launch(cmd: list[str], memory: Path, *, wait_s: float = 10.0, log: Path | None = None) -> int:
    """Start ``cmd`` (see the module docstring); returns the PID of its namespace init.

    Raises :class:`GuestError` if it cannot start, exits, or does not map
    ``memory`` shared within ``wait_s``.
    """
    if not cmd:
        raise GuestError("no command to run (give it after --)")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise GuestError("unshare is not installed (Debian: util-linux)")
    out: int = subprocess.DEVNULL
    if log is not None:
        # O_APPEND: CRIU then restores it without checking its size (it grows).
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        proc = subprocess.Popen([unshare, "--pid", "--fork", "setsid", *cmd], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, close_fds=True, start_new_session=True, cwd="/")
    except OSError as exc:
        raise GuestError(f"cannot start {cmd[0]}: {exc}") from exc
    finally:
        if log is not None:
            os.close(out)
    deadline = time.monotonic() + wait_s
    pid: int | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GuestError(f"{cmd[0]} exited with status {proc.returncode} before mapping {memory}")
        pid = pid or _child_of(proc.pid)
        if pid is not None and memory.exists():
            try:
                if process_facts(pid, memory).region_mapped_shared:
                    return pid
            except GuestControlError:
                pass  # /proc or the file changing while it starts: asked again until the deadline
        time.sleep(0.02)
    raise GuestError(f"{cmd[0]} (pid {pid}) did not map {memory} shared within {wait_s} s; it runs on "
                     f"(kill {proc.pid} to end it)")


def run_launch(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    pid = launch(cmd, Path(os.path.abspath(args.memory)), wait_s=args.wait, log=args.log)
    if args.pidfile is not None:
        args.pidfile.write_text(f"{pid}\n")
    print(pid, flush=True)
    return 0


def add_run_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "run", help="start a program so that precopy-source --criu can move it (prints its PID)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", required=True, type=Path, metavar="PATH",
                   help="the region file the program maps shared (a linked file on tmpfs, e.g. /dev/shm/NAME; "
                        "the program may create it); the launcher waits until it is mapped")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the mapping (default 10)")
    p.add_argument("--pidfile", type=Path, metavar="FILE", help="also write the PID here (default: none)")
    p.add_argument("--log", type=Path, metavar="FILE",
                   help="append the program's stdout and stderr here; the file must exist at the same path on "
                        "the destination (default: /dev/null)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the program to run")
    p.set_defaults(func=run_launch)

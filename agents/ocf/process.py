"""The workload's process on this node (pid file, environment, ending its group) and the agent's log."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from .params import Params

# -- logging ---------------------------------------------------------------------

def _log(p: Params | None, level: str, msg: str) -> None:
    """To stderr (pacemaker-execd logs it) and to STATE_DIR/agent.log."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {os.uname().nodename} " \
           f"{p.resource if p else '-'} {level}: {msg}"
    print(f"precopy-ocf: {level}: {msg}", file=sys.stderr, flush=True)
    if p is not None:
        try:
            p.state_dir.mkdir(parents=True, exist_ok=True)
            with open(p.state_dir / "agent.log", "a") as f:
                f.write(line + "\n")
        except OSError as exc:
            print(f"precopy-ocf: warning: cannot write {p.state_dir}/agent.log: {exc.strerror}",
                  file=sys.stderr)


# -- the workload process -----------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) and None if it is gone or a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def _proc_state(pid: int) -> str:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return "?"
    return data[data.rindex(b")") + 2:][:1].decode()


def record_pid(p: Params, pid: int) -> None:
    """Write the workload's pid and start time (atomically)."""
    st = _start_time(pid)
    p.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = p.pid_file.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid} {st or ''}\n")
    os.replace(tmp, p.pid_file)


def workload_pid(p: Params) -> int | None:
    """The pid of the workload started here, if it still lives (None: never started or gone)."""
    try:
        pid_s, _, st = p.pid_file.read_text().strip().partition(" ")
        pid = int(pid_s)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"unreadable pid file {p.pid_file}: {exc}") from exc
    now = _start_time(pid)
    return pid if now is not None and now == st else None


def _workload_env(p: Params, device_state: str, migration_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCF_", "PCMK_", "CRM_", "HA_"))}
    env.update(PRECOPY_MEMORY=str(p.memory), PRECOPY_DEVICE_STATE=device_state,
               PRECOPY_MIGRATION_ID=migration_id, PRECOPY_RESOURCE=p.resource)
    return env


def _device_state_path(p: Params) -> str:
    # precopy-dest's default --state-dir is its --memory-dir
    path = p.memory.parent / f"{p.memory.name}.device-state"
    return str(path) if path.exists() else ""


def _kill_group(pid: int, wait_s: float, *, graceful: bool = True) -> bool:
    """End the workload's process group (TERM, CONT, then KILL).  True once the leader is gone.

    ``graceful=False``: KILL at once, never CONT -- for a paused copy whose
    migration committed.  Continued to see its TERM, it ran again (its
    handler finished a loop of writes into the old region) while the copy on
    the target already ran: two owners, for a moment.
    """
    for sig in (signal.SIGTERM, signal.SIGCONT) if graceful else ():
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            os.kill(pid, sig)
    deadline = time.monotonic() + (wait_s if graceful else 0.0)
    while time.monotonic() < deadline:
        if _start_time(pid) is None:
            return True
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False

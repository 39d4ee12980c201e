"""The local source daemon's control socket (the protocol of precopy-source ctl) and the markers of a
migration in progress or in doubt on this node."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from .params import Params
from .process import _kill_group, _log, workload_pid

# -- the source daemon's control socket (the protocol of precopy-source ctl) ---------

class DaemonError(Exception):
    pass


def _requests(control: Path, req: dict[str, Any], stream: bool = False,
              timeout_s: float | None = 30.0) -> Iterator[dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        try:
            s.connect(str(control))
        except OSError as exc:
            raise DaemonError(f"cannot reach the source daemon at {control}: {exc.strerror or exc} "
                              "(is 'precopy-source serve' running on this node?)") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        try:
            for line in f:
                try:
                    ans = json.loads(line)
                except ValueError:
                    raise DaemonError(f"the source daemon sent something that is not JSON: {line[:80]!r}") from None
                if not isinstance(ans, dict):
                    raise DaemonError("the source daemon sent a non-object answer")
                yield ans
                if not stream or not ans.get("ok") or ans.get("event") == "done":
                    return
        except OSError as exc:  # includes socket.timeout
            raise DaemonError(f"lost the source daemon at {control}: {exc}") from None
        raise DaemonError("the source daemon closed the connection without answering")
    finally:
        s.close()


def _one(control: Path, req: dict[str, Any]) -> dict[str, Any]:
    ans = next(_requests(control, req))
    if not ans.get("ok"):
        raise DaemonError(str(ans.get("error")))
    return ans


def job_state(p: Params, migration_id: str) -> str:
    """queued / running / committed / aborted / in-doubt of a migration the local daemon ran.

    Raises DaemonError."""
    ans = _one(p.control, {"op": "status", "id": migration_id})
    return str(ans.get("job", {}).get("state"))


# -- markers: a migration in progress or in doubt ------------------------------------

def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"id": "", "error": f"unreadable marker {path}: {exc}"}
    return data if isinstance(data, dict) else {"id": "", "error": f"marker {path} is not an object"}


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def retire_source(p: Params, migration_id: str) -> None:
    """After a commit: end the paused source copy and remove its region from ``memory``."""
    pid = workload_pid(p)
    if pid is not None:
        _kill_group(pid, 5.0, graceful=False)
    p.pid_file.unlink(missing_ok=True)
    try:
        if p.keep_source_copy:
            os.replace(p.memory, p.memory.with_name(f".{p.memory.name}.{migration_id}.migrated"))
        else:
            p.memory.unlink()
    except FileNotFoundError:
        pass
    p.migrating_file.unlink(missing_ok=True)
    p.in_doubt_file.unlink(missing_ok=True)


def settle_markers(p: Params) -> str | None:
    """Bring a leftover marker up to date with the daemon.

    Returns None when no migration is pending here, "running" while one runs,
    "in-doubt" while its outcome is unknown.  A migration found committed
    retires this node's copy; one found rolled back just clears its marker.
    """
    for path in (p.migrating_file, p.in_doubt_file):
        m = _read_marker(path)
        if m is None:
            continue
        mid = str(m.get("id") or "")
        if not mid:
            return "in-doubt"
        try:
            state = job_state(p, mid)
        except DaemonError as exc:
            _log(p, "error", f"migration {mid}: cannot learn its state from the source daemon ({exc}); "
                             "treating it as in doubt")
            _write_marker(p.in_doubt_file, dict(m, error=str(exc)))
            p.migrating_file.unlink(missing_ok=True)
            return "in-doubt"
        if state in ("running", "queued"):  # queued: waiting for the daemons' --max-active
            return "running"
        if state == "committed":
            _log(p, "info", f"migration {mid} committed: retiring this node's copy")
            retire_source(p, mid)
            return None
        if state in ("aborted", "preflight-ok"):
            path.unlink(missing_ok=True)
            continue
        if path == p.migrating_file:
            _write_marker(p.in_doubt_file, dict(m, state=state))
            p.migrating_file.unlink(missing_ok=True)
        return "in-doubt"
    return None

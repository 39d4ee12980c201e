"""After a migration: precopy-dest's on-resume hook on the target, and settling one in doubt on the source
(both read the resource's definition from the CIB)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET

from .daemon import _read_marker, retire_source
from .params import PROVIDER, TYPE, ConfigError, Params
from .process import _log, _workload_env, record_pid, workload_pid

# -- the on-resume hook -----------------------------------------------------------------

def find_resource(cib_xml: str, memory: str) -> tuple[str, dict[str, str]] | None:
    """The ocf:precopy:workload primitive whose ``memory`` is ``memory``: (id, parameters)."""
    root = ET.fromstring(cib_xml)
    for prim in root.iter("primitive"):
        if (prim.get("class"), prim.get("provider"), prim.get("type")) != ("ocf", PROVIDER, TYPE):
            continue
        values: dict[str, str] = {}
        for ia in prim.findall("instance_attributes"):
            for nv in ia.findall("nvpair"):
                name, value = nv.get("name"), nv.get("value")
                if name and value is not None and name not in values:
                    values[name] = value
        if values.get("memory") and os.path.realpath(values["memory"]) == os.path.realpath(memory):
            return str(prim.get("id")), values
    return None


def resume_hook() -> int:
    """precopy-dest --on-resume: start the migrated workload with its resource's start_command.

    Reads the resource definition from the local CIB (cibadmin), records the
    workload's pid for monitor/migrate_from and execs the command in place,
    so the recorded pid is the workload's.
    """
    memory = os.environ.get("PRECOPY_MEMORY", "")
    mid = os.environ.get("PRECOPY_MIGRATION_ID", "")
    if not memory:
        print("precopy-ocf resume: PRECOPY_MEMORY is not set (run me as precopy-dest --on-resume)",
              file=sys.stderr)
        return 2
    try:
        cib = subprocess.run(["cibadmin", "--query", "--scope", "resources"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"precopy-ocf resume: cannot query the CIB: {exc}", file=sys.stderr)
        return 1
    if cib.returncode != 0:
        print(f"precopy-ocf resume: cibadmin failed: {cib.stderr.strip()}", file=sys.stderr)
        return 1
    try:
        found = find_resource(cib.stdout, memory)
    except ET.ParseError as exc:
        print(f"precopy-ocf resume: cibadmin's answer is not XML: {exc}", file=sys.stderr)
        return 1
    if found is None:
        print(f"precopy-ocf resume: no ocf:{PROVIDER}:{TYPE} resource has memory={memory}; "
              "the region stays here, not running", file=sys.stderr)
        return 1
    rsc, values = found
    try:
        p = Params.from_values(rsc, values)
    except ConfigError as exc:
        print(f"precopy-ocf resume: resource {rsc}: {exc}", file=sys.stderr)
        return 1
    env = _workload_env(p, os.environ.get("PRECOPY_DEVICE_STATE", ""), mid)
    p.state_dir.mkdir(parents=True, exist_ok=True)
    p.migrating_file.unlink(missing_ok=True)  # a leftover of an earlier migration away from here
    fd = os.open(p.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        os.setsid()  # its own session: stop ends its process group, not precopy-dest's
    except PermissionError:
        pass  # already a group leader
    record_pid(p, os.getpid())
    _log(p, "info", f"migration {mid} committed here: starting the workload (pid {os.getpid()})")
    os.chdir("/")
    os.execve("/bin/sh", ["/bin/sh", "-c", p.start_command], env)
    return 1  # not reached


# -- resolving a migration in doubt ---------------------------------------------------

def resolve(p: Params, outcome: str) -> str:
    """Settle this node after a migration in doubt, once the operator knows its outcome.

    ``committed`` (the target's journal says so): the paused copy here is
    killed and the region retired, as after any commit.  ``aborted`` (the
    target has no committed record): the paused copy is resumed here (SIGCONT,
    or the guest's resume op).  Returns what was done.  Raises RuntimeError
    when there is nothing in doubt here or the copy cannot be resumed.
    """
    m = _read_marker(p.in_doubt_file) or _read_marker(p.migrating_file)
    if m is None:
        raise RuntimeError(f"no migration of {p.resource} is in doubt on this node ({p.in_doubt_file} is absent)")
    mid = str(m.get("id") or "?")
    if outcome == "committed":
        retire_source(p, mid)
        _log(p, "warning", f"migration {mid} resolved by the operator as committed: this node's copy retired")
        return f"migration {mid}: committed; the paused copy here was ended and {p.memory} retired"
    if outcome != "aborted":
        raise ValueError(f"outcome {outcome!r}: use committed or aborted")
    pid = workload_pid(p)
    if pid is None:
        raise RuntimeError(f"the paused copy of {p.resource} is gone (pid file {p.pid_file}); "
                           f"start it again from {p.memory} with 'crm_resource --refresh' once resolved")
    if p.guest_control:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(p.guest_control)
            sock.sendall(b'{"op": "resume"}\n')
            ans = json.loads(sock.makefile("rb").readline() or b"{}")
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot resume the guest through {p.guest_control}: {exc}") from exc
        finally:
            sock.close()
        if not ans.get("ok"):
            raise RuntimeError(f"the guest refused to resume: {ans}")
    else:
        os.kill(pid, signal.SIGCONT)
    p.in_doubt_file.unlink(missing_ok=True)
    p.migrating_file.unlink(missing_ok=True)
    _log(p, "warning", f"migration {mid} resolved by the operator as aborted: the copy here (pid {pid}) resumed")
    return f"migration {mid}: aborted; the copy here (pid {pid}) runs again"


def _params_from_cib(resource: str) -> Params:
    cib = subprocess.run(["cibadmin", "--query", "--scope", "resources"], capture_output=True, text=True,
                         timeout=30)
    if cib.returncode != 0:
        raise RuntimeError(f"cibadmin failed: {cib.stderr.strip()}")
    for prim in ET.fromstring(cib.stdout).iter("primitive"):
        if prim.get("id") == resource:
            values: dict[str, str] = {}
            for ia in prim.findall("instance_attributes"):
                for nv in ia.findall("nvpair"):
                    if nv.get("name") and nv.get("value") is not None:
                        values.setdefault(str(nv.get("name")), str(nv.get("value")))
            return Params.from_values(resource, values)
    raise RuntimeError(f"no resource {resource!r} in the CIB")

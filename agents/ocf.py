"""precopy-ocf: precopy as a Pacemaker resource (``ocf:precopy:workload``).

    precopy-ocf install [--ocf-root DIR]   # writes DIR/resource.d/precopy/workload
    precopy-ocf resume                     # precopy-dest's --on-resume hook on every node
    precopy-ocf resolve RESOURCE committed|aborted   # settle a migration in doubt (source node)
    precopy-ocf ACTION                     # what Pacemaker runs, through the installed file

One resource is one workload: a process mapping a region file (``memory``)
that can be started on a region, as precopy-dest's ``--on-resume`` starts a
migrated one.  ``migrate_to`` live-migrates it to the target node through
the local source daemon (``precopy-source serve``; the control protocol of
``precopy-source ctl``), ``migrate_from`` confirms it runs on the target,
where precopy-dest's hook (``precopy-ocf resume``) started it with the
resource's own ``start_command`` the moment the migration committed.

What each action promises (exit codes are OCF's):

* ``start`` succeeds only on the node that holds the workload's committed
  memory (the region file at ``memory``); elsewhere it fails with
  OCF_ERR_INSTALLED, which bans the resource from that node.  A node whose
  copy was migrated away no longer has the file (it is deleted, or kept
  under another name with ``keep_source_copy``), so the cluster can never
  start a second, stale copy — not even with fencing off after a split.
* ``migrate_to``: committed -> 0 (the paused source process is killed and
  its region retired at once); rolled back -> OCF_ERR_GENERIC with the
  workload running here again; in doubt -> OCF_ERR_GENERIC and the node is
  marked in doubt: ``start`` and ``monitor`` fail and ``stop`` refuses here
  until the outcome is known, so nothing starts a second copy and nothing
  kills the only one.  Configure ``op migrate_to on-fail=block`` so that a
  failed migration leaves the resource where it is (Pacemaker's default
  recovery would stop it on the source and start it anew).
* ``monitor``: 0 running here (also while it is paused by a migration in
  progress), 7 not running here, 1 failed (started here and died, or in
  doubt).
* ``stop`` ends the workload's process group (TERM, then KILL); its region
  stays, so a later ``start`` on this node runs it again from its memory.

State per node lives in ``state_dir`` (default /run/precopy-ocf): the
workload's pid and start time, a marker while a migration runs or is in
doubt, the last migration's report (``RESOURCE.report.json``) and logs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["main", "Params", "dest_address", "meta_data", "OCF_SUCCESS", "OCF_ERR_GENERIC",
           "OCF_ERR_ARGS", "OCF_ERR_UNIMPLEMENTED", "OCF_ERR_INSTALLED", "OCF_ERR_CONFIGURED",
           "OCF_NOT_RUNNING"]

OCF_SUCCESS = 0
OCF_ERR_GENERIC = 1
OCF_ERR_ARGS = 2
OCF_ERR_UNIMPLEMENTED = 3
OCF_ERR_PERM = 4
OCF_ERR_INSTALLED = 5
OCF_ERR_CONFIGURED = 6
OCF_NOT_RUNNING = 7

PROVIDER, TYPE = "precopy", "workload"
DEFAULT_CONTROL = "/run/precopy/source.sock"
DEFAULT_STATE_DIR = "/run/precopy-ocf"

#: (name, required, default, short description, long description)
PARAMETERS: tuple[tuple[str, bool, str, str, str], ...] = (
    ("memory", True, "", "the workload's region file",
     "Absolute path of the workload's memory region file, the same path on every node. Its directory "
     "is every node's precopy-dest --memory-dir (a migration arrives there under the file's name). "
     "A node holds the workload's committed memory when this file exists there."),
    ("start_command", True, "", "how to start the workload on its region",
     "Shell command (run by /bin/sh -c in a session of its own, output to STATE_DIR/RESOURCE.log) that "
     "starts the workload on its region, as precopy-dest's --on-resume does: PRECOPY_MEMORY is the "
     "region, PRECOPY_DEVICE_STATE a file with the device state of the last migration (empty or absent "
     "at a first start), PRECOPY_MIGRATION_ID the migration's id (empty at start), PRECOPY_RESOURCE the "
     "resource's name. The command must exec the workload (its pid is the one paused and stopped)."),
    ("guest_control", False, "", "a cooperative guest's control socket",
     "Pause the workload through this guest-control socket (precopy-source --guest-control; the pause "
     "returns device state). Empty: pause the process with SIGSTOP (--pid)."),
    ("dest", False, "{node}:7070", "the precopy-dest address of each node",
     "Where each node's precopy-dest listens: either a rule with {node} (replaced by the target's node "
     "name, e.g. '{node}.migration.example:7070') or a list 'n1=10.0.0.1:7070 n2=10.0.0.2:7070 ...'."),
    ("downtime_ms", False, "300", "downtime budget in milliseconds", "precopy-source --downtime-ms."),
    ("auth_key_file", False, "", "pre-shared migration key",
     "precopy-source --auth-key-file: the same key file as every node's precopy-dest."),
    ("tls", False, "false", "use TLS", "precopy-source --tls (true/false)."),
    ("tls_ca", False, "", "CA that signs the destinations' certificates", "precopy-source --tls-ca."),
    ("tls_cert", False, "", "client certificate", "precopy-source --tls-cert (mutual TLS)."),
    ("tls_key", False, "", "client certificate's key", "precopy-source --tls-key."),
    ("source_options", False, "", "more precopy-source options",
     "Further precopy-source options, split like a shell would (e.g. '--compress off --max-time 120')."),
    ("control", False, DEFAULT_CONTROL, "the source daemon's control socket",
     "The local 'precopy-source serve --control' socket that runs the migrations."),
    ("state_dir", False, DEFAULT_STATE_DIR, "the agent's state directory on each node",
     "Pid files, migration markers, the last report and logs. Keep it on storage that lives exactly as "
     "long as the regions (tmpfs for /dev/shm regions)."),
    ("keep_source_copy", False, "false", "keep the migrated-away region",
     "After a committed migration the source's region is deleted; true renames it to "
     ".NAME.MIGRATION_ID.migrated in the same directory instead (for checks; it holds memory)."),
)


class ConfigError(Exception):
    """A parameter is wrong: OCF_ERR_CONFIGURED."""


@dataclass
class Params:
    resource: str
    memory: Path
    start_command: str
    guest_control: str
    dest: str
    downtime_ms: float
    auth_key_file: str
    tls: bool
    tls_ca: str
    tls_cert: str
    tls_key: str
    source_options: list[str]
    control: Path
    state_dir: Path
    keep_source_copy: bool

    @classmethod
    def from_values(cls, resource: str, values: dict[str, str]) -> Params:
        """Parameters from a name -> value map (the environment's OCF_RESKEY_*, or the CIB's)."""
        v = {name: values.get(name, default) for name, _, default, _, _ in PARAMETERS}
        for name, required, *_ in PARAMETERS:
            if required and not v[name]:
                raise ConfigError(f"parameter '{name}' is required")
        memory = Path(v["memory"])
        if not memory.is_absolute() or memory.name in ("", ".", ".."):
            raise ConfigError(f"memory={v['memory']!r}: give the region file's absolute path")
        try:
            downtime = float(v["downtime_ms"])
        except ValueError:
            raise ConfigError(f"downtime_ms={v['downtime_ms']!r} is not a number") from None
        if not downtime > 0:
            raise ConfigError("downtime_ms must be positive")
        try:
            extra = shlex.split(v["source_options"])
        except ValueError as exc:
            raise ConfigError(f"source_options: {exc}") from None
        for name in ("control", "state_dir"):
            if not Path(v[name]).is_absolute():
                raise ConfigError(f"{name}={v[name]!r}: give an absolute path")
        if not resource or "/" in resource:
            raise ConfigError(f"resource name {resource!r} cannot name a state file")
        return cls(resource=resource, memory=memory, start_command=v["start_command"],
                   guest_control=v["guest_control"], dest=v["dest"], downtime_ms=downtime,
                   auth_key_file=v["auth_key_file"], tls=_bool(v["tls"], "tls"), tls_ca=v["tls_ca"],
                   tls_cert=v["tls_cert"], tls_key=v["tls_key"], source_options=extra,
                   control=Path(v["control"]), state_dir=Path(v["state_dir"]),
                   keep_source_copy=_bool(v["keep_source_copy"], "keep_source_copy"))

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> Params:
        values = {k[len("OCF_RESKEY_"):]: val for k, val in env.items()
                  if k.startswith("OCF_RESKEY_") and not k.startswith("OCF_RESKEY_CRM_meta")}
        resource = env.get("OCF_RESOURCE_INSTANCE", "")
        return cls.from_values(resource, values)

    # state files of this resource on this node
    def _state(self, suffix: str) -> Path:
        return self.state_dir / f"{self.resource}.{suffix}"

    @property
    def pid_file(self) -> Path:
        return self._state("pid")

    @property
    def migrating_file(self) -> Path:
        return self._state("migrating")

    @property
    def in_doubt_file(self) -> Path:
        return self._state("in-doubt")

    @property
    def report_file(self) -> Path:
        return self._state("report.json")

    @property
    def log_file(self) -> Path:
        return self._state("log")


def _bool(text: str, name: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={text!r}: use true or false")


def dest_address(rule: str, node: str) -> str:
    """The precopy-dest HOST:PORT of ``node`` by the ``dest`` parameter.  Raises ConfigError."""
    if "{node}" in rule:
        addr = rule.replace("{node}", node)
    else:
        table: dict[str, str] = {}
        for item in rule.replace(",", " ").split():
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                raise ConfigError(f"dest: {item!r} is not NODE=HOST:PORT (or use a rule with {{node}})")
            table[name] = value
        if node not in table:
            raise ConfigError(f"dest names no address for node {node!r} (it has {', '.join(table) or 'none'})")
        addr = table[node]
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"dest address {addr!r} for node {node!r} is not HOST:PORT")
    return addr


def check_dest(rule: str) -> None:
    """The ``dest`` parameter is well formed.  Raises ConfigError."""
    if "{node}" in rule:
        dest_address(rule, "node")
        return
    names = [item.partition("=")[0] for item in rule.replace(",", " ").split()]
    if not names:
        raise ConfigError("dest is empty: give a rule with {node} or NODE=HOST:PORT pairs")
    for name in names:
        dest_address(rule, name)


def meta_data() -> str:
    params = []
    for name, required, default, short, long in PARAMETERS:
        params.append(
            f'    <parameter name="{name}" required="{int(required)}" unique="{int(name == "memory")}">\n'
            f'      <longdesc lang="en">{_x(long)}</longdesc>\n'
            f'      <shortdesc lang="en">{_x(short)}</shortdesc>\n'
            f'      <content type="{"boolean" if default in ("true", "false") else "string"}" '
            f'default="{_x(default)}"/>\n'
            f'    </parameter>')
    return f"""<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="workload" version="1.0">
  <version>1.1</version>
  <longdesc lang="en">
A workload whose memory is a region file, live-migrated between nodes by precopy
(pre-copy over TCP: copy while it runs, pause only for the rest). Use it with
meta allow-migrate=true, and op migrate_to on-fail=block so that a failed
migration leaves the workload running where it was. Every node runs
precopy-dest (--memory-dir: the directory of 'memory', --on-resume
'precopy-ocf resume', the same key or TLS setup) and precopy-source serve.

start succeeds only on the node holding the workload's committed memory;
a node the workload migrated away from no longer holds it, so the cluster never
starts a second copy. A migration in doubt makes start, monitor and stop fail
on the source until the outcome is known.

Utilisation: give the resource a 'memory' utilization attribute (the region's
size in MiB, e.g. crm: utilization memory=1024; pcs: pcs resource utilization
NAME memory=1024) and the nodes their capacity (utilization memory=...), then
set placement-strategy=balanced: placement and migrations then respect each
node's memory, and a workload that fits nowhere is stopped, not squeezed in.
  </longdesc>
  <shortdesc lang="en">precopy live-migrated workload</shortdesc>
  <parameters>
{chr(10).join(params)}
  </parameters>
  <actions>
    <action name="start" timeout="60s"/>
    <action name="stop" timeout="60s"/>
    <action name="monitor" timeout="30s" interval="10s" depth="0"/>
    <action name="migrate_to" timeout="600s"/>
    <action name="migrate_from" timeout="60s"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="20s"/>
  </actions>
</resource-agent>
"""


def _x(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


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


# -- actions ------------------------------------------------------------------------

def _timeout_s(default: float) -> float:
    try:
        return int(os.environ["OCF_RESKEY_CRM_meta_timeout"]) / 1000.0
    except (KeyError, ValueError):
        return default


def monitor(p: Params) -> int:
    pending = settle_markers(p)
    if pending == "in-doubt":
        _log(p, "error", f"a migration of {p.resource} from this node is in doubt: see {p.in_doubt_file}")
        return OCF_ERR_GENERIC
    pid = workload_pid(p)
    if pid is not None:
        return OCF_SUCCESS
    if pending == "running":
        return OCF_SUCCESS
    if p.pid_file.exists():
        _log(p, "error", f"the workload started here (pid file {p.pid_file}) is gone")
        return OCF_ERR_GENERIC
    return OCF_NOT_RUNNING


def start(p: Params) -> int:
    pending = settle_markers(p)
    if pending is not None:
        _log(p, "error", f"refusing to start: a migration of {p.resource} from this node is {pending}")
        return OCF_ERR_GENERIC
    if workload_pid(p) is not None:
        return OCF_SUCCESS
    if not p.memory.is_file():
        _log(p, "error", f"refusing to start: the workload's memory {p.memory} is not on this node "
                         "(it runs only where its committed memory is)")
        return OCF_ERR_INSTALLED
    p.state_dir.mkdir(parents=True, exist_ok=True)
    env = _workload_env(p, _device_state_path(p), "")
    with open(p.log_file, "ab") as log:
        proc = subprocess.Popen(["/bin/sh", "-c", p.start_command], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd="/")
    record_pid(p, proc.pid)
    return _confirm_running(p, proc.pid, min(5.0, _timeout_s(60) / 2), "start")


def _confirm_running(p: Params, pid: int, wait_s: float, what: str) -> int:
    """The workload lives after a short while (and its control socket, if any, exists)."""
    t0 = time.monotonic()
    sock = Path(p.guest_control) if p.guest_control else None
    while time.monotonic() < t0 + wait_s:
        if _start_time(pid) is None:
            break
        # a command that fails at once fails within the first 0.3 s
        if (sock is None or sock.exists()) and time.monotonic() >= t0 + 0.3:
            _log(p, "info", f"{what}: workload running (pid {pid})")
            return OCF_SUCCESS
        time.sleep(0.05)
    if _start_time(pid) is None:
        _log(p, "error", f"{what}: the workload exited at once; see {p.log_file}")
        p.pid_file.unlink(missing_ok=True)
        return OCF_ERR_GENERIC
    _log(p, "error", f"{what}: its control socket {sock} did not appear within {wait_s:.0f} s")
    return OCF_ERR_GENERIC


def stop(p: Params) -> int:
    pending = settle_markers(p)
    if pending == "running":
        m = _read_marker(p.migrating_file) or {}
        mid = str(m.get("id"))
        _log(p, "warning", f"stop during migration {mid}: cancelling it")
        try:
            _one(p.control, {"op": "cancel", "id": mid})
        except DaemonError as exc:
            _log(p, "error", f"cannot cancel migration {mid}: {exc}")
        deadline = time.monotonic() + max(5.0, _timeout_s(60) - 10)
        while pending == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            pending = settle_markers(p)
    if pending is not None:
        _log(p, "error", f"refusing to stop: a migration of {p.resource} from this node is {pending}; "
                         "its only copy may be the paused one here (see the README, 'in doubt')")
        return OCF_ERR_GENERIC
    pid = workload_pid(p)
    if pid is not None and not _kill_group(pid, max(2.0, _timeout_s(60) / 2 - 5)):
        _log(p, "error", f"the workload (pid {pid}) does not end")
        return OCF_ERR_GENERIC
    p.pid_file.unlink(missing_ok=True)
    return OCF_SUCCESS


def _source_argv(p: Params, to: str, pid: int, migration_id: str) -> list[str]:
    argv = ["--to", to, "--memory", str(p.memory), "--downtime-ms", f"{p.downtime_ms:g}",
            "--migration-id", migration_id, "--on-commit", "keep-stopped"]
    argv += ["--guest-control", p.guest_control] if p.guest_control else ["--pid", str(pid)]
    if p.auth_key_file:
        argv += ["--auth-key-file", p.auth_key_file]
    if p.tls:
        argv.append("--tls")
    for flag, value in (("--tls-ca", p.tls_ca), ("--tls-cert", p.tls_cert), ("--tls-key", p.tls_key)):
        if value:
            argv += [flag, value]
    return argv + p.source_options


def migrate_to(p: Params) -> int:
    target = os.environ.get("OCF_RESKEY_CRM_meta_migrate_target", "")
    if not target:
        _log(p, "error", "migrate_to without OCF_RESKEY_CRM_meta_migrate_target")
        return OCF_ERR_ARGS
    to = dest_address(p.dest, target)
    pending = settle_markers(p)
    if pending is not None:
        _log(p, "error", f"cannot migrate: an earlier migration from this node is {pending}")
        return OCF_ERR_GENERIC
    pid = workload_pid(p)
    if pid is None:
        _log(p, "error", "cannot migrate: the workload is not running here")
        return OCF_ERR_GENERIC
    mid = uuid.uuid4().hex
    marker = {"id": mid, "target": target, "to": to, "started": time.time()}
    _write_marker(p.migrating_file, marker)
    try:
        ans = _one(p.control, {"op": "start", "argv": _source_argv(p, to, pid, mid)})
    except DaemonError as exc:
        p.migrating_file.unlink(missing_ok=True)
        _log(p, "error", f"migration to {target} ({to}) not started: {exc}")
        return OCF_ERR_GENERIC
    _log(p, "info", f"migration {ans.get('id')} to {target} ({to}) started")
    # Stop waiting (and cancel: before the commit it rolls back) in time to
    # answer Pacemaker before it kills this action.
    deadline = time.monotonic() + max(10.0, _timeout_s(600) - 15)
    done = _watch(p, mid, deadline)
    state = str(done.get("job", {}).get("state")) if done else "in-doubt"
    report = done.get("report") if done else None
    if report:
        try:
            _write_marker(p.report_file, report)
        except OSError as exc:
            _log(p, "warning", f"cannot save the report: {exc.strerror}")
    summary = ""
    if isinstance(report, dict):
        summary = (f" (downtime {report.get('downtime_ms')} ms, expected {report.get('expected_downtime_ms')}, "
                   f"total {report.get('total_time_s')} s)")
    if state == "committed":
        retire_source(p, mid)
        _log(p, "info", f"migration {mid} to {target} committed{summary}")
        return OCF_SUCCESS
    if state == "aborted":
        p.migrating_file.unlink(missing_ok=True)
        err = report.get("error") if isinstance(report, dict) else None
        alive = workload_pid(p) is not None
        _log(p, "error", f"migration {mid} to {target} rolled back ({err}); the workload "
                         f"{'runs here again' if alive else 'is NOT running here'}")
        return OCF_ERR_GENERIC
    _write_marker(p.in_doubt_file, dict(marker, state=state))
    p.migrating_file.unlink(missing_ok=True)
    _log(p, "crit", f"migration {mid} to {target} is IN DOUBT ({state}): the workload is paused here and "
                    f"may run on {target}; this node refuses start/stop of {p.resource} until resolved")
    return OCF_ERR_GENERIC


def _watch(p: Params, mid: str, deadline: float) -> dict[str, Any] | None:
    """Follow the migration until it ends; cancel it at the deadline.  None: lost track of it."""
    cancelled = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 and not cancelled:
            _log(p, "error", f"migration {mid} is taking longer than this action may: cancelling it")
            try:
                _one(p.control, {"op": "cancel", "id": mid})
            except DaemonError as exc:
                _log(p, "warning", f"cancel: {exc}")
            cancelled = True
        try:
            for ans in _requests(p.control, {"op": "watch", "id": mid}, stream=True,
                                 timeout_s=max(1.0, remaining) if not cancelled else 60.0):
                if not ans.get("ok"):
                    raise DaemonError(str(ans.get("error")))
                if ans.get("event") == "done":
                    return ans
        except DaemonError as exc:
            if "timed out" not in str(exc):
                _log(p, "error", f"migration {mid}: {exc}")
                try:
                    st = _one(p.control, {"op": "status", "id": mid})
                    if st.get("job", {}).get("state") != "running":
                        return {"job": st.get("job"), "report": st.get("report")}
                except DaemonError:
                    return None
            if cancelled and time.monotonic() > deadline + 10:
                return None


def migrate_from(p: Params) -> int:
    source = os.environ.get("OCF_RESKEY_CRM_meta_migrate_source", "?")
    deadline = time.monotonic() + max(5.0, _timeout_s(60) - 5)
    while time.monotonic() < deadline:
        pid = workload_pid(p)
        if pid is not None and p.memory.is_file():
            _log(p, "info", f"migrated in from {source}: workload running (pid {pid})")
            return OCF_SUCCESS
        time.sleep(0.1)
    if p.memory.is_file():
        _log(p, "error", f"the migration from {source} committed here but the workload is not running "
                         f"(precopy-dest's --on-resume 'precopy-ocf resume'? see {p.log_file})")
    else:
        _log(p, "error", f"no migration from {source} arrived here ({p.memory} is absent)")
    return OCF_ERR_GENERIC


def validate(p: Params) -> int:
    problems = []
    for name, path in (("auth_key_file", p.auth_key_file), ("tls_ca", p.tls_ca), ("tls_cert", p.tls_cert),
                       ("tls_key", p.tls_key)):
        if path and not os.access(path, os.R_OK):
            problems.append(f"{name}={path} is not readable on this node")
    if not os.access("/bin/sh", os.X_OK):
        problems.append("/bin/sh is missing")
    if problems:
        for line in problems:
            _log(p, "error", line)
        return OCF_ERR_INSTALLED
    return OCF_SUCCESS


ACTIONS = {"start": start, "stop": stop, "monitor": monitor, "migrate_to": migrate_to,
           "migrate_from": migrate_from, "validate-all": validate}


def run_action(action: str) -> int:
    if action == "meta-data":
        print(meta_data(), end="")
        return OCF_SUCCESS
    if action not in ACTIONS:
        print(f"precopy-ocf: unknown action {action!r} (use {', '.join(ACTIONS)}, meta-data)", file=sys.stderr)
        return OCF_ERR_UNIMPLEMENTED
    try:
        p = Params.from_env()
        check_dest(p.dest)
    except ConfigError as exc:
        _log(None, "error", str(exc))
        # a probe or stop of a misconfigured resource must not fail the node
        if action == "stop" or (action == "monitor" and os.environ.get("OCF_RESKEY_CRM_meta_interval", "0") == "0"):
            return OCF_NOT_RUNNING if action == "monitor" else OCF_SUCCESS
        return OCF_ERR_CONFIGURED
    try:
        return ACTIONS[action](p)
    except ConfigError as exc:
        _log(p, "error", str(exc))
        return OCF_ERR_CONFIGURED
    except (OSError, RuntimeError) as exc:
        _log(p, "error", f"{action}: {exc}")
        return OCF_ERR_GENERIC


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


# -- install -------------------------------------------------------------------------------

def install(ocf_root: Path) -> Path:
    """Write OCF_ROOT/resource.d/precopy/workload, which runs this module with this interpreter."""
    d = ocf_root / "resource.d" / PROVIDER
    d.mkdir(parents=True, exist_ok=True)
    path = d / TYPE
    src = Path(__file__).resolve().parent.parent
    # meta-data is answered by the shell: Pacemaker's controller asks for it as
    # user hacluster, who may not be allowed to run this Python.
    text = ("#!/bin/sh\n# ocf:precopy:workload -- written by 'precopy-ocf install'\n"
            'if [ "$1" = meta-data ]; then\ncat <<\'PRECOPY_META_DATA\'\n'
            f"{meta_data()}PRECOPY_META_DATA\nexit 0\nfi\n"
            f"PYTHONPATH={shlex.quote(str(src))}${{PYTHONPATH:+:$PYTHONPATH}} "
            f"exec {shlex.quote(sys.executable)} -m agents.ocf \"$@\"\n")
    tmp = path.with_name(f".{TYPE}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["install"]:
        import argparse

        ap = argparse.ArgumentParser(prog="precopy-ocf install",
                                     description="Install the OCF resource agent ocf:precopy:workload.")
        ap.add_argument("--ocf-root", type=Path,
                        default=Path(os.environ.get("OCF_ROOT", "/usr/lib/ocf")),
                        help="the OCF root (default: $OCF_ROOT or /usr/lib/ocf)")
        args = ap.parse_args(argv[1:])
        try:
            print(install(args.ocf_root))
        except OSError as exc:
            print(f"precopy-ocf install: cannot write under {args.ocf_root}: {exc.strerror}", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["resume"]:
        return resume_hook()
    if argv[:1] == ["resolve"]:
        import argparse

        ap = argparse.ArgumentParser(
            prog="precopy-ocf resolve",
            description="On the source node of a migration in doubt: settle it once you know its outcome "
                        "(the target's precopy-dest journal, STATE_DIR/.precopy/journal/ID.json). Then "
                        "refresh the resource (README: 'What the agent promises under failures').")
        ap.add_argument("resource", help="the resource's name in the cluster")
        ap.add_argument("outcome", choices=["committed", "aborted"],
                        help="committed: the target holds it (the copy here is ended); aborted: it "
                             "resumes here")
        args = ap.parse_args(argv[1:])
        try:
            print(resolve(_params_from_cib(args.resource), args.outcome))
        except (RuntimeError, ConfigError, OSError, ET.ParseError, subprocess.TimeoutExpired) as exc:
            print(f"precopy-ocf resolve: {exc}", file=sys.stderr)
            return 1
        return 0
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        usage = "\n\n".join((__doc__ or "").split("\n\n")[:3]) + \
            f"\n\nACTION: {', '.join(ACTIONS)}, meta-data (OCF exit codes). README: 'Run it in a Pacemaker cluster'."
        if argv[:1] in (["-h"], ["--help"]):
            print(usage)
            return 0
        print(usage, file=sys.stderr)
        return 2
    return run_action(argv[0])


if __name__ == "__main__":
    sys.exit(main())

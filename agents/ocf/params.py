"""ocf:precopy:workload's parameters (from the environment or the CIB), OCF exit codes and meta-data."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

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

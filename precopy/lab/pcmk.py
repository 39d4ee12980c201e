"""A real Corosync/Pacemaker cluster on one machine, for tests and benchmarks.

Each node is a network namespace (a veth into a bridge that lives in a
namespace of its own: the root namespace gets no address on it), plus a mount
and UTS namespace held open by an "anchor" process, with private
``/etc/corosync``, ``/var/lib/corosync``, ``/var/lib/pacemaker``,
``/var/log``, ``/etc/hosts`` and tmpfs ``/run`` and ``/dev/shm``.  Corosync
(knet, ``token: 10000``, ``sched_rr: no``) and pacemakerd run in the
foreground inside each node; the CIB is seeded with ``dc-deadtime=2s`` and
``stonith-enabled=false`` so the cluster is up in seconds, not after the 20 s
DC election.  Every command meant for a node runs through
``nsenter -t ANCHOR -n -m -u`` (the daemons' IPC is abstract Unix sockets,
per network namespace, plus ``/dev/shm/qb-*``, per mount namespace).

The facts behind each choice are in the project's CLUSTER.md notes.  Needs
root, ``ip``, ``unshare``, ``nsenter`` and Debian's ``corosync``,
``pacemaker`` and ``pacemaker-cli-utils``; :func:`unavailable_reason` says
what is missing.  Everything is stopped by PID: pacemakerd (TERM, wait), then
corosync (TERM, wait), then the node's other processes, then the namespaces.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Cluster", "Node", "PrecopyCluster", "move", "unavailable_reason"]

#: Debian packages the lab needs, as ``.ci/run`` installs them.
PACKAGES = ("pacemaker", "corosync", "pacemaker-cli-utils", "crmsh")
_TOOLS = ("corosync", "pacemakerd", "cibadmin", "crm_attribute", "crm_resource", "crm_mon",
          "ip", "unshare", "nsenter")


def unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces, cluster daemons)"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return (f"missing {', '.join(missing)}: apt-get install --no-install-recommends "
                f"{' '.join(PACKAGES)} iproute2 util-linux")
    try:
        import pwd

        pwd.getpwnam("hacluster")
    except KeyError:
        return "no 'hacluster' user (the pacemaker package creates it)"
    return None


def _run(argv: Sequence[str], timeout: float = 60.0) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _stop_pid(proc: subprocess.Popen[Any], timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


_ANCHOR = r"""
set -e
R="$1"; NODE="$2"
mount --make-rprivate /
mount --bind "$R/etc-corosync" /etc/corosync
mount --bind "$R/var-lib-corosync" /var/lib/corosync
mount --bind "$R/var-lib-pacemaker" /var/lib/pacemaker
mount --bind "$R/var-log" /var/log
mount --bind "$R/hosts" /etc/hosts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/resource-agents
shift 2
while [ $# -ge 2 ]; do mount --bind "$1" "$2"; shift 2; done
hostname "$NODE"
echo ready
exec sleep infinity
"""


@dataclass
class Node:
    """One cluster node: its name, address, anchor process and daemons."""

    name: str
    ip: str
    root: Path
    ns: str
    anchor: subprocess.Popen[bytes] | None = None
    corosync: subprocess.Popen[bytes] | None = None
    pacemakerd: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside this node."""
        assert self.anchor is not None, "node is not up"
        return ["nsenter", "-t", str(self.anchor.pid), "-n", "-m", "-u", "--"]

    def path(self, inside: str | Path) -> Path:
        """A path as this node sees it, reachable from outside (through /proc/ANCHOR/root)."""
        assert self.anchor is not None
        return Path(f"/proc/{self.anchor.pid}/root") / str(inside).lstrip("/")

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.prefix() + list(argv), capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def spawn(self, *argv: str, log: Path | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside this node (stopped by PID at teardown)."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            p = subprocess.Popen(self.prefix() + list(argv), stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self.procs.append(p)
        return p


def move(via: Node, rsc: str, to: str, timeout: float = 60.0) -> None:
    """``crm_resource --move`` ``rsc`` to node ``to``.

    Right after a migration the resource can still be listed on both nodes
    until the source's stop is recorded; crm_resource then refuses ("Multiple
    items match request"): retried until the cluster has settled.
    """
    deadline = time.monotonic() + timeout
    while True:
        p = via.run("crm_resource", "--move", "--resource", rsc, "--node", to, check=False)
        if p.returncode == 0:
            return
        if "Multiple items match" not in p.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"crm_resource --move {rsc} to {to} failed ({p.returncode}): {p.stderr.strip()}")
        time.sleep(0.2)


class Cluster:
    """``Cluster(name, n)``: n nodes named n1..nN; ``with Cluster(...) as c:`` brings it up.

    ``name`` (1-8 letters/digits) prefixes the namespaces (NAME-br, NAME-n1...)
    and devices so concurrent users do not collide.  ``workdir`` holds the
    nodes' private directories and logs (a new temporary directory if None;
    removed at teardown unless ``keep``).  ``binds``: more (outside, inside)
    directories bind-mounted in every node (the inside one must exist), e.g. a
    lab's own OCF agent directory over ``/usr/lib/ocf/resource.d/PROVIDER``.
    """

    def __init__(self, name: str, nodes: int = 3, workdir: Path | None = None, keep: bool = False,
                 binds: Sequence[tuple[Path, str]] = ()) -> None:
        if not (1 <= len(name) <= 8 and name.isalnum()):
            raise ValueError(f"cluster name {name!r}: use 1-8 letters or digits")
        if not 1 <= nodes <= 16:
            raise ValueError("1 to 16 nodes")
        self.name = name
        self.keep = keep
        self.binds = [(Path(o), str(i)) for o, i in binds]
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"pcmklab-{name}-"))
        h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big")
        self.subnet = f"10.{208 + (h >> 13)}.{h & 0xFF}"  # a /24 picked from the name
        self.br_ns = f"{name}-br"
        self.nodes = [Node(name=f"n{i}", ip=f"{self.subnet}.{10 + i}", root=self.workdir / f"n{i}",
                           ns=f"{name}-n{i}") for i in range(1, nodes + 1)]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- bring up -----------------------------------------------------------

    def up(self, timeout: float = 120.0) -> Cluster:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot run a cluster here: {reason}")
        self._remove_namespaces()
        try:
            self._network()
            key = os.urandom(256)
            for n in self.nodes:
                self._prepare(n, key)
                self._anchor(n)
            for n in self.nodes:
                n.corosync = n.spawn("corosync", "-f", log=n.root / "corosync.out")
            for n in self.nodes:
                self.start_pacemaker(n)
            self.wait_online(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def start_pacemaker(self, n: Node) -> None:
        # pacemakerd runs in the foreground (2.1 ignores -f, later versions may not take it)
        n.pacemakerd = n.spawn("pacemakerd", log=n.root / "pacemakerd.out")

    def start_node(self, n: Node) -> None:
        """Start a stopped node's corosync and pacemakerd again (it then rejoins)."""
        n.corosync = n.spawn("corosync", "-f", log=n.root / "corosync.out")
        self.start_pacemaker(n)

    def _network(self) -> None:
        _run(["ip", "netns", "add", self.br_ns])
        _run(["ip", "-n", self.br_ns, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.br_ns, "link", "set", "br0", "up"])
        _run(["ip", "-n", self.br_ns, "link", "set", "lo", "up"])
        for i, n in enumerate(self.nodes, 1):
            _run(["ip", "netns", "add", n.ns])
            host_if, br_if = f"{self.name}h{i}", f"{self.name}b{i}"
            _run(["ip", "link", "add", host_if, "netns", n.ns, "type", "veth",
                  "peer", "name", br_if, "netns", self.br_ns])
            _run(["ip", "-n", self.br_ns, "link", "set", br_if, "master", "br0"])
            _run(["ip", "-n", self.br_ns, "link", "set", br_if, "up"])
            _run(["ip", "-n", n.ns, "link", "set", host_if, "name", "eth0"])
            _run(["ip", "-n", n.ns, "addr", "add", f"{n.ip}/24", "dev", "eth0"])
            _run(["ip", "-n", n.ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", n.ns, "link", "set", "lo", "up"])

    def corosync_conf(self) -> str:
        lines = ["totem {", "version: 2", f"cluster_name: {self.name}", "transport: knet",
                 # 10 s: a node stalled for a few seconds on a loaded machine is not
                 # declared dead (at the default 3.65 s a split started a resource twice)
                 "token: 10000", "crypto_cipher: none", "crypto_hash: none", "}",
                 "nodelist {"]
        for i, n in enumerate(self.nodes, 1):
            lines += ["node {", f"ring0_addr: {n.ip}", f"name: {n.name}", f"nodeid: {i}", "}"]
        lines += ["}", "quorum {", "provider: corosync_votequorum", "}",
                  "logging {", "to_logfile: yes", "logfile: /var/log/corosync/corosync.log",
                  "to_syslog: no", "to_stderr: no", "timestamp: on", "}",
                  # no real-time scheduling: corosync 3.1.7 has no -p
                  "system {", "sched_rr: no", "}"]
        return "\n".join(lines) + "\n"

    def _prepare(self, n: Node, key: bytes) -> None:
        import grp
        import pwd

        uid, gid = pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid
        r = n.root
        for d in ("etc-corosync", "var-lib-corosync", "var-log/corosync", "var-log/crmsh"):
            (r / d).mkdir(parents=True, exist_ok=True)
        for d, mode in (("var-lib-pacemaker", 0o750), ("var-lib-pacemaker/cib", 0o750),
                        ("var-lib-pacemaker/pengine", 0o750), ("var-lib-pacemaker/blackbox", 0o750),
                        ("var-lib-pacemaker/cores", 0o750), ("var-log/pacemaker", 0o770)):
            (r / d).mkdir(parents=True, exist_ok=True)
            os.chown(r / d, uid, gid)
            os.chmod(r / d, mode)
        (r / "etc-corosync/corosync.conf").write_text(self.corosync_conf())
        authkey = r / "etc-corosync/authkey"
        authkey.write_bytes(key)
        os.chmod(authkey, 0o400)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{m.ip} {m.name}\n" for m in self.nodes)
        (r / "hosts").write_text(hosts)
        # A seeded CIB: the DC election waits dc-deadtime (20 s by default) on an empty one.
        cib = r / "var-lib-pacemaker/cib/cib.xml"
        env = dict(os.environ, CIB_file=str(cib))
        cib.write_text(_run(["cibadmin", "--empty"], timeout=30))
        for prop, value in (("dc-deadtime", "2s"), ("stonith-enabled", "false"),
                            ("no-quorum-policy", "stop")):
            subprocess.run(["crm_attribute", "--type", "crm_config", "--name", prop, "--update", value],
                           env=env, check=True, capture_output=True, timeout=30)
        for f in (r / "var-lib-pacemaker/cib").iterdir():
            os.chown(f, uid, gid)
            os.chmod(f, 0o600)

    def _anchor(self, n: Node) -> None:
        n.anchor = subprocess.Popen(
            ["ip", "netns", "exec", n.ns, "unshare", "--mount", "--uts", "--propagation", "private",
             "--", "sh", "-c", _ANCHOR, "anchor", str(n.root), n.name,
             *[x for o, i in self.binds for x in (str(o), i)]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert n.anchor.stdout is not None
        line = n.anchor.stdout.readline()
        if line.strip() != b"ready":
            err = n.anchor.stderr.read().decode() if n.anchor.stderr else ""
            raise RuntimeError(f"{n.name}: could not set up its namespaces: {err.strip()}")

    # -- status ---------------------------------------------------------------

    def online(self, via: Node | None = None) -> list[str]:
        """Names of the nodes the cluster reports online (from ``via``'s view)."""
        via = via or self.nodes[0]
        p = via.run("crm_mon", "-1", "--output-as=xml", check=False, timeout=30)
        if p.returncode != 0:
            return []
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(p.stdout)
        except ET.ParseError:
            return []
        return [e.get("name", "") for e in root.iter("node")
                if e.get("online") == "true" and e.get("name")]

    def wait_online(self, timeout: float = 120.0, nodes: Sequence[Node] | None = None) -> None:
        want = sorted(n.name for n in (nodes or self.nodes))
        deadline = time.monotonic() + timeout
        while True:
            for n in self.nodes:
                for what, p in (("corosync", n.corosync), ("pacemakerd", n.pacemakerd)):
                    if p is not None and p.poll() is not None and n in (nodes or self.nodes):
                        raise RuntimeError(f"{n.name}: {what} exited {p.returncode} (see {n.root})")
            if sorted(self.online((nodes or self.nodes)[0])) == want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not come up within {timeout:.0f} s "
                                   f"(online: {self.online()}; logs under {self.workdir})")
            time.sleep(0.5)

    # -- tear down -------------------------------------------------------------

    def stop_node(self, n: Node, corosync_only: bool = False) -> None:
        """Stop a node's cluster daemons by PID (pacemakerd, then corosync)."""
        if not corosync_only and n.pacemakerd is not None:
            _stop_pid(n.pacemakerd, 60)
        if n.corosync is not None:
            _stop_pid(n.corosync, 30)

    def down(self) -> None:
        # pacemakerd first, on every node at once, then corosync, then the rest
        for n in self.nodes:
            if n.pacemakerd is not None and n.pacemakerd.poll() is None:
                n.pacemakerd.send_signal(signal.SIGTERM)
        for n in self.nodes:
            if n.pacemakerd is not None:
                _stop_pid(n.pacemakerd, 60)
        for n in self.nodes:
            if n.corosync is not None and n.corosync.poll() is None:
                n.corosync.send_signal(signal.SIGTERM)
        for n in self.nodes:
            if n.corosync is not None:
                _stop_pid(n.corosync, 30)
        for n in self.nodes:
            for p in reversed(n.procs):
                _stop_pid(p, 15)
        for n in self.nodes:
            self.kill_strays(n)
            if n.anchor is not None:
                _stop_pid(n.anchor, 10)
        self._remove_namespaces()
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def node_pids(self, n: Node) -> list[int]:
        """Processes inside node ``n`` (its mount namespace), the anchor excluded."""
        if n.anchor is None or n.anchor.poll() is not None:
            return []
        try:
            mnt = os.readlink(f"/proc/{n.anchor.pid}/ns/mnt")
        except OSError:
            return []
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != n.anchor.pid:
                try:
                    if os.readlink(f"/proc/{d}/ns/mnt") == mnt:
                        pids.append(int(d))
                except OSError:
                    continue
        return pids

    def kill_strays(self, n: Node) -> None:
        """Kill, by PID, what still runs inside the node (workloads the agent started)."""
        for pid in self.node_pids(n):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _remove_namespaces(self) -> None:
        for ns in [n.ns for n in self.nodes] + [self.br_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


class PrecopyCluster(Cluster):
    """A :class:`Cluster` whose nodes run precopy: ``precopy-dest`` on NODE_IP:7070 (memory
    dir /dev/shm/precopy, hook ``precopy-ocf resume``, a shared key) and ``precopy-source
    serve`` (control /run/precopy/source.sock), with this checkout's
    ``ocf:precopy:workload`` bind-mounted over /usr/lib/ocf/resource.d/precopy in every node.
    """

    MEMORY_DIR = "/dev/shm/precopy"
    PORT = 7070

    def __init__(self, name: str, nodes: int = 3, workdir: Path | None = None, keep: bool = False,
                 python: str | None = None, dest_args: Sequence[str] = (),
                 source_args: Sequence[str] = ()) -> None:
        import sys

        from precopy_agents.ocf import install

        super().__init__(name, nodes, workdir, keep)
        self.python = python or sys.executable
        ocf_root = self.workdir / "ocf"
        install(ocf_root)
        self.binds = [(ocf_root / "resource.d" / "precopy", "/usr/lib/ocf/resource.d/precopy")]
        self.key = self.workdir / "migration.key"
        self.key.write_bytes(os.urandom(32).hex().encode())
        os.chmod(self.key, 0o600)
        self.dest_args, self.source_args = list(dest_args), list(source_args)
        self.dest: dict[str, subprocess.Popen[bytes]] = {}
        self.source: dict[str, subprocess.Popen[bytes]] = {}

    def dest_rule(self) -> str:
        """The resource parameter ``dest`` for these nodes."""
        return " ".join(f"{n.name}={n.ip}:{self.PORT}" for n in self.nodes)

    def up(self, timeout: float = 120.0) -> PrecopyCluster:
        if unavailable_reason() is None:
            Path("/usr/lib/ocf/resource.d/precopy").mkdir(parents=True, exist_ok=True)
        super().up(timeout)
        try:
            for n in self.nodes:
                self.start_dest(n)
                self.source[n.name] = n.spawn(
                    self.python, "-m", "precopy_agents.source_main", "serve", "--control", "/run/precopy/source.sock",
                    "--report-dir", "/run/precopy/reports", "--log-level", "info", *self.source_args,
                    log=n.root / "precopy-source.log")
            for n in self.nodes:
                self.wait_precopy(n)
        except BaseException:
            self.down()
            raise
        return self

    def start_dest(self, n: Node) -> subprocess.Popen[bytes]:
        ready = n.root / "dest.ready"
        ready.unlink(missing_ok=True)
        p = n.spawn(self.python, "-m", "precopy_agents.dest_main", "--listen", f"{n.ip}:{self.PORT}",
                    "--memory-dir", self.MEMORY_DIR, "--auth-key-file", str(self.key),
                    "--on-resume", f"exec {shlex.quote(self.python)} -m precopy_agents.ocf resume",
                    "--ready-file", str(ready), "--log-level", "info", *self.dest_args,
                    log=n.root / "precopy-dest.log")
        self.dest[n.name] = p
        return p

    def wait_precopy(self, n: Node, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ((n.root / "dest.ready").exists() and n.path("/run/precopy/source.sock").exists()):
            for what, p in (("precopy-dest", self.dest[n.name]), ("precopy-source serve", self.source[n.name])):
                if p.poll() is not None:
                    raise RuntimeError(f"{n.name}: {what} exited {p.returncode} (see {n.root})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n.name}: precopy daemons not ready within {timeout:.0f} s")
            time.sleep(0.1)

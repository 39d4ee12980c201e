"""ocf:precopy:workload without a cluster: parameters, meta-data, the actions' OCF codes
on one node, and how migrate_to maps the source daemon's outcomes (a scripted daemon on
the control socket).  The real cluster is tests/test_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import pytest

from precopy_agents import ocf

from .conftest import wait_for


def test_dest_address_rules() -> None:
    assert ocf.dest_address("{node}:7070", "n2") == "n2:7070"
    assert ocf.dest_address("{node}.mig.example:7070", "a") == "a.mig.example:7070"
    table = "n1=10.0.0.1:7070 n2=10.0.0.2:7071,n3=[::1]:7072"
    assert ocf.dest_address(table, "n2") == "10.0.0.2:7071"
    assert ocf.dest_address(table, "n3") == "[::1]:7072"
    with pytest.raises(ocf.ConfigError, match="no address for node 'n9'"):
        ocf.dest_address(table, "n9")
    for bad in ("n1", "n1=host", "n1=host:0", "n1=host:x", "=h:1"):
        with pytest.raises(ocf.ConfigError):
            ocf.check_dest(bad)
    with pytest.raises(ocf.ConfigError, match="empty"):
        ocf.check_dest("  ")
    ocf.check_dest(table)


def test_params_are_checked() -> None:
    good = {"memory": "/dev/shm/precopy/w1", "start_command": "exec sleep 100"}
    p = ocf.Params.from_values("w1", good)
    assert p.downtime_ms == 300 and p.dest == "{node}:7070" and not p.keep_source_copy
    assert p.pid_file == Path("/run/precopy-ocf/w1.pid")
    for change, msg in (({"memory": ""}, "'memory' is required"),
                        ({"start_command": ""}, "'start_command' is required"),
                        ({"memory": "w1"}, "absolute path"),
                        ({"downtime_ms": "fast"}, "not a number"),
                        ({"downtime_ms": "0"}, "positive"),
                        ({"tls": "maybe"}, "true or false"),
                        ({"source_options": "--x 'unclosed"}, "source_options"),
                        ({"state_dir": "rel"}, "absolute")):
        with pytest.raises(ocf.ConfigError, match=msg):
            ocf.Params.from_values("w1", dict(good, **change))
    with pytest.raises(ocf.ConfigError, match="resource name"):
        ocf.Params.from_values("a/b", good)


def test_meta_data_is_valid_and_documents_what_pacemaker_needs() -> None:
    root = ET.fromstring(ocf.meta_data().split("\n", 2)[2])
    actions = {a.get("name") for a in root.iter("action")}
    assert actions == {"start", "stop", "monitor", "migrate_to", "migrate_from", "meta-data", "validate-all"}
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert params["memory"].get("required") == "1" and params["memory"].get("unique") == "1"
    assert {"start_command", "dest", "downtime_ms", "auth_key_file", "tls_ca", "guest_control"} <= set(params)
    longdesc = root.findtext("longdesc") or ""
    assert "utilization memory=" in longdesc and "placement-strategy=balanced" in longdesc
    assert "allow-migrate=true" in longdesc and "on-fail=block" in longdesc


CIB = """<resources>
  <primitive id="other" class="ocf" provider="heartbeat" type="Dummy"/>
  <primitive id="w7" class="ocf" provider="precopy" type="workload">
    <instance_attributes id="w7-ia">
      <nvpair id="a" name="memory" value="/dev/shm/precopy/w7"/>
      <nvpair id="b" name="start_command" value="exec run-it"/>
    </instance_attributes>
  </primitive>
</resources>"""


def test_resume_hook_finds_its_resource_in_the_cib() -> None:
    assert ocf.find_resource(CIB, "/dev/shm/precopy/w7") == (
        "w7", {"memory": "/dev/shm/precopy/w7", "start_command": "exec run-it"})
    assert ocf.find_resource(CIB, "/dev/shm/precopy//w7") is not None  # same file
    assert ocf.find_resource(CIB, "/dev/shm/precopy/w8") is None


def test_installed_wrapper_answers_meta_data_without_python(tmp_path: Path) -> None:
    path = ocf.install(tmp_path)
    assert path == tmp_path / "resource.d/precopy/workload" and os.access(path, os.X_OK)
    out = subprocess.run(["/bin/sh", str(path), "meta-data"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout == ocf.meta_data()
    rc = subprocess.run([str(path), "monitor"], capture_output=True, text=True,
                        env=dict(os.environ, OCF_RESKEY_CRM_meta_interval="10000"))
    assert rc.returncode == ocf.OCF_ERR_CONFIGURED and "'memory' is required" in rc.stderr


def test_cli_help_and_usage() -> None:
    assert ocf.main(["--help"]) == 0
    assert ocf.main([]) == 2
    assert ocf.main(["reboot"]) == ocf.OCF_ERR_UNIMPLEMENTED


# -- actions on one node ---------------------------------------------------------------

class Node:
    """One node's view: a region dir, a state dir, and the agent run as Pacemaker runs it."""

    def __init__(self, root: Path, **params: str) -> None:
        self.region = root / "mem" / "w1"
        self.region.parent.mkdir()
        self.state = root / "state"
        self.control = root / "source.sock"
        self.params = {"memory": str(self.region), "start_command": "exec sleep 300",
                       "state_dir": str(self.state), "control": str(self.control),
                       "dest": "n1=127.0.0.1:1 n2=127.0.0.1:2", **params}

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OCF_")}
        env.update({f"OCF_RESKEY_{k}": v for k, v in self.params.items()})
        env.update({"OCF_RESOURCE_INSTANCE": "w1", "OCF_RESKEY_CRM_meta_timeout": "20000", **extra})
        return env

    def act(self, action: str, **extra: str) -> int:
        old = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env(**extra))
        try:
            return ocf.run_action(action)
        finally:
            os.environ.clear()
            os.environ.update(old)

    @property
    def p(self) -> ocf.Params:
        return ocf.Params.from_values("w1", self.params)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    pid = ocf.workload_pid(n.p) if n.p.pid_file.exists() else None
    if pid is not None:
        ocf._kill_group(pid, 2)


def test_start_only_where_the_memory_is_and_monitor_tells_the_truth(node: Node) -> None:
    assert node.act("monitor") == ocf.OCF_NOT_RUNNING
    assert node.act("start") == ocf.OCF_ERR_INSTALLED  # no region here: never a copy
    assert node.act("monitor") == ocf.OCF_NOT_RUNNING
    node.region.write_bytes(b"\0" * 4096)
    assert node.act("start") == ocf.OCF_SUCCESS
    pid = ocf.workload_pid(node.p)
    assert pid is not None
    assert node.act("start") == ocf.OCF_SUCCESS  # already running: no second process
    assert ocf.workload_pid(node.p) == pid
    assert node.act("monitor") == ocf.OCF_SUCCESS
    os.kill(pid, 9)
    wait_for(lambda: ocf._start_time(pid) is None, 10, "the workload to die")
    assert node.act("monitor") == ocf.OCF_ERR_GENERIC  # it was running here and died
    assert node.act("stop") == ocf.OCF_SUCCESS
    assert node.act("monitor") == ocf.OCF_NOT_RUNNING
    assert node.act("start") == ocf.OCF_SUCCESS
    assert node.act("stop") == ocf.OCF_SUCCESS
    assert node.region.exists()  # stop keeps the memory: start here runs it again


def test_start_fails_when_the_command_does(node: Node) -> None:
    node.region.write_bytes(b"\0" * 4096)
    node.params["start_command"] = "echo no such workload >&2; exit 3"
    assert node.act("start") == ocf.OCF_ERR_GENERIC
    assert "no such workload" in node.p.log_file.read_text()
    assert node.act("monitor") == ocf.OCF_NOT_RUNNING


class FakeDaemon:
    """The source daemon's control socket, answering start/watch/status with a scripted end."""

    def __init__(self, path: Path, final: str, report: dict[str, Any]) -> None:
        self.final, self.report = final, report
        self.requests: list[dict[str, Any]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                req = json.loads(conn.makefile("rb").readline())
                self.requests.append(req)
                job = {"id": "x", "state": self.final}
                if req["op"] == "start":
                    ans: dict[str, Any] = {"ok": True, "id": req["argv"][req["argv"].index("--migration-id") + 1]}
                elif req["op"] == "watch":
                    conn.sendall(json.dumps({"ok": True, "event": "progress", "round": 1}).encode() + b"\n")
                    ans = {"ok": True, "event": "done", "job": job, "report": self.report}
                else:
                    ans = {"ok": True, "job": job, "report": self.report}
                conn.sendall(json.dumps(ans).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("final", ["committed", "aborted", "in-doubt"])
def test_migrate_to_maps_outcomes(node: Node, final: str) -> None:
    node.region.write_bytes(b"\1" * 4096)
    node.params["keep_source_copy"] = "true"
    assert node.act("start") == ocf.OCF_SUCCESS
    pid = ocf.workload_pid(node.p)
    assert pid is not None
    daemon = FakeDaemon(node.control, final, {"outcome": final, "downtime_ms": 12.5})
    try:
        rc = node.act("migrate_to", OCF_RESKEY_CRM_meta_migrate_target="n2")
        start = daemon.requests[0]
        argv = start["argv"]
        assert argv[argv.index("--to") + 1] == "127.0.0.1:2" and argv[argv.index("--pid") + 1] == str(pid)
        mid = argv[argv.index("--migration-id") + 1]
        assert json.loads(node.p.report_file.read_text())["downtime_ms"] == 12.5
        if final == "committed":
            assert rc == ocf.OCF_SUCCESS
            # the source copy is ended and its region retired at once
            assert not node.region.exists()
            assert (node.region.parent / f".w1.{mid}.migrated").exists()
            wait_for(lambda: ocf._start_time(pid) is None, 10, "the source copy to end")
            assert node.act("monitor") == ocf.OCF_NOT_RUNNING
            assert node.act("start") == ocf.OCF_ERR_INSTALLED
        elif final == "aborted":
            assert rc == ocf.OCF_ERR_GENERIC
            assert node.region.exists() and ocf.workload_pid(node.p) == pid
            assert not node.p.migrating_file.exists()
            assert node.act("monitor") == ocf.OCF_SUCCESS
        else:
            assert rc == ocf.OCF_ERR_GENERIC
            assert json.loads(node.p.in_doubt_file.read_text())["id"] == mid
            # nothing may start, report running, or kill the paused copy here
            assert node.act("monitor") == ocf.OCF_ERR_GENERIC
            assert node.act("start") == ocf.OCF_ERR_GENERIC
            assert node.act("stop") == ocf.OCF_ERR_GENERIC
            assert ocf.workload_pid(node.p) == pid
            # once the daemon learns the outcome (here: committed), the node settles
            daemon.final = "committed"
            assert node.act("monitor") == ocf.OCF_NOT_RUNNING
            assert not node.p.in_doubt_file.exists() and not node.region.exists()
            with pytest.raises(RuntimeError, match="no migration of w1 is in doubt"):
                ocf.resolve(node.p, "aborted")
    finally:
        daemon.close()


def test_migrate_to_without_a_daemon_changes_nothing(node: Node) -> None:
    node.region.write_bytes(b"\1" * 4096)
    assert node.act("start") == ocf.OCF_SUCCESS
    pid = ocf.workload_pid(node.p)
    assert node.act("migrate_to", OCF_RESKEY_CRM_meta_migrate_target="n2") == ocf.OCF_ERR_GENERIC
    assert not node.p.migrating_file.exists() and ocf.workload_pid(node.p) == pid
    assert node.act("migrate_to", OCF_RESKEY_CRM_meta_migrate_target="n9") == ocf.OCF_ERR_CONFIGURED
    assert node.act("migrate_to") == ocf.OCF_ERR_ARGS
    assert "cannot reach the source daemon" in (node.state / "agent.log").read_text()


def test_migrate_from_waits_for_the_resumed_workload(node: Node) -> None:
    assert node.act("migrate_from", OCF_RESKEY_CRM_meta_timeout="6000") == ocf.OCF_ERR_GENERIC
    node.region.write_bytes(b"\1" * 4096)
    proc = subprocess.Popen(["sleep", "300"])
    try:
        t = threading.Timer(0.5, ocf.record_pid, (node.p, proc.pid))
        t.start()
        assert node.act("migrate_from", OCF_RESKEY_CRM_meta_migrate_source="n1") == ocf.OCF_SUCCESS
        assert node.act("monitor") == ocf.OCF_SUCCESS
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("outcome", ["committed", "aborted"])
def test_operator_resolves_a_migration_in_doubt(node: Node, outcome: str) -> None:
    node.region.write_bytes(b"\1" * 4096)
    assert node.act("start") == ocf.OCF_SUCCESS
    pid = ocf.workload_pid(node.p)
    assert pid is not None
    os.kill(pid, 19)  # paused, as the source daemon leaves it in doubt
    ocf._write_marker(node.p.in_doubt_file, {"id": "m1", "target": "n2"})
    assert node.act("start") == ocf.OCF_ERR_GENERIC
    print(ocf.resolve(node.p, outcome))
    if outcome == "committed":
        wait_for(lambda: ocf._start_time(pid) is None, 10, "the paused copy to end")
        assert not node.region.exists() and node.act("monitor") == ocf.OCF_NOT_RUNNING
    else:
        wait_for(lambda: ocf._proc_state(pid) in "RS", 10, "the copy to run again")
        assert node.act("monitor") == ocf.OCF_SUCCESS
    assert not node.p.in_doubt_file.exists()


@pytest.mark.parametrize("graceful", [False, True], ids=["paused-copy", "stop"])
def test_a_committed_source_copy_is_killed_without_running_again(tmp_path: Path, graceful: bool) -> None:
    """After a commit the paused copy gets SIGKILL only: continued to see a TERM, its handler ran
    (the cluster test's guest wrote into the old region while the target's copy ran)."""
    ran, ready = tmp_path / "ran-again", tmp_path / "ready"
    code = ("import pathlib, signal, sys, time\n"
            "def term(*_):\n"
            f"    pathlib.Path({str(ran)!r}).touch()\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, term)\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "while True:\n"
            "    time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        wait_for(ready.exists, 60, "the workload's TERM handler")
        os.kill(proc.pid, signal.SIGSTOP)
        assert ocf._kill_group(proc.pid, 60, graceful=graceful)
        proc.wait(10)
        assert ran.exists() is graceful  # a stop (graceful) lets it end cleanly; a retirement never
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

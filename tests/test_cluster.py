"""precopy as a Pacemaker resource, in a real 3-node Corosync/Pacemaker cluster.

Three nodes in their own network, mount and UTS namespaces (precopy.lab.pcmk),
each running corosync, pacemakerd, precopy-dest and precopy-source serve;
three ocf:precopy:workload resources, each a dirtying guest on a 32 MiB region.
The scenarios of issue 20, each ending with every migrated workload checked
byte-exact against its paused source copy (the region as the guest on the
target found it, digested before it ran, against the source's region kept by
keep_source_copy) and every workload running on exactly one node (found by
scanning /proc, not by asking the agent).  Needs root and Debian's
pacemaker, corosync, pacemaker-cli-utils and crmsh (.ci/run installs them).
"""

from __future__ import annotations

import json
import shlex
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from precopy.guest import region_digest
from precopy.lab.pcmk import PrecopyCluster, move, unavailable_reason

from .conftest import PY, SH_PY, wait_for

pytestmark = [pytest.mark.slow]

_REASON = unavailable_reason()
if _REASON is None and subprocess.run(["which", "crm"], capture_output=True).returncode != 0:
    _REASON = "crmsh is not installed (apt-get install --no-install-recommends crmsh)"

RES = ("w1", "w2", "w3")
BUDGET_MS = 2000  # per workload; a 32 MiB guest at 2,000 pages/s pauses for tens of ms
SETTLE_S = 120.0  # generous: waits end as soon as the cluster gets there


def _config(c: PrecopyCluster, workload: Path) -> str:
    lines = ["property placement-strategy=balanced",
             "rsc_defaults resource-stickiness=100"]
    for n in c.nodes:
        lines.append(f"node {n.name} utilization memory=256")
    for r in RES:
        lines.append(
            f"primitive {r} ocf:precopy:workload "
            f'params memory={c.MEMORY_DIR}/{r} start_command="exec {workload}" '
            f'dest="{c.dest_rule()}" auth_key_file={c.key} downtime_ms={BUDGET_MS} '
            f"keep_source_copy=true "
            "op monitor interval=5s timeout=30s "
            "op start timeout=60s op stop timeout=60s "
            "op migrate_to timeout=120s on-fail=block op migrate_from timeout=60s "
            "meta allow-migrate=true "
            "utilization memory=32")
        lines.append(f"location {r}-home {r} 10: n1")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if _REASON:
        pytest.skip(f"no cluster here: {_REASON}")
    work = tmp_path_factory.mktemp("cluster")
    c = PrecopyCluster(f"cl{os.getpid() % 100000}", workdir=work)
    failed = request.session.testsfailed
    c.up()
    try:
        yield Lab(c, work)
    finally:
        if request.session.testsfailed > failed:
            _keep_logs(c)
        c.down()


def _keep_logs(c: PrecopyCluster) -> None:
    """After a failure: every node's cluster, daemon and agent logs, out of pytest's rotation."""
    import shutil
    import tempfile

    keep = Path(tempfile.mkdtemp(prefix="test_cluster-logs-"))
    for n in c.nodes:
        d = keep / n.name
        shutil.copytree(n.root / "var-log", d / "var-log", ignore_dangling_symlinks=True, dirs_exist_ok=True)
        for f in n.root.glob("*.log"):
            shutil.copy(f, d)
        try:
            shutil.copytree(n.path("/run/precopy-ocf"), d / "precopy-ocf")
        except OSError as exc:
            print(f"{n.name}: no agent state to keep: {exc}")
    print(f"\ntest_cluster: the cluster's logs are kept in {keep}")


class Lab:
    """The cluster plus what the checks need: where each workload runs, its reports and digests."""

    def __init__(self, c: PrecopyCluster, work: Path) -> None:
        self.c = c
        self.digests = work / "digests"
        self.digests.mkdir()
        # The workload: digest the region as found (what the source paused), then run on it.
        self.workload = work / "workload.sh"
        self.workload.write_text(
            "#!/bin/sh\n"
            f"{SH_PY} -c 'import os, sys; from precopy.guest import region_digest; "
            "open(sys.argv[1] + \"/\" + os.environ[\"PRECOPY_RESOURCE\"] + \".\" + "
            "(os.environ[\"PRECOPY_MIGRATION_ID\"] or \"start\"), \"w\").write("
            f"region_digest(os.environ[\"PRECOPY_MEMORY\"]))' {shlex.quote(str(self.digests))} || exit 1\n"
            f'exec {SH_PY} -m precopy.guest dirty --memory "$PRECOPY_MEMORY" --rate 2000 --seed $$\n')
        self.workload.chmod(0o755)
        self.n1 = c.nodes[0]
        for r in RES:
            self.n1.run(PY, "-m", "precopy.guest", "create", "--memory", f"{c.MEMORY_DIR}/{r}",
                        "--size", "32M", "--content", "half-text")
        conf = work / "resources.crm"
        conf.write_text(_config(c, self.workload))
        self.n1.run("crm", "configure", "load", "update", str(conf))
        self.wait(lambda: all(self.where(r) == ["n1"] for r in RES), "the workloads to start on n1")
        self.one_copy_each()

    # -- the cluster's view ------------------------------------------------------------

    def mon(self, via: str = "n1") -> ET.Element:
        p = self.c.node(via).run("crm_mon", "-1", "--output-as=xml", "--inactive", timeout=60)
        return ET.fromstring(p.stdout)

    def where(self, rsc: str, via: str = "n1") -> list[str]:
        """Nodes the cluster says ``rsc`` is started on (empty while it is stopped or moving)."""
        for e in self.mon(via).iter("resource"):
            if e.get("id") == rsc:
                if e.get("role") != "Started" or e.get("failed") == "true":
                    return []
                return sorted(n.get("name", "") for n in e.findall("node"))
        raise AssertionError(f"no resource {rsc} in crm_mon")

    def failures(self, rsc: str, via: str = "n1") -> list[dict[str, str]]:
        return [dict(e.attrib) for e in self.mon(via).iter("failure")
                if e.get("op_key", "").startswith(f"{rsc}_")]

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = SETTLE_S) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while not pred():
            if time.monotonic() > deadline:
                mon = self.c.nodes[0].run("crm_mon", "-1", "--failcounts", check=False).stdout
                raise AssertionError(f"timed out waiting for {what}:\n{mon}\n{self.agent_logs()}")
            time.sleep(0.25)
        print(f"{time.strftime('%T')} {time.monotonic() - t0:6.1f} s  {what}")

    def agent_logs(self) -> str:
        out = []
        for n in self.c.nodes:
            try:
                out.append(f"--- {n.name}\n" + n.path("/run/precopy-ocf/agent.log").read_text()[-3000:])
            except OSError:
                pass
        return "\n".join(out)

    # -- the truth, from /proc ----------------------------------------------------------

    def copies(self, rsc: str) -> dict[str, list[tuple[int, str]]]:
        """Per node, the processes running workload ``rsc``: (pid, state).

        A workload process is one started with PRECOPY_RESOURCE=rsc (by the
        agent's start or precopy-dest's hook): workload.sh while it digests
        the region, then the guest it execs; the digesting child is not one.
        """
        tag = f"PRECOPY_RESOURCE={rsc}".encode()
        found: dict[str, list[tuple[int, str]]] = {}
        for n in self.c.nodes:
            for pid in self.c.node_pids(n):
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                    stat = Path(f"/proc/{pid}/stat").read_bytes()
                except OSError:
                    continue
                if tag in env and b"region_digest" not in argv:
                    state = stat[stat.rindex(b")") + 2:][:1].decode()
                    if state not in "ZX":
                        found.setdefault(n.name, []).append((pid, state))
        return found

    def one_copy_each(self) -> None:
        for r in RES:
            where = self.where(r)
            copies = self.copies(r)
            assert len(where) == 1, f"{r}: the cluster says it runs on {where}"
            assert list(copies) == where and len(copies[where[0]]) == 1, \
                f"{r}: running copies {copies}, the cluster says {where}"
            pid, state = copies[where[0]][0]
            assert state != "T", f"{r}: its only copy (pid {pid} on {where[0]}) is stopped"

    # -- migrations ----------------------------------------------------------------------

    def report(self, rsc: str, node: str) -> dict[str, Any] | None:
        path = self.c.node(node).path(f"/run/precopy-ocf/{rsc}.report.json")
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def check_migrated(self, rsc: str, source: str, before: dict[str, Any] | None) -> dict[str, Any]:
        """The latest migration of ``rsc`` from ``source`` committed within budget, byte-exact."""
        rep = self.report(rsc, source)
        assert rep is not None and rep != before, f"{rsc}: no new report on {source}"
        assert rep["outcome"] == "committed", rep.get("error")
        assert rep["downtime_ms"] <= BUDGET_MS, f"{rsc}: downtime {rep['downtime_ms']} ms"
        mid = rep["migration_id"]
        kept = self.c.node(source).path(f"{self.c.MEMORY_DIR}/.{rsc}.{mid}.migrated")
        got = self.digests / f"{rsc}.{mid}"
        self.wait(got.exists, f"{rsc}: the target's digest at resume", 60)
        self.wait(lambda: got.stat().st_size > 0, f"{rsc}: the digest written", 30)
        assert got.read_text() == region_digest(kept), f"{rsc}: target's region differs from the paused source"
        kept.unlink()
        assert not self.c.node(source).path(f"{self.c.MEMORY_DIR}/{rsc}").exists(), \
            f"{rsc}: the source {source} still holds a region under the workload's name"
        return rep

    def move(self, rsc: str, to: str) -> None:
        move(self.n1, rsc, to)

    def clear(self, rsc: str) -> None:
        self.n1.run("crm_resource", "--clear", "--resource", rsc)


def retry(lab: Lab, rsc: str) -> None:
    """The README's procedure after a failed migration: forget the resource's history
    under maintenance (so the cluster acts on nothing until every node is re-probed)."""
    lab.n1.run("crm_resource", "--resource", rsc, "--meta", "--set-parameter", "maintenance",
               "--parameter-value", "true")
    lab.n1.run("crm_resource", "--refresh", "--resource", rsc)
    lab.n1.run("crm_resource", "--wait", "--timeout", f"{SETTLE_S:.0f}s", timeout=SETTLE_S + 30)
    lab.n1.run("crm_resource", "--resource", rsc, "--meta", "--delete-parameter", "maintenance")


def _standby(lab: Lab, node: str, on: bool) -> None:
    lab.n1.run("crm_attribute", "--node", node, "--name", "standby", "--update", "on" if on else "off")


def _gather_on_n1(lab: Lab) -> None:
    """Every workload on n1, as the lab starts them (other scenarios, in any order, move some)."""
    for r in RES:
        src = lab.where(r)[0]
        if src != "n1":
            before = lab.report(r, src)
            lab.move(r, "n1")
            lab.wait(lambda r=r: lab.where(r) == ["n1"], f"{r} to come back to n1")
            lab.check_migrated(r, src, before)
            lab.clear(r)
    lab.one_copy_each()


def test_standby_drains_three_live_and_one_moves_back(lab: Lab) -> None:
    _gather_on_n1(lab)
    before = {r: lab.report(r, "n1") for r in RES}
    _standby(lab, "n1", True)
    try:
        lab.wait(lambda: all(lab.where(r) and lab.where(r) != ["n1"] for r in RES),
                 "all three workloads to leave n1")
        for r in RES:
            lab.check_migrated(r, "n1", before[r])
            assert not lab.failures(r), lab.failures(r)
        # balanced placement: 3 x 32 MiB over two nodes of 256 MiB: not all on one
        assert len({lab.where(r)[0] for r in RES}) == 2
        lab.one_copy_each()
    finally:
        _standby(lab, "n1", False)  # also after a failure: the other scenarios need n1
    src = lab.where("w1")[0]
    before1 = lab.report("w1", src)
    lab.move("w1", "n1")
    lab.wait(lambda: lab.where("w1") == ["n1"], "w1 to move back to n1")
    lab.check_migrated("w1", src, before1)
    lab.clear("w1")
    lab.one_copy_each()


def test_crm_resource_move_one(lab: Lab) -> None:
    src = lab.where("w2")[0]
    to = next(n.name for n in lab.c.nodes if n.name != src)
    before = lab.report("w2", src)
    lab.move("w2", to)
    lab.wait(lambda: lab.where("w2") == [to], f"w2 to move to {to}")
    lab.check_migrated("w2", src, before)
    lab.clear("w2")
    assert not lab.failures("w2")
    lab.one_copy_each()


def test_dest_killed_mid_migration_keeps_it_on_the_source_and_a_retry_elsewhere_works(lab: Lab) -> None:
    src = lab.where("w3")[0]
    bad, good = [n.name for n in lab.c.nodes if n.name != src]
    (pid, _), = lab.copies("w3")[src]
    dest = lab.c.dest[bad]
    marker = lab.c.node(src).path("/run/precopy-ocf/w3.migrating")
    dest.send_signal(signal.SIGSTOP)  # hold the migration in its handshake, then kill the daemon
    try:
        lab.move("w3", bad)
        wait_for(marker.exists, 60, "the migration to start")
        time.sleep(0.5)
    finally:
        dest.kill()
        dest.wait(10)
    lab.wait(lambda: any(f.get("task") == "migrate_to" for f in lab.failures("w3")),
             "Pacemaker to record the failed migrate_to")
    fails = lab.failures("w3")
    assert [f["node"] for f in fails] == [src], fails
    # rolled back: the workload runs on its source again, and only there
    lab.wait(lambda: list(lab.copies("w3")) == [src] and lab.copies("w3")[src][0][1] != "T",
             "w3 to run on its source again")
    rep = lab.report("w3", src)
    assert rep is not None and rep["outcome"] == "aborted", rep
    assert lab.c.node(src).path(f"{lab.c.MEMORY_DIR}/w3").exists()
    assert not lab.c.node(bad).path(f"{lab.c.MEMORY_DIR}/w3").exists()

    lab.c.start_dest(lab.c.node(bad))
    lab.c.wait_precopy(lab.c.node(bad))
    # the operator's retry: forget the failed move, let Pacemaker re-probe, move elsewhere
    lab.clear("w3")
    retry(lab, "w3")
    lab.wait(lambda: lab.where("w3") == [src], "w3 to be seen on its source only")
    assert list(lab.copies("w3")) == [src] and [p for p, _ in lab.copies("w3")[src]] == [pid], \
        f"the workload was restarted, not left running (pid {pid} before): {lab.copies('w3')}"
    lab.move("w3", good)
    lab.wait(lambda: lab.where("w3") == [good], f"the retry to move w3 to {good}")
    lab.check_migrated("w3", src, rep)
    lab.clear("w3")
    assert not lab.failures("w3")
    lab.one_copy_each()


def test_power_cut_node_never_gets_a_second_copy(lab: Lab) -> None:
    on = {r: lab.where(r)[0] for r in RES}
    cut = max({n for n in on.values()}, key=lambda n: list(on.values()).count(n))
    victims = [r for r in RES if on[r] == cut]
    survivor = next(n.name for n in lab.c.nodes if n.name != cut)
    node = lab.c.node(cut)
    assert node.corosync is not None
    node.corosync.kill()  # the node is gone for the others; its workloads go on running
    node.corosync.wait(10)
    lab.wait(lambda: cut not in lab.c.online(lab.c.node(survivor)), f"{cut} to be seen lost")
    # Without fencing the others believe its resources stopped and try to start them:
    # start refuses where the memory is not, so they stay stopped in the cluster's view.
    for r in victims:
        lab.wait(lambda r=r: len([f for f in lab.failures(r, survivor) if f.get("task") == "start"]) == 2,
                 f"{r}: the start attempts on the other nodes to fail")
        assert {f["node"] for f in lab.failures(r, survivor)} == {n.name for n in lab.c.nodes} - {cut}
        assert all(f.get("exitstatus") == "not installed" for f in lab.failures(r, survivor)), \
            lab.failures(r, survivor)
        assert list(lab.copies(r)) == [cut], f"{r}: copies {lab.copies(r)}"
    for r in RES:
        if r not in victims:
            assert lab.where(r, survivor) == [on[r]]

    # The node comes back: its pacemaker finds the workloads running where they always were.
    if node.pacemakerd is not None and node.pacemakerd.poll() is None:
        lab.c.stop_node(node)
    lab.c.start_node(node)
    lab.c.wait_online(SETTLE_S)
    for r in victims:
        retry(lab, r)
    lab.wait(lambda: all(lab.where(r) == [cut] for r in victims), f"{victims} to be found on {cut}")
    lab.one_copy_each()
    # and it still migrates, intact
    r = victims[0]
    to = next(n.name for n in lab.c.nodes if n.name != cut)
    before = lab.report(r, cut)
    lab.move(r, to)
    lab.wait(lambda: lab.where(r) == [to], f"{r} to move to {to}")
    lab.check_migrated(r, cut, before)
    lab.clear(r)
    lab.one_copy_each()

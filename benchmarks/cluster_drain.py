"""Draining a Pacemaker node: time from standby to all workloads migrated, against the
sum of the same workloads' single migrations, in a real 3-node cluster on this machine.

    .venv/bin/python -m benchmarks.cluster_drain [--size 128M] [--rate 5000] [--runs 3]
                                                 [--max-active N] [--workloads 3] [--node-action-limit N]

Needs root and Debian's pacemaker, corosync, pacemaker-cli-utils and crmsh (the
cluster of tests/test_cluster.py: precopy.lab.pcmk).  Each run, interleaved:

* singles: each workload in turn is moved n1 -> n2 with ``crm_resource --move`` and
  timed from the command until the cluster shows it started on n2 (the agent's
  migrate_to + migrate_from + Pacemaker's own steps); then moved back, untimed;
* drain: ``crm_attribute --node n1 --name standby --update on``, timed until every
  workload is started elsewhere; then n1 is put back online and each moved back.

Prints a markdown table (medians, min-max) with the ratio drain / sum of singles,
and precopy's own migration times (the reports' total_time_s) beside the cluster's,
and writes JSON lines to benchmarks/out/cluster_drain.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from precopy.lab.pcmk import PrecopyCluster, move, unavailable_reason

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


class Bench:
    def __init__(self, c: PrecopyCluster, workloads: list[str]) -> None:
        self.c, self.w, self.n1 = c, workloads, c.nodes[0]

    def placement(self) -> dict[str, str | None]:
        p = self.n1.run("crm_mon", "-1", "--output-as=xml", timeout=60)
        out: dict[str, str | None] = {}
        for e in ET.fromstring(p.stdout).iter("resource"):
            rid = e.get("id", "")
            nodes = [n.get("name") for n in e.findall("node")]
            ok = e.get("role") == "Started" and e.get("failed") != "true" and len(nodes) == 1
            out[rid] = nodes[0] if ok else None
        return out

    def wait(self, pred: Any, what: str, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while not pred(self.placement()):
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"timed out waiting for {what}:\n"
                                 + self.n1.run("crm_mon", "-1", check=False).stdout)
            time.sleep(0.05)
        return time.monotonic() - t0

    def report(self, rsc: str, node: str) -> dict[str, Any]:
        return json.loads(self.c.node(node).path(f"/run/precopy-ocf/{rsc}.report.json").read_text())

    def move(self, rsc: str, to: str) -> float:
        t0 = time.monotonic()
        move(self.n1, rsc, to)
        self.wait(lambda pl: pl.get(rsc) == to, f"{rsc} on {to}")
        took = time.monotonic() - t0
        self.n1.run("crm_resource", "--clear", "--resource", rsc)
        return took

    def singles(self) -> tuple[list[float], list[float]]:
        cluster, precopy = [], []
        for r in self.w:
            cluster.append(self.move(r, "n2"))
            rep = self.report(r, "n1")
            assert rep["outcome"] == "committed", rep
            precopy.append(float(rep["total_time_s"]))
            self.move(r, "n1")
        return cluster, precopy

    def drain(self) -> tuple[float, list[float], dict[str, str | None]]:
        t0 = time.monotonic()
        self.n1.run("crm_attribute", "--node", "n1", "--name", "standby", "--update", "on")
        self.wait(lambda pl: all(pl.get(r) not in (None, "n1") for r in self.w), "the drain")
        took = time.monotonic() - t0
        where = self.placement()
        precopy = []
        for r in self.w:
            rep = self.report(r, "n1")
            assert rep["outcome"] == "committed", rep
            precopy.append(float(rep["total_time_s"]))
        self.n1.run("crm_attribute", "--node", "n1", "--name", "standby", "--update", "off")
        for r in self.w:
            self.move(r, "n1")
        return took, precopy, where


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128M", help="each workload's region (default 128M)")
    ap.add_argument("--rate", type=int, default=5000, help="guest page writes per second (default 5000)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs (default 3)")
    ap.add_argument("--workloads", type=int, default=3, help="workloads on the drained node (default 3)")
    ap.add_argument("--max-active", type=int, default=None,
                    help="--max-active of both daemons on every node (default: theirs)")
    ap.add_argument("--downtime-ms", type=int, default=300)
    ap.add_argument("--node-action-limit", type=int, default=None,
                    help="Pacemaker's node-action-limit, and load-threshold raised out of the way "
                         "(default: Pacemaker's: 2 x cores, throttled further under high load)")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cluster_drain: cannot run: {reason}", file=sys.stderr)
        return 2
    extra = ["--max-active", str(args.max_active)] if args.max_active else []
    c = PrecopyCluster(f"cbn{os.getpid() % 10000}", dest_args=extra, source_args=extra,
                       keep=bool(os.environ.get("KEEP")))
    c.up()
    try:
        names = [f"b{i}" for i in range(1, args.workloads + 1)]
        n1 = c.nodes[0]
        props = "placement-strategy=balanced"
        if args.node_action_limit:
            props += f" node-action-limit={args.node_action_limit} load-threshold=10000%"
        conf = [f"property {props}", "rsc_defaults resource-stickiness=100"]
        conf += [f"node {n.name} utilization memory=65536" for n in c.nodes]
        for r in names:
            n1.run(PY, "-m", "precopy.guest", "create", "--memory", f"{c.MEMORY_DIR}/{r}", "--size", args.size,
                   "--content", "half-text")
            conf.append(
                f"primitive {r} ocf:precopy:workload params memory={c.MEMORY_DIR}/{r} "
                f'start_command="exec {shlex.quote(PY)} -m precopy.guest dirty --memory $PRECOPY_MEMORY --rate {args.rate}" '
                f'dest="{c.dest_rule()}" auth_key_file={c.key} downtime_ms={args.downtime_ms} '
                "op monitor interval=10s timeout=30s op start timeout=60s op stop timeout=60s "
                "op migrate_to timeout=600s on-fail=block op migrate_from timeout=60s "
                "meta allow-migrate=true utilization memory=1")
            conf.append(f"location {r}-home {r} 10: n1")
        f = c.workdir / "bench.crm"
        f.write_text("\n".join(conf) + "\n")
        n1.run("crm", "configure", "load", "update", str(f))
        b = Bench(c, names)
        b.wait(lambda pl: all(pl.get(r) == "n1" for r in names), "the workloads to start on n1")
        time.sleep(2)
        sums, drains, p_sums, p_drains, rows = [], [], [], [], []
        for run in range(args.runs):
            single, p_single = b.singles()
            drain, p_drain, where = b.drain()
            sums.append(sum(single))
            drains.append(drain)
            p_sums.append(sum(p_single))
            p_drains.append(max(p_drain))
            row = {"run": run + 1, "singles_s": single, "singles_precopy_s": p_single, "drain_s": drain,
                   "drain_precopy_s": p_drain, "drain_placement": where, "size": args.size, "rate": args.rate,
                   "max_active": args.max_active, "node_action_limit": args.node_action_limit,
                   "ts": time.time()}
            rows.append(row)
            print(json.dumps(row), flush=True)
        out = ROOT / "benchmarks" / "out"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "cluster_drain.jsonl", "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        ratios = [d / s for d, s in zip(drains, sums)]
        print(f"\n{args.workloads} workloads of {args.size}, {args.rate} pages/s, budget {args.downtime_ms} ms, "
              f"--max-active {args.max_active or 'default'}, node-action-limit "
              f"{args.node_action_limit or 'default'}; medians (min–max) of {args.runs} runs, seconds\n")
        print("| | cluster: command → started on the target | precopy's own (reports' total_time_s) |")
        print("|---|---|---|")
        print(f"| sum of {args.workloads} single moves | {_med(sums)} | {_med(p_sums)} |")
        print(f"| drain: standby → all {args.workloads} started elsewhere | {_med(drains)} | "
              f"longest migration {_med(p_drains)} |")
        print(f"| drain ÷ sum of singles | {_med(ratios)} | |")
    finally:
        c.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())

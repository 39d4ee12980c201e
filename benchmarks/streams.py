"""--streams over several shaped links, and on loopback (issue 21).

    python -m benchmarks.streams                          # 1 GiB, links 1,2,4, 5 rounds (~3 min; root)
    python -m benchmarks.streams --size 256M --runs 1     # a smoke run
    python -m benchmarks.streams --links '' --baseline /tmp/precopy-before   # loopback, this tree vs another
    python -m benchmarks.streams --baseline /tmp/main --baseline-links --source-arg=--stream-threads=on

The lab (:class:`precopy.lab.links.MultiLink`, root only): two network
namespaces joined by 4 veth pairs, each shaped to ``--rate`` (1 Gbit/s) with
``tc tbf`` in both directions.  One ``precopy-dest`` runs in the
destination namespace, listening on all its addresses; per migration the
source runs in the source namespace with ``--streams N``, stream K to the
destination's address on link K (``--stream-to``) from its own address on
link K (``--bind``): N links, N streams.  Beside it, on loopback (root
namespace), the same region with ``--streams 1``, ``2`` and ``4``.  With
``--baseline DIR`` (a checkout of another precopy commit, e.g. ``git
worktree add --detach /tmp/precopy-before <commit>``) every loopback case
also runs with both agents from that tree, interleaved, and the summary
gives the ratio of this tree's rate to the baseline's, paired by round.

Each round runs every case once, interleaved (the machine's speed drifts);
each migration is of an idle random region (the guest is ``precopy-guest
dirty --rate 0``, paused with SIGSTOP) into a fresh region file.  Per run:
the full copy's rate on the wire (the report's round 0: bytes on the wire /
its seconds) -- what the links carried; it counts as sent what the last
sends left in the socket buffers, up to 4 MiB a stream -- and, the
conservative figure, the region's size over the migration's total time
(connect, handshakes, switchover and commit included).  The links' figures
are these rates over N x the shaped rate.  Benchmarks
report; they never fail on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from precopy.guest import create_region, parse_size
from precopy.lab.links import MultiLink
from precopy.lab.netns import rate_bits_per_s, unavailable_reason
from precopy_agents.common import stop_process

from .harness import PY, ROOT, _env, children_cpu_s, proc_cpu_s


def _wait_port(ready: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists() and ready.read_text().strip():
            return int(ready.read_text().strip().rsplit(":", 1)[1])
        if proc.poll() is not None:
            raise RuntimeError(f"precopy-dest exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("precopy-dest did not start")


class Dest:
    """A precopy-dest daemon (in a namespace or not) and where it writes."""

    def __init__(self, work: Path, tag: str, listen: str, prefix: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.env = env or _env()
        self.dir = work / f"dest-{tag}"
        ready = work / f"dest-{tag}.addr"
        self.log = open(work / f"dest-{tag}.log", "wb")
        self.proc = subprocess.Popen(
            [*prefix, PY, "-m", "precopy_agents.dest_main", "--listen", listen, "--memory-dir", str(self.dir),
             "--ready-file", str(ready), "--log-level", "warning", "--insecure"],  # private links: no key needed
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        self.port = _wait_port(ready, self.proc)

    def clear(self) -> None:
        for f in self.dir.glob("bench*"):
            f.unlink()

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def migrate(region: Path, guest_pid: int, to: list[str], binds: list[str], streams: int, report: Path,
            prefix: Sequence[str], dest: Dest, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One migration (``extra``: more arguments for the source); the figures of its report and the CPU
    both agents spent."""
    argv = [*prefix, PY, "-m", "precopy_agents.source_main", "--to", to[0], "--memory", str(region),
            "--pid", str(guest_pid), "--name", "bench", "--downtime-ms", "300", "--compress", "off",
            "--streams", str(streams), "--report", str(report), "--progress", "off", "--log-level", "warning",
            *[a for addr in to[1:] for a in ("--stream-to", addr)], *[a for b in binds for a in ("--bind", b)],
            *extra]
    report.unlink(missing_ok=True)
    c0, d0 = children_cpu_s(), proc_cpu_s(dest.proc.pid)
    t = time.monotonic()
    rc = subprocess.run(argv, cwd=ROOT, env=dest.env, stdout=subprocess.DEVNULL, timeout=600).returncode
    wall = time.monotonic() - t
    cpu_src = children_cpu_s() - c0
    time.sleep(0.2)  # the daemon closes the region after its reply
    cpu_dst = proc_cpu_s(dest.proc.pid) - d0
    dest.clear()
    rep = json.loads(report.read_text()) if report.exists() else {"outcome": "no report"}
    full = (rep.get("rounds") or [{}])[0]
    return {"exit_code": rc, "outcome": rep.get("outcome"), "streams": rep.get("streams"),
            "region_bytes": rep.get("region_bytes"),
            "wall_s": wall, "total_s": rep.get("total_time_s"),
            "full_bytes": full.get("bytes_on_wire"), "full_s": full.get("seconds"),
            "wire_Bps": (full["bytes_on_wire"] / full["seconds"]) if full.get("seconds") else None,
            "stream_bytes": rep.get("stream_bytes"), "stream_threads": rep.get("stream_threads"),
            "cpu_source_s": cpu_src, "cpu_dest_s": cpu_dst}


def summary(records: list[dict[str, Any]], rate_Bps: float) -> str:
    """The markdown table: medians per case, the links' share of N x the shaped rate."""
    cases: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        cases.setdefault(r["case"], []).append(r)
    lines = ["| case | runs (committed) | full copy on the wire, MB/s (median, range) | of N x shaped rate "
             "| region / total time, MB/s | of N x shaped rate | total time, s | CPU source / dest, s |",
             "|---|---|---|---|---|---|---|---|"]
    loop: dict[int, float] = {}
    for case, rs in cases.items():
        ok = [r for r in rs if r["outcome"] == "committed" and r["wire_Bps"]]
        if not ok:
            lines.append(f"| {case} | {len(rs)} (0) | — | — | — | — | — | — |")
            continue
        w = [r["wire_Bps"] / 1e6 for r in ok]
        med = statistics.median(w)
        whole = statistics.median(r["region_bytes"] / r["total_s"] / 1e6 for r in ok)
        share = share_total = "—"
        if ok[0]["links"]:
            share = f"{med * 1e6 / (ok[0]['links'] * rate_Bps):.1%}"
            share_total = f"{whole * 1e6 / (ok[0]['links'] * rate_Bps):.1%}"
        elif not ok[0].get("baseline"):
            loop[ok[0]["streams_asked"]] = med
        lines.append(f"| {case} | {len(rs)} ({len(ok)}) | {med:.0f} ({min(w):.0f}-{max(w):.0f}) | {share} "
                     f"| {whole:.0f} | {share_total} "
                     f"| {statistics.median(r['total_s'] for r in ok):.2f} "
                     f"| {statistics.median(r['cpu_source_s'] for r in ok):.2f} / "
                     f"{statistics.median(r['cpu_dest_s'] for r in ok):.2f} |")
    for n in sorted(loop):
        if n != 1 and 1 in loop:
            lines.append(f"\nLoopback, --streams {n} / --streams 1 (full copy's wire rate, medians): "
                         f"{loop[n] / loop[1]:.2f}")
    lines.extend(_paired(records))
    return "\n".join(lines)


def _paired(records: list[dict[str, Any]]) -> list[str]:
    """This tree / the baseline, per case run both ways, paired by round (both committed), medians."""
    by: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for r in records:
        if r["outcome"] == "committed" and r["wire_Bps"]:
            by[(r["case"].removesuffix(" (baseline)"), r["run"], bool(r.get("baseline")))] = r
    out = []
    for case in dict.fromkeys(k[0] for k in by):
        pairs = [(by[(c, run, False)], by[(c, run, True)]) for (c, run, base) in by
                 if c == case and not base and (c, run, True) in by]
        if not pairs:
            continue
        wire = [a["wire_Bps"] / b["wire_Bps"] for a, b in pairs]
        total = [b["total_s"] / a["total_s"] for a, b in pairs]
        cpu = [(a["cpu_source_s"] + a["cpu_dest_s"]) / (b["cpu_source_s"] + b["cpu_dest_s"]) for a, b in pairs]
        dest = [a["cpu_dest_s"] / b["cpu_dest_s"] for a, b in pairs]
        out.append(f"\n{case}, this tree / baseline, paired by round ({len(pairs)} pairs): "
                   f"full copy's wire rate {statistics.median(wire):.2f} "
                   f"({', '.join(f'{x:.2f}' for x in wire)}); "
                   f"1 / total time {statistics.median(total):.2f}; CPU both agents {statistics.median(cpu):.2f}, "
                   f"destination {statistics.median(dest):.2f}")
    return out


def baseline_env(tree: Path, work: Path) -> dict[str, str]:
    """The environment that runs both agents from another checkout ``tree`` (its precopy and its
    agents/ as precopy_agents, ahead of this tree's editable install)."""
    shim = work / "baseline-path"
    shim.mkdir(exist_ok=True)
    if not (shim / "precopy_agents").exists():
        (shim / "precopy_agents").symlink_to((tree / "agents").resolve())
    # PYTHONSAFEPATH: ``python -m`` must not put its working directory (this tree, ROOT) first on
    # sys.path -- it did until 2026-12-07, and every baseline process imported this tree's precopy
    # beside the baseline's agents (benchmarks/RESULTS.md, "Issue 21: a thread per stream on the source").
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(tree.resolve())]), PYTHONSAFEPATH="1")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.streams", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="region size (default 1G)")
    ap.add_argument("--runs", type=int, default=5, help="rounds, every case once each (default 5)")
    ap.add_argument("--links", default="1,2,4", help="link counts, comma separated (default 1,2,4)")
    ap.add_argument("--rate", default="1gbit", help="tc tbf rate of each link (default 1gbit)")
    ap.add_argument("--loopback", default="1,2,4",
                    help="--streams values on loopback ('' for none; default 1,2,4)")
    ap.add_argument("--baseline", type=Path,
                    help="another precopy checkout: the loopback cases also run with its agents, interleaved")
    ap.add_argument("--baseline-links", action="store_true",
                    help="with --baseline: the shaped-link cases too (a baseline daemon in the namespace)")
    ap.add_argument("--source-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to this tree's precopy-source, not the baseline's (repeatable; A/B, e.g. "
                         "--source-arg=--stream-threads=on)")
    ap.add_argument("--baseline-source-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to the baseline's precopy-source (repeatable)")
    ap.add_argument("--json", type=Path, help="write every run's record here")
    args = ap.parse_args(argv)
    links = [int(x) for x in args.links.split(",") if x]
    loopback = [int(x) for x in args.loopback.split(",") if x]
    reason = unavailable_reason()
    if reason and links:
        print(f"skipping the shaped links: {reason}", file=sys.stderr)
        links = []
    work = Path(tempfile.mkdtemp(prefix="precopy-streams-", dir="/dev/shm"))
    lab = MultiLink(f"streamsb{os.getpid() % 100}", max(links), args.rate) if links else None
    dests: list[Dest] = []
    guest = None
    records: list[dict[str, Any]] = []
    try:
        region = work / "guest.mem"
        create_region(region, parse_size(args.size), "random", 1)
        guest = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(region), "--rate", "0"],
                                 cwd=ROOT, env=_env())
        time.sleep(0.7)
        ns_dest = loop_dest = None
        if lab is not None:
            lab.up()
            ns_dest = Dest(work, "links", "0.0.0.0:0", lab.exec_prefix(lab.dst_ns))
            dests.append(ns_dest)
        ns_base = None
        if lab is not None and args.baseline is not None and args.baseline_links:
            ns_base = Dest(work, "links-baseline", "0.0.0.0:0", lab.exec_prefix(lab.dst_ns),
                           env=baseline_env(args.baseline, work))
            dests.append(ns_base)
        if loopback:
            loop_dest = Dest(work, "loopback", "127.0.0.1:0")
            dests.append(loop_dest)
        base_dest = None
        if loopback and args.baseline is not None:
            base_dest = Dest(work, "baseline", "127.0.0.1:0", env=baseline_env(args.baseline, work))
            dests.append(base_dest)
        for run in range(args.runs):
            for n in links:
                assert lab is not None and ns_dest is not None
                for d in (ns_dest, ns_base):
                    if d is None:
                        continue
                    base = d is ns_base
                    rec = migrate(region, guest.pid, [f"{lab.dst_ips[k]}:{d.port}" for k in range(n)],
                                  lab.src_ips[:n], n, work / "report.json", lab.exec_prefix(lab.src_ns), d,
                                  args.baseline_source_arg if base else args.source_arg)
                    records.append({"case": f"{n} x {args.rate}, --streams {n}{' (baseline)' if base else ''}",
                                    "links": n, "streams_asked": n, "baseline": base, "run": run, **rec})
                    print(json.dumps(records[-1]), flush=True)
            for n in loopback:
                for d in (loop_dest, base_dest):
                    if d is None:
                        continue
                    base = d is base_dest
                    rec = migrate(region, guest.pid, [f"127.0.0.1:{d.port}"], [], n, work / "report.json", (), d,
                                  args.baseline_source_arg if base else args.source_arg)
                    records.append({"case": f"loopback, --streams {n}{' (baseline)' if base else ''}", "links": 0,
                                    "streams_asked": n, "baseline": base, "run": run, **rec})
                    print(json.dumps(records[-1]), flush=True)
    finally:
        for d in dests:
            d.stop()
        stop_process(guest)
        if lab is not None:
            lab.down()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    print()
    print(summary(records, rate_bits_per_s(args.rate) / 8))
    return 0


if __name__ == "__main__":
    sys.exit(main())

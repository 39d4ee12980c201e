"""What a migrated GiB costs in CPU, measured, and what that projects to on larger hosts (issue 21).

    python -m benchmarks.cost                      # 1 GiB, 5 rounds (a few minutes)
    python -m benchmarks.cost --runs 7 --json out.json
    python -m benchmarks.cost --size 16M --runs 1 --scenarios existing-uffd-wp   # the smoke test

Each round runs, interleaved (this machine's speed drifts within minutes),
one idle migration per scenario -- into a fresh region and into an existing
one (the destination already holds a region of that size with other
contents), with digests (``--pid``) and with kernel write tracking (uffd-wp,
through guest control) -- through ``benchmarks.harness`` (the real agents as
separate processes), then the raw copies of the same bytes
(``benchmarks.limits.raw_copy``: into a reused buffer, into a fresh file,
into an existing file) and the CPU an agent spends just starting (the
interpreter and its imports).

Per migration: the source's CPU seconds (user + system, the process and
the children it waited for: its guardian), the destination daemon's
(``/proc/PID/stat``, all threads) and the migration's own time (the report's
``total_time_s``).  Per GiB, a side's CPU is its CPU less what starting
costs (a fixed cost per migration, not per GiB: the source's start is
measured; the daemon is already running).

The report: medians (and ranges) per scenario, the ratios issue 21's targets
name, and a projection -- per-core throughput of the busier side, and which
of CPU and link bounds a migration at 8 and 32 cores and 10/25/100 Gbit/s --
with its assumptions written beside it.  Benchmarks report; they never fail
on a timing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from precopy.guest import parse_size

from .harness import PY, ROOT, Bench, Scenario, _env, children_cpu_s
from .limits import raw_copy

GiB = 1 << 30
#: name -> the harness scenario (size filled in from --size)
SCENARIOS: dict[str, Scenario] = {
    "fresh-digest": Scenario(workload="idle"),
    "fresh-uffd-wp": Scenario(workload="idle", control="control"),
    "existing-digest": Scenario(workload="idle", dest_region="existing"),
    "existing-uffd-wp": Scenario(workload="idle", dest_region="existing", control="control"),
}
RAW = ("link", "fresh", "existing")  # raw copy: into a reused buffer, a fresh file, an existing file
CORES = (8, 32)
LINKS_GBIT = (10, 25, 100)
#: TCP payload over the line rate: 1500-byte frames, IPv4 + TCP headers with
#: timestamps, Ethernet framing (1448 / 1538).
GOODPUT = 0.94


def startup_cpu_s() -> float:
    """CPU seconds of starting a source agent: the interpreter and ``import precopy_agents.source_main``."""
    c0 = children_cpu_s()
    subprocess.run([PY, "-c", "import precopy_agents.source_main"], check=True, cwd=ROOT, env=_env())
    return children_cpu_s() - c0


def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _div(a: float, b: float) -> float:
    """a ÷ b, or NaN where b is not positive (a tiny region's copy can take under a clock tick)."""
    return a / b if b > 0 else float("nan")


def _rng(xs: Sequence[float], digits: int = 2) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{_med(xs):.{digits}f} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def measure(names: Sequence[str], size: str, runs: int, log: Any, *,
            source_args: Sequence[str] = (), dest_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``runs`` interleaved rounds; return every figure (the JSON)."""
    nbytes = parse_size(size)
    work = Path(tempfile.mkdtemp(prefix="precopy-cost.", dir="/dev/shm"))
    bench = Bench(work, work, runs, log, yardsticks=False, source_args=source_args, dest_args=dest_args)
    migrations: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    raw: dict[str, list[dict[str, float]]] = {k: [] for k in RAW}
    startup: list[float] = []
    try:
        for run in range(runs):
            for name in names:
                sc = replace(SCENARIOS[name], size=size)
                rec = bench.run_once(sc, run)
                if rec is None:
                    raise RuntimeError(f"{name}: the loopback link is unavailable")
                rep = rec["report"]
                log(f"round {run + 1}/{runs} {name}: {rep.get('outcome')} in {rep.get('total_time_s', 0):.3f} s, "
                    f"CPU source {rec['cpu_s'].get('source', 0):.2f} s, dest {rec['cpu_s'].get('dest', 0):.2f} s")
                if rep.get("outcome") != "committed":
                    raise RuntimeError(f"{name}: the migration did not commit: {rep.get('error') or rep}")
                migrations[name].append({"total_time_s": rep["total_time_s"], "wall_s": rec["wall_s"],
                                         "tracking": rep.get("tracking"), "cpu_s": rec["cpu_s"],
                                         "bytes_on_wire": rep.get("bytes_on_wire"),
                                         "peak_rss_bytes": rec["peak_rss_bytes"]})
            region = bench.region(replace(SCENARIOS[names[0]], size=size))
            for kind in RAW:
                sides: list[tuple[float, float]] = []
                s = raw_copy(region, fresh=kind == "fresh", into="existing" if kind == "existing" else None,
                             cpu_sides=sides)
                raw[kind].append({"seconds": s, "send_cpu_s": sides[0][0], "recv_cpu_s": sides[0][1]})
            startup.append(startup_cpu_s())
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"size": size, "bytes": nbytes, "runs": runs, "migrations": migrations, "raw": raw,
            "source_startup_cpu_s": startup}


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Medians per scenario, the targets' ratios, and the projection (added to ``data`` as ``summary``)."""
    gib = data["bytes"] / GiB
    start = _med(data["source_startup_cpu_s"])
    raw = {k: {"seconds": _med([r["seconds"] for r in v]),
               "send_cpu_per_gib": _med([r["send_cpu_s"] for r in v]) / gib,
               "recv_cpu_per_gib": _med([r["recv_cpu_s"] for r in v]) / gib,
               "cpu_per_gib": _med([r["send_cpu_s"] + r["recv_cpu_s"] for r in v]) / gib}
           for k, v in data["raw"].items()}
    out: dict[str, Any] = {"source_startup_cpu_s": start, "raw": raw, "scenarios": {}}
    for name, rs in data["migrations"].items():
        t = _med([r["total_time_s"] for r in rs])
        src = _med([r["cpu_s"]["source"] - start for r in rs]) / gib
        dst = _med([r["cpu_s"]["dest"] for r in rs]) / gib
        both = _med([r["cpu_s"]["source"] - start + r["cpu_s"]["dest"] for r in rs]) / gib
        yard = "existing" if name.startswith("existing") else "fresh"
        busier = max(src, dst)
        out["scenarios"][name] = {
            "total_time_s": t, "source_cpu_per_gib": src, "dest_cpu_per_gib": dst, "both_cpu_per_gib": both,
            "guest_cpu_s": _med([r["cpu_s"]["guest"] for r in rs]),
            "tracking": sorted({str(r["tracking"]) for r in rs}),
            # issue 21's targets: CPU (both agents) ÷ the raw copy's, and the raw copy's time ÷ the migration's
            "cpu_vs_raw": _div(both, raw[yard]["cpu_per_gib"]), "cpu_yardstick": yard,
            "raw_link_over_migration": raw["link"]["seconds"] / t,
            "raw_yard_over_migration": raw[yard]["seconds"] / t,
            "busier_side": "source" if src >= dst else "destination",
            "gib_per_s_per_core": _div(1, busier),
            "one_stream_gib_per_s": gib / t,
            "projection": projection(busier, src, raw["link"]["send_cpu_per_gib"]) if busier > 0 else [],
        }
    data["summary"] = out
    return data


def auto_streams(cores: int) -> int:
    """The streams ``--stream-threads auto`` sends from threads at ``cores`` (>= 2 x streams + 2), at least 1."""
    return max(1, min(64, (cores - 2) // 2))


def loop_bound(source_cpu: float, send_copy_cpu: float, streams: int, threads: bool) -> float:
    """GiB/s the source's event loop allows: its core does all of the source's work per GiB but,
    with sending threads, the kernel copy of the extra streams' share ((streams - 1) / streams of
    ``send_copy_cpu``, the raw copy's sender CPU per GiB) -- Amdahl with one serial core."""
    serial = source_cpu - (send_copy_cpu * (streams - 1) / streams if threads else 0.0)
    return _div(1.0, max(serial, 1e-9))


def projection(cpu_per_gib: float, source_cpu: float | None = None,
               send_copy_cpu: float | None = None) -> list[dict[str, Any]]:
    """Per (cores, link): the CPU bound, the link bound, and which one binds.

    With ``source_cpu`` and ``send_copy_cpu`` (CPU-s per GiB: the source's,
    and the raw copy's sender's), also the source loop's bound: one core
    for all the source's Python, with ``--stream-threads`` (``auto`` turns
    them on at :func:`auto_streams` streams) the extra streams' kernel
    copies on threads of their own; the projection is the least of the three.
    """
    rows = []
    for cores in CORES:
        for gbit in LINKS_GBIT:
            cpu_bound = cores / cpu_per_gib
            link_bound = gbit * 1e9 * GOODPUT / 8 / GiB
            row = {"cores": cores, "link_gbit": gbit, "cpu_bound_gib_s": cpu_bound,
                   "link_bound_gib_s": link_bound, "bound": "CPU" if cpu_bound < link_bound else "link",
                   "gib_s": min(cpu_bound, link_bound), "cores_to_fill_link": link_bound * cpu_per_gib}
            if source_cpu is not None and send_copy_cpu is not None:
                n = auto_streams(cores)
                loop = loop_bound(source_cpu, send_copy_cpu, n, threads=n > 1)
                row.update(streams=n, loop_bound_gib_s=loop,
                           loop_bound_one_loop_gib_s=loop_bound(source_cpu, send_copy_cpu, n, threads=False))
                if loop < row["gib_s"]:
                    row.update(bound="source loop", gib_s=loop)
            rows.append(row)
    return rows


ASSUMPTIONS = f"""Assumptions of the projection:

* The busier side's CPU-seconds per GiB, measured here (loopback, this
  machine's cores), stay the same per GiB on the larger host: work
  partitioned over N streams (issue 21's `--streams`) scales linearly,
  each stream on its own core, no shared lock, no memory-bandwidth limit
  (a 32-core host moves ~12 GiB/s at 100 Gbit/s: source read +
  destination write, well inside a server's memory bandwidth, but not
  measured here).  The destination receives each extra stream on a
  thread of its own (blocking reads, hashing and TLS release the GIL).
  The source's event loop is one core whatever the streams: it runs all
  the source's Python (planning, framing, the record, re-protecting, the
  hash after each send), and with `--stream-threads` (on by `auto` at
  (cores - 2) / 2 streams) the extra streams' kernel copies move to
  threads of their own -- taken as the raw copy's sender CPU per GiB,
  the rest of the source's CPU per GiB staying on the loop (an upper
  bound on its serial part: the map-in's thread is counted in it).  The
  projection is the least of the CPU, link and source-loop bounds; "one
  loop" is the loop's bound without the threads.
* All the cores named are the migration's on *each* side (the guest's own
  CPU is not counted); the side that needs more CPU per GiB binds.
* A link carries {GOODPUT:.0%} of its line rate as TCP payload (1500-byte
  frames); no compression (random pages).
* Loopback costs each side one kernel copy, as a real NIC does (sendmsg
  copies into the socket's buffers, recv out of them; no MSG_ZEROCOPY); a
  real NIC adds interrupt and driver work (less with TSO/GRO) that loopback
  does not have, so a real host may need somewhat more CPU per GiB than
  measured here.
* Fixed costs per migration (starting the source: measured and subtracted;
  the handshake, the sample of a repeat migration) are not per GiB and
  are left out; they matter for small regions only.
* "One stream" below is one connection's throughput; the projection is
  what `--streams` with the source's sending threads could reach at
  today's CPU per GiB.
"""


def busier_cpu(v: dict[str, Any]) -> float:
    return max(v["source_cpu_per_gib"], v["dest_cpu_per_gib"])


def markdown(data: dict[str, Any], command: str) -> str:
    s = data["summary"]
    runs, size = data["runs"], data["size"]
    lines = [f"`{command}` -- {size} idle region, {runs} interleaved rounds, medians (ranges). CPU = user + system "
             f"seconds; the source's less its start ({s['source_startup_cpu_s']:.2f} CPU-s: interpreter and imports).",
             "",
             "| copy | time s | CPU-s per GiB: sender | receiver | both |", "|---|---|---|---|---|"]
    labels = {"link": "raw copy, reused buffer (the link)", "fresh": "raw copy into a fresh file",
              "existing": "raw copy into an existing file"}
    for k, v in s["raw"].items():
        times = [r["seconds"] for r in data["raw"][k]]
        lines.append(f"| {labels[k]} | {_rng(times, 3)} | {v['send_cpu_per_gib']:.2f} | {v['recv_cpu_per_gib']:.2f} "
                     f"| {v['cpu_per_gib']:.2f} |")
    lines += ["", "| migration (idle) | tracking | time s | CPU-s per GiB: source | destination | both | "
              "both ÷ raw copy's | raw link copy ÷ migration | raw copy (same target) ÷ migration | "
              "per core, busier side |", "|---|---|---|---|---|---|---|---|---|---|"]
    gib = data["bytes"] / GiB
    start = s["source_startup_cpu_s"]
    for name, v in s["scenarios"].items():
        rs = data["migrations"][name]
        times = [r["total_time_s"] for r in rs]
        src = [(r["cpu_s"]["source"] - start) / gib for r in rs]
        dst = [r["cpu_s"]["dest"] / gib for r in rs]
        lines.append(f"| {name} | {'/'.join(v['tracking'])} | {_rng(times, 3)} | {_rng(src)} | {_rng(dst)} | "
                     f"{v['both_cpu_per_gib']:.2f} | {v['cpu_vs_raw']:.2f} (into {v['cpu_yardstick']}) | "
                     f"{v['raw_link_over_migration']:.2f} | {v['raw_yard_over_migration']:.2f} | "
                     f"{v['gib_per_s_per_core']:.2f} GiB/s ({v['busier_side']}) |")
    for name, v in s["scenarios"].items():
        lines += ["", f"Projection from `{name}` (busier side: {v['busier_side']}, "
                  f"{busier_cpu(v):.2f} CPU-s per GiB; one stream today: "
                  f"{v['one_stream_gib_per_s']:.2f} GiB/s):", "",
                  "| cores each side | link | CPU bound GiB/s | link bound GiB/s | source loop bound GiB/s, "
                  "threads (streams) / one loop | bound | projected GiB/s | cores to fill the link |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in v["projection"]:
            loop = (f"{p['loop_bound_gib_s']:.2f} ({p['streams']}) / {p['loop_bound_one_loop_gib_s']:.2f}"
                    if "loop_bound_gib_s" in p else "—")
            lines.append(f"| {p['cores']} | {p['link_gbit']} Gbit/s | {p['cpu_bound_gib_s']:.1f} | "
                         f"{p['link_bound_gib_s']:.2f} | {loop} | {p['bound']} | {p['gib_s']:.2f} | "
                         f"{p['cores_to_fill_link']:.1f} |")
    lines += ["", ASSUMPTIONS]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="region size (default: 1G)")
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds, each every scenario once (default: 5)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="also write every figure (each run, the medians, the projection) as JSON")
    ap.add_argument("--source-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to every precopy-source (repeatable; A/B, e.g. --source-arg=--batch-pages=1024)")
    ap.add_argument("--dest-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to every precopy-dest (repeatable)")
    ap.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                    help="do not run anything: rebuild the report from an earlier --json file")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        ap.error(f"unknown scenario {', '.join(unknown) or '(none)'}: use {', '.join(SCENARIOS)}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    def log(msg: str) -> None:
        print(f"cost: {msg}", file=sys.stderr, flush=True)

    if args.from_json:
        data = json.loads(args.from_json.read_text())
    else:
        try:
            data = measure(names, args.size, args.runs, log, source_args=args.source_arg, dest_args=args.dest_arg)
        except RuntimeError as exc:
            print(f"cost: {exc}", file=sys.stderr)
            return 1
        if args.json:  # the measurements first: a report can always be rebuilt from them (--from-json)
            args.json.write_text(json.dumps(data, indent=1))
    summarise(data)
    data["command"] = data.get("command") or "python -m benchmarks.cost " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    print(markdown(data, data["command"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

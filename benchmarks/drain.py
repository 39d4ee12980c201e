"""A host drain: N workloads migrated at once into one destination, against N x one alone.

    python -m benchmarks.drain [--n 1,2,4,8] [--size-mib 64] [--sweep-rate 20000]
                               [--downtime-ms 300] [--runs 3] [--versus=--max-active=8]

For each N (in the order given, the runs interleaved), starts N guests
sweeping their region at ``--sweep-rate`` pages/s, then N one-shot
``precopy-source`` at once into one ``precopy-dest`` (its defaults; with
``--versus ARGS``, every drain is repeated into a second destination
started with those arguments, interleaved), and times the drain: from the
starts to the last exit.
Every migration must commit; each one's downtime is held against its
budget.  The yardstick is N times the median single migration (N = 1) of
the same run: a drain that admits one migration at a time should take
about that (ratio ~1), where all at once on two cores the migrations
measure each other (issue 29).  Prints a Markdown table; medians over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@dataclass
class Drain:
    """One drain of ``n`` workloads: its wall time and every migration's report."""

    n: int
    seconds: float
    reports: list[dict[str, Any]] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)

    @property
    def committed(self) -> int:
        return sum(1 for r in self.reports if r.get("outcome") == "committed")

    def within(self, budget_ms: float) -> int:
        return sum(1 for r in self.reports if r.get("outcome") == "committed"
                   and r.get("downtime_ms") is not None and r["downtime_ms"] <= budget_ms)


def _start_dest(work: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    ready = work / "dest.addr"
    memdir = work / "dest"
    log = open(work / "dest.log", "ab")
    p = subprocess.Popen([PY, "-m", "precopy_agents.dest_main", "--listen", "127.0.0.1:0", "--memory-dir", str(memdir),
                          "--ready-file", str(ready), "--log-format", "json", *extra],
                         env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 60
    while not (ready.exists() and ready.read_text().endswith("\n")):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"precopy-dest did not start: {(work / 'dest.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return p, ready.read_text().strip(), memdir


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGCONT)
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def drain(work: Path, n: int, *, dest_addr: str, dest_dir: Path, size_mib: int, sweep_rate: float,
          downtime_ms: float, tag: str, seed: int = 0) -> Drain:
    """Migrate ``n`` sweeping guests at once into the destination at ``dest_addr``."""
    rng = np.random.default_rng(seed)
    regions = [work / f"{tag}-{i}.mem" for i in range(n)]
    guests: list[subprocess.Popen[bytes]] = []
    sources: list[subprocess.Popen[bytes]] = []
    try:
        for r in regions:
            r.write_bytes(rng.bytes(size_mib << 20))
            guests.append(subprocess.Popen(
                [PY, "-m", "precopy.guest", "dirty", "--memory", str(r), "--pattern", "sweep",
                 "--sweep-rate", str(sweep_rate)], env=ENV, cwd=ROOT))
        first = [r.open("rb").read(1) for r in regions]
        deadline = time.monotonic() + 60
        while not all(r.open("rb").read(1) != b for r, b in zip(regions, first)):
            if time.monotonic() > deadline or any(g.poll() is not None for g in guests):
                raise RuntimeError("the guests did not start sweeping")
            time.sleep(0.02)
        t = time.monotonic()
        for r, g in zip(regions, guests):
            sources.append(subprocess.Popen(
                [PY, "-m", "precopy_agents.source_main", "--to", dest_addr, "--memory", str(r), "--pid", str(g.pid),
                 "--downtime-ms", str(downtime_ms), "--report", str(r.with_suffix(".json")),
                 "--log-format", "json", "--progress", "off"],
                env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(r.with_suffix(".log"), "wb")))
        codes = [s.wait(1800) for s in sources]
        out = Drain(n, time.monotonic() - t, exit_codes=codes)
        for r in regions:
            rep_path = r.with_suffix(".json")
            rep = json.loads(rep_path.read_text()) if rep_path.exists() else {"outcome": "no report"}
            if rep.get("outcome") == "committed" and (dest_dir / r.name).read_bytes() != r.read_bytes():
                rep["outcome"] = "committed, NOT byte-exact"
            out.reports.append(rep)
        return out
    finally:
        for p in (*sources, *guests):
            _stop(p)
        for r in regions:
            for path in (r, r.with_suffix(".json"), r.with_suffix(".log"), dest_dir / r.name):
                path.unlink(missing_ok=True)
            (dest_dir / f"{r.name}.device-state").unlink(missing_ok=True)


def run(ns: list[int], *, runs: int, size_mib: int, sweep_rate: float, downtime_ms: float,
        dest_args: list[str], work: Path) -> dict[int, list[Drain]]:
    """Every N ``runs`` times, interleaved, into one destination daemon; N = 1 always included."""
    return run_configs(ns, runs=runs, size_mib=size_mib, sweep_rate=sweep_rate, downtime_ms=downtime_ms,
                       configs=[dest_args], work=work)[0]


def run_configs(ns: list[int], *, runs: int, size_mib: int, sweep_rate: float, downtime_ms: float,
                configs: list[list[str]], work: Path) -> list[dict[int, list[Drain]]]:
    """As :func:`run`, for each destination configuration (its own daemon), all interleaved."""
    ns = sorted(set(ns) | {1})
    dests = []
    results: list[dict[int, list[Drain]]] = [{n: [] for n in ns} for _ in configs]
    try:
        for c, args in enumerate(configs):
            d_work = work / f"c{c}"
            d_work.mkdir()
            dests.append(_start_dest(d_work, args))
        for k in range(runs):
            for n in ns:
                for c, (_, addr, dest_dir) in enumerate(dests):
                    d = drain(work, n, dest_addr=addr, dest_dir=dest_dir, size_mib=size_mib,
                              sweep_rate=sweep_rate, downtime_ms=downtime_ms, tag=f"c{c}r{k}n{n}",
                              seed=k * 100 + n)
                    results[c][n].append(d)
                    print(f"run {k + 1}/{runs} {' '.join(configs[c]) or 'defaults'} N={n}: {d.seconds:.2f} s, "
                          f"{d.committed}/{n} committed, {d.within(downtime_ms)}/{n} within {downtime_ms:.0f} ms, "
                          f"downtimes {[r.get('downtime_ms') and round(r['downtime_ms']) for r in d.reports]}",
                          flush=True)
    finally:
        for p, _, _ in dests:
            _stop(p)
    return results


def table(results: dict[int, list[Drain]], downtime_ms: float) -> str:
    """The Markdown table: per N, median drain time against N x the median single migration."""
    single = statistics.median(d.seconds for d in results[1])
    lines = ["| N | drain s (median) | N × single s | ratio | committed | aborted | downtime within budget "
             "| max downtime ms | max queued s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, ds in sorted(results.items()):
        reps = [r for d in ds for r in d.reports]
        med = statistics.median(d.seconds for d in ds)
        downs = [r["downtime_ms"] for r in reps if r.get("downtime_ms") is not None]
        lines.append(
            f"| {n} | {med:.2f} | {n * single:.2f} | {med / (n * single):.2f} | "
            f"{sum(d.committed for d in ds)}/{len(reps)} | "
            f"{sum(1 for r in reps if r.get('outcome') == 'aborted')} | "
            f"{sum(d.within(downtime_ms) for d in ds)}/{len(reps)} | "
            f"{max(downs):.0f} | {max((r.get('queued_s') or 0.0) for r in reps):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1,2,4,8", help="workloads per drain, comma-separated (default 1,2,4,8)")
    ap.add_argument("--size-mib", type=int, default=64, help="each guest's region (default 64)")
    ap.add_argument("--sweep-rate", type=float, default=20000.0, help="pages/s each guest sweeps (default 20000)")
    ap.add_argument("--downtime-ms", type=float, default=300.0, help="each migration's budget (default 300)")
    ap.add_argument("--runs", type=int, default=3, help="drains of each N, interleaved (default 3)")
    ap.add_argument("--dest-arg", action="append", default=[], metavar="ARG",
                    help="extra precopy-dest argument, e.g. --dest-arg=--max-active=8 (repeatable)")
    ap.add_argument("--versus", metavar="ARGS",
                    help="also drain into a second destination with these arguments (split on spaces), "
                         "interleaved, e.g. --versus=--max-active=8: admission against all at once")
    args = ap.parse_args(argv)
    try:
        ns = [int(x) for x in args.n.split(",")]
    except ValueError:
        ap.error(f"--n must be numbers separated by commas, not {args.n!r}")
    if min(ns) < 1 or args.size_mib < 1 or args.runs < 1 or args.downtime_ms <= 0 or args.sweep_rate < 0:
        ap.error("--n, --size-mib, --runs and --downtime-ms must be positive, --sweep-rate at least 0")
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    work = base / f"precopy-drain-{os.getpid()}"
    work.mkdir()
    try:
        configs = [args.dest_arg] + ([args.dest_arg + args.versus.split()] if args.versus else [])
        results = run_configs(ns, runs=args.runs, size_mib=args.size_mib, sweep_rate=args.sweep_rate,
                              downtime_ms=args.downtime_ms, configs=configs, work=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = 0
    for cfg, res in zip(configs, results):
        print(f"\nprecopy-dest {' '.join(cfg) or '(defaults)'}:\n")
        print(table(res, args.downtime_ms), end="")
        bad += sum(1 for ds in res.values() for d in ds for r in d.reports if r.get("outcome") != "committed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

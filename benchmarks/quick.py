"""The headline numbers: 1 GiB idle migration vs raw copies, and downtime
with a 2,000 pages/s dirtier at a 50 ms budget.

    .venv/bin/python -m benchmarks.quick [--size 1G] [--runs 5]

Prints a markdown table and writes JSON lines to benchmarks/out/quick.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agents.common import stop_process
from precopy.guest import create_region, parse_size

from .limits import hash_time, raw_copy

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def _wait(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.05)


def migrate_once(work: Path, region: Path, addr: str, dest_dir: Path, rate: float, budget: float,
                 tag: str) -> dict:  # type: ignore[type-arg]
    guest = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(region),
                              "--rate", str(rate), "--hot-fraction", "1"], cwd=ROOT)
    try:
        time.sleep(0.5)
        report = work / f"report-{tag}.json"
        rc = subprocess.call([PY, "-m", "agents.source_main", "--to", addr, "--memory", str(region),
                              "--pid", str(guest.pid), "--downtime-ms", str(budget), "--report", str(report),
                              "--log-level", "warning", "--progress", "off", "--name", "bench"], cwd=ROOT,
                             stdout=subprocess.DEVNULL)
        rep = json.loads(report.read_text())
        rep["exit_code"] = rc
        return rep
    finally:
        stop_process(guest)
        for f in dest_dir.glob("bench*"):
            f.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="precopy-bench-", dir="/dev/shm"))
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = None
    try:
        region = work / "guest.mem"
        create_region(region, size, "random", 1)
        link = [raw_copy(region, fresh=False) for _ in range(3)]
        fresh = [raw_copy(region, fresh=True) for _ in range(3)]
        hashing = [hash_time(region) for _ in range(3)]
        dest_dir = work / "dest"
        ready = work / "addr"
        dest = subprocess.Popen([PY, "-m", "agents.dest_main", "--listen", "127.0.0.1:0", "--memory-dir",
                                 str(dest_dir), "--ready-file", str(ready), "--log-level", "warning"],
                                cwd=ROOT, stdout=subprocess.DEVNULL)
        _wait(ready)
        addr = ready.read_text().strip()
        idle = [migrate_once(work, region, addr, dest_dir, 0, 300, f"idle{i}") for i in range(3)]
        dirty = [migrate_once(work, region, addr, dest_dir, 2000, 50, f"d{i}") for i in range(args.runs)]

        med = statistics.median
        gb = size / 1e9
        idle_t = [r["total_time_s"] for r in idle]
        rows = [
            ("raw loopback copy, reused buffer (link)", f"{med(link):.3f} s", f"{gb / med(link):.2f} GB/s"),
            ("raw loopback copy into a fresh region file", f"{med(fresh):.3f} s", f"{gb / med(fresh):.2f} GB/s"),
            ("xxh3 of the region, 64 MiB buffers", f"{med(hashing) * 1e3:.1f} ms", f"{gb / med(hashing):.1f} GB/s"),
            ("precopy, idle guest, total time (median of 3)",
             f"{med(idle_t):.3f} s ({min(idle_t):.3f}-{max(idle_t):.3f})", f"{gb / med(idle_t):.2f} GB/s"),
            ("  ratio fresh-copy time / migration time", f"{med(fresh) / med(idle_t):.2f}", ""),
            ("  ratio link-copy time / migration time", f"{med(link) / med(idle_t):.2f}", ""),
        ]
        dt = [r["downtime_ms"] for r in dirty if r["downtime_ms"] is not None]
        ex = [r["expected_downtime_ms"] for r in dirty if r["expected_downtime_ms"] is not None]
        tt = [r["total_time_s"] for r in dirty]
        rows += [
            (f"2,000 pages/s, 50 ms budget: downtime (median of {len(dt)})",
             f"{med(dt):.1f} ms ({min(dt):.1f}-{max(dt):.1f})" if dt else "n/a", ""),
            ("  expected downtime at switchover", f"{med(ex):.1f} ms" if ex else "n/a", ""),
            ("  total time", f"{med(tt):.3f} s", ""),
            ("  outcomes", ", ".join(r["outcome"] for r in dirty), ""),
        ]
        print(f"\n| {args.size} region | value | throughput |\n|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
        with open(out_dir / "quick.jsonl", "a") as f:
            f.write(json.dumps({"when": time.time(), "size": size, "link_s": link, "fresh_s": fresh,
                                "hash_s": hashing, "idle": idle, "dirty_2k_50ms": dirty}) + "\n")
        return 0
    finally:
        if dest is not None:
            stop_process(dest)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

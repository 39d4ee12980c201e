"""What TLS costs: the same idle migration over plain TCP, TLS, and mutual TLS.

    .venv/bin/python -m benchmarks.tls_cost [--size 512M] [--runs 3]

Real agents on loopback, an incompressible region, compression off (so the
bytes encrypted are the region's), runs interleaved plain / TLS / mTLS so
machine noise hits all three alike.  Prints a markdown table (median total
time and throughput, ratio to plain) and writes JSON lines to
benchmarks/out/tls_cost.jsonl.
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

from precopy_agents.common import stop_process
from precopy.guest import create_region, parse_size

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def _wait(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from tests.tlscerts import make_pki

    work = Path(tempfile.mkdtemp(prefix="precopy-tls-bench-", dir="/dev/shm"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pki = make_pki(work / "pki")
        region = work / "vm.mem"
        create_region(region, parse_size(args.size), "random", 0)
        modes = {
            "plain": ([], []),
            "tls": (["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)],
                    ["--tls-ca", str(pki.ca)]),
            "mtls": (["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                      "--tls-ca", str(pki.ca)],
                     ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                      "--tls-key", str(pki.client_key)]),
        }
        addrs: dict[str, str] = {}
        for mode, (dest_args, _) in modes.items():
            ready = work / f"{mode}.addr"
            procs.append(subprocess.Popen(
                [PY, "-m", "precopy_agents.dest_main", "--listen", "127.0.0.1:0", "--memory-dir",
                 str(work / f"dest-{mode}"), "--ready-file", str(ready), "--log-level", "warning",
                 *dest_args], cwd=ROOT))
            _wait(ready)
            addrs[mode] = ready.read_text().strip()
        guest = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(region),
                                  "--rate", "0"], cwd=ROOT)
        procs.append(guest)
        time.sleep(0.3)
        results: dict[str, list[dict]] = {m: [] for m in modes}  # type: ignore[type-arg]
        out = ROOT / "benchmarks" / "out"
        out.mkdir(exist_ok=True)
        with open(out / "tls_cost.jsonl", "a") as log:
            for run in range(args.runs):
                for mode, (_, src_args) in modes.items():
                    report = work / f"r-{mode}-{run}.json"
                    rc = subprocess.call(
                        [PY, "-m", "precopy_agents.source_main", "--to", addrs[mode], "--memory", str(region),
                         "--pid", str(guest.pid), "--compress", "off", "--on-commit", "keep-stopped",
                         "--report", str(report), "--log-level", "warning", "--progress", "off",
                         "--name", f"bench-{run}", *src_args], cwd=ROOT, stdout=subprocess.DEVNULL)
                    subprocess.call(["kill", "-CONT", str(guest.pid)])
                    rep = json.loads(report.read_text())
                    if rc != 0:
                        raise SystemExit(f"{mode} run {run} failed: {rep.get('error')}")
                    row = {"mode": mode, "run": run, "size": region.stat().st_size,
                           "total_time_s": rep["total_time_s"], "bytes_on_wire": rep["bytes_on_wire"],
                           "downtime_ms": rep["downtime_ms"]}
                    results[mode].append(row)
                    log.write(json.dumps(row) + "\n")
                    shutil.rmtree(work / f"dest-{mode}" / f"bench-{run}", ignore_errors=True)
                    for f in (work / f"dest-{mode}").glob(f"bench-{run}*"):
                        f.unlink()
        base = statistics.median(r["total_time_s"] for r in results["plain"])
        print(f"\n{args.size} idle region, incompressible, compression off, {args.runs} runs each\n")
        print("| link | total time (median) | region MB/s | vs plain |")
        print("|---|---|---|---|")
        for mode, rows in results.items():
            t = statistics.median(r["total_time_s"] for r in rows)
            mbps = rows[0]["size"] / t / 1e6
            print(f"| {mode} | {t:.2f} s | {mbps:.0f} | {t / base:.2f}x |")
    finally:
        for p in reversed(procs):
            stop_process(p)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

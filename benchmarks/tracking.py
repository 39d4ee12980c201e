"""Kernel write tracking (uffd-wp) against digest tracking, in one run.

    .venv/bin/python -m benchmarks.tracking [--size 1G] [--runs 5] [--skip-slowdown]

1. Downtime: a 1 GiB random region, a ``precopy-guest dirty`` guest at
   2,000 pages/s (uniform pages) driven over its control socket, a 50 ms
   budget, ``--on-nonconvergence force`` (every run gives a downtime); ``--runs`` migrations with ``--tracking uffd-wp`` and as many
   with ``--tracking digest``, interleaved.
2. Round cost: finding the dirty pages at 0.1 / 1 / 10 % dirty, the digest
   way (hash every chunk, then the pages of changed chunks) and the kernel
   way (``PAGEMAP_SCAN`` + the hole check), plus the chunk-table upkeep the
   tracker adds (rehash + page check of the touched chunks).  The tracked
   writes are this process's own (the kernel calls are the same as across
   processes).
3. Guest slowdown: pages/s a full-speed writer (``dirty --pattern sweep``
   and random ``--rate 1e7``; and the 2,000 pages/s guest of part 1)
   achieves untracked, and tracked with a scan
   every 0 / 10 / 100 ms and at the cadence of the uffd-wp migrations'
   rounds.

Prints markdown tables; JSON lines go to benchmarks/out/tracking.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from precopy_agents.common import stop_process
from precopy.memory.digest import page_digests, region_chunk_digests
from precopy.guest import create_region, parse_size
from precopy.memory.region import GuestMemory
from precopy.memory.tracking import SourceChunks, TrackingOffer, UffdTracker
from precopy.memory.uffd import create_userfaultfd, uffd_api
from precopy.protocol import PAGE_SIZE
from precopy.workload.control import GuestControl

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
med = statistics.median


def _wait(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.05)


# -- 1. downtime ---------------------------------------------------------------


def migrate_once(work: Path, region: Path, addr: str, dest_dir: Path, tracking: str, tag: str) -> dict[str, Any]:
    ctl = work / f"g-{tag}.sock"
    guest = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(region), "--rate", "2000",
                              "--hot-fraction", "1", "--control", str(ctl)], cwd=ROOT)
    try:
        _wait(ctl)
        time.sleep(0.5)
        report = work / f"report-{tag}.json"
        rc = subprocess.call([PY, "-m", "precopy_agents.source_main", "--to", addr, "--memory", str(region),
                              "--guest-control", str(ctl), "--downtime-ms", "50", "--tracking", tracking,
                              "--on-nonconvergence", "force",
                              "--report", str(report), "--log-level", "warning", "--progress", "off",
                              "--name", "bench"], cwd=ROOT, stdout=subprocess.DEVNULL)
        rep: dict[str, Any] = json.loads(report.read_text())
        rep["exit_code"] = rc
        return rep
    finally:
        stop_process(guest)
        for f in dest_dir.glob("bench*"):
            f.unlink()


def downtime(work: Path, region: Path, runs: int) -> dict[str, list[dict[str, Any]]]:
    dest_dir = work / "dest"
    ready = work / "addr"
    dest = subprocess.Popen([PY, "-m", "precopy_agents.dest_main", "--listen", "127.0.0.1:0", "--memory-dir",
                             str(dest_dir), "--ready-file", str(ready), "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        _wait(ready)
        addr = ready.read_text().strip()
        out: dict[str, list[dict[str, Any]]] = {"uffd-wp": [], "digest": []}
        for i in range(runs):
            for mode in ("uffd-wp", "digest"):
                out[mode].append(migrate_once(work, region, addr, dest_dir, mode, f"{mode}{i}"))
        return out
    finally:
        stop_process(dest)


def _fmt(xs: list[float], unit: str = "ms", scale: float = 1.0) -> str:
    if not xs:
        return "n/a"
    v = [x * scale for x in xs]
    return f"{med(v):.1f} {unit} ({min(v):.1f}-{max(v):.1f})"


def downtime_table(res: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = ["| 1 GiB, 2,000 pages/s, 50 ms budget | uffd-wp | digest |", "|---|---|---|"]

    def col(mode: str, f: Any) -> list[float]:
        return [float(f(r)) for r in res[mode] if r["outcome"] == "committed" and f(r) is not None]

    def row(name: str, f: Any, unit: str = "ms", scale: float = 1.0) -> None:
        rows.append(f"| {name} | {_fmt(col('uffd-wp', f), unit, scale)} | {_fmt(col('digest', f), unit, scale)} |")

    row(f"downtime, median (min-max) of {len(res['uffd-wp'])}", lambda r: r["downtime_ms"])
    row("expected downtime at switchover", lambda r: r["expected_downtime_ms"])
    for ph in ("pause", "final_scan", "final_pages", "device_state", "verify", "commit"):
        row(f"  phase {ph}", lambda r, ph=ph: r["phases_ms"].get(ph))
    row("iterative rounds", lambda r: sum(1 for x in r["rounds"] if x["kind"] == "iterative"), "")
    row("detection per iterative round (runs with one)", lambda r: med(
        [x["detect_seconds"] for x in r["rounds"] if x["kind"] == "iterative"]) if any(
        x["kind"] == "iterative" for x in r["rounds"]) else None, "ms", 1e3)
    row("total time", lambda r: r["total_time_s"], "s")
    for mode in ("uffd-wp", "digest"):
        outs = [f"{r['outcome']}{' (forced)' if r['forced'] else ''}, {r['tracking']}, "
                f"{r['verify_repairs']} repairs" for r in res[mode]]
        rows.append(f"| outcomes {mode} | {'; '.join(outs)} | |")
    u = col("uffd-wp", lambda r: r["downtime_ms"])
    d = col("digest", lambda r: r["downtime_ms"])
    if u and d:
        rows.append(f"| **digest / uffd-wp downtime (medians)** | **{med(d) / med(u):.1f}x** | |")
    return rows


# -- 2. round cost ---------------------------------------------------------------


def round_cost(region: Path, fractions: list[float], repeat: int = 5) -> list[dict[str, float]]:
    npages = os.path.getsize(region) // PAGE_SIZE
    fd = os.open(region, os.O_RDWR)
    mm = mmap.mmap(fd, npages * PAGE_SIZE, mmap.MAP_SHARED)
    pages = np.frombuffer(mm, dtype=np.uint8).reshape(npages, PAGE_SIZE)
    _ = int(pages[:, 0].sum())  # our mapping populated, as a running guest's would be
    anchor = ctypes.c_char.from_buffer(mm)
    start = ctypes.addressof(anchor)
    del anchor
    uffd = create_userfaultfd()
    uffd_api(uffd)
    mem = GuestMemory.open(region, writable=False)
    _ = int(mem.pages[:, 0].sum())  # the agent's mapping, populated by the full copy
    tracker = UffdTracker(TrackingOffer(uffd, os.getpid(), start, npages * PAGE_SIZE), mem)
    tracker.arm()
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)
    chunk_pages = 32
    sent = np.zeros(npages, dtype=np.uint64)
    base = region_chunk_digests(mem.view, chunk_pages, None, pool)
    sent[:] = page_digests(mem.pages)
    chunks = SourceChunks(mem, chunk_pages, pool)
    chunks.adopt(base.copy(), 0.0)
    rng = np.random.default_rng(7)
    out = []
    try:
        for frac in fractions:
            k = max(1, int(npages * frac))
            dig_s, trk_s, upk_s = [], [], []
            for _ in range(repeat):
                idx = np.sort(rng.choice(npages, k, replace=False))
                pages[idx, 0] += 1
                # The digest round: hash every chunk, then pages of changed chunks.
                t = time.perf_counter()
                live = region_chunk_digests(mem.view, chunk_pages, None, pool)
                cand = np.flatnonzero(live != base)
                cp = (cand[:, None] * chunk_pages + np.arange(chunk_pages)).ravel()
                found = cp[page_digests(mem.pages, cp) != sent[cp]]
                dig_s.append(time.perf_counter() - t)
                # The kernel: which pages were written.
                t = time.perf_counter()
                got = tracker.scan(sent)
                trk_s.append(time.perf_counter() - t)
                assert np.array_equal(got, idx) and np.array_equal(np.sort(found), idx), "tracking disagrees"
                t = time.perf_counter()
                chunks.rehash(got, sent)
                upk_s.append(time.perf_counter() - t)
                sent[idx] = page_digests(mem.pages, idx)
                base = live
            out.append({"fraction": frac, "pages": k, "digest_s": med(dig_s), "tracker_s": med(trk_s),
                        "upkeep_s": med(upk_s)})
        return out
    finally:
        tracker.close()
        pool.shutdown()
        del pages
        mem.close()
        mm.close()
        os.close(fd)


# -- 3. guest slowdown -------------------------------------------------------------


def writer_rate(work: Path, region: Path, pattern: str, cadence_s: float | None, seconds: float = 3.0) -> float:
    """Pages/s a full-speed guest writes; tracked with a scan every ``cadence_s`` (None: untracked)."""
    ctl = work / "w.sock"
    stats = work / "w.json"
    stats.unlink(missing_ok=True)
    args = {"sweep": ["--pattern", "sweep"], "random": ["--rate", "1e7", "--hot-fraction", "1"],
            "paced": ["--rate", "2000", "--hot-fraction", "1"]}[pattern]
    guest = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(region), *args,
                              "--control", str(ctl), "--duration", str(seconds + 1.0),
                              "--stats-out", str(stats)], cwd=ROOT)
    tracker = None
    mem = None
    try:
        _wait(ctl)
        if cadence_s is not None:
            offer = asyncio.run(GuestControl(ctl).offer_tracking())
            mem = GuestMemory.open(region, writable=False)
            tracker = UffdTracker(offer, mem)
            tracker.arm()
            stop = time.monotonic() + seconds + 1.0
            while time.monotonic() < stop and guest.poll() is None:
                tracker.scan()
                if cadence_s:
                    time.sleep(cadence_s)
        guest.wait(seconds + 30)
        st = json.loads(stats.read_text())
        return float(st["pages_written"]) / float(st["seconds"])
    finally:
        if tracker is not None:
            tracker.close()
        if mem is not None:
            mem.close()
        stop_process(guest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-slowdown", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="precopy-bench-tracking-", dir="/dev/shm"))
    out_dir = ROOT / "benchmarks" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"when": time.time(), "size": size}
    try:
        region = work / "guest.mem"
        create_region(region, size, "random", 1)
        res = downtime(work, region, args.runs)
        record["downtime"] = res
        print(f"\n## Downtime ({args.size})\n")
        print("\n".join(downtime_table(res)))

        cost = round_cost(region, [0.001, 0.01, 0.1])
        record["round_cost"] = cost
        print(f"\n## Round cost ({args.size}, medians of 5)\n")
        print("| dirty | digest round | uffd-wp detection | ratio | + chunk-table upkeep |\n|---|---|---|---|---|")
        for c in cost:
            print(f"| {c['fraction'] * 100:g} % ({c['pages']} pages) | {c['digest_s'] * 1e3:.1f} ms | "
                  f"{c['tracker_s'] * 1e3:.2f} ms | {100 * c['tracker_s'] / c['digest_s']:.1f} % | "
                  f"{c['upkeep_s'] * 1e3:.1f} ms |")

        if not args.skip_slowdown:
            iv = [x["seconds"] for r in res["uffd-wp"] for x in r["rounds"] if x["kind"] == "iterative"]
            policy = med(iv) if iv else 0.01
            cadences: list[tuple[str, float | None]] = [
                ("untracked", None), ("scan non-stop", 0.0), ("every 10 ms", 0.01), ("every 100 ms", 0.1),
                (f"policy cadence ({policy * 1e3:.0f} ms, median uffd-wp round)", policy),
                ("untracked (again)", None),
            ]
            rows = []
            for name, cad in cadences:
                rates = {p: writer_rate(work, region, p, cad) for p in ("sweep", "random", "paced")}
                rows.append((name, rates))
            record["slowdown"] = [(n, r) for n, r in rows]
            base = rows[0][1]
            print(f"\n## Guest slowdown while tracked ({args.size})\n")
            print("| tracker | sweep writer, pages/s | vs untracked | random writer, pages/s | vs untracked "
                  "| 2,000 pages/s guest, pages/s |")
            print("|---|---|---|---|---|---|")
            for name, r in rows:
                print(f"| {name} | {r['sweep']:,.0f} | {r['sweep'] / base['sweep']:.2f} | "
                      f"{r['random']:,.0f} | {r['random'] / base['random']:.2f} | {r['paced']:,.0f} |")
        with open(out_dir / "tracking.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

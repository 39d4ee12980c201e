"""What a digest scan page by page costs against xxh3 in large buffers, alone.

    python -m benchmarks.scan_floor [--size-mib 1024] [--runs 5]

A live digest scan of a fast writer's region goes page by page
(``DigestScanner.page_scan``: most chunks changed since the last scan, so a
chunk pass would only add a pass).  This measures, on a region of random
bytes in /dev/shm and with nothing else running, the three ways of reading
it: xxh3 in 64 MiB buffers (the yardstick of the issue's scan target), xxh3
of 128 KiB chunks on two threads (the chunk pass: the GIL is released above
64 KiB), and :func:`precopy.memory.digest.page_digests` (one xxh3 call per 4 KiB
page, GIL held).  The ratio of the last to the first is the floor of the
"live digest scan ÷ xxh3" figure for a page-by-page scan on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from precopy.memory.digest import chunk_digests, page_digests
from precopy.memory.region import GuestMemory


def measure(path: Path, runs: int) -> dict[str, float]:
    """Median seconds of each way of reading the region at ``path``."""
    mem = GuestMemory.open(path, writable=False)
    pool = ThreadPoolExecutor(2)
    try:
        idx = np.arange(mem.npages, dtype=np.uint32)
        view = mem.view
        big = 64 << 20

        def buffers() -> None:
            for off in range(0, mem.size, big):
                xxhash.xxh3_64_intdigest(view[off:off + big])

        ways = {
            "xxh3, 64 MiB buffers": buffers,
            "xxh3, 128 KiB chunks, two threads": lambda: chunk_digests(view, 128 << 10, pool),
            "xxh3 per 4 KiB page (page_digests)": lambda: page_digests(mem.pages, idx),
        }
        for fn in ways.values():
            fn()  # map the pages in first: time the hashing only
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(runs):
            for name, fn in ways.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        return {name: statistics.median(ts) for name, ts in times.items()}
    finally:
        pool.shutdown()
        mem.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the region (MiB)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each (medians reported)")
    args = ap.parse_args()
    if args.size_mib <= 0 or args.runs <= 0:
        ap.error("--size-mib and --runs must be positive")
    path = Path("/dev/shm") / f"precopy-scan-floor.{os.getpid()}"
    try:
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        res = measure(path, args.runs)
    finally:
        path.unlink(missing_ok=True)
    base = res["xxh3, 64 MiB buffers"]
    for name, s in res.items():
        print(f"{name}: {s * 1e3:.1f} ms ({s / base:.2f}x)")


if __name__ == "__main__":
    main()

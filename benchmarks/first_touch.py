"""How fast this machine writes into memory it has not touched yet, run after run.

    python -m benchmarks.first_touch [--size-mib 1024] [--runs 10]

Creates a file in /dev/shm, writes every byte of it through a shared
mapping in 1 MiB pieces, removes it, and again, waiting 0-8 s between runs
(the time since the last free matters where a VM hands freed memory back to
its host, e.g. virtio_balloon with free page reporting).  Prints each run's
time: what a migration into a fresh destination region pays for its first
write of every page.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time
from pathlib import Path

import numpy as np

PIECE = 1 << 20


def touch(path: Path, size: int) -> float:
    """Seconds to write every byte of a new ``size``-byte file at ``path`` through its mapping."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED) as m:
            a = np.frombuffer(m, dtype=np.uint8)
            ones = np.ones(PIECE, dtype=np.uint8)
            t = time.monotonic()
            for off in range(0, size, PIECE):
                a[off:off + PIECE] = ones[:min(PIECE, size - off)]
            dt = time.monotonic() - t
            del a
        return dt
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the file to touch (MiB)")
    ap.add_argument("--runs", type=int, default=10, help="how many times")
    args = ap.parse_args()
    if args.size_mib <= 0 or args.runs <= 0:
        ap.error("--size-mib and --runs must be positive")
    size = args.size_mib << 20
    path = Path("/dev/shm") / f"precopy-first-touch.{os.getpid()}"
    waits = [0, 0, 0.5, 1, 2, 3, 5, 8, 0, 5]
    times = []
    for i in range(args.runs):
        wait = waits[i % len(waits)]
        time.sleep(wait)
        dt = touch(path, size)
        times.append(dt)
        print(f"run {i + 1}: waited {wait} s since the last free; first touch of {args.size_mib} MiB "
              f"{dt * 1e3:.0f} ms ({size / dt / 1e9:.2f} GB/s)", flush=True)
    print(f"median {np.median(times) * 1e3:.0f} ms, min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}")


if __name__ == "__main__":
    main()

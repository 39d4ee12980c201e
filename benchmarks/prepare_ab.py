"""A/B of the destination's region preparation (RESULTS.md).

    .venv/bin/python -m benchmarks.prepare_ab [--runs 6]
    .venv/bin/python -m benchmarks.prepare_ab --calls     # the kernel calls alone

Alternates, in one process, 1 GiB idle migrations whose destination either
prefaults its fresh region only (``MADV_POPULATE_WRITE``, the earlier
behaviour, re-created here) or reserves each chunk with ``fallocate`` and
then prefaults it (the current ``Preparation.start_prepare``).  Prints the
median total time of each.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import shutil
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import uvloop

import precopy
import precopy.memory.prepare as prepare
from precopy.guest import create_region


def _populate_only(self: prepare.Preparation, *, populate: bool = True, chunk: int = 8 << 20,
                   skip: Any = None) -> None:
    base = self._mapping()
    self.reserved = self.size

    def run() -> None:
        off = 0
        while off < self.size and not self._populate_stop.is_set():
            n = min(chunk, self.size - off)
            prepare._libc.madvise(base + off, n, prepare.MADV_POPULATE_WRITE)
            off += n

    self._populate_thread = threading.Thread(target=run, daemon=True)
    self._populate_thread.start()


class _Idle:
    def describe(self) -> str:
        return "idle"

    async def pause(self) -> bytes:
        return b""

    async def resume(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def _main(runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="precopy-ab-", dir="/dev/shm"))
    try:
        src = work / "src.mem"
        create_region(src, 1 << 30, "random", 1)
        current = prepare.Preparation.start_prepare
        times: dict[str, list[float]] = {"populate only": [], "reserve + populate": []}
        for _ in range(runs):
            for label, impl in (("populate only", _populate_only), ("reserve + populate", current)):
                prepare.Preparation.start_prepare = impl  # type: ignore[method-assign]
                dest = work / "dest"
                shutil.rmtree(dest, ignore_errors=True)
                server = precopy.DestinationServer(precopy.DestOptions(memory_dir=dest, port=0))
                await server.start()
                serving = asyncio.create_task(server.serve_forever())
                report = await precopy.migrate(precopy.SourceOptions(
                    host="127.0.0.1", port=server.port, memory=src, compress="off"), _Idle())
                times[label].append(report.total_time_s)
                await server.close()
                await serving
        prepare.Preparation.start_prepare = current  # type: ignore[method-assign]
        for label, values in times.items():
            print(f"{label}: median {statistics.median(values):.3f} s  "
                  f"{[round(v, 2) for v in values]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _calls(size: int = 1 << 30) -> None:
    """Time preparing a fresh 1 GiB tmpfs file: prefault only vs reserve + prefault."""
    import mmap
    import time

    for label, reserve in (("populate only", False), ("reserve + populate", True)):
        path = Path(tempfile.mkdtemp(prefix="precopy-ab-", dir="/dev/shm")) / "r"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED)
            anchor = ctypes.c_char.from_buffer(m)
            base = ctypes.addressof(anchor)
            del anchor
            t = time.perf_counter()
            if reserve:
                prepare._libc.fallocate(fd, 0, 0, size)
            prepare._libc.madvise(base, size, prepare.MADV_POPULATE_WRITE)
            print(f"{label}: {time.perf_counter() - t:.3f} s")
            m.close()
        finally:
            os.close(fd)
            shutil.rmtree(path.parent, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--calls", action="store_true", help="time the kernel calls alone")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.calls:
        _calls()
        return 0
    uvloop.run(_main(args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

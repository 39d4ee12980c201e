"""Receive paths into a destination region (existing, or with --fresh new): which is fastest here?

    python -m benchmarks.rx_paths [--size 1G] [--runs 3]

A sender process streams the region in frames (a 4 KiB header + 1 MiB of
pages, one ``sendmsg`` each, straight from its mapping) over loopback; the
receiver puts the pages into a region file in ``/dev/shm`` that already
holds data (every page allocated, as after an earlier migration), three ways:

* ``pwrite``: ``recv_into`` a reused 1 MiB buffer, then ``pwrite`` it into
  the file -- what ``precopy-dest`` does into a new region;
* ``into-mapping``: ``recv_into`` straight into the file's shared mapping
  (no second copy, but each page is mapped in on first touch);
* ``populate+into-mapping``: the same after ``MADV_POPULATE_READ`` of the
  mapping (the populate time counted; a shared tmpfs mapping populated for
  reading is writable) -- what ``precopy-dest`` does into an existing
  region, populating in a thread while the migration starts.

Prints each way's median time, GB/s and the receiver's CPU time.  Here
(2026-12-03, 1 GiB, 3 runs): pwrite 422 ms wall, 335 ms receiver CPU;
into-mapping 452 / 441 ms (a page fault per page); populate+into-mapping
301 / 208 ms, the ~30 ms of MADV_POPULATE_READ included.  (With
MADV_POPULATE_WRITE, ~60-90 ms for 1 GiB, it had measured 497 / 264 ms.)

With ``--fresh`` the region is a new file each time (no page allocated):
``pwrite``, ``into-mapping`` (a first-touch fault per page) and
``populate-ahead+into-mapping``: a thread maps the file in writable
(``MADV_POPULATE_WRITE``, 8 MiB at a time, in order) while the receiver
``recv_into``s the mapping behind it -- what ``precopy-dest`` does into a new
tmpfs region.  Here (2026-12-04, 1 GiB, 5 runs): pwrite 694 ms wall, 657 ms
receiver CPU; into-mapping 1454 / 1434 ms; populate-ahead 409 / 541 ms (the
thread's CPU included: it runs on the other core).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from precopy.guest import create_region, parse_size

FRAME = 1 << 20
HEADER = 4096
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
PIECE = 8 << 20


def _sender(path: str, size: int, port: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    os.close(fd)
    v = memoryview(m)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    hdr = bytes(HEADER)
    for off in range(0, size, FRAME):
        s.sendmsg([hdr, v[off:off + FRAME]])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the receiver's "done"
    s.close()
    v.release()
    m.close()


def _recv_exact(c: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = c.recv_into(view[got:])
        if not n:
            raise ConnectionError("sender closed early")
        got += n


def _populate_ahead(m: mmap.mmap, size: int, mark: list[int], advice: int) -> threading.Thread:
    """A thread that populates the mapping in 8 MiB pieces, in order, moving ``mark[0]`` past each."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None, use_errno=True)

    def go() -> None:
        for off in range(0, size, PIECE):
            if libc.madvise(ctypes.c_void_p(addr + off), ctypes.c_size_t(min(PIECE, size - off)), advice):
                raise OSError(ctypes.get_errno(), "madvise")
            mark[0] = off + PIECE
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def run(way: str, src: Path, dst: Path, size: int) -> tuple[float, float]:
    """One transfer; returns (seconds, receiver CPU seconds)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    p = mp.get_context("spawn").Process(target=_sender, args=(str(src), size, ls.getsockname()[1]))
    p.start()
    c, _ = ls.accept()
    ls.close()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    fd = os.open(dst, os.O_RDWR)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    region = memoryview(m)
    header = memoryview(bytearray(HEADER))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        if way == "pwrite":
            buf = memoryview(bytearray(FRAME))
            for off in range(0, size, FRAME):
                _recv_exact(c, header)
                _recv_exact(c, buf)
                os.pwrite(fd, buf, off)
        elif way == "populate-ahead+into-mapping":
            mark = [0]
            th = _populate_ahead(m, size, mark, MADV_POPULATE_WRITE)
            for off in range(0, size, FRAME):
                _recv_exact(c, header)
                while mark[0] < off + FRAME:
                    time.sleep(0.0002)
                _recv_exact(c, region[off:off + FRAME])
            th.join()
        else:
            if way.startswith("populate"):
                addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
                if ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(addr), ctypes.c_size_t(size),
                                                             MADV_POPULATE_READ):
                    raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_READ)")
            for off in range(0, size, FRAME):
                _recv_exact(c, header)
                _recv_exact(c, region[off:off + FRAME])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        c.send(b"x")
        p.join()
        c.close()
        region.release()
        m.close()
        os.close(fd)
    return seconds, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="region size (default 1G)")
    ap.add_argument("--runs", type=int, default=3, help="transfers per way, interleaved (default 3)")
    ap.add_argument("--fresh", action="store_true",
                    help="into a new region file each time (no page allocated yet) instead of an existing one")
    args = ap.parse_args()
    size = parse_size(args.size)
    ways = (["pwrite", "into-mapping", "populate-ahead+into-mapping"] if args.fresh
            else ["pwrite", "into-mapping", "populate+into-mapping"])
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="precopy-rx.") as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        create_region(src, size, "random", 1)
        if not args.fresh:
            create_region(dst, size, "random", 2)  # exists, every page allocated
        results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        for _ in range(args.runs):
            for way in ways:
                if args.fresh:
                    dst.unlink(missing_ok=True)
                    with open(dst, "wb") as f:
                        f.truncate(size)
                results[way].append(run(way, src, dst, size))
    print(f"{args.size} into {'a new' if args.fresh else 'an existing'} /dev/shm region, "
          f"{args.runs} runs each (median):")
    for way in ways:
        t = statistics.median(s for s, _ in results[way])
        cpu = statistics.median(c for _, c in results[way])
        print(f"  {way:22s} {t * 1e3:7.0f} ms  {size / t / 1e9:5.2f} GB/s  receiver CPU {cpu * 1e3:5.0f} ms")


if __name__ == "__main__":
    main()

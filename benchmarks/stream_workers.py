"""Where a stream's work should run: one event loop, a thread each, or a process each (issue 21).

    python -m benchmarks.stream_workers                      # 1 GiB, streams 1 and 2, 5 rounds
    python -m benchmarks.stream_workers --work page-hash     # with per-page Python work on the receiver

Moves a region file (in /dev/shm) over N loopback TCP connections into
another file's mapping -- the shape of a precopy stream, without the
protocol: the sender writes a 16-byte header (offset, length) and 1 MiB
straight from its mapping; the receiver reads the header and receives the
bytes straight into its mapping (``recv_into``).  Stream k carries the
region's 4 MiB stripes k, k+N, ... (as ``--streams``).  Each side runs in a
process of its own, its N streams as:

* ``loop``: one asyncio event loop (uvloop) serving all N sockets -- what
  precopy does today;
* ``threads``: one thread per stream, blocking sockets (``sendall`` and
  ``recv_into`` release the GIL; the per-batch Python work does not);
* ``processes``: one process per stream, each mapping the file itself.

``--work``: per-batch Python work besides the copy: ``none``; ``header``
(msgpack a batch header of 256 uint32 page numbers and check it with NumPy
on the other side: what precopy does per batch); ``page-hash`` (header, and
the receiver hashes each 4 KiB page in a Python loop: xxhash holds the GIL
for small inputs, as precopy's per-page digests do).  Rounds interleave
every case; medians of the GB/s.  Benchmarks report; they never fail on a
timing.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack
import numpy as np
import xxhash

from precopy.guest import create_region, parse_size

BATCH = 1 << 20
STRIPE = 4 << 20
HDR = struct.Struct("<QQ")
MODES = ("loop", "threads", "processes")


def _stripes(size: int, k: int, n: int) -> list[tuple[int, int]]:
    """The (offset, length) batches of stream ``k`` of ``n``."""
    out = []
    for s in range(k * STRIPE, size, n * STRIPE):
        for off in range(s, min(s + STRIPE, size), BATCH):
            out.append((off, min(BATCH, size - off)))
    return out


def _header(off: int, n: int, work: str) -> bytes:
    if work == "none":
        return HDR.pack(off, n)
    pages = np.arange(off // 4096, (off + n) // 4096, dtype="<u4").tobytes()
    meta = msgpack.packb({"i": pages, "z": b"", "c": 0}, use_bin_type=True)
    return HDR.pack(off, n) + struct.pack("<I", len(meta)) + meta


def _check(sock: socket.socket, work: str, view: memoryview, off: int, n: int) -> None:
    """The receiver's per-batch work after the header (the meta, if any, is read here)."""
    if work == "none":
        return
    (mlen,) = struct.unpack("<I", _recv_exact(sock, 4))
    meta = msgpack.unpackb(_recv_exact(sock, mlen), raw=False)
    idx = np.frombuffer(meta["i"], dtype="<u4")
    if idx.size > 1 and not bool(np.greater(idx[1:], idx[:-1]).all()):
        raise ValueError("not increasing")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if not r:
            raise ConnectionError("closed")
        got += r
    return bytes(buf)


def _after(work: str, view: memoryview, off: int, n: int) -> None:
    if work == "page-hash":
        h = xxhash.xxh3_64_intdigest
        for p in range(off, off + n, 4096):
            h(view[p:p + 4096])


def send_stream(path: str, addr: tuple[str, int], k: int, n: int, work: str) -> None:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = memoryview(mm)
    sock = socket.create_connection(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for off, ln in _stripes(len(mm), k, n):
        sock.sendall(_header(off, ln, work))
        sock.sendall(view[off:off + ln])
    sock.close()
    view.release()
    mm.close()


def recv_stream(path: str, conn: socket.socket, work: str) -> None:
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    view = memoryview(mm)
    while True:
        try:
            off, ln = HDR.unpack(_recv_exact(conn, HDR.size))
        except ConnectionError:
            break
        _check(conn, work, view, off, ln)
        got = 0
        while got < ln:
            r = conn.recv_into(view[off + got:off + ln])
            if not r:
                raise ConnectionError("closed mid-batch")
            got += r
        _after(work, view, off, ln)
    conn.close()
    view.release()
    mm.close()


# -- the event-loop variant ----------------------------------------------------


async def _aio_send(path: str, addr: tuple[str, int], n: int, work: str) -> None:
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = memoryview(mm)

    async def one(k: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for off, ln in _stripes(len(mm), k, n):
            await loop.sock_sendall(sock, _header(off, ln, work))
            await loop.sock_sendall(sock, view[off:off + ln])
        sock.close()

    await asyncio.gather(*(one(k) for k in range(n)))
    view.release()
    mm.close()


async def _aio_recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = await loop.sock_recv_into(sock, view[got:])
        if not r:
            raise ConnectionError("closed")
        got += r
    return bytes(buf)


async def _aio_recv(path: str, lsock: socket.socket, n: int, work: str) -> None:
    loop = asyncio.get_running_loop()
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    view = memoryview(mm)
    lsock.setblocking(False)

    async def one(conn: socket.socket) -> None:
        conn.setblocking(False)
        while True:
            try:
                off, ln = HDR.unpack(await _aio_recv_exact(loop, conn, HDR.size))
            except ConnectionError:
                break
            if work != "none":
                (mlen,) = struct.unpack("<I", await _aio_recv_exact(loop, conn, 4))
                meta = msgpack.unpackb(await _aio_recv_exact(loop, conn, mlen), raw=False)
                idx = np.frombuffer(meta["i"], dtype="<u4")
                assert idx.size < 2 or bool(np.greater(idx[1:], idx[:-1]).all())
            got = 0
            while got < ln:
                r = await loop.sock_recv_into(conn, view[off + got:off + ln])
                if not r:
                    raise ConnectionError("closed mid-batch")
                got += r
            _after(work, view, off, ln)
        conn.close()

    conns = [(await loop.sock_accept(lsock))[0] for _ in range(n)]  # (one accept at a time: uvloop)
    await asyncio.gather(*(one(c) for c in conns))
    view.release()
    mm.close()


def _uvloop_run(coro: object) -> None:
    import uvloop
    uvloop.run(coro)  # type: ignore[arg-type]


# -- one side, in the mode asked for ----------------------------------------------


def _fan(target: Callable[..., None], argsets: list[tuple[object, ...]], mode: str) -> None:
    """Run ``target`` once per argument tuple: threads, or processes (fork)."""
    if mode == "threads":
        ts = [threading.Thread(target=target, args=a) for a in argsets]
    else:
        ctx = mp.get_context("fork")
        ts = [ctx.Process(target=target, args=a) for a in argsets]  # type: ignore[misc]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def sender_side(path: str, addr: tuple[str, int], n: int, mode: str, work: str) -> None:
    if mode == "loop":
        _uvloop_run(_aio_send(path, addr, n, work))
    else:
        _fan(send_stream, [(path, addr, k, n, work) for k in range(n)], mode)


def _accept_and_recv(path: str, lsock: socket.socket, work: str) -> None:
    conn, _ = lsock.accept()
    recv_stream(path, conn, work)


def receiver_side(path: str, lsock: socket.socket, n: int, mode: str, work: str) -> None:
    if mode == "loop":
        _uvloop_run(_aio_recv(path, lsock, n, work))
    else:
        _fan(_accept_and_recv, [(path, lsock, work) for _ in range(n)], mode)


def one_run(src: Path, dst: Path, n: int, mode: str, work: str) -> float:
    """Seconds to move the region over ``n`` streams in ``mode``."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    ctx = mp.get_context("fork")
    rx = ctx.Process(target=receiver_side, args=(str(dst), lsock, n, mode, work))
    rx.start()
    t = time.monotonic()
    tx = ctx.Process(target=sender_side, args=(str(src), lsock.getsockname(), n, mode, work))
    tx.start()
    tx.join()
    rx.join()
    took = time.monotonic() - t
    lsock.close()
    if tx.exitcode or rx.exitcode:
        raise RuntimeError(f"a side failed: sender {tx.exitcode}, receiver {rx.exitcode}")
    return took


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stream_workers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--streams", default="1,2")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--work", default="header", choices=["none", "header", "page-hash"])
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    streams = [int(x) for x in args.streams.split(",")]
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="precopy-sw-", dir="/dev/shm") as d:
        src, dst = Path(d) / "src.mem", Path(d) / "dst.mem"
        create_region(src, size, "random", 1)
        create_region(dst, size, "random", 2)  # an existing region: every page there already
        cases = [(n, m) for n in streams for m in modes]
        got: dict[tuple[int, str], list[float]] = {c: [] for c in cases}
        for _ in range(args.runs):
            for n, m in cases:
                got[(n, m)].append(size / one_run(src, dst, n, m, args.work) / 1e9)
        if src.read_bytes() != dst.read_bytes():
            raise SystemExit("the copy is not byte-exact")
    print(f"{args.size}, --work {args.work}, {args.runs} rounds, {os.cpu_count()} CPUs; GB/s, median (range):")
    print("| streams | mode | GB/s |\n|---|---|---|")
    for (n, m), xs in got.items():
        print(f"| {n} | {m} | {statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

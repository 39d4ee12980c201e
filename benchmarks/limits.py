"""Yardsticks measured in the same run as the migrations they judge.

* ``raw_copy``: the same bytes over a raw TCP socket between two processes
  on the link under test (1 MiB ``sendall`` from the mapped region, ``recv_into``), either into a
  reused buffer (the link), into a fresh region file (the link plus the
  first-touch cost any migration to a new host pays), or straight into the
  mapping of a region file that already holds data, mapped in beforehand
  (the link plus writing every byte to memory once: what a migration into
  an existing region cannot do without).
* ``hash_time``: pure xxh3 over the region in 64 MiB buffers (one core);
  ``hash_time_2``: xxh3 of 1 MiB pieces on two threads, the GIL released:
  what reading the whole region costs on both cores, the floor of any scan
  that rehashes it.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import xxhash

_RECEIVER = r"""
import mmap, os, socket, sys
mode, size, target, host = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode == "existing":  # written, mapped and mapped in (MADV_POPULATE_READ) before the clock starts
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\x5a" * (1 << 20)
    for off in range(0, size, 1 << 20):
        os.pwrite(fd, block, off)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    m.madvise(22)
ls = socket.socket(); ls.bind((host, 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
cpu0 = os.times().user + os.times().system
c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
if mode in ("fresh", "existing"):
    if mode == "fresh":
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    view = memoryview(m)
    got = 0
    while got < size:
        n = c.recv_into(view[got:got + (1 << 20)])
        if not n: break
        got += n
    view.release(); m.close(); os.close(fd); os.unlink(target)
else:
    buf = bytearray(1 << 20); view = memoryview(buf); got = 0
    while got < size:
        n = c.recv_into(view)
        if not n: break
        got += n
c.sendall(b"k")
print(os.times().user + os.times().system - cpu0, flush=True)  # CPU seconds of the copy
"""

_SENDER = r"""
import mmap, os, socket, sys, time
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.stat(path).st_size
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
view = memoryview(m)
s = socket.create_connection((host, port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
t = time.perf_counter()
cpu0 = os.times().user + os.times().system
for off in range(0, size, 1 << 20):
    s.sendall(view[off:off + (1 << 20)])
s.recv(1)
print(time.perf_counter() - t, os.times().user + os.times().system - cpu0, flush=True)
"""


def raw_copy(region: Path, fresh: bool, *, host: str = "127.0.0.1", recv_prefix: Sequence[str] = (),
             send_prefix: Sequence[str] = (), into: str | None = None, cpu: list[float] | None = None,
             cpu_sides: list[tuple[float, float]] | None = None) -> float:
    """Seconds to move the region's bytes from one process to another over TCP.

    Into a fresh file (``fresh``), a reused buffer, or ``into="existing"``:
    an existing region file, mapped in.  The receiver listens on ``host``;
    ``recv_prefix``/``send_prefix`` put the two processes elsewhere (``ip
    netns exec NS``) to measure a shaped link.  ``cpu``, a list, gets the
    CPU seconds (user + system) both processes spent on the copy appended;
    ``cpu_sides`` the pair (sender, receiver).
    """
    size = region.stat().st_size
    target = str(region.parent / f".rawcopy-{os.getpid()}")
    mode = into or ("fresh" if fresh else "link")
    p = subprocess.Popen([*recv_prefix, sys.executable, "-c", _RECEIVER, mode, str(size), target, host],
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        out = subprocess.run([*send_prefix, sys.executable, "-c", _SENDER, str(region), host, str(port)],
                             capture_output=True, text=True, check=True, timeout=600)
        elapsed, send_cpu = (float(x) for x in out.stdout.split())
        if cpu is not None or cpu_sides is not None:
            p.wait(30)
            recv_cpu = float(p.stdout.readline())
            if cpu is not None:
                cpu.append(send_cpu + recv_cpu)
            if cpu_sides is not None:
                cpu_sides.append((send_cpu, recv_cpu))
        return elapsed
    finally:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        Path(target).unlink(missing_ok=True)


def hash_time(region: Path) -> float:
    """Seconds for xxh3 over the whole region in 64 MiB buffers."""
    size = region.stat().st_size
    fd = os.open(region, os.O_RDONLY)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(m)
    for off in range(0, size, 64 << 20):  # fault the mapping in first: time hashing only
        xxhash.xxh3_64_intdigest(view[off:off + (64 << 20)])
    t = time.perf_counter()
    for off in range(0, size, 64 << 20):
        xxhash.xxh3_64_intdigest(view[off:off + (64 << 20)])
    elapsed = time.perf_counter() - t
    view.release()
    m.close()
    os.close(fd)
    return elapsed


def hash_time_2(region: Path) -> float:
    """Seconds for xxh3 of the region in 1 MiB pieces on two threads (the GIL released)."""
    from concurrent.futures import ThreadPoolExecutor

    size = region.stat().st_size
    fd = os.open(region, os.O_RDONLY)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(m)
    piece = 1 << 20

    def part(lo: int, hi: int) -> None:
        for off in range(lo, hi, piece):
            xxhash.xxh3_64_intdigest(view[off:off + piece])

    half = (size // 2) // piece * piece
    with ThreadPoolExecutor(2) as pool:
        part(0, size)  # fault the mapping in first
        t = time.perf_counter()
        list(pool.map(part, (0, half), (half, size)))
        elapsed = time.perf_counter() - t
    view.release()
    m.close()
    os.close(fd)
    return elapsed

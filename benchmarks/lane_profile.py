"""Where a remote fault's microseconds go on the post-copy fault lane (issue 22, benchmarks/RESULTS.md lat22).

    PRECOPY_LANE_TRACE=/tmp/trace python -m benchmarks.postcopy --size-mib 1024 --runs 1 \\
        --postcopy immediate --writer random --lane
    python -m benchmarks.lane_profile /tmp/trace
    python -m benchmarks.lane_profile --alone      # the same calls in one idle process (both frame sets)

With ``PRECOPY_LANE_TRACE=DIR`` each lane child (precopy/session/postcopy_lane_child.py) writes
the CLOCK_MONOTONIC time of each step of a fault's round trip, by its first page
(precopy/session/lane_shared.py ``trace``): the destination's ``since`` (the last look at an empty
userfaultfd: where the reported latency starts), ``polled`` (the lean loop's only: its ``poll``
returned -- the fault came between ``since`` and then), ``read``, ``asked`` (REQUEST sent); the
source's ``request`` (received), ``claimed``, ``answered`` (PAGES sent); the destination's
``woke`` (its poll returned for the answer), ``parsed``, ``placed`` (``pwrite`` +
``UFFDIO_CONTINUE`` done: the guest runs).  This joins them by page (round trips of one page,
answered by the lane) and prints p50 / p90 of each step in microseconds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

STEPS = [("dest", "since"), ("dest", "polled"), ("dest", "read"), ("dest", "asked"), ("source", "request"), ("source", "claimed"),
         ("source", "answered"), ("dest", "woke"), ("dest", "parsed"), ("dest", "placed")]


def load(trace_dir: Path) -> dict[tuple[str, str], dict[int, float]]:
    """(side, step) -> page -> time (the first time the step was seen for the page)."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for path in sorted(trace_dir.glob("lane-*.txt")):
        side = path.name.split("-")[1]
        for line in path.read_text().splitlines():
            step, page, t = line.split()
            out.setdefault((side, step), {}).setdefault(int(page), float(t))
    return out


def lean(a: Any, b: Any, mem: Any, each: Any) -> None:
    """The same two steps with the lane's lean frames (precopy/protocol/lane_frames.py), as the
    children's lean loops make them (lane_fast_source.py, lane_fast_dest.py)."""
    from precopy.protocol.lane_frames import (LANE_PAGES, LANE_REQUEST, PAGES_HEAD_SIZE, REQUEST_BUF_SIZE,
                                              LaneReader, decode_pages, decode_request, pack_pages, pack_request)
    from precopy.session.lane_fast_source import send_all

    out, rd_src, rd_dst = bytearray(REQUEST_BUF_SIZE), LaneReader(LANE_REQUEST), LaneReader(LANE_PAGES)
    head, bufs, recs = bytearray(PAGES_HEAD_SIZE), [], []  # type: ignore[var-annotated]
    region = mem.view

    def request() -> None:
        n = pack_request([12345], out)
        b.sendall(memoryview(out)[:n])
        rd_src.took(a.recv_into(rd_src.space()))
        frame = rd_src.next()
        assert frame is not None
        decode_request(frame[1], 262144)

    def answer() -> None:
        n = pack_pages([100], [region[100 * 4096:101 * 4096]], head, bufs)
        send_all(a, bufs, n)
        while (frame := rd_dst.next()) is None:
            rd_dst.took(b.recv_into(rd_dst.space()))
        decode_pages(frame[1], 262144, recs)

    print(f"LANE_REQUEST packed, sent, received, checked: {each(request):.1f} us")
    print(f"LANE_PAGES of 1 page packed (xxh3), sent, received, checked: {each(answer):.1f} us")
    bufs.clear()


def alone() -> None:
    """The lane's calls timed in one idle process (no load, no other process): the floor."""
    import asyncio
    import os
    import socket
    import tempfile
    import time

    from precopy.memory.region import GuestMemory
    from precopy.net.channel import Channel
    from precopy.protocol import Join, Joined, Request, Role, page_payload
    from precopy.protocol.phases import Phase
    from precopy.session.lane_shared import CrossLock, SharedArrays
    from precopy.session.postcopy_stream import pages_from_mapping

    def each(f: object, n: int = 2000) -> float:
        f()  # type: ignore[operator]
        t = time.perf_counter()
        for _ in range(n):
            f()  # type: ignore[operator]
        return (time.perf_counter() - t) / n * 1e6

    async def run() -> None:
        a, b = socket.socketpair()
        src, dst = Channel(a, Role.SOURCE), Channel(b, Role.DEST)
        for c in (src.conn, dst.conn):
            c.phase = Phase.AUTHENTICATED
        for ev, x, y in ((Join(migration_id="m", stream=0, size=1 << 30, chunk_pages=32, lane=True), src, dst),
                         (Joined(), dst, src)):
            for buf in x.conn.send(ev):
                y.conn.receive_data(bytes(buf))
            y.conn.next_event()
        a.setblocking(True)
        b.setblocking(True)
        idx = np.array([12345], dtype=np.uint32)

        def request() -> None:
            dst.send_blocking(Request(indices=idx))
            src.recv_blocking()
            src.conn.next_event()

        with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
            f.truncate(1 << 30)
            f.write(os.urandom(1 << 20))
            f.flush()
            mem = GuestMemory.open(f.name, writable=False)
            idx = np.array([100], dtype=np.uint32)

            def answer() -> None:
                src.send_blocking(pages_from_mapping(mem, idx))
                dst.recv_blocking()
                page_payload(dst.conn.next_event(), chunk_pages=32)

            print(f"REQUEST send + receive + parse: {each(request):.1f} us")
            print(f"PAGES of 1 page gathered, framed, sent, received, parsed: {each(answer):.1f} us")
            lean(a, b, mem, each)
            mem.close()
        need = np.ones(262144, dtype=bool)
        print(f"count_nonzero of a 1 GiB region's mask: {each(lambda: np.count_nonzero(need)):.1f} us")
        shared = SharedArrays.create("alone", {"x": ("int64", 1)})
        lock = CrossLock.open(shared.path())

        def take() -> None:
            with lock:
                pass

        print(f"CrossLock taken and given back: {each(take):.1f} us")
        lock.close()
        shared.close()

    asyncio.run(run())


def main() -> None:
    if sys.argv[1:] == ["--alone"]:
        alone()
        return
    got = load(Path(sys.argv[1]))
    steps = [k for k in STEPS if k in got]  # ("polled": the lean loop's only)
    pages = set(got.get(("dest", "placed"), {}))
    for key in steps:
        pages &= set(got.get(key, {}))
    if not pages:
        raise SystemExit(f"no complete round trip in {sys.argv[1]}")
    order = sorted(pages)
    times = np.array([[got[k][p] for k in steps] for p in order])
    diffs = np.diff(times, axis=1) * 1e6
    print(f"{len(order)} round trips (one page, answered on the lane); microseconds, p50 / p90 / p99:")
    for i, (a, b) in enumerate(zip(steps, steps[1:])):
        col = diffs[:, i]
        print(f"  {a[0]} {a[1]:>8} -> {b[0]} {b[1]:<8} {np.percentile(col, 50):8.0f} / {np.percentile(col, 90):8.0f}"
              f" / {np.percentile(col, 99):8.0f}")
    total = (times[:, -1] - times[:, 0]) * 1e6
    print(f"  since -> placed (the reported latency)  {np.percentile(total, 50):8.0f} / {np.percentile(total, 90):8.0f}"
          f" / {np.percentile(total, 99):8.0f}")


if __name__ == "__main__":
    main()

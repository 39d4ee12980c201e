"""Where a remote fault's microseconds go on the post-copy fault lane (issue 22, benchmarks/RESULTS.md lat22).

    PRECOPY_LANE_TRACE=/tmp/trace python -m benchmarks.postcopy --size-mib 1024 --runs 1 \\
        --postcopy immediate --writer random --lane
    python -m benchmarks.lane_profile /tmp/trace

With ``PRECOPY_LANE_TRACE=DIR`` each lane child (precopy/session/postcopy_lane_child.py) writes
the CLOCK_MONOTONIC time of each step of a fault's round trip, by its first page
(precopy/session/lane_shared.py ``trace``): the destination's ``since`` (the last look at an empty
userfaultfd: where the reported latency starts), ``read``, ``asked`` (REQUEST sent); the
source's ``request`` (received), ``claimed``, ``answered`` (PAGES sent); the destination's
``woke`` (its poll returned for the answer), ``parsed``, ``placed`` (``pwrite`` +
``UFFDIO_CONTINUE`` done: the guest runs).  This joins them by page (round trips of one page,
answered by the lane) and prints p50 / p90 of each step in microseconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

STEPS = [("dest", "since"), ("dest", "read"), ("dest", "asked"), ("source", "request"), ("source", "claimed"),
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


def main() -> None:
    got = load(Path(sys.argv[1]))
    pages = set(got.get(("dest", "placed"), {}))
    for key in STEPS:
        pages &= set(got.get(key, {}))
    if not pages:
        raise SystemExit(f"no complete round trip in {sys.argv[1]}")
    order = sorted(pages)
    times = np.array([[got[k][p] for k in STEPS] for p in order])
    steps = np.diff(times, axis=1) * 1e6
    print(f"{len(order)} round trips (one page, answered on the lane); microseconds, p50 / p90:")
    for i, (a, b) in enumerate(zip(STEPS, STEPS[1:])):
        col = steps[:, i]
        print(f"  {a[0]} {a[1]:>8} -> {b[0]} {b[1]:<8} {np.percentile(col, 50):8.0f} / {np.percentile(col, 90):8.0f}")
    total = (times[:, -1] - times[:, 0]) * 1e6
    print(f"  since -> placed (the reported latency)  {np.percentile(total, 50):8.0f} / {np.percentile(total, 90):8.0f}"
          f"   p99 {np.percentile(total, 99):.0f}")


if __name__ == "__main__":
    main()

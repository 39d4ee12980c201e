"""Summarise py-spy raw (collapsed) stack files: self and inclusive samples.

    python benchmarks/pyspy_summary.py FILE... [--top N] [--skip-idle]

py-spy samples threads it takes for running, but a thread blocked in a
queue's or a condition's wait still shows up in its raw output here;
``--skip-idle`` drops the samples whose leaf frame is such a wait
(``IDLE``) and says how many it dropped, so the percentages are of work.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

#: Leaf frames of a thread waiting (a thread pool's queue, a condition, an event), not working.
IDLE = re.compile(r"^(?:(?:Condition\.wait|Event\.wait|Thread\._wait_for_tstate_lock) \(threading\.py:\d+\)"
                  r"|_worker \(concurrent/futures/thread\.py:8[01]\))$")


def summarise(path: str, top: int, skip_idle: bool = False) -> str:
    self_n: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            if skip_idle and IDLE.match(frames[-1]):
                idle += n
                continue
            total += n
            self_n[frames[-1]] += n
            for frame in set(frames):
                incl[frame] += n
    if not total:
        return f"{path}: no samples"
    dropped = f" ({idle} more of waiting threads left out)" if skip_idle else ""
    out = [f"{path}: {total} samples{dropped}", "  self (leaf frame):"]
    out += [f"    {n:6d} {100 * n / total:5.1f}%  {fr}" for fr, n in self_n.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {n:6d} {100 * n / total:5.1f}%  {fr}" for fr, n in incl.most_common(top + 10)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="py-spy record -f raw output files")
    ap.add_argument("--top", type=int, default=12, help="frames to list (default: 12)")
    ap.add_argument("--skip-idle", action="store_true",
                    help="leave out samples of threads waiting (a queue, a condition, an event)")
    args = ap.parse_args(argv)
    for path in args.files:
        try:
            print(summarise(path, args.top, args.skip_idle))
        except OSError as exc:
            print(f"cannot read {path}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

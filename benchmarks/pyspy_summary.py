"""Summarise py-spy raw (collapsed) stack files: self and inclusive samples.

    python benchmarks/pyspy_summary.py FILE... [--top N]
"""

from __future__ import annotations

import argparse
import collections
import sys


def summarise(path: str, top: int) -> str:
    self_n: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            self_n[frames[-1]] += n
            for frame in set(frames):
                incl[frame] += n
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples", "  self (leaf frame):"]
    out += [f"    {n:6d} {100 * n / total:5.1f}%  {fr}" for fr, n in self_n.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {n:6d} {100 * n / total:5.1f}%  {fr}" for fr, n in incl.most_common(top + 10)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="py-spy record -f raw output files")
    ap.add_argument("--top", type=int, default=12, help="frames to list (default: 12)")
    args = ap.parse_args(argv)
    for path in args.files:
        try:
            print(summarise(path, args.top))
        except OSError as exc:
            print(f"cannot read {path}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

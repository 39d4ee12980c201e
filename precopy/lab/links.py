"""Two hosts joined by several links: N veth pairs between two network namespaces, each shaped.

A host with several NICs, on one machine, for ``--streams`` (issue 21):
namespaces NAME-src and NAME-dst joined by veth pairs NAME-sK <-> NAME-dK
(K = 0 .. N-1), each pair its own /30 subnet and each end shaped with
``tc tbf`` to ``rate`` (both directions), so that stream K can go from
``src_ips[K]`` to ``dst_ips[K]`` over link K alone.  Needs root and the
``ip`` and ``tc`` tools (:func:`precopy.lab.netns.unavailable_reason`).

    python -m precopy.lab.links up NAME --links 4 [--rate 1gbit]
    python -m precopy.lab.links down NAME --links 4
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from precopy.lab.netns import _run, delete_namespaces, shape, unavailable_reason

__all__ = ["MultiLink"]


@dataclass
class MultiLink:
    """Namespaces NAME-src and NAME-dst joined by ``links`` veth pairs, each shaped to ``rate``.

    A context manager; ``down()`` is idempotent and removes what ``up()``
    made, even after a partial ``up()``.
    """

    name: str
    links: int = 2
    rate: str | None = "1gbit"
    src_ips: list[str] = field(init=False)
    dst_ips: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 10 or not self.name.replace("-", "").isalnum():
            raise ValueError(f"namespace name {self.name!r}: use 1-10 letters, digits or '-'")
        if not 1 <= self.links <= 16:
            raise ValueError(f"links must be 1..16, not {self.links}")
        # 16 /30s (one /26) inside 10.216.0.0/13, picked from the name, so concurrent users do not collide
        h = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:2], "big")
        a, b, c = 216 + (h >> 13), (h >> 5) & 0xFF, (h & 0x3) * 64
        self.src_ips = [f"10.{a}.{b}.{c + 4 * k + 1}" for k in range(self.links)]
        self.dst_ips = [f"10.{a}.{b}.{c + 4 * k + 2}" for k in range(self.links)]
        self.src_ns, self.dst_ns = f"{self.name}-src", f"{self.name}-dst"

    def exec_prefix(self, ns: str) -> list[str]:
        """argv prefix that runs a command inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def up(self) -> MultiLink:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot create namespaces: {reason}")
        self.down()
        try:
            _run(["ip", "netns", "add", self.src_ns])
            _run(["ip", "netns", "add", self.dst_ns])
            for ns in (self.src_ns, self.dst_ns):
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            for k in range(self.links):
                self._link(k)
        except Exception:
            self.down()
            raise
        return self

    def _link(self, k: int) -> None:
        s, d = f"{self.name}-s{k}", f"{self.name}-d{k}"
        _run(["ip", "link", "add", s, "netns", self.src_ns, "type", "veth", "peer", "name", d, "netns", self.dst_ns])
        for ns, dev, ip in ((self.src_ns, s, self.src_ips[k]), (self.dst_ns, d, self.dst_ips[k])):
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            if self.rate:
                shape(ns, dev, self.rate)

    def down(self) -> None:
        delete_namespaces(self.src_ns, self.dst_ns)

    def __enter__(self) -> MultiLink:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m precopy.lab.links", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("up", "down"))
    ap.add_argument("name", help="prefix for the namespaces (NAME-src, NAME-dst) and veth devices")
    ap.add_argument("--links", type=int, default=2, help="veth pairs (default 2)")
    ap.add_argument("--rate", default="1gbit", help="tc tbf rate of each link, both directions; 'none': unshaped "
                                                    "(default 1gbit)")
    args = ap.parse_args(argv)
    try:
        lab = MultiLink(args.name, args.links, None if args.rate == "none" else args.rate)
        if args.action == "up":
            lab.up()
            for k in range(lab.links):
                print(f"link {k}: {lab.src_ns} {lab.src_ips[k]} -> {lab.dst_ns} {lab.dst_ips[k]}")
        else:
            lab.down()
    except (RuntimeError, ValueError) as exc:
        print(f"precopy.lab.links: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two hosts on one machine: network namespaces joined by a shaped veth pair.

The tests, the benchmark harness and the README walk-through use this to put
the source agent and the destination daemon on "two machines" linked by a
dedicated migration link of a known rate (``tc tbf``, both directions).
Needs root (CAP_NET_ADMIN) and the ``ip`` and ``tc`` tools.

    python -m precopy.lab.netns up   NAME [--rate 1gbit]   # prints the two addresses
    python -m precopy.lab.netns down NAME

then ``ip netns exec NAME-dst precopy-dest --listen 10.x.y.2:7070 --insecure ...``
(or with ``--auth-key-file``/TLS: a non-loopback address needs one of them) and
``ip netns exec NAME-src precopy-source --to 10.x.y.2:7070 ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TwoHosts", "unavailable_reason", "rate_bits_per_s", "enter_in_thread"]


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc shaping need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the '{tool}' tool is not installed (Debian: iproute2)"
    return None


def rate_bits_per_s(rate: str) -> float:
    """Parse a tc rate such as '1gbit', '500mbit', '100kbit' into bits per second."""
    text = rate.strip().lower()
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * mult
            except ValueError:
                break
    raise ValueError(f"rate {rate!r} is not a tc rate such as '1gbit' or '500mbit'")


_CLONE_NEWNET = 0x40000000


def enter_in_thread(ns: str) -> None:
    """Move the calling thread (only it) into network namespace ``ns``.

    Sockets the thread creates from then on live in ``ns``: an in-process
    helper (a fault proxy, an outcome query) can sit on one "host" of a
    :class:`TwoHosts` pair while the rest of the process stays where it is.
    Raises OSError when the namespace does not exist or setns(2) fails.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")


def shape(ns: str, dev: str, rate: str) -> None:
    """Limit what ``dev`` in namespace ``ns`` sends to ``rate`` (tc tbf, e.g. ``1gbit``)."""
    # burst: at least one timer tick's worth of bytes at this rate, and >= 64 KiB GSO segments
    burst = max(int(rate_bits_per_s(rate) / 8 / 250), 256 * 1024)
    _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
          "rate", rate, "burst", str(burst), "latency", "50ms"])


def delete_namespaces(*names: str) -> None:
    """Delete the namespaces that exist of ``names`` (with their ends of veth pairs, and so the peers)."""
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@dataclass
class TwoHosts:
    """Namespaces NAME-src and NAME-dst joined by veth NAME-s <-> NAME-d.

    ``rate`` shapes both directions with tbf (None: unshaped veth). Use as a
    context manager; ``down()`` is idempotent and removes everything ``up()``
    made, even after a partial ``up()``.
    """

    name: str
    rate: str | None = "1gbit"

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 10 or not self.name.replace("-", "").isalnum():
            raise ValueError(f"namespace name {self.name!r}: use 1-10 letters, digits or '-'")
        # a /30 inside 10.200.0.0/13 picked from the name, so concurrent users do not collide
        h = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:2], "big")
        net = f"10.{200 + (h >> 13)}.{(h >> 5) & 0xFF}.{(h & 0x1F) * 8}"
        base = net.rsplit(".", 1)[0]
        last = int(net.rsplit(".", 1)[1])
        self.src_ip = f"{base}.{last + 1}"
        self.dst_ip = f"{base}.{last + 2}"
        self.src_ns = f"{self.name}-src"
        self.dst_ns = f"{self.name}-dst"
        self._veth_src = f"{self.name}-s"
        self._veth_dst = f"{self.name}-d"

    def exec_prefix(self, ns: str) -> list[str]:
        """argv prefix that runs a command inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def up(self) -> TwoHosts:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot create namespaces: {reason}")
        self.down()
        try:
            _run(["ip", "netns", "add", self.src_ns])
            _run(["ip", "netns", "add", self.dst_ns])
            _run(["ip", "link", "add", self._veth_src, "netns", self.src_ns, "type", "veth",
                  "peer", "name", self._veth_dst, "netns", self.dst_ns])
            for ns, dev, ip in ((self.src_ns, self._veth_src, self.src_ip),
                                (self.dst_ns, self._veth_dst, self.dst_ip)):
                _run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                if self.rate:
                    shape(ns, dev, self.rate)
        except Exception:
            self.down()
            raise
        return self

    def down(self) -> None:
        delete_namespaces(self.src_ns, self.dst_ns)

    def __enter__(self) -> TwoHosts:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m precopy.lab.netns", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("up", "down"))
    ap.add_argument("name", help="prefix for the namespaces (NAME-src, NAME-dst) and veth devices")
    ap.add_argument("--rate", default="1gbit",
                    help="tc tbf rate for both directions, e.g. 1gbit, 500mbit; 'none' leaves the link unshaped "
                         "(default: 1gbit)")
    args = ap.parse_args(argv)
    hosts = TwoHosts(args.name, None if args.rate == "none" else args.rate)
    try:
        if args.action == "up":
            hosts.up()
            print(f"{hosts.src_ns} {hosts.src_ip}\n{hosts.dst_ns} {hosts.dst_ip}")
        else:
            hosts.down()
    except (RuntimeError, ValueError) as exc:
        print(f"precopy.lab.netns: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

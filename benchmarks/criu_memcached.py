"""memcached moved with CRIU: precopy + CRIU vs CRIU alone (stop-and-copy), in one run (issue 26).

Each run makes two hosts (network namespaces, :class:`precopy.lab.criu_pair.CriuPair`),
starts memcached with its item memory in a ``--cache-mib`` file on /dev/shm,
fills it with ``--keys`` keys, starts a client setting ``--rate`` keys a
second through the service address, and migrates it with
``precopy-source --criu``: ``precopy`` (pre-copy, then CRIU dump of what is
left, images, restore) or ``stop-and-copy`` (CRIU alone: pause, copy the
whole item file and the images, restore).  Modes alternate, run after run.
Prints each run's downtime split, the medians, the ratio and the wire bytes
against region x 1.2 + images; ``--json`` keeps every report.

    sudo python -m benchmarks.criu_memcached --cache-mib 1024 --rate 2000 --runs 3

Needs root, memcached and CRIU >= 4.2 (``make criu``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from precopy.lab.criu_pair import VIP, CriuPair, unavailable
from precopy.lab.memcached import Memcache, Writer, value_of
from precopy.lab.netns import enter_in_thread

SPLIT = ("pause", "final_scan", "final_pages", "device_state_wait", "device_state", "verify", "commit")
CRIU = ("criu_dump", "criu_pack", "dest_criu_unpack", "dest_criu_restore", "dest_criu_wait",
        "dest_criu_continue")


def _in_ns(ns: str, fn: Any) -> Any:
    box: dict[str, Any] = {}

    def go() -> None:
        enter_in_thread(ns)
        box["v"] = fn()

    t = threading.Thread(target=go)
    t.start()
    t.join()
    return box.get("v")


def _fill(keys: int, value_size: int) -> None:
    mc = Memcache.connect(VIP)
    mc.fill(keys, value_size)
    got = mc.get_many([f"k{keys - 1}"])
    mc.close()
    if got.get(f"k{keys - 1}") != value_of("k", keys - 1, value_size):
        raise RuntimeError("the fill did not take")


def one_run(mode: str, args: argparse.Namespace, n: int) -> dict[str, Any]:
    with CriuPair(f"criub{n}", cache_mib=args.cache_mib) as pair:
        t = time.monotonic()
        _in_ns(pair.hosts.src_ns, lambda: _fill(args.keys, args.value_size))
        fill_s = time.monotonic() - t
        writer = Writer(VIP, rate=args.rate, netns=pair.hosts.src_ns, value_size=args.value_size).start()
        time.sleep(args.warmup)
        extra = ["--downtime-ms", str(args.downtime_ms), "--on-commit", "kill"]
        if mode == "stop-and-copy":
            extra += ["--mode", "stop-and-copy"]
        rc, rep, err = pair.migrate(*extra, "--log-level", "warning")
        writer.stop()
        if rc != 0:
            raise RuntimeError(f"{mode} run {n} exit {rc}: {err[-2000:]}\n{pair.dest_log()[-2000:]}")
        acked = len(writer.acked)
    rep["bench"] = {"mode": mode, "fill_s": fill_s, "writes_acked": acked, "keys": args.keys}
    return rep


def _line(rep: dict[str, Any]) -> str:
    ph = rep.get("phases_ms", {})
    split = ", ".join(f"{k} {ph[k]:.1f}" for k in SPLIT + CRIU if k in ph)
    return (f"{rep['bench']['mode']:>13}: downtime {rep['downtime_ms']:.1f} ms ({split}); wire "
            f"{rep['bytes_on_wire'] / 2**20:.1f} MiB, images {rep['device_state_bytes'] / 2**20:.2f} MiB, "
            f"{len(rep['rounds'])} rounds, {rep['total_time_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.criu_memcached", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-mib", type=int, default=1024, help="memcached -m: the item file (default 1024)")
    ap.add_argument("--keys", type=int, default=800_000, help="keys filled before the run (default 800,000)")
    ap.add_argument("--value-size", type=int, default=1000, help="bytes per value (default 1000)")
    ap.add_argument("--rate", type=float, default=2000.0, help="sets a second during the run (default 2000)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of writes before migrating (default 2)")
    ap.add_argument("--downtime-ms", type=float, default=150.0, help="precopy's budget (default 150)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each mode, alternating (default 3)")
    ap.add_argument("--json", type=Path, help="write every report here")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    reports: list[dict[str, Any]] = []
    for i in range(args.runs):
        for mode in ("precopy", "stop-and-copy"):
            rep = one_run(mode, args, len(reports))
            reports.append(rep)
            print(_line(rep), flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    pre = [r for r in reports if r["bench"]["mode"] == "precopy"]
    sc = [r for r in reports if r["bench"]["mode"] == "stop-and-copy"]
    med_pre = statistics.median(r["downtime_ms"] for r in pre)
    med_sc = statistics.median(r["downtime_ms"] for r in sc)
    print(f"\nmedian downtime: precopy+CRIU {med_pre:.1f} ms, CRIU alone (stop-and-copy) {med_sc:.1f} ms: "
          f"{med_sc / med_pre:.1f}x lower")
    for key in SPLIT + CRIU:
        vals = [r["phases_ms"][key] for r in pre if key in r.get("phases_ms", {})]
        if vals:
            print(f"  precopy {key}: median {statistics.median(vals):.1f} ms")
    for r in pre:
        bound = r["region_bytes"] * 1.2 + r["device_state_bytes"]
        print(f"  wire {r['bytes_on_wire'] / 2**20:.1f} MiB <= region x 1.2 + images {bound / 2**20:.1f} MiB: "
              f"{r['bytes_on_wire'] <= bound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

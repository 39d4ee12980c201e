"""QMP round trips: precopy's QMP connection (qemu.qmp inside) vs an older revision's client.

    .venv/bin/python -m benchmarks.qmp_rtt [--baseline REV] [--rounds 7] [--calls 300]
                                           [--event-loop uvloop|asyncio] [--busy-thread]

One QEMU (``-machine none``, nothing to emulate) serves QMP on a Unix
socket.  Each round connects each client in turn (interleaved, so both see
the same machine load), times ``--calls`` ``query-status`` round trips one
after the other, and records their median.  The baseline client is the
``QMPClient`` in ``precopy/workload/qmp.py`` at ``REV`` (read with ``git
show``; the hand-written client before issue 27).  Prints each client's
median over the rounds of its per-round median, in microseconds, and the
difference: what each QMP command inside the downtime costs more or less.

``--busy-thread`` runs a pure-Python loop in a second thread meanwhile, as
a daemon's worker thread holding the GIL: a loop turn that gives the GIL
away may then wait for the switch interval (5 ms) to get it back, so a
client that needs more loop turns per command is hit more often.  Also
prints each client's mean and how many rounds had a median over 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable

from precopy_agents.common import stop_process
from precopy.workload.qmp import QemuMonitor

ROOT = Path(__file__).resolve().parent.parent


def baseline_client(rev: str) -> Callable[..., Any]:
    """The QMP client class of ``precopy/workload/qmp.py`` (or precopy/qmp.py) at ``rev``."""
    for path in ("precopy/workload/qmp.py", "precopy/qmp.py"):
        p = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
        if p.returncode == 0:
            mod = types.ModuleType(f"qmp_at_{rev}")
            exec(compile(p.stdout, f"{rev}:{path}", "exec"), mod.__dict__)
            return mod.QMPClient  # type: ignore[no-any-return]
    raise SystemExit(f"no precopy/workload/qmp.py nor precopy/qmp.py at {rev}: {p.stderr.strip()}")


async def per_call_us(make: Callable[..., Any], path: Path, calls: int) -> float:
    c = make(path, timeout_s=30)
    await c.connect(wait_s=30)
    try:
        for _ in range(20):  # warm up
            await c.execute("query-status")
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await c.execute("query-status")
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    finally:
        await c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="b649119", help="git revision of the hand-written client "
                    "(default b649119, the last one with it)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--event-loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--busy-thread", action="store_true", help="a GIL-holding Python thread runs meanwhile")
    a = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    clients = {f"hand-written ({a.baseline})": baseline_client(a.baseline), "qemu.qmp (QemuMonitor)": QemuMonitor}
    results: dict[str, list[float]] = {k: [] for k in clients}
    with tempfile.TemporaryDirectory(prefix="qmp-rtt-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        qemu = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                                 "-qmp", f"unix:{sock},server=on,wait=off"], stdin=subprocess.DEVNULL)
        spinning = threading.Event()

        def spin() -> None:
            n = 0
            while not spinning.is_set():
                n += 1
        busy = threading.Thread(target=spin, daemon=True)
        if a.busy_thread:
            busy.start()
        try:
            async def rounds() -> None:
                for r in range(a.rounds):
                    order = list(clients.items())
                    for name, make in (order if r % 2 == 0 else order[::-1]):
                        results[name].append(await per_call_us(make, sock, a.calls))
            if a.event_loop == "uvloop":
                import uvloop
                uvloop.run(rounds())
            else:
                asyncio.run(rounds())
        finally:
            spinning.set()
            if busy.is_alive():
                busy.join()
            stop_process(qemu)
    print(f"query-status round trip, {a.event_loop}{', a busy thread' if a.busy_thread else ''}, "
          f"median per call (us) over {a.calls} calls; {a.rounds} interleaved rounds\n")
    print("| client | median of rounds (us) | mean of rounds (us) | rounds over 1 ms | rounds (us) |")
    print("|---|---|---|---|---|")
    for name, vals in results.items():
        print(f"| {name} | {statistics.median(vals):.0f} | {statistics.mean(vals):.0f} | "
              f"{sum(v > 1000 for v in vals)}/{len(vals)} | {', '.join(f'{v:.0f}' for v in vals)} |")
    base, new = (statistics.median(v) for v in results.values())
    print(f"\nqemu.qmp minus hand-written: {new - base:+.0f} us per command")
    return 0


if __name__ == "__main__":
    sys.exit(main())

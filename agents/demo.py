"""``make demo``: a real live migration of a running demo guest on loopback.

Starts a destination daemon and a dirtying guest, migrates the guest's
memory live with a progress display, checks the destination's region equals
the source's at the pause, lets the hook resume the guest on the
destination, prints the summary and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from precopy.guest import region_digest

from .common import stop_process

PY = sys.executable


def _wait_for(path: Path, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: {what} did not appear within {timeout:.0f} s ({path})")
        time.sleep(0.05)


def _resume_hook(digest: Path, control: Path, stats: Path, rate: float) -> str:
    """precopy-dest's --on-resume: fingerprint the received region before resuming the guest on it (a
    demo-only step, so the demo can compare it with the source), then run the guest there.  Every path
    is quoted for the shell: a checkout or temporary directory may have spaces."""
    py, q = shlex.quote(PY), shlex.quote
    return (f"{py} -c 'import sys; from precopy.guest import region_digest; "
            f"print(region_digest(sys.argv[1]))' \"$PRECOPY_MEMORY\" > {q(str(digest))} && "
            f"exec {py} -m precopy.guest dirty --memory \"$PRECOPY_MEMORY\" --rate {rate} "
            f"--duration 1 --control {q(str(control))} --stats-out {q(str(stats))}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="512M", help="guest memory size (default 512M)")
    ap.add_argument("--rate", type=float, default=20000, help="guest dirty rate, pages/s (default 20000)")
    ap.add_argument("--downtime-ms", type=float, default=300, help="downtime budget (default 300, as QEMU)")
    args = ap.parse_args()

    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="precopy-demo-", dir=shm))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        src_mem = work / "guest.mem"
        dest_dir = work / "dest"
        ready = work / "dest.addr"
        ctl = work / "guest.sock"
        dest_ctl = work / "guest-dest.sock"
        stats = work / "dest-guest.json"
        report = work / "report.json"

        print(f"== creating a {args.size} guest region in {src_mem} (half text, half random)")
        subprocess.run([PY, "-m", "precopy.guest", "create", "--memory", str(src_mem), "--size", args.size,
                        "--content", "half-text"], check=True)

        print("== starting precopy-dest on 127.0.0.1 (port picked by the OS)")
        dest_digest = work / "dest-digest.txt"
        hook = _resume_hook(dest_digest, dest_ctl, stats, args.rate)
        dest = subprocess.Popen([PY, "-m", "precopy_agents.dest_main", "--listen", "127.0.0.1:0",
                                 "--memory-dir", str(dest_dir), "--ready-file", str(ready),
                                 "--on-resume", hook, "--log-level", "warning"])
        procs.append(dest)
        _wait_for(ready, "the destination daemon")
        addr = ready.read_text().strip()

        print(f"== starting the guest: dirtying {args.rate:.0f} pages/s (90% into a 10% hot set)")
        guest = subprocess.Popen([PY, "-m", "precopy.guest", "dirty", "--memory", str(src_mem),
                                  "--rate", str(args.rate), "--control", str(ctl),
                                  "--device-state-size", "65536"])
        procs.append(guest)
        _wait_for(ctl, "the guest's control socket")
        time.sleep(0.5)

        print(f"== migrating live to {addr} with a {args.downtime_ms:.0f} ms downtime budget")
        rc = subprocess.call([PY, "-m", "precopy_agents.source_main", "--to", addr, "--memory", str(src_mem),
                              "--guest-control", str(ctl), "--downtime-ms", str(args.downtime_ms),
                              "--report", str(report), "--progress", "on", "--log-level", "warning"])
        if rc != 0:
            print(f"demo: precopy-source exited {rc}", file=sys.stderr)
            return 1

        # The source guest is paused (--on-commit keep-stopped): its memory is
        # exactly what was paused, and the destination received a copy.
        dest_mem = dest_dir / src_mem.name
        _wait_for(stats, "the resumed guest on the destination")
        rep = json.loads(report.read_text())
        print("== checking")
        src_digest = region_digest(str(src_mem))
        got = dest_digest.read_text().strip()
        print(f"   source region, paused        xxh3-128 {src_digest}")
        print(f"   destination region at resume xxh3-128 {got}")
        if got != src_digest:
            print("demo: the regions differ!", file=sys.stderr)
            return 1
        print(f"   identical; pages repaired by the final verification: {rep['verify_repairs']}")
        resumed = json.loads(stats.read_text())
        print(f"   guest resumed on the destination and wrote {resumed['pages_written']} pages "
              f"into {dest_mem}")
        print(f"== done: downtime {rep['downtime_ms']:.1f} ms (budget {args.downtime_ms:.0f} ms), "
              f"total {rep['total_time_s']:.2f} s, {rep['bytes_on_wire'] / 2**20:.0f} MiB on the wire "
              f"in {len(rep['rounds'])} rounds")
        return 0
    finally:
        for p in reversed(procs):
            stop_process(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

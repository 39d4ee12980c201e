"""A real VM: precopy (RAM file pre-copied, x-ignore-shared) vs QEMU's own pre-copy.

    .venv/bin/python -m benchmarks.qemu_vm [--sizes 256M,1G] [--runs 3] [--budget-ms 300]
                                           [--rate 5000] [--hot 16384]
                                           [--tools precopy,qemu] [--baseline REV]

The guest is precopy's test kernel (precopy/qemuguest) under TCG, rewriting
``--rate`` pages/s of a ``--hot``-page working set and verifying its RAM.
For each size and run:

* precopy: source QEMU with RAM on a shared /dev/shm file, ``precopy-dest
  --qemu-cmd`` (destination QEMU started at BEGIN with -incoming defer),
  ``precopy-source --qmp``.  Downtime = pause on the source until the
  destination confirms the VM runs (device-state load and ``cont`` included).
* QEMU: the same guest with anonymous RAM (no share, no x-ignore-shared),
  destination QEMU already waiting on ``-incoming tcp:127.0.0.1:PORT``,
  ``migrate-set-parameters`` downtime-limit = the same budget and
  max-bandwidth unlimited, ``migrate tcp:...``.  Downtime is QEMU's own
  figure (source stop until the end of the stream on the source; it does not
  include the destination's load).

``--baseline REV`` runs precopy a second time in each run, from a ``git
archive`` of revision REV (its own agents and engine), alternating with this
checkout: two versions compared in one session under the same load (rows
carry ``tree``).

Prints a markdown table; JSON lines go to benchmarks/out/qemu_vm.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from precopy_agents.common import stop_process
from precopy.guest import parse_size
from precopy.qemuguest import build
from precopy.qemuguest.vm import backend_argv, children, command_line, guest_argv, serial_ticks
from precopy.workload.qmp import QemuMonitor

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def _wait(pred, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _qmp(path: Path, *cmds: tuple[str, dict[str, Any] | None]) -> list[Any]:
    async def run() -> list[Any]:
        c = QemuMonitor(path, timeout_s=30)
        await c.connect(wait_s=30)
        try:
            return [await c.execute(cmd, args) for cmd, args in cmds]
        finally:
            await c.close()
    return asyncio.run(run())


def _boot(argv: list[str], serial: Path, log: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    _wait(lambda: len(serial_ticks(serial)) >= 3 or p.poll() is not None, "the guest to boot", 120)
    if p.poll() is not None:
        raise SystemExit(f"QEMU exited: {log.read_text()}")
    return p


def _agents(tree: Path) -> str:
    """The daemons' package to run from ``tree``: a checkout of another revision runs its own
    ``agents/`` folder (its cwd comes first on sys.path), never the installed precopy_agents."""
    return "precopy_agents" if tree == ROOT else "agents"


def run_precopy(work: Path, kernel: Path, mib: int, a: argparse.Namespace, tag: str,
                tree: Path = ROOT) -> dict[str, Any]:
    """One precopy migration of a VM, with precopy-source and precopy-dest run from ``tree``."""
    ram, dest_dir = Path(f"/dev/shm/qemu-bench-{tag}.ram"), Path(f"/dev/shm/qemu-bench-{tag}-dest")
    gargs = guest_argv(kernel, mib, rate=a.rate, hot=a.hot)
    src_qmp, dst_qmp = work / f"{tag}-src.qmp", work / f"{tag}-dst.qmp"
    src = dest = None
    try:
        src = _boot([*gargs, *backend_argv(str(ram), f"{mib}M"), "-serial", f"file:{work}/{tag}-src.serial",
                     "-qmp", f"unix:{src_qmp},server=on,wait=off"], work / f"{tag}-src.serial",
                    work / f"{tag}-src.log")
        qemu_cmd = command_line([*gargs, *backend_argv("{memory}", "{size}"),
                                 "-serial", f"file:{work}/{tag}-dst.serial", "-qmp", "unix:{qmp},server=on,wait=off",
                                 "-qmp", f"unix:{dst_qmp},server=on,wait=off", "-incoming", "defer"])
        ready = work / f"{tag}.addr"
        dest = subprocess.Popen([PY, "-m", f"{_agents(tree)}.dest_main", "--listen", "127.0.0.1:0", "--memory-dir",
                                 str(dest_dir), "--state-dir", str(work / f"{tag}-state"), "--ready-file",
                                 str(ready), "--log-level", "error", "--qemu-cmd", qemu_cmd], cwd=tree,
                                stdout=subprocess.DEVNULL)
        _wait(lambda: ready.exists() and ready.read_text().endswith("\n"), "precopy-dest")
        report = work / f"{tag}.json"
        rc = subprocess.call([PY, "-m", f"{_agents(tree)}.source_main", "--to", ready.read_text().strip(), "--memory",
                              str(ram), "--qmp", str(src_qmp), "--downtime-ms", str(a.budget_ms), "--report",
                              str(report), "--log-level", "warning", "--progress", "off",
                              "--on-nonconvergence", "force"], cwd=tree, stdout=subprocess.DEVNULL)
        rep = json.loads(report.read_text())
        dst_serial = work / f"{tag}-dst.serial"
        _wait(lambda: len(serial_ticks(dst_serial)) >= 2, "the guest to run on the destination")
        bad = max(t.bad for t in serial_ticks(dst_serial))
        return {"tool": "precopy", "mib": mib, "exit_code": rc, "downtime_ms": rep["downtime_ms"],
                "total_s": rep["total_time_s"], "rounds": len(rep["rounds"]),
                "mb_on_wire": rep["bytes_on_wire"] / 1e6, "device_state_bytes": rep["device_state_bytes"],
                "phases_ms": rep["phases_ms"], "guest_bad_pages": bad}
    finally:
        if dest is not None:
            for pid in children(dest.pid):  # the destination VM it started
                os.kill(pid, signal.SIGKILL)
        stop_process(dest)
        stop_process(src)
        ram.unlink(missing_ok=True)
        shutil.rmtree(dest_dir, ignore_errors=True)


def run_qemu(work: Path, kernel: Path, mib: int, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    gargs = guest_argv(kernel, mib, rate=a.rate, hot=a.hot)
    src_qmp, dst_qmp = work / f"{tag}-src.qmp", work / f"{tag}-dst.qmp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = dst = None
    try:
        src = _boot([*gargs, "-serial", f"file:{work}/{tag}-src.serial", "-qmp", f"unix:{src_qmp},server=on,wait=off"],
                    work / f"{tag}-src.serial", work / f"{tag}-src.log")
        dst = subprocess.Popen([*gargs, "-serial", f"file:{work}/{tag}-dst.serial", "-qmp",
                                f"unix:{dst_qmp},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"],
                               stdin=subprocess.DEVNULL, stdout=open(work / f"{tag}-dst.log", "wb"),
                               stderr=subprocess.STDOUT)
        _wait(dst_qmp.exists, "the destination QEMU")
        time.sleep(0.3)
        _qmp(src_qmp, ("migrate-set-parameters", {"downtime-limit": int(a.budget_ms),
                                                  "max-bandwidth": 64 << 30}),
             ("migrate", {"uri": f"tcp:127.0.0.1:{port}"}))

        async def poll() -> dict[str, Any]:
            c = QemuMonitor(src_qmp, timeout_s=30)
            await c.connect()
            try:
                deadline = time.monotonic() + a.max_time
                while True:
                    info: dict[str, Any] = await c.execute("query-migrate")
                    if info.get("status") in ("completed", "failed", "cancelled"):
                        return info
                    if time.monotonic() > deadline:
                        await c.execute("migrate_cancel")
                        info["status"] = "did not converge"
                        return info
                    await asyncio.sleep(0.01)
            finally:
                await c.close()
        info = asyncio.run(poll())
        row: dict[str, Any] = {"tool": "qemu", "mib": mib, "status": info.get("status")}
        if info.get("error-desc"):
            row["error"] = info["error-desc"]
        if info.get("status") == "completed":
            dst_serial = work / f"{tag}-dst.serial"
            _wait(lambda: len(serial_ticks(dst_serial)) >= 2, "the guest to run on the destination")
            ram = info.get("ram", {})
            row.update(downtime_ms=info.get("downtime"), total_s=info.get("total-time", 0) / 1e3,
                       rounds=ram.get("dirty-sync-count"), mb_on_wire=ram.get("transferred", 0) / 1e6,
                       setup_ms=info.get("setup-time"),
                       guest_bad_pages=max(t.bad for t in serial_ticks(dst_serial)))
        return row
    finally:
        stop_process(dst)
        stop_process(src)


def checkout(rev: str, into: Path) -> Path:
    """The files of revision ``rev`` of this repository, in ``into``."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256M,1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget-ms", type=float, default=300.0)
    ap.add_argument("--rate", type=int, default=5000, help="pages/s the guest rewrites (default 5000)")
    ap.add_argument("--hot", type=int, default=16384, help="pages in the guest's working set (default 16384)")
    ap.add_argument("--max-time", type=float, default=120.0, help="give up on QEMU converging after this")
    ap.add_argument("--tools", default="precopy,qemu", help="which migrations to run (default precopy,qemu)")
    ap.add_argument("--baseline", metavar="REV", help="also run precopy from git revision REV, alternating")
    a = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qemu-bench-") as tmp:
        work = Path(tmp)
        kernel = build(work / "guest.elf")
        trees = [("HEAD", ROOT)]
        if a.baseline:
            trees.append((a.baseline, checkout(a.baseline, work / "baseline")))
        tools = a.tools.split(",")
        for size in a.sizes.split(","):
            mib = parse_size(size) >> 20
            for i in range(a.runs):
                todo: list[tuple[str, str, Any]] = []
                if "precopy" in tools:  # alternate which tree goes first
                    todo += [("precopy", name, lambda w, k, m, a_, t, tree=tree: run_precopy(w, k, m, a_, t, tree))
                             for name, tree in (trees if i % 2 == 0 else trees[::-1])]
                if "qemu" in tools:
                    todo.append(("qemu", "", run_qemu))
                for tool, tree_name, fn in todo:
                    row = fn(work, kernel, mib, a, f"{tool}-{mib}-{i}-{len(rows)}")
                    row.update(run=i, budget_ms=a.budget_ms, rate=a.rate, hot=a.hot)
                    if tree_name:
                        row["tree"] = tree_name
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    with open(out / "qemu_vm.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    def med(rs: list[dict[str, Any]], k: str) -> float:
        vals = [r[k] for r in rs if r.get(k) is not None]
        return statistics.median(vals) if vals else float("nan")

    print(f"\nguest rewrites {a.rate} pages/s of a {a.hot}-page working set; budget {a.budget_ms:.0f} ms; "
          f"medians of {a.runs} runs\n")
    variants = sorted({(r["tool"], r.get("tree", "")) for r in rows}, key=lambda v: (v[0] != "precopy", v[1]))
    print("| VM RAM | tool | downtime ms | total s | MB on the wire | rounds | completed |")
    print("|---|---|---|---|---|---|---|")
    for size in a.sizes.split(","):
        mib = parse_size(size) >> 20
        for tool, tree_name in variants:
            rs = [r for r in rows if r["mib"] == mib and r["tool"] == tool and r.get("tree", "") == tree_name]
            ok = sum(1 for r in rs if r.get("exit_code") == 0 or r.get("status") == "completed")
            label = f"{tool} ({tree_name})" if a.baseline and tree_name else tool
            print(f"| {size} | {label} | {med(rs, 'downtime_ms'):.1f} | {med(rs, 'total_s'):.2f} | "
                  f"{med(rs, 'mb_on_wire'):.0f} | {med(rs, 'rounds'):.0f} | {ok}/{len(rs)} |")
    print("\nprecopy downtime split (median ms):")
    pre = [r for r in rows if r["tool"] == "precopy" and "phases_ms" in r]
    keys = list(pre[0]["phases_ms"]) if pre else []
    for size in a.sizes.split(","):
        mib = parse_size(size) >> 20
        for tool, tree_name in variants:
            rs = [r for r in pre if r["mib"] == mib and r.get("tree", "") == tree_name]
            if tool != "precopy" or not rs:
                continue
            split = {k: statistics.median(r["phases_ms"][k] for r in rs if k in r["phases_ms"])
                     for k in keys if any(k in r["phases_ms"] for r in rs)}
            label = f" ({tree_name})" if a.baseline else ""
            print(f"  {size}{label}: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

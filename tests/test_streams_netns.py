"""--streams over several links (issue 21): two network namespaces joined by three shaped veth pairs
(root only; skipped with the reason otherwise).

The real agents: precopy-dest in the destination namespace listening on all
its addresses with a pre-shared key, precopy-source in the source namespace
with ``--streams 3``, stream K to the destination's address on link K
(``--stream-to``) from its own (``--bind``).  The region arrives byte-exact
and each link carried its stream (the veth counters), each stream having
authenticated on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from precopy.lab.links import MultiLink
from precopy.lab.netns import unavailable_reason

from .conftest import ENV, PY, ROOT, Procs, create_region, guest, proc_state, wait_for

_reason = unavailable_reason()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(_reason is not None, reason=f"multi-link test: {_reason}")]

LINKS = 3


def _tx_bytes(ns: str, dev: str) -> int:
    """Bytes device ``dev`` of namespace ``ns`` has sent."""
    return int(subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/tx_bytes"],
                              capture_output=True, text=True, check=True).stdout)


def test_a_migration_over_three_links_one_stream_each(procs: Procs, work: Path, shm: Path) -> None:
    region = work / "guest.mem"
    create_region(region, "48M", content="random")
    key = work / "key"
    key.write_text("c3RyZWFtcy1vdmVyLXRocmVlLWxpbmtzLXRlc3Qta2V5IQ==\n")
    key.chmod(0o600)
    with MultiLink(f"st{os.getpid()}", LINKS, "1gbit") as lab:
        g = procs.start(*guest("dirty", "--memory", str(region), "--rate", "500"))
        ready, log = work / "dest.addr", work / "dest.log"
        dest = subprocess.Popen(
            [*lab.exec_prefix(lab.dst_ns), PY, "-m", "precopy_agents.dest_main", "--listen", "0.0.0.0:0",
             "--memory-dir", str(shm / "dest"), "--ready-file", str(ready), "--auth-key-file", str(key)],
            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        procs.procs.append(dest)  # type: ignore[arg-type]
        wait_for(lambda: ready.exists() and ready.read_text().endswith("\n") or dest.poll() is not None,
                 what="precopy-dest in the destination namespace")
        assert dest.poll() is None, log.read_text()
        port = ready.read_text().strip().rsplit(":", 1)[1]
        before = [_tx_bytes(lab.src_ns, f"{lab.name}-s{k}") for k in range(LINKS)]
        report = work / "report.json"
        r = subprocess.run(
            [*lab.exec_prefix(lab.src_ns), PY, "-m", "precopy_agents.source_main",
             "--to", f"{lab.dst_ips[0]}:{port}", "--memory", str(region), "--pid", str(g.pid),
             "--auth-key-file", str(key), "--report", str(report), "--progress", "off", "--streams", str(LINKS),
             *[a for k in range(1, LINKS) for a in ("--stream-to", f"{lab.dst_ips[k]}:{port}")],
             *[a for k in range(LINKS) for a in ("--bind", lab.src_ips[k])]],
            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr + log.read_text()
        rep = json.loads(report.read_text())
        assert rep["outcome"] == "committed" and rep["streams"] == LINKS and rep["verify_repairs"] == 0
        assert proc_state(g.pid) == "T"
        assert (shm / "dest" / "guest.mem").read_bytes() == region.read_bytes()
        assert rep["source"].startswith(lab.src_ips[0] + ":")
        # Each link carried its stream: a third of the region at least, each.
        sent = [_tx_bytes(lab.src_ns, f"{lab.name}-s{k}") - before[k] for k in range(LINKS)]
        assert min(sent) >= (48 << 20) // LINKS, sent
        assert len(rep["stream_bytes"]) == LINKS and min(rep["stream_bytes"]) >= (48 << 20) // LINKS
        dest.terminate()
        dest.wait(10)

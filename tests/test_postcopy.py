"""Post-copy end to end on loopback: real agents, real guests (the det guest's digest says every page
arrived exactly right, whatever order the pages came in)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest

from .conftest import SH_PY, Procs, create_region, guest, run_source, start_dest, wait_for

pytestmark = pytest.mark.integration

STEPS = 20000


#: The unmigrated run's digest per step count: the det guest is deterministic (seed 7 region, fixed
#: steps), so one run per test session serves every post-copy test that compares against it.
_REFERENCE: dict[int, str] = {}


def reference_digest(procs: Procs, shm: Path, steps: int = STEPS) -> str:
    if steps not in _REFERENCE:
        _REFERENCE[steps] = _run_reference(procs, shm, steps)
    return _REFERENCE[steps]


def _run_reference(procs: Procs, shm: Path, steps: int) -> str:
    ref = shm / "ref.mem"
    create_region(ref, "8M", seed=7)
    r = procs.start(*guest("det", "--memory", str(ref), "--steps", str(steps)), stdout=open(shm / "ref.out", "wb"))
    assert r.wait(120) == 0
    digest: str = json.loads((shm / "ref.out").read_text())["digest"]
    ref.unlink()
    return digest


def det_hook(out: Path, steps: int = STEPS) -> str:
    """The destination's on-resume hook: a det guest that takes part in post-copy."""
    return (f"exec {SH_PY} -m precopy.guest det --memory \"$PRECOPY_MEMORY\" --device-state \"$PRECOPY_DEVICE_STATE\" "
            f"--steps {steps} --digest-out {shlex.quote(str(out))} --control \"$PRECOPY_POSTCOPY_CONTROL\" --postcopy")


def det_source(procs: Procs, shm: Path, steps: int = STEPS, *extra: str) -> tuple[Path, Path]:
    src = shm / "vm.mem"
    create_region(src, "8M", seed=7)
    ctl = shm / "det.sock"
    procs.start(*guest("det", "--memory", str(src), "--steps", str(steps), "--control", str(ctl),
                       "--step-sleep-us", "100", *extra), stdout=open(shm / "det.out", "wb"))
    wait_for(ctl.exists, what="det guest control socket")
    time.sleep(0.3)
    return src, ctl


@pytest.mark.parametrize("tracking", ["uffd-wp", "digest"])
def test_postcopy_now_gives_the_unmigrated_digest(procs: Procs, shm: Path, tracking: str) -> None:
    expected = reference_digest(procs, shm)
    out = shm / "resumed.json"
    dest = start_dest(procs, shm, "--on-resume", det_hook(out))
    src, ctl = det_source(procs, shm)
    rc, rep, log = run_source(shm, "--to", dest.addr, "--memory", str(src), "--guest-control", str(ctl),
                              "--postcopy", "now", "--tracking", tracking, "--on-commit", "kill")
    assert rc == 0, log + dest.log_text()
    print(json.dumps(rep["postcopy"]), rep["downtime_ms"], rep["phases_ms"])
    assert rep is not None and rep["outcome"] == "committed"
    pc = rep["postcopy"]
    assert pc is not None and pc["pages_missing"] > 0, pc
    assert pc["pages_pushed"] + pc["pages_requested"] == pc["pages_missing"], pc
    assert pc["duplicates"] == 0 and pc["reconnects"] == 0, log + dest.log_text()
    assert rep["rounds"][-1]["kind"] == "postcopy" and rep["tracking"] == tracking
    wait_for(out.exists, timeout=120, what="the resumed det guest to finish")
    got = json.loads(out.read_text())
    assert got == {"steps": STEPS, "digest": expected}
    records = list((dest.memory_dir / ".precopy" / "journal").glob("*.json"))
    rec = json.loads(next(r for r in records if r.name != ".probe.json").read_text())
    assert rec["outcome"] == "committed" and rec["postcopy"] == "complete"

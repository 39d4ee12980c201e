"""``make test`` ends by saying which tests it skipped and the command that enables them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .conftest import ENV, PY, ROOT
from .skipsummary import FAMILIES, ci_packages, skip_summary

CI_RUN = (ROOT / ".ci" / "run").read_text()
QEMU = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86; .ci/run does)"


def test_the_packages_come_from_ci_runs_install_lines() -> None:
    pairs = ci_packages(CI_RUN)
    assert pairs[:3] == [("qemu-system-x86_64", "qemu-system-x86"), ("gcc", "gcc"), ("ld", "binutils")]
    # Every family's tools are ones .ci/run installs: the advice is what CI does.
    assert {t for _, _, tools in FAMILIES.values() for t in tools} <= {tool for tool, _ in pairs}


def test_a_cluster_skip_asks_for_the_cluster_packages_only() -> None:
    skips = [("tests/test_cluster.py::test_drain", "no cluster here: crmsh is not installed")]
    lines = skip_summary(skips, CI_RUN, lambda tool: None if tool in ("crm", "qemu-system-x86_64") else "/x")
    assert lines[-2].startswith("To run the cluster tests")
    assert lines[-1].strip() == "apt-get install -y --no-install-recommends crmsh"


def test_skips_are_grouped_by_reason_with_the_command_for_what_is_missing() -> None:
    skips = [(f"tests/test_qemu.py::test_{i}", f"Skipped: {QEMU}") for i in range(5)]
    skips += [("tests/test_auth.py::test_load_key_unreadable", "root reads any file")]
    lines = skip_summary(skips, CI_RUN, lambda tool: None if tool == "qemu-system-x86_64" else f"/usr/bin/{tool}")
    text = "\n".join(lines)
    assert lines[0] == "6 tests skipped:"
    assert lines[1] == f"  5 x {QEMU}"  # the largest group first, "Skipped: " dropped
    assert "tests/test_qemu.py: 5 (test_0, test_1, test_2, ...)" in text
    assert "  1 x root reads any file" in text and "tests/test_auth.py: 1 (test_load_key_unreadable)" in text
    assert lines[-1].strip() == "apt-get install -y --no-install-recommends qemu-system-x86"  # only what is missing
    everything = skip_summary(skips, CI_RUN, lambda tool: f"/usr/bin/{tool}")
    assert "installed now" in everything[-1]
    assert "apt-get" not in "\n".join(skip_summary(skips[-1:], CI_RUN, lambda tool: None))  # nothing QEMU skipped
    assert skip_summary([], CI_RUN, lambda tool: None) == []


def test_a_run_without_qemu_ends_with_the_skips_and_the_command(tmp_path: Path) -> None:
    """The QEMU test modules, with a PATH that has everything of this machine's but QEMU and the compiler."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith(("qemu", "gcc")) or name == "ld" or name.startswith("ld."):
                continue
            link = bin_dir / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(os.path.join(d, name))
    r = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_qemu.py",
                        "tests/test_qemu_guardian.py", "tests/test_qemu_readme.py"],
                       env=dict(ENV, PATH=str(bin_dir)), cwd=ROOT, capture_output=True, timeout=300)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, out + r.stderr.decode(errors="replace")
    summary = out[out.index("skipped tests"):]
    assert "tests/test_qemu.py" in summary and "tests/test_qemu_guardian.py" in summary, summary
    assert "apt-get install -y --no-install-recommends qemu-system-x86 gcc binutils" in summary, summary

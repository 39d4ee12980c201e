"""The README's "Migrate a QEMU VM" walk-through runs as written.

The shell block is run with its paths and port made unique, the installs
(apt-get, make venv) dropped and precopy-* run from this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from precopy.qemuguest.vm import children, serial_ticks

from .conftest import ENV, SH_PY, ROOT

pytestmark = pytest.mark.integration


def _block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Migrate a QEMU VM"):]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README has no sh block under 'Migrate a QEMU VM'"
    return match.group(1)


def test_readme_qemu_walkthrough(tmp_path: Path, shm: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("gcc") is None:
        pytest.skip("qemu-system-x86_64 or gcc is not installed (.ci/run installs them)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = []
    for line in _block().splitlines():
        if line.startswith(("apt-get ", "make venv")):
            continue
        # paths first: the interpreter's own path may contain /tmp/ (a checkout there)
        for a, b in [("7070", str(port)), ("/tmp/", f"{tmp_path}/"), ("/dev/shm/vm.ram", f"{shm}/vm.ram"),
                     ("/dev/shm/precopy-in", f"{shm}/in")]:
            line = line.replace(a, b)
        line = re.sub(r"^precopy-dest ", f"{SH_PY} -m precopy_agents.dest_main ", line)
        line = re.sub(r"^precopy-source ", f"{SH_PY} -m precopy_agents.source_main ", line)
        line = re.sub(r"^python -m ", f"{SH_PY} -m ", line)
        lines.append(line)
        if line.rstrip().endswith("&"):  # a background process: note its PID to stop it
            lines.append(f"echo $! >> {tmp_path}/pids")
    log, pid_file = tmp_path / "walkthrough.log", tmp_path / "pids"
    try:
        with open(log, "wb") as f:  # not a pipe: the background processes outlive the script
            r = subprocess.run(["bash", "-c", "set -e\n" + "\n".join(lines)], env=ENV, cwd=tmp_path,
                               stdout=f, stderr=subprocess.STDOUT, timeout=180)
        out = log.read_text(errors="replace")
        assert r.returncode == 0, out
        assert "committed" in out and "downtime split (ms)" in out
        assert len(pid_file.read_text().split()) == 2 and (tmp_path / "report.json").exists()
        # the resumed guest prints its next progress line within a tick; a loaded machine may take a while
        deadline = time.monotonic() + 30
        while not (ticks := serial_ticks(tmp_path / "vm-dst.serial")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ticks, "the destination VM printed no progress line within 30 s of the commit\n" + out
        assert all(t.bad == 0 for t in ticks), out
    finally:
        for pid in map(int, pid_file.read_text().split() if pid_file.exists() else []):
            for child in children(pid):  # the destination VM precopy-dest started
                os.kill(child, signal.SIGKILL)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it had exited

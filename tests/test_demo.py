"""``make demo`` (precopy_agents.demo) end to end, from an interpreter whose path holds a space.

A checkout may live anywhere (``~/My Projects/precopy``): every shell command line the project builds
(the demo's on-resume hook here) must quote the interpreter and its paths.  The interpreter is reached
through a directory named with a space that links to this one's prefix (a venv: its ``pyvenv.cfg``
is found there, so its packages are too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ENV, ROOT

pytestmark = pytest.mark.integration


def test_the_demo_migrates_from_a_path_with_a_space(tmp_path: Path) -> None:
    prefix = Path(sys.prefix)
    exe = Path(sys.executable)
    assert exe.is_relative_to(prefix), (exe, prefix)  # (a venv's bin/python, or an installed python's)
    spaced = tmp_path / "my projects" / "py env"
    spaced.parent.mkdir()
    spaced.symlink_to(prefix, target_is_directory=True)
    py = spaced / exe.relative_to(prefix)
    r = subprocess.run([str(py), "-m", "precopy_agents.demo", "--size", "32M", "--rate", "2000"], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "identical" in r.stdout and "guest resumed on the destination" in r.stdout, r.stdout[-3000:]

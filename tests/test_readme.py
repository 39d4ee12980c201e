"""The README's Python API example runs as written."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from .conftest import ROOT, Procs, create_region, guest, proc_state


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python example under 'Python API'"
    return match.group(1)


def test_readme_python_api_example_runs(procs: Procs, shm: Path) -> None:
    region = shm / "guest.mem"
    create_region(region, "8M")
    g = procs.start(*guest("dirty", "--memory", str(region), "--rate", "500"))
    namespace: dict[str, object] = {}
    exec(compile(_example(), "README.md", "exec"), namespace)
    report = asyncio.run(namespace["main"](str(region), g.pid, str(shm / "in")))  # type: ignore[operator]
    assert report.outcome == "committed"
    assert proc_state(g.pid) == "T"
    assert (shm / "in" / "guest.mem").read_bytes() == region.read_bytes()

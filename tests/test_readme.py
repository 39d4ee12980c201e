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


# -- "Run on two machines", executed as written ---------------------------------

import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from precopy.netns import TwoHosts, unavailable_reason  # noqa: E402

from .conftest import ENV, PY  # noqa: E402


def walkthrough() -> str:
    """The sh blocks of the walk-through (up to its first subsection), in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Run on two machines")
    section = text[start:text.index("\n### ", start)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 6, "the walk-through lost steps"
    return "\n".join(blocks)


def test_walkthrough_runs_on_two_namespaces(tmp_path: Path, shm: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the walk-through uses network namespaces: {reason}")
    # The same commands with this test's own paths and namespace name.
    script = walkthrough()
    for old, new in (("/etc/precopy", f"{tmp_path}/etc"), ("/run/precopy", f"{tmp_path}/run"),
                     ("/var/lib/precopy", f"{tmp_path}/var"), ("/dev/shm/precopy", f"{shm}/dest"),
                     ("/dev/shm/guest", f"{shm}/guest")):
        script = script.replace(old, new)
    script = re.sub(r"\bdemo\b", "ops-rd", script)
    bindir = Path(PY).parent
    env = dict(ENV, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "walkthrough.log"
    # Output to a file, not a pipe: daemons started in the background keep
    # their stdout open, and a failed step must not leave the test waiting.
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", "-euxc", "set -o pipefail\n" + script], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)  # anything the walk-through left behind, by our group id
        except ProcessLookupError:
            pass
        TwoHosts("ops-rd").down()
    out = log.read_text()
    assert proc.returncode == 0, out
    assert '"state": "preflight-ok"' in out, out
    assert '"state": "committed"' in out, out
    assert 'precopy_dest_migrations_total{outcome="committed"} 1' in out, out
    assert '"outcome": "committed"' in out  # the grep of the report
    report = json.loads((tmp_path / "var" / "reports" / "first-move.json").read_text())
    assert report["outcome"] == "committed" and report["verify_repairs"] == 0
    assert report["region_bytes"] == 256 << 20 and report["destination"].endswith(":7070")
    assert (tmp_path / "run" / "guest.pid").read_text().strip().isdigit()  # on-resume started the guest
    assert "configuration OK" in out
    assert not subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("ops-rd-")


@pytest.mark.parametrize("unit, config, module", [
    ("precopy-dest.service", "dest.toml", ["-m", "agents.dest_main"]),
    ("precopy-source.service", "source.toml", ["-m", "agents.source_main", "serve"]),
])
def test_service_files_and_example_configs_check(tmp_path: Path, unit: str, config: str, module: list[str]) -> None:
    """Each unit's ExecStart passes --check-config with the example config (paths moved under tmp)."""
    text = (ROOT / "contrib" / "systemd" / unit).read_text()
    execs = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(("ExecStart=", "ExecStartPre="))]
    assert len(execs) == 2 and "KillMode=process" in text
    conf = (ROOT / "contrib" / "config" / config).read_text()
    conf = conf.replace("/etc/precopy", str(tmp_path)).replace("/var/lib/precopy", str(tmp_path / "var"))
    conf = conf.replace("/run/precopy", str(tmp_path / "run")).replace("/dev/shm/precopy", str(tmp_path / "mem"))
    (tmp_path / config).write_text(conf)
    (tmp_path / "key").write_text("a2V5LWZvci10aGUtc2VydmljZS1maWxlLXRlc3QhIQ==\n")
    (tmp_path / "key").chmod(0o600)
    for line in execs:
        argv = shlex.split(line.replace("/etc/precopy", str(tmp_path)))
        assert argv[0].startswith("/usr/local/bin/precopy-")
        args = [a for a in argv[1:] if a != "serve"]
        r = subprocess.run([PY, *module, *args, *([] if "--check-config" in args else ["--check-config"])],
                           env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (line, r.stderr)


def test_readme_python_api_example_type_checks(tmp_path: Path) -> None:
    """The public API is typed (py.typed): mypy --strict accepts the README example."""
    mypy = Path(PY).parent / "mypy"
    if not mypy.exists():
        pytest.skip("mypy is not installed in this venv (make lint installs it)")
    assert (ROOT / "precopy" / "py.typed").exists()
    example = tmp_path / "example.py"
    example.write_text(_example())
    r = subprocess.run([str(mypy), "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                        str(example)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr

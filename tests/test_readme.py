"""The README's Python API example runs as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .conftest import ENV, PY, ROOT, Procs, create_region, guest, proc_state


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python example under 'Python API'"
    return match.group(1)


def test_readme_python_api_example_runs(procs: Procs, shm: Path, tmp_path: Path) -> None:
    """As a script, as its own entry point says; quiet on stderr (no warning on loopback)."""
    region = shm / "guest.mem"
    create_region(region, "8M")
    g = procs.start(*guest("dirty", "--memory", str(region), "--rate", "500"))
    example = tmp_path / "example.py"
    example.write_text(_example())
    r = subprocess.run([PY, str(example), str(region), str(g.pid), str(shm / "in")], env=ENV, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("committed, downtime ") and r.stderr == "", r.stdout + r.stderr
    assert proc_state(g.pid) == "T"
    assert (shm / "in" / "guest.mem").read_bytes() == region.read_bytes()


# -- "Run on two machines", executed as written ---------------------------------

import os  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from precopy.lab.netns import TwoHosts, unavailable_reason  # noqa: E402



def walkthrough() -> str:
    """The sh blocks of the walk-through (up to its first subsection), in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Run on two machines")
    section = text[start:text.index("\n### ", start)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 9, "the walk-through lost steps"
    return "\n".join(blocks)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_walkthrough_there_and_back_on_two_namespaces(tmp_path: Path, shm: Path) -> None:
    """The README's maintenance cycle, pasted as written: there, release, back, clean up."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the walk-through uses network namespaces: {reason}")
    name = f"walk{os.getpid() % 1_000_000}"  # concurrent runs must not share namespaces
    # The same commands with this test's own paths and namespace name.
    script = walkthrough()
    for old, new in (("/etc/precopy", f"{tmp_path}/etc"), ("/run/precopy", f"{tmp_path}/run"),
                     ("/var/lib/precopy", f"{tmp_path}/var"), ("/dev/shm", str(shm))):
        script = script.replace(old, new)
    script = re.sub(r"\bdemo\b", name, script)
    bindir = Path(PY).parent
    env = dict(ENV, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "walkthrough.log"
    # Output to a file, not a pipe: daemons started in the background keep
    # their stdout open, and a failed step must not leave the test waiting.
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", "-euxc", "set -o pipefail\n" + script], env=env, cwd=tmp_path,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=300)
        # What the walk-through started (daemons, guests by their hooks) is in
        # its process group; its own clean-up must have ended all of it.
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left_running = _group_alive(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGKILL)  # anything the walk-through left behind, by our group id
        except ProcessLookupError:
            pass
        TwoHosts(name).down()
    out = log.read_text()
    assert proc.returncode == 0, out
    assert not left_running, "the clean-up step left processes running:\n" + out
    # There: the preflight, the migration's summary, the table, the report's top-level keys, the metrics.
    assert re.search(r"^preflight \w+: OK, \S+:7070 accepts 256\.0 MiB", out, re.M), out
    assert "migration first-move: committed" in out and "\n  downtime    " in out, out
    assert "configuration OK" in out and "==SUPPRESS==" not in out, out
    assert re.search(r"^first-move +committed +\d{4}-\d\d-\d\d [\d:]+ +\S+/guest +\S+:7070 +downtime ", out, re.M), out
    grepped = [line for line in out.splitlines() if line.startswith(' "')]
    assert [line.split('"')[1] for line in grepped] == \
        ["outcome", "downtime_budget_ms", "downtime_ms", "expected_downtime_ms", "bytes_on_wire",
         "verify_repairs"], out
    assert ' "outcome": "committed",' in grepped
    assert 'precopy_dest_migrations_total{outcome="committed"} 1' in out, out
    assert not re.search(r'^\{"ok"', out, re.M), "JSON where a person reads:\n" + out
    # The stopped copy, said by the summary and seen by ps before it is released.
    m = re.search(r"source copy left stopped \(pid (\d+) .*release it: kill -KILL (\d+)", out)
    assert m and m.group(1) == m.group(2), out
    stopped = int(m.group(1))
    ps = dict(re.findall(r"^\+ (?:ip netns exec \S+ )?ps -o pid=,stat=,args= -p (\d+)\n\s*\d+ (\S+)", out, re.M))
    assert len(ps) == 3, out
    assert ps[str(stopped)].startswith("T"), out
    assert all(not state.startswith(("T", "Z")) for pid, state in ps.items() if pid != str(stopped)), out
    # Back: into the old host's region, which still held most of it; the away copy ended at the commit.
    assert "migration back-home: committed" in out, out
    held = re.search(r"received it into its existing copy, which already held (\d+) pages", out)
    assert held and int(held.group(1)) > 0, out
    assert "source copy ended at the commit (--on-commit kill)" in out, out
    # Nothing left behind: processes, files, namespaces.
    assert not [pid for pid in map(int, ps) if _alive(pid)], out
    for path in (tmp_path / "etc", tmp_path / "run", tmp_path / "var"):
        assert not path.exists(), f"{path} is left behind"
    assert list(shm.iterdir()) == [], f"left in the memory directory: {list(shm.iterdir())}"
    assert name + "-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_readme_quotes_the_messages_the_programs_print(tmp_path: Path) -> None:
    """A message the README quotes is the one the program prints."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"for `idle-timeout = \"two minutes\"`:\n  `(precopy-dest: error: config (\S+): [^`]+)`", text)
    assert m, "README lost its config-error example"
    quoted, path = m.group(1), m.group(2)
    conf = tmp_path / "dest.toml"
    conf.write_text('idle-timeout = "two minutes"\n')
    r = subprocess.run([PY, "-m", "precopy_agents.dest_main", "--config", str(conf), "--check-config"], env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == quoted.replace(path, str(conf)) + "\n", r.stderr
    # A region whose size is not a multiple of 4 KiB: a usage error, one line, nothing started.
    odd = tmp_path / "odd.mem"
    odd.write_bytes(b"\0" * 5000)
    r = subprocess.run([PY, "-m", "precopy_agents.source_main", "--to", "127.0.0.1:9", "--memory", str(odd), "--pid", "1"],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.count("\n") == 1 and "is 5000 bytes: it must be a non-empty multiple of 4096" in r.stderr
    # A bad value: one line; an unknown flag: the usage block too.
    r = subprocess.run([PY, "-m", "precopy_agents.dest_main", "--listen", "nowhere", "--memory-dir", str(tmp_path)],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not HOST:PORT" in r.stderr, r.stderr
    r = subprocess.run([PY, "-m", "precopy_agents.dest_main", "--listen", "127.0.0.1:0", "--memory-dir", str(tmp_path),
                        "--no-such-flag"], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("usage: precopy-dest") and "--no-such-flag" in r.stderr


@pytest.mark.parametrize("unit, config, module", [
    ("precopy-dest.service", "dest.toml", ["-m", "precopy_agents.dest_main"]),
    ("precopy-source.service", "source.toml", ["-m", "precopy_agents.source_main", "serve"]),
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

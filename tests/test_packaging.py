"""What a user who installs precopy gets (issue 27).

The wheel installs ``precopy`` and ``precopy_agents`` (the repository's
``agents/``), nothing with a generic top-level name; every command answers
``--version``; the operator files ship in the package and ``precopy-install``
puts them in place.  (.ci/wheel-check installs the wheel into a fresh venv
and runs the commands, a migration and the QEMU guest build from it.)
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import precopy
from precopy_agents import ctl, dest_main, files, ocf, source_daemon, source_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (nothing written into the checkout)."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (pip install build; it is in the test extra)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("precopy", "agents", "contrib"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (found,) = (tmp / "dist").glob("precopy-*.whl")
    return found


def test_the_wheel_installs_only_precopy_names(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = sorted({n.split("/")[0] for n in names})
    assert top == ["precopy", f"precopy-{precopy.__version__}.dist-info", "precopy_agents"]
    # the daemons, the operator files and the QEMU guest's sources are in it
    for path in ("precopy_agents/source_main.py", "precopy_agents/ocf/__main__.py",
                 "precopy_agents/contrib/systemd/precopy-dest.service",
                 "precopy_agents/contrib/config/source.toml",
                 "precopy_agents/contrib/on-resume/move-address.sh",
                 "precopy/qemuguest/guest.c", "precopy/qemuguest/boot.S", "precopy/qemuguest/link.ld",
                 "precopy/py.typed"):
        assert path in names, path
    dist_info = f"precopy-{precopy.__version__}.dist-info"
    scripts = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    for line in ("precopy-source = precopy_agents.source_main:main", "precopy-dest = precopy_agents.dest_main:main",
                 "precopy-guest = precopy.guest:main", "precopy-ocf = precopy_agents.ocf:main",
                 "precopy-install = precopy_agents.files:main"):
        assert line in scripts, scripts


def test_nothing_imports_the_daemons_by_their_folder_name() -> None:
    """Code, tests, scripts and docs say precopy_agents: an 'agents' import would load each module twice."""
    pattern = re.compile(r"(?:-m\s+|\bfrom\s+|\bimport\s+|[\"'])agents\.[a-z]|\bfrom\s+agents\s+import\b")
    offenders = []
    for path in [*ROOT.glob("*.md"), ROOT / "Makefile", *ROOT.glob("docs/*.md"), *ROOT.glob(".ci/*"),
                 *(p for d in ("precopy", "agents", "tests", "benchmarks", "contrib")
                   for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".md", ".service", ".toml"))]:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line) and path.name != "test_packaging.py":
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert "precopy_agents" in sys.modules and "agents" not in sys.modules


@pytest.mark.parametrize("main, argv, prog", [
    (source_main.main, ["--version"], "precopy-source"),
    (source_main.main, ["serve", "--version"], "precopy-source serve"),
    (source_main.main, ["ctl", "--version"], "precopy-source ctl"),
    (dest_main.main, ["--version"], "precopy-dest"),
    (files.main, ["--version"], "precopy-install"),
])
def test_every_command_says_its_version(capsys: pytest.CaptureFixture[str], main: object, argv: list[str],
                                        prog: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)  # type: ignore[operator]
    assert info.value.code == 0
    assert capsys.readouterr().out == f"{prog} {precopy.__version__}\n"
    assert source_daemon.build_parser and ctl.build_parser  # the parsers those mains build


def test_precopy_ocf_and_precopy_guest_say_their_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert ocf.main(["--version"]) == 0
    assert capsys.readouterr().out == f"precopy-ocf {precopy.__version__}\n"
    r = subprocess.run([sys.executable, "-m", "precopy.guest", "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout == f"precopy-guest {precopy.__version__}\n", r.stderr


def test_precopy_install_puts_the_operator_files_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert files.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert str(files.contrib_dir() / "systemd" / "precopy-dest.service") in listed
    root = tmp_path / "root"
    assert files.main(["--root", str(root)]) == 0
    out = capsys.readouterr().out
    unit = root / "etc/systemd/system/precopy-dest.service"
    assert f"wrote    {unit}" in out
    script = root / "usr/local/lib/precopy/move-address.sh"
    assert script.stat().st_mode & 0o777 == 0o755
    assert (root / "etc/precopy/source.toml").read_text() == (files.contrib_dir() / "config/source.toml").read_text()
    # The units run this installation's commands (here: the venv's).
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "precopy-dest").exists():
        assert f"ExecStart={bin_dir}/precopy-dest --config /etc/precopy/dest.toml" in unit.read_text()
    # An operator's edits survive a second run; --force replaces them.
    (root / "etc/precopy/dest.toml").write_text("# mine\n")
    assert files.main(["--root", str(root), "config"]) == 0
    assert "kept     " in capsys.readouterr().out and (root / "etc/precopy/dest.toml").read_text() == "# mine\n"
    assert files.main(["--root", str(root), "--force", "config"]) == 0
    assert (root / "etc/precopy/dest.toml").read_text() != "# mine\n"
    with pytest.raises(SystemExit) as info:
        files.main(["nonsense"])
    assert info.value.code == 2

"""The package layout pyproject.toml cannot say on its own.

The repository keeps the daemons' sources in ``agents/``, but a generic
top-level ``agents`` must not land in site-packages (other distributions
ship one): the wheel installs that folder as ``precopy_agents``.  Everything
else is in pyproject.toml.  The operator files (``contrib/``: systemd units,
example configs, the on-resume script) ship inside it as
``precopy_agents/contrib`` (``precopy-install`` puts them in place).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithContrib(build_py):
    """build_py, plus contrib/ copied into precopy_agents/contrib of the build."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds contrib/ beside agents/ (precopy_agents.files)
        target = Path(self.build_lib) / "precopy_agents" / "contrib"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "contrib", target)


agents = ["precopy_agents" + name[len("agents"):] for name in find_packages(include=["agents", "agents.*"])]
setup(
    packages=find_packages(include=["precopy", "precopy.*"]) + agents,
    package_dir={"precopy_agents": "agents"},
    cmdclass={"build_py": BuildWithContrib},
)

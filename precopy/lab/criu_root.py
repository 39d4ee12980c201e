"""Get a CRIU that works on this kernel from Debian's packages (``make criu``; ``.ci/run`` calls it).

CRIU >= 4.2 is needed (``precopy.workload.criu``).  If the system's
``criu`` is that new, or apt can install one that is, that is used.
Otherwise (Debian 12 has 3.17, Debian 13 4.1) CRIU runs from a private
root: the package and its dependencies are fetched from Debian unstable
with ``apt-get download`` under a private apt configuration (its own
sources list, lists, cache and status: the system's apt state is never
touched), unpacked with ``dpkg-deb -x`` into ``ROOT/root``, and started
through that root's own loader by the wrapper ``ROOT/criu``::

    python -m precopy.lab.criu_root install [--root /var/lib/precopy/criu]   # prints the criu to use
    python -m precopy.lab.criu_root which                                    # the criu in use, or why none

Needs root (for apt) and network access to Debian's archive.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from precopy.errors import GuestControlError
from precopy.workload.criu import DEFAULT_CRIU, MIN_CRIU, CriuTool, find_criu

__all__ = ["install", "private_root", "apt_options", "SUITE"]

#: Where a CRIU >= 4.2 is packaged (testing and stable lag behind it now).
SUITE = "unstable"
_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_MIRROR = "http://deb.debian.org/debian"


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise GuestControlError(f"{what} failed: {' '.join(argv[:2])}...: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


def apt_options(state: Path) -> list[str]:
    """``-o`` options for apt that keep all of its state under ``state``."""
    return [
        "-o", f"Dir::Etc::SourceList={state}/sources.list",
        "-o", f"Dir::Etc::SourceParts={state}/sources.list.d",
        "-o", f"Dir::Etc::Preferences={state}/preferences",
        "-o", f"Dir::Etc::PreferencesParts={state}/preferences.d",
        "-o", f"Dir::State::Lists={state}/lists",
        "-o", f"Dir::State::Status={state}/status",
        "-o", f"Dir::Cache={state}/cache",
        "-o", "Debug::NoLocking=1",
    ]


def _closure(opts: list[str]) -> list[str]:
    """``criu`` and every package it depends on, recursively (real packages only)."""
    out = _run(["apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests",
                "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", "criu"], "apt-cache depends")
    return sorted({line.strip() for line in out.splitlines() if line and not line[0].isspace() and "<" not in line})


def private_root(root: Path, suite: str = SUITE) -> CriuTool:
    """Fetch and unpack CRIU into ``root`` (see the module docstring); returns the wrapper's CRIU."""
    state, debs, tree = root / "apt", root / "debs", root / "root"
    for d in (state / "lists" / "partial", state / "cache" / "archives" / "partial", state / "sources.list.d",
              state / "preferences.d", debs):
        d.mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    (state / "sources.list").write_text(f"deb [signed-by={_KEYRING}] {_MIRROR} {suite} main\n")
    opts = apt_options(state)
    _run(["apt-get", *opts, "update"], f"apt-get update (private, {suite})")
    packages = _closure(opts)
    for old in debs.glob("*.deb"):
        old.unlink()
    subprocess.run(["chown", "_apt", str(debs)], capture_output=True)  # lets apt fetch sandboxed
    _run(["apt-get", *opts, "download", *packages], "apt-get download", cwd=debs)  # into the cwd
    staging = root / "root.new"
    shutil.rmtree(staging, ignore_errors=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(staging)], f"dpkg-deb -x {deb.name}")
    loaders = sorted(glob.glob(str(staging / "usr/lib/*/ld-linux*.so.*")))
    if not loaders:
        raise GuestControlError(f"no dynamic loader in the unpacked packages ({staging})")
    loader = Path(loaders[0])
    libdir = loader.parent
    shutil.rmtree(tree, ignore_errors=True)
    staging.rename(tree)
    loader, libdir = tree / loader.relative_to(staging), tree / libdir.relative_to(staging)
    wrapper = root / "criu"
    tmp = root / ".criu.tmp"
    tmp.write_text("#!/bin/sh\n# CRIU from Debian " + suite + ", run through its own loader "
                   "(precopy.lab.criu_root)\n"
                   f'exec "{loader}" --library-path "{libdir}" "{tree}/usr/sbin/criu" "$@"\n')
    tmp.chmod(0o755)
    tmp.rename(wrapper)
    return CriuTool.probe(str(wrapper))


def _system_candidate() -> tuple[int, ...] | None:
    """The version of ``criu`` that the system's apt would install (None: none)."""
    if shutil.which("apt-cache") is None:
        return None
    proc = subprocess.run(["apt-cache", "policy", "criu"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if "Candidate:" in line:
            text = line.split(":", 1)[1].strip().split(":")[-1]  # drop an epoch
            nums = text.split("-")[0].split(".")
            try:
                return tuple(int(n) for n in nums[:3])
            except ValueError:
                return None
    return None


def install(root: Path = DEFAULT_CRIU.parent, suite: str = SUITE) -> CriuTool:
    """A CRIU >= 4.2: the one found, the system package if new enough, else a private root.

    Raises :class:`GuestControlError` saying what failed.
    """
    try:
        return find_criu()
    except GuestControlError:
        pass  # none yet: get one below
    if os.geteuid() != 0:
        raise GuestControlError("installing CRIU needs root (apt)")
    cand = _system_candidate()
    if cand is not None and cand[:2] >= MIN_CRIU:
        _run(["apt-get", "install", "-y", "--no-install-recommends", "criu"], "apt-get install criu")
        return find_criu()
    return private_root(root, suite)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m precopy.lab.criu_root", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("install", "which"))
    ap.add_argument("--root", type=Path, default=DEFAULT_CRIU.parent,
                    help=f"where the private root goes (default {DEFAULT_CRIU.parent}; find_criu looks there "
                         "only at the default)")
    ap.add_argument("--suite", default=SUITE, help=f"Debian suite to take CRIU from (default {SUITE})")
    args = ap.parse_args(argv)
    try:
        tool = install(args.root, args.suite) if args.action == "install" else find_criu()
    except GuestControlError as exc:
        print(f"precopy.lab.criu_root: {exc}", file=sys.stderr)
        return 1
    print(f"{tool.path} {tool.version_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

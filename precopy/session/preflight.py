"""Preflight: does a region fit this destination?  Checked before any page moves.

The destination runs :func:`check_destination` on every BEGIN (and only it
on a dry-run BEGIN).  Each failed check raises a :class:`PrecopyError` whose
message says exactly what did not fit; the source's workload has not been
paused yet, so it keeps running there.

Guest requirements are declared by the source's workload adapter (an
optional ``requirements()`` method returning ``{name: [values]}``) and
travel in BEGIN's ``requires``.  Known names:

* ``cpu_flags`` — CPU flags (``/proc/cpuinfo``) the guest was started with
  and needs here too: the processor compatibility check of hypervisors.
* ``executables`` — programs the on-resume step needs on the daemon's PATH
  (e.g. ``qemu-system-x86_64``).
* ``criu`` — ``[path, version]`` of the CRIU that dumps the process: the
  destination must restore with the same executable at the same path
  (checked by the adapter, :class:`~precopy.workload.criu_dest.CriuDestination`,
  passed in as ``extra``; a destination without ``--criu`` says so).

An unknown name fails: a destination must not say "fits" to what it cannot
check.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

from precopy.errors import AbortCode, PrecopyError, RegionError
from precopy.protocol import PAGE_SIZE

__all__ = ["check_destination", "cpu_flags", "fs_type", "mem_available", "KNOWN_REQUIREMENTS"]

KNOWN_REQUIREMENTS = ("cpu_flags", "executables")

#: File systems whose files live in RAM: a region there needs available memory too.
_RAM_FS = ("tmpfs", "hugetlbfs", "ramfs")


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` ('' when unknown)."""
    try:
        target = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
        return kind
    except OSError:
        return ""


def mem_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes (None when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_flags() -> frozenset[str]:
    """The flags every CPU of this host has (intersection over /proc/cpuinfo)."""
    common: frozenset[str] | None = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = frozenset(line.partition(":")[2].split())
                    common = flags if common is None else common & flags
    except OSError:
        return frozenset()
    return common or frozenset()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def check_destination(
    *,
    size: int,
    page_size: int,
    memory_dir: Path,
    requires: Mapping[str, Sequence[str]],
    mem_available_fn: Callable[[], int | None] = mem_available,
    cpu_flags_fn: Callable[[], frozenset[str]] = cpu_flags,
    which: Callable[[str], str | None] = shutil.which,
    have: int = 0,
    extra: Mapping[str, Callable[[Sequence[str]], str]] | None = None,
) -> list[str]:
    """Check that a region of ``size`` bytes fits under ``memory_dir``.

    ``have``: bytes of it the destination already holds (an existing region
    file it will receive into), which need no new space or memory.
    ``extra``: checks of further requirement names that the daemon's
    workload adapter makes itself (e.g. ``criu``: the same CRIU, at the same
    path); each returns what passed or raises :class:`PrecopyError` (GUEST).

    Returns the list of checks that passed (for logs and dry-run answers).
    Raises :class:`RegionError` (space, memory, page size) or
    :class:`PrecopyError` with code GUEST (a guest requirement).
    """
    passed: list[str] = []
    if page_size != PAGE_SIZE:
        raise RegionError(f"page size {page_size} is not supported here (only {PAGE_SIZE})")
    passed.append(f"page size {page_size}")
    fstype = fs_type(memory_dir)
    try:
        st = os.statvfs(memory_dir)
    except OSError as exc:
        raise RegionError(f"cannot inspect --memory-dir {memory_dir}: {exc.strerror}") from exc
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    # total 0: the file system reports no size (hugetlbfs without size=);
    # then only the reservation while receiving can tell, cleanly.
    need = max(0, size - have)
    if total and free < need:
        raise RegionError(
            f"preflight: --memory-dir {memory_dir} has {_mib(free)} free, the region needs {_mib(need)}"
        )
    passed.append(f"free space in {memory_dir}: {_mib(free) if total else 'unbounded'} >= {_mib(need)}"
                  + (" (an existing region is reused)" if have else ""))
    if fstype == "hugetlbfs" and st.f_bsize > PAGE_SIZE and size % st.f_bsize:
        raise RegionError(
            f"preflight: --memory-dir {memory_dir} is hugetlbfs with {st.f_bsize >> 10} KiB pages; "
            f"the region size {size} is not a multiple of it"
        )
    if fstype in _RAM_FS:
        avail = mem_available_fn()
        if avail is not None and avail < need:
            raise RegionError(
                f"preflight: --memory-dir {memory_dir} is {fstype} (RAM) and this host has "
                f"{_mib(avail)} of memory available, the region needs {_mib(need)}"
            )
        if avail is not None:
            passed.append(f"available memory {_mib(avail)} >= {_mib(need)}")
    passed += _check_requirements(requires, cpu_flags_fn, which, extra)
    return passed


def _check_requirements(requires: Mapping[str, Sequence[str]], cpu_flags_fn: Callable[[], frozenset[str]],
                        which: Callable[[str], str | None],
                        extra: Mapping[str, Callable[[Sequence[str]], str]] | None) -> list[str]:
    """The guest requirements of a BEGIN (see :func:`check_destination`); returns what passed."""
    passed: list[str] = []
    for name, values in requires.items():
        if name == "cpu_flags":
            flags = cpu_flags_fn()
            missing = [v for v in values if v not in flags]
            if missing:
                raise PrecopyError(
                    "preflight: this host's CPUs lack flag(s) the guest needs: " + ", ".join(missing),
                    AbortCode.GUEST,
                )
            passed.append(f"cpu flags: {len(values)} present")
        elif name == "executables":
            missing = [v for v in values if which(v) is None]
            if missing:
                raise PrecopyError(
                    "preflight: program(s) the guest needs are not on this host's PATH: " + ", ".join(missing),
                    AbortCode.GUEST,
                )
            passed.append(f"executables: {', '.join(values)}")
        elif extra and name in extra:
            passed.append(extra[name](values))
        elif name == "criu":
            raise PrecopyError("preflight: the workload is checkpointed with CRIU and this destination "
                               "restores none: start precopy-dest with --criu (CRIU >= 4.2: 'make criu')",
                               AbortCode.GUEST)
        else:
            raise PrecopyError(
                f"preflight: guest requirement {name!r} is unknown to this destination "
                f"(known: {', '.join(KNOWN_REQUIREMENTS + tuple(extra or ()))}); upgrade precopy-dest",
                AbortCode.GUEST,
            )
    return passed

"""What ``make test`` skipped, and the one command that enables it (tests/conftest.py's summary hook).

Pure: it takes the skip reports' (test id, reason) pairs, the text of
``.ci/run`` and a ``which``; it returns the lines to print.  The packages
named come from ``.ci/run``'s own install lines (``command -v TOOL ... ||
need+=(PACKAGE)``), so the advice stays what CI does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["FAMILIES", "ci_packages", "skip_summary"]

#: Test families whose tools .ci/run installs: (the test files' prefix, words
#: of their skip reasons, the tools).  A skipped test of a family is enabled by
#: installing the family's missing tools' packages.
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "QEMU": ("tests/test_qemu", ("qemu", "gcc"), ("qemu-system-x86_64", "gcc", "ld")),
    "cluster": ("tests/test_cluster", ("corosync", "pacemaker", "crmsh", "cluster"),
                ("corosync", "pacemakerd", "crm_resource", "crm")),
}
_NEED = re.compile(r"command -v (\S+) >/dev/null \|\| need\+=\((\S+)\)")


def ci_packages(ci_run: str) -> list[tuple[str, str]]:
    """(tool, Debian package) pairs ``.ci/run`` installs when the tool is missing."""
    return _NEED.findall(ci_run)


def _short(nodeid: str) -> tuple[str, str]:
    path, _, name = nodeid.partition("::")
    return path, name or path


def skip_summary(skips: Iterable[tuple[str, str]], ci_run: str,
                 which: Callable[[str], str | None]) -> list[str]:
    """Lines saying which tests were skipped (grouped by reason) and how to run them.

    ``skips``: (test id, skip reason).  Empty when nothing was skipped.
    """
    by_reason: dict[str, list[str]] = {}
    for nodeid, reason in skips:
        by_reason.setdefault(reason.removeprefix("Skipped: ").strip(), []).append(nodeid)
    if not by_reason:
        return []
    total = sum(len(v) for v in by_reason.values())
    lines = [f"{total} test{'s' * (total != 1)} skipped:"]
    families: list[str] = []
    for reason, ids in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        files: dict[str, list[str]] = {}
        for nodeid in ids:
            path, name = _short(nodeid)
            files.setdefault(path, []).append(name)
        lines.append(f"  {len(ids)} x {reason}")
        for path, names in files.items():
            more = ", ..." if len(names) > 3 else ""
            lines.append(f"      {path}: {len(names)} ({', '.join(names[:3])}{more})")
            for family, (prefix, words, _) in FAMILIES.items():
                if family not in families and (path.startswith(prefix) or any(w in reason.lower() for w in words)):
                    families.append(family)
    if families:
        tools = {t for f in families for t in FAMILIES[f][2]}
        missing = [pkg for tool, pkg in ci_packages(ci_run) if tool in tools and which(tool) is None]
        which_tests = " and ".join(families)
        if missing:
            lines.append(f"To run the {which_tests} tests, install what .ci/run installs (as root), "
                         "then make test again:")
            lines.append(f"    apt-get install -y --no-install-recommends {' '.join(dict.fromkeys(missing))}")
        else:
            lines.append(f"The {which_tests} tests' tools are installed now (.ci/run's list): "
                         "make test again runs them, or they skip for the reason above.")
    return lines

"""What ``make test`` skipped, and the one command that enables it (tests/conftest.py's summary hook).

Pure: it takes the skip reports' (test id, reason) pairs, the text of
``.ci/run`` and a ``which``; it returns the lines to print.  The packages
named come from ``.ci/run``'s own install lines (``command -v TOOL ... ||
need+=(PACKAGE)``), so the advice stays what CI does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["ci_packages", "skip_summary"]

#: A skip reason naming one of these tools is one ``.ci/run`` installs.
_CI_TOOLS = ("qemu", "gcc")
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
    needs_ci = False
    for reason, ids in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        files: dict[str, list[str]] = {}
        for nodeid in ids:
            path, name = _short(nodeid)
            files.setdefault(path, []).append(name)
        lines.append(f"  {len(ids)} x {reason}")
        for path, names in files.items():
            more = ", ..." if len(names) > 3 else ""
            lines.append(f"      {path}: {len(names)} ({', '.join(names[:3])}{more})")
        needs_ci = needs_ci or any(tool in reason.lower() for tool in _CI_TOOLS)
    if needs_ci:
        missing = [pkg for tool, pkg in ci_packages(ci_run) if which(tool) is None]
        if missing:
            lines.append("To run the QEMU tests, install what .ci/run installs (as root), then make test again:")
            lines.append(f"    apt-get install -y --no-install-recommends {' '.join(missing)}")
        else:
            lines.append("The QEMU tools are installed now (.ci/run's list): make test again runs those tests.")
    return lines

"""The report builder: how a source session fills in its :class:`MigrationReport`.

The report's fields are a contract (DESIGN "contracts", README); the
session's phases tell this module what happened and it writes the fields.
No I/O: tests build reports from made-up measurements.
"""

from __future__ import annotations

import logging

from precopy.errors import AbortCode, MigrationInDoubt
from precopy.policy.downtime import DowntimeCap, Margin
from precopy.session.commit import describe
from precopy.session.options import SourceOptions
from precopy.session.report import MigrationReport

__all__ = ["new_report", "record_margin", "record_commit", "record_aborted", "in_doubt"]

_log = logging.getLogger(__name__)


def new_report(opts: SourceOptions, workload: str) -> MigrationReport:
    """The report of a migration about to start (outcome "running")."""
    return MigrationReport(
        migration_id=str(opts.migration_id), memory=str(opts.memory),
        destination=f"{opts.host}:{opts.port}", workload=workload,
        downtime_budget_ms=opts.downtime_ms, compression=opts.compress, mode=opts.mode,
        max_downtime_ms=opts.max_downtime_ms, on_commit=opts.on_commit,
    )


def record_margin(report: MigrationReport, split_ms: dict[str, float], margin: Margin) -> None:
    """The expected pause's parts and the margin the switchover was decided with."""
    report.expected_phases_ms = split_ms
    report.switchover_margin_ms = margin.margin_s * 1e3
    report.margin_parts_ms = {k: v * 1e3 for k, v in margin.parts_s.items()}
    report.margin_basis = margin.basis


def record_commit(report: MigrationReport, *, paused_s: float, phases_ms: dict[str, float],
                  expected_s: float | None, budget_ms: float, bandwidth_bps: float,
                  cap: DowntimeCap | None) -> None:
    """A committed switchover: the pause (``paused_s``, from pausing to the confirmed commit), its
    steps, what was expected of it (None: nothing decided it, as in stop-and-copy) and the link."""
    report.downtime_ms = report.paused_ms = paused_s * 1e3
    if cap is not None and cap.passed():
        # Too late to roll back: the destination may own the workload (DESIGN invariant 3).
        report.cap_hit = "after_commit"
        _log.warning("the pause passed --max-downtime-ms %g after COMMIT was sent (%.1f ms): "
                     "the commit stands", cap.cap_s * 1e3, report.downtime_ms)
    report.expected_downtime_ms = expected_s * 1e3 if expected_s is not None else None
    report.downtime_overshoot_ms = max(0.0, report.downtime_ms - budget_ms)
    report.bandwidth_bps = bandwidth_bps
    report.phases_ms = phases_ms


def record_aborted(report: MigrationReport, exc: BaseException) -> str:
    """Rolled back (or about to be): outcome "aborted", and why (returned too)."""
    report.outcome = "aborted"
    report.error = describe(exc)
    return report.error


def in_doubt(report: MigrationReport, exc: BaseException, migration_id: str) -> MigrationInDoubt:
    """Interrupted after COMMIT was sent without learning the outcome: the report says so, and
    the error to raise (it carries the report)."""
    report.outcome = "in-doubt"
    report.error = (f"interrupted after COMMIT was sent ({describe(exc)}); "
                    "the workload is left PAUSED on the source: check the destination "
                    f"({report.destination}) for migration {migration_id}")
    return MigrationInDoubt(report.error, AbortCode.LINK)

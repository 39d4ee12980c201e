"""The summary of a migration report that precopy-source and ``precopy-source ctl`` print."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import human_bytes

if TYPE_CHECKING:
    from precopy.session.report import MigrationReport

__all__ = ["summary"]


def summary(rep: MigrationReport) -> str:
    if rep.outcome == "preflight-ok":
        return (f"preflight {rep.migration_id}: OK, {rep.destination} accepts {human_bytes(rep.region_bytes)} "
                f"({rep.memory}); nothing was paused or sent")
    if not rep.rounds and rep.downtime_ms is None and rep.paused_ms is None and not rep.bytes_on_wire:
        # It ended before any page moved (refused, unreachable, cancelled while queued).
        lines = [f"migration {rep.migration_id}: {rep.outcome}, before any page moved"]
        if rep.region_bytes:
            lines.append(f"  region      {human_bytes(rep.region_bytes)} ({rep.memory})")
        if rep.error:
            lines.append(f"  error       {rep.error}")
        return "\n".join(lines)
    secs = rep.total_time_s or 1e-9
    lines = [
        f"migration {rep.migration_id}: {rep.outcome}",
        f"  region      {human_bytes(rep.region_bytes)} ({rep.memory})"
        + ("; the destination received it into its existing copy"
           + (f", which already held {rep.pages_already_there} pages" if rep.pages_already_there else "")
           if rep.dest_region == "existing" else ""),
        f"  total time  {rep.total_time_s:.3f} s in {len(rep.rounds)} rounds",
        f"  on the wire {human_bytes(rep.bytes_on_wire)} ({rep.bytes_on_wire / secs / 1e6:.0f} MB/s average),"
        f" {rep.pages_sent} pages sent, {rep.zero_pages} zero pages",
    ]
    if rep.streams > 1:
        lines.append(f"  streams     {rep.streams}, carrying " + ", ".join(human_bytes(b) for b in rep.stream_bytes)
                     + ("; each extra one sent from a thread of its own" if rep.stream_threads else ""))
    if rep.downtime_ms is not None:
        expected = ("" if rep.expected_downtime_ms is None
                    else f"expected {rep.expected_downtime_ms:.1f} ms, ")
        cap = "" if rep.max_downtime_ms is None else f", cap {rep.max_downtime_ms:g} ms"
        lines.append(f"  downtime    {rep.downtime_ms:.1f} ms ({expected}budget {rep.downtime_budget_ms:.0f} ms{cap}"
                     f"{', stop-and-copy' if rep.mode == 'stop-and-copy' else ''})")
    elif rep.paused_ms is not None:
        lines.append(f"  paused      {rep.paused_ms:.1f} ms on the source, then resumed there"
                     + (f" (cap {rep.max_downtime_ms:g} ms hit before {rep.cap_hit.replace('_', ' ')})"
                        if rep.cap_hit else ""))
    lines.append(f"  tracking    {rep.tracking} ({rep.tracking_reason})")
    if rep.max_throttle_pct:
        # (A round cut short by a failure is not in the report: maybe none is.)
        throttled = [r.round for r in rep.rounds if r.throttle_pct]
        where = f", in {len(throttled)} rounds ({throttled[0]}-{throttled[-1]})" if throttled else ""
        how = {"sigstop": ", SIGSTOP/SIGCONT duty cycle", "guest-op": ", the guest's throttle op"}.get(
            str(rep.throttle_method), "")
        lines.append(f"  throttle    up to {rep.max_throttle_pct} % of the workload's time stopped{where}{how}")
    lines.append(f"  verify      {rep.verify_repairs} pages repaired; device state {rep.device_state_bytes} bytes")
    if rep.phases_ms:
        lines.append("  downtime split (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in rep.phases_ms.items()))
    if rep.expected_phases_ms:
        lines.append("  expected split (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in rep.expected_phases_ms.items()))
    if rep.outcome == "committed":
        lines.append("  source copy " + _source_copy(rep))
    if rep.error:
        lines.append(f"  error       {rep.error}")
    return "\n".join(lines)


def _source_copy(rep: MigrationReport) -> str:
    """What became of the workload on the source after a commit, and what to do about it."""
    if rep.on_commit == "kill":
        return f"ended at the commit (--on-commit kill): {rep.workload}"
    if rep.workload.startswith("pid "):
        release = f"kill -KILL {rep.workload.split()[1]}"
    elif rep.workload.startswith("QEMU"):
        release = "QMP quit, or kill the source QEMU"
    else:
        release = 'the guest\'s "stop" op, or kill its process'
    return (f"left stopped ({rep.workload}; --on-commit keep-stopped): precopy never resumes it; "
            f"once the destination's copy is confirmed, release it: {release}")

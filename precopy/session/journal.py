"""The destination's commit journal: one durable record per migration, and the commit itself.

``<state-dir>/.precopy/journal/<id>.json`` holds each migration's
:class:`MigrationRecord` ("running", then "committed" or "aborted"), written
with fsync and rename.  :meth:`Journal.commit` makes a received region the
committed one, write-ahead: the device state, then the record naming both
files, then the region's rename to its final name.  :meth:`Journal.recover`
finishes, at a daemon's start, what a daemon stopped in between left: a
committed region still under its partial name is renamed, a migration still
"running" is recorded aborted, partial files are removed.  The outcome
queries of a source that lost the link are answered from here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precopy.errors import RegionError

__all__ = ["DEVICE_STATE_SUFFIX", "KEEP_DAYS", "Journal", "MigrationRecord"]

_log = logging.getLogger(__name__)

#: ``<state-dir>/<name>.device-state`` holds a committed region's device state.
DEVICE_STATE_SUFFIX = ".device-state"
#: A finished migration's record is kept at least this long (an in-doubt end is
#: settled from it: "no record" must mean "never committed" -- docs/FAILURES.md).
KEEP_DAYS = 7


@dataclass
class MigrationRecord:
    """One migration as this destination saw it: its journal entry and its entry in
    ``DestinationServer.results``."""

    migration_id: str
    name: str
    size: int
    peer: str
    outcome: str = "running"
    error: str | None = None
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    bytes_received: int = 0
    device_state_bytes: int = 0
    memory: str | None = None
    partial: str | None = None
    hook_exit: int | None = None
    #: Iterative digest requests answered (the source's rounds).
    rounds: int = 0
    #: From SWITCHOVER (the source paused) to the resume here, as seen here.
    downtime_ms: float | None = None
    #: Received into the region file already under its name (not a new one).
    reused_region: bool = False
    #: Pages received straight into the region (no second copy; existing regions).
    pages_in_place: int = 0
    #: Waiting in the queue for a slot (--max-active) before READY.
    queued_s: float = 0.0
    #: Post-copy (None: a pre-copy migration): "running" (pages still on the
    #: source), "complete" (every page placed), "broken" (given up: see docs/FAILURES.md).
    postcopy: str | None = None
    #: Post-copy: the control socket the resumed guest listens on (the on-resume
    #: hook's PRECOPY_POSTCOPY_CONTROL).
    postcopy_control: str | None = None


class Journal:
    """Durable per-migration records: ``<state-dir>/.precopy/journal/<id>.json``."""

    def __init__(self, root: Path) -> None:
        self.dir = root / ".precopy" / "journal"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegionError(f"cannot create the journal directory {self.dir}: {exc.strerror}") from exc
        # Fail at start, not at the first commit, where files cannot be
        # written (hugetlbfs holds mappable files only).
        self.write({"migration_id": ".probe", "outcome": "probe"})
        (self.dir / ".probe.json").unlink()

    def write(self, rec: MigrationRecord | dict[str, Any]) -> None:
        """Replace the record durably (write, fsync, rename, fsync the directory).

        Raises :class:`RegionError` when the record cannot be written.
        """
        fields = rec if isinstance(rec, dict) else rec.__dict__
        path = self.dir / f"{fields['migration_id']}.json"
        tmp = path.with_suffix(".tmp")
        data = json.dumps(fields).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise RegionError(
                f"cannot write the journal in {self.dir}: {exc.strerror} (a hugetlbfs --memory-dir "
                "needs a --state-dir on an ordinary file system)"
            ) from exc

    def entries(self) -> list[dict[str, Any]]:
        """Every readable record (unreadable ones are logged and skipped)."""
        out = []
        for path in sorted(self.dir.glob("*.json")):
            rec = self.read(path.stem)
            if rec is not None:
                out.append(rec)
        return out

    def prune(self, keep: int, min_age_s: float = KEEP_DAYS * 86400.0) -> int:
        """Remove the records of finished migrations beyond the newest ``keep`` and older than
        ``min_age_s``; returns how many.

        A record still "running", or committed with its region still under
        the partial name (:meth:`recover` has work to do), is never removed.
        Outcome queries and in-doubt ends are answered from records at least
        ``min_age_s`` old (docs/FAILURES.md).
        """
        cutoff = time.time() - min_age_s
        try:
            paths = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        except FileNotFoundError:  # a record replaced while listing: next time
            return 0
        removed = 0
        for path in paths[keep:]:
            try:
                if path.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            rec = self.read(path.stem)
            if rec is None or rec.get("outcome") == "running":
                continue
            if rec.get("outcome") == "committed" and rec.get("partial") and Path(str(rec["partial"])).exists():
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                _log.error("journal: cannot remove the old record %s: %s", path, exc.strerror)
                return removed
            removed += 1
        if removed:
            _log.info("journal: removed the records of %d migrations beyond the newest %d and older than "
                      "%.0f s", removed, keep, min_age_s)
        return removed

    def read(self, migration_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / f"{migration_id}.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            _log.error("journal entry for %s is unreadable: %s", migration_id, exc)
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def staged_path(device_state_path: Path) -> Path:
        """Where :meth:`stage` writes the device state before :meth:`commit` gives it its name."""
        return device_state_path.with_name(f".{device_state_path.name}.tmp")

    @staticmethod
    def stage(device: bytes | bytearray, device_state_path: Path) -> None:
        """Write the device state ahead of the commit (step 2 of it, off the pause's path).

        :meth:`commit` with ``staged=True`` then only renames it.  Raises OSError.
        """
        with open(Journal.staged_path(device_state_path), "wb") as f:
            f.write(device)

    def commit(self, rec: MigrationRecord, device: bytes | bytearray, device_state_path: Path,
               partial: Path, final: Path, *, staged: bool = False) -> None:
        """Commit a received region, write-ahead: steps 2-4 of the destination's commit.

        Writes the device state to ``device_state_path`` (or names the one
        :meth:`stage` wrote: ``staged``), then the commit
        record (naming both files) durably, then renames ``partial`` to
        ``final``; ``rec`` then says committed.  The record is durable
        before the region takes its final name, and both before the workload
        resumes: a daemon that stops in between completes the rename at its
        next start (:meth:`recover`).  Raises :class:`RegionError` when a
        step fails; a failed rename takes the commit back (``rec`` and the
        journal say aborted), so the source is never told "committed".
        """
        try:
            tmp = self.staged_path(device_state_path)
            if not staged:  # (staged: :meth:`stage` wrote these very bytes already)
                tmp.write_bytes(device)
            os.replace(tmp, device_state_path)
        except OSError as exc:
            raise RegionError(f"cannot write the device state {device_state_path}: {exc}") from exc
        record = copy.copy(rec)
        record.outcome, record.memory, record.partial = "committed", str(final), str(partial)
        record.device_state_bytes = len(device)
        try:
            self.write(record)
        except RegionError as exc:
            raise RegionError(f"cannot record the commit in the journal: {exc}") from exc
        try:
            os.replace(partial, final)
        except OSError as exc:
            # Take the commit back, or the source would be told "committed".
            rec.error = f"cannot move the region into place: {exc}"
            rec.outcome = "aborted"
            try:
                self.write(rec)
            except RegionError as jexc:
                _log.critical("migration %s: region not moved into place (%s) and the journal "
                              "cannot be corrected (%s)", rec.migration_id, exc, jexc)
            raise RegionError(rec.error) from exc
        rec.outcome, rec.memory = "committed", str(final)
        rec.device_state_bytes = len(device)

    def recover(self, memory_dir: Path, *, keep_partial: bool) -> None:
        """Recover from a daemon that stopped mid-migration.

        A migration the journal calls committed whose region is still under
        its partial name (the daemon stopped between the commit record and
        the rename) is completed: the region belongs here now, the source
        keeps its copy paused.  Migrations still "running" can no longer
        commit: they are recorded as aborted.  Other partial files are
        removed from ``memory_dir`` (or kept with ``keep_partial``, --keep-partial).
        """
        for rec in self.entries():
            mid = str(rec.get("migration_id"))
            if rec.get("outcome") == "committed" and rec.get("partial") and rec.get("memory"):
                partial, final = Path(str(rec["partial"])), Path(str(rec["memory"]))
                if partial.exists():
                    os.replace(partial, final)
                    _log.critical(
                        "migration %s was committed but this daemon stopped before resuming it: the "
                        "region is now %s; resume the workload there by hand (its source keeps its "
                        "copy paused)", mid, final,
                    )
            elif rec.get("outcome") == "running":
                rec["outcome"] = "aborted"
                rec["error"] = "the destination daemon stopped during the migration"
                self.write(rec)
                _log.warning("migration %s was interrupted by a daemon restart: recorded as aborted", mid)
        for p in memory_dir.glob(".*.partial"):
            if keep_partial:
                _log.warning("keeping partial region %s from an earlier run (--keep-partial)", p)
                continue
            _log.warning("removing partial region %s left by an earlier run", p)
            p.unlink(missing_ok=True)

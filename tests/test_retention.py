"""A long-lived daemon keeps counters, not every record: bounded memory and journal, monotonic metrics.

The destination keeps its newest ``RECENT_KEPT`` records in memory and in
its journal (outcome queries are answered for those), the source daemon its
newest jobs; the metrics' counters come from a :class:`Tally` that every
finished migration is folded into, so they never go down when old records
are dropped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import precopy.session.destination
from precopy.session.journal import Journal, MigrationRecord
from precopy.session.tally import DOWNTIME_BUCKETS_S, Tally
from precopy_agents.metrics import dest_metrics

from .test_engine import FakeWorkload, make_region, migrate, serve, settled


def test_tally_counts_by_outcome_and_buckets_downtime_inclusively() -> None:
    t = Tally()
    t.add("committed", bytes=100, pages=2, rounds=3, downtime_s=0.05)  # on a bound: in that bucket
    t.add("committed", bytes=10, rounds=1, downtime_s=30.0)  # beyond every bound: +Inf only
    t.add("aborted", bytes=5, rounds=1)
    t.add("preflight-ok")
    assert t.by_outcome == {"committed": 2, "aborted": 1, "in-doubt": 0, "preflight-ok": 1}
    assert (t.bytes, t.pages, t.rounds, t.finished) == (115, 2, 5, 4)
    le = dict(zip([*DOWNTIME_BUCKETS_S, float("inf")], t.downtime_counts))
    assert le[0.025] == 0 and le[0.05] == 1 and le[10.0] == 1 and le[float("inf")] == 2
    assert t.downtime_sum_s == pytest.approx(30.05)
    with pytest.raises(ValueError, match="increasing"):
        Tally(buckets=(1.0, 0.5))


def _record(journal: Journal, mid: str, outcome: str, age_s: float, **kw: str) -> Path:
    journal.write({"migration_id": mid, "outcome": outcome, **kw})
    path = journal.dir / f"{mid}.json"
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_journal_prune_keeps_the_newest_and_whatever_recovery_needs(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    partial = tmp_path / ".vm.partial"
    partial.write_bytes(b"x")
    newest = [_record(j, f"new{i}", "committed", age_s=i) for i in range(3)]
    week = 7 * 86400
    young = _record(j, "young", "aborted", age_s=week - 3600)  # beyond the newest 3, but under a week
    old_done = [_record(j, f"old{i}", o, age_s=week + 100 + i) for i, o in enumerate(("committed", "aborted"))]
    running = _record(j, "run", "running", age_s=week + 500)
    pending = _record(j, "pend", "committed", age_s=week + 600, partial=str(partial), memory=str(tmp_path / "vm"))
    (j.dir / "junk.json").write_text("not json")  # unreadable: logged, left alone
    os.utime(j.dir / "junk.json", (time.time() - week - 900, time.time() - week - 900))
    assert j.prune(3) == 2
    assert all(p.exists() for p in newest) and young.exists() and running.exists() and pending.exists()
    assert not any(p.exists() for p in old_done)
    assert j.prune(3) == 0
    assert (j.dir / "junk.json").exists()
    assert json.loads(pending.read_text())["outcome"] == "committed"


async def test_destination_keeps_its_newest_records_and_counts_every_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precopy.session.destination, "RECENT_KEPT", 2)
    monkeypatch.setattr(precopy.session.destination, "JOURNAL_MIN_AGE_S", 0.0)
    src = tmp_path / "src.mem"
    mm = make_region(src, 64)
    async with serve(tmp_path / "dest") as server:
        for i in range(5):
            rep = await migrate(server, src, FakeWorkload(b"blob"), name=f"vm{i}")
            assert rep.outcome == "committed"
            await settled(server)
        # The newest two in memory; the journal pruned to them (every RECENT_KEPT // 10 = 0 -> each end).
        assert [r.name for r in server.results] == ["vm3", "vm4"]
        assert sorted(p.stem for p in server.journal.dir.glob("*.json")) == sorted(
            r.migration_id for r in server.results)
        assert server.tally.by_outcome["committed"] == 5 and server.in_flight == 0
        counts = {s.labels.get("outcome"): s.value for f in dest_metrics(server)
                  if f.name == "precopy_dest_migrations" for s in f.samples}
        assert counts["committed"] == 5.0
    del mm


def test_a_record_beyond_the_window_is_no_longer_answered(tmp_path: Path) -> None:
    """What docs/FAILURES.md promises: a record of every migration of the last week (and the newest
    RECENT_KEPT of any age)."""
    j = Journal(tmp_path)
    rec = MigrationRecord("gone", "vm", 4096, "peer", outcome="committed")
    j.write(rec)
    os.utime(j.dir / "gone.json", (time.time() - 50, time.time() - 50))
    j.write(MigrationRecord("kept", "vm", 4096, "peer", outcome="aborted"))
    assert j.prune(1) == 0  # under a week old: kept
    assert j.prune(1, min_age_s=10) == 1
    assert j.read("gone") is None and j.read("kept") is not None


def test_source_daemon_counts_past_reports_and_drops_old_jobs_not_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import precopy_agents.source_daemon as sd
    reports = tmp_path / "reports"
    reports.mkdir()
    for i, outcome in enumerate(("committed", "aborted", "committed")):
        (reports / f"m{i}.json").write_text(json.dumps(
            {"migration_id": f"m{i}", "outcome": outcome, "bytes_on_wire": 10, "pages_sent": 1,
             "rounds": [{}, {}], "downtime_ms": 20.0}))
        os.utime(reports / f"m{i}.json", (time.time() - 10 + i, time.time() - 10 + i))
    monkeypatch.setattr(sd, "MAX_JOBS", 2)
    daemon = sd.SourceDaemon(tmp_path / "ctl.sock", report_dir=reports)
    daemon._load_past()
    assert list(daemon.jobs) == ["m1", "m2"]  # the newest two listed...
    assert daemon.tally.by_outcome["committed"] == 1 and daemon.tally.by_outcome["aborted"] == 1
    # ... and counted; a job that ends is counted when it ends, whatever is dropped later.
    job = sd.Job(id="m3", options={}, state="committed",
                 report={"migration_id": "m3", "outcome": "committed", "downtime_ms": 5.0, "rounds": [{}]})
    daemon.jobs["m3"] = job
    daemon._finish(job, None)
    assert daemon.tally.by_outcome["committed"] == 2 and daemon.tally.rounds == 5
    assert sum(daemon.tally.downtime_counts[:1]) == 1  # 5 ms: in the 10 ms bucket

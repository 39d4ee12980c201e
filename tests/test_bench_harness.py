"""The benchmark harness cannot rot: its smallest matrix runs here, end to end."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from benchmarks import harness


def test_matrices_cover_the_benchmark_scenarios():
    quick = harness.matrix("quick")
    full = harness.matrix("full")
    assert {s.workload for s in quick} == set(harness.WORKLOADS) == {"idle", "low", "high", "hotset", "sweep"}
    assert {s.mode for s in quick} == {"precopy", "stop-and-copy"}
    assert {s.link for s in quick} == {"loopback", "1gbit"}
    assert {s.size for s in full} == {"256M", "1G", "4G"}
    assert {s.size for s in quick} == {"256M", "1G", "4G"}
    assert [(s.workload, s.dest_region) for s in quick if s.size == "4G"] == [("idle", "fresh"), ("idle", "existing")], \
        "quick runs 4 GiB idle only (scaling, with and without the first touch)"
    assert {s.compress for s in quick} == {"off", "lz4", "auto"}
    assert {s.budget_ms for s in full} == {50, 300}
    assert {(s.content, s.compress) for s in full} >= {("random", "off"), ("half-text", "lz4"), ("half-text", "off")}
    assert len({s.key for s in full}) == len(full), "duplicate scenarios"
    with pytest.raises(ValueError, match="unknown matrix"):
        harness.matrix("huge")


def test_the_promise_matrix_and_its_tally():
    promise = harness.matrix("promise")
    assert {(s.size, s.budget_ms, s.on_nonconvergence) for s in promise} == {("1G", 50.0, "abort")}
    assert {(s.workload, s.control) for s in promise} == {(w, c) for w in ("low", "high") for c in ("pid", "control")}
    assert all(s.key.endswith("abort") for s in promise) and len({s.key for s in promise}) == 4

    def rec(outcome: str, down: float | None = None, paused: float | None = None, error: str = "") -> dict:
        return {"key": "k", "scenario": {"budget_ms": 50.0},
                "report": {"outcome": outcome, "downtime_ms": down, "expected_downtime_ms": 40.0 if down else None,
                           "paused_ms": paused, "error": error or None, "switchover_margin_ms": 10.0,
                           "rounds": [{}, {}]}}

    runs = [rec("committed", 30.0 + i / 5) for i in range(96)] + [rec("committed", 50.0), rec("committed", 61.5),
                                                               rec("aborted", paused=55.0),
                                                               rec("aborted", error="cannot converge: the downtime floor")]
    row = harness.promise_tally(runs).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["k", "100", "**97/100**", "1", "1 (floor over the budget 1)", "1"]
    downs = [30.0 + i / 5 for i in range(96)] + [50.0, 61.5]
    assert cells[6] == f"{statistics.median(downs):.1f} / 61.5 / 61.5"  # median, the 99th of 98, the max
    assert harness._quantile(list(range(1, 101)), 0.99) == 99 and harness._quantile([5.0], 0.99) == 5.0
    assert cells[10:] == ["n/a", "0 (0–0)", "n/a"]  # the records say no wire, no throttle, no guest
    # Wire ÷ region, max throttle and the guest's writes/s, of the committed runs.
    full = [dict(rec("committed", 30.0), region_bytes=100, guest={"achieved_pps": 1000.0 * i})
            for i in (1, 2)]
    for i, r in enumerate(full):
        r["report"].update(bytes_on_wire=200 + 100 * i, rounds=[{"throttle_pct": 40 + 20 * i}, {}])
    cells = [c.strip() for c in harness.promise_tally(full).splitlines()[2].strip("|").split("|")]
    assert cells[10:] == ["2.50 (2.00–3.00)", "50 (40–60)", "1500 (1000–2000)"]


def test_results_section_is_replaced_in_place(tmp_path: Path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nhand-written notes\n")
    harness.update_results(md, "quick", "first table\n")
    harness.update_results(md, "quick", "second table\n")
    text = md.read_text()
    assert "hand-written notes" in text and "second table" in text and "first table" not in text
    assert text.count("<!-- harness:quick:begin -->") == 1


@pytest.mark.slow
def test_smoke_matrix_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    assert harness.main(["--matrix", "smoke", "--runs", "1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["scenario"]["mode"] for r in records] == ["precopy", "stop-and-copy"]
    for r in records:
        rep = r["report"]
        assert rep["outcome"] == "committed", rep
        assert rep["mode"] == r["scenario"]["mode"]
        assert rep["rounds"] and rep["downtime_ms"] > 0 and rep["bytes_on_wire"] >= r["region_bytes"] // 2
        assert r["exit_code"] == 0
        y = r["yardsticks"]
        assert y["raw_link_s"] > 0 and y["raw_fresh_s"] > 0 and y["xxh3_s"] > 0
        assert r["peak_rss_bytes"]["source"] > 0 and r["peak_rss_bytes"]["dest"] > 0
        assert r["cpu_s"]["source"] > 0 and r["cpu_s"]["dest"] >= 0 and r["cpu_s"]["guest"] >= 0, r["cpu_s"]
        assert (r["guest"]["achieved_pps"] or 0) > 0, r["guest"]  # None: the guest left no stats
    table = (out / "table.md").read_text()
    assert "| 16M | low | random | loopback | 300 ms | off | stop-and-copy | digest | fresh | 1/1 (1) |" in table
    for name in ("rounds", "downtime_vs_rate", "total_vs_size", "expected_vs_measured"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"![{name}]({name}.png)" in table
    # the table can be rebuilt from the JSON lines alone
    again = tmp_path / "again"
    assert harness.main(["--from-jsonl", str(out / "runs.jsonl"), "--out", str(again)]) == 0
    assert (again / "table.md").read_text().split("### Yardsticks")[1] == table.split("### Yardsticks")[1]


def test_first_touch_yardstick_runs_and_cleans_up(capsys: pytest.CaptureFixture[str]):
    from benchmarks import first_touch

    before = set(Path("/dev/shm").glob("precopy-first-touch.*"))
    assert first_touch.touch(Path("/dev/shm") / f"precopy-first-touch.test-{os.getpid()}", 4 << 20) > 0
    assert set(Path("/dev/shm").glob("precopy-first-touch.*")) == before


def test_scan_floor_measures_each_way_of_reading_a_region(tmp_path: Path):
    from benchmarks import scan_floor

    path = tmp_path / "region"
    path.write_bytes(os.urandom(4 << 20))
    res = scan_floor.measure(path, runs=1)
    assert set(res) == {"xxh3, 64 MiB buffers", "xxh3, 128 KiB chunks, two threads",
                        "xxh3 per 4 KiB page (page_digests)"}
    assert all(s > 0 for s in res.values())


def test_drain_benchmark_smoke_runs_tiny(capsys: pytest.CaptureFixture[str]):
    """benchmarks/drain.py with 4 MiB guests, N = 1 and 2, one run: all commit, the table has both rows."""
    from benchmarks import drain

    assert drain.main(["--n", "2", "--size-mib", "4", "--runs", "1", "--versus=--max-active=2"]) == 0
    out = capsys.readouterr().out
    assert "precopy-dest (defaults):" in out and "precopy-dest --max-active=2:" in out, out
    assert out.count("| 1 | ") == 2 and out.count("| 2/2 | 0 |") == 2, out
    assert not list(Path("/dev/shm").glob(f"precopy-drain-{os.getpid()}"))


def test_drain_table_holds_each_drain_against_n_times_one():
    from benchmarks.drain import Drain, table

    ok = {"outcome": "committed", "downtime_ms": 50.0, "queued_s": 0.0}
    results = {1: [Drain(1, 1.0, [ok])],
               2: [Drain(2, 2.2, [ok, {"outcome": "committed", "downtime_ms": 400.0, "queued_s": 1.1}])],
               4: [Drain(4, 5.0, [ok, ok, ok, {"outcome": "aborted"}])]}
    rows = table(results, 300.0).splitlines()
    assert rows[3] == "| 2 | 2.20 | 2.00 | 1.10 | 2/2 | 0 | 1/2 | 400 | 1.10 |"
    assert rows[4] == "| 4 | 5.00 | 4.00 | 1.25 | 3/4 | 1 | 3/4 | 50 | 0.00 |"


def test_main_gives_its_caller_back_the_sigterm_handler_it_had(tmp_path: Path) -> None:
    """The harness turns SIGTERM into an unwinding exit only while it runs: a test worker (or any
    caller) keeps its own handler afterwards, also when main() fails."""
    import signal

    def mine(signum: int, frame: object) -> None:  # pragma: no cover - never delivered
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        empty = tmp_path / "runs.jsonl"
        empty.write_text("")
        assert harness.main(["--from-jsonl", str(empty), "--out", str(tmp_path / "out")]) == 1  # no run in it
        assert signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(SystemExit):
            harness.main(["--runs", "0"])
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)

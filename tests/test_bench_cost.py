"""benchmarks/cost.py (issue 21's cost model) cannot rot: its arithmetic, and a tiny run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import cost


def _run(total: float, src: float, dst: float) -> dict:
    return {"total_time_s": total, "wall_s": total + 0.3, "tracking": "uffd-wp", "bytes_on_wire": 1 << 30,
            "cpu_s": {"source": src, "dest": dst, "guest": 0.01}, "peak_rss_bytes": {"source": 1, "dest": 1}}


def test_summary_ratios_and_projection_from_known_figures():
    """2 GiB; source 1.2 CPU-s after a 0.2 s start, destination 0.8: the busier side is the source at 0.5 CPU-s/GiB."""
    raw = {"link": [{"seconds": 0.5, "send_cpu_s": 0.3, "recv_cpu_s": 0.3}],
           "fresh": [{"seconds": 1.5, "send_cpu_s": 0.3, "recv_cpu_s": 2.0}],
           "existing": [{"seconds": 0.8, "send_cpu_s": 0.3, "recv_cpu_s": 0.5}]}
    data = {"size": "2G", "bytes": 2 << 30, "runs": 3, "raw": raw, "source_startup_cpu_s": [0.2, 0.1, 0.3],
            "migrations": {"existing-uffd-wp": [_run(1.0, 1.2, 0.8), _run(2.0, 1.4, 0.6), _run(0.9, 1.0, 0.8)]}}
    s = cost.summarise(data)["summary"]
    v = s["scenarios"]["existing-uffd-wp"]
    assert v["total_time_s"] == 1.0
    assert v["source_cpu_per_gib"] == pytest.approx(0.5) and v["dest_cpu_per_gib"] == pytest.approx(0.4)
    assert v["both_cpu_per_gib"] == pytest.approx(0.9)  # median of (1.8, 1.8, 1.6) / 2
    assert s["raw"]["existing"]["cpu_per_gib"] == pytest.approx(0.4)
    assert v["cpu_vs_raw"] == pytest.approx(0.9 / 0.4) and v["cpu_yardstick"] == "existing"
    assert v["raw_link_over_migration"] == pytest.approx(0.5) and v["raw_yard_over_migration"] == pytest.approx(0.8)
    assert v["busier_side"] == "source" and v["gib_per_s_per_core"] == pytest.approx(2.0)
    rows = {(p["cores"], p["link_gbit"]): p for p in v["projection"]}
    assert set(rows) == {(c, g) for c in (8, 32) for g in (10, 25, 100)}
    link10 = 10e9 * cost.GOODPUT / 8 / (1 << 30)
    assert rows[(8, 10)]["bound"] == "link" and rows[(8, 10)]["gib_s"] == pytest.approx(link10)
    # 16 GiB/s a core-set of 8: no CPU bound; but the source's loop: 0.5 CPU-s/GiB less the raw copy's
    # sender 0.15 x (n - 1) / n that the sending threads take over -- n = 3 streams at 8 cores, 15 at 32.
    assert rows[(8, 25)]["streams"] == 3 and rows[(32, 25)]["streams"] == 15
    assert rows[(8, 25)]["loop_bound_gib_s"] == pytest.approx(1 / (0.5 - 0.15 * 2 / 3))
    assert rows[(32, 100)]["loop_bound_gib_s"] == pytest.approx(1 / (0.5 - 0.15 * 14 / 15))
    assert rows[(8, 25)]["loop_bound_one_loop_gib_s"] == pytest.approx(2.0)
    assert {k: p["bound"] for k, p in rows.items()} == {
        (8, 10): "link", (8, 25): "source loop", (8, 100): "source loop",
        (32, 10): "link", (32, 25): "link", (32, 100): "source loop"}  # 2.78 GiB/s of loop over 2.74 of link
    assert rows[(32, 100)]["gib_s"] == rows[(32, 100)]["loop_bound_gib_s"]
    assert cost.auto_streams(2) == 1 and cost.auto_streams(6) == 2 and cost.auto_streams(1000) == 64
    assert rows[(32, 100)]["cores_to_fill_link"] == pytest.approx(10 * link10 * 0.5)
    # 3 CPU-s per GiB: 8 cores make 2.67 GiB/s, under 25 and 100 Gbit/s; 32 make 10.7, under 100 only
    bound = {(p["cores"], p["link_gbit"]): p["bound"] for p in cost.projection(3.0)}
    assert bound == {(8, 10): "link", (8, 25): "CPU", (8, 100): "CPU",
                     (32, 10): "link", (32, 25): "link", (32, 100): "CPU"}
    assert cost.projection(3.0)[2]["gib_s"] == pytest.approx(8 / 3)
    md = cost.markdown(data, "python -m benchmarks.cost")
    assert "| existing-uffd-wp | uffd-wp | 1.000 (0.900–2.000) | 0.50 (0.40–0.60) |" in md, md
    assert "Assumptions of the projection" in md and md.count("| 32 | 100 Gbit/s |") == 1


def test_a_tick_of_cpu_does_not_divide_by_zero():
    raw = {k: [{"seconds": 0.01, "send_cpu_s": 0.0, "recv_cpu_s": 0.0}] for k in cost.RAW}
    data = {"size": "4M", "bytes": 4 << 20, "runs": 1, "raw": raw, "source_startup_cpu_s": [0.3],
            "migrations": {"fresh-digest": [_run(0.1, 0.3, 0.0)]}}
    v = cost.summarise(data)["summary"]["scenarios"]["fresh-digest"]
    assert math.isnan(v["cpu_vs_raw"]) and v["projection"] == []
    assert "fresh-digest" in cost.markdown(data, "x")


@pytest.mark.slow
def test_tiny_cost_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cost.json"
    assert cost.main(["--size", "16M", "--runs", "1", "--scenarios", "existing-uffd-wp,fresh-digest",
                      "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["migrations"]) == {"existing-uffd-wp", "fresh-digest"}
    for runs in data["migrations"].values():
        (r,) = runs
        assert r["total_time_s"] > 0 and r["cpu_s"]["source"] > 0 and r["cpu_s"]["dest"] >= 0
    assert all(len(v) == 1 and v[0]["seconds"] > 0 for v in data["raw"].values())
    assert data["source_startup_cpu_s"][0] > 0
    assert set(data["summary"]["scenarios"]) == set(data["migrations"])
    text = capsys.readouterr().out
    assert "| raw copy into an existing file |" in text and "| existing-uffd-wp |" in text
    # the report rebuilds from the JSON alone
    assert cost.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out == text
    with pytest.raises(SystemExit):
        cost.main(["--scenarios", "nonesuch"])
    assert not list(Path("/dev/shm").glob(f"precopy-cost.*{tmp_path.name}*"))


def test_pyspy_summary_leaves_waiting_threads_out_when_asked(tmp_path: Path):
    from benchmarks import pyspy_summary

    raw = tmp_path / "raw.txt"
    raw.write_text("main (a.py:1);send (b.py:2) 30\n"
                   "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 50\n"
                   "Thread.run (threading.py:982);Event.wait (threading.py:629);Condition.wait (threading.py:331) 20\n"
                   "main (a.py:1);hash (c.py:3) 10\n")
    everything = pyspy_summary.summarise(str(raw), 5)
    assert everything.startswith(f"{raw}: 110 samples\n") and "_worker" in everything
    work = pyspy_summary.summarise(str(raw), 5, skip_idle=True)
    assert work.startswith(f"{raw}: 40 samples (70 more of waiting threads left out)\n"), work
    assert "    30  75.0%  send (b.py:2)" in work and "_worker" not in work and "Condition.wait" not in work

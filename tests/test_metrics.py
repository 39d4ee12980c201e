"""The daemons' Prometheus exposition: names, labels, types, HELP and values, pinned.

Scraped over HTTP from :class:`precopy_agents.metrics.MetricsServer`, as Prometheus does.
"""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from precopy.session.tally import Tally
from precopy_agents.metrics import MetricsServer, dest_metrics, source_metrics, tally_report

#: The buckets of both downtime histograms, as their ``le`` labels read.
LE = ("0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf")

DEST_FAMILIES = {
    "precopy_dest_migrations_total": ("counter", "Migrations received, by outcome."),
    "precopy_dest_migrations_in_flight": ("gauge", "Migrations being received now."),
    "precopy_dest_migrations_active": ("gauge", "Migrations moving bytes now (at most --max-active)."),
    "precopy_dest_migrations_queued": ("gauge", "Migrations accepted and waiting for a slot (--max-active)."),
    "precopy_dest_max_active": ("gauge", "Migrations allowed to move bytes at once (--max-active)."),
    "precopy_dest_received_bytes_total": ("counter", "Bytes received by finished migrations."),
    "precopy_dest_rounds_total": ("counter", "Iterative rounds (digest requests) of finished migrations."),
    "precopy_dest_downtime_seconds": ("histogram",
                                      "Downtime of committed migrations as seen here (SWITCHOVER to resume)."),
}

SOURCE_FAMILIES = {
    "precopy_source_migrations_total": ("counter", "Migrations started by this daemon, by outcome."),
    "precopy_source_migrations_in_flight": ("gauge", "Migrations running now."),
    "precopy_source_migrations_active": ("gauge", "Migrations moving bytes now (running, not queued at "
                                                  "the destination)."),
    "precopy_source_migrations_queued": ("gauge", "Migrations waiting: in this daemon's queue "
                                                  "(--max-active) or the destination's."),
    "precopy_source_bytes_on_wire_total": ("counter", "Bytes sent by finished migrations."),
    "precopy_source_pages_sent_total": ("counter", "Pages sent by finished migrations."),
    "precopy_source_rounds_total": ("counter", "Rounds (full, iterative, final) of finished migrations."),
    "precopy_source_max_active": ("gauge", "Migrations allowed to move bytes at once (--max-active)."),
    "precopy_source_downtime_seconds": ("histogram", "Measured downtime of committed migrations."),
}

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[str, float]]:
    """{family: (type, help)}, {'name{k="v",...}' (labels sorted): value}."""
    families: dict[str, list[str]] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            families.setdefault(name, ["", ""])[1] = help_
        elif line.startswith("# TYPE "):
            name, _, type_ = line[7:].partition(" ")
            families.setdefault(name, ["", ""])[0] = type_
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not an exposition line: {line!r}"
            labels = sorted(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            key = m.group(1) + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
            assert key not in samples, f"sample {key} twice"
            samples[key] = float(m.group(3))
    return {k: (v[0], v[1]) for k, v in families.items()}, samples


def histogram(name: str, observations: list[float]) -> dict[str, float]:
    out = {f'{name}_bucket{{le="{le}"}}': float(sum(1 for o in observations if o <= float(le)))
           for le in LE}
    out[f"{name}_sum"] = sum(observations)
    out[f"{name}_count"] = float(len(observations))
    return out


def ours(families: dict[str, tuple[str, str]], samples: dict[str, float], prefix: str
         ) -> tuple[dict[str, tuple[str, str]], dict[str, float]]:
    return ({k: v for k, v in families.items() if k.startswith(prefix)},
            {k: v for k, v in samples.items() if k.startswith(prefix)})


async def scrape(collect: Callable[[], Any], path: str = "/metrics") -> str:
    server = MetricsServer("127.0.0.1", 0, collect)
    await server.start()
    try:
        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=30) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                return r.read().decode()  # type: ignore[no-any-return]
        return await asyncio.to_thread(get)
    finally:
        await server.close()


def dest_server() -> SimpleNamespace:
    rec = SimpleNamespace
    results = [
        rec(outcome="committed", bytes_received=1000, rounds=3, downtime_ms=40.0),
        rec(outcome="committed", bytes_received=500, rounds=2, downtime_ms=300.0),
        rec(outcome="aborted", bytes_received=7, rounds=1, downtime_ms=None),
        rec(outcome="in-doubt", bytes_received=9, rounds=4, downtime_ms=20000.0),
    ]
    tally = Tally()
    for r in results:  # as DestinationServer counts each migration that ends
        tally.add(r.outcome, bytes=r.bytes_received, rounds=r.rounds,
                  downtime_s=None if r.downtime_ms is None else r.downtime_ms / 1e3)
    # One more is running (not counted yet).
    return SimpleNamespace(tally=tally, in_flight=1, admission=SimpleNamespace(active=1, queued=2, limit=4))


async def test_the_destinations_exposition() -> None:
    families, samples = ours(*parse(await scrape(lambda: dest_metrics(dest_server()))), "precopy_")
    assert families == DEST_FAMILIES
    assert samples == {
        'precopy_dest_migrations_total{outcome="committed"}': 2,
        'precopy_dest_migrations_total{outcome="aborted"}': 1,
        'precopy_dest_migrations_total{outcome="in-doubt"}': 1,
        "precopy_dest_migrations_in_flight": 1,
        "precopy_dest_migrations_active": 1,
        "precopy_dest_migrations_queued": 2,
        "precopy_dest_max_active": 4,
        "precopy_dest_received_bytes_total": 1516,
        "precopy_dest_rounds_total": 10,
        **histogram("precopy_dest_downtime_seconds", [0.04, 0.3, 20.0]),
    }


def source_jobs() -> list[SimpleNamespace]:
    job = SimpleNamespace

    def report(outcome: str, downtime_ms: float | None) -> dict[str, Any]:
        return {"outcome": outcome, "downtime_ms": downtime_ms, "bytes_on_wire": 1 << 20,
                "pages_sent": 256, "rounds": [{}, {}, {}]}

    return [
        job(state="committed", report=report("committed", 12.5), progress=None),
        job(state="committed", report=report("committed", 700.0), progress={"phase": "committed"}),
        job(state="aborted", report=report("aborted", 5.0), progress=None),  # no downtime counted
        job(state="aborted", report=None, progress=None),  # no report: not counted
        job(state="running", report=None, progress={"phase": "queued"}),  # queued at the destination
        job(state="running", report=None, progress={"phase": "iterate", "round": 3}),
        job(state="queued", report=None, progress=None),
    ]


async def test_the_sources_exposition() -> None:
    jobs = source_jobs()
    tally = Tally()
    for j in jobs:  # as the daemon counts each job that ends
        if j.state not in ("queued", "running"):
            tally_report(tally, j.state, j.report)
    families, samples = ours(*parse(await scrape(lambda: source_metrics(jobs, 2, tally))), "precopy_")
    assert families == SOURCE_FAMILIES
    assert samples == {
        'precopy_source_migrations_total{outcome="committed"}': 2,
        'precopy_source_migrations_total{outcome="aborted"}': 1,
        'precopy_source_migrations_total{outcome="in-doubt"}': 0,
        "precopy_source_migrations_in_flight": 2,
        "precopy_source_migrations_active": 1,
        "precopy_source_migrations_queued": 2,
        "precopy_source_bytes_on_wire_total": 3 << 20,
        "precopy_source_pages_sent_total": 768,
        "precopy_source_rounds_total": 9,
        "precopy_source_max_active": 2,
        **histogram("precopy_source_downtime_seconds", [0.0125, 0.7]),
    }
    # Without --max-active its gauge is absent; an idle daemon counts zeros.
    families, samples = ours(*parse(await scrape(lambda: source_metrics([]))), "precopy_")
    assert set(families) == set(SOURCE_FAMILIES) - {"precopy_source_max_active"}
    assert set(samples.values()) == {0.0}


async def test_only_get_metrics_is_served_and_a_taken_port_says_so() -> None:
    server = MetricsServer("127.0.0.1", 0, lambda: source_metrics([]))
    await server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        def status(path: str, method: str = "GET") -> int:
            req = urllib.request.Request(url + path, data=b"x" if method == "POST" else None, method=method)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status  # type: ignore[no-any-return]
            except urllib.error.HTTPError as exc:
                return exc.code

        def garbage() -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                s.sendall(b"GARBAGE" * 2000)  # no end of headers
                s.shutdown(socket.SHUT_WR)
                s.recv(100)

        assert await asyncio.to_thread(status, "/other") == 404
        assert await asyncio.to_thread(status, "/metrics", "POST") == 405
        await asyncio.to_thread(garbage)
        assert await asyncio.to_thread(status, "/metrics?x=1") == 200
        taken = MetricsServer("127.0.0.1", server.port, lambda: source_metrics([]))
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{server.port}"):
            await taken.start()
    finally:
        await server.close()


async def test_the_process_collector_rides_along() -> None:
    families, samples = parse(await scrape(lambda: source_metrics([])))
    assert {k: v[0] for k, v in families.items() if k.startswith("process_")} == {
        "process_virtual_memory_bytes": "gauge", "process_resident_memory_bytes": "gauge",
        "process_start_time_seconds": "gauge", "process_cpu_seconds_total": "counter",
        "process_open_fds": "gauge", "process_max_fds": "gauge"}
    assert samples["process_resident_memory_bytes"] > 1 << 20 and samples["process_open_fds"] >= 3
    assert "python_gc_collections_total" in families and "python_info" in families
    assert {k.split("_")[0] for k in families} == {"precopy", "process", "python"}


async def test_a_blocked_event_loop_gets_a_503_not_a_hung_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr("precopy_agents.metrics.COLLECT_TIMEOUT_S", 0.05)
    server = MetricsServer("127.0.0.1", 0, lambda: source_metrics([]))
    await server.start()
    got: list[Any] = []

    def get() -> None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30)
        except urllib.error.HTTPError as exc:
            got.append((exc.code, exc.read().decode()))
    try:
        t = threading.Thread(target=get)
        t.start()
        t.join(60)  # on the event loop: it is blocked until the scrape has its answer
        assert got and got[0][0] == 503 and "event loop did not answer" in got[0][1], got
    finally:
        await server.close()

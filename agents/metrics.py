"""Prometheus metrics over HTTP (``--metrics HOST:PORT``), with ``prometheus-client``.

The daemon's families are computed at each scrape from its records (a
custom collector), so there is no second source of truth to keep in step.
The registry also holds prometheus-client's standard collectors: the
process (``process_resident_memory_bytes``, ``process_open_fds``,
``process_cpu_seconds_total``, ...), the platform (``python_info``) and the
garbage collector (``python_gc_*``).  prometheus-client's threaded WSGI
server answers; only ``GET /metrics`` is served (other paths 404, other
methods 405).  The records belong to the daemon's event loop, so a scrape,
on the server's thread, has the loop build the families.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

from precopy.session.tally import DOWNTIME_BUCKETS_S, Tally

__all__ = ["Family", "MetricsServer", "counter", "gauge", "tally_histogram", "tally_report", "DOWNTIME_BUCKETS_S",
           "dest_metrics", "source_metrics"]

_log = logging.getLogger("precopy.metrics")

#: How long a scrape waits for the event loop to build the families.
COLLECT_TIMEOUT_S = 5.0

#: A metric family (prometheus-client's).
Family = Metric


def counter(name: str, help: str, values: Mapping[tuple[tuple[str, str], ...], float] | float) -> Family:
    """A counter; ``values`` is a number or {((label, value), ...): number}."""
    if isinstance(values, (int, float)):
        return CounterMetricFamily(name, help, value=float(values))
    names = [k for k, _ in next(iter(values), ())]
    f = CounterMetricFamily(name, help, labels=names)
    for labels, v in values.items():
        f.add_metric([value for _, value in labels], float(v))
    return f


def gauge(name: str, help: str, value: float) -> Family:
    return GaugeMetricFamily(name, help, value=float(value))


def tally_histogram(name: str, help: str, tally: Tally) -> Family:
    """The downtime histogram of a :class:`Tally` (its cumulative bucket counts)."""
    bounds = [*(repr(float(b)) for b in tally.buckets), "+Inf"]
    return HistogramMetricFamily(name, help, sum_value=tally.downtime_sum_s,
                                 buckets=[(b, float(n)) for b, n in zip(bounds, tally.downtime_counts)])


def _outcomes(tally: Tally) -> dict[tuple[tuple[str, str], ...], float]:
    return {(("outcome", o),): float(n) for o, n in tally.by_outcome.items()}


class _LoopCollector:
    """Families built on the daemon's event loop, asked for from the server's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, collect: Callable[[], list[Family]]) -> None:
        self.loop, self._collect = loop, collect
        self._loop_thread = threading.get_ident()

    def collect(self) -> Iterator[Family]:
        if threading.get_ident() == self._loop_thread:
            yield from self._collect()
            return
        done: concurrent.futures.Future[list[Family]] = concurrent.futures.Future()

        def build() -> None:
            try:
                done.set_result(self._collect())
            except BaseException as exc:  # noqa: BLE001 -- handed to the scrape, which answers 500
                done.set_exception(exc)
        try:
            self.loop.call_soon_threadsafe(build)
        except RuntimeError as exc:  # the loop is closed: the daemon is shutting down
            raise _Unavailable("the daemon is shutting down") from exc
        try:
            yield from done.result(COLLECT_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise _Unavailable(f"the daemon's event loop did not answer within {COLLECT_TIMEOUT_S} s "
                               "(it is blocked: see its log)") from None


class _Unavailable(Exception):
    """A scrape that cannot be answered now (503)."""


class _Handler(WSGIRequestHandler):
    #: A client that sends no request within this many seconds is dropped.
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("metrics request from %s: " + format, self.address_string(), *args)


def _app(registry: CollectorRegistry) -> Callable[..., list[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["REQUEST_METHOD"] != "GET":
            status, body = "405 Method Not Allowed", b"only GET\n"
        elif environ.get("PATH_INFO") != "/metrics":
            status, body = "404 Not Found", b"try /metrics\n"
        else:
            try:
                return metrics(environ, start_response)  # type: ignore[no-any-return]
            except _Unavailable as exc:
                _log.warning("metrics scrape not answered: %s", exc)
                status, body = "503 Service Unavailable", f"{exc}\n".encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body]
    return app


class MetricsServer:
    """prometheus-client's threaded HTTP server answering ``GET /metrics`` with ``collect()``
    (run on the event loop) and the process, platform and GC collectors."""

    def __init__(self, host: str, port: int, collect: Callable[[], list[Family]]) -> None:
        self.host, self.port, self.collect = host, port, collect
        self._httpd: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _bind(self, registry: CollectorRegistry) -> ThreadingWSGIServer:
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family})
        return make_server(self.host, self.port, _app(registry), server_class,
                           handler_class=_Handler)

    async def start(self) -> None:
        registry = CollectorRegistry()
        registry.register(_LoopCollector(asyncio.get_running_loop(), self.collect))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        try:
            self._httpd = await asyncio.to_thread(self._bind, registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="precopy-metrics", daemon=True)
        self._thread.start()
        _log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._httpd is not None:
            await asyncio.to_thread(self._httpd.shutdown)
            self._httpd.server_close()
            self._httpd = None


def dest_metrics(server: Any) -> list[Family]:
    """Families of a :class:`precopy.DestinationServer`: its ``tally`` of finished migrations since
    start, and what it serves now."""
    tally: Tally = server.tally
    return [
        counter("precopy_dest_migrations_total", "Migrations received, by outcome.", _outcomes(tally)),
        gauge("precopy_dest_migrations_in_flight", "Migrations being received now.", server.in_flight),
        gauge("precopy_dest_migrations_active", "Migrations moving bytes now (at most --max-active).",
              server.admission.active),
        gauge("precopy_dest_migrations_queued", "Migrations accepted and waiting for a slot (--max-active).",
              server.admission.queued),
        gauge("precopy_dest_max_active", "Migrations allowed to move bytes at once (--max-active).",
              server.admission.limit),
        counter("precopy_dest_received_bytes_total", "Bytes received by finished migrations.", tally.bytes),
        counter("precopy_dest_rounds_total", "Iterative rounds (digest requests) of finished migrations.",
                tally.rounds),
        tally_histogram("precopy_dest_downtime_seconds",
                        "Downtime of committed migrations as seen here (SWITCHOVER to resume).", tally),
    ]


def _dest_queued(job: Any) -> bool:
    """A running job the destination holds in its queue (its last progress said so)."""
    progress = getattr(job, "progress", None)
    return isinstance(progress, dict) and progress.get("phase") == "queued"


def source_metrics(jobs: Iterable[Any], max_active: int | None = None, tally: Tally | None = None) -> list[Family]:
    """Families of the source daemon: its ``tally`` of finished migrations and its jobs now (each
    with ``state`` and ``progress``)."""
    jobs = list(jobs)
    tally = tally if tally is not None else Tally()
    return [
        counter("precopy_source_migrations_total", "Migrations started by this daemon, by outcome.",
                _outcomes(tally)),
        gauge("precopy_source_migrations_in_flight", "Migrations running now.",
              sum(1 for j in jobs if j.state == "running")),
        gauge("precopy_source_migrations_active", "Migrations moving bytes now (running, not queued at "
              "the destination).", sum(1 for j in jobs if j.state == "running" and not _dest_queued(j))),
        gauge("precopy_source_migrations_queued", "Migrations waiting: in this daemon's queue "
              "(--max-active) or the destination's.",
              sum(1 for j in jobs if j.state == "queued" or (j.state == "running" and _dest_queued(j)))),
        counter("precopy_source_bytes_on_wire_total", "Bytes sent by finished migrations.", tally.bytes),
        counter("precopy_source_pages_sent_total", "Pages sent by finished migrations.", tally.pages),
        counter("precopy_source_rounds_total", "Rounds (full, iterative, final) of finished migrations.",
                tally.rounds),
        *([gauge("precopy_source_max_active", "Migrations allowed to move bytes at once (--max-active).",
                 max_active)] if max_active is not None else []),
        tally_histogram("precopy_source_downtime_seconds", "Measured downtime of committed migrations.", tally),
    ]


def tally_report(tally: Tally, outcome: str, report: dict[str, Any] | None) -> None:
    """Count a source migration that ended with ``report`` (one without a report is not counted)."""
    if report is None:
        return
    rep = report
    downtime = rep.get("downtime_ms") if outcome == "committed" else None
    tally.add(outcome, bytes=int(rep.get("bytes_on_wire") or 0), pages=int(rep.get("pages_sent") or 0),
              rounds=len(rep.get("rounds") or []),
              downtime_s=None if downtime is None else float(downtime) / 1e3)

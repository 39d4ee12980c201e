"""Prometheus metrics over HTTP (``--metrics HOST:PORT``), no dependency.

The text exposition format (version 0.0.4) is written by hand: ``# HELP``,
``# TYPE``, then ``name{label="value"} number`` lines; histograms as
cumulative ``_bucket{le=...}`` lines plus ``_sum`` and ``_count``.  Values
are computed at each scrape from the daemon's records, so there is no
second source of truth to keep in step.  Only ``GET /metrics`` is served.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Family", "MetricsServer", "counter", "gauge", "histogram", "render", "DOWNTIME_BUCKETS_S",
           "dest_metrics", "source_metrics"]

_log = logging.getLogger("precopy.metrics")

#: Downtime histogram buckets, seconds.
DOWNTIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Family:
    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: list[tuple[str, Mapping[str, str], float]] = field(default_factory=list)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def render(families: Iterable[Family]) -> str:
    """The exposition text of ``families``."""
    lines: list[str] = []
    for f in families:
        lines.append(f"# HELP {f.name} {f.help}")
        lines.append(f"# TYPE {f.name} {f.type}")
        for suffix, labels, value in f.samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            lines.append(f"{f.name}{suffix}{{{lab}}} {_num(value)}" if lab else f"{f.name}{suffix} {_num(value)}")
    return "\n".join(lines) + "\n"


def counter(name: str, help: str, values: Mapping[tuple[tuple[str, str], ...], float] | float) -> Family:
    """A counter; ``values`` is a number or {((label, value), ...): number}."""
    f = Family(name, "counter", help)
    if isinstance(values, (int, float)):
        f.samples.append(("", {}, float(values)))
    else:
        for labels, v in values.items():
            f.samples.append(("", dict(labels), float(v)))
    return f


def gauge(name: str, help: str, value: float) -> Family:
    return Family(name, "gauge", help, [("", {}, float(value))])


def histogram(name: str, help: str, observations: Iterable[float],
              buckets: tuple[float, ...] = DOWNTIME_BUCKETS_S) -> Family:
    obs = list(observations)
    f = Family(name, "histogram", help)
    for b in (*buckets, math.inf):
        f.samples.append(("_bucket", {"le": _num(b) if math.isinf(b) else repr(float(b))},
                          float(sum(1 for o in obs if o <= b))))
    f.samples.append(("_sum", {}, float(sum(obs))))
    f.samples.append(("_count", {}, float(len(obs))))
    return f


class MetricsServer:
    """A minimal HTTP/1.0 server answering ``GET /metrics`` with ``collect()``."""

    def __init__(self, host: str, port: int, collect: Callable[[], list[Family]]) -> None:
        self.host, self.port, self.collect = host, port, collect
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=8192)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        _log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0]
            if method != "GET":
                status, body, ctype = "405 Method Not Allowed", "only GET\n", "text/plain"
            elif path.split("?", 1)[0] != "/metrics":
                status, body, ctype = "404 Not Found", "try /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", render(self.collect()), "text/plain; version=0.0.4; charset=utf-8"
            data = body.encode()
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError) as exc:
            _log.debug("metrics request dropped: %s", type(exc).__name__)
        finally:
            writer.close()


def _by_outcome(outcomes: Iterable[str]) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {
        (("outcome", o),): 0.0 for o in ("committed", "aborted", "in-doubt")
    }
    for o in outcomes:
        out[(("outcome", o),)] = out.get((("outcome", o),), 0.0) + 1
    return out


def dest_metrics(server: Any) -> list[Family]:
    """Families of a :class:`precopy.DestinationServer` (its ``results`` since start)."""
    recs = list(server.results)
    done = [r for r in recs if r.outcome != "running"]
    return [
        counter("precopy_dest_migrations_total", "Migrations received, by outcome.",
                _by_outcome(r.outcome for r in done)),
        gauge("precopy_dest_migrations_in_flight", "Migrations being received now.",
              sum(1 for r in recs if r.outcome == "running")),
        gauge("precopy_dest_migrations_active", "Migrations moving bytes now (at most --max-active).",
              server.admission.active),
        gauge("precopy_dest_migrations_queued", "Migrations accepted and waiting for a slot (--max-active).",
              server.admission.queued),
        gauge("precopy_dest_max_active", "Migrations allowed to move bytes at once (--max-active).",
              server.admission.limit),
        counter("precopy_dest_received_bytes_total", "Bytes received by finished migrations.",
                sum(r.bytes_received for r in done)),
        counter("precopy_dest_rounds_total", "Iterative rounds (digest requests) of finished migrations.",
                sum(r.rounds for r in done)),
        histogram("precopy_dest_downtime_seconds",
                  "Downtime of committed migrations as seen here (SWITCHOVER to resume).",
                  [r.downtime_ms / 1e3 for r in done if r.downtime_ms is not None]),
    ]


def _dest_queued(job: Any) -> bool:
    """A running job the destination holds in its queue (its last progress said so)."""
    progress = getattr(job, "progress", None)
    return isinstance(progress, dict) and progress.get("phase") == "queued"


def source_metrics(jobs: Iterable[Any], max_active: int | None = None) -> list[Family]:
    """Families of the source daemon's jobs (each with ``state`` and ``report`` dict or None)."""
    jobs = list(jobs)
    done = [j for j in jobs if j.state not in ("queued", "running") and j.report is not None]
    reps = [j.report for j in done]
    return [
        counter("precopy_source_migrations_total", "Migrations started by this daemon, by outcome.",
                _by_outcome(j.state for j in done)),
        gauge("precopy_source_migrations_in_flight", "Migrations running now.",
              sum(1 for j in jobs if j.state == "running")),
        gauge("precopy_source_migrations_active", "Migrations moving bytes now (running, not queued at "
              "the destination).", sum(1 for j in jobs if j.state == "running" and not _dest_queued(j))),
        gauge("precopy_source_migrations_queued", "Migrations waiting: in this daemon's queue "
              "(--max-active) or the destination's.",
              sum(1 for j in jobs if j.state == "queued" or (j.state == "running" and _dest_queued(j)))),
        counter("precopy_source_bytes_on_wire_total", "Bytes sent by finished migrations.",
                sum(int(r.get("bytes_on_wire") or 0) for r in reps)),
        counter("precopy_source_pages_sent_total", "Pages sent by finished migrations.",
                sum(int(r.get("pages_sent") or 0) for r in reps)),
        counter("precopy_source_rounds_total", "Rounds (full, iterative, final) of finished migrations.",
                sum(len(r.get("rounds") or []) for r in reps)),
        *([gauge("precopy_source_max_active", "Migrations allowed to move bytes at once (--max-active).",
                 max_active)] if max_active is not None else []),
        histogram("precopy_source_downtime_seconds", "Measured downtime of committed migrations.",
                  [float(r["downtime_ms"]) / 1e3 for r in reps
                   if r.get("outcome") == "committed" and r.get("downtime_ms") is not None]),
    ]

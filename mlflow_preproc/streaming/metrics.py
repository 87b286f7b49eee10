"""Observability of the stream and bridge loops: counters, a stats log line, /metrics, /healthz.

Counters are kept in plain integers (cheap on the hot path) and mirrored into Prometheus
collectors once per batch. ``/healthz`` answers 503 (:meth:`LoopStats.health`) when

- the loop has not completed an iteration for ``HEALTH_STALL_S`` seconds (a
  ``pre_processing`` call that hangs, a wedged client);
- it owns partitions with lag but fetched nothing for ``HEALTH_STALL_S`` seconds, and is not
  waiting for a dependency (a consumer paused for good looks alive but makes no progress);
- the dead-letter brake is engaged;

so an orchestrator can restart the container. Its body says why, whether the consumer has
joined its group and which partitions it owns, which is what a rollout waits for.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("mlflow_preproc")

COUNTS = ("in", "out", "dropped", "failed")
# Dead letters logged in full per stats interval; the rest are counted in one line per
# interval (a topic of bad records must not become one log line per record).
DEAD_LETTERS_IN_FULL = 3


@dataclass
class LoopStats:
    """Counts of one loop, its Prometheus mirror and its liveness."""

    command: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    last_progress: float = field(default_factory=time.monotonic)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    joined: bool = False
    partitions: list[int] = field(default_factory=list)
    last_fetch: float = field(default_factory=time.monotonic)
    lag: dict[tuple[str, int], int] = field(default_factory=dict)  # owned partitions only
    waiting_for: str | None = None  # a dependency the loop waits for
    waiting_why: str = ""  # what it answered (or did not), credentials redacted
    brake: str | None = None  # why the dead-letter brake engaged
    degraded: str | None = None  # why the process should be restarted (it works on)
    # A rollout waits for a verdict on the new version: it has caught up (read every owned
    # partition to its end) or handled a full dead-letter brake window, which the brake has
    # judged.
    handled: int = 0
    caught_up: bool = False
    # Per owned partition, from librdkafka's last statistics: whether its fetcher had reached
    # the partition's end with nothing left in its queue.
    fetched_to_end: dict[tuple[str, int], bool] = field(default_factory=dict)
    verdict_after: int = 200
    in_flight: int = 0  # the producer's queue, as of the last iteration
    deployment: str = ""  # the preproc target's deployment and revision (0: not deployed)
    revision: int = 0

    def __post_init__(self) -> None:
        self._records = Counter("mlflow_preproc_records", "Records by outcome",
                                ["command", "outcome"], registry=self.registry)
        for outcome in COUNTS:  # at 0 from the start: a loop stuck before its first record
            self._records.labels(self.command, outcome)  # is still seen by the alerts
        self._batch = Histogram("mlflow_preproc_batch_seconds", "Time to process one batch",
                                ["command"], registry=self.registry,
                                buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self._lag = Gauge("mlflow_preproc_consumer_lag", "Consumer lag (messages) per "
                          "partition, as reported by librdkafka", ["topic", "partition"],
                          registry=self.registry)
        self._dead_letters = Counter("mlflow_preproc_dead_letters", "Records sent to the "
                                     "dead-letter topic, by stage and error type",
                                     ["command", "stage", "error_type"], registry=self.registry)
        self._commits = Counter("mlflow_preproc_commits", "Offset commits sent", ["command"],
                                registry=self.registry)
        self._aborts = Counter("mlflow_preproc_transactions_aborted", "Exactly-once "
                               "transactions aborted (their input processed again)",
                               ["command"], registry=self.registry)
        self._rebalances = Counter("mlflow_preproc_rebalances", "Partitions assigned, revoked "
                                   "or lost by the group", ["command", "kind"],
                                   registry=self.registry)
        # Read at scrape time: nothing on the hot path.
        for name, doc, read in (
                ("mlflow_preproc_partitions_assigned", "Partitions this member owns",
                 lambda: len(self.partitions)),
                ("mlflow_preproc_dead_letter_brake", "1 while the dead-letter brake is engaged",
                 lambda: 1 if self.brake else 0),
                ("mlflow_preproc_waiting_for_dependency", "1 while the loop waits for a "
                 "dependency (model server, schema registry)",
                 lambda: 1 if self.waiting_for else 0),
                ("mlflow_preproc_producer_queue", "Messages handed to the producer and not yet "
                 "delivered", lambda: self.in_flight),
                ("mlflow_preproc_last_progress_timestamp_seconds", "When the loop last "
                 "completed an iteration (Unix time)",
                 lambda: time.time() - (time.monotonic() - self.last_progress))):
            Gauge(name, doc, ["command"], registry=self.registry).labels(
                self.command).set_function(read)
        # A revision seen lately and replaced by an older one is a rollback
        # (alert_rules.PreprocRolloutRolledBack).
        Gauge("mlflow_preproc_revision", "Revision of the preproc target's deployment this "
              "stream belongs to (0: not started by the target)", ["command", "deployment"],
              registry=self.registry).labels(self.command, self.deployment).set(self.revision)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, memory...
        self._lag_series: set[tuple[str, int]] = set()  # (topic, partition) exported
        self._mirrored = dict.fromkeys(COUNTS, 0)
        self._started = time.monotonic()
        self._last_stats = (self._started, dict(self.counts))
        self._interval_dead: dict[str, int] = {}  # "stage/error type" -> dead letters

    def dead_letter(self, stage: str, error_type: str) -> bool:
        """Count a record sent to the dead-letter topic; whether to log it in full (the first
        :data:`DEAD_LETTERS_IN_FULL` of a stats interval are, the others are summed up)."""
        self.counts["failed"] += 1
        self._dead_letters.labels(self.command, stage, error_type).inc()
        key = f"{stage}/{error_type}"
        self._interval_dead[key] = self._interval_dead.get(key, 0) + 1
        return sum(self._interval_dead.values()) <= DEAD_LETTERS_IN_FULL

    def batch_done(self, seconds: float) -> None:
        """Called after each batch: mirror the counters, observe latency, mark progress."""
        for name in COUNTS:
            delta = self.counts[name] - self._mirrored[name]
            if delta:
                self._records.labels(self.command, name).inc(delta)
                self._mirrored[name] = self.counts[name]
        self._batch.labels(self.command).observe(seconds)
        self.alive()

    def alive(self) -> None:
        self.last_progress = time.monotonic()

    def committed(self) -> None:
        """An offset commit was sent."""
        self._commits.labels(self.command).inc()

    def aborted(self) -> None:
        """Exactly once: a transaction was aborted (its input is processed again)."""
        self._aborts.labels(self.command).inc()

    def rebalanced(self, kind: str, partitions: int) -> None:
        """The group assigned, revoked or lost ``partitions`` of this member."""
        self._rebalances.labels(self.command, kind).inc(partitions)

    def assigned(self, added: list[tuple[str, int]], owned: set[tuple[str, int]]) -> None:
        """The group gave this member ``added`` (an empty assignment is a join too)."""
        self.joined = True
        self.partitions = sorted(p for _, p in owned)
        self.lag = {key: lag for key, lag in self.lag.items() if key in owned}
        self.fetched_to_end = {key: done for key, done in self.fetched_to_end.items()
                               if key in owned and key not in added}
        for topic, partition in self._lag_series - owned:  # another member's lag now
            self._lag.remove(topic, str(partition))
        self._lag_series &= owned
        if added:
            self.last_fetch = time.monotonic()  # new partitions: give them time to fetch

    def at_end_of(self, owned: set[tuple[str, int]]) -> bool:
        """Whether every partition of ``owned`` was read to its end, as of librdkafka's last
        statistics (none yet, or new partitions since: not at their end)."""
        return all(self.fetched_to_end.get(key, False) for key in owned)

    def settled(self) -> bool:
        """Whether a rollout can stop watching this version: it caught up, handled a full
        dead-letter brake window (which the brake judged), or waits for a dependency (no
        verdict can come until that is back)."""
        return self.caught_up or self.handled >= self.verdict_after or \
            self.waiting_for is not None

    def health(self, now: float, stall_s: float) -> tuple[bool, str]:
        """Whether the loop is healthy, and why not."""
        if self.brake:
            return False, f"dead-letter brake engaged: {self.brake}"
        if self.degraded:
            return False, self.degraded
        idle = now - self.last_progress
        if idle >= stall_s:
            return False, f"the loop made no progress for {idle:.0f} s"
        lagging = sum(lag for lag in self.lag.values() if lag > 0)
        starved = now - self.last_fetch
        if lagging and starved >= stall_s and self.waiting_for is None:
            return False, (f"{lagging} records wait on partitions {self.partitions} but "
                           f"nothing was fetched for {starved:.0f} s")
        if self.waiting_for:
            return True, f"waiting for the {self.waiting_for}: {self.waiting_why[:300]}"
        return True, "ok"

    def on_librdkafka_stats(self, stats_json: str) -> None:
        """``stats_cb`` of the consumer: per-partition lag as librdkafka computes it, and
        whether the fetcher reached each partition's end."""
        stats = json.loads(stats_json)
        owned = set(self.partitions)
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                # librdkafka reports a revoked partition for a while: only the owned count
                if pid == "-1" or int(pid) not in owned:
                    continue
                # The end is the last stable offset: under read_committed (librdkafka's
                # default) an open transaction's records cannot be read yet; it is the high
                # watermark otherwise. Unknown (-1001) until a fetch response brought it.
                end = p.get("ls_offset", -1001)
                self.fetched_to_end[(topic, int(pid))] = \
                    0 <= end <= p.get("next_offset", -1001) and p.get("fetchq_cnt", 1) == 0
                if p.get("consumer_lag", -1) >= 0:
                    self._lag.labels(topic, pid).set(p["consumer_lag"])
                    self._lag_series.add((topic, int(pid)))
                    self.lag[(topic, int(pid))] = p["consumer_lag"]

    @property
    def last_stats_at(self) -> float:
        """When the last stats line was logged (or the loop started)."""
        return self._last_stats[0]

    def maybe_log(self, interval: float, **extra: object) -> None:
        """Log one stats line every ``interval`` seconds."""
        now = time.monotonic()
        then, before = self._last_stats
        if now - then < interval:
            return
        rate = (self.counts["in"] - before["in"]) / (now - then)
        logger.info("stats", extra={"event": "stats", "command": self.command, **self.counts,
                                    "records_per_s": round(rate, 1), **extra})
        self._last_stats = (now, dict(self.counts))
        self.log_dead_letters(now - then)

    def log_dead_letters(self, seconds: float) -> None:
        """One line for the dead letters of the interval, by stage and error type."""
        if not self._interval_dead:
            return
        total = sum(self._interval_dead.values())
        by_kind = ", ".join(f"{k} {n}" for k, n in sorted(self._interval_dead.items(),
                                                          key=lambda kv: -kv[1]))
        logger.warning(f"{total} records sent to the dead-letter topic in the last "
                       f"{seconds:.0f} s ({by_kind}); the first {DEAD_LETTERS_IN_FULL} of "
                       "each interval are logged in full", extra={
                           "event": "dead_letters", "command": self.command,
                           "dead_letters": total, "by_stage_and_type": dict(
                               self._interval_dead)})
        self._interval_dead = {}


class _Handler(BaseHTTPRequestHandler):
    stats: LoopStats
    stall_s: float

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/metrics"):
            self._send(200, generate_latest(self.stats.registry), CONTENT_TYPE_LATEST)
        elif self.path.startswith("/healthz"):
            now = time.monotonic()
            ok, reason = self.stats.health(now, self.stall_s)
            idle = now - self.stats.last_progress
            body = json.dumps({"status": "ok" if ok else "stalled", "reason": reason,
                               "seconds_since_progress": round(idle, 1),
                               "joined": self.stats.joined,
                               "settled": self.stats.settled(),
                               "partitions": self.stats.partitions, **self.stats.counts})
            self._send(200 if ok else 503, body.encode(), "application/json")
        else:
            self._send(404, b"see /metrics and /healthz\n", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass  # scrapes every few seconds would drown the structured log


def serve_metrics(stats: LoopStats, host: str, port: int, stall_s: float) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` from a daemon thread."""
    handler = type("Handler", (_Handler,), {"stats": stats, "stall_s": stall_s})
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    logger.info("metrics endpoint up", extra={"event": "metrics", "url":
                                              f"http://{host}:{server.server_port}/metrics"})
    return server


_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _KeyValueFormatter(logging.Formatter):
    """Text lines that still carry the structured fields, as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
        return super().format(record) + "".join(f" {k}={v}" for k, v in extra.items())


def configure_logging(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Structured (JSON) or plain text log lines on ``stream`` (stderr); ``auto`` is text
    when it is a terminal (a person reads it) and JSON otherwise (a program does)."""
    handler = logging.StreamHandler(stream)
    if fmt == "auto":
        fmt = "text" if handler.stream.isatty() else "json"
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"levelname": "level"}))
    else:
        handler.setFormatter(_KeyValueFormatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("mlflow_preproc")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

"""Dead letters as a workflow: read a dead-letter topic, sum it up, send chosen ones back.

    mlflow-preproc dlq inspect raw-dlq                      # counts by stage and error type
    mlflow-preproc dlq replay raw-dlq --stage preprocess    # back to the topic they came from

A dead letter is the input's original key, value and headers, then the stream's own headers:
``x-preproc-error``, ``-error-type``, ``-stage``, ``-source`` (``topic/partition/offset`` of the
input) and the model's provenance. Reading never joins a group and never commits: it assigns
every partition and reads to the end.

Replaying sends a dead letter's key, value and original headers (the stream's removed) to its
source topic, or ``to``, with ``x-preproc-replay-of: <dlq topic>/<partition>/<offset>``. Each
replay is recorded in ``<dlq topic>-replayed`` (keyed by the dead letter), in the same Kafka
transaction as the replayed records: both are committed or neither, so a replay that dies
midway is simply run again, and a dead letter already replayed is refused unless forced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mlflow_preproc.runtime.model_identity import HEADER

REPLAY_HEADER = HEADER + "replay-of"
_ERROR_HEADER = HEADER + "error"
_IDLE_S = 1.5  # no message for this long: the end of the topic (Tansu's watermarks are off)
_TRANSACTION_SIZE = 500


class DeadLetterError(RuntimeError):
    """A dead-letter command cannot go on; the message says why and what to change."""


@dataclass
class DeadLetter:
    """One message of a dead-letter topic."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def where(self) -> str:
        return f"{self.partition}/{self.offset}"

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers if k == HEADER + name]
        return found[-1].decode(errors="replace") if found else None

    @property
    def stage(self) -> str:
        return self.header("stage") or "?"

    @property
    def error_type(self) -> str:
        return self.header("error-type") or "?"

    @property
    def error(self) -> str:
        return self.header("error") or ""

    @property
    def source(self) -> tuple[str, int, int] | None:
        """The input's topic, partition and offset (``x-preproc-source``)."""
        text = self.header("source")
        topic, _, rest = (text or "").rpartition("/")
        topic, _, partition = topic.rpartition("/")
        if not (topic and partition.isdigit() and rest.isdigit()):
            return None
        return topic, int(partition), int(rest)

    def original_headers(self) -> list[tuple[str, bytes]]:
        """The input's own headers: those before the stream's (which start at the last
        ``x-preproc-error``; an input replayed before keeps its ``replay-of``)."""
        starts = [i for i, (k, _) in enumerate(self.headers) if k == _ERROR_HEADER]
        return self.headers[:starts[-1]] if starts else list(self.headers)


@dataclass
class Selection:
    """Which dead letters a replay takes (every one, by default)."""

    stages: set[str] = field(default_factory=set)
    error_types: set[str] = field(default_factory=set)
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> [from, to]
    since_ms: int | None = None
    until_ms: int | None = None

    def __call__(self, d: DeadLetter) -> bool:
        if self.stages and d.stage not in self.stages:
            return False
        if self.error_types and d.error_type not in self.error_types:
            return False
        if self.offsets and not (d.partition in self.offsets and
                                 self.offsets[d.partition][0] <= d.offset <=
                                 self.offsets[d.partition][1]):
            return False
        if self.since_ms is not None and d.timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or d.timestamp_ms <= self.until_ms


def read(kafka: dict, topic: str, since_ms: int | None = None) -> Iterator[DeadLetter]:
    """Every message of ``topic`` (from ``since_ms``, else from the beginning) to its end."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    consumer = Consumer({**kafka, "group.id": "mlflow-preproc-dlq-reader",
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "isolation.level": "read_committed"})
    try:
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            raise DeadLetterError(f"cannot reach Kafka at {kafka.get('bootstrap.servers')} "
                                  f"({exc.args[0].str()}); check --bootstrap-servers") from None
        if meta is None or meta.error is not None or not meta.partitions:
            raise DeadLetterError(f"topic {topic} does not exist on "
                                  f"{kafka.get('bootstrap.servers')}; a stream's dead-letter "
                                  "topic is INPUT_TOPIC-dlq unless DLQ_TOPIC names another")
        partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
        if since_ms is not None:
            partitions = consumer.offsets_for_times(
                [TopicPartition(topic, p.partition, since_ms) for p in partitions], timeout=10)
        consumer.assign(partitions)
        last = time.monotonic()
        while time.monotonic() - last < _IDLE_S:
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is not None:
                    continue
                last = time.monotonic()
                yield DeadLetter(msg.partition(), msg.offset(), msg.timestamp()[1], msg.key(),
                                 msg.value(), list(msg.headers() or []))
    finally:
        consumer.close()


@dataclass
class Summary:
    """What ``inspect`` prints: counts by stage and error type, the first examples of each."""

    topic: str
    examples_per_kind: int = 3
    total: int = 0
    kinds: dict[tuple[str, str], int] = field(default_factory=dict)
    examples: dict[tuple[str, str], list[DeadLetter]] = field(default_factory=dict)
    first_ms: int | None = None
    last_ms: int | None = None

    def add(self, d: DeadLetter) -> None:
        self.total += 1
        kind = (d.stage, d.error_type)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.examples_per_kind:
            shown.append(d)
        self.first_ms = d.timestamp_ms if self.first_ms is None else min(self.first_ms,
                                                                         d.timestamp_ms)
        self.last_ms = d.timestamp_ms if self.last_ms is None else max(self.last_ms,
                                                                       d.timestamp_ms)

    def as_json(self) -> dict:
        return {"topic": self.topic, "dead_letters": self.total,
                "first": _iso(self.first_ms), "last": _iso(self.last_ms),
                "kinds": [{"stage": s, "error_type": t, "count": n,
                           "examples": [_example(d) for d in self.examples[(s, t)]]}
                          for (s, t), n in self._by_count()]}

    def as_text(self) -> str:
        if not self.total:
            return f"{self.topic}: no dead letters"
        lines = [f"{self.topic}: {_count(self.total)}, {_iso(self.first_ms)} to "
                 f"{_iso(self.last_ms)}", "", f"{'count':>8}  {'stage':<10}  error type"]
        lines += [f"{n:>8}  {s:<10}  {t}" for (s, t), n in self._by_count()]
        for (s, t), _ in self._by_count():
            lines += ["", f"first {s}/{t}:"]
            for d in self.examples[(s, t)]:
                source = "/".join(map(str, d.source)) if d.source else "?"
                lines.append(f"  dlq {d.where}  from {source}  {_short(d.error)}")
        return "\n".join(lines)

    def _by_count(self) -> list[tuple[tuple[str, str], int]]:
        return sorted(self.kinds.items(), key=lambda kv: (-kv[1], kv[0]))


def inspect(kafka: dict, topic: str, since_ms: int | None = None,
            examples: int = 3) -> Summary:
    """Read ``topic`` and sum it up; commits nothing."""
    summary = Summary(topic, examples)
    for d in read(kafka, topic, since_ms):
        summary.add(d)
    return summary


@dataclass
class ReplayReport:
    """What a replay did (or, dry, would do)."""

    replayed: int = 0
    already: int = 0  # replayed before, refused (no --force)
    unknown_source: int = 0  # no x-preproc-source and no --to: nowhere to send them
    destinations: dict[str, int] = field(default_factory=dict)

    def as_text(self, dry_run: bool) -> str:
        verb = "would replay" if dry_run else "replayed"
        where = ", ".join(f"{n} to {t}" for t, n in sorted(self.destinations.items()))
        text = f"{verb} {_count(self.replayed)}" + (f" ({where})" if where else "")
        if self.already:
            text += (f"; {self.already} were replayed before and were skipped (--force "
                     "replays them again)")
        if self.unknown_source:
            text += (f"; {self.unknown_source} name no source topic and were skipped "
                     "(--to TOPIC sends them there)")
        return text


def replay(kafka: dict, topic: str, select: Callable[[DeadLetter], bool], to: str | None = None,
           force: bool = False, dry_run: bool = False) -> ReplayReport:
    """Send the dead letters of ``topic`` that ``select`` takes back to their source topic
    (or ``to``), recording each in ``<topic>-replayed`` in the same transaction."""
    log_topic = f"{topic}-replayed"
    done = set() if force else _replayed(kafka, log_topic)
    chosen, report = [], ReplayReport()
    for d in read(kafka, topic):
        if not select(d):
            continue
        destination = to or (d.source[0] if d.source else None)
        if destination is None:
            report.unknown_source += 1
        elif d.where in done:
            report.already += 1
        else:
            chosen.append((d, destination))
            report.replayed += 1
            report.destinations[destination] = report.destinations.get(destination, 0) + 1
    if chosen and not dry_run:
        _check_destinations(kafka, {t for _, t in chosen})
        _ensure_topic(kafka, log_topic)
        _send(kafka, topic, log_topic, chosen)
    return report


def _replayed(kafka: dict, log_topic: str) -> set[str]:
    try:
        return {d.key.decode() for d in read(kafka, log_topic) if d.key}
    except DeadLetterError:  # no replay yet: no log
        return set()


def _send(kafka: dict, topic: str, log_topic: str,
          chosen: list[tuple[DeadLetter, str]]) -> None:
    from confluent_kafka import KafkaException, Producer

    producer = Producer({**kafka, "transactional.id": f"mlflow-preproc-replay-{topic}",
                         "enable.idempotence": True})
    try:
        producer.init_transactions(30)
        for start in range(0, len(chosen), _TRANSACTION_SIZE):
            producer.begin_transaction()
            for d, destination in chosen[start:start + _TRANSACTION_SIZE]:
                producer.produce(destination, d.value, d.key, headers=[
                    *d.original_headers(), (REPLAY_HEADER, f"{topic}/{d.where}".encode())])
                producer.produce(log_topic, json.dumps(
                    {"to": destination, "at": _iso(int(time.time() * 1000))}).encode(),
                    d.where.encode())
                producer.poll(0)
            producer.commit_transaction(60)
    except KafkaException as exc:
        raise DeadLetterError(f"the replay did not complete ({exc.args[0].str()}); what was "
                              "not committed is not recorded as replayed: run it again") from None


def _check_destinations(kafka: dict, topics: set[str]) -> None:
    from confluent_kafka.admin import AdminClient

    existing = AdminClient(kafka).list_topics(timeout=10).topics
    missing = sorted(t for t in topics if t not in existing)
    if missing:
        raise DeadLetterError(f"topic(s) {', '.join(missing)} do not exist; create them or "
                              "pass --to TOPIC")


def _ensure_topic(kafka: dict, topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(kafka)
    if topic in admin.list_topics(timeout=10).topics:
        return
    for future in admin.create_topics([NewTopic(topic, 1)]).values():
        try:
            future.result(15)
        except Exception as exc:  # noqa: BLE001 -- created meanwhile is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise DeadLetterError(f"cannot create the replay log {topic}: {exc}") from None


def _example(d: DeadLetter) -> dict:
    source = d.source
    return {"dlq_partition": d.partition, "dlq_offset": d.offset,
            "source": None if source is None else
            {"topic": source[0], "partition": source[1], "offset": source[2]},
            "error": d.error, "key": None if d.key is None else d.key.decode(errors="replace")}


def _count(n: int) -> str:
    return f"{n} dead letter{'' if n == 1 else 's'}"


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))

"""Dead letters as a workflow: read a dead-letter topic, sum it up, send chosen ones back.

    mlflow-preproc dlq inspect raw-dlq                      # counts by stage and error type
    mlflow-preproc dlq replay raw-dlq --stage preprocess    # back to the topic they came from
    mlflow-preproc dlq replay raw-dlq --through models:/p/2 # the fixed model's outputs

A dead letter is the input's original key, value and headers, then the stream's own headers:
``x-preproc-error``, ``-error-type``, ``-stage``, ``-source`` (``topic/partition/offset`` of the
input) and the model's provenance. Reading never joins a group and never commits: it assigns
every partition and reads to the end.

Replaying sends a dead letter's key, value and original headers (the stream's removed) to its
source topic, or ``to``, with ``x-preproc-replay-of: <dlq topic>/<partition>/<offset>``; or,
through a model version (:mod:`~mlflow_preproc.streaming.reprocess`), that model's outputs of
it to the model's output topic, with the same header. Each
replay is recorded in ``<dlq topic>-replayed`` (keyed by the dead letter), in the same Kafka
transaction as the replayed records: both are committed or neither, so a replay that dies
midway is simply run again, and a dead letter already replayed is refused unless forced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from mlflow_preproc.streaming import headers as contract
from mlflow_preproc.streaming.no_broker import cannot_reach

_STALLED_S = 60.0  # no message and no end of partition for this long: Kafka is not answering
_TRANSACTION_SIZE = 500


class DeadLetterError(RuntimeError):
    """A dead-letter command cannot go on; the message says why and what to change."""


class TopicMissing(DeadLetterError):
    """The topic does not exist (for the replay log: nothing was replayed yet)."""


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
        """The last value of the header ``name`` (a name of
        :mod:`~mlflow_preproc.streaming.headers`), or None."""
        found = [v for k, v in self.headers if k == name]
        return found[-1].decode(errors="replace") if found else None

    @property
    def stage(self) -> str:
        return self.header(contract.STAGE) or "?"

    @property
    def error_type(self) -> str:
        return self.header(contract.ERROR_TYPE) or "?"

    @property
    def error(self) -> str:
        return self.header(contract.ERROR) or ""

    @property
    def source(self) -> tuple[str, int, int] | None:
        """The input's topic, partition and offset (``x-preproc-source``)."""
        return contract.parse_source(self.header(contract.SOURCE))

    @property
    def truncated(self) -> bool:
        """Cut to fit the dead-letter topic: its value is a prefix of the record's."""
        return self.header(contract.ORIGINAL_SIZE) is not None

    def original_headers(self) -> list[tuple[str, bytes]]:
        """The input's own headers: those before the stream's (which start at the last
        ``x-preproc-error``; an input replayed before keeps its ``replay-of``)."""
        starts = [i for i, (k, _) in enumerate(self.headers) if k == contract.ERROR]
        return self.headers[:starts[-1]] if starts else list(self.headers)


@dataclass
class Selection:
    """Which dead letters a replay takes (every one, by default)."""

    stages: set[str] = field(default_factory=set)
    error_types: set[str] = field(default_factory=set)
    offsets: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # partition -> ranges
    since_ms: int | None = None
    until_ms: int | None = None

    def __call__(self, d: DeadLetter) -> bool:
        if self.stages and d.stage not in self.stages:
            return False
        if self.error_types and d.error_type not in self.error_types:
            return False
        if self.offsets and not any(first <= d.offset <= last
                                    for first, last in self.offsets.get(d.partition, ())):
            return False
        if self.since_ms is not None and d.timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or d.timestamp_ms <= self.until_ms


def read(kafka: dict, topic: str, since_ms: int | None = None) -> Iterator[DeadLetter]:
    """Every message of ``topic`` (from ``since_ms``, else from the beginning) up to its end.

    A partition ends where the broker says it ends (librdkafka's partition EOF, at the last
    committed offset), never after a quiet spell: a broker that stops answering is waited for
    up to a minute, then DeadLetterError. (Not from watermarks: Tansu's high marks are off.)
    """
    from confluent_kafka import (OFFSET_BEGINNING, Consumer, KafkaError, KafkaException,
                                 TopicPartition)

    consumer = Consumer({**kafka, "group.id": "mlflow-preproc-dlq-reader",
                         "enable.auto.commit": False, "enable.auto.offset.store": False,
                         "enable.partition.eof": True, "isolation.level": "read_committed"})
    servers = kafka.get("bootstrap.servers")
    try:
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise TopicMissing(f"topic {topic} does not exist on {servers}; a stream's "
                                   "dead-letter topic is INPUT_TOPIC-dlq unless DLQ_TOPIC "
                                   "names another")
            partitions = [TopicPartition(topic, p, OFFSET_BEGINNING)
                          for p in sorted(meta.partitions)]
            if since_ms is not None:
                partitions = consumer.offsets_for_times(
                    [TopicPartition(topic, p.partition, since_ms) for p in partitions],
                    timeout=10)
        except KafkaException as exc:
            raise DeadLetterError(cannot_reach(servers, exc.args[0].str())) from None
        consumer.assign(partitions)
        unfinished = {p.partition for p in partitions}
        heard = time.monotonic()
        while unfinished:
            for msg in consumer.consume(1000, 0.5):
                error = msg.error()
                if error is None:
                    heard = time.monotonic()
                    # offsets_for_times past the end starts at the last batch
                    if since_ms is None or msg.timestamp()[1] >= since_ms:
                        yield DeadLetter(msg.partition(), msg.offset(), msg.timestamp()[1],
                                         msg.key(), msg.value(), list(msg.headers() or []))
                elif error.code() == KafkaError._PARTITION_EOF:
                    heard = time.monotonic()
                    unfinished.discard(msg.partition())
                elif error.fatal() or error.code() in _refusals():
                    raise DeadLetterError(f"cannot read {topic} from {servers} "
                                          f"({error.str()})")
                # anything else (a broker down, a timeout) librdkafka retries: wait for it
            if time.monotonic() - heard > _STALLED_S:
                raise DeadLetterError(f"Kafka at {servers} stopped answering for "
                                      f"{_STALLED_S:.0f}s while {topic} was read; nothing was "
                                      "changed: run the command again when it is back")
    finally:
        consumer.close()


def _refusals() -> frozenset[int]:
    from confluent_kafka import KafkaError

    return frozenset({KafkaError.TOPIC_AUTHORIZATION_FAILED,
                      KafkaError.GROUP_AUTHORIZATION_FAILED,
                      KafkaError.CLUSTER_AUTHORIZATION_FAILED,
                      KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION})


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
    truncated: list[str] = field(default_factory=list)  # sources of dead letters cut to fit
    destinations: dict[str, int] = field(default_factory=dict)  # topic -> records sent
    dropped: int = 0  # through a model: its function returned nothing for them
    failed: dict[str, int] = field(default_factory=dict)  # through a model: "stage/type" -> n
    failed_examples: dict[str, str] = field(default_factory=dict)  # "stage/type" -> an error

    def as_text(self, dry_run: bool) -> str:
        verb = "would replay" if dry_run else "replayed"
        where = ", ".join(f"{n} to {t}" for t, n in sorted(self.destinations.items()))
        text = f"{verb} {_count(self.replayed)}" + (f" ({where})" if where else "")
        if self.dropped:
            text += f"; the model dropped {self.dropped} of them (no output)"
        if self.failed:
            kinds = ", ".join(f"{kind}: {n} ({_short(self.failed_examples[kind])})"
                              for kind, n in sorted(self.failed.items()))
            text += (f"; {_count(sum(self.failed.values()))} failed again through the model "
                     f"and stay in the dead-letter topic ({kinds})")
        if self.already:
            text += (f"; {self.already} were replayed before and were skipped (--force "
                     "replays them again)")
        if self.unknown_source:
            text += (f"; {self.unknown_source} name no source topic and were skipped "
                     "(--to TOPIC sends them there)")
        if self.truncated:
            shown = ", ".join(self.truncated[:3]) + (", ..." if len(self.truncated) > 3 else "")
            text += (f"; {len(self.truncated)} were cut to fit the dead-letter topic and were "
                     f"skipped (the whole records are at their source: {shown})")
        return text


class ThroughModel(Protocol):
    """A model the dead letters go through (:class:`~mlflow_preproc.streaming.reprocess.
    Reprocessor`): each dead letter's outputs, or the stage and error it fails at again."""

    output_topic: str

    def run_through(self, letters: list[DeadLetter]) -> list: ...


# One dead letter's records to send: (topic, value, headers) each.
Sends = list[tuple[str, bytes | None, list[tuple[str, bytes]]]]


def replay(kafka: dict, topic: str, select: Selection, to: str | None = None,
           force: bool = False, dry_run: bool = False,
           through: ThroughModel | None = None) -> ReplayReport:
    """Send the dead letters of ``topic`` that ``select`` takes back to their source topic
    (or ``to``), or, ``through`` a model, its outputs of them to its output topic; each
    replayed dead letter is recorded in ``<topic>-replayed`` in the same transaction.

    The transactional producer starts before the log is read: a replay of the same topic
    running meanwhile is fenced off by Kafka and fails, so no dead letter is sent twice.
    Dead letters are read, run through the model and sent :data:`_TRANSACTION_SIZE` at a
    time, so a replay holds one transaction's worth of them, whatever the topic's size.
    """
    if through is not None and to is not None:
        raise DeadLetterError("through a model, the records go to its output topic: set "
                              "OUTPUT_TOPIC (--output-topic) instead of --to")
    log_topic = f"{topic}-replayed"
    report = ReplayReport()
    with (_NoSender() if dry_run else _Sender(kafka, topic, log_topic)) as sender:
        done = set() if force else _replayed(kafka, log_topic)
        batch: list[DeadLetter] = []
        for d in read(kafka, topic, select.since_ms):
            if not select(d):
                continue
            if through is None and not (to or d.source):
                report.unknown_source += 1
            elif d.where in done:
                report.already += 1
            elif d.truncated:
                report.truncated.append("/".join(map(str, d.source or ())) or d.where)
            else:
                batch.append(d)
            if len(batch) == _TRANSACTION_SIZE:
                sender.send(_records(batch, topic, to, through, report))
                batch = []
        if batch:
            sender.send(_records(batch, topic, to, through, report))
    return report


def _records(batch: list[DeadLetter], topic: str, to: str | None,
             through: ThroughModel | None, report: ReplayReport) -> list[tuple[DeadLetter, Sends]]:
    """What each dead letter of ``batch`` replays as, counted in ``report``: itself, back to
    its source (or ``to``), or the model's outputs of it; none for one that fails again."""
    replay_of = lambda d: (contract.REPLAY_OF, f"{topic}/{d.where}".encode())  # noqa: E731
    if through is None:
        chosen = [(d, [(to or d.source[0], d.value, [*d.original_headers(), replay_of(d)])])
                  for d in batch]
    else:
        chosen = []
        for outcome in through.run_through(batch):
            d = outcome.letter
            if outcome.failure is not None:
                stage, error_type, reason = outcome.failure
                kind = f"{stage}/{error_type}"
                report.failed[kind] = report.failed.get(kind, 0) + 1
                report.failed_examples.setdefault(kind, reason)
                continue
            report.dropped += not outcome.outputs
            chosen.append((d, [(through.output_topic, value, [*headers, replay_of(d)])
                               for value, headers in outcome.outputs]))
    for _, sends in chosen:
        report.replayed += 1
        for destination, _, _ in sends:
            report.destinations[destination] = report.destinations.get(destination, 0) + 1
    return chosen


def _replayed(kafka: dict, log_topic: str) -> set[str]:
    try:
        return {d.key.decode(errors="replace") for d in read(kafka, log_topic) if d.key}
    except TopicMissing:  # no replay yet: no log (any other failure stops the replay)
        return set()


class _NoSender:
    """A dry run's sender: sends nothing."""

    def __enter__(self) -> _NoSender:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send(self, chosen: list[tuple[DeadLetter, Sends]]) -> None:
        pass


class _Sender:
    """The replay's transactional producer: each batch of replayed records and their log
    entries is committed together, or aborted together (so an open transaction never holds
    back the readers of the destination)."""

    def __init__(self, kafka: dict, topic: str, log_topic: str):
        self._kafka, self._topic, self._log_topic = kafka, topic, log_topic
        self._producer = None
        self._checked: set[str] = set()  # destinations known to exist
        self._sent = 0  # dead letters replayed and committed

    def __enter__(self) -> _Sender:
        from confluent_kafka import KafkaException, Producer
        from confluent_kafka.admin import AdminClient

        # Said in 10 s when no broker answers (init_transactions would time out after 30 s
        # and blame the transaction).
        _topics(AdminClient(self._kafka), self._kafka)
        self._producer = Producer({**self._kafka,
                                   "transactional.id": f"mlflow-preproc-replay-{self._topic}",
                                   "enable.idempotence": True})
        try:
            self._producer.init_transactions(30)
        except KafkaException as exc:
            raise DeadLetterError(f"cannot start the replay's transaction "
                                  f"({exc.args[0].str()}); nothing was replayed") from None
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send(self, chosen: list[tuple[DeadLetter, Sends]]) -> None:
        """One transaction: the records of ``chosen`` and a log entry for each dead letter
        (one whose model output is nothing is logged too: it is dealt with)."""
        from confluent_kafka import KafkaException

        new = {t for _, sends in chosen for t, _, _ in sends} - self._checked
        if new:
            _check_destinations(self._kafka, new, self._sent)
            self._checked |= new
        if not self._sent:
            _ensure_topic(self._kafka, self._log_topic)
        producer = self._producer
        producer.begin_transaction()
        try:
            for d, sends in chosen:
                for destination, value, headers in sends:
                    producer.produce(destination, value, d.key, headers=headers)
                producer.produce(self._log_topic, json.dumps(
                    {"to": sorted({t for t, _, _ in sends}), "records": len(sends),
                     "at": _iso(int(time.time() * 1000))}).encode(), d.where.encode())
                producer.poll(0)
            producer.commit_transaction(60)
        except BaseException as exc:
            _abort(producer)
            if not isinstance(exc, KafkaException):
                raise
            raise DeadLetterError(
                f"the replay stopped after {_count(self._sent)} ({exc.args[0].str()}); those "
                "are recorded as replayed, the rest are not: run it again to send the "
                "rest") from None
        self._sent += len(chosen)


def _abort(producer) -> None:
    from confluent_kafka import KafkaException

    try:
        producer.abort_transaction(30)
    except KafkaException:  # fenced or gone: the broker aborts it when the next one starts
        pass


def _check_destinations(kafka: dict, topics: set[str], sent: int) -> None:
    from confluent_kafka.admin import AdminClient

    existing = _topics(AdminClient(kafka), kafka)
    missing = sorted(t for t in topics if t not in existing)
    if missing:
        done = f"{_count(sent)} were replayed before it; " if sent else ""
        raise DeadLetterError(f"topic(s) {', '.join(missing)} do not exist; {done}create "
                              "them or pass --to TOPIC (through a model: --output-topic)")


def _ensure_topic(kafka: dict, topic: str) -> None:
    from confluent_kafka.admin import AdminClient

    from mlflow_preproc.streaming.topics import create_topics

    admin = AdminClient(kafka)
    if topic in _topics(admin, kafka):
        return
    for error in create_topics(admin, [topic], timeout=15).values():
        if error is not None:
            raise DeadLetterError(f"cannot create the replay log {topic}: {error}") from None


def _topics(admin, kafka: dict) -> dict:
    from confluent_kafka import KafkaException

    try:
        return admin.list_topics(timeout=10).topics
    except KafkaException as exc:
        raise DeadLetterError(f"{cannot_reach(kafka.get('bootstrap.servers'), exc.args[0].str())}"
                              "; what was not sent is not recorded as replayed: run it "
                              "again") from None


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

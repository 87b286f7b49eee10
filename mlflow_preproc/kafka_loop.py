"""The consume -> handle -> produce -> commit machinery shared by ``stream`` and ``bridge``.

Guarantees, whatever the handler does with a batch:

- at-least-once: an input offset is committed only after every output produced for it (or its
  dead-letter copy) is acknowledged by the broker (:mod:`mlflow_preproc.offsets`); a crash at
  any moment loses nothing, it only reprocesses what was not committed;
- a record that cannot be handled goes to the dead-letter topic with the original bytes, the
  error and the stage in headers, and the stream goes on;
- on a rebalance, finished work of revoked partitions is flushed and committed first;
- SIGTERM/SIGINT finish the batch in flight, flush, commit and close within
  ``SHUTDOWN_TIMEOUT_S``;
- broker outages are retried by librdkafka, with backoff on our side while no broker answers;
  unrecoverable conditions raise :class:`FatalError` with a message naming the fix.
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
import time
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from mlflow_preproc.config import Config
from mlflow_preproc.formats import DecodeError, MessageDecoder, drop_fields
from mlflow_preproc.metrics import LoopStats, serve_metrics
from mlflow_preproc.model_identity import HEADER
from mlflow_preproc.offsets import OffsetTracker

logger = logging.getLogger("mlflow_preproc")

_MAX_ERROR_HEADER = 4000
_STARTUP_WAIT_S = 60.0


class FatalError(RuntimeError):
    """The loop cannot go on; the message says why and what to change."""


Headers = list[tuple[str, bytes]]


def source_headers(msg: Message) -> Headers:
    """Provenance headers naming the input record an output came from."""
    return [(HEADER + "source-topic", msg.topic().encode()),
            (HEADER + "source-partition", str(msg.partition()).encode()),
            (HEADER + "source-offset", str(msg.offset()).encode())]


class KafkaLoop:
    """Consumes ``input_topic`` in a group and hands batches to :meth:`handle_batch`."""

    command = "loop"

    def __init__(self, config: Config, input_topic: str, output_topic: str,
                 dlq_topic: str | None = None, group_id: str | None = None,
                 extra_headers: Headers | None = None):
        self.config = config
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic or f"{input_topic}-dlq"
        self.group_id = group_id or f"mlflow-preproc-{self.command}"
        self.extra_headers = extra_headers or []
        self.stats = LoopStats(self.command)
        self.tracker = OffsetTracker()
        self._stopping = False
        self._fatal: FatalError | None = None
        self._backoff = 0.0
        kafka = dict(config.kafka)
        self.consumer = Consumer({
            **kafka,
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": config["AUTO_OFFSET_RESET"],
            "statistics.interval.ms": 5000 if config["METRICS_PORT"] else 0,
            "stats_cb": self.stats.on_librdkafka_stats,
            "error_cb": self._on_client_error,
            "on_commit": self._on_commit,
        })
        self.producer = Producer({
            # Idempotence keeps retried sends from duplicating or reordering outputs.
            "enable.idempotence": True,
            "linger.ms": 5,
            **kafka,
            "error_cb": self._on_client_error,
        })
        self._metrics_server = None

    # ---- what subclasses implement -------------------------------------------------------

    def handle_batch(self, messages: Sequence[Message]) -> None:
        """Turn input messages into :meth:`produce` and :meth:`dead_letter` calls."""
        raise NotImplementedError

    # ---- inputs and outputs ----------------------------------------------------------------

    def decode(self, messages: Sequence[Message], decoder: MessageDecoder,
               fields_to_drop: Sequence[str] = ()) -> tuple[list[dict], list[Message]]:
        """Records of ``messages`` and the message each came from (an Avro container may
        hold several); undecodable messages go to the dead-letter topic."""
        records, owners = [], []
        for msg in messages:
            try:
                decoded = decoder.decode(msg.value())
            except DecodeError as exc:
                self.dead_letter(msg, "decode", exc)
                continue
            for record in decoded:
                records.append(drop_fields(record, fields_to_drop) if fields_to_drop else record)
                owners.append(msg)
        return records, owners

    def produce(self, source: Message, value: bytes, headers: Headers) -> None:
        """Send one output of ``source``; its offset commits once the broker acknowledges."""
        tp = (source.topic(), source.partition())
        self.tracker.add_output(tp, source.offset())
        self._send(self.output_topic, value, source.key(), headers,
                   functools.partial(self._on_output_delivery, source))

    def dead_letter(self, source: Message, stage: str, error: BaseException | str) -> None:
        """Send ``source``'s original bytes to the dead-letter topic with the reason."""
        reason = str(error)[:_MAX_ERROR_HEADER]
        self.stats.counts["failed"] += 1
        logger.warning("record sent to the dead-letter topic", extra={
            "event": "dead_letter", "stage": stage, "error": reason, "topic": source.topic(),
            "partition": source.partition(), "offset": source.offset(),
            "dlq_topic": self.dlq_topic})
        headers = [*(source.headers() or []),
                   (HEADER + "error", reason.encode()),
                   (HEADER + "error-type", _error_type(error).encode()),
                   (HEADER + "stage", stage.encode()),
                   *source_headers(source), *self.extra_headers]
        self.tracker.add_output((source.topic(), source.partition()), source.offset())
        self._send(self.dlq_topic, source.value(), source.key(), headers,
                   functools.partial(self._on_dead_letter_delivery, source))

    def _send(self, topic, value, key, headers, callback) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=callback)
                return
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self.producer.poll(0.1)

    def _on_output_delivery(self, source: Message, err: KafkaError | None, _msg) -> None:
        tp = (source.topic(), source.partition())
        if err is None:
            self.tracker.acknowledged(tp, source.offset())
            return
        # The output cannot be written (too large, not authorised...): keep the input instead.
        self.dead_letter(source, "produce", f"producing to {self.output_topic} failed: {err.str()}")
        self.stats.counts["out"] -= 1
        self.tracker.acknowledged(tp, source.offset())

    def _on_dead_letter_delivery(self, source: Message, err: KafkaError | None, _msg) -> None:
        if err is None:
            self.tracker.acknowledged((source.topic(), source.partition()), source.offset())
            return
        # Committing past this record would lose it: stop, so a restart retries it.
        self._fatal = FatalError(
            f"cannot write to the dead-letter topic {self.dlq_topic} ({err.str()}); record "
            f"{source.topic()}/{source.partition()}/{source.offset()} stays uncommitted; check "
            "that the topic exists and this client may write to it")

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped (SIGTERM/SIGINT or :meth:`stop`); raise FatalError on failure."""
        self._install_signal_handlers()
        self._check_topics()
        if self.config["METRICS_PORT"]:
            self._metrics_server = serve_metrics(self.stats, self.config["METRICS_HOST"],
                                                 self.config["METRICS_PORT"],
                                                 self.config["HEALTH_STALL_S"])
        self.consumer.subscribe([self.input_topic], on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        logger.info("consuming", extra={"event": "start", "command": self.command,
                                        "input_topic": self.input_topic,
                                        "output_topic": self.output_topic,
                                        "dlq_topic": self.dlq_topic, "group_id": self.group_id})
        batch_size = self.config["BATCH_SIZE"]
        timeout = self.config["BATCH_TIMEOUT_MS"] / 1000
        # MLflow leaves ~160k long-lived objects; full collections over them stalled the loop
        # for 100-300 ms twice per 50k records (benchmarks/stream_throughput.py: +27%).
        gc.collect()
        gc.freeze()
        try:
            while not self._stopping:
                messages = self._consume(batch_size, timeout)
                if messages:
                    started = time.monotonic()
                    self.handle_batch(messages)
                    self.stats.batch_done(time.monotonic() - started)
                else:
                    self.stats.alive()
                self.producer.poll(0)
                self._raise_if_fatal()
                self._commit(asynchronous=True)
                self.stats.maybe_log(self.config["STATS_INTERVAL_S"],
                                     in_flight=self.tracker.in_flight())
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return."""
        self._stopping = True

    def _consume(self, batch_size: int, timeout: float) -> list[Message]:
        good = []
        for msg in self.consumer.consume(batch_size, timeout):
            err = msg.error()
            if err is None:
                self.tracker.consumed((msg.topic(), msg.partition()), msg.offset())
                good.append(msg)
            elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise FatalError(f"input topic {self.input_topic} does not exist on "
                                 f"{self.config['KAFKA_BOOTSTRAP_SERVERS']}; create it or fix "
                                 "INPUT_TOPIC")
            elif err.fatal():
                raise FatalError(f"Kafka consumer failed: {err.str()}")
            elif err.code() != KafkaError._PARTITION_EOF:
                logger.warning("consume error", extra={"event": "kafka_error",
                                                       "error": err.str()})
        self.stats.counts["in"] += len(good)
        if good:
            self._backoff = 0.0
        elif self._backoff:
            time.sleep(self._backoff)
        return good

    def _commit(self, asynchronous: bool, partitions: list[tuple[str, int]] | None = None) -> None:
        points = self.tracker.commit_points()
        if partitions is not None:
            points = {tp: o for tp, o in points.items() if tp in partitions}
        if not points:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in points.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
            self.tracker.mark_committed(points)
        except KafkaException as exc:
            # Not fatal: the offsets stay uncommitted and are retried with the next commit.
            logger.warning("commit failed", extra={"event": "commit_failed", "error": str(exc)})

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            logger.warning("commit failed", extra={"event": "commit_failed", "error": err.str()})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(p.topic, p.partition) for p in partitions]
        # Everything consumed from these partitions was handled; wait for the broker's acks
        # and commit, so the next owner starts right after our last output.
        self.producer.flush(self.config["SHUTDOWN_TIMEOUT_S"])
        self._commit(asynchronous=False, partitions=revoked)
        self.tracker.forget(revoked)
        logger.info("partitions revoked", extra={"event": "revoke",
                                                 "partitions": [p for _, p in revoked]})

    def _on_client_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = FatalError(f"Kafka client failed: {err.str()}")
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._backoff = min(max(self._backoff * 2, 0.2), 5.0)
            logger.warning("no broker answers; retrying", extra={
                "event": "brokers_down", "retry_in_s": self._backoff,
                "bootstrap_servers": self.config["KAFKA_BOOTSTRAP_SERVERS"]})
        else:
            logger.warning("kafka client error", extra={"event": "kafka_error",
                                                        "error": err.str()})

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _shutdown(self) -> None:
        left = self.producer.flush(self.config["SHUTDOWN_TIMEOUT_S"])
        if self._fatal is None:
            self._commit(asynchronous=False)
        if left:
            logger.warning("outputs not acknowledged at shutdown; their inputs stay "
                           "uncommitted and will be reprocessed", extra={
                               "event": "shutdown_unacked", "outputs": left})
        try:
            self.consumer.close()
        except RuntimeError:
            pass  # already closed
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        logger.info("stopped", extra={"event": "stop", "command": self.command,
                                      **self.stats.counts})

    def _install_signal_handlers(self) -> None:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        except ValueError:
            pass  # not the main thread: the embedding application handles signals

    def _check_topics(self) -> None:
        metadata = self._wait_for_metadata()
        if self.input_topic not in metadata.topics:
            raise FatalError(f"input topic {self.input_topic} does not exist on "
                             f"{self.config['KAFKA_BOOTSTRAP_SERVERS']}; create it or fix "
                             "INPUT_TOPIC")
        missing = [t for t in (self.output_topic, self.dlq_topic) if t not in metadata.topics]
        if not missing:
            return
        if not self.config["AUTO_CREATE_TOPICS"]:
            raise FatalError(f"topic(s) {', '.join(missing)} do not exist and "
                             "AUTO_CREATE_TOPICS is false; create them or set "
                             "AUTO_CREATE_TOPICS=true")
        partitions = len(metadata.topics[self.input_topic].partitions)
        admin = AdminClient(dict(self.config.kafka))
        for topic, future in admin.create_topics(
                [NewTopic(t, partitions, 1) for t in missing]).items():
            try:
                future.result(30)
                logger.info("created topic", extra={"event": "create_topic", "topic": topic,
                                                    "partitions": partitions})
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise FatalError(f"cannot create topic {topic}: {exc.args[0].str()}; "
                                     "create it yourself") from None

    def _wait_for_metadata(self):
        deadline = time.monotonic() + _STARTUP_WAIT_S
        delay = 0.5
        while True:
            try:
                return self.consumer.list_topics(timeout=5)
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise FatalError(
                        f"cannot reach Kafka at {self.config['KAFKA_BOOTSTRAP_SERVERS']} "
                        f"({exc.args[0].str()}); check KAFKA_BOOTSTRAP_SERVERS and that the "
                        "broker is up") from None
                logger.warning("waiting for Kafka", extra={"event": "waiting_for_kafka",
                                                           "error": exc.args[0].str()})
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _error_type(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        cause = error.__cause__ or error
        return type(cause).__name__
    return "Error"

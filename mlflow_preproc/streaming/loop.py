"""The consume -> handle -> produce -> commit machinery shared by ``stream`` and ``bridge``.

Guarantees, whatever the handler does with a batch:

- at-least-once: input offsets are committed only after the producer is flushed, that is once
  every output produced so far (or its dead-letter copy) is acknowledged by the broker; a
  crash at any moment loses nothing, it only reprocesses what was not committed (at most
  ``COMMIT_INTERVAL_MS`` of input);
- a record that cannot be handled goes to the dead-letter topic with the original bytes, the
  error and the stage in headers, and the stream goes on;
- on a rebalance, finished work of revoked partitions is flushed and committed first;
- SIGTERM/SIGINT finish the batch in flight, flush, commit and close within
  ``SHUTDOWN_TIMEOUT_S``;
- broker outages are retried by librdkafka, with backoff on our side while no broker answers;
  unrecoverable conditions raise :class:`FatalError` with a message naming the fix.

Why flush-then-commit rather than tracking each output's acknowledgement: the producer only
reports failed deliveries (``delivery.report.only.error``), which spares a Python callback
and a message object per record, about 15% of the loop's time on 1 KB records
(``benchmarks/stream_throughput.py``). A flush every ``COMMIT_INTERVAL_MS`` pauses the loop
for one broker round trip.
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
from mlflow_preproc.runtime.formats import DecodeError, MessageDecoder, drop_fields
from mlflow_preproc.streaming.metrics import LoopStats, serve_metrics
from mlflow_preproc.runtime.model_identity import HEADER

logger = logging.getLogger("mlflow_preproc")

_MAX_ERROR_HEADER = 4000
_STARTUP_WAIT_S = 60.0
# A periodic flush that cannot finish (broker down) gives up after this and commits later.
_COMMIT_FLUSH_TIMEOUT_S = 10.0


class FatalError(RuntimeError):
    """The loop cannot go on; the message says why and what to change."""


Headers = list[tuple[str, bytes]]

SOURCE_HEADER = HEADER + "source"


def source_header(msg: Message) -> tuple[str, bytes]:
    """The provenance header naming the input an output came from: ``topic/partition/offset``
    (Kafka topic names cannot contain ``/``)."""
    return SOURCE_HEADER, f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()


class _OnFailedDelivery:
    """``on_delivery`` of the outputs of one input message; called only when the broker
    refuses one of them (``delivery.report.only.error``), to dead-letter the input."""

    __slots__ = ("loop", "source")

    def __init__(self, loop: KafkaLoop, source: Message):
        self.loop = loop
        self.source = source

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.loop._output_failed(self.source, err)


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
        self._stopping = False
        self._uncommittable = False
        self._fatal: FatalError | None = None
        self._backoff = 0.0
        self._committed: dict[tuple[str, int], int] = {}
        kafka = dict(config.kafka)
        self.consumer = Consumer({
            # librdkafka stops fetching for fetch.queue.backoff.ms (default 1 s) whenever its
            # prefetch queue is full (64 MB: ~64k records of 1 KB); a loop that drains that in
            # under a second then waits on an idle fetcher. 10 ms: +45% on 1 KB records
            # (benchmarks/stream_throughput.py).
            "fetch.queue.backoff.ms": 10,
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
            # Successes are known from flush(); see the module docstring.
            "delivery.report.only.error": True,
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
        decode = decoder.decode
        for msg in messages:
            try:
                decoded = decode(msg.value())
            except DecodeError as exc:
                self.dead_letter(msg, "decode", exc)
                continue
            for record in decoded:
                records.append(drop_fields(record, fields_to_drop) if fields_to_drop else record)
                owners.append(msg)
        return records, owners

    def produce(self, source: Message, values: Sequence[bytes]) -> None:
        """Send the outputs of ``source``, keyed like it, with its headers and the provenance
        headers. An output the client refuses (too large...) sends ``source`` to the
        dead-letter topic instead of the outputs not sent."""
        headers = [*(source.headers() or []), source_header(source), *self.extra_headers]
        on_failure = _OnFailedDelivery(self, source)
        key = source.key()
        sent = 0
        try:
            for value in values:
                self._send(self.output_topic, value, key, headers, on_failure)
                sent += 1
        except KafkaException as exc:
            self.dead_letter(source, "produce", f"cannot produce to {self.output_topic}: "
                                                f"{exc.args[0].str()}")
        self.stats.counts["out"] += sent

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
                   source_header(source), *self.extra_headers]
        try:
            self._send(self.dlq_topic, source.value(), source.key(), headers,
                       functools.partial(self._on_dead_letter_delivery, source))
        except KafkaException as exc:
            self._dead_letter_failed(source, exc.args[0])

    def leave_uncommitted(self) -> None:
        """The batch being handled is given up (shutting down): commit nothing from now on,
        so the group processes it again."""
        self._uncommittable = True

    def _send(self, topic, value, key, headers, callback) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=callback)
                return
            except BufferError:
                # The local queue is full: let the broker catch up.
                self.producer.poll(0.1)

    def _output_failed(self, source: Message, err: KafkaError) -> None:
        # The broker refused an output (too large, not authorised...): keep the input instead.
        self.stats.counts["out"] -= 1
        self.dead_letter(source, "produce", f"producing to {self.output_topic} failed: "
                                            f"{err.str()}")

    def _on_dead_letter_delivery(self, source: Message, err: KafkaError | None,
                                 _msg: Message) -> None:
        if err is not None:
            self._dead_letter_failed(source, err)

    def _dead_letter_failed(self, source: Message, err: KafkaError) -> None:
        # Committing past this record would lose it: stop, so a restart retries it.
        self._uncommittable = True
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
                                on_lost=self._on_lost)
        logger.info("consuming", extra={"event": "start", "command": self.command,
                                        "input_topic": self.input_topic,
                                        "output_topic": self.output_topic,
                                        "dlq_topic": self.dlq_topic, "group_id": self.group_id})
        batch_size = self.config["BATCH_SIZE"]
        timeout = self.config["BATCH_TIMEOUT_MS"] / 1000
        commit_interval = self.config["COMMIT_INTERVAL_MS"] / 1000
        next_commit = time.monotonic() + commit_interval
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
                if time.monotonic() >= next_commit:
                    self._commit(asynchronous=True, flush_timeout=_COMMIT_FLUSH_TIMEOUT_S)
                    self._raise_if_fatal()
                    next_commit = time.monotonic() + commit_interval
                self.stats.maybe_log(self.config["STATS_INTERVAL_S"],
                                     in_flight=len(self.producer))
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return."""
        self._stopping = True

    def _consume(self, batch_size: int, timeout: float) -> list[Message]:
        messages = self.consumer.consume(batch_size, timeout)
        good = [msg for msg in messages if msg.error() is None]
        if len(good) < len(messages):
            self._consume_errors(messages)
        self.stats.counts["in"] += len(good)
        if good:
            self._backoff = 0.0
        elif self._backoff:
            time.sleep(self._backoff)
        return good

    def _consume_errors(self, messages: list[Message]) -> None:
        for err in (msg.error() for msg in messages):
            if err is None or err.code() == KafkaError._PARTITION_EOF:
                continue
            if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise FatalError(f"input topic {self.input_topic} does not exist on "
                                 f"{self.config['KAFKA_BOOTSTRAP_SERVERS']}; create it or fix "
                                 "INPUT_TOPIC")
            if err.fatal():
                raise FatalError(f"Kafka consumer failed: {err.str()}")
            logger.warning("consume error", extra={"event": "kafka_error", "error": err.str()})

    def _commit(self, asynchronous: bool, flush_timeout: float,
                partitions: list[TopicPartition] | None = None) -> None:
        """Flush the producer, then commit the position of every handled input.

        Every batch ``consume()`` returned has been handled when this runs, so the consumer's
        positions (last returned offset + 1) are exactly what the flushed outputs cover.
        """
        left = self.producer.flush(flush_timeout)
        if self._uncommittable:
            return
        if left:
            logger.warning("outputs not acknowledged yet; not committing", extra={
                "event": "commit_deferred", "outputs": left})
            return
        try:
            positions = self.consumer.position(partitions or self.consumer.assignment())
            offsets = [tp for tp in positions if tp.offset >= 0
                       and self._committed.get((tp.topic, tp.partition)) != tp.offset]
            if offsets:
                self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
                self._committed.update(((tp.topic, tp.partition), tp.offset) for tp in offsets)
        except KafkaException as exc:
            # Not fatal: the offsets stay uncommitted and are retried with the next commit.
            logger.warning("commit failed", extra={"event": "commit_failed", "error": str(exc)})

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            logger.warning("commit failed", extra={"event": "commit_failed", "error": err.str()})
            for tp in partitions:  # retried by the next commit
                self._committed.pop((tp.topic, tp.partition), None)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Everything consumed from these partitions was handled; wait for the broker's acks
        # and commit, so the next owner starts right after our last output.
        self._commit(asynchronous=False, flush_timeout=self.config["SHUTDOWN_TIMEOUT_S"],
                     partitions=partitions)
        self._forget(partitions)
        logger.info("partitions revoked", extra={"event": "revoke",
                                                 "partitions": [p.partition for p in partitions]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member owns them already: committing would fail or overwrite its progress.
        self._forget(partitions)
        logger.warning("partitions lost", extra={"event": "lost",
                                                 "partitions": [p.partition for p in partitions]})

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop((tp.topic, tp.partition), None)

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
        if self._fatal is None:
            self._commit(asynchronous=False, flush_timeout=self.config["SHUTDOWN_TIMEOUT_S"])
        left = len(self.producer)
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

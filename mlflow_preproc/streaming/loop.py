"""The consume -> handle -> produce -> commit machinery shared by ``stream`` and ``bridge``.

Guarantees, whatever the handler does with a batch:

- **at least once.** The loop keeps a :class:`~mlflow_preproc.streaming.checkpoint.Checkpoint`:
  per partition, the offset after the last input whose outputs (or dead-letter copy) were all
  handed to the producer. It commits exactly those offsets, and only after the producer
  flushed cleanly with no retriable delivery error outstanding: every ``COMMIT_INTERVAL_MS``,
  before giving up partitions in a rebalance, and on a normal exit. A batch the handler
  abandons, an exception, a crash or a broker outage commit nothing that was not delivered;
  what was not committed is processed again.
- **a poison record never halts a partition.** A record that cannot be decoded, processed,
  encoded or written goes to the dead-letter topic with its original bytes, the stage and the
  error; one larger than the producer may send goes there truncated, with its original size.
- **delivery errors are sorted** (:mod:`~mlflow_preproc.streaming.delivery`): permanent ones
  dead-letter their input; retriable ones (a broker away for longer than
  ``message.timeout.ms``) are sent again while the input partitions are paused and the
  consumer keeps polling, so the group keeps this member; a producer whose idempotence state
  broke is replaced.
- **a dependency that fails is waited for, never dead-lettered** (:meth:`KafkaLoop.when_available`):
  a schema registry or model server that is
  :class:`~mlflow_preproc.runtime.dependencies.Unavailable` is retried with backoff, input
  paused and nothing committed; one that is ``Misconfigured`` stops the loop (exit 2).
- **the dead-letter brake** (:mod:`~mlflow_preproc.streaming.brake`): when most of a window
  of records is dead-lettered, the loop stops committing, pauses and fails ``/healthz``.
- **signals.** SIGTERM/SIGINT, at any moment from start-up on, finish the batch in flight,
  flush, commit and close within ``SHUTDOWN_TIMEOUT_S`` (exit 0).
- **fatal conditions** (unreachable broker at start, a missing topic, a dead-letter topic this
  client may not write to) raise :class:`FatalError` with a message naming the fix; any other
  exception commits nothing either.

Why flush-then-commit rather than tracking each output's acknowledgement: the producer only
reports failed deliveries (``delivery.report.only.error``), which spares a Python callback
and a message object per record, about 15% of the loop's time on 1 KB records
(``benchmarks/stream_throughput.py``). A flush every ``COMMIT_INTERVAL_MS`` pauses the loop
for one broker round trip.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from mlflow_preproc.config import Config
from mlflow_preproc.runtime.dependencies import Misconfigured, Unavailable
from mlflow_preproc.runtime.formats import MessageDecoder, drop_fields
from mlflow_preproc.streaming import clients, topics
from mlflow_preproc.streaming.assignment import Assignment
from mlflow_preproc.streaming.brake import DeadLetterBrake
from mlflow_preproc.streaming.checkpoint import Checkpoint
from mlflow_preproc.streaming.client_logs import client_logger
from mlflow_preproc.streaming.delivery import (
    Delivery,
    Failure,
    Redelivery,
    classify,
    is_size_error,
    topic_refused_fix,
)
from mlflow_preproc.streaming.errors import Abandon, FatalError, Rewound
from mlflow_preproc.streaming.headers import (
    ERROR,
    ERROR_TYPE,
    MAX_ERROR_LENGTH,
    ORIGINAL_SIZE,
    STAGE,
    Headers,
    error_type_of,
    source_header,
)
from mlflow_preproc.streaming.message_size import MessageSize
from mlflow_preproc.streaming.metrics import LoopStats, serve_metrics
from mlflow_preproc.streaming.output import Output
from mlflow_preproc.streaming.shutdown import Shutdown
from mlflow_preproc.streaming.transactions import (
    Remedy,
    TransactionalProducer,
    TransactionError,
    refused_fix,
    transactional_settings,
)

if TYPE_CHECKING:
    from mlflow_preproc.runtime.avro_columns import ColumnReader

logger = logging.getLogger("mlflow_preproc")

# A periodic flush that cannot finish (broker down) gives up after this and commits later.
_COMMIT_FLUSH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 10.0  # leaving the group; see KafkaLoop._leave_group
_MAX_RETRY_BACKOFF_S = 10.0

# The broker refuses this client the input topic, the group or the cluster: an ACL to fix.
_UNAUTHORIZED = (KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED,
                 KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED)


class KafkaLoop:
    """Consumes ``input_topic`` in a group and hands batches to :meth:`handle_batch`.

    ``consumer`` and ``producer`` default to real clients made from ``config``; passing others
    (a test double) is what the fast unit tests of the commit rules do.
    """

    command = "loop"

    def __init__(self, config: Config, input_topic: str, output_topic: str,
                 dlq_topic: str | None = None, group_id: str | None = None,
                 extra_headers: Headers | None = None, shutdown: Shutdown | None = None,
                 consumer: Consumer | None = None, producer: Producer | None = None):
        self.config = config
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic or f"{input_topic}-dlq"
        self.group_id = group_id or f"mlflow-preproc-{self.command}"
        self.extra_headers = extra_headers or []
        self.shutdown = shutdown or Shutdown()
        self.stats = LoopStats(self.command, deployment=config.deployment,
                               revision=config.revision)
        self.checkpoint = Checkpoint()
        self.brake = DeadLetterBrake(config["DLQ_BRAKE_RATIO"], config["DLQ_BRAKE_WINDOW"])
        self.stats.verdict_after = config["DLQ_BRAKE_WINDOW"]
        self._redeliveries: list[Redelivery] = []
        self._fatal: FatalError | None = None
        self._failed = False  # an exception ended the loop: commit nothing, not even on close
        self.exactly_once = config["PROCESSING_GUARANTEE"] == "exactly-once"
        # Exactly once: a batch is in flight, a rewind happened during it (it must be given
        # up); why the open transaction must be aborted is self.output.must_abort.
        self._in_batch = False
        self._rewound_in_batch = False
        self._backoff = 0.0
        self.message_size = MessageSize(config.kafka)
        isolation = clients.isolation(config, self.exactly_once)
        self.consumer = consumer if consumer is not None else clients.new_consumer(
            config, self.group_id, isolation, stats_cb=self.stats.on_librdkafka_stats,
            error_cb=self._on_consumer_error, on_commit=self._on_commit)
        self.output = Output(self._new_producer, producer, self.exactly_once, self.shutdown)
        self.transaction: TransactionalProducer | None = self.output.transaction
        # It looks the producer up when it polls (the producer can be replaced).
        self.assignment = Assignment(self.consumer, lambda: self.output.producer,
                                     self.shutdown)
        self._metrics_server = None

    # ---- what subclasses implement -------------------------------------------------------

    @property
    def producer(self) -> Producer:
        """The producer in use now (:class:`~mlflow_preproc.streaming.output.Output` may
        replace it)."""
        return self.output.producer

    def handle_batch(self, messages: Sequence[Message]) -> None:
        """Turn input messages into :meth:`produce` and :meth:`dead_letter` calls.

        Returning means every message of the batch is handled; raise :class:`Abandon` to give
        the batch up instead.
        """
        raise NotImplementedError

    # ---- inputs and outputs ----------------------------------------------------------------

    def decode(self, messages: Sequence[Message], decoder: MessageDecoder,
               fields_to_drop: Sequence[str] = (), columns: ColumnReader | None = None
               ) -> tuple[list[dict], list[Message]]:
        """Records of ``messages`` and the message each came from (an Avro container may
        hold several); undecodable messages go to the dead-letter topic.

        With ``columns`` (polars-avro installed), the Avro containers of the batch are read
        in one call first, with the same records as a result; the message decoder decodes
        the rest, and judges any that the reader leaves to it."""
        read = columns.records([msg.value() for msg in messages]) if columns else None
        records, owners = [], []
        decode = decoder.decode
        for i, msg in enumerate(messages):
            decoded = read[i] if read else None
            if decoded is not None:  # read without the dropped fields already
                records.extend(decoded)
                owners.extend([msg] * len(decoded))
                continue
            try:
                try:
                    decoded = decode(msg.value())
                except (Unavailable, Misconfigured):
                    # A dependency of the decoder (the schema registry), not the record:
                    # waited for or fatal. Only then through when_available, which costs
                    # ~0.3 µs a record on the common path.
                    decoded = self.when_available(decode, msg.value())
            except (Abandon, FatalError, Rewound):  # the loop's, not the record's
                raise
            except Exception as exc:  # noqa: BLE001 -- whatever the bytes do to a decoder,
                # it is this record's problem, not the partition's
                self.dead_letter(msg, "decode", exc)
                continue
            if fields_to_drop:
                decoded = [drop_fields(record, fields_to_drop) for record in decoded]
            records += decoded
            owners += [msg] * len(decoded)
        return records, owners

    def produce(self, source: Message, values: Sequence[bytes]) -> None:
        """Send the outputs of ``source``, keyed like it, with its headers and the provenance
        headers. An output the client refuses (too large...) sends ``source`` to the
        dead-letter topic instead of the outputs not sent."""
        headers = self.output_headers(source)
        # Delivery reports carry no headers, nor anything else that names the input an
        # output came from: the callback object, one per input message, is what does.
        on_delivery = Delivery(self._delivery_failed, source, headers)
        key = source.key()
        topic = self.output_topic
        producer = self.output.producer
        sent = 0
        try:
            for value in values:
                try:
                    producer.produce(topic, value, key, headers=headers,
                                     on_delivery=on_delivery)
                except BufferError:
                    self.output.send(topic, value, key, headers, on_delivery)
                sent += 1
        except KafkaException as exc:
            err = exc.args[0]
            if classify(err) is Failure.TOPIC_REFUSED:
                self._output_refused(source, topic, err)
                raise self._fatal from None
            self.dead_letter(source, "produce", f"cannot produce to {self.output_topic}: "
                                                f"{err.str()}", err.name())
        self.stats.counts["out"] += sent

    def output_headers(self, source: Message) -> Headers:
        """The headers of ``source``'s outputs: its own, where it came from, the provenance."""
        # This runs for every input message: most have no headers of their own.
        own, provenance = source.headers(), source_header(source)
        return [*own, provenance, *self.extra_headers] if own else \
            [provenance, *self.extra_headers]

    def dead_letter(self, source: Message, stage: str, error: BaseException | str,
                    error_type: str | None = None,
                    extra_headers: Headers = ()) -> None:
        """Send ``source``'s original bytes to the dead-letter topic with the reason."""
        reason = str(error)[:MAX_ERROR_LENGTH]
        error_type = error_type or error_type_of(error)
        if self.stats.dead_letter(stage, error_type):  # the first few in full, then counts
            logger.warning("record sent to the dead-letter topic", extra={
                "event": "dead_letter", "stage": stage, "error_type": error_type,
                "error": reason, "topic": source.topic(), "partition": source.partition(),
                "offset": source.offset(), "dlq_topic": self.dlq_topic})
        headers = [*(source.headers() or []),
                   (ERROR, reason.encode()),
                   (ERROR_TYPE, error_type.encode()),
                   (STAGE, stage.encode()), *extra_headers,
                   source_header(source), *self.extra_headers]
        value = source.value()
        if value is not None and self.message_size.too_large(value, source.key(), headers):
            value, headers = self.message_size.truncated(value, source.key(), headers)
        self._send_dead_letter(source, value, headers)

    def when_available(self, call: Callable, *args):
        """``call(*args)``, waited for while a dependency it needs is
        :class:`~mlflow_preproc.runtime.dependencies.Unavailable`: the one rule by which an
        environment failure never becomes a dead letter. Input is paused while waiting, with
        backoff, so nothing is committed past the record; a shutdown meanwhile raises
        :class:`Abandon`, a :class:`~mlflow_preproc.runtime.dependencies.Misconfigured`
        dependency :class:`FatalError`."""
        delay = 0.5
        while True:
            try:
                return call(*args)
            except Unavailable as exc:
                if self.shutdown.requested:
                    raise Abandon(str(exc)) from None
                delay = max(delay, min(exc.retry_after, _MAX_RETRY_BACKOFF_S))
                # The loop is healthy, its dependency is not: /healthz must not restart us.
                self.stats.alive()
                self.stats.waiting_for = exc.dependency
                self.stats.waiting_why = exc.problem
                logger.warning(f"{exc.dependency} unavailable; retrying", extra={
                    "event": "dependency_unavailable", "dependency": exc.dependency,
                    "error": exc.problem, "retry_in_s": delay})
                if self.transaction is not None:
                    self._commit_before_wait()
                self.wait(delay)
                delay = min(delay * 2, _MAX_RETRY_BACKOFF_S)
            except Misconfigured as exc:
                raise FatalError(str(exc)) from None
            finally:
                self.stats.waiting_for = None

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass taking no new input (a dependency is down): the assigned
        partitions are paused while the consumer is polled, so the group keeps this member
        past ``max.poll.interval.ms`` and rebalances are served. Returns early on shutdown."""
        with self.assignment.input_paused():
            self.assignment.poll_paused(seconds)
        if self._rewound_in_batch:
            raise Rewound  # a rebalance during the wait aborted the transaction

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped (SIGTERM/SIGINT or :meth:`stop`); raise FatalError on failure."""
        self.shutdown.install()
        try:
            self._run()
        except Abandon:
            pass  # what was given up is not in the checkpoint: the group processes it again
        except BaseException:
            self._failed = True
            self._close(commit=False)
            raise
        self._close(commit=True)

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return."""
        self.shutdown.request()

    def _run(self) -> None:
        if not topics.check_topics(self.config, self.consumer, self.shutdown,
                                   self.input_topic, [self.output_topic, self.dlq_topic]):
            return  # stopped while waiting for the broker
        if self.transaction is not None and not self._start_transactions():
            return  # stopped while waiting for the transaction coordinator
        if self.config["METRICS_PORT"]:
            self._metrics_server = serve_metrics(self.stats, self.config["METRICS_HOST"],
                                                 self.config["METRICS_PORT"],
                                                 self.config["HEALTH_STALL_S"])
        self.consumer.subscribe([self.input_topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        # Nothing arrives until the group assigns partitions ("partitions assigned"): a join
        # takes a few seconds, longer when a previous member's session must expire first.
        logger.info(f"joining consumer group {self.group_id}; records flow once partitions "
                    "are assigned", extra={
                        "event": "start", "command": self.command,
                        "input_topic": self.input_topic, "output_topic": self.output_topic,
                        "dlq_topic": self.dlq_topic, "group_id": self.group_id,
                        "processing_guarantee": self.config["PROCESSING_GUARANTEE"]})
        batch_size = self.config["BATCH_SIZE"]
        timeout = self.config["BATCH_TIMEOUT_MS"] / 1000
        commit_interval = self.config["COMMIT_INTERVAL_MS"] / 1000
        next_commit = time.monotonic() + commit_interval
        # MLflow leaves ~160k long-lived objects; full collections over them stalled the loop
        # for 100-300 ms twice per 50k records (benchmarks/stream_throughput.py: +27%).
        gc.collect()
        gc.freeze()
        while not self.shutdown.requested:
            messages = self._consume(batch_size, timeout)
            if messages:
                started = time.monotonic()
                failed_before = self.stats.counts["failed"]
                if self.transaction is None:
                    self.handle_batch(messages)  # an Abandon leaves it out of the checkpoint
                elif not self._handle_in_transaction(messages):
                    continue  # aborted: read again from the last commit
                braking = self.brake.observe(len(messages),
                                             self.stats.counts["failed"] - failed_before)
                if braking:
                    self._hold(braking)  # this batch stays out of the checkpoint
                    break
                self.checkpoint.mark_handled(messages, self.assignment.owned)
                self.stats.handled += len(messages)
                self.stats.batch_done(time.monotonic() - started)
            else:
                self.stats.alive()
            self.producer.poll(0)
            self._raise_if_fatal()
            if self._redeliveries or self.output.broken:
                self._redeliver()
            if time.monotonic() >= next_commit:
                self._commit(asynchronous=True, flush_timeout=_COMMIT_FLUSH_TIMEOUT_S)
                self._raise_if_fatal()
                next_commit = time.monotonic() + commit_interval
            self.stats.in_flight = len(self.producer)
            self.stats.maybe_log(self.config["STATS_INTERVAL_S"], in_flight=self.stats.in_flight)

    def _hold(self, reason: str) -> None:
        """The dead-letter brake engaged: commit nothing from now on, take no input, say why
        on /healthz, until stopped."""
        self._failed = True  # no commit: not on a rebalance, not at shutdown
        if self.transaction is not None:
            self._abort_at_exit()  # nothing of the interval becomes visible
        self.stats.brake = reason
        logger.error("dead-letter brake engaged; input paused, nothing committed", extra={
            "event": "dead_letter_brake", "reason": reason})
        with self.assignment.input_paused():
            while not self.shutdown.requested:
                self.assignment.poll_paused(1.0)

    def _consume(self, batch_size: int, timeout: float) -> list[Message]:
        if self.assignment.unsettled:
            self.assignment.settle()
        messages = self.consumer.consume(batch_size, timeout)
        # Caught up: nothing in hand, and every owned partition read to its end (librdkafka's
        # statistics, METRICS_PORT); an empty poll alone is not (a fetch may be on its way).
        self.stats.caught_up = not messages and self.stats.at_end_of(self.assignment.owned)
        good = [msg for msg in messages if msg.error() is None]
        if len(good) < len(messages):
            self._consume_errors(messages)
        self.stats.counts["in"] += len(good)
        if good:
            self.stats.last_fetch = time.monotonic()
            self._backoff = 0.0
        elif self._backoff:
            self.shutdown.sleep(self._backoff)
        return good

    def _consume_errors(self, messages: list[Message]) -> None:
        for err in (msg.error() for msg in messages):
            if err is None or err.code() == KafkaError._PARTITION_EOF:
                continue
            self._refuse_if_unauthorized(err)
            if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise topics.input_missing(self.input_topic,
                                           self.config["KAFKA_BOOTSTRAP_SERVERS"])
            if err.fatal():
                raise FatalError(f"Kafka consumer failed: {err.str()}")
            logger.warning("consume error", extra={"event": "kafka_error", "error": err.str()})

    # ---- committing --------------------------------------------------------------------------

    def _commit(self, asynchronous: bool, flush_timeout: float,
                partitions: list[tuple[str, int]] | None = None) -> bool:
        """Flush the producer, then commit the checkpoint (of ``partitions``, default all).

        Returns whether everything handled so far is committed (or being committed).
        """
        if self._failed:
            return False
        if self.transaction is not None:
            return self._commit_transaction(flush_timeout)
        left = self.producer.flush(flush_timeout)
        if self._fatal is not None:
            return False  # a dead letter could not be written: its input stays uncommitted
        if left or self._redeliveries or self.output.broken:
            logger.warning("outputs not delivered yet; not committing", extra={
                "event": "commit_deferred", "outputs": left,
                "redeliveries": len(self._redeliveries)})
            return False
        offsets = self.checkpoint.to_commit(partitions)
        if not offsets:
            return True
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            # Not fatal: the offsets stay uncommitted and are retried with the next commit.
            logger.warning("commit failed", extra={"event": "commit_failed", "error": str(exc)})
            return False
        self.checkpoint.committed(offsets)
        self.stats.committed()
        return True

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            self._refuse_if_unauthorized(err, raise_now=False)
            logger.warning("commit failed", extra={"event": "commit_failed", "error": err.str()})
            self.checkpoint.commit_failed(partitions)  # retried by the next commit

    def _refuse_if_unauthorized(self, err: KafkaError, raise_now: bool = True) -> None:
        """An ACL that refuses this client the group or the input topic stops the loop
        naming it: retrying can only spin (and a commit retried for ever never happens)."""
        if err.code() not in _UNAUTHORIZED:
            return
        what = {KafkaError.GROUP_AUTHORIZATION_FAILED: f"the consumer group {self.group_id}",
                KafkaError.TOPIC_AUTHORIZATION_FAILED: f"the input topic {self.input_topic}"}
        fatal = FatalError(f"the broker refuses this client {what.get(err.code(), 'access')} "
                           f"({err.name()}: {err.str()}); grant it read access (ACLs: READ "
                           "on the topic and the group) or fix the credentials; nothing was "
                           "committed past what was delivered")
        if raise_now:
            raise fatal
        self._fatal = self._fatal or fatal

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The assignment takes effect when this returns: it is settled on the next poll.
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self.assignment.assigned(keys)
        self.stats.assigned(keys, self.assignment.owned)
        self.stats.rebalanced("assigned", len(partitions))
        logger.info("partitions assigned", extra={
            "event": "assign", "partitions": [p.partition for p in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Everything handled from these partitions is delivered, then committed, so the next
        # owner starts right after our last output. A batch in flight is not in the checkpoint.
        keys = [(tp.topic, tp.partition) for tp in partitions]
        if self.transaction is not None:
            self._revoke_in_transaction(keys)
        else:
            self._commit(asynchronous=False, flush_timeout=self.config["SHUTDOWN_TIMEOUT_S"],
                         partitions=keys)
        self._give_up(keys)
        if self._in_batch:
            self._rewind()  # exactly once: the batch in flight is given up
        self.stats.rebalanced("revoked", len(keys))
        logger.info("partitions revoked", extra={"event": "revoke",
                                                 "partitions": [p.partition for p in partitions]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member owns them already: committing would fail or overwrite its progress.
        # Exactly once: the open transaction holds their outputs, which the new owner makes
        # again: it is aborted (a zombie's commit would be refused anyway).
        if self.transaction is not None and not self._failed:
            self._abort_and_rewind("partitions lost: another member owns them now")
        self._give_up([(tp.topic, tp.partition) for tp in partitions])
        self.stats.rebalanced("lost", len(partitions))
        logger.warning("partitions lost", extra={"event": "lost",
                                                 "partitions": [p.partition for p in partitions]})

    def _give_up(self, keys: list[tuple[str, int]]) -> None:
        self.assignment.given_up(keys)
        self.checkpoint.forget(keys)
        self.stats.assigned([], self.assignment.owned)

    # ---- exactly once: the checkpoint as a transaction (streaming/transactions.py) ------------

    def _start_transactions(self) -> bool:
        """Register the transactional producer with its coordinator; False if stopped."""
        deadline = time.monotonic() + topics.STARTUP_WAIT_S
        while not self.shutdown.requested:
            try:
                self.transaction.start(_COMMIT_FLUSH_TIMEOUT_S)
                return True
            except TransactionError as exc:
                if exc.remedy is not Remedy.RETRY:
                    raise FatalError(f"cannot start the transactional producer ({exc}); "
                                     f"{refused_fix(exc.error)}") from None
                if time.monotonic() > deadline:
                    raise FatalError(f"no transaction coordinator answered within "
                                     f"{topics.STARTUP_WAIT_S:.0f} s ({exc}); exactly-once needs "
                                     "Apache Kafka 2.5+ with transactions (its "
                                     "__transaction_state topic) working") from None
                logger.warning("waiting for the transaction coordinator", extra={
                    "event": "waiting_for_kafka", "error": str(exc)})
                self.shutdown.sleep(1.0)
        return False

    def _handle_in_transaction(self, messages: Sequence[Message]) -> bool:
        """:meth:`handle_batch` into the open transaction; False if the batch was given up
        because the transaction was aborted meanwhile (its input is read again)."""
        self.checkpoint.consumed(messages)
        self.transaction.mark_batch()
        self._in_batch, self._rewound_in_batch = True, False
        try:
            self.handle_batch(messages)
        except Rewound:
            return False
        except Abandon:
            # Shutting down in the middle of the batch: it is given up uncommitted, for the
            # next owner. What it produced is in the open transaction, which cannot commit
            # without the rest of the batch: all of it is aborted.
            if self.transaction.batch_sent:
                self._abort_and_rewind("the batch in flight was given up at shutdown")
            raise
        except TransactionError as exc:  # begin_transaction refused, inside produce
            self._transaction_failed(exc)
            return False
        finally:
            self._in_batch = False
        if self._rewound_in_batch:
            # Rewound on a path that could not raise: what the batch produced since went
            # into a transaction without the rest of it.
            self._abort_and_rewind("the batch in flight was rewound")
            return False
        return True

    def _commit_before_wait(self) -> None:
        """A dependency is down: commit what earlier batches did, so that no transaction
        stays open (holding back readers, timing out) while the loop waits. Not when the
        batch in flight produced already: its outputs cannot be committed without it."""
        if self.transaction.batch_sent or self._failed:
            return
        if self.transaction.open or self.checkpoint.to_commit():
            self._commit(asynchronous=False, flush_timeout=_COMMIT_FLUSH_TIMEOUT_S)
        if self._rewound_in_batch:
            raise Rewound

    def _commit_transaction(self, flush_timeout: float) -> bool:
        """Commit the open transaction with the checkpoint's offsets (of every partition:
        the outputs of all of them are in it). Returns whether everything handled so far is
        committed; a transaction that cannot commit is aborted and its input read again."""
        txn = self.transaction
        offsets = self.checkpoint.to_commit()
        if not offsets and not txn.open:
            return True
        left = txn.flush(flush_timeout)
        if self._fatal is not None:
            return False  # a topic refuses this client: nothing of it is committed
        if self.output.must_abort:
            self._abort_and_rewind(self.output.must_abort)
            return False
        if left:
            logger.warning("outputs not delivered yet; not committing", extra={
                "event": "commit_deferred", "outputs": left, "redeliveries": 0})
            return False
        backoff = 0.5
        deadline = time.monotonic() + self._transaction_timeout_s()
        while True:
            try:
                txn.commit(offsets, self.consumer.consumer_group_metadata(), flush_timeout)
                break
            except TransactionError as exc:
                if exc.remedy is Remedy.RETRY and not self.shutdown.requested \
                        and time.monotonic() < deadline:
                    # The broker is away or its coordinator moving: the same call resumes.
                    logger.warning("transaction commit failed; retrying", extra={
                        "event": "commit_failed", "error": str(exc)})
                    self.shutdown.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_RETRY_BACKOFF_S)
                    continue
                self._transaction_failed(exc)
                return False
        self.checkpoint.committed(offsets)
        self.stats.committed()
        return True

    def _transaction_timeout_s(self) -> float:
        timeout = self.config.kafka.get("transaction.timeout.ms")
        return (int(timeout) if timeout else
                transactional_settings("", self.config["COMMIT_INTERVAL_MS"], {})[
                    "transaction.timeout.ms"]) / 1000

    def _transaction_failed(self, exc: TransactionError) -> None:
        if exc.remedy is Remedy.REFUSED:
            if self._fatal is None:
                self._fatal = FatalError(f"the broker refuses this client's transaction "
                                         f"({exc}); {refused_fix(exc.error)}; nothing of it "
                                         "was committed")
            return
        self._abort_and_rewind(str(exc), renew=exc.remedy is Remedy.RENEW)

    def _abort_and_rewind(self, reason: str, renew: bool = False) -> None:
        """Abort the open transaction (with a new producer if this one cannot go on) and
        read every owned partition again from its last commit."""
        txn = self.transaction
        self.output.must_abort = None
        if txn.open or renew or self.checkpoint.to_commit():
            self.stats.aborted()
            logger.warning("transaction aborted; its input is read again from the last "
                           "commit", extra={"event": "transaction_aborted", "error": reason})
        if renew:
            txn.replace()
        backoff = 0.5
        while True:
            try:
                if renew:
                    txn.start(_COMMIT_FLUSH_TIMEOUT_S)
                else:
                    txn.abort(_COMMIT_FLUSH_TIMEOUT_S)
                break
            except TransactionError as exc:
                if exc.remedy is Remedy.REFUSED:
                    self._transaction_failed(exc)
                    break
                if exc.remedy is not Remedy.RETRY and not renew:
                    renew = True  # a fenced producer cannot abort: the broker does
                    txn.replace()
                    continue
                if self.shutdown.requested:
                    break  # the broker aborts it after the transaction timeout
                self.shutdown.sleep(backoff)
                backoff = min(backoff * 2, _MAX_RETRY_BACKOFF_S)
        self._rewind()

    def _rewind(self) -> None:
        """Seek every owned partition back to its last commit (see Checkpoint.rewind)."""
        for tp in self.checkpoint.rewind(self.assignment.owned):
            try:
                self.consumer.seek(tp)
            except KafkaException as exc:  # not fetching yet: it starts at the commit anyway
                logger.info("seek failed", extra={"event": "seek_failed", "error": str(exc),
                                                  "partition": tp.partition})
        if self._in_batch:
            self._rewound_in_batch = True

    def _revoke_in_transaction(self, keys: list[tuple[str, int]]) -> None:
        # Revoked partitions' outputs and offsets are committed together before another
        # member takes them; with outputs of the batch in flight in the transaction (only
        # a handler that produces before it waits), all of it is aborted instead.
        if self._failed:
            return
        if self._in_batch and self.transaction.batch_sent:
            self._abort_and_rewind("partitions revoked while a batch was in flight")
        else:
            self._commit(asynchronous=False, flush_timeout=self.config["SHUTDOWN_TIMEOUT_S"])

    def _delivery_failed_in_transaction(self, delivery: Delivery, kind: Failure,
                                        err: KafkaError, msg: Message) -> None:
        # Any failed delivery fails the whole transaction (librdkafka: abortable). A
        # refused record is remembered, so that read again it is dead-lettered at once.
        if kind is Failure.TOPIC_REFUSED and not delivery.dead_letter:
            self._output_refused(delivery.source, msg.topic(), err)
            return
        if delivery.dead_letter and kind in (Failure.PERMANENT, Failure.TOPIC_REFUSED) \
                and not (is_size_error(err) and msg.value()):
            self._dead_letter_refused(delivery.source, msg.value(), delivery.headers, err)
            return
        if kind is Failure.PERMANENT:
            source = delivery.source
            self.transaction.refuse(source.topic(), source.partition(), source.offset(),
                                    msg.topic(), err)
        self.output.must_abort = self.output.must_abort or \
            f"a delivery to {msg.topic()} failed ({err.name()}: {err.str()})"

    def _abort_at_exit(self) -> None:
        """Abort the open transaction once, so readers need not wait for its timeout."""
        try:
            self.transaction.abort(min(5.0, self.config["SHUTDOWN_TIMEOUT_S"] or 5.0))
        except TransactionError:
            pass  # the broker aborts it after the transaction timeout

    # ---- delivery failures -------------------------------------------------------------------

    def _send_dead_letter(self, source: Message, value: bytes | None, headers: Headers) -> None:
        try:
            self.output.send(self.dlq_topic, value, source.key(), headers,
                       Delivery(self._delivery_failed, source, headers, dead_letter=True))
        except KafkaException as exc:
            self._dead_letter_refused(source, value, headers, exc.args[0])

    def _delivery_failed(self, delivery: Delivery, err: KafkaError, msg: Message) -> None:
        kind = classify(err)
        if self.transaction is not None:
            self._delivery_failed_in_transaction(delivery, kind, err, msg)
            return
        if kind is Failure.TOPIC_REFUSED and not delivery.dead_letter:
            self._output_refused(delivery.source, msg.topic(), err)
            return
        if kind in (Failure.PERMANENT, Failure.TOPIC_REFUSED):
            if delivery.dead_letter:
                self._dead_letter_refused(delivery.source, msg.value(), delivery.headers, err)
            else:
                # The broker refused an output (too large, not authorised...): keep the input.
                self.stats.counts["out"] -= 1
                self.dead_letter(delivery.source, "produce", f"producing to {msg.topic()} "
                                 f"failed: {err.str()}", err.name())
            return
        if kind is Failure.BROKEN_PRODUCER:
            self.output.broken = True
        self._redeliveries.append(Redelivery(msg.topic(), msg.value(), msg.key(),
                                             delivery.headers, delivery))

    def _redeliver(self) -> None:
        """Send failed deliveries again, taking no new input until they are through."""
        logger.warning("deliveries failed with a retriable error; input paused while they are "
                       "sent again", extra={"event": "redeliver",
                                            "messages": len(self._redeliveries)})
        backoff = 0.5
        with self.assignment.input_paused():
            while (self._redeliveries or self.output.broken) and not self.shutdown.requested:
                if self.output.broken:
                    self.output.replace()
                pending, self._redeliveries = self._redeliveries, []
                for r in pending:
                    self.output.send(r.topic, r.value, r.key, r.headers, r.on_delivery)
                # Wait for this round to be delivered, polling the consumer meanwhile.
                while len(self.producer) and not self._redeliveries \
                        and not self.output.broken and not self.shutdown.requested:
                    self.assignment.poll_paused(0.5)
                self._raise_if_fatal()
                if self._redeliveries:
                    self.assignment.poll_paused(backoff)
                    backoff = min(backoff * 2, _MAX_RETRY_BACKOFF_S)
        if not self._redeliveries:
            logger.info("failed deliveries sent again", extra={"event": "redelivered"})

    def _dead_letter_refused(self, source: Message, value: bytes | None, headers: Headers,
                             err: KafkaError) -> None:
        if is_size_error(err) and value:
            # Over the broker's or the topic's limit even after truncation: send the headers
            # alone; x-preproc-source still points at the original record.
            size = (ORIGINAL_SIZE, str(len(source.value() or b"")).encode())
            self._send_dead_letter(source, b"", headers if size in headers else [*headers, size])
            return
        # Committing past this record would lose it: stop, so a restart retries it.
        self._fatal = FatalError(
            f"cannot write to the dead-letter topic {self.dlq_topic} ({err.name()}: "
            f"{err.str()}); record {source.topic()}/{source.partition()}/{source.offset()} "
            f"stays uncommitted; {topic_refused_fix(err)}")

    def _output_refused(self, source: Message, topic: str, err: KafkaError) -> None:
        # The topic refuses this client, not the record: every output would fail alike.
        # Stop with the record uncommitted rather than dead-letter (and commit) them all.
        if self._fatal is None:
            self._fatal = FatalError(
                f"cannot write to the output topic {topic} ({err.name()}: {err.str()}); "
                f"record {source.topic()}/{source.partition()}/{source.offset()} stays "
                f"uncommitted; {topic_refused_fix(err)}")

    # ---- clients -----------------------------------------------------------------------------

    def _new_producer(self) -> Producer:
        return clients.new_producer(self.config, self.group_id, self.exactly_once,
                                    error_cb=self._on_producer_error)

    def _on_producer_error(self, err: KafkaError) -> None:
        if not self.output.on_error(err):  # not the producer's own failure
            self._on_consumer_error(err)

    def _on_consumer_error(self, err: KafkaError) -> None:
        if err.code() in _UNAUTHORIZED:
            self._refuse_if_unauthorized(err, raise_now=False)
            return
        if err.fatal():
            self._fatal = FatalError(f"Kafka client failed: {err.str()}")
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._backoff = min(max(self._backoff * 2, 0.2), 5.0)
            client_logger().warning("no broker answers; retrying", extra={
                "event": "brokers_down", "retry_in_s": self._backoff,
                "bootstrap_servers": self.config["KAFKA_BOOTSTRAP_SERVERS"]})
        else:
            client_logger().warning("kafka client error", extra={"event": "kafka_error",
                                                                 "error": err.str()})

    def _leave_group(self, timeout: float) -> None:
        """Close the consumer, waiting at most ``timeout`` s. With the group's coordinator
        gone, librdkafka's close waits for it (a minute and more, seen on Apache Kafka):
        past the bound the process exits without leaving, which loses nothing (what was
        delivered is committed already), and the broker drops the member after its session
        timeout."""
        def close() -> None:
            try:
                self.consumer.close()
            except RuntimeError:
                pass  # already closed
        closing = threading.Thread(target=close, name="consumer-close", daemon=True)
        closing.start()
        closing.join(timeout)
        if closing.is_alive():
            logger.warning("the consumer could not leave its group (no coordinator answers); "
                           "the broker drops it after session.timeout.ms",
                           extra={"event": "close_timeout", "timeout_s": timeout})

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _close(self, commit: bool) -> None:
        done = commit and self._commit(asynchronous=False,
                                       flush_timeout=self.config["SHUTDOWN_TIMEOUT_S"])
        if self.transaction is not None and not done:
            self._abort_at_exit()
        if commit and not done and self.stats.brake is None:
            logger.warning("outputs not delivered at shutdown; their inputs stay uncommitted "
                           "and will be processed again", extra={
                               "event": "shutdown_undelivered", "outputs": len(self.producer),
                               "redeliveries": len(self._redeliveries)})
        # Closing leaves the group, which runs on_revoke; after a failure it commits nothing.
        self._failed = True
        self._leave_group(timeout=CLOSE_TIMEOUT_S)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.stats.log_dead_letters(time.monotonic() - self.stats.last_stats_at)
        logger.info("stopped", extra={"event": "stop", "command": self.command,
                                      "committed": done, **self.stats.counts})

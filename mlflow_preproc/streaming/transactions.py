"""Exactly once: the loop's producer as a Kafka transaction per commit interval.

With ``PROCESSING_GUARANTEE=exactly-once`` every output and dead letter of a commit interval,
and the input offsets after them, are one transaction: the loop calls :meth:`commit` where
at-least-once commits offsets, and readers with ``isolation.level=read_committed`` see all of
an interval's records or none of them. An interval that cannot commit is aborted, and the loop
reads its input again from the last commit (:meth:`Checkpoint.rewind
<mlflow_preproc.streaming.checkpoint.Checkpoint.rewind>`).

**One producer per consumer, fenced by the group (KIP-447).** The offsets go to the
transaction with the consumer's group metadata (``consumer_group_metadata()``: member id and
generation). A member that lost its partitions (frozen past its session, cut off) and comes
back is a zombie: the group coordinator refuses its offsets (``ILLEGAL_GENERATION``,
``UNKNOWN_MEMBER_ID``), librdkafka makes that an abortable error, and the zombie aborts,
so its outputs are never visible and the new owner's are the only ones. Before KIP-447 (Kafka
2.5) fencing needed a ``transactional.id`` per *input partition*, stable across instances;
with it, librdkafka's documentation says one transactional producer per consumer suffices,
whatever its partitions. So the ``transactional.id`` here is fresh per process
(``{group}-{random}``): a stable one would buy only that a restarted instance aborts its
predecessor's open transaction at once instead of after ``transaction.timeout.ms``, and would
need a stable, unique identity per process that Kubernetes Deployments, KEDA and
``KAFKA_CONSUMERS`` do not give (two processes sharing one would fence each other for ever).
The price, said in the docs: after a crash, readers wait up to ``transaction.timeout.ms``
for the dead instance's open transaction to be aborted by the broker.

**A fenced producer.** With a fresh ``transactional.id`` no other instance can fence this
one; a producer fenced all the same is one whose transaction the broker aborted for being open
past ``transaction.timeout.ms`` (the process frozen, a batch too slow). librdkafka makes that
a fatal error of the producer: :meth:`~TransactionalProducer.replace` makes a new one, and the loop reads the input
again from the last commit. Whether the partitions are still this member's is the group's to
say, at the next poll (``on_lost``), as for any zombie.

Errors of the transactional calls are sorted as librdkafka's introduction says: retriable
(try the same call again), abortable (abort, rewind, go on), fatal (a new producer, rewind);
an authorization refusal is none of these: the loop stops, naming the ACL (:class:`Refused`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from enum import Enum

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

# The broker refuses this client the transaction, the group or a topic: an ACL to fix.
_REFUSED = (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.INVALID_TRANSACTION_TIMEOUT)

# A transaction may stay open this long past COMMIT_INTERVAL_MS (the batch that crosses the
# interval, the commit itself) before the broker aborts it. It is also how long readers wait
# for the open transaction of a crashed instance. LIBRDKAFKA_TRANSACTION_TIMEOUT_MS overrides.
TRANSACTION_SLACK_MS = 60_000


class Remedy(Enum):
    """What a failed transactional call asks for."""

    RETRY = "retry"  # try the same call again (a broker away, a coordinator moving)
    ABORT = "abort"  # the transaction failed: abort it, read its input again
    RENEW = "renew"  # this producer cannot go on (fenced, fatal): a new one, read again
    REFUSED = "refused"  # an ACL or a broker setting refuses it: stop, naming the fix


class TransactionError(Exception):
    """A transactional call failed; ``remedy`` says what to do, ``error`` is librdkafka's."""

    def __init__(self, remedy: Remedy, error: KafkaError, call: str):
        super().__init__(f"{call}: {error.name()}: {error.str()}")
        self.remedy = remedy
        self.error = error
        self.call = call


def sort_error(error: KafkaError) -> Remedy:
    """What a transactional call that failed with ``error`` asks for."""
    if error.code() in _REFUSED:
        return Remedy.REFUSED
    if error.fatal():
        return Remedy.RENEW
    if error.txn_requires_abort():
        return Remedy.ABORT
    if error.retriable():
        return Remedy.RETRY
    # librdkafka: treat an error that is none of the three as fatal
    return Remedy.RENEW


def transactional_settings(group_id: str, commit_interval_ms: int, kafka: dict) -> dict:
    """The producer settings of a transactional loop: a ``transactional.id`` of this process
    (see the module docstring) and a transaction timeout past the commit interval, unless
    the librdkafka settings name one."""
    settings = {"transactional.id": f"{group_id}-{uuid.uuid4().hex[:16]}"}
    if "transaction.timeout.ms" not in kafka:
        settings["transaction.timeout.ms"] = commit_interval_ms + TRANSACTION_SLACK_MS
    return settings


def refused_fix(error: KafkaError) -> str:
    """What to change when the broker refuses a transactional call with ``error``."""
    if error.code() == KafkaError.INVALID_TRANSACTION_TIMEOUT:
        return ("the transaction timeout (COMMIT_INTERVAL_MS + 60 s, or "
                "LIBRDKAFKA_TRANSACTION_TIMEOUT_MS) is over the broker's "
                "transaction.max.timeout.ms: lower it, or raise the broker's")
    return ("grant this client WRITE and DESCRIBE on its transactional ids (an ACL on the "
            "prefix of the consumer group id), READ on the group and WRITE on the output and "
            "dead-letter topics, or set PROCESSING_GUARANTEE=at-least-once")


class TransactionalProducer:
    """The producer of an exactly-once loop: what the loop produces goes into one open
    transaction, begun at the first produce after a commit or an abort.

    It has the surface of the ``Producer`` the loop uses (``produce``, ``poll``, ``flush``,
    ``purge``, ``len``) and the transaction's (:meth:`start`, :meth:`commit`, :meth:`abort`,
    :meth:`replace`). ``make`` makes the underlying client (a new one on :meth:`replace`).
    """

    def __init__(self, make: Callable[[], Producer]):
        self._make = make
        self._producer = make()
        self.open = False
        self.sent = 0  # messages produced since the transaction began
        self.batch_sent = 0  # of them, since the loop's batch in flight began (mark_batch)
        self.opened_at = 0.0
        self._offsets_sent = False  # in this transaction: a retried commit sends them once
        # (input topic, partition, offset, output topic) -> the error the broker refused a
        # message of that input with: the transaction had to be aborted for it, and the
        # input, read again, goes to the dead-letter topic instead (see produce).
        self.refused: dict[tuple[str, int, int, str], KafkaError] = {}

    # ---- the producer's surface ---------------------------------------------------------

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list | None = None, on_delivery: Callable | None = None) -> None:
        """Produce into the open transaction (beginning one). A message the broker refused
        for a record before (too large for the topic...) raises that refusal at once, as
        librdkafka's own checks do, so its input is dead-lettered in this transaction."""
        if not self.open:
            self._begin()
        if self.refused and value:
            source = getattr(on_delivery, "source", None)
            if source is not None:
                error = self.refused.get((source.topic(), source.partition(), source.offset(),
                                          topic))
                if error is not None:
                    raise KafkaException(error)
        self._producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
        self.sent += 1
        self.batch_sent += 1

    def mark_batch(self) -> None:
        """A batch begins: :attr:`batch_sent` counts its messages from now on."""
        self.batch_sent = 0

    def poll(self, timeout: float = 0) -> int:
        return self._producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        return self._producer.flush(timeout)

    def purge(self, *args, **kwargs) -> None:
        self._producer.purge(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._producer)

    # ---- the transaction ----------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """``init_transactions``: register this producer with its transaction coordinator
        (aborting what an earlier producer of the same id left open)."""
        self._call("init_transactions", self._producer.init_transactions, timeout)

    def refuse(self, source_topic: str, partition: int, offset: int, topic: str,
               error: KafkaError) -> None:
        """The broker refused ``topic``'s message of this input record (a delivery report):
        the transaction must be aborted, and the record, read again, is refused at once."""
        self.refused[(source_topic, partition, offset, topic)] = error

    def commit(self, offsets: Sequence[TopicPartition], group_metadata: object,
               timeout: float) -> None:
        """Send ``offsets`` into the transaction with the consumer's group metadata, then
        commit it. Raises :class:`TransactionError`; after a RETRY, call it again."""
        if offsets and not self._offsets_sent:
            if not self.open:  # inputs handled without outputs (all dropped)
                self._begin()
            self._call("send_offsets_to_transaction", self._producer.send_offsets_to_transaction,
                       list(offsets), group_metadata, timeout)
            self._offsets_sent = True
        if self.open:
            self._call("commit_transaction", self._producer.commit_transaction, timeout)
        self._closed()

    def abort(self, timeout: float) -> None:
        """Abort the open transaction: none of its records or offsets will ever be visible.
        Raises :class:`TransactionError` (RETRY: call it again; RENEW: :meth:`replace`, the
        broker aborts the transaction itself)."""
        if self.open:
            self._call("abort_transaction", self._producer.abort_transaction, timeout)
        self._closed()

    def replace(self) -> None:
        """Replace a producer that cannot go on (fenced, fatal) with a new one, to
        :meth:`start`. What the old one held is dropped: the broker aborts its transaction."""
        old, self._producer = self._producer, self._make()
        try:
            old.purge()
        except (KafkaException, RuntimeError):
            pass  # a fatal producer may refuse even that
        self._closed()

    @property
    def age(self) -> float:
        """Seconds since the open transaction began (0 with none)."""
        return time.monotonic() - self.opened_at if self.open else 0.0

    def _begin(self) -> None:
        self._call("begin_transaction", self._producer.begin_transaction)
        self.open = True
        self.sent = 0
        self.opened_at = time.monotonic()

    def _closed(self) -> None:
        self.open = False
        self.sent = 0
        self.batch_sent = 0
        self._offsets_sent = False

    @staticmethod
    def _call(name: str, call: Callable, *args):
        try:
            return call(*args)
        except KafkaException as exc:
            error = exc.args[0]
            raise TransactionError(sort_error(error), error, name) from None

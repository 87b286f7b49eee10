"""Exactly once (PROCESSING_GUARANTEE=exactly-once): the checkpoint as a transaction, with
test doubles of the clients (fast, no broker).

FakeTransactionalProducer and LogConsumer script what Apache Kafka cannot do on demand: a
commit that times out, a transaction the coordinator aborted (the producer fenced), a zombie's
offsets refused, a rebalance at a chosen moment. TransactionLog is what a ``read_committed``
reader of the broker would see: only committed transactions' records, and the group's
committed offsets. The errors are librdkafka's (``KafkaError`` with its fatal, retriable and
abortable flags), sorted by streaming/transactions.py. The same guarantees are shown end to
end on Apache Kafka in test_faults.py (crashes, a zombie, a broker killed).
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from mlflow_preproc.config import ConfigError
from mlflow_preproc.streaming.checkpoint import Checkpoint
from mlflow_preproc.streaming.loop import FatalError
from mlflow_preproc.streaming.transactions import Remedy, sort_error, transactional_settings
from test_loop_commits import TOPIC, Echo, FakeConsumer, FakeProducer, msg
from verdict_cells import verdict

EXACTLY_ONCE = {"PROCESSING_GUARANTEE": "exactly-once"}


def abortable(code: int = KafkaError.ILLEGAL_GENERATION) -> KafkaError:
    return KafkaError(code, "refused by the test", txn_requires_abort=True)


def fenced() -> KafkaError:
    return KafkaError(KafkaError._FENCED, "fenced by the test", fatal=True)


def timed_out() -> KafkaError:
    return KafkaError(KafkaError._TIMED_OUT, "timed out in the test", retriable=True)


class TransactionLog:
    """The broker's side: committed records by topic, the group's committed offsets, and
    every transaction's outcome, in order."""

    def __init__(self):
        self.records: list[tuple[str, bytes, dict]] = []
        self.offsets: dict[int, int] = {}
        self.outcomes: list[str] = []

    def values(self, topic: str = "out") -> list[bytes]:
        return [v for t, v, _ in self.records if t == topic]


class FakeTransactionalProducer(FakeProducer):
    """A transactional producer: what it delivers is held in the open transaction until
    ``commit_transaction`` (then in the log), and dropped by ``abort_transaction``.
    ``calls`` scripts errors: call name -> the errors its next calls raise, in turn (None:
    that call succeeds). A fatal error fences it for good, as librdkafka does."""

    def __init__(self, log: TransactionLog, calls: dict | None = None, fail=None):
        super().__init__(fail)
        self.log = log
        self.calls = {name: list(errors) for name, errors in (calls or {}).items()}
        self.made: list[str] = []
        self.in_transaction = False
        self.pending: list = []
        self.pending_offsets: list[tuple[int, int]] = []
        self.delivery_failed = False
        self.fatal: KafkaError | None = None

    def _call(self, name: str) -> None:
        self.made.append(name)
        if self.fatal is not None:
            raise KafkaException(self.fatal)
        errors = self.calls.get(name)
        error = errors.pop(0) if errors else None
        if error is not None:
            if error.fatal():
                self.fatal = error
            raise KafkaException(error)

    def init_transactions(self, timeout=None):
        self._call("init_transactions")

    def begin_transaction(self):
        self._call("begin_transaction")
        assert not self.in_transaction, "begin_transaction with a transaction open"
        self.in_transaction = True

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        if not self.in_transaction:
            raise KafkaException(KafkaError(KafkaError._STATE, "no transaction is open"))
        super().produce(topic, value, key, headers, on_delivery)

    def _deliver(self):
        while self.queue:
            topic, value, key, headers, on_delivery = self.queue.pop(0)
            attempt = self.attempts[value] = self.attempts.get(value, 0) + 1
            error = self.fail(topic, value, attempt)
            if error is None:
                self.pending.append((topic, value, dict(headers)))
            else:
                self.delivery_failed = True  # librdkafka: the transaction must be aborted
                if on_delivery is not None:
                    from confluent_kafka import Message

                    on_delivery(KafkaError(error), Message(topic=topic, value=value, key=key))

    def send_offsets_to_transaction(self, offsets, group_metadata, timeout=None):
        self._call("send_offsets_to_transaction")
        assert self.in_transaction
        if group_metadata == "zombie":
            raise KafkaException(abortable(KafkaError.ILLEGAL_GENERATION))
        self.pending_offsets = sorted((tp.partition, tp.offset) for tp in offsets)

    def commit_transaction(self, timeout=None):
        self._deliver()
        self._call("commit_transaction")
        assert self.in_transaction
        if self.delivery_failed:
            raise KafkaException(abortable(KafkaError.INVALID_RECORD))
        self.log.records += self.pending
        self.log.offsets.update(self.pending_offsets)
        self.log.outcomes.append(f"commit {self.pending_offsets}")
        self._end()

    def abort_transaction(self, timeout=None):
        self._call("abort_transaction")
        self.queue.clear()
        self.log.outcomes.append("abort")
        self._end()

    def _end(self):
        self.in_transaction = False
        self.pending, self.pending_offsets, self.delivery_failed = [], [], False


class LogConsumer(FakeConsumer):
    """Reads partitions of scripted values from a position, as a real consumer does: an
    assignment starts at the group's committed offset (the TransactionLog's), ``seek`` moves
    the position, each ``consume`` returns up to ``batch`` messages of each partition.
    ``events``: consume call number -> a function of the consumer, called first."""

    def __init__(self, values: dict[int, list[bytes]], log: TransactionLog, batch: int = 2,
                 events: dict | None = None):
        super().__init__([], partitions=tuple(values))
        self.values = values
        self.log = log
        self.batch = batch
        self.events = events or {}
        self.calls = 0
        self.position: dict[int, int] = {}
        self.metadata = "member-1"
        self.on_lost = None

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None):
        self.on_lost = on_lost
        self.position = {tp.partition: self.log.offsets.get(tp.partition, 0)
                         for tp in self.partitions}
        super().subscribe(topics, on_assign, on_revoke, on_lost)

    def consume(self, num_messages=1, timeout=-1):
        self.calls += 1
        if self.calls in self.events:
            self.events[self.calls](self)
        if self.paused:
            return []
        out = []
        for tp in self.partitions:
            p = tp.partition
            start, end = self.position[p], min(self.position[p] + self.batch,
                                               len(self.values[p]))
            out += [msg(p, offset, self.values[p][offset]) for offset in range(start, end)]
            self.position[p] = end
        if not out:
            self.loop.stop()
        return out

    def seek(self, tp):
        super().seek(tp)
        self.position[tp.partition] = tp.offset

    def consumer_group_metadata(self):
        return self.metadata

    def lose(self, partitions):
        lost = [tp for tp in self.partitions if tp.partition in partitions]
        self.on_lost(self, lost)
        self.partitions = [tp for tp in self.partitions if tp.partition not in partitions]


class ExactlyOnceEcho(Echo):
    """Echo in exactly-once mode; a producer it replaces is a new transactional one."""

    def __init__(self, consumer, producer, log: TransactionLog, **env):
        self.log = log
        super().__init__(consumer, producer, **{**EXACTLY_ONCE, **env})

    def _new_producer(self):
        if not hasattr(self, "replacements"):
            return super()._new_producer()
        replacement = FakeTransactionalProducer(self.log)
        self.replacements.append(replacement)
        return replacement


def values(partitions: int = 2, each: int = 5) -> dict[int, list[bytes]]:
    return {p: [f"{p}-{i}".encode() for i in range(each)] for p in range(partitions)}


def every_value(written: dict[int, list[bytes]]) -> list[bytes]:
    return sorted(v for vs in written.values() for v in vs)


def run(written, calls=None, fail=None, events=None, batch=2, **env):
    log = TransactionLog()
    consumer = LogConsumer(written, log, batch=batch, events=events)
    producer = FakeTransactionalProducer(log, calls, fail)
    loop = ExactlyOnceEcho(consumer, producer, log, **env)
    return loop, consumer, producer, log


# ---- the checkpoint's way back --------------------------------------------------------------

def test_rewind_goes_back_to_the_last_commit_or_the_first_consumed_offset():
    checkpoint = Checkpoint()
    owned = {(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)}
    checkpoint.consumed([msg(0, 3), msg(0, 4), msg(1, 7)])
    checkpoint.mark_handled([msg(0, 3), msg(1, 7)], owned)
    checkpoint.committed(checkpoint.to_commit([(TOPIC, 0)]))  # partition 0 committed at 4
    checkpoint.consumed([msg(0, 5), msg(1, 8)])
    checkpoint.mark_handled([msg(0, 4), msg(0, 5), msg(1, 8)], owned)
    seeks = sorted((tp.partition, tp.offset) for tp in checkpoint.rewind(owned))
    assert seeks == [(0, 4), (1, 7)]  # 2: nothing consumed from it, nothing to do
    assert checkpoint.handled() == {(TOPIC, 0): 4}  # what was handled since is undone
    assert [(tp.partition, tp.offset) for tp in checkpoint.to_commit()] == []


# ---- the transaction per interval -----------------------------------------------------------

def test_outputs_and_input_offsets_are_committed_in_one_transaction_per_interval():
    written = values()
    loop, consumer, producer, log = run(written)
    loop.run()
    assert sorted(log.values()) == every_value(written)
    assert log.offsets == {0: 5, 1: 5}
    assert consumer.commits == []  # no offset commit outside a transaction
    assert log.outcomes == ["commit [(0, 2), (1, 2)]", "commit [(0, 4), (1, 4)]",
                            "commit [(0, 5), (1, 5)]"]
    assert producer.made[0] == "init_transactions"


def test_inputs_that_produce_nothing_still_commit_their_offsets_in_a_transaction():
    written = {0: [b"drop", b"drop"]}

    class Dropper(ExactlyOnceEcho):
        def handle_batch(self, messages):
            pass

    log = TransactionLog()
    consumer = LogConsumer(written, log)
    loop = Dropper(consumer, FakeTransactionalProducer(log), log)
    loop.run()
    assert log.outcomes == ["commit [(0, 2)]"] and log.values() == []


@verdict("commit", "signal")
def test_sigterm_commits_the_open_transaction_and_exits():
    written = values(each=4)
    # COMMIT_INTERVAL_MS large: only the shutdown commits
    loop, consumer, producer, log = run(written, COMMIT_INTERVAL_MS="600000")
    loop.run()
    assert log.outcomes == ["commit [(0, 4), (1, 4)]"]
    assert sorted(log.values()) == every_value(written)


def test_an_exception_aborts_the_open_transaction_so_none_of_it_is_visible():
    written = {0: [b"a", b"b", b"boom", b"c"]}
    log = TransactionLog()
    consumer = LogConsumer(written, log)
    loop = ExactlyOnceEcho(consumer, FakeTransactionalProducer(log), log,
                           COMMIT_INTERVAL_MS="600000")
    loop.raise_on = {b"boom"}
    with pytest.raises(RuntimeError, match="a bug in the handler"):
        loop.run()
    assert log.outcomes == ["abort"] and log.values() == [] and log.offsets == {}


# ---- the paths of a failed commit -----------------------------------------------------------

@verdict("commit", "dependency slow")
def test_a_commit_that_times_out_is_resumed_not_aborted():
    written = values(each=2)
    loop, consumer, producer, log = run(
        written, calls={"commit_transaction": [timed_out(), timed_out()]})
    loop.run()
    assert log.outcomes == ["commit [(0, 2), (1, 2)]"]
    assert producer.made.count("commit_transaction") == 3
    assert consumer.seeks == []
    assert sorted(log.values()) == every_value(written)


def test_an_abortable_commit_error_aborts_rewinds_and_every_record_is_still_out_once():
    written = values()
    loop, consumer, producer, log = run(
        written, calls={"commit_transaction": [None, abortable(KafkaError.INVALID_TXN_STATE)]})
    loop.run()
    assert log.outcomes[:3] == ["commit [(0, 2), (1, 2)]", "abort",
                                "commit [(0, 4), (1, 4)]"]
    assert sorted(consumer.seeks) == [(0, 2), (1, 2)]  # back to the last commit
    assert sorted(log.values()) == every_value(written)  # exactly once
    assert log.offsets == {0: 5, 1: 5}


def test_a_producer_fenced_after_its_transaction_timed_out_is_replaced_and_the_input_read_again():
    # The coordinator aborted a transaction open past transaction.timeout.ms: librdkafka
    # fences the producer (fatal). A new one starts; nothing is lost or doubled.
    written = values()
    loop, consumer, producer, log = run(written, calls={"commit_transaction": [None, fenced()]})
    loop.run()
    assert len(loop.replacements) == 1
    assert loop.replacements[0].made[0] == "init_transactions"
    assert "abort" not in producer.made  # a fenced producer cannot abort: the broker did
    assert sorted(consumer.seeks) == [(0, 2), (1, 2)]
    assert sorted(log.values()) == every_value(written)
    assert log.offsets == {0: 5, 1: 5}


@verdict("commit", "fenced")
def test_a_zombie_s_offsets_are_refused_its_transaction_aborted_and_nothing_of_it_visible():
    # KIP-447: this member lost its partitions while frozen; the group's coordinator
    # refuses the offsets of its old generation (ILLEGAL_GENERATION, abortable), and the
    # group tells it the partitions are lost: none of its transaction becomes visible.
    written = {0: [b"a", b"b", b"c", b"d"]}

    def frozen_past_the_session(consumer):
        consumer.metadata = "zombie"

    def told_lost(consumer):
        consumer.lose([0])

    log = TransactionLog()
    consumer = LogConsumer(written, log, events={2: frozen_past_the_session, 3: told_lost})
    producer = FakeTransactionalProducer(log)
    loop = ExactlyOnceEcho(consumer, producer, log)
    loop.run()
    assert log.outcomes == ["commit [(0, 2)]", "abort"]
    assert log.values() == [b"a", b"b"]  # c and d are the new owner's to produce
    assert log.offsets == {0: 2}


def test_a_retriable_delivery_failure_aborts_and_the_input_is_produced_again_once():
    # Under at-least-once, outputs that timed out are sent again; in a transaction they
    # cannot be: the transaction is aborted and its input processed again.
    def fail(topic, value, attempt):
        return KafkaError._MSG_TIMED_OUT if value == b"0-1" and attempt == 1 else None

    written = values(each=3)
    loop, consumer, producer, log = run(written, fail=fail)
    loop.run()
    assert log.outcomes[0] == "abort"
    assert sorted(log.values()) == every_value(written)
    assert log.values(f"{TOPIC}-dlq") == []


@verdict("produce output", "bad record")
def test_an_output_the_broker_refuses_aborts_and_its_input_is_dead_lettered_when_read_again():
    def fail(topic, value, attempt):
        return KafkaError.INVALID_RECORD if (topic, value) == ("out", b"0-1") else None

    written = values(each=3)
    loop, consumer, producer, log = run(written, fail=fail)
    loop.run()
    assert log.outcomes[0] == "abort"
    assert sorted(log.values()) == sorted(set(every_value(written)) - {b"0-1"})
    [(value, headers)] = [(v, h) for t, v, h in log.records if t == f"{TOPIC}-dlq"]
    assert value == b"0-1" and headers["x-preproc-error-type"] == b"INVALID_RECORD"
    assert headers["x-preproc-stage"] == b"produce"
    assert log.offsets == {0: 3, 1: 3}


@verdict("produce output", "resource bound exceeded")
def test_an_output_over_the_producer_limit_is_dead_lettered_inside_the_transaction():
    written = {0: [b"a", b"x" * 3000, b"c"]}
    loop, consumer, producer, log = run(written, LIBRDKAFKA_MESSAGE_MAX_BYTES="2000")
    producer.max_bytes = 2000
    loop.run()
    assert log.values() == [b"a", b"c"]
    [(value, headers)] = [(v, h) for t, v, h in log.records if t == f"{TOPIC}-dlq"]
    assert headers["x-preproc-original-size"] == b"3000" and len(value) < 2000
    assert "abort" not in log.outcomes


@verdict("produce output", "auth/ACL refused")
def test_an_output_topic_refusing_this_client_stops_with_nothing_committed():
    def fail(topic, value, attempt):
        return KafkaError.TOPIC_AUTHORIZATION_FAILED if topic == "out" else None

    loop, consumer, producer, log = run({0: [b"a", b"b"]}, fail=fail)
    with pytest.raises(FatalError, match="cannot write to the output topic out"):
        loop.run()
    assert log.values() == [] and log.offsets == {} and "abort" in log.outcomes


@verdict("commit", "auth/ACL refused")
def test_a_transactional_id_this_client_may_not_use_stops_at_start_naming_the_acl():
    loop, consumer, producer, log = run(values(), calls={"init_transactions": [KafkaError(
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "denied", fatal=True)]})
    with pytest.raises(FatalError, match="cannot start the transactional producer.*grant "
                                         "this client WRITE and DESCRIBE on its "
                                         "transactional ids"):
        loop.run()
    assert log.records == []


# ---- rebalances, waits, the brake -------------------------------------------------------------

def test_revoked_partitions_commit_the_open_transaction_before_they_go():
    written = values(each=4)

    def revoke_1(consumer):
        consumer.revoke([1])

    loop, consumer, producer, log = run(written, COMMIT_INTERVAL_MS="600000",
                                        events={2: revoke_1})
    loop.run()
    # the revoke commits both partitions' outputs and offsets; then 0 goes on alone
    assert log.outcomes == ["commit [(0, 2), (1, 2)]", "commit [(0, 4)]"]
    assert log.values().count(b"1-0") == 1 and b"1-2" not in log.values()


def test_a_wait_for_a_dependency_commits_what_was_done_and_holds_no_transaction_open():
    from mlflow_preproc.runtime.dependencies import Unavailable

    written = {0: [b"a", b"b", b"c", b"d"]}
    down = [True, True]

    class Waiting(ExactlyOnceEcho):
        def handle_batch(self, messages):
            def ask():
                if messages[0].value() == b"c" and down:
                    down.pop()
                    raise Unavailable("model server", "connection refused", 0.01)
            self.when_available(ask)
            super().handle_batch(messages)

    log = TransactionLog()
    consumer = LogConsumer(written, log)
    loop = Waiting(consumer, FakeTransactionalProducer(log), log, COMMIT_INTERVAL_MS="600000")
    loop.wait = lambda seconds: None  # no time passes in this test
    loop.run()
    # a and b committed when the wait began, c and d at the end
    assert log.outcomes == ["commit [(0, 2)]", "commit [(0, 4)]"]
    assert log.values() == [b"a", b"b", b"c", b"d"]


def test_a_rebalance_while_the_decoder_waits_for_its_registry_dead_letters_nothing():
    # Found by test_faults' three-broker exactly-once run: the schema registry down, the
    # group took a partition away during the wait, and the Rewound that gives the batch up
    # was caught by decode's record boundary: the record was dead-lettered (error type
    # Rewound, a verdict on the environment), and the next records of the batch too.
    from mlflow_preproc.runtime.dependencies import Unavailable
    from mlflow_preproc.streaming.loop import KafkaLoop

    written = {0: [b"a", b"b"], 1: [b"c", b"d"]}
    down = [True, True]  # decode, then when_available's first try

    class Decoder:
        def decode(self, value):
            if value == b"c" and down:
                down.pop()
                raise Unavailable("schema registry", "HTTP 503", 0.01)
            return [value]

    class Decoding(ExactlyOnceEcho):
        def handle_batch(self, messages):
            records, owners = self.decode(messages, Decoder())
            for record, m in zip(records, owners):
                self.produce(m, [record])

    log = TransactionLog()
    consumer = LogConsumer(written, log)
    loop = Decoding(consumer, FakeTransactionalProducer(log), log, COMMIT_INTERVAL_MS="600000")

    def wait(seconds):  # meanwhile, partition 1 goes to another member
        consumer.revoke([1])
        KafkaLoop.wait(loop, 0)

    loop.wait = wait
    loop.run()
    assert loop.stats.counts["failed"] == 0
    assert log.values(f"{TOPIC}-dlq") == []
    assert log.values() == [b"a", b"b"] and log.offsets == {0: 2}  # 1 is the new owner's


def test_a_batch_given_up_at_shutdown_with_outputs_in_the_transaction_is_aborted():
    # Shutting down in the middle of a batch (a dependency down at SIGTERM, the producer's
    # queue full): the batch is given up, uncommitted, and the next owner processes it. Its
    # outputs so far are in the open transaction: committing it at exit (the old close)
    # made them visible without their offsets, so the next owner's were duplicates.
    written = {0: [b"a", b"b", b"c", b"d"]}
    log = TransactionLog()
    consumer = LogConsumer(written, log)
    loop = ExactlyOnceEcho(consumer, FakeTransactionalProducer(log), log,
                           COMMIT_INTERVAL_MS="600000")
    loop.abandon = {b"d"}  # c is produced, then the batch is given up
    loop.run()
    assert log.outcomes == ["abort"] and log.values() == [] and log.offsets == {}


def test_the_dead_letter_brake_aborts_the_open_transaction():
    written = {0: [b"bad"] * 12}

    class AllFail(ExactlyOnceEcho):
        def handle_batch(self, messages):
            for m in messages:
                self.dead_letter(m, "preprocess", ValueError("no"))

    log = TransactionLog()
    consumer = LogConsumer(written, log, batch=6)
    loop = AllFail(consumer, FakeTransactionalProducer(log), log, DLQ_BRAKE_WINDOW="10",
                   COMMIT_INTERVAL_MS="600000")
    consumer.events = {3: lambda c: loop.stop()}
    loop.run()
    assert log.outcomes == ["abort"] and log.records == [] and log.offsets == {}


# ---- settings ----------------------------------------------------------------------------

def test_exactly_once_reads_committed_input_and_refuses_a_setting_that_would_not():
    loop, *_ = run(values())
    assert loop.exactly_once
    with pytest.raises(ConfigError, match="LIBRDKAFKA_ISOLATION_LEVEL sets "
                                          "isolation.level=read_uncommitted"):
        run(values(), LIBRDKAFKA_ISOLATION_LEVEL="read_uncommitted")


def test_each_process_has_its_own_transactional_id_and_a_timeout_past_the_interval():
    first = transactional_settings("group", 1000, {})
    second = transactional_settings("group", 1000, {})
    assert first["transactional.id"].startswith("group-")
    assert first["transactional.id"] != second["transactional.id"]
    assert first["transaction.timeout.ms"] == 61_000
    assert "transaction.timeout.ms" not in transactional_settings(
        "group", 1000, {"transaction.timeout.ms": "10000"})


@pytest.mark.parametrize("error, remedy", [
    (timed_out(), Remedy.RETRY), (abortable(), Remedy.ABORT), (fenced(), Remedy.RENEW),
    (KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "x", fatal=True),
     Remedy.REFUSED),
    (KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "x", txn_requires_abort=True),
     Remedy.REFUSED),
    (KafkaError(KafkaError._STATE, "x"), Remedy.RENEW),  # none of the three: fatal
])
def test_transactional_errors_are_sorted_as_librdkafka_says(error, remedy):
    assert sort_error(error) is remedy

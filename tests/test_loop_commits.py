"""The commit rules of KafkaLoop, with test doubles of the Kafka clients (fast, no broker).

The real-broker tests (test_stream.py, test_faults.py) show the same rules end to end; these
pin down every branch in milliseconds. FakeConsumer and FakeProducer script what a broker
cannot do on demand: a delivery that fails with a chosen error at a chosen moment, a
rebalance in the middle of a batch. The messages, errors and topic partitions are the real
confluent-kafka types.
"""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from mlflow_preproc import config
from mlflow_preproc.streaming.loop import Abandon, FatalError, KafkaLoop
from verdict_cells import verdict

TOPIC = "in"


def msg(partition: int, offset: int, value: bytes = b"{}", key: bytes | None = None) -> Message:
    return Message(topic=TOPIC, partition=partition, offset=offset, key=key, value=value)


class FakeMetadata:
    def __init__(self, topics):
        self.topics = {t: type("T", (), {"partitions": {0: None, 1: None}})() for t in topics}


class FakeConsumer:
    """Returns scripted batches; records pauses, seeks and commits. ``close`` revokes, as the
    real client does when it leaves the group."""

    def __init__(self, batches, topics=(TOPIC, "out", f"{TOPIC}-dlq"), partitions=(0, 1)):
        self.batches = list(batches)
        self.topics = topics
        self.partitions = [TopicPartition(TOPIC, p) for p in partitions]
        self.commits: list[list[tuple[int, int]]] = []
        self.paused = False
        self.pause_calls = 0
        self.seeks: list[tuple[int, int]] = []
        self.on_revoke = None
        self.between_batches = None  # called on each empty consume: scripted events
        self.loop: KafkaLoop | None = None

    def list_topics(self, timeout=None):
        return FakeMetadata(self.topics)

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None):
        self.on_revoke = on_revoke
        on_assign(self, self.partitions)

    def assignment(self):
        return list(self.partitions)

    def consume(self, num_messages=1, timeout=-1):
        if self.paused:
            return []
        if self.batches:
            batch = self.batches.pop(0)
            return batch(self) if callable(batch) else batch
        self.loop.stop()  # the script is over: SIGTERM
        return []

    def pause(self, partitions):
        self.paused = True
        self.pause_calls += 1

    def resume(self, partitions):
        self.paused = False

    def seek(self, tp):
        self.seeks.append((tp.partition, tp.offset))

    def commit(self, offsets=None, asynchronous=True):
        self.commits.append(sorted((tp.partition, tp.offset) for tp in offsets))

    def revoke(self, partitions):
        revoked = [tp for tp in self.partitions if tp.partition in partitions]
        self.on_revoke(self, revoked)
        self.partitions = [tp for tp in self.partitions if tp.partition not in partitions]

    def close(self):
        if self.on_revoke and self.partitions:
            self.on_revoke(self, self.partitions)
        self.partitions = []


class FakeProducer:
    """Queues what is produced; ``flush``/``poll`` deliver it, failing the values ``fail``
    names with the error it gives. Refuses values over ``max_bytes`` at produce time, as
    librdkafka does over message.max.bytes."""

    def __init__(self, fail=None, max_bytes=1_000_000):
        self.fail = fail or (lambda topic, value, attempt: None)
        self.max_bytes = max_bytes
        self.queue: list = []
        self.delivered: list[tuple[str, bytes, dict]] = []
        self.attempts: dict[bytes, int] = {}
        self.purged = False

    def produce(self, topic, value=None, key=None, headers=None, on_delivery=None):
        if value is not None and len(value) > self.max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.queue.append((topic, value, key, headers or [], on_delivery))

    def poll(self, timeout=0):
        self._deliver()
        return 0

    def flush(self, timeout=None):
        self._deliver()
        return len(self.queue)

    def purge(self, *args, **kwargs):
        self.purged = True

    def __len__(self):
        return len(self.queue)

    def _deliver(self):
        while self.queue:
            topic, value, key, headers, on_delivery = self.queue.pop(0)
            attempt = self.attempts[value] = self.attempts.get(value, 0) + 1
            error = self.fail(topic, value, attempt)
            if error is None:
                self.delivered.append((topic, value, dict(headers)))
            elif on_delivery is not None:
                on_delivery(KafkaError(error), Message(topic=topic, value=value, key=key))


class Echo(KafkaLoop):
    """Produces each input unchanged; values listed in ``abandon`` make it give up."""

    command = "echo"

    def __init__(self, consumer, producer, abandon=(), raise_on=(), **env):
        cfg = config.load("bridge", environ={"COMMIT_INTERVAL_MS": "0", **env})
        super().__init__(cfg, TOPIC, "out", consumer=consumer, producer=producer)
        consumer.loop = self
        self.abandon = set(abandon)
        self.raise_on = set(raise_on)
        self.replacements: list[FakeProducer] = []

    def handle_batch(self, messages):
        for m in messages:
            if m.value() in self.raise_on:
                raise RuntimeError("a bug in the handler")
            if m.value() in self.abandon:
                raise Abandon("shutting down while the model server is down")
            self.produce(m, [m.value()])

    def _new_producer(self):
        if not hasattr(self, "replacements"):  # the first one, from __init__
            return super()._new_producer()
        replacement = FakeProducer()
        self.replacements.append(replacement)
        return replacement


def outputs(producer, topic="out"):
    return [v for t, v, _ in producer.delivered if t == topic]


def test_commits_the_offset_after_each_handled_batch_per_partition():
    consumer = FakeConsumer([[msg(0, 0, b"a"), msg(1, 5, b"b")], [msg(0, 1, b"c")]])
    producer = FakeProducer()
    Echo(consumer, producer).run()
    assert outputs(producer) == [b"a", b"b", b"c"]
    assert consumer.commits == [[(0, 1), (1, 6)], [(0, 2)]]  # only what changed each time


def test_an_exception_in_the_handler_commits_nothing_not_even_when_leaving_the_group():
    consumer = FakeConsumer([[msg(0, 0, b"a")], [msg(0, 1, b"boom"), msg(0, 2, b"c")]])
    with pytest.raises(RuntimeError, match="a bug in the handler"):
        Echo(consumer, FakeProducer(), raise_on={b"boom"}).run()
    assert consumer.commits == [[(0, 1)]]  # the first batch only, committed before the bug


def test_an_abandoned_batch_stays_uncommitted_and_the_rest_is_committed_on_exit():
    consumer = FakeConsumer([[msg(0, 0, b"a")], [msg(0, 1, b"b"), msg(1, 0, b"stop")]])
    producer = FakeProducer()
    Echo(consumer, producer, abandon={b"stop"}).run()
    assert consumer.commits == [[(0, 1)]]
    assert outputs(producer) == [b"a", b"b"]  # produced, but its batch is processed again


def test_a_retriable_delivery_failure_pauses_input_and_blocks_commits_until_redelivered():
    timeouts = {b"b": 2}  # b times out twice (a broker away for longer than message.timeout.ms)

    def fail(topic, value, attempt):
        return KafkaError._MSG_TIMED_OUT if attempt <= timeouts.get(value, 0) else None

    committed_while_failing = []
    consumer = FakeConsumer([[msg(0, 0, b"a"), msg(0, 1, b"b")], [msg(0, 2, b"c")]])
    producer = FakeProducer(fail)
    original_commit = consumer.commit

    def commit(offsets=None, asynchronous=True):
        committed_while_failing.append(producer.attempts.get(b"b", 0))
        original_commit(offsets, asynchronous)

    consumer.commit = commit
    Echo(consumer, producer).run()
    assert outputs(producer) == [b"a", b"b", b"c"]
    assert outputs(producer, f"{TOPIC}-dlq") == []  # not poison
    assert producer.attempts[b"b"] == 3
    assert consumer.pause_calls >= 1 and not consumer.paused
    assert committed_while_failing == [3, 3]  # no commit before b was through
    assert consumer.commits == [[(0, 2)], [(0, 3)]]


@verdict("produce output", "bad record")
def test_a_permanent_delivery_failure_dead_letters_the_input_with_the_error_code():
    def fail(topic, value, attempt):
        return KafkaError.INVALID_RECORD if (topic, value) == ("out", b"b") else None

    consumer = FakeConsumer([[msg(0, 0, b"a"), msg(0, 1, b"b", key=b"kb")]])
    producer = FakeProducer(fail)
    loop = Echo(consumer, producer)
    loop.run()
    [(value, headers)] = [(v, h) for t, v, h in producer.delivered if t == f"{TOPIC}-dlq"]
    assert value == b"b"
    assert headers["x-preproc-stage"] == b"produce"
    assert headers["x-preproc-error-type"] == b"INVALID_RECORD"
    assert headers["x-preproc-source"] == b"in/0/1"
    assert consumer.commits == [[(0, 2)]]
    assert loop.stats.counts["out"] == 1 and loop.stats.counts["failed"] == 1


@pytest.mark.parametrize("error", [KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                   KafkaError._UNKNOWN_TOPIC, KafkaError.TOPIC_EXCEPTION])
@verdict("produce output", "auth/ACL refused")
def test_an_output_topic_that_refuses_this_client_stops_the_loop_uncommitted(error):
    # #32 finding 6: TOPIC_AUTHORIZATION_FAILED on every output made 50 of 50 records dead
    # letters (stage produce) and committed them. The topic refuses the client, not the
    # records: stop (exit 2) naming the fix, nothing committed, nothing dead-lettered.
    def fail(topic, value, attempt):
        return error if topic == "out" else None

    consumer = FakeConsumer([[msg(0, 0, b"a"), msg(0, 1, b"b")], [msg(0, 2, b"c")]])
    producer = FakeProducer(fail)
    with pytest.raises(FatalError, match=r"cannot write to the output topic out \(.*record "
                                         r"in/0/0 stays uncommitted"):
        Echo(consumer, producer).run()
    assert consumer.commits == []
    assert outputs(producer, f"{TOPIC}-dlq") == []


@verdict("produce output", "resource bound exceeded")
@verdict("produce dead letter", "resource bound exceeded")
def test_a_record_too_large_for_the_producer_reaches_the_dead_letter_topic_truncated():
    big = b"x" * 5000
    consumer = FakeConsumer([[msg(0, 0, big, key=b"k"), msg(0, 1, b"after")]])
    producer = FakeProducer(max_bytes=2000)
    Echo(consumer, producer, LIBRDKAFKA_MESSAGE_MAX_BYTES="2000").run()
    [(value, headers)] = [(v, h) for t, v, h in producer.delivered if t == f"{TOPIC}-dlq"]
    assert big.startswith(value) and 0 < len(value) < 2000
    assert headers["x-preproc-original-size"] == b"5000"
    assert len(headers["x-preproc-original-sha256"]) == 64
    assert outputs(producer) == [b"after"]  # the partition goes on
    assert consumer.commits == [[(0, 2)]]


@verdict("produce dead letter", "bad record")
def test_a_dead_letter_the_broker_still_refuses_for_size_is_sent_as_headers_only():
    def fail(topic, value, attempt):
        if topic == "out" and value == b"big":
            return KafkaError.MSG_SIZE_TOO_LARGE  # over the topic's max.message.bytes
        if topic == f"{TOPIC}-dlq" and value:
            return KafkaError.MSG_SIZE_TOO_LARGE  # the dead-letter topic has the same limit
        return None

    consumer = FakeConsumer([[msg(0, 0, b"big")]])
    producer = FakeProducer(fail)
    Echo(consumer, producer).run()
    [(value, headers)] = [(v, h) for t, v, h in producer.delivered if t == f"{TOPIC}-dlq"]
    assert value == b"" and headers["x-preproc-original-size"] == b"3"
    assert consumer.commits == [[(0, 1)]]


@verdict("produce dead letter", "auth/ACL refused")
def test_a_dead_letter_topic_this_client_may_not_write_to_is_fatal_and_uncommitted():
    def fail(topic, value, attempt):
        if topic == "out":
            return KafkaError.INVALID_RECORD
        return KafkaError.TOPIC_AUTHORIZATION_FAILED

    consumer = FakeConsumer([[msg(0, 0, b"a")]])
    with pytest.raises(FatalError, match=r"cannot write to the dead-letter topic in-dlq "
                       r"\(TOPIC_AUTHORIZATION_FAILED.*record in/0/0 stays uncommitted; grant "
                       r"this client write access"):
        Echo(consumer, FakeProducer(fail)).run()
    assert consumer.commits == []


def test_a_producer_that_lost_its_idempotence_state_is_replaced_and_its_records_resent():
    def fail(topic, value, attempt):
        return KafkaError.PRODUCER_FENCED  # the old producer refuses everything

    consumer = FakeConsumer([[msg(0, 0, b"a"), msg(0, 1, b"b")]])
    broken = FakeProducer(fail)
    loop = Echo(consumer, broken)
    loop.run()
    [replacement] = loop.replacements
    assert broken.purged
    assert outputs(replacement) == [b"a", b"b"]
    assert consumer.commits == [[(0, 2)]]


def test_partitions_revoked_during_a_batch_are_not_committed_by_this_member():
    consumer = FakeConsumer([])

    class WaitsForModel(Echo):
        def handle_batch(self, messages):
            consumer.revoke([1])  # a rebalance while the model server is down
            self.wait(0)
            super().handle_batch(messages)

    consumer.batches = [[msg(0, 0, b"a"), msg(1, 0, b"b")]]
    producer = FakeProducer()
    WaitsForModel(consumer, producer).run()
    assert consumer.commits == [[(0, 1)]]  # partition 1 belongs to someone else now


def test_messages_fetched_before_a_pause_are_read_again_after_it():
    consumer = FakeConsumer([])
    prefetched = [msg(0, 7, b"early"), msg(0, 8, b"early2")]

    class Prefetching(Echo):
        def handle_batch(self, messages):
            consumer.paused = False  # the pause did not stop what was already fetched
            consumer.batches.insert(0, prefetched)
            consumer.pause = lambda partitions: None
            self.wait(0.05)
            super().handle_batch(messages)

    consumer.batches = [[msg(0, 6, b"a")]]
    Prefetching(consumer, FakeProducer()).run()
    assert consumer.seeks == [(0, 7)]


def test_a_stop_requested_while_waiting_for_the_broker_ends_start_up_cleanly():
    class Unreachable(FakeConsumer):
        def list_topics(self, timeout=None):
            self.loop.stop()
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

        def subscribe(self, *args, **kwargs):
            raise AssertionError("subscribed after a stop")

    consumer = Unreachable([])
    Echo(consumer, FakeProducer()).run()
    assert consumer.commits == []


def test_a_dead_letter_refused_during_the_commits_flush_is_not_committed_past():
    def fail(topic, value, attempt):
        return KafkaError.INVALID_RECORD if topic == "out" else \
            KafkaError.TOPIC_AUTHORIZATION_FAILED

    class ReportsOnlyOnFlush(FakeProducer):
        def poll(self, timeout=0):
            return 0  # the refusals arrive while the commit flushes

    consumer = FakeConsumer([[msg(0, 0, b"a")]])
    with pytest.raises(FatalError, match="cannot write to the dead-letter topic"):
        Echo(consumer, ReportsOnlyOnFlush(fail)).run()
    assert consumer.commits == []


class StickyPauseConsumer(FakeConsumer):
    """Pauses per partition and, like librdkafka, keeps a partition's pause when it is lost
    and assigned again; consumes only from partitions not paused."""

    def __init__(self, batches, **kwargs):
        super().__init__(batches, **kwargs)
        self.paused_set: set[int] = set()
        self.on_assign = self.on_lost = None
        self.idle = 0

    def subscribe(self, topics, on_assign=None, on_revoke=None, on_lost=None):
        self.on_assign, self.on_lost = on_assign, on_lost
        super().subscribe(topics, on_assign, on_revoke, on_lost)

    def lose_and_assign_again(self):
        partitions = list(self.partitions)
        self.on_lost(self, partitions)
        self.partitions = []
        self.on_assign(self, partitions)
        self.partitions = partitions

    def consume(self, num_messages=1, timeout=-1):
        if self.batches and callable(self.batches[0]):
            return self.batches.pop(0)(self)
        if self.batches and {m.partition() for m in self.batches[0]} & self.paused_set:
            self.idle += 1
            if self.idle > 50:  # stalled: end the test instead of hanging it
                self.loop.stop()
            return []
        return super().consume(num_messages, timeout)

    def pause(self, partitions):
        self.paused_set |= {tp.partition for tp in partitions}

    def resume(self, partitions):
        self.paused_set -= {tp.partition for tp in partitions}


def test_partitions_lost_during_a_pause_and_assigned_after_it_are_resumed():
    # The group drops this member while input is paused (a broker frozen past
    # session.timeout.ms); the partitions come back only after the pause is over (#18.1).
    consumer = StickyPauseConsumer([[msg(0, 0, b"a"), msg(1, 0, b"b")]])
    producer = FakeProducer()
    loop = Echo(consumer, producer)
    consumer.subscribe([TOPIC], loop._on_assign, loop._on_revoke, loop._on_lost)
    partitions = list(consumer.partitions)
    with loop.assignment.input_paused():
        consumer.on_lost(consumer, partitions)
        consumer.partitions = []
    assert consumer.paused_set == {0, 1}  # librdkafka remembers the pause of both
    consumer.partitions = partitions
    loop.run()  # assigned again as it joins
    assert outputs(producer) == [b"a", b"b"]


def test_partitions_assigned_during_a_pause_are_paused_until_it_ends():
    consumer = StickyPauseConsumer([])
    loop = Echo(consumer, FakeProducer())
    loop._run = lambda: None
    consumer.subscribe([TOPIC], loop._on_assign, loop._on_revoke, loop._on_lost)
    loop._consume(1, 0)  # settles the first assignment: resumed
    assert consumer.paused_set == set()
    with loop.assignment.input_paused():
        consumer.paused_set.clear()  # a partition new to this member is not paused yet
        consumer.lose_and_assign_again()
        loop.assignment.settle()
        assert consumer.paused_set == {0, 1}
    assert consumer.paused_set == set()


# ---- what the loop says while it starts (#19.9) ---------------------------------------------

class LateBrokerConsumer(FakeConsumer):
    """The broker answers from the second metadata request on."""

    def __init__(self, batches):
        super().__init__(batches)
        self.asked = 0

    def list_topics(self, timeout=None):
        self.asked += 1
        if self.asked == 1:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
        return super().list_topics(timeout)


def test_start_up_says_when_it_gives_up_on_kafka_and_that_it_is_joining_a_group(caplog):
    caplog.set_level("INFO", logger="mlflow_preproc")
    consumer = LateBrokerConsumer([[msg(0, 0)]])
    loop = Echo(consumer, FakeProducer(), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9")
    loop.run()
    lines = {r.event: r for r in caplog.records if hasattr(r, "event")}
    waiting = lines["waiting_for_kafka"]
    assert waiting.getMessage().startswith("waiting for Kafka at 127.0.0.1:9 (")
    assert waiting.getMessage().endswith("; giving up in 60 s")
    assert waiting.gives_up_in_s == 60
    assert f"joining consumer group {loop.group_id}" in lines["start"].getMessage()


class NoBrokerConsumer(FakeConsumer):
    """No broker ever answers."""

    def list_topics(self, timeout=None):
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Connection refused"))


@pytest.mark.parametrize("servers, local", [
    ("127.0.0.1:9092", "mlflow-preproc broker runs one there"),
    ("localhost:9", "mlflow-preproc broker --port 9 runs one there"),
    ("kafka.example:9092", None)])
def test_a_broker_that_never_answers_is_one_line_naming_the_local_broker_on_loopback(
        monkeypatch, servers, local):
    """A newcomer who did not start `mlflow-preproc broker` learns that it exists (#37)."""
    import mlflow_preproc.streaming.topics as topics_module

    monkeypatch.setattr(topics_module, "STARTUP_WAIT_S", 0.0)
    loop = Echo(NoBrokerConsumer([]), FakeProducer(), KAFKA_BOOTSTRAP_SERVERS=servers)
    with pytest.raises(FatalError) as failed:
        loop.run()
    text = str(failed.value)
    assert text.startswith(f"cannot reach Kafka at {servers} (Connection refused); check "
                           "KAFKA_BOOTSTRAP_SERVERS (--kafka-bootstrap-servers) and that the "
                           "broker is up"), text
    if local:
        assert text.endswith(f"; to try things on this machine, {local}"), text
    else:
        assert "mlflow-preproc broker" not in text


@pytest.mark.parametrize("servers, local", [
    ("127.0.0.1:9092", " (to try things on this machine, mlflow-preproc broker runs one there)"),
    ("kafka.example:9092", "")])
def test_while_it_waits_for_a_broker_the_stream_names_the_local_one(monkeypatch, caplog,
                                                                     servers, local):
    """The minute of waiting lines said only 'waiting for Kafka at ...' (#37 item 4)."""
    import mlflow_preproc.streaming.topics as topics_module

    monkeypatch.setattr(topics_module, "STARTUP_WAIT_S", 0.2)  # one waiting line, then the end
    loop = Echo(NoBrokerConsumer([]), FakeProducer(), KAFKA_BOOTSTRAP_SERVERS=servers)
    with caplog.at_level(logging.WARNING, logger="mlflow_preproc"), pytest.raises(FatalError):
        loop.run()
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert waiting and waiting[0] == f"waiting for Kafka at {servers}{local}; giving up in 0 s", \
        waiting


def test_a_loop_the_target_starts_exports_its_deployment_and_revision():
    """What PreprocRolloutRolledBack compares: the revision of each running member."""
    from prometheus_client import generate_latest

    from mlflow_preproc.deploy.spec import Deployment, container_spec
    from mlflow_preproc.runtime.model_identity import ModelIdentity

    model = ModelIdentity("models:/fink-prep/2", "models:/fink-prep/2", "fink-prep", "2")
    d = Deployment("fink", model.uri, model, "preprocessing-fink-prep-2:latest",
                   {"mode": "kafka", "consumers": "1"}, revision=4)
    env = container_spec(d, 0, 8080, 9100).env
    started = Echo(FakeConsumer([]), FakeProducer(), **env)
    assert 'mlflow_preproc_revision{command="echo",deployment="fink"} 4.0' in \
        generate_latest(started.stats.registry).decode()
    alone = Echo(FakeConsumer([]), FakeProducer())  # not started by the target
    assert 'mlflow_preproc_revision{command="echo",deployment=""} 0.0' in \
        generate_latest(alone.stats.registry).decode()


def test_a_stream_batch_gives_each_message_its_outputs_a_drop_or_one_dead_letter():
    """Stream.handle_batch on one batch of JSON messages, with the doubles: every message
    ends as outputs (one, two, fanned out), a drop, or one dead letter at its stage, each
    output and letter naming its own source; a good message between bad ones is unharmed."""
    from mlflow_preproc.runtime.flavor import LoadedPreprocessing
    from mlflow_preproc.runtime.model_identity import ModelIdentity
    from mlflow_preproc.runtime.records import Preprocessor
    from mlflow_preproc.streaming.stream import Stream

    def fn(record):
        if record["x"] == "raise":
            raise ValueError("no")
        if record["x"] == "drop":
            return None
        if record["x"] == "two":
            return [{"y": 1}, {"y": 2}]
        if record["x"] == "set":
            return {"y": object()}  # no JSON for it: an encode failure
        return {"y": record["x"]}

    values = [b'{"x": 1}', b"not json", b'{"x": "raise"}', b'{"x": "drop"}', b'{"x": "two"}',
              b'{"x": "set"}', b'{"x": 2}']
    consumer, producer = FakeConsumer([[msg(0, i, v) for i, v in enumerate(values)]]), \
        FakeProducer()
    cfg = config.load("stream", environ={"INPUT_TOPIC": TOPIC, "OUTPUT_TOPIC": "out",
                                         "COMMIT_INTERVAL_MS": "0", "MODEL_URI": "models:/p/1"})
    stream = Stream(cfg, LoadedPreprocessing(Preprocessor(fn, None, None), "", None, None),
                    ModelIdentity("models:/p/1", "models:/p/1", "p", "1"), "out",
                    consumer=consumer, producer=producer)
    consumer.loop = stream
    stream.run()
    out = [(v, h["x-preproc-source"]) for t, v, h in producer.delivered if t == "out"]
    assert out == [(b'{"y":1}', b"in/0/0"), (b'{"y":1}', b"in/0/4"), (b'{"y":2}', b"in/0/4"),
                   (b'{"y":2}', b"in/0/6")]
    dead = [(v, h["x-preproc-stage"], h["x-preproc-source"])
            for t, v, h in producer.delivered if t == f"{TOPIC}-dlq"]
    assert dead == [(b"not json", b"decode", b"in/0/1"), (b'{"x": "raise"}', b"preprocess",
                                                          b"in/0/2"),
                    (b'{"x": "set"}', b"encode", b"in/0/5")]
    assert stream.stats.counts["dropped"] == 1 and stream.stats.counts["out"] == 4
    assert consumer.commits == [[(0, 7)]]  # the whole batch: every message has its verdict


def test_records_are_matched_to_their_messages_however_many_each_holds():
    from mlflow_preproc.streaming.stream import _spans

    a, b, c = msg(0, 0), msg(0, 1), msg(0, 2)
    assert list(_spans([a, b, c], [a, b, c])) == [(a, 0, 1), (b, 1, 2), (c, 2, 3)]
    # b undecodable (no records), a a container of two
    assert list(_spans([a, a, c], [a, b, c])) == [(a, 0, 2), (c, 2, 3)]
    assert list(_spans([a, c, c], [a, b, c])) == [(a, 0, 1), (c, 1, 3)]
    # the columnar path: the messages it read first, the others after
    assert list(_spans([c, a], [a, b, c])) == [(c, 0, 1), (a, 1, 2)]
    assert list(_spans([], [a])) == []


@pytest.mark.parametrize("code", [KafkaError.GROUP_AUTHORIZATION_FAILED,
                                  KafkaError.TOPIC_AUTHORIZATION_FAILED])
@verdict("commit", "auth/ACL refused")
def test_a_group_or_input_topic_this_client_may_not_read_stops_the_loop(code):
    # #32's table: an ACL refusing the group or the input topic was a warning logged for
    # ever ("consume error"), the loop spinning without progress and /healthz green.
    refused = Message(topic=TOPIC, partition=0, offset=0, error=KafkaError(code))
    consumer = FakeConsumer([[msg(0, 0, b"a")], [refused], [msg(0, 1, b"b")]])
    producer = FakeProducer()
    with pytest.raises(FatalError, match=r"the broker refuses this client .* grant it read "
                                         r"access \(ACLs"):
        Echo(consumer, producer).run()
    assert outputs(producer) == [b"a"] and consumer.commits == [[(0, 1)]]


@verdict("commit", "auth/ACL refused")
def test_a_commit_the_broker_refuses_for_the_groups_acl_stops_the_loop():
    class RefusingCommits(FakeConsumer):
        def commit(self, offsets=None, asynchronous=True):
            on_commit(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED), offsets)

    consumer = RefusingCommits([[msg(0, 0, b"a")], [msg(0, 1, b"b")]])
    loop = Echo(consumer, FakeProducer())
    on_commit = loop._on_commit  # what librdkafka calls with the commit's outcome
    with pytest.raises(FatalError, match="the consumer group"):
        loop.run()


@verdict("commit", "dependency down")
@verdict("commit", "dependency slow")
def test_a_commit_the_broker_fails_is_retried_with_the_next_not_lost_and_not_fatal():
    class FailingOnce(FakeConsumer):
        failed = False

        def commit(self, offsets=None, asynchronous=True):
            if not self.failed:
                self.failed = True
                raise KafkaException(KafkaError(KafkaError.REQUEST_TIMED_OUT))
            super().commit(offsets, asynchronous)

    consumer = FailingOnce([[msg(0, 0, b"a")], [msg(0, 1, b"b")]])
    Echo(consumer, FakeProducer()).run()
    assert consumer.commits == [[(0, 2)]]  # the first commit's offsets came with the next


@verdict("produce dead letter", "dependency down")
@verdict("produce dead letter", "dependency slow")
def test_a_dead_letter_the_broker_did_not_take_in_time_is_sent_again_before_any_commit():
    def fail(topic, value, attempt):
        if topic == "out" and value == b"poison":
            return KafkaError.INVALID_RECORD  # the record's: it goes to the dead-letter topic
        if topic == f"{TOPIC}-dlq" and attempt == 2:  # its first try at the dead-letter topic
            return KafkaError._MSG_TIMED_OUT  # the broker away past message.timeout.ms
        return None

    committed_while_failing = []
    consumer = FakeConsumer([[msg(0, 0, b"poison"), msg(0, 1, b"fine")]])
    real_commit = consumer.commit

    def commit(offsets=None, asynchronous=True):
        committed_while_failing.append(producer.attempts.get(b"poison", 0))
        real_commit(offsets, asynchronous)

    consumer.commit = commit
    producer = FakeProducer(fail)
    Echo(consumer, producer).run()
    assert outputs(producer, f"{TOPIC}-dlq") == [b"poison"]  # once, the second time
    assert outputs(producer) == [b"fine"]
    assert consumer.commits == [[(0, 2)]] and committed_while_failing == [3]

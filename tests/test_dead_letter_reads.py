"""dlq inspect and replay read a dead-letter topic to its end, and nothing but the end stops
them: a broker that stops answering for a while is waited for; dead letters that cannot be
replayed whole are named, not sent. In process, on Apache Kafka."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Producer

from conftest import consume, produce, unique
from mlflow_preproc.streaming import dead_letters
from mlflow_preproc.streaming.dead_letters import Selection

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def stream_headers(source: str, error_type: str = "KeyError") -> list[tuple[str, bytes]]:
    return [("x-preproc-error", f"pre_processing raised {error_type}".encode()),
            ("x-preproc-error-type", error_type.encode()), ("x-preproc-stage", b"preprocess"),
            ("x-preproc-source", source.encode())]


def test_a_broker_that_pauses_mid_read_is_waited_for_not_taken_for_the_end(own_broker):
    broker = own_broker()
    servers, topic = broker.bootstrap_servers, unique("paused-dlq")
    broker.create_topics(topic)
    producer = Producer({"bootstrap.servers": servers})
    for i in range(60):  # one record batch each: every fetch brings one
        producer.produce(topic, b"v%d" % i, headers=stream_headers(f"raw/0/{i}"))
        producer.flush(10)
    # fetch one small batch at a time, so most of the topic is still on the broker when it
    # stops answering
    kafka = {"bootstrap.servers": servers, "fetch.max.bytes": 1024, "message.max.bytes": 1000,
             "max.partition.fetch.bytes": 1024, "queued.max.messages.kbytes": 1,
             "queued.min.messages": 1, "fetch.queue.backoff.ms": 200}
    reading = dead_letters.read(kafka, topic)
    first = next(reading)
    broker.freeze()
    threading.Timer(3, broker.thaw).start()
    try:
        rest = list(reading)
    finally:
        broker.thaw()
    assert [d.offset for d in [first, *rest]] == list(range(60))


def test_truncated_dead_letters_are_named_not_replayed_and_two_ranges_of_a_partition_count(
        broker):
    servers, topic, retry = broker.bootstrap_servers, unique("cut-dlq"), unique("retry")
    broker.create_topics(topic, retry)
    values = [b'{"id": %d}' % i for i in range(8)]
    headers = [stream_headers(f"raw/0/{i}") for i in range(8)]
    headers[2] += [("x-preproc-original-size", b"2000000"),
                   ("x-preproc-original-sha256", b"ab" * 32)]
    values[2] = values[2][:4]
    produce(servers, topic, values, headers=headers)
    kafka = {"bootstrap.servers": servers}

    chosen = Selection(offsets={0: [(1, 2), (5, 6)]})
    report = dead_letters.replay(kafka, topic, chosen, to=retry)
    assert (report.replayed, report.truncated) == (3, ["raw/0/2"])
    assert "1 were cut to fit the dead-letter topic and were skipped" in report.as_text(False)
    assert "raw/0/2" in report.as_text(False)  # where the whole record is
    sent = consume(servers, retry, 3)
    assert sorted(m.value() for m in sent) == [b'{"id": 1}', b'{"id": 5}', b'{"id": 6}']


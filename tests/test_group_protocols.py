"""The stream in both consumer group protocols of Apache Kafka 4: the classic one, and KIP-848's
``group.protocol=consumer`` (the broker assigns partitions and keeps the session; rebalances
are incremental), set with ``LIBRDKAFKA_GROUP_PROTOCOL``. As real processes."""

from __future__ import annotations

import io
import json
import struct
import time

import fastavro
import mlflow
import pytest

from conftest import committed_offsets, consume, produce, stream_env, unique

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SCHEMA = {"type": "record", "name": "Obs", "fields": [{"name": "id", "type": "long"},
                                                       {"name": "x", "type": "long"}]}


def features(record):
    return {"id": record["id"], "double": record["x"] * 2}


def confluent(record: dict) -> bytes:
    buf = io.BytesIO(struct.pack(">bI", 0, 1))
    buf.seek(5)
    fastavro.schemaless_writer(buf, fastavro.parse_schema(SCHEMA), record)
    return buf.getvalue()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_rebalance_while_the_stream_is_paused_loses_nothing_and_resumes_every_partition(
        broker, tracking_uri, streams, schema_registry, protocol):
    # The first member owns all four partitions and pauses them: its schema registry is down.
    # A second member joins meanwhile: the group moves partitions away from a paused member
    # (all of them and back again, classic; only those that move, KIP-848). When the registry
    # is back, every partition either member owns must be resumed (librdkafka keeps a pause
    # across a revoke), and every record reaches the output once the group settles.
    with mlflow.start_run():
        model = mlflow.preproc.log_model(features, name="p", pip_requirements=[]).model_uri
    topic = unique("raw")
    broker.create_topics(topic, partitions=4)
    schema_registry.register(1, SCHEMA)
    schema_registry.down = True
    n = 400
    produce(broker.bootstrap_servers, topic, [confluent({"id": i, "x": i}) for i in range(n)],
            keys=[str(i).encode() for i in range(n)])
    env = stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=unique("out"),
                     INPUT_FORMAT="confluent-avro", SCHEMA_REGISTRY_URL=schema_registry.url,
                     LIBRDKAFKA_GROUP_PROTOCOL=protocol)
    first = streams(env)
    wait_for(lambda: first.events("dependency_unavailable"), 90, "the first member to wait")
    assert sorted(p for e in first.events("assign") for p in e["partitions"]) == [0, 1, 2, 3]
    second = streams(env)
    wait_for(lambda: second.events("assign") and first.events("revoke"), 90,
             "the rebalance while the first member is paused")
    schema_registry.down = False
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], n, timeout=90,
                      until=lambda got: {m.key() for m in got} >= {str(i).encode()
                                                                   for i in range(n)})
    assert {json.loads(m.value())["id"] for m in outputs} == set(range(n))
    owned = [owned_now(first), owned_now(second)]
    assert owned[0] and owned[1] and owned[0] | owned[1] == {0, 1, 2, 3}, owned  # both worked
    assert first.stop() == 0 and second.stop() == 0, first.text()[-2000:]
    assert sum(committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic,
                                 partitions=4)) == n
    assert not consume(broker.bootstrap_servers, f"{topic}-dlq", 1, timeout=2)
    assert "Traceback" not in first.text() + second.text()


def owned_now(stream) -> set[int]:
    """The partitions a stream owns, from its assign and revoke lines in order."""
    owned: set[int] = set()
    for entry in stream.logs():
        if entry.get("event") == "assign":
            owned |= set(entry["partitions"])
        elif entry.get("event") in ("revoke", "lost"):
            owned -= set(entry["partitions"])
    return owned

"""The stream and the bridge under faults, against Apache Kafka, as real processes.

Each test reproduces one finding of the fault review: a path on which offsets were committed
for records that produced nothing, a poison record that halted a partition, or a signal that
was ignored. Faults the broker cannot produce on demand are made by the test: a broker frozen
with SIGSTOP (a real outage: the process is there, nothing answers) or killed in a cluster of
three, and FakeFlakyModelServer, a model server that refuses and fails when the test says so.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import threading
import time
from pathlib import Path

import fastavro
import mlflow
import pytest

from conftest import (
    JsonHandler,
    committed_offsets,
    consume,
    free_port,
    headers_of,
    produce,
    serve_on_loopback,
    stream_env,
    unique,
)
from apache_kafka import KafkaCluster
from verdict_cells import verdict

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def features(record):
    if record.get("gate"):
        # Holds pre_processing until the test opens the gate, so the test can act while
        # outputs are about to be produced.
        gate = Path(os.environ["TEST_GATE_DIR"])
        (gate / "reached").touch()
        deadline = time.monotonic() + 60
        while not (gate / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    if "blob" in record:
        return record  # as large as its input
    return {"id": record["id"], "double": record.get("x", 0) * 2}


@pytest.fixture
def model(tracking_uri):
    with mlflow.start_run():
        mlflow.preproc.log_model(features, name="p", registered_model_name="fault-prep",
                                 pip_requirements=[])
    return "models:/fault-prep/1"


def env_for(bootstrap, model_uri, topic, **extra) -> dict[str, str]:
    return stream_env(bootstrap, model_uri, topic, **{"OUTPUT_TOPIC": unique("out"), **extra})


def ids(messages) -> list[int]:
    return sorted(json.loads(m.value())["id"] for m in messages)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---- 1. an exception while handling a batch commits nothing -----------------------------

@verdict("schema registry in", "bad record")
def test_a_schema_that_cannot_be_used_dead_letters_its_records_and_the_stream_goes_on(
        broker, model, streams, tmp_path):
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    # Refers to a named type that no file defines: unusable, but only for records of id 42.
    (schemas / "42.avsc").write_text(json.dumps({"type": "record", "name": "Obs", "fields": [
        {"name": "id", "type": "long"}, {"name": "o", "type": "ztf.Undefined"}]}))
    good = {"type": "record", "name": "Obs", "fields": [{"name": "id", "type": "long"},
                                                         {"name": "x", "type": "long"}]}
    (schemas / "43.avsc").write_text(json.dumps(good))

    def framed(schema_id, record):
        buf = io.BytesIO(struct.pack(">bI", 0, schema_id))
        buf.seek(5)
        fastavro.schemaless_writer(buf, fastavro.parse_schema(good), record)
        return buf.getvalue()

    topic = unique("confluent")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [framed(42, {"id": i, "x": i}) for i in range(10)]
            + [framed(43, {"id": i, "x": i}) for i in range(10, 13)])
    env = env_for(broker.bootstrap_servers, model, topic, INPUT_FORMAT="confluent-avro",
                  AVRO_SCHEMA_DIR=str(schemas))
    stream = streams(env)
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 3)
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 10)
    assert stream.stop() == 0, stream.text()[-2000:]
    assert ids(outputs) == [10, 11, 12]
    assert len(dead) == 10
    assert {headers_of(m)["x-preproc-stage"] for m in dead} == {b"decode"}
    assert b"schema id 42" in headers_of(dead[0])["x-preproc-error"]
    assert committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic) == [13]
    assert "Traceback" not in stream.text()


@verdict("schema registry in", "bad record")
@verdict("schema registry in", "dependency down")
def test_a_schema_registry_outage_is_waited_for_and_only_unknown_ids_are_dead_lettered(
        broker, model, streams, schema_registry):
    # The writer schema uses a type registered under another subject (a schema reference).
    # While the registry answers 503 the stream waits; once it is back, every record is
    # decoded, and only the id it does not know goes to the dead-letter topic (#18.3).
    point = {"type": "record", "name": "Point", "namespace": "geo",
             "fields": [{"name": "x", "type": "long"}]}
    obs = {"type": "record", "name": "Obs", "fields": [{"name": "id", "type": "long"},
                                                        {"name": "at", "type": "geo.Point"}]}
    schema_registry.register(7, point, subject="point")
    schema_registry.register(8, obs, references=[{"name": "geo.Point", "subject": "point",
                                                  "version": 1}])
    named: dict = {}
    fastavro.parse_schema(point, named_schemas=named)
    writer = fastavro.parse_schema(obs, named_schemas=named)

    def framed(schema_id, i):
        buf = io.BytesIO(struct.pack(">bI", 0, schema_id))
        buf.seek(5)
        fastavro.schemaless_writer(buf, writer, {"id": i, "at": {"x": i}})
        return buf.getvalue()

    topic = unique("registry")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic,
            [framed(8, i) for i in range(5)] + [framed(99, 5)] + [framed(8, 6)])
    schema_registry.down = True
    env = env_for(broker.bootstrap_servers, model, topic, INPUT_FORMAT="confluent-avro",
                  SCHEMA_REGISTRY_URL=schema_registry.url)
    stream = streams(env)
    wait_for(lambda: stream.events("dependency_unavailable"), 60, "the wait for the registry")
    assert consume(broker.bootstrap_servers, f"{topic}-dlq", 1, timeout=2) == []
    schema_registry.down = False
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 6)
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 1)
    assert stream.stop() == 0, stream.text()[-2000:]
    assert ids(outputs) == [0, 1, 2, 3, 4, 6]
    assert [headers_of(m)["x-preproc-source"] for m in dead] == [f"{topic}/0/5".encode()]
    assert b"schema id 99 not found" in headers_of(dead[0])["x-preproc-error"]
    assert committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic) == [7]
    assert "Traceback" not in stream.text()


# ---- 2. and 8. the bridge and a model server that refuses, then fails --------------------

def scoring_records(body: dict) -> list[dict]:
    """The records of an MLflow scoring request, in either of its column formats."""
    if "dataframe_split" in body:
        split = body["dataframe_split"]
        return [dict(zip(split["columns"], row)) for row in split["data"]]
    return body["dataframe_records"]


class FakeFlakyModelServer:
    """An MLflow-scoring-protocol server on loopback whose faults the test chooses:
    ``refuse_batches`` answers 400 to requests of more than one record, ``down`` answers 503,
    and so does every request after ``down_after`` answered ones; ``statuses`` are answered
    first, one per request. Otherwise each record's prediction is its ``field`` (``x``). Otherwise each record's
    prediction is its ``x``."""

    def __init__(self):
        self.refuse_batches = False
        self.down = False
        self.down_after: int | None = None
        self.statuses: list[int] = []  # answers to give first, one per request, then normal
        self.field = "x"  # each record's prediction is this field of it
        self.answered = 0
        self.requests: list[int] = []  # records per request, in order
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                records = scoring_records(body)
                outer.requests.append(len(records))
                if outer.down_after is not None and outer.answered >= outer.down_after:
                    outer.down = True
                if outer.statuses:
                    return self.answer(outer.statuses.pop(0), {"message": "not now"})
                if outer.down:
                    return self.answer(503, {"message": "the model is reloading"})
                if outer.refuse_batches and len(records) > 1:
                    return self.answer(400, {"message": "batch refused"})
                outer.answered += 1
                self.answer(200, {"predictions": [r[outer.field] for r in records]})

        self.server = serve_on_loopback(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def model_server():
    server = FakeFlakyModelServer()
    yield server
    server.close()


def bridge_env(bootstrap, topic, url, **extra):
    return {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "INPUT_TOPIC": topic, "API_URL": url,
            "OUTPUT_TOPIC": unique("predictions"), "CONSUMER_GROUP_ID": unique("bridge"),
            **extra}


@verdict("bridge call", "signal")
def test_sigterm_while_the_bridge_retries_a_refused_batch_commits_none_of_it(
        broker, streams, model_server):
    topic = unique("features")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [json.dumps({"x": i}).encode() for i in range(5)])
    # The batch is refused, retried record by record; after two records the server goes down.
    model_server.refuse_batches, model_server.down_after = True, 2
    env = bridge_env(broker.bootstrap_servers, topic, model_server.url, BATCH_SIZE="5")
    bridge = streams(env, command="bridge")
    wait_for(lambda: model_server.down and len(model_server.requests) >= 5, 60,
             "retries against a server that went down")
    assert bridge.stop() == 0, bridge.text()[-2000:]
    assert "Traceback" not in bridge.text()
    assert committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic) == \
        [-1001]  # nothing: the batch was not finished
    assert consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 1, timeout=3) == []

    # The next member of the group predicts the whole batch.
    model_server.down = model_server.refuse_batches = False
    model_server.down_after = None
    again = streams(env, command="bridge")
    predictions = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 5)
    assert again.stop() == 0
    assert sorted(json.loads(m.value()) for m in predictions) == [0, 1, 2, 3, 4]


@verdict("bridge call", "dependency down")
def test_the_bridge_keeps_its_group_membership_while_the_model_server_is_down(
        broker, streams, model_server):
    topic = unique("features")
    broker.create_topics(topic)
    model_server.down = True
    env = bridge_env(broker.bootstrap_servers, topic, model_server.url,
                     LIBRDKAFKA_MAX_POLL_INTERVAL_MS="7000")
    bridge = streams(env, command="bridge")
    produce(broker.bootstrap_servers, topic, [json.dumps({"x": i}).encode() for i in range(20)])
    wait_for(lambda: len(model_server.requests) >= 1, 60, "the first prediction request")
    time.sleep(16)  # more than twice max.poll.interval.ms with the server down
    model_server.down = False
    predictions = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 21, timeout=20)
    # Never out of the group (a revoke comes only with the stop, below).
    assert len(bridge.events("assign")) == 1, bridge.text()[-3000:]
    assert bridge.events("revoke") == [] and bridge.events("lost") == []
    assert "maximum poll interval" not in bridge.text()
    assert bridge.stop() == 0
    assert sorted(json.loads(m.value()) for m in predictions) == list(range(20))  # once each


@verdict("bridge call", "dependency down")
def test_a_rate_limited_model_server_is_waited_for_not_dead_lettered(
        broker, streams, model_server):
    # 429 judges the server's load, not the records: every record is predicted once the
    # storm is over, and none goes to the dead-letter topic (#18.2).
    topic = unique("features")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [json.dumps({"x": i}).encode() for i in range(10)])
    model_server.statuses = [429, 429, 408, 429]
    env = bridge_env(broker.bootstrap_servers, topic, model_server.url)
    bridge = streams(env, command="bridge")
    predictions = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 10)
    assert bridge.stop() == 0, bridge.text()[-2000:]
    assert sorted(json.loads(m.value()) for m in predictions) == list(range(10))
    assert consume(broker.bootstrap_servers, f"{topic}-dlq", 1, timeout=2) == []
    assert len(bridge.events("dependency_unavailable")) == 4


@verdict("bridge call", "auth/ACL refused")
def test_a_wrong_api_endpoint_stops_the_bridge_and_commits_nothing(
        broker, streams, model_server):
    # 404 says API_ENDPOINT is wrong; dead-lettering would drain the topic (#18.2).
    topic = unique("features")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [json.dumps({"x": i}).encode() for i in range(10)])
    model_server.statuses = [404] * 20
    env = bridge_env(broker.bootstrap_servers, topic, model_server.url,
                     API_ENDPOINT="/invocatons")
    bridge = streams(env, command="bridge")
    assert bridge.proc.wait(60) == 2, bridge.text()[-2000:]
    last = bridge.text().strip().splitlines()[-1]
    assert "HTTP 404" in last and "API_ENDPOINT" in last, last
    assert "Traceback" not in bridge.text()
    assert committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic) == \
        [-1001]
    assert consume(broker.bootstrap_servers, f"{topic}-dlq", 1, timeout=2) == []


# ---- 3. a broker outage longer than message.timeout.ms is not poison ----------------------

@verdict("produce output", "dependency down")
@verdict("produce output", "dependency slow")
def test_outputs_that_time_out_while_the_broker_is_frozen_are_sent_again_not_dead_lettered(
        own_broker, model, streams, tmp_path):
    # Frozen past message.timeout.ms (outputs time out) and session.timeout.ms (the group
    # loses this member while its partitions are paused for the redelivery): once thawed, the
    # partitions come back assigned and must be resumed, or the stream stalls for good (#18.1).
    broker = own_broker()
    topic = unique("raw")
    broker.create_topics(topic)
    records = [{"id": i, "x": i} for i in range(1500)]
    records[150]["gate"] = True
    # One record batch: the stream holds every input when the broker freezes, so all 1,400
    # outputs after the gate are in the producer when it times out (as on a busy CI machine).
    produce(broker.bootstrap_servers, topic, [json.dumps(r).encode() for r in records],
            linger_ms=1000)
    gate = tmp_path / "gate"
    gate.mkdir()
    env = env_for(broker.bootstrap_servers, model, topic, TEST_GATE_DIR=str(gate),
                  LIBRDKAFKA_MESSAGE_TIMEOUT_MS="2000", BATCH_SIZE="100")
    stream = streams(env)
    wait_for((gate / "reached").exists, 60, "pre_processing to reach the gated record")
    os.kill(broker.process.pid, signal.SIGSTOP)  # the broker stops answering
    (gate / "open").touch()
    time.sleep(7)  # every output of the batch times out (message.timeout.ms=2000)
    os.kill(broker.process.pid, signal.SIGCONT)
    # Outputs written by the broker after their client timed out are sent again: duplicates
    # are allowed (at-least-once), so read until every id is there, not 1,500 messages.
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 1500, timeout=60,
                      until=lambda got: len(set(ids(got))) == 1500)
    assert set(ids(outputs)) == set(range(1500)), \
        f"{len(set(ids(outputs)))} of 1500 delivered\n" + stream.text()[-3000:]
    committed = lambda: committed_offsets(broker.bootstrap_servers,  # noqa: E731
                                          env["CONSUMER_GROUP_ID"], topic)
    deadline = time.monotonic() + 30
    while committed() != [1500] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert committed() == [1500], stream.text()[-3000:]
    assert stream.stop() == 0, stream.text()[-3000:]
    assert consume(broker.bootstrap_servers, f"{topic}-dlq", 1, timeout=3) == []
    assert stream.events("redeliver"), "the timed-out outputs were not sent again"


@verdict("produce output", "signal")
def test_sigterm_while_the_producer_queue_is_full_and_the_broker_away_exits_in_time(
        own_broker, model, streams, tmp_path):
    # The local queue fills (50 messages) while the broker is frozen: the produce loop must
    # still see the signal, or a pod is SIGKILLed at the end of its grace period (#18.8).
    broker = own_broker()
    topic = unique("raw")
    broker.create_topics(topic)
    records = [{"id": i, "x": i} for i in range(600)]
    records[20]["gate"] = True
    produce(broker.bootstrap_servers, topic, [json.dumps(r).encode() for r in records])
    gate = tmp_path / "gate"
    gate.mkdir()
    env = env_for(broker.bootstrap_servers, model, topic, TEST_GATE_DIR=str(gate),
                  LIBRDKAFKA_QUEUE_BUFFERING_MAX_MESSAGES="50",
                  LIBRDKAFKA_MESSAGE_TIMEOUT_MS="60000", SHUTDOWN_TIMEOUT_S="2")
    stream = streams(env)
    wait_for((gate / "reached").exists, 60, "pre_processing to reach the gated record")
    os.kill(broker.process.pid, signal.SIGSTOP)
    (gate / "open").touch()
    time.sleep(1)  # the queue is full: produce() raises BufferError until the broker is back
    started = time.monotonic()
    assert stream.stop(timeout=30) == 0, stream.text()[-3000:]
    assert time.monotonic() - started < 10, "SIGTERM took longer than SHUTDOWN_TIMEOUT_S"
    os.kill(broker.process.pid, signal.SIGCONT)
    [committed] = committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic)
    delivered = set(ids(consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 600, timeout=5)))
    assert set(range(max(committed, 0))) <= delivered  # nothing committed that was not sent
    assert "Traceback" not in stream.text()


# ---- 4. and 6. librdkafka settings come from where the user meant them to ----------------

def test_kubernetes_service_variables_do_not_reach_librdkafka(broker, model, streams):
    topic = unique("raw")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [b'{"id": 1, "x": 1}'])
    env = env_for(broker.bootstrap_servers, model, topic,
                  # what Kubernetes sets for a Service named `kafka` (never contacted here)
                  KAFKA_PORT="tcp://10.0.0.7:9092", KAFKA_SERVICE_HOST="10.0.0.7",
                  KAFKA_SERVICE_PORT="9092", KAFKA_PORT_9092_TCP="tcp://10.0.0.7:9092")
    stream = streams(env)
    assert ids(consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 1)) == [1]
    assert stream.stop() == 0, stream.text()[-2000:]


def test_an_unknown_librdkafka_setting_is_one_line_naming_the_variable(broker, model, streams):
    topic = unique("raw")
    broker.create_topics(topic)
    stream = streams(env_for(broker.bootstrap_servers, model, topic, LIBRDKAFKA_LINGER_MSS="5"))
    assert stream.proc.wait(60) == 2
    last = stream.text().strip().splitlines()[-1]
    assert last.startswith("mlflow-preproc stream: error: LIBRDKAFKA_LINGER_MSS sets the "
                           "librdkafka property 'linger.mss'"), stream.text()[-2000:]
    assert "Traceback" not in stream.text()


def test_the_kafka_config_file_flag_configures_the_clients(broker, model, streams, tmp_path):
    topic = unique("raw")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [b'{"id": 2, "x": 1}'])
    props = tmp_path / "client.properties"
    props.write_text(f"bootstrap.servers={broker.bootstrap_servers}\n")
    env = env_for(broker.bootstrap_servers, model, topic)
    del env["KAFKA_BOOTSTRAP_SERVERS"]  # the file is the only place naming the broker
    stream = streams(env, args=("--kafka-config-file", str(props)))
    assert ids(consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 1)) == [2]
    assert stream.stop() == 0, stream.text()[-2000:]


# ---- 5. a broker killed in a cluster; the topics it creates get the cluster's replication factor

def test_a_broker_killed_while_the_stream_runs_loses_nothing_and_created_topics_have_3_replicas(
        kafka_cluster, model, streams):
    # Three brokers, every topic three replicas, min.insync.replicas=2, acks=all (librdkafka's
    # default). The leader of an input partition dies mid-stream (SIGKILL, as a lost machine);
    # its leadership moves, the stream goes on, and comes back: nothing is lost or
    # dead-lettered. The topics the stream creates ask for no replication factor (#5): they
    # get the cluster's default, three.
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    cluster = kafka_cluster
    topic = unique("raw")
    cluster.create_topics(topic, partitions=2)
    env = env_for(cluster.bootstrap_servers, model, topic, COMMIT_INTERVAL_MS="500")
    n = 3000

    def feed():  # alerts keep arriving through the fault
        producer = Producer({"bootstrap.servers": cluster.bootstrap_servers, "linger.ms": 5})
        started = time.monotonic()
        for i in range(n):
            producer.produce(topic, json.dumps({"id": i, "x": i}).encode(), str(i).encode())
            if i % 50 == 0:
                producer.poll(0)
                time.sleep(max(0.0, started + i / 300 - time.monotonic()))  # ~300 records/s
        assert producer.flush(60) == 0

    stream = streams(env)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    assert len(consume(cluster.bootstrap_servers, env["OUTPUT_TOPIC"], 300, timeout=90)) >= 300
    victim = cluster.leader_of(topic, 0)
    victim.kill()
    wait_for(lambda: cluster.leader_of(topic, 0) is not victim, 30, "the leadership to move")
    time.sleep(2)
    victim.start()  # the same port and log directory: it catches up and rejoins
    feeder.join(60)
    every_id = lambda got: set(ids(got)) == set(range(n))  # noqa: E731
    outputs = consume(cluster.bootstrap_servers, env["OUTPUT_TOPIC"], n, timeout=120,
                      until=every_id)
    assert set(ids(outputs)) == set(range(n)), \
        f"{len(set(ids(outputs)))} of {n}\n" + stream.text()[-3000:]
    assert stream.proc.poll() is None, stream.text()[-3000:]  # never gave up
    assert stream.stop() == 0, stream.text()[-3000:]
    assert consume(cluster.bootstrap_servers, f"{topic}-dlq", 1, timeout=2) == []
    assert sum(committed_offsets(cluster.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic,
                                 partitions=2)) == n
    meta = AdminClient({"bootstrap.servers": cluster.bootstrap_servers}).list_topics(timeout=10)
    for created in (env["OUTPUT_TOPIC"], f"{topic}-dlq"):
        partitions = meta.topics[created].partitions.values()
        assert len(partitions) == 2 and {len(p.replicas) for p in partitions} == {3}, created


# ---- 7. and 14. signals during start-up ------------------------------------------------------

def test_sigterm_while_waiting_for_the_broker_exits_at_once_and_cleanly(model, streams):
    nothing_listens = f"127.0.0.1:{free_port()}"
    stream = streams(env_for(nothing_listens, model, unique("raw")))
    # The model is loaded; the stream waits for a broker that never comes.
    wait_for(lambda: stream.events("waiting_for_kafka"), 90, "the wait for the broker")
    started = time.monotonic()
    assert stream.stop(timeout=30) == 0, stream.text()[-2000:]
    assert time.monotonic() - started < 5


def test_sigterm_in_the_first_second_of_start_up_is_a_clean_exit(broker, model, streams):
    stream = streams(env_for(broker.bootstrap_servers, model, unique("raw")))
    time.sleep(1)  # importing, loading the model
    assert stream.stop(timeout=60) == 0, stream.text()[-2000:]


def test_librdkafka_lines_are_structured_and_rate_limited_while_the_broker_is_down(
        own_broker, model, streams):
    broker = own_broker()
    topic = unique("raw")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [b'{"id": 1, "x": 1}'])
    env = env_for(broker.bootstrap_servers, model, topic)
    stream = streams(env)
    consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 1)
    os.kill(broker.process.pid, signal.SIGKILL)  # gone for good: every reconnect fails
    time.sleep(20)
    # The coordinator is gone too: leaving the group is bounded (it hung one run in four).
    assert stream.stop() == 0
    lines = stream.text().splitlines()
    assert not [line for line in lines if line.startswith("%")], "raw librdkafka lines"
    from_librdkafka = [e for e in stream.logs() if e.get("name") == "mlflow_preproc.librdkafka"]
    assert from_librdkafka, "librdkafka's lines should come through the logger"
    # Unlimited, librdkafka wrote 1,421 lines in 69 s with the broker down.
    assert len(from_librdkafka) < 30, [e["message"] for e in from_librdkafka]


# ---- 11. a record too large to produce reaches the dead-letter topic ----------------------

@verdict("produce output", "bad record")
@verdict("produce output", "resource bound exceeded")
def test_a_record_larger_than_the_producer_allows_is_dead_lettered_truncated_and_the_stream_goes_on(
        broker, model, streams):
    from confluent_kafka import Producer

    topic = unique("raw")
    # Apache Kafka refuses records over 1 MB (message.max.bytes) unless the topic allows them
    broker.create_topics(topic, config={"max.message.bytes": "2000000"})
    big = json.dumps({"id": 1, "blob": "x" * 1_500_000}).encode()
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers,
                         "message.max.bytes": 2_000_000})
    for value in (b'{"id": 0, "x": 1}', big, b'{"id": 2, "x": 1}'):
        producer.produce(topic, value, b"k")
    assert producer.flush(30) == 0
    env = env_for(broker.bootstrap_servers, model, topic)
    stream = streams(env)
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 2)
    [dead] = consume(broker.bootstrap_servers, f"{topic}-dlq", 1)
    assert stream.stop() == 0, stream.text()[-2000:]
    assert ids(outputs) == [0, 2]
    h = headers_of(dead)
    assert h["x-preproc-stage"] == b"produce"
    assert h["x-preproc-error-type"] == b"MSG_SIZE_TOO_LARGE"
    assert h["x-preproc-original-size"] == str(len(big)).encode()
    assert h["x-preproc-source"] == f"{topic}/0/1".encode()
    assert 0 < len(dead.value()) < 1_000_000 and big.startswith(dead.value())
    assert committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic) == [3]


# ---- all of it at once: kills, signals, poison and a late broker --------------------------

def chaos_features(record):
    kind = record.get("poison")
    if kind == "raise":
        raise ValueError(f"cannot preprocess {record['id']}")
    if kind == "unencodable":
        return {"id": record["id"], "value": object()}
    if kind == "oversized":
        return {"id": record["id"], "blob": "x" * 1_500_000}
    if kind == "drop":
        return None
    time.sleep(0.0005)  # real work takes time: kills land in the middle of batches
    return {"id": record["id"], "double": record["x"] * 2}


POISON_VALUES = {"not-json": b"{not json", "array": b"[1, 2]", "tombstone": None,
                 "bad-utf8": b'{"id": "\xff\xfe"}', "scalar": b"42"}
POISON_RECORDS = ("raise", "unencodable", "oversized")


def guarantee_env(guarantee: str) -> dict[str, str]:
    """The settings of a stream or bridge with ``guarantee``. Exactly once with a 10 s
    transaction timeout: the open transaction of an instance killed with SIGKILL holds back
    read_committed readers until the broker aborts it (the default: a minute past the
    commit interval)."""
    if guarantee == "at-least-once":
        return {}
    return {"PROCESSING_GUARANTEE": guarantee, "LIBRDKAFKA_TRANSACTION_TIMEOUT_MS": "10000"}


CHAOS_SCHEMA = {"type": "record", "name": "Obs", "fields": [
    {"name": "id", "type": "long"}, {"name": "x", "type": "long"},
    {"name": "poison", "type": ["null", "string"], "default": None}]}


def confluent(record: dict) -> bytes:
    """``record`` in the Confluent wire format, schema id 1 (CHAOS_SCHEMA)."""
    buf = io.BytesIO(struct.pack(">bI", 0, 1))
    buf.seek(5)
    fastavro.schemaless_writer(buf, fastavro.parse_schema(CHAOS_SCHEMA), record)
    return buf.getvalue()


# (records, SIGKILLs, SIGTERMs) at CI's size: each event costs a process start and a group
# join, under exactly-once also the dead instance's transaction timeout (10 s), so the
# exactly-once runs are smaller to fit CI's time (about two minutes each on two cores).
CI_SIZE = (5000, 6, 2)
CI_SIZE_EXACTLY_ONCE = (3000, 4, 2)


@verdict("decode", "signal")
@verdict("schema registry in", "signal")
@verdict("pre_processing", "signal")
@verdict("encode", "signal")
@verdict("produce dead letter", "signal")
def test_random_kills_signals_poison_a_late_broker_and_dependency_outages_lose_no_record(
        own_broker, tracking_uri, streams, schema_registry, model_server):
    # input -> stream (killed and signalled at random; its schema registry goes down at
    # random) -> bridge -> a model server with outages and 429 storms -> predictions. Every
    # input ends as a prediction or a dead letter, and only poison is dead-lettered.
    # At least once: some are there twice (the run prints how many).
    chaos(own_broker(free_port(), start=False), streams, schema_registry, model_server,
          "at-least-once", CI_SIZE)


@verdict("commit", "signal")
@verdict("produce output", "signal")
def test_exactly_once_under_random_kills_signals_poison_and_outages_every_record_is_out_once(
        own_broker, tracking_uri, streams, schema_registry, model_server):
    # The same run with PROCESSING_GUARANTEE=exactly-once for the stream and the bridge:
    # every input is a prediction or a dead letter exactly once, read with read_committed:
    # 0 lost, 0 duplicates (#35).
    chaos(own_broker(free_port(), start=False), streams, schema_registry, model_server,
          "exactly-once", CI_SIZE_EXACTLY_ONCE)


def test_exactly_once_holds_with_a_broker_of_three_killed_during_the_kills(
        kafka_cluster, tracking_uri, streams, schema_registry, model_server):
    # The exactly-once run on three brokers (replication factor 3, min.insync.replicas=2),
    # the leader of an input partition killed in the middle of it and started again later:
    # its transactions' coordinator or partitions move, and still 0 lost, 0 duplicates.
    chaos(kafka_cluster, streams, schema_registry, model_server, "exactly-once",
          CI_SIZE_EXACTLY_ONCE, kill_a_broker=True)


def chaos(broker, streams, schema_registry, model_server, guarantee: str,
          size: tuple[int, int, int], kill_a_broker: bool = False) -> None:
    """The randomized crash run: records with poison among them fed at a steady rate into 4
    partitions, two stream instances killed (SIGKILL) and stopped (SIGTERM) at random moments
    and started again, a schema registry and a model server failing at random, and a bridge
    after the stream. ``size`` is CI's (records, SIGKILLs, SIGTERMs), which proves the
    property in a few minutes; CHAOS_RECORDS=20000 CHAOS_KILLS=20 CHAOS_SIGTERMS=5 is the
    issue's larger run (README, Contributing), CHAOS_SEED replays one."""
    import random

    seed = int(os.environ.get("CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    print(f"\nchaos seed {seed} (CHAOS_SEED={seed} replays it)")
    with mlflow.start_run():
        model_uri = mlflow.preproc.log_model(chaos_features, name="chaos",
                                             pip_requirements=[]).model_uri

    n = int(os.environ.get("CHAOS_RECORDS", size[0]))
    keys = [str(i).encode() for i in range(n)]
    values: list[bytes | None] = [confluent({"id": i, "x": i, "poison": None})
                                  for i in range(n)]
    poison_at = rng.sample(range(n), len(POISON_VALUES) + len(POISON_RECORDS) + 1)
    for i, kind in zip(poison_at, [*POISON_VALUES, *POISON_RECORDS, "drop"]):
        values[i] = POISON_VALUES[kind] if kind in POISON_VALUES else \
            confluent({"id": i, "x": i, "poison": kind})
    dropped = {keys[poison_at[-1]]}

    topic = unique("chaos")
    env = {"MODEL_URI": model_uri, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           "INPUT_TOPIC": topic, "OUTPUT_TOPIC": unique("chaos-out"),
           "CONSUMER_GROUP_ID": unique("chaos-group"), "COMMIT_INTERVAL_MS": "500",
           "BATCH_SIZE": "200", "INPUT_FORMAT": "confluent-avro",
           "SCHEMA_REGISTRY_URL": schema_registry.url, **guarantee_env(guarantee)}
    schema_registry.register(1, CHAOS_SCHEMA)
    live = [streams(env), streams(env)]  # before the broker is up: they wait for it
    everyone = list(live)
    if not isinstance(broker, KafkaCluster):
        time.sleep(4)
        broker.start()  # late: the instances wait for it
    broker.create_topics(topic, partitions=4)
    broker.create_topics(env["OUTPUT_TOPIC"], partitions=4)
    model_server.field = "id"
    benv = bridge_env(broker.bootstrap_servers, env["OUTPUT_TOPIC"], model_server.url,
                      BATCH_SIZE="100", **guarantee_env(guarantee))
    bridge = streams(benv, command="bridge")

    from confluent_kafka import Producer

    def feed():  # a steady stream through the whole run, as alerts arrive
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5,
                             "message.max.bytes": 2_000_000})
        started = time.monotonic()
        for i in range(n):
            producer.produce(topic, values[i], keys[i])
            if i % 100 == 0:
                producer.poll(0)
                time.sleep(max(0.0, started + i / 350 - time.monotonic()))  # ~350 records/s
        producer.flush(30)

    # Down before the first record is sent: each instance asks for the schema at its first
    # record, so the first members meet an outage (it was set after the feeder started, and
    # a fast member could fetch the schema first: no wait, and the check below failed).
    schema_registry.down = True
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    outages = threading.Event()

    def registry_outages():
        # until a member has waited for it (or 60 s), and a little longer
        ends = time.monotonic() + 60
        while time.monotonic() < ends and not any(
                s.events("dependency_unavailable") for s in list(everyone)):
            outages.wait(0.5)
        outages.wait(rng.uniform(2, 4))
        schema_registry.down = False
        while not outages.is_set():
            outages.wait(rng.uniform(1, 5))
            schema_registry.down = True
            outages.wait(rng.uniform(1, 4))
            schema_registry.down = False

    def model_server_outages():
        while not outages.is_set():
            outages.wait(rng.uniform(2, 6))
            if rng.random() < 0.5:
                model_server.statuses = [429] * rng.randint(3, 10)  # a storm
            else:
                model_server.down = True
                outages.wait(rng.uniform(1, 4))
                model_server.down = False

    threading.Thread(target=registry_outages, daemon=True).start()
    threading.Thread(target=model_server_outages, daemon=True).start()
    events = ["SIGKILL"] * int(os.environ.get("CHAOS_KILLS", size[1])) + \
        ["SIGTERM"] * int(os.environ.get("CHAOS_SIGTERMS", size[2]))
    rng.shuffle(events)
    if kill_a_broker:  # in the middle of the run, back three events later
        middle = len(events) // 2
        events[middle:middle] = ["kill a broker"]
        events[middle + 4:middle + 4] = ["restart the broker"]
    victim_broker = None
    sigterm_exits, own_exits = [], []
    for event in events:
        # A random moment of work: once the group has formed again after the last event
        # (every member signalled is one at work, not one still joining), then a random
        # delay. An instance that found the broker before the topic existed stops
        # (exit 2); like an orchestrator, start another, before waiting, so that the victim
        # is always a member at work (one signalled while it loads its model dies of it).
        for s in [s for s in live if s.proc.poll() is not None]:
            own_exits.append((s.proc.returncode, s.text().strip().splitlines()[-1]))
            live.remove(s)
            live.append(streams(env))
            everyone.append(live[-1])
        wait_for(lambda: all(s.events("assign") or s.proc.poll() is not None for s in live),
                 90, "the group to form")
        time.sleep(rng.uniform(0.2, 3.0))
        if event == "kill a broker":
            victim_broker = broker.leader_of(topic, rng.randrange(4))
            victim_broker.kill()
            continue
        if event == "restart the broker":
            victim_broker.start()
            continue
        running = [s for s in live if s.proc.poll() is None]
        working = [s for s in running if s.events("assign")]
        victim = rng.choice(working or running or live)
        if victim.proc.poll() is not None:
            # it stopped by itself (the topic did not exist yet) after the look above: no
            # signal reached it, so its exit says nothing of a signal's
            own_exits.append((victim.proc.returncode, victim.text().strip().splitlines()[-1]))
        elif event == "SIGKILL":
            victim.stop(signal.SIGKILL)
        else:
            sigterm_exits.append(victim.stop(signal.SIGTERM))
        live.remove(victim)
        live.append(streams(env))
        everyone.append(live[-1])
    feeder.join(120)
    outages.set()

    expected = set(keys) - dropped
    seen_out: list = []  # the bridge's predictions
    seen_dlq: list = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        seen_out = consume(broker.bootstrap_servers, benv["OUTPUT_TOPIC"], 10**9, timeout=3)
        seen_dlq = consume(broker.bootstrap_servers, f"{topic}-dlq", 10**9, timeout=1)
        if expected <= {m.key() for m in seen_out} | {m.key() for m in seen_dlq}:
            break
    for s in live:
        sigterm_exits.append(s.stop(signal.SIGTERM))
    assert bridge.stop() == 0, bridge.text()[-2000:]
    # the model server's outages and storms were waited for: no dead letter of the bridge
    assert consume(broker.bootstrap_servers, f"{env['OUTPUT_TOPIC']}-dlq", 1, timeout=2) == []
    assert bridge.events("dependency_unavailable"), "the model server never failed"
    assert all(json.loads(m.value()) == int(m.key()) for m in seen_out)

    waits = sum(len(s.events("dependency_unavailable")) for s in everyone)
    missing = expected - {m.key() for m in seen_out} - {m.key() for m in seen_dlq}
    unique_count = len({m.key() for m in seen_out} | {m.key() for m in seen_dlq})
    duplicates = len(seen_out) + len(seen_dlq) - unique_count
    print(f"chaos: {n} inputs, {len(seen_out)} predictions, {len(seen_dlq)} dead letters, "
          f"{duplicates} duplicates ({100 * duplicates / max(unique_count, 1):.1f}%), "
          f"{len(missing)} missing; instances that stopped by themselves: {own_exits}; "
          f"{waits} waits for the registry")
    assert not missing, f"lost {len(missing)} records, e.g. {sorted(missing)[:10]}"
    if guarantee == "exactly-once":
        assert duplicates == 0, f"{duplicates} duplicates under exactly-once"
        aborted = sum(len(s.events("transaction_aborted")) for s in [*everyone, bridge])
        print(f"chaos: {aborted} transactions aborted and processed again")
    assert waits, "no instance met a registry outage: the test did not test it"
    assert sigterm_exits == [0] * len(sigterm_exits)
    assert all(code == 2 and "does not exist" in line for code, line in own_exits), own_exits
    stages = {}
    for m in seen_dlq:
        stages.setdefault(m.key(), headers_of(m)["x-preproc-stage"].decode())
    poison_keys = {keys[i]: kind for i, kind in zip(poison_at, [*POISON_VALUES,
                                                                  *POISON_RECORDS])}
    assert {poison_keys[k] for k in stages if k in poison_keys} == set(poison_keys.values())
    assert set(stages) == set(poison_keys)  # nothing else was dead-lettered
    expected_stage = {"not-json": "decode", "array": "decode", "tombstone": "decode",
                      "bad-utf8": "decode", "scalar": "decode", "raise": "preprocess",
                      "unencodable": "encode", "oversized": "produce"}
    assert {poison_keys[k]: v for k, v in stages.items()} == expected_stage
    by_key = {m.key(): m.value() for m in seen_dlq if m.key() in poison_keys}
    for key, kind in poison_keys.items():
        if kind in POISON_VALUES:
            assert by_key[key] == POISON_VALUES[kind]  # byte-exact copies of the input


# ---- exactly once: a zombie ------------------------------------------------------------------

@verdict("commit", "fenced")
def test_a_frozen_instance_whose_partitions_moved_commits_nothing_when_thawed(
        broker, model, streams):
    # KIP-447 on Apache Kafka: instance A, in the middle of a transaction with outputs in
    # it, is frozen (SIGSTOP) past its session; B takes its partitions and processes from
    # A's last commit. Thawed, A is a zombie: the group refuses its offsets (or tells it its
    # partitions are lost), it aborts, and none of its transaction is visible: every
    # record is out exactly once under read_committed (#35).
    from confluent_kafka import Producer

    topic = unique("zombie")
    broker.create_topics(topic, partitions=2)
    env = env_for(broker.bootstrap_servers, model, topic, PROCESSING_GUARANTEE="exactly-once",
                  COMMIT_INTERVAL_MS="6000", BATCH_SIZE="20")
    n = 3000
    fed = threading.Event()

    def feed():  # ~100 records/s through the freeze and the thaw
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5})
        started = time.monotonic()
        for i in range(n):
            producer.produce(topic, json.dumps({"id": i, "x": i}).encode(), str(i).encode())
            if i % 10 == 0:
                producer.poll(0)
                time.sleep(max(0.0, started + i / 100 - time.monotonic()))
        assert producer.flush(30) == 0
        fed.set()

    a = streams(env)
    wait_for(lambda: a.events("assign"), 90, "A to be assigned")
    threading.Thread(target=feed, daemon=True).start()
    # A's first transaction is open for 6 s: frozen in the middle of it, with outputs in it
    wait_for(lambda: any(e["in"] >= 200 for e in a.events("stats")), 30, "A to have outputs")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        b = streams(env)
        # A's session (6 s) expires; B gets both partitions and produces
        wait_for(lambda: sum(len(e.get("partitions", [])) for e in b.events("assign")) >= 2,
                 90, "B to take both partitions")
        wait_for(lambda: any(e["out"] > 0 for e in b.events("stats")), 30, "B to produce")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    fed.wait(90)
    every_id = lambda got: set(ids(got)) == set(range(n))  # noqa: E731
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], n, timeout=120,
                      until=every_id)
    time.sleep(3)  # anything a zombie might still commit
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], n, timeout=20,
                      until=lambda got: len(got) > n)
    assert sorted(ids(outputs)) == list(range(n)), \
        f"{len(outputs)} outputs, {len(set(ids(outputs)))} ids of {n}"
    assert a.events("transaction_aborted"), a.text()[-3000:]  # thawed, it aborted
    assert a.stop() == 0 and b.stop() == 0
    assert sum(committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic,
                                 partitions=2)) == n

"""`mlflow-preproc stream` against Apache Kafka, as real processes; the smoke tests
(``any_broker``) on the embedded broker too."""

from __future__ import annotations

import io
import json
import signal
import struct
import time
import urllib.request

import fastavro
import mlflow
import pytest

from conftest import DATA, consume, free_port, headers_of, produce, stream_env, unique
from verdict_cells import verdict

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def features(record):
    if record.get("drop"):
        return None
    if "boom" in record:
        raise ValueError(f"cannot preprocess {record['id']}")
    if record.get("big"):  # over librdkafka's 1 MB message.max.bytes: cannot be produced
        return {"id": record["id"], "blob": "x" * 1_500_000}
    return {"id": record["id"], "double": record["x"] * 2}


def ztf_features(alert):
    c = alert["candidate"]
    return {"objectId": alert["objectId"], "candid": alert["candid"], "magpsf": c["magpsf"],
            "fid": c["fid"], "n_prv": len(alert.get("prv_candidates") or []),
            "fields": sorted(alert)}


@pytest.fixture
def model(tracking_uri):
    with mlflow.start_run():
        mlflow.preproc.log_model(features, name="p", registered_model_name="stream-prep",
                                 pip_requirements=[])
    return "models:/stream-prep/1"


@verdict("decode", "bad record")
@verdict("pre_processing", "bad record")
def test_json_stream_keeps_keys_adds_provenance_and_dead_letters_poison(any_broker, model,
                                                                        streams):
    broker = any_broker
    topic, out = unique("raw"), unique("clean")
    broker.create_topics(topic)
    records = [{"id": i, "x": i} for i in range(100)]
    records[10] = {"id": 10, "drop": True}
    records[20] = {"id": 20, "x": 1, "boom": True}
    records[40] = {"id": 40, "x": 1, "big": True}
    values = [json.dumps(r).encode() for r in records]
    values[30] = b"{not json"
    produce(broker.bootstrap_servers, topic, values, keys=[b"k%d" % i for i in range(100)],
            headers=[[("trace", b"t%d" % i)] for i in range(100)])

    stream = streams(stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out))
    outputs = consume(broker.bootstrap_servers, out, 96)
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 3)
    assert stream.stop() == 0, stream.text()

    assert sorted(json.loads(m.value())["id"] for m in outputs) == \
        [i for i in range(100) if i not in (10, 20, 30, 40)]
    first = next(m for m in outputs if json.loads(m.value())["id"] == 5)
    assert json.loads(first.value()) == {"id": 5, "double": 10}
    assert first.key() == b"k5"
    h = headers_of(first)
    assert h["trace"] == b"t5"
    assert h["x-preproc-source"] == f"{topic}/0/5".encode()
    assert h["x-preproc-model"] == b"models:/stream-prep/1"

    by_key = {m.key(): m for m in dead}
    poison, garbage, too_big = by_key[b"k20"], by_key[b"k30"], by_key[b"k40"]
    assert json.loads(poison.value())["boom"] is True  # the original bytes
    assert headers_of(poison)["x-preproc-stage"] == b"preprocess"
    assert b"ValueError: cannot preprocess 20" in headers_of(poison)["x-preproc-error"]
    assert headers_of(poison)["x-preproc-error-type"] == b"ValueError"
    assert garbage.value() == b"{not json"
    assert headers_of(garbage)["x-preproc-stage"] == b"decode"
    assert b"not valid JSON" in headers_of(garbage)["x-preproc-error"]
    assert json.loads(too_big.value()) == records[40]
    assert headers_of(too_big)["x-preproc-stage"] == b"produce"
    assert b"too large" in headers_of(too_big)["x-preproc-error"]
    assert headers_of(too_big)["x-preproc-source"] == f"{topic}/0/40".encode()

    stopped = [entry for entry in stream.logs() if entry.get("event") == "stop"][-1]
    assert (stopped["in"], stopped["out"], stopped["dropped"], stopped["failed"]) == (100, 96, 1, 3)


@verdict("pre_processing", "signal")
@verdict("commit", "signal")
@verdict("in-process predict", "signal")
@pytest.mark.parametrize("stop", ["sigterm", "sigkill-when-idle"])
def test_restart_resumes_after_the_last_commit(any_broker, model, streams, stop):
    broker = any_broker
    topic, out, group = unique("raw"), unique("clean"), unique("group")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i, "x": 1}).encode()
                                              for i in range(50)])
    env = stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out, CONSUMER_GROUP_ID=group,
                   COMMIT_INTERVAL_MS="500", BATCH_TIMEOUT_MS="200")
    first = streams(env)
    assert len(consume(broker.bootstrap_servers, out, 50)) == 50
    if stop == "sigterm":
        assert first.stop() == 0  # commits on the way out
    else:
        time.sleep(2)  # several commit intervals with nothing new to read
        first.stop(signal.SIGKILL)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i, "x": 1}).encode()
                                              for i in range(50, 60)])
    second = streams(env)
    # One partition, outputs in input order: once the last new record's output is there, so
    # is any record the restart read again.
    outputs = consume(broker.bootstrap_servers, out, 61, timeout=60,
                      until=lambda got: 59 in {json.loads(m.value())["id"] for m in got})
    assert second.stop() == 0
    # Everything was committed: the restart reads only the 10 new records.
    assert sorted(json.loads(m.value())["id"] for m in outputs) == list(range(60))


def test_sigkill_mid_stream_loses_no_record(broker, model, streams):
    topic, out, group = unique("raw"), unique("clean"), unique("group")
    broker.create_topics(topic, partitions=2)
    n = 20000
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i, "x": i}).encode()
                                              for i in range(n)])
    env = stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out, CONSUMER_GROUP_ID=group,
                   BATCH_SIZE="200")
    victim = streams(env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it while it is busy
        seen = consume(broker.bootstrap_servers, out, 2000, timeout=2)
        if len(seen) >= 2000:
            break
    victim.stop(signal.SIGKILL)
    assert victim.proc.returncode == -signal.SIGKILL
    survivor = streams(env)
    every_id = lambda got: {json.loads(m.value())["id"] for m in got} == set(range(n))  # noqa: E731
    outputs = consume(broker.bootstrap_servers, out, n, timeout=40, until=every_id)
    survivor.stop()
    ids = [json.loads(m.value())["id"] for m in outputs]
    assert set(ids) == set(range(n))  # every record, possibly some twice (at-least-once)
    assert len(ids) >= n


def test_two_instances_share_partitions_and_process_each_record_once(broker, model, streams):
    topic, out, group = unique("raw"), unique("clean"), unique("group")
    broker.create_topics(topic, partitions=4)
    env = stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out, CONSUMER_GROUP_ID=group)
    a, b = streams(env), streams(env)
    # Both in the group before data arrives, so the group's assignment splits the partitions.
    deadline = time.monotonic() + 60
    while not (a.events("assign") and b.events("assign")):
        assert time.monotonic() < deadline, a.text()[-2000:] + b.text()[-2000:]
        time.sleep(0.2)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i, "x": i}).encode()
                                              for i in range(2000)],
            keys=[str(i).encode() for i in range(2000)])
    consume(broker.bootstrap_servers, out, 2000, timeout=30)
    assert a.stop() == 0 and b.stop() == 0
    # Stopped, both have flushed: read everything again, with a few seconds for any extra one.
    outputs = consume(broker.bootstrap_servers, out, 2001, timeout=4)
    ids = sorted(json.loads(m.value())["id"] for m in outputs)
    assert ids == list(range(2000))  # exactly once each when nothing fails
    counts = [[e for e in s.logs() if e.get("event") == "stop"][-1]["in"] for s in (a, b)]
    assert sum(counts) == 2000 and min(counts) > 0, counts


def test_ztf_alert_packets_with_cutouts_dropped(broker, tracking_uri, streams):
    with mlflow.start_run():
        info = mlflow.preproc.log_model(ztf_features, name="ztf", pip_requirements=[])
    topic, out = unique("ztf"), unique("ztf-features")
    broker.create_topics(topic)
    # Each Kafka message is one alert as an Avro container, as the ZTF/Fink streams send them.
    packets = [p.read_bytes() for p in sorted(DATA.glob("*.avro"))]
    produce(broker.bootstrap_servers, topic, packets)
    stream = streams(stream_env(broker.bootstrap_servers, info.model_uri, topic, OUTPUT_TOPIC=out,
                              INPUT_FORMAT="avro", SKIP_CUTOUTS="true"))
    outputs = sorted((json.loads(m.value()) for m in consume(broker.bootstrap_servers, out, 2)),
                     key=lambda r: r["candid"])
    assert stream.stop() == 0
    expected = []
    for packet in packets:
        alert = next(fastavro.reader(io.BytesIO(packet)))
        expected.append({"objectId": alert["objectId"], "candid": alert["candid"],
                         "magpsf": alert["candidate"]["magpsf"], "fid": alert["candidate"]["fid"],
                         "n_prv": len(alert["prv_candidates"] or []),
                         "fields": ["candid", "candidate", "objectId", "prv_candidates",
                                    "publisher", "schemavsn"]})
    assert outputs == sorted(expected, key=lambda r: r["candid"])


def test_schemaless_avro_in_and_out_with_the_models_schemas(broker, tracking_uri, streams):
    in_schema = {"type": "record", "name": "Obs", "fields": [
        {"name": "id", "type": "long"}, {"name": "x", "type": "double"}]}
    out_schema = {"type": "record", "name": "Feat", "fields": [
        {"name": "id", "type": "long"}, {"name": "double", "type": "double"}]}
    with mlflow.start_run():
        info = mlflow.preproc.log_model(features, name="p", avro_schema=in_schema,
                                        output_avro_schema=out_schema, pip_requirements=[])
    topic, out = unique("avro"), unique("avro-out")
    broker.create_topics(topic)
    parsed = fastavro.parse_schema(in_schema)
    values = []
    for i in range(20):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, {"id": i, "x": i / 2})
        values.append(buf.getvalue())
    produce(broker.bootstrap_servers, topic, values)
    stream = streams(stream_env(broker.bootstrap_servers, info.model_uri, topic, OUTPUT_TOPIC=out,
                              INPUT_FORMAT="avro", OUTPUT_FORMAT="avro"))
    outputs = consume(broker.bootstrap_servers, out, 20)
    assert stream.stop() == 0
    decoded = sorted((fastavro.schemaless_reader(io.BytesIO(m.value()),
                                                 fastavro.parse_schema(out_schema), None)
                      for m in outputs), key=lambda r: r["id"])
    assert decoded == [{"id": i, "double": float(i)} for i in range(20)]


def refuse_negative(record):
    if record["x"] < 0:
        raise ValueError(f"x of {record['id']} is negative")
    return {"id": record["id"]}


def test_a_container_message_with_failing_records_is_one_dead_letter_naming_them(
        broker, tracking_uri, streams):
    # One Avro container of 50 records, 3 of them failing, and a record of its own before
    # it: the container's good records are produced and it is dead-lettered once, with the
    # indexes in the message of its failing records (#18.6).
    with mlflow.start_run():
        info = mlflow.preproc.log_model(refuse_negative, name="p", pip_requirements=[])
    schema = fastavro.parse_schema({"type": "record", "name": "Obs", "fields": [
        {"name": "id", "type": "long"}, {"name": "x", "type": "long"}]})

    def container(records):
        buf = io.BytesIO()
        fastavro.writer(buf, schema, records)
        return buf.getvalue()

    topic, out = unique("containers"), unique("containers-out")
    broker.create_topics(topic)
    records = [{"id": i, "x": -1 if i in (3, 7, 11) else 1} for i in range(50)]
    produce(broker.bootstrap_servers, topic, [container([{"id": 1000, "x": 1}]),
                                              container(records)])
    stream = streams(stream_env(broker.bootstrap_servers, info.model_uri, topic,
                                OUTPUT_TOPIC=out, INPUT_FORMAT="avro", BATCH_SIZE="10"))
    outputs = consume(broker.bootstrap_servers, out, 48)
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 2, timeout=5)
    assert stream.stop() == 0, stream.text()[-2000:]
    assert sorted(json.loads(m.value())["id"] for m in outputs) == \
        [i for i in range(50) if i not in (3, 7, 11)] + [1000]
    [letter] = dead
    h = headers_of(letter)
    assert h["x-preproc-source"] == f"{topic}/0/1".encode()
    assert h["x-preproc-failed-records"] == b"3,7,11"
    assert h["x-preproc-error"].startswith(b"3 of the message's 50 records failed; record 3: "
                                           b"pre_processing raised ValueError: x of 3 is")
    assert h["x-preproc-stage"] == b"preprocess"
    assert list(fastavro.reader(io.BytesIO(letter.value()))) == records  # the whole message
    stopped = [e for e in stream.logs() if e.get("event") == "stop"][-1]
    assert stopped["failed"] == 1


@verdict("pre_processing", "dependency down")
def test_a_version_that_fails_every_record_trips_the_brake_instead_of_draining_the_topic(
        broker, model, streams):
    topic = unique("raw")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic,
            [json.dumps({"id": i, "x": 1, "boom": True}).encode() for i in range(1000)])
    port = free_port()
    env = stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=unique("out"),
                     METRICS_PORT=str(port), METRICS_HOST="127.0.0.1", BATCH_SIZE="100",
                     DLQ_BRAKE_WINDOW="200",
                     # no periodic commit before the window is full: what is checked is that
                     # none follows once the brake is engaged
                     COMMIT_INTERVAL_MS="600000")
    stream = streams(env)
    deadline = time.monotonic() + 60
    health = None
    while time.monotonic() < deadline and not stream.events("dead_letter_brake"):
        time.sleep(0.2)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    except urllib.error.HTTPError as err:
        health = (err.code, json.loads(err.read()))
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 1000, timeout=3)
    assert stream.stop() == 0, stream.text()[-2000:]
    assert health is not None and health[0] == 503, stream.text()[-2000:]
    reason = health[1]["reason"]
    assert reason.startswith("dead-letter brake engaged: ") and "DLQ_BRAKE_RATIO" in reason
    assert 200 <= len(dead) < 300  # the window (in whole batches), not the topic
    from conftest import committed_offsets

    assert committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic) == \
        [-1001]  # nothing: fixed, the next version processes them all again
    # Hundreds of dead letters are a few lines: the first of each stats interval in full,
    # then one line per interval counting them by stage and error type.
    summaries = stream.events("dead_letters")
    assert sum(s["dead_letters"] for s in summaries) == stream.events("stop")[0]["failed"]
    assert len(stream.events("dead_letter")) <= 3 * len(summaries) < 30
    assert {k for s in summaries for k in s["by_stage_and_type"]} == {"preprocess/ValueError"}


def test_confluent_wire_format_with_local_schemas_by_id(broker, model, streams, tmp_path):
    schema = {"type": "record", "name": "Obs", "fields": [
        {"name": "id", "type": "long"}, {"name": "x", "type": "long"}]}
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "42.avsc").write_text(json.dumps(schema))
    topic, out = unique("confluent"), unique("confluent-out")
    broker.create_topics(topic)
    values = []
    for i in range(5):
        buf = io.BytesIO(struct.pack(">bI", 0, 42))
        buf.seek(5)
        fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), {"id": i, "x": i})
        values.append(buf.getvalue())
    values.append(struct.pack(">bI", 0, 7) + b"\x02\x02")  # an id nobody knows
    produce(broker.bootstrap_servers, topic, values)
    stream = streams(stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out,
                              INPUT_FORMAT="confluent-avro",
                              AVRO_SCHEMA_DIR=str(tmp_path / "schemas")))
    outputs = consume(broker.bootstrap_servers, out, 5)
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 1)
    assert stream.stop() == 0
    assert sorted(json.loads(m.value())["double"] for m in outputs) == [0, 2, 4, 6, 8]
    assert b"no schema with id 7" in headers_of(dead[0])["x-preproc-error"]


def test_default_output_topic_follows_the_legacy_naming(broker, model, streams):
    topic = unique("raw")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [b'{"id": 1, "x": 2}'])
    stream = streams(stream_env(broker.bootstrap_servers, model, topic, KAFKA_TOPIC_SUFFIX="cleaned"))
    outputs = consume(broker.bootstrap_servers, "stream-prep-1-cleaned", 1)
    assert stream.stop() == 0
    assert [json.loads(m.value()) for m in outputs] == [{"id": 1, "double": 4}]


def test_metrics_and_health_endpoints(broker, model, streams):
    topic, out, port = unique("raw"), unique("clean"), free_port()
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [b'{"id": 1, "x": 2}', b'{"id": 2, "drop": 1}'])
    stream = streams(stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out, METRICS_PORT=str(port),
                              METRICS_HOST="127.0.0.1"))
    consume(broker.bootstrap_servers, out, 1)
    deadline = time.monotonic() + 20
    while True:
        try:
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            if 'outcome="dropped"} 1.0' in metrics:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "metrics never showed the dropped record"
        time.sleep(0.5)
    assert 'mlflow_preproc_records_total{command="stream",outcome="out"} 1.0' in metrics
    assert "mlflow_preproc_batch_seconds_count" in metrics
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
    assert health["status"] == "ok" and health["out"] == 1
    assert stream.stop() == 0


def test_a_partition_whose_records_are_not_fetched_yet_is_not_caught_up(broker, model, streams):
    # A rollout's verdict on a new version waits for "caught up". The broker holds the first
    # fetch (fetch.min.bytes it cannot fill, for fetch.wait.max.ms): the stream owns the
    # partition, polls and finds nothing, while ten records wait on the broker. Caught up is
    # its position at the partition's end, not an empty poll (it was, and read "settled").
    topic, out, port = unique("raw"), unique("clean"), free_port()
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i, "x": i}).encode()
                                              for i in range(10)])
    stream = streams(stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out,
                                METRICS_PORT=str(port), METRICS_HOST="127.0.0.1",
                                LIBRDKAFKA_FETCH_MIN_BYTES="1000000",
                                LIBRDKAFKA_FETCH_WAIT_MAX_MS="6000"))

    def health() -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return {}

    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        answer = health()
        if answer.get("joined"):
            seen.append((answer["in"], answer["settled"]))
            if answer["in"] == 10 and answer["settled"]:
                break
        time.sleep(0.1)
    assert seen and seen[-1] == (10, True), f"never caught up: {seen[-5:]}\n{stream.text()[-2000:]}"
    waiting = [settled for records_in, settled in seen if records_in == 0]
    assert waiting and not any(waiting), "read as caught up before the records were fetched"
    assert len(consume(broker.bootstrap_servers, out, 10)) == 10
    assert stream.stop() == 0


@pytest.mark.parametrize("env, message", [
    ({"INPUT_TOPIC": "no-such-topic"}, "input topic no-such-topic does not exist"),
    ({"MODEL_URI": "models:/no-such-model/3"}, "models:/no-such-model/3 was not found"),
    ({"INPUT_FORMAT": "xml"}, "INPUT_FORMAT='xml' is not one of json, avro, confluent-avro"),
    ({"AUTO_CREATE_TOPICS": "false", "OUTPUT_TOPIC": "missing-out"},
     "do not exist and AUTO_CREATE_TOPICS is false"),
    ({"OUTPUT_FORMAT": "avro"}, "avro output needs an output schema"),
])
def test_fatal_errors_stop_with_one_clear_line(broker, model, streams, env, message):
    topic = unique("raw")
    broker.create_topics(topic)
    stream = streams(stream_env(broker.bootstrap_servers, model, topic, **{"OUTPUT_TOPIC": unique("o"), **env}))
    assert stream.proc.wait(60) == 2
    last = stream.text().strip().splitlines()[-1]
    assert last.startswith("mlflow-preproc stream: error: ") and message in last, stream.text()
    assert "Traceback" not in stream.text()


def test_an_output_the_broker_refuses_dead_letters_its_input_and_the_stream_goes_on(
        broker, model, streams):
    # The output topic takes record batches of up to 1,000 bytes: the producer (1 MB) sends
    # the output of record 1 (1.2 kB), and the broker refuses it (MESSAGE_TOO_LARGE). The
    # broker refuses a whole record batch: record 1 is sent once record 0's output is in, so
    # that they are not in one (a refused batch dead-letters the inputs of all its outputs).
    topic, out = unique("raw"), unique("clean")
    broker.create_topics(topic)
    broker.create_topics(out, config={"max.message.bytes": "1000"})
    values = [b'{"id": 0, "x": 1}', json.dumps({"id": 1, "x": "x" * 600}).encode()]
    produce(broker.bootstrap_servers, topic, values[:1], keys=[b"k0"],
            headers=[[("trace", b"t0")]])
    stream = streams(stream_env(broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out))
    [output] = consume(broker.bootstrap_servers, out, 1)
    produce(broker.bootstrap_servers, topic, values[1:], keys=[b"k1"],
            headers=[[("trace", b"t1")]])
    [dead] = consume(broker.bootstrap_servers, f"{topic}-dlq", 1)
    assert stream.stop() == 0, stream.text()[-2000:]
    assert json.loads(output.value()) == {"id": 0, "double": 2}
    assert (dead.key(), dead.value()) == (b"k1", values[1])
    h = headers_of(dead)
    assert h["trace"] == b"t1"
    assert h["x-preproc-stage"] == b"produce"
    assert b"Message size too large" in h["x-preproc-error"]
    assert h["x-preproc-error-type"] == b"MSG_SIZE_TOO_LARGE"  # the broker's error code
    assert h["x-preproc-source"] == f"{topic}/0/1".encode()
    assert stream.events("stop")[-1]["failed"] == 1

"""`mlflow-preproc status` and `mlflow-preproc dlq inspect|replay` on the dead letters a real
stream wrote, on Apache Kafka: the operator's loop of looking at what failed and sending it
through again."""

from __future__ import annotations

import json
import os
import subprocess
import time

import mlflow
import pytest

from conftest import (BIN, committed_offsets, consume, free_port, headers_of, produce,
                      stream_env, unique)
from verdict_cells import verdict

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def features(record):
    if "boom" in record:
        raise ValueError(f"cannot preprocess {record['id']}")
    return {"id": record["id"], "double": record["x"] * 2}  # KeyError without x


def fixed_features(record):
    """The next version: records with "boom" are fine now, but for one."""
    if record["id"] == 33:
        raise ValueError("cannot preprocess 33 either")
    return {"id": record["id"], "double": record.get("x", 0) * 0}


def dlq(*args: str, bootstrap: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlflow-preproc"), "dlq", *args], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap})


@verdict("replay", "bad record")
def test_inspect_counts_what_failed_and_replay_sends_it_back_once(broker, tracking_uri,
                                                                  streams):
    with mlflow.start_run():
        model = mlflow.preproc.log_model(features, name="p", pip_requirements=[]).model_uri
    topic, servers = unique("raw"), broker.bootstrap_servers
    broker.create_topics(topic)
    records = [{"id": i, "x": i} for i in range(40)]
    for i in (3, 13, 23, 33):
        records[i] = {"id": i, "x": 1, "boom": True}
    for i in (5, 15):
        records[i] = {"id": i}
    values = [json.dumps(r).encode() for r in records]
    values[7] = b"{not json"
    produce(servers, topic, values, keys=[b"k%d" % i for i in range(40)],
            headers=[[("trace", b"t%d" % i)] for i in range(40)])
    port = free_port()
    env = stream_env(servers, model, topic, OUTPUT_TOPIC=unique("clean"),
                     METRICS_PORT=str(port), METRICS_HOST="127.0.0.1")
    stream = streams(env)
    consume(servers, f"{topic}-dlq", 7)

    # status: the group from the broker, the instance from its metrics endpoint
    deadline = time.monotonic() + 60
    while True:  # until the stream has committed past the 40 records
        found = status(env["CONSUMER_GROUP_ID"], topic, servers, "--metrics",
                       f"http://127.0.0.1:{port}", "--interval", "0.5")
        if found["partitions"][0]["committed"] == 40 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # from the broker: the group's one member and what it owns, committed and end offsets,
    # and the lag between them
    assert found["partitions"] == [{"topic": topic, "partition": 0, "committed": 40,
                                    "end": 40, "lag": 0}], found
    assert found["state"] == "STABLE", found
    (member,) = found["members"]
    assert member["partitions"] == f"{topic}/0" and member["host"], member
    (instance,) = found["instances"]
    assert instance["partitions"] == 1 and instance["error"] is None
    assert instance["records"]["in"] == 40 and instance["records"]["failed"] == 7
    assert instance["dead_letters"] == {"preprocess/ValueError": 4, "preprocess/KeyError": 2,
                                        "decode/DecodeError": 1}
    assert stream.stop() == 0, stream.text()[-2000:]

    # inspect: counts by stage and error type, the first of each, and nothing committed
    inspected = dlq("inspect", f"{topic}-dlq", "--json", bootstrap=servers)
    assert inspected.returncode == 0, inspected.stderr
    summary = json.loads(inspected.stdout)
    assert summary["dead_letters"] == 7
    kinds = {(k["stage"], k["error_type"]): k for k in summary["kinds"]}
    assert {kind: k["count"] for kind, k in kinds.items()} == {
        ("preprocess", "ValueError"): 4, ("preprocess", "KeyError"): 2,
        ("decode", "DecodeError"): 1}
    first = kinds[("preprocess", "ValueError")]["examples"][0]
    assert first["source"] == {"topic": topic, "partition": 0, "offset": 3}
    assert "cannot preprocess 3" in first["error"] and first["key"] == "k3"
    assert len(kinds[("preprocess", "ValueError")]["examples"]) == 3  # the first three
    assert committed_offsets(servers, "mlflow-preproc-dlq-reader", f"{topic}-dlq") == [-1001]
    text = dlq("inspect", f"{topic}-dlq", bootstrap=servers).stdout
    assert f"{topic}-dlq: 7 dead letters" in text and "preprocess  ValueError" in text

    # replay through a fixed model version: its outputs go to the output topic, with the
    # input's key and headers, the new model's provenance and the replay header; a dead
    # letter that fails again stays where it is
    with mlflow.start_run():
        fixed = mlflow.preproc.log_model(fixed_features, name="p", pip_requirements=[]).model_uri
    out = unique("fixed")
    broker.create_topics(out)
    through = ("replay", f"{topic}-dlq", "--error-type", "ValueError", "--error-type",
               "DecodeError", "--through", fixed, "--output-topic", out)
    dry = dlq(*through, "--dry-run", bootstrap=servers)
    assert dry.returncode == 0, dry.stderr
    assert f"would replay 3 dead letters (3 to {out})" in dry.stderr, dry.stderr
    assert consume(servers, out, 1, timeout=3) == []
    done = dlq(*through, bootstrap=servers)
    assert done.returncode == 0, done.stderr
    assert (f"replayed 3 dead letters (3 to {out}); 2 dead letters failed again through the "
            "model and stay in the dead-letter topic (decode/DecodeError: 1 (") in done.stderr
    assert ("preprocess/ValueError: 1 (pre_processing raised ValueError: cannot preprocess 33 "
            "either)") in done.stderr, done.stderr
    outputs = consume(servers, out, 3)
    assert sorted((m.key(), json.loads(m.value())["double"]) for m in outputs) == [
        (b"k13", 0), (b"k23", 0), (b"k3", 0)]
    h = headers_of(next(m for m in outputs if m.key() == b"k13"))
    assert h["trace"] == b"t13" and h["x-preproc-source"] == f"{topic}/0/13".encode()
    assert h["x-preproc-model"] == fixed.encode() and not any(
        k.startswith("x-preproc-error") for k in h)
    assert h["x-preproc-replay-of"].decode().startswith(f"{topic}-dlq/0/")
    again = dlq(*through, bootstrap=servers)  # once: those that failed are tried again
    assert "replayed 0 dead letters; 2 dead letters failed again" in again.stderr, again.stderr
    assert "3 were replayed before and were skipped" in again.stderr
    assert len(consume(servers, out, 4, timeout=3)) == 3

    # replay, dry: says what it would send, sends nothing
    dry = dlq("replay", f"{topic}-dlq", "--stage", "preprocess", "--dry-run", bootstrap=servers)
    assert "would replay 3 dead letters (3 to " + topic + ")" in dry.stderr, dry.stderr
    assert len(consume(servers, topic, 41, timeout=3)) == 40

    # replay the KeyErrors: back to their topic with their key, their own headers and where
    # they come from; the stream's error headers stay behind
    done = dlq("replay", f"{topic}-dlq", "--error-type", "KeyError", bootstrap=servers)
    assert done.returncode == 0, done.stderr
    assert f"replayed 2 dead letters (2 to {topic})" in done.stderr
    replayed = consume(servers, topic, 42)[40:]
    assert sorted(m.key() for m in replayed) == [b"k15", b"k5"]
    back = next(m for m in replayed if m.key() == b"k5")
    assert json.loads(back.value()) == {"id": 5}
    h = headers_of(back)
    assert h["trace"] == b"t5" and not any(k.startswith("x-preproc-error") for k in h)
    assert h["x-preproc-replay-of"].decode().startswith(f"{topic}-dlq/0/")

    # once only: a second replay of the same dead letters is refused, unless forced
    again = dlq("replay", f"{topic}-dlq", "--stage", "preprocess", bootstrap=servers)
    assert ("replayed 1 dead letter " in again.stderr and
            "5 were replayed before and were skipped (--force replays them again)"
            in again.stderr), again.stderr
    forced = dlq("replay", f"{topic}-dlq", "--error-type", "KeyError", "--force",
                 "--to", unique("retry"), bootstrap=servers)
    assert "topic(s) retry" in forced.stderr and "do not exist" in forced.stderr
    assert len(consume(servers, topic, 44, timeout=3)) == 43

    # status of the stopped stream: a group without members, and the three replayed records
    # waiting for it as lag, in offsets: each of the two replays' transactions ended with a
    # commit marker, which takes an offset of its own
    found = status(env["CONSUMER_GROUP_ID"], topic, servers)
    assert (found["state"], found["members"]) == ("EMPTY", []), found
    assert found["partitions"] == [{"topic": topic, "partition": 0, "committed": 40,
                                    "end": 45, "lag": 5}], found


def status(group: str, topic: str, bootstrap: str, *args: str) -> dict:
    shown = subprocess.run([str(BIN / "mlflow-preproc"), "status", "--group", group, "--topic",
                            topic, "--json", *args], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap})
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_a_missing_topic_and_a_bad_option_are_one_line(broker):
    missing = dlq("inspect", "no-such-dlq", bootstrap=broker.bootstrap_servers)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"mlflow-preproc dlq: error: topic no-such-dlq does not exist on "
        f"{broker.bootstrap_servers}; a stream's dead-letter topic is INPUT_TOPIC-dlq unless "
        "DLQ_TOPIC names another")
    bad = dlq("replay", "x-dlq", "--offsets", "0:5", bootstrap=broker.bootstrap_servers)
    assert bad.returncode == 2 and "'0:5' is not PARTITION:FROM-TO; e.g. 0:100-250" in bad.stderr


@verdict("replay", "fenced")
def test_a_replay_fenced_by_a_second_replay_of_the_topic_stops_and_sends_nothing(broker):
    # Both replays of one dead-letter topic share a transactional id: the second one's start
    # fences the first, whose next transaction fails whole (#35: the fenced cell).
    from types import SimpleNamespace

    from mlflow_preproc.streaming.dead_letters import DeadLetterError, _Sender

    kafka = {"bootstrap.servers": broker.bootstrap_servers}
    topic, source = unique("dlq"), unique("source")
    broker.create_topics(topic, source)
    letter = SimpleNamespace(key=b"k", where="0/0")
    first = _Sender(kafka, topic, f"{topic}-replayed").__enter__()
    second = _Sender(kafka, topic, f"{topic}-replayed").__enter__()
    with pytest.raises(DeadLetterError, match="the replay stopped after"):
        first.send([(letter, [(source, b"from the first", [])])])
    second.send([(letter, [(source, b"from the second", [])])])
    assert [m.value() for m in consume(broker.bootstrap_servers, source, 2, timeout=5)] == \
        [b"from the second"]

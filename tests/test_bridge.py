"""`mlflow-preproc bridge` between Apache Kafka and a real `mlflow models serve`."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from conftest import consume, headers_of, produce, unique
from verdict_cells import verdict

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def classifier_url(tracking_uri, serve_model):
    x = pd.DataFrame({"magpsf": [14.0, 15.0, 20.0, 21.0], "snr": [10.0, 12.0, 8.0, 9.0]})
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(LogisticRegression().fit(x, [1, 1, 0, 0]), name="clf",
                                        input_example=x.head(2), pip_requirements=[])
    return serve_model(info.model_uri)


@verdict("bridge call", "bad record")
def test_bridge_predicts_every_record_keyed_like_its_input(broker, classifier_url, streams):
    topic, out = unique("features"), unique("predictions")
    broker.create_topics(topic)
    records = [{"magpsf": 14.5, "snr": 11.0}, {"magpsf": 20.5, "snr": 8.5}] * 15
    values = [json.dumps(r).encode() for r in records]
    values[7] = json.dumps({"magpsf": "bright", "snr": 1.0}).encode()  # the model refuses it
    values[9] = b"\xff not json"
    produce(broker.bootstrap_servers, topic, values, keys=[b"obj%d" % i for i in range(30)])

    bridge = streams({"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "INPUT_TOPIC": topic,
                      "OUTPUT_TOPIC": out, "API_URL": classifier_url, "BATCH_SIZE": "8",
                      "CONSUMER_GROUP_ID": unique("bridge")}, command="bridge")
    predictions = consume(broker.bootstrap_servers, out, 28)
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 2)
    assert bridge.stop() == 0, bridge.text()

    by_key = {m.key(): json.loads(m.value()) for m in predictions}
    assert len(predictions) == 28
    assert all(by_key[b"obj%d" % i] == (1 if i % 2 == 0 else 0)
               for i in range(30) if i not in (7, 9))
    first = next(m for m in predictions if m.key() == b"obj0")
    assert headers_of(first)["x-preproc-source"] == f"{topic}/0/0".encode()
    stages = {m.key(): headers_of(m)["x-preproc-stage"] for m in dead}
    assert stages == {b"obj7": b"predict", b"obj9": b"decode"}
    refused = next(m for m in dead if m.key() == b"obj7")
    assert b"refused the input with HTTP 400" in headers_of(refused)["x-preproc-error"]

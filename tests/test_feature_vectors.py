"""The field's contract: pre_processing returns a feature vector, named by FEATURE_NAMES, fed
to a model over REST (bridge) or in the same process (stream --prediction-model-uri).

The rule for what pre_processing may return is tested row by row through every way a model
runs: pyfunc/REST, `mlflow-preproc run`, `stream` and `bridge`. The Fink pattern
(examples/fink_contract: FEATURE_NAMES + pre_processing -> list[float]) runs on the real ZTF
alerts into a real scikit-learn classifier, in one process and through the bridge.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import fastavro
import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import (BIN, DATA, consume, headers_of, post_json, produce, stream_env,
                      unique)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fink_contract"

# What pre_processing returns for each input kind, and the outputs that stand for it.
ROWS = {
    "dict": ({"a": 1}, [{"a": 1}]),
    "none": (None, []),
    "empty list": ([], []),
    "list of dicts": ([{"i": 0}, {"i": 1}], [{"i": 0}, {"i": 1}]),
    "vector": ([18.1, 0.3, 12.0], [[18.1, 0.3, 12.0]]),
    "tuple": ((1, 2), [[1, 2]]),
    "numpy array": (np.array([0.5, 1.5]), [[0.5, 1.5]]),
    "mixed values": ([1.0, True, "g", None], [[1.0, True, "g", None]]),
    "number": (42, [42]),
    "string": ("bogus", ["bogus"]),
    "nested list": ([[1, 2], [3]], [[[1, 2], [3]]]),
}


def returns_what_it_is_asked(record):
    value = ROWS[record["kind"]][0]
    return value.copy() if isinstance(value, np.ndarray) else value


def expected_outputs(kinds):
    return [out for kind in kinds for out in ROWS[kind][1]]


@pytest.fixture
def rule_model(tracking_uri):
    with mlflow.start_run():
        return mlflow.preproc.log_model(returns_what_it_is_asked, name="rule",
                                        pip_requirements=[]).model_uri


def test_the_output_rule_through_pyfunc_and_rest(rule_model, serve_model):
    records = [{"kind": k} for k in ROWS]
    assert mlflow.pyfunc.load_model(rule_model).predict(records) == expected_outputs(ROWS)
    status, body = post_json(f"{serve_model(rule_model)}/invocations", {"inputs": records})
    assert status == 200, body
    assert body == {"predictions": expected_outputs(ROWS)}


@pytest.mark.slow
def test_the_output_rule_through_run(rule_model, tmp_path):
    lines = b"".join(json.dumps({"kind": k}).encode() + b"\n" for k in ROWS)
    proc = subprocess.run([str(BIN / "mlflow-preproc"), "run", "-m", rule_model], input=lines,
                          capture_output=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert [json.loads(line) for line in proc.stdout.splitlines()] == expected_outputs(ROWS)


@pytest.mark.slow
@pytest.mark.kafka
def test_the_output_rule_through_stream_and_bridge(rule_model, broker, streams, tracking_uri,
                                                   serve_model):
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run():
        echo = mlflow.pyfunc.log_model(name="echo", python_model=Echo(),
                                       pip_requirements=[]).model_uri
    topic, features, predictions = unique("raw"), unique("features"), unique("predictions")
    broker.create_topics(topic)
    kinds = list(ROWS)
    produce(broker.bootstrap_servers, topic, [json.dumps({"kind": k}).encode() for k in kinds],
            keys=[k.encode() for k in kinds])
    stream = streams({"MODEL_URI": rule_model, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                      "INPUT_TOPIC": topic, "OUTPUT_TOPIC": features,
                      "CONSUMER_GROUP_ID": unique("g")})
    expected = expected_outputs(kinds)
    out = consume(broker.bootstrap_servers, features, len(expected))
    assert sorted(map(json.dumps, (json.loads(m.value()) for m in out))) == \
        sorted(map(json.dumps, expected))
    bridge = streams({"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                      "INPUT_TOPIC": features, "OUTPUT_TOPIC": predictions,
                      "API_URL": serve_model(echo), "BATCH_SIZE": "1",
                      "CONSUMER_GROUP_ID": unique("b")}, command="bridge")
    # A ragged nested list cannot be one of the scoring server's `instances` (a numpy array):
    # the server refuses it and the bridge dead-letters it with the server's reason.
    predictable = [o for o in expected if o != [[1, 2], [3]]]
    echoed = consume(broker.bootstrap_servers, predictions, len(predictable))
    [refused] = consume(broker.bootstrap_servers, f"{features}-dlq", 1)
    assert stream.stop() == 0 and bridge.stop() == 0
    # Named records went as dataframe_split and come back as records; everything else went
    # as instances and comes back as it was sent.
    assert sorted(map(json.dumps, (json.loads(m.value()) for m in echoed))) == \
        sorted(map(json.dumps, predictable))
    assert json.loads(refused.value()) == [[1, 2], [3]]
    assert headers_of(refused)["x-preproc-stage"] == b"predict"


# ---- feature names ------------------------------------------------------------------------

def test_feature_names_from_a_module_name_the_vector_the_signature_and_the_avro_schema(
        tracking_uri):
    with mlflow.start_run():
        info = mlflow.preproc.log_model(str(EXAMPLE / "preprocessing.py"), name="fink",
                                        pip_requirements=[])
    from examples_fink_contract import FEATURE_NAMES, pre_processing  # noqa: F401

    model = mlflow.pyfunc.load_model(info.model_uri)
    assert [c.name for c in model.metadata.signature.outputs.inputs] == FEATURE_NAMES
    from mlflow_preproc.runtime.jsonable import to_jsonable

    alerts = ztf_alerts()
    assert model.predict(alerts) == [to_jsonable(dict(zip(FEATURE_NAMES, pre_processing(a))))
                                     for a in alerts]  # NaN is null, as JSON needs
    loaded = mlflow.preproc.load_preprocessing(info.model_uri)
    assert [f["name"] for f in loaded.output_avro_schema["fields"]] == FEATURE_NAMES
    fastavro.parse_schema(loaded.output_avro_schema)


def test_feature_names_of_a_folder_and_an_argument(tracking_uri, tmp_path):
    folder = tmp_path / "prep"
    folder.mkdir()
    (folder / "preprocessing.py").write_text(
        "FEATURE_NAMES = ['g_r', 'flag']\n"
        "def pre_processing(alert):\n    return [alert['g'] - alert['r'], alert['g'] > 19]\n")
    with mlflow.start_run():
        from_folder = mlflow.preproc.log_model(
            str(folder), name="f", input_example={"g": 19.5, "r": 19.0},
            pip_requirements=[]).model_uri
        from_argument = mlflow.preproc.log_model(
            lambda a: (a["g"], a["r"]), name="a", feature_names=["g", "r"],
            pip_requirements=[]).model_uri
    folder_model = mlflow.pyfunc.load_model(from_folder)
    assert folder_model.predict([{"g": 20.0, "r": 19.0}]) == [{"g_r": 1.0, "flag": True}]
    types = {c.name: c.type.name for c in folder_model.metadata.signature.outputs.inputs}
    assert types == {"g_r": "double", "flag": "boolean"}  # from the input example's outputs
    assert mlflow.pyfunc.load_model(from_argument).predict([{"g": 1, "r": 2}]) == [
        {"g": 1, "r": 2}]


def test_a_vector_of_the_wrong_length_is_that_records_error(tracking_uri):
    from mlflow_preproc.runtime.records import RecordError

    with mlflow.start_run():
        uri = mlflow.preproc.log_model(lambda a: a["values"], name="p",
                                       feature_names=["a", "b", "c"],
                                       pip_requirements=[]).model_uri
    with pytest.raises(RecordError, match=r"record 1: pre_processing returned 2 value\(s\) but "
                       r"FEATURE_NAMES names 3"):
        mlflow.pyfunc.load_model(uri).predict([{"values": [1, 2, 3]}, {"values": [1, 2]}])
    with pytest.raises(Exception, match="fails on the input example"):
        with mlflow.start_run():
            mlflow.preproc.log_model(lambda a: a["values"], name="q", feature_names=["a"],
                                     input_example={"values": [1, 2]})


def test_bad_feature_names_are_refused_at_log_time(tracking_uri):
    from mlflow.exceptions import MlflowException

    for names, message in ((["a", "a"], "names a more than once"),
                           ("ab", "must be a list of non-empty strings")):
        with pytest.raises(MlflowException, match=message):
            with mlflow.start_run():
                mlflow.preproc.log_model(lambda a: [1, 2], name="p", feature_names=names)


# ---- the Fink pattern, from log_model to predictions ----------------------------------------

def ztf_alerts(n: int = 2, seed: int = 3) -> list[dict]:
    """The real ZTF alerts (cutouts dropped), replicated to ``n`` with jittered magnitudes."""
    originals = []
    for path in sorted(DATA.glob("*.avro")):
        with open(path, "rb") as f:
            alert = next(fastavro.reader(f))
        originals.append({k: v for k, v in alert.items() if not k.startswith("cutout")})
    rng = random.Random(seed)
    alerts = []
    for i in range(n):
        alert = json.loads(json.dumps(originals[i % len(originals)], default=str))
        alert["candid"] += i
        alert["candidate"]["magpsf"] += rng.uniform(-2, 2)
        alerts.append(alert)
    return alerts


def as_container(alert: dict) -> bytes:
    """An alert as ZTF and Fink publish it: one Avro container per message."""
    with open(sorted(DATA.glob("*.avro"))[0], "rb") as f:
        schema = fastavro.reader(f).writer_schema
    full = {**alert, "cutoutScience": None, "cutoutTemplate": None, "cutoutDifference": None}
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [full])
    return buf.getvalue()


@pytest.fixture
def fink(tracking_uri):
    """The Fink-pattern preprocessing and a classifier trained on its named features."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from examples_fink_contract import FEATURE_NAMES, pre_processing

    train = pd.DataFrame([pre_processing(a) for a in ztf_alerts(60, seed=1)],
                         columns=FEATURE_NAMES)
    labels = (train["magpsf"] < train["magpsf"].median()).astype(int)
    classifier = make_pipeline(SimpleImputer(), LogisticRegression()).fit(train, labels)
    with mlflow.start_run():
        mlflow.preproc.log_model(str(EXAMPLE / "preprocessing.py"), name="features",
                                 registered_model_name="fink-features")
        mlflow.sklearn.log_model(classifier, name="classifier", input_example=train.head(3),
                                 registered_model_name="fink-classifier",
                                 skops_trusted_types=["numpy.dtype"])  # SimpleImputer's

    def direct(alert):  # what calling the function and the classifier directly gives
        row = pd.DataFrame([pre_processing(alert)], columns=FEATURE_NAMES)
        return int(classifier.predict(row)[0])

    return direct


def fink_stream_env(broker, topic: str, out: str, **extra: str) -> dict[str, str]:
    """The stream of the Fink pattern: ZTF Avro alerts in, cutouts dropped."""
    return stream_env(broker.bootstrap_servers, "models:/fink-features/1", topic,
                      **{"OUTPUT_TOPIC": out, "INPUT_FORMAT": "avro", "SKIP_CUTOUTS": "true",
                         **extra})


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_fink_alerts_to_predictions_in_one_process(fink, broker, streams, guarantee):
    # The one-hop stream in both modes (#35): under exactly-once its predictions are
    # visible to a read_committed reader once their transaction commits.
    alerts = ztf_alerts(40)
    topic, out = unique("fink-alert"), unique("predictions")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [as_container(a) for a in alerts],
            keys=[str(a["candid"]).encode() for a in alerts])
    stream = streams(fink_stream_env(broker, topic, out, KEEP_FIELDS="objectId,candid",
                                     PROCESSING_GUARANTEE=guarantee),
                     args=("--prediction-model-uri", "models:/fink-classifier/1"))
    predictions = consume(broker.bootstrap_servers, out, len(alerts))
    assert stream.stop() == 0, stream.text()[-3000:]
    assert len(predictions) == len(alerts)
    assert stream.events("start")[0]["processing_guarantee"] == guarantee
    by_key = {m.key(): m for m in predictions}
    for alert in alerts:
        message = by_key[str(alert["candid"]).encode()]  # the alert's key is kept
        assert json.loads(message.value()) == {
            "objectId": alert["objectId"], "candid": alert["candid"],
            "prediction": fink(alert)}
        headers = headers_of(message)
        assert headers["x-preproc-model"] == b"models:/fink-features/1"
        assert headers["x-preproc-prediction-model"] == b"models:/fink-classifier/1"
    assert len({json.loads(m.value())["prediction"] for m in predictions}) == 2  # both classes


@pytest.mark.slow
@pytest.mark.kafka
def test_fink_alerts_to_predictions_through_the_bridge(fink, broker, streams, serve_model):
    alerts = ztf_alerts(40)
    topic, features, out = unique("fink-alert"), unique("features"), unique("predictions")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [as_container(a) for a in alerts],
            keys=[str(a["candid"]).encode() for a in alerts])
    stream = streams(fink_stream_env(broker, topic, features))
    bridge = streams({"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                      "INPUT_TOPIC": features, "OUTPUT_TOPIC": out, "BATCH_SIZE": "16",
                      "API_URL": serve_model("models:/fink-classifier/1"),
                      "CONSUMER_GROUP_ID": unique("b")}, command="bridge")
    predictions = consume(broker.bootstrap_servers, out, len(alerts))
    assert stream.stop() == 0 and bridge.stop() == 0
    by_key = {m.key(): m for m in predictions}
    for alert in alerts:
        message = by_key[str(alert["candid"]).encode()]
        assert json.loads(message.value()) == fink(alert)
        sources = [v for k, v in message.headers() if k == "x-preproc-source"]
        assert sources[0].startswith(topic.encode())  # the alert's, then the features'
        assert headers_of(message)["x-preproc-model"] == b"models:/fink-features/1"


@pytest.fixture(autouse=True)
def _example_module(monkeypatch):
    """examples/fink_contract/preprocessing.py, importable as examples_fink_contract."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("examples_fink_contract",
                                                  EXAMPLE / "preprocessing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "examples_fink_contract", module)


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.docker
def test_a_deployment_with_a_prediction_model_bakes_it_in_and_predicts_in_one_hop(
        fink, broker, deployments):
    alerts = ztf_alerts(12)
    topic, out, name = unique("fink-alert"), unique("predictions"), deployments()
    broker.create_topics(topic)
    create = subprocess.run(
        [str(BIN / "mlflow"), "deployments", "create", "-t", "preproc", "--name", name,
         "-m", "models:/fink-features/1", "-C", "mode=kafka",
         "-C", "prediction_model_uri=models:/fink-classifier/1",
         "-C", "keep_fields=objectId,candid", "-C", "input_format=avro",
         "-C", "skip_cutouts=true", "-C", f"input_topic={topic}", "-C", f"output_topic={out}",
         "-C", f"kafka_bootstrap_servers={broker.bootstrap_servers}"],
        capture_output=True, text=True, timeout=900)
    assert create.returncode == 0, create.stderr[-3000:]
    produce(broker.bootstrap_servers, topic, [as_container(a) for a in alerts],
            keys=[str(a["candid"]).encode() for a in alerts])
    predictions = {m.key(): m for m in consume(broker.bootstrap_servers, out, len(alerts),
                                               timeout=120)}
    for alert in alerts:
        message = predictions[str(alert["candid"]).encode()]
        assert json.loads(message.value()) == {"objectId": alert["objectId"],
                                               "candid": alert["candid"],
                                               "prediction": fink(alert)}
        assert headers_of(message)["x-preproc-prediction-model"] == b"models:/fink-classifier/1"

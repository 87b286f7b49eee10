"""The environment's faults are never a record's verdict (#32's table): a library missing
where the model runs, an output folder that cannot be written, a model whose own dependencies
are not installed stop with one line naming the fix, commit nothing and dead-letter nothing."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest

from conftest import BIN, committed_offsets, consume, produce, stream_env, unique
from verdict_cells import verdict

pytestmark = pytest.mark.slow


def needs_a_missing_module(record):
    import mlflow_preproc_no_such_module  # noqa: F401 -- installed where it was logged, say

    return record


@pytest.fixture
def missing_library_model(tracking_uri):
    with mlflow.start_run():
        return mlflow.preproc.log_model(needs_a_missing_module, name="m").model_uri


@verdict("pre_processing", "missing library or codec")
@pytest.mark.kafka
def test_a_module_pre_processing_cannot_import_stops_the_stream_not_a_dead_letter_each(
        broker, streams, missing_library_model):
    topic = unique("raw")
    broker.create_topics(topic)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i}).encode() for i in range(5)])
    env = stream_env(broker.bootstrap_servers, missing_library_model, topic,
                     OUTPUT_TOPIC=unique("out"))
    stream = streams(env)
    assert stream.proc.wait(90) == 2, stream.text()[-2000:]
    last = stream.text().strip().splitlines()[-1]
    assert "pre_processing needs 'mlflow_preproc_no_such_module'" in last, last
    assert "requirements" in last and "Traceback" not in stream.text()
    assert consume(broker.bootstrap_servers, f"{topic}-dlq", 1, timeout=2) == []
    assert committed_offsets(broker.bootstrap_servers, env["CONSUMER_GROUP_ID"], topic) == \
        [-1001]


@verdict("pre_processing", "missing library or codec")
def test_a_module_pre_processing_cannot_import_stops_a_run_without_rejects(
        missing_library_model, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    proc = subprocess.run([str(BIN / "mlflow-preproc"), "run", "-m", missing_library_model,
                           "in.jsonl", "-o", "out.jsonl"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pre_processing needs 'mlflow_preproc_no_such_module'" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()


@verdict("file write", "dependency down")
@verdict("file write", "auth/ACL refused")
def test_an_output_folder_that_is_missing_or_refuses_writes_is_one_line_before_any_work(
        tracking_uri, tmp_path):
    def same(record):
        return record

    with mlflow.start_run():
        uri = mlflow.preproc.log_model(same, name="s").model_uri
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n')
    for output, said in (("no/such/folder/out.jsonl", "No such file or directory"),
                         ("/sys/out.jsonl", "Permission denied")):  # refused even to root
        proc = subprocess.run([str(BIN / "mlflow-preproc"), "run", "-m", uri, "in.jsonl",
                               "-o", output], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"mlflow-preproc run: error: cannot write {output}: {said}"), \
            last


NEEDS_MISSING_MODULE = """
import mlflow


class NeedsMissingModule(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import mlflow_preproc_no_such_module  # noqa: F401

    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(NeedsMissingModule())
"""


@verdict("in-process predict", "missing library or codec")
@pytest.mark.kafka
def test_a_prediction_model_whose_library_is_missing_is_refused_at_start(
        tracking_uri, broker, streams, tmp_path):
    def same(record):
        return record

    with mlflow.start_run():
        uri = mlflow.preproc.log_model(same, name="s").model_uri
        (tmp_path / "needs.py").write_text(NEEDS_MISSING_MODULE)
        predictor = mlflow.pyfunc.log_model(name="p",
                                            python_model=str(tmp_path / "needs.py")).model_uri
    topic = unique("raw")
    broker.create_topics(topic)
    stream = streams(stream_env(broker.bootstrap_servers, uri, topic, OUTPUT_TOPIC=unique("o"),
                                PREDICTION_MODEL_URI=predictor))
    assert stream.proc.wait(90) == 2, stream.text()[-2000:]
    last = stream.text().strip().splitlines()[-1]
    assert "needs mlflow_preproc_no_such_module" in last and "requirements" in last, last


def slow_on_one(record):
    import time

    if record["id"] == 1:
        time.sleep(8)  # a service pre_processing calls, hanging
    return record


@verdict("pre_processing", "dependency slow")
@pytest.mark.kafka
def test_a_pre_processing_that_makes_no_progress_fails_healthz_saying_so(
        tracking_uri, broker, streams):
    import time
    import urllib.error
    import urllib.request

    from conftest import free_port

    with mlflow.start_run():
        uri = mlflow.preproc.log_model(slow_on_one, name="s").model_uri
    topic = unique("raw")
    broker.create_topics(topic)
    port = free_port()
    env = stream_env(broker.bootstrap_servers, uri, topic, OUTPUT_TOPIC=unique("out"),
                     METRICS_PORT=str(port), METRICS_HOST="127.0.0.1", HEALTH_STALL_S="2")
    stream = streams(env)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i}).encode() for i in range(3)])
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(s == 503 for s, _ in seen):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                seen.append((r.status, r.read().decode()))
        except urllib.error.HTTPError as err:
            seen.append((err.code, err.read().decode()))
        except OSError:
            pass  # not listening yet
        time.sleep(0.3)
    outputs = consume(broker.bootstrap_servers, env["OUTPUT_TOPIC"], 3, timeout=60)
    assert stream.stop() == 0, stream.text()[-2000:]
    [(status, body)] = [(s, b) for s, b in seen if s == 503][:1]
    assert "made no progress" in body, body
    assert len(outputs) == 3  # nothing lost: the slow record and the others came through

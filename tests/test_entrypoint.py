"""The serving image's entrypoint supervisor, run as a process on a local model folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import consume, free_port, post_json, produce, unique, wait_http

pytestmark = pytest.mark.slow


def tag(record):
    return {**record, "tagged": True}


@pytest.fixture
def model_dir(tracking_uri):
    with mlflow.start_run():
        info = mlflow.preproc.log_model(tag, name="p", pip_requirements=[])
    return mlflow.artifacts.download_artifacts(info.model_uri)


def entrypoint(model_dir, env, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_preproc.image.entrypoint", *kwargs.pop("args", [])],
        env={**os.environ, "MLFLOW_PREPROC_MODEL_PATH": model_dir,
             "LOG_FORMAT": "json", **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs)


def test_run_mode_reads_stdin_and_writes_stdout(model_dir):
    proc = entrypoint(model_dir, {"MLFLOW_PREPROC_MODE": "run"}, stdin=subprocess.PIPE)
    out, err = proc.communicate(b'{"a": 1}\n{"a": 2}\n', timeout=120)
    assert proc.returncode == 0, err.decode()
    assert [json.loads(line) for line in out.splitlines()] == [
        {"a": 1, "tagged": True}, {"a": 2, "tagged": True}]


def test_outside_an_image_the_entrypoint_runs_the_model_uri(tracking_uri, tmp_path):
    # No model folder baked in (a checkout, a benchmark): MODEL_URI is resolved instead.
    with mlflow.start_run():
        info = mlflow.preproc.log_model(tag, name="p", pip_requirements=[])
    proc = entrypoint(str(tmp_path / "no-model-here"),
                      {"MLFLOW_PREPROC_MODE": "run", "MODEL_URI": info.model_uri},
                      stdin=subprocess.PIPE)
    out, err = proc.communicate(b'{"a": 1}\n', timeout=120)
    assert proc.returncode == 0, err.decode()
    assert [json.loads(line) for line in out.splitlines()] == [{"a": 1, "tagged": True}]


def test_run_mode_reads_skip_cutouts_from_the_env_file_variables(tracking_uri):
    from conftest import DATA

    with mlflow.start_run():
        info = mlflow.preproc.log_model(lambda alert: {"fields": sorted(alert)}, name="z",
                                        pip_requirements=[])
    packet = sorted(DATA.glob("*.avro"))[0]
    proc = entrypoint(mlflow.artifacts.download_artifacts(info.model_uri),
                      {"MLFLOW_PREPROC_MODE": "run", "SKIP_CUTOUTS": "true"},
                      stdin=subprocess.PIPE)
    out, err = proc.communicate(packet.read_bytes(), timeout=120)
    assert proc.returncode == 0, err.decode()
    [record] = [json.loads(line) for line in out.splitlines()]
    assert not {"cutoutScience", "cutoutTemplate", "cutoutDifference"} & set(record["fields"])


def test_legacy_kafka_enabled_runs_server_and_consumers_then_sigterm_stops_all(model_dir,
                                                                                broker):
    topic, out, port = unique("raw"), unique("out"), free_port()
    broker.create_topics(topic)
    proc = entrypoint(model_dir, {
        "KAFKA_ENABLED": "true", "KAFKA_CONSUMERS": "2", "PORT": str(port), "HOST": "127.0.0.1",
        "MLFLOW_MODELS_WORKERS": "1", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "INPUT_TOPIC": topic, "OUTPUT_TOPIC": out, "CONSUMER_GROUP_ID": unique("g")})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120)
        assert post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": [{"b": 1}]}) == (
            200, {"predictions": [{"b": 1, "tagged": True}]})
        produce(broker.bootstrap_servers, topic, [b'{"c": 3}'])
        assert [json.loads(m.value()) for m in consume(broker.bootstrap_servers, out, 1)] == [
            {"c": 3, "tagged": True}]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err.decode()[-3000:]
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert [e["processes"] for e in events if e.get("event") == "entrypoint"] == [3]
    assert sum(1 for e in events if e.get("event") == "stop") == 2  # both consumers closed


def test_a_dying_child_stops_the_container_with_its_exit_code(model_dir, broker):
    port = free_port()
    proc = entrypoint(model_dir, {
        "MLFLOW_PREPROC_MODE": "both", "PORT": str(port), "HOST": "127.0.0.1",
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "INPUT_TOPIC": "no-such-topic",
        "OUTPUT_TOPIC": unique("out")})
    start = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "input topic no-such-topic does not exist" in err.decode()
    assert '"event": "child_exit"' in err.decode()
    assert time.monotonic() - start < 100  # the scoring server was stopped, not waited for

"""Serving images on a real Docker engine: the `preproc` deployment target through the real
`mlflow deployments` CLI, and stock `mlflow models build-docker` images.

Needs a Docker engine (scripts/docker-engine.sh start) and the local base image
(scripts/base-image.sh); `bash scripts/dev.sh test` provides both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid

import mlflow
import pytest

from conftest import BIN, consume, free_port, post_json, produce, unique, wait_http

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def v1(record):
    return {"id": record["id"], "version": 1}


def v2(record):
    return {"id": record["id"], "version": 2, "x2": record["x"] * 2}


def zero_pointed(record):
    # A zero point from the environment: a setting that differs from one place to another.
    return {"id": record["id"], "mag": record["mag"] + float(os.environ.get("MAG_ZEROPOINT", "0"))}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlflow"), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_deploy_serve_predict_stream_update_delete(tracking_uri, broker, deployments,
                                                   docker_client, tmp_path):
    with mlflow.start_run():
        mlflow.preproc.log_model(v1, name="p", registered_model_name="dock-prep")
    name, port = deployments(), free_port()
    topic = unique("raw")
    broker.create_topics(topic)

    create = cli("deployments", "create", "-t", "preproc", "--name", name,
                 "-m", "models:/dock-prep/1", "-C", f"port={port}", "-C", "mode=both",
                 "-C", f"kafka_bootstrap_servers={broker.bootstrap_servers}",
                 "-C", f"input_topic={topic}", "-C", f"consumer_group_id={unique('g')}",
                 "-C", "env.LIBRDKAFKA_SESSION_TIMEOUT_MS=6000",
                 "-C", "env.LIBRDKAFKA_HEARTBEAT_INTERVAL_MS=1000",
                 "-C", "env.FEATURE_STORE_TOKEN=t0ken-42")
    assert create.returncode == 0, create.stderr[-3000:]
    assert "t0ken-42" not in create.stdout
    assert f"preprocessing deployment {name} is created" in create.stdout
    # One line per step, not the build's log or MLflow's download bars.
    steps = [line for line in create.stderr.splitlines() if line.startswith("[")]
    assert [s[:5] for s in steps] == ["[1/3]", "[2/3]", "[3/3]"], create.stderr[-3000:]
    # ... and where it answers (#19.9; MLflow prints only the name).
    assert f"{name} is ready: POST http://127.0.0.1:{port}/invocations" in create.stderr
    assert "Step " not in create.stderr and "Downloading artifacts" not in create.stderr

    logs = docker_client.containers.get(f"{name}-0").logs().decode()
    assert "found in sys.modules" not in logs  # no RuntimeWarning from the entrypoint

    # REST over loopback
    status, body = post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": [{"id": 7}]})
    assert (status, body) == (200, {"predictions": [{"id": 7, "version": 1}]})

    # mlflow deployments predict: every payload MLflow's scoring protocol accepts, and a list
    for payload in ([{"id": 8}, {"id": 9}], {"inputs": [{"id": 8}, {"id": 9}]},
                    {"dataframe_records": [{"id": 8}, {"id": 9}]},
                    {"dataframe_split": {"columns": ["id"], "data": [[8], [9]]}},
                    {"instances": [{"id": 8}, {"id": 9}]}):
        (tmp_path / "in.json").write_text(json.dumps(payload))
        predict = cli("deployments", "predict", "-t", "preproc", "--name", name,
                      "-I", str(tmp_path / "in.json"))
        assert predict.returncode == 0, (payload, predict.stderr[-2000:])
        assert json.loads(predict.stdout.strip().splitlines()[-1]) == {
            "predictions": [{"id": 8, "version": 1}, {"id": 9, "version": 1}]}, payload

    # mode both: the consumer in the container reads the host's broker; default topic name
    produce(broker.bootstrap_servers, topic, [b'{"id": 1, "x": 5}'])
    out = consume(broker.bootstrap_servers, "dock-prep-1-preprocessed", 1)
    assert [json.loads(m.value()) for m in out] == [{"id": 1, "version": 1}]

    # get and list read Docker
    get = cli("deployments", "get", "-t", "preproc", "--name", name)
    assert get.returncode == 0, get.stderr
    shown = dict(line.split(": ", 1) for line in get.stdout.splitlines() if ": " in line)
    assert shown["status"] == "running" and shown["mode"] == "both"
    assert shown["endpoint"] == f"http://127.0.0.1:{port}"
    assert shown["image"] == "preprocessing-dock-prep-1:latest"
    assert shown["model_uri"] == "models:/dock-prep/1"
    assert "t0ken-42" not in get.stdout + json.dumps(docker_client.containers.get(
        f"{name}-0").labels)  # a secret's value is in the container only
    listed = cli("deployments", "list", "-t", "preproc")
    assert name in listed.stdout

    # update to version 2 switches behaviour
    with mlflow.start_run():
        mlflow.preproc.log_model(v2, name="p", registered_model_name="dock-prep")
    update = cli("deployments", "update", "-t", "preproc", "--name", name,
                 "-m", "models:/dock-prep/2", "-C", "output_topic=" + unique("v2-out"))
    assert update.returncode == 0, update.stderr[-3000:]
    status, body = post_json(f"http://127.0.0.1:{port}/invocations",
                             {"inputs": [{"id": 9, "x": 2}]})
    assert (status, body) == (200, {"predictions": [{"id": 9, "version": 2, "x2": 4}]})
    env = docker_client.containers.get(f"{name}-0").attrs["Config"]["Env"]
    assert "FEATURE_STORE_TOKEN=t0ken-42" in env  # kept by the update, though not stored

    # delete leaves no container (and the image with remove_image=true)
    delete = cli("deployments", "delete", "-t", "preproc", "--name", name,
                 "-C", "remove_image=true")
    assert delete.returncode == 0, delete.stderr[-2000:]
    assert docker_client.containers.list(
        all=True, filters={"label": f"org.mlflow-preproc.deployment={name}"}) == []
    assert not docker_client.images.list(name="preprocessing-dock-prep-2")


def test_deployment_errors_are_one_clear_line(tracking_uri, deployments, docker_client,
                                              monkeypatch):
    from sklearn.linear_model import LinearRegression

    with mlflow.start_run():
        mlflow.sklearn.log_model(LinearRegression().fit([[0], [1]], [0, 1]), name="lr",
                                 registered_model_name="not-prep")
        mlflow.preproc.log_model(v1, name="bad", registered_model_name="bad-reqs",
                                 pip_requirements=["no-such-package-mlflow-preproc==0.0.1"])
        mlflow.preproc.log_model(v1, name="ok", registered_model_name="ok-prep")
        # Logged where MAG_ZEROPOINT is set; the image has none: its outputs differ (#38).
        monkeypatch.setenv("MAG_ZEROPOINT", "0.5")
        mlflow.preproc.log_model(zero_pointed, name="drift", registered_model_name="drift-prep",
                                 input_example=[{"id": 1, "mag": 18.25}])
        monkeypatch.delenv("MAG_ZEROPOINT")

    def create(name, uri, *extra):
        return cli("deployments", "create", "-t", "preproc", "--name", name, "-m", uri,
                   "-C", f"port={free_port()}", *extra)

    cases = [
        (create(deployments(), "models:/not-prep/1"), "is not a preprocessing model"),
        (create(deployments(), "models:/ok-prep/9"), "models:/ok-prep/9 was not found"),
        (create(deployments(), "models:/ok-prep/1", "-C", "colour=blue"),
         "unknown config key(s) colour; valid keys: mode, port"),
        (create(deployments(), "models:/ok-prep/1", "-C", "docker_host=unix:///nope.sock"),
         "cannot reach a Docker engine at unix:///nope.sock"),
        (create(deployments(), "models:/bad-reqs/1"), "image build failed at Step"),
        # The reference records, run in the built image before it is tagged (#38).
        (create(deployments(), "models:/drift-prep/1"),
         "1 of 1 reference records give other outputs here than when the model was logged: "
         "record 0 (id=1): field mag: expected 18.75, got 18.25"),
        # Docker would refuse it when the container starts, after the build (#33).
        (create(deployments(), "models:/ok-prep/1", "-C", "cpu_limit=1000"),
         "cpu_limit=1000 is more than the"),
    ]
    for proc, message in cases:
        assert proc.returncode != 0
        assert "Error: " in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    build_failure = cases[-3][0].stderr
    assert "no-such-package-mlflow-preproc" in build_failure, build_failure  # the log tail
    assert not docker_client.images.list(name="preprocessing-drift-prep-1")

    # PARITY_CHECK=warn accepts the drift knowingly: the build and the server say it and serve.
    name = deployments()
    warned = create(name, "models:/drift-prep/1", "-C", "parity_check=warn")
    assert warned.returncode == 0, warned.stderr[-3000:]
    logs = docker_client.containers.get(f"{name}-0").logs().decode()
    assert "PARITY_CHECK=warn: " in logs and "expected 18.75, got 18.25" in logs, logs[-3000:]
    again = create(name, "models:/ok-prep/1")
    assert again.returncode != 0 and f"a deployment named {name} already exists" in again.stderr


def test_docker_runs_what_the_options_say_mounts_limits_and_values_verbatim(
        tracking_uri, deployments, docker_client, tmp_path):
    # Two mounts of one host file kept only the second (docker-py's volumes dict is keyed by
    # the host path), and memory_limit/cpu_limit were accepted and ignored (#33, findings 4
    # and 5). A colon in the host path split docker-py's "src:dst:mode" string.
    with mlflow.start_run():
        mlflow.preproc.log_model(v1, name="p", registered_model_name="opts-prep")
    props = tmp_path / "client:a.properties"
    props.write_text("bootstrap.servers=127.0.0.1:9092\n")
    pwned = tmp_path / "pwned"
    odd = f"it's \"$(touch {pwned})\"; `touch {pwned}` $HOME \\ |\nRUN touch {pwned}"
    name, port = deployments(), free_port()
    create = cli("deployments", "create", "-t", "preproc", "--name", name,
                 "-m", "models:/opts-prep/1", "-C", f"port={port}", "-C", "workers=1",
                 "-C", f"mount./etc/kafka/client.properties={props}",
                 "-C", f"mount./opt/ml/client.properties={props}",
                 "-C", "memory_limit=512Mi", "-C", "cpu_limit=500m",
                 "-C", f"env.GREETING={odd}", "-C", f"label.note={odd}",
                 "-C", "env.FEATURE_STORE_TOKEN=t0ken-42")
    assert create.returncode == 0, create.stderr[-3000:]
    container = docker_client.containers.get(f"{name}-0")
    inspected = docker_client.api.inspect_container(container.id)
    assert {m["Destination"]: (m["Source"], m["RW"]) for m in inspected["Mounts"]} == {
        "/etc/kafka/client.properties": (str(props), False),
        "/opt/ml/client.properties": (str(props), False)}
    for path in ("/etc/kafka/client.properties", "/opt/ml/client.properties"):
        assert container.exec_run(["cat", path]).output == props.read_bytes()
    assert (inspected["HostConfig"]["Memory"], inspected["HostConfig"]["NanoCpus"]) == (
        512 * 2**20, 500_000_000)
    # Values reach the process and the label as given; no shell ever read them.
    assert container.exec_run(["printenv", "GREETING"]).output.decode() == odd + "\n"
    assert container.labels["note"] == odd
    assert container.exec_run(["test", "-e", str(pwned)]).exit_code == 1 and not pwned.exists()
    assert post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": [{"id": 1}]}) == (
        200, {"predictions": [{"id": 1, "version": 1}]})
    # A secret is in the container's environment (where it is used) and nowhere else.
    assert "FEATURE_STORE_TOKEN=t0ken-42" in inspected["Config"]["Env"]
    image = docker_client.api.inspect_image(inspected["Config"]["Image"])
    history = docker_client.api.history(inspected["Config"]["Image"])
    elsewhere = json.dumps([inspected["Config"]["Labels"], image["Config"], history,
                            container.logs().decode(errors="replace")])
    assert "t0ken-42" not in elsewhere


def test_stock_build_docker_image_serves_and_streams_with_env_only(tracking_uri, broker,
                                                                   docker_client):
    with mlflow.start_run():
        mlflow.preproc.log_model(v2, name="p", registered_model_name="stock-prep")
    image = f"stock-prep-{uuid.uuid4().hex[:6]}"
    build = cli("models", "build-docker", "-m", "models:/stock-prep/1", "-n", image,
                "--env-manager", "local")
    assert build.returncode == 0, build.stderr[-3000:]
    containers = []
    try:
        # 1. As MLflow built it: REST on 8080 through nginx, unchanged. Its ports are fixed
        # (nginx 8080, the scoring server 8000) on the host's network, and the image exits 0
        # when either cannot bind: wait for them to be free.
        _wait_free(8080, 8000)
        serve = docker_client.containers.run(image, detach=True, network_mode="host")
        containers.append(serve)
        wait_http("http://127.0.0.1:8080/ping", _RunningContainer(serve), timeout=120)
        status, body = post_json("http://127.0.0.1:8080/invocations",
                                 {"inputs": [{"id": 1, "x": 4}]})
        assert (status, body) == (200, {"predictions": [{"id": 1, "version": 2, "x2": 8}]})
        serve.stop(timeout=20)

        # 2. The same image, Kafka mode from environment variables alone (no rebuild).
        topic, out = unique("raw"), unique("out")
        broker.create_topics(topic)
        produce(broker.bootstrap_servers, topic, [b'{"id": 2, "x": 1}', b'{"id": 3, "x": 2}'])
        kafka = docker_client.containers.run(image, detach=True, network_mode="host", environment={
            "PYTHONPATH": "/opt/ml/model/code", "MLFLOW_PREPROC_MODE": "kafka",
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "INPUT_TOPIC": topic,
            "OUTPUT_TOPIC": out, "CONSUMER_GROUP_ID": unique("g"),
            "MODEL_URI": "models:/stock-prep/1",  # names the baked model in provenance headers
            "LIBRDKAFKA_SESSION_TIMEOUT_MS": "6000",
            "LIBRDKAFKA_HEARTBEAT_INTERVAL_MS": "1000"})
        containers.append(kafka)
        outputs = consume(broker.bootstrap_servers, out, 2, timeout=90)
        assert sorted(json.loads(m.value())["x2"] for m in outputs) == [2, 4], \
            kafka.logs().decode()[-3000:]
        assert {dict(m.headers())["x-preproc-model"] for m in outputs} == {
            b"models:/stock-prep/1"}  # not the path /opt/ml/model
        assert "found in sys.modules" not in kafka.logs().decode()
        kafka.stop(timeout=40)
        kafka.reload()
        assert kafka.attrs["State"]["ExitCode"] == 0, kafka.logs().decode()[-2000:]
        assert '"event": "stop"' in kafka.logs().decode()  # the consumer committed and closed
    finally:
        for c in containers:
            c.remove(force=True)
        docker_client.images.remove(image, force=True)


def _wait_free(*ports: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for port in ports:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    busy.append(port)
        if not busy:
            return
        assert time.monotonic() < deadline, f"ports {busy} stay taken on the host"
        time.sleep(1)


class _RunningContainer:
    """Adapts a container to wait_http's process protocol (poll/stdout)."""

    def __init__(self, container):
        self.container = container
        self.stdout = self  # wait_http reads the container's logs when it exits

    def read(self) -> str:
        return self.container.logs().decode(errors="replace")[-3000:]

    def poll(self):
        self.container.reload()
        return None if self.container.status in ("created", "running") else 1

    @property
    def returncode(self):
        return self.container.attrs["State"]["ExitCode"]


def test_the_local_base_image_records_the_python_it_really_has(docker_client):
    import platform

    tag = f"python:{platform.python_version()}-slim"  # what build-docker asks for
    image = docker_client.images.get(tag)
    recorded = image.labels["org.mlflow-preproc.python-version"]
    real = docker_client.containers.run(
        tag, ["python3", "-c", "import platform; print(platform.python_version())"],
        network_mode="none", remove=True).decode().strip()
    assert recorded == real

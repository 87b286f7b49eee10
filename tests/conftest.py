"""Shared fixtures: a real MLflow tracking store, free ports, and processes stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
BIN = Path(sys.executable).parent  # the mlflow CLI of the interpreter running the tests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``), keep the Docker tests on one worker
    and the Spark tests on one: the engine's images are removed at the end of the session that
    built them, and two JVMs do not fit two cores beside the rest. Without xdist the marker
    does nothing."""
    for item in items:
        for group in ("docker", "spark"):
            if item.get_closest_marker(group):
                item.add_marker(pytest.mark.xdist_group(group))
                break


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite database with MLflow's tables and nothing in them, made once per session (per
    xdist worker): a new database runs MLflow's schema migrations (seconds each, a test's
    fixture ~200 times in the suite), a copy of this one opens at once. The default
    experiment is deleted: a store creates it on first use with its own artifact root."""
    import sqlite3
    from contextlib import closing

    import mlflow

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DELETE FROM experiments WHERE experiment_id = 0")
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> str:
    """A fresh sqlite tracking store and artifact root, shared with subprocesses via env."""
    import mlflow

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns lands in tmp_path
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process this test started (and its process group), by PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering:\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def post_json(url: str, payload: object) -> tuple[int, object]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture
def serve_model() -> Iterator:
    """Start `mlflow models serve` for a model URI on a free loopback port; yields its URL."""
    started: list[subprocess.Popen] = []

    def serve(model_uri: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", proc)
        return url

    yield serve
    for proc in started:
        stop_process(proc)


class JsonHandler(BaseHTTPRequestHandler):
    """The base of the tests' own HTTP servers (fakes of a model server, of an API server):
    JSON answers, no access log."""

    def answer(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """Serve ``handler`` from a daemon thread on a free loopback port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class FakeSchemaRegistry:
    """A Confluent Schema Registry on loopback, speaking its REST API for what a consumer asks
    (``GET /schemas/ids/{id}``, ``GET /subjects/{subject}/versions/{version}``) and a
    producer registers (``POST /subjects/{subject}/versions``). No real
    registry installs here (FIELD-NOTES 8). ``down`` makes it answer 503, as a registry
    losing its backing Kafka cluster does; ``requests`` counts what it was asked."""

    def __init__(self):
        self.by_id: dict[int, dict] = {}  # id -> {"schema": str, "references": [...]}
        self.by_subject: dict[tuple[str, int], int] = {}  # (subject, version) -> id
        self.down = False
        self.delay = 0.0  # seconds before each answer: a registry that is slow
        self.garbage = False  # 200 with a page that is no registry's answer
        self.refuse: tuple[int, int] | None = None  # (status, error code) for every request
        self.requests = 0
        outer = self

        class Handler(JsonHandler):
            def odd(self) -> bool:
                """Answer as the test made the registry misbehave; whether it did."""
                time.sleep(outer.delay)
                if outer.garbage:
                    page = b"<html>Service Unavailable</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return True
                if outer.refuse:
                    self.answer(outer.refuse[0], {"error_code": outer.refuse[1],
                                                  "message": "refused by the test"})
                    return True
                return False

            def do_GET(self):  # noqa: N802
                outer.requests += 1
                if self.odd():
                    return
                if outer.down:
                    return self.answer(503, {"error_code": 50003,
                                             "message": "Error while forwarding the request"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["schemas", "ids"] and int(parts[2]) in outer.by_id:
                    return self.answer(200, {"schemaType": "AVRO",
                                             **outer.by_id[int(parts[2])]})
                if parts[0] == "subjects" and len(parts) == 4:
                    key = (parts[1], int(parts[3]))
                    if key in outer.by_subject:
                        found = outer.by_subject[key]
                        return self.answer(200, {"subject": key[0], "version": key[1],
                                                 "id": found, "schemaType": "AVRO",
                                                 **outer.by_id[found]})
                    return self.answer(404, {"error_code": 40401,
                                             "message": f"Subject '{parts[1]}' not found."})
                self.answer(404, {"error_code": 40403, "message": "Schema not found"})

            def do_POST(self):  # noqa: N802 -- POST /subjects/{subject}/versions: register
                outer.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.odd():
                    return
                if outer.down:
                    return self.answer(503, {"error_code": 50003,
                                             "message": "Error while forwarding the request"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[0] != "subjects" or parts[2:] != ["versions"]:
                    return self.answer(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
                found = next((i for i, s in outer.by_id.items()
                              if s["schema"] == body["schema"]), None)
                if found is None:
                    found = max(outer.by_id, default=0) + 1
                    outer.by_id[found] = {"schema": body["schema"], "references": []}
                outer.by_subject[(parts[1], 1)] = found
                self.answer(200, {"id": found})

        self.server = serve_on_loopback(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def register(self, schema_id: int, schema: dict, subject: str | None = None,
                 references: list[dict] | None = None) -> None:
        """Hold ``schema`` under ``schema_id`` (and as version 1 of ``subject``);
        ``references`` as the registry lists them: ``{"name", "subject", "version"}``."""
        self.by_id[schema_id] = {"schema": json.dumps(schema), "references": references or []}
        if subject:
            self.by_subject[(subject, 1)] = schema_id

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def schema_registry() -> Iterator[FakeSchemaRegistry]:
    registry = FakeSchemaRegistry()
    yield registry
    registry.close()


# ---- Docker --------------------------------------------------------------------------------

# Images the tests build: the target's (labelled), stock build-docker ones (by name), and
# the untagged ones a rebuild of the same tag leaves behind. The base image is a cache: kept.
_TEST_IMAGE_PREFIXES = ("preprocessing-", "stock-prep-", "model-")


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _image_summaries(everything: bool = False, **filters) -> list[dict] | None:
    """The engine's images in one request (no per-image inspect, which races with a removal
    elsewhere), or None without an engine."""
    try:
        import docker

        return docker.from_env().api.images(all=everything, filters=filters or None)
    except Exception:  # noqa: BLE001 -- no engine: nothing to clean up
        return None


def pytest_sessionstart(session: pytest.Session) -> None:
    # Once, in the process that runs (or, under xdist, controls) the session: a worker that
    # cleaned up at its own end would remove images the other worker still uses.
    if not _is_xdist_worker(session.config):
        found = _image_summaries(everything=True)
        session.config.stash[_IMAGES_BEFORE] = None if found is None else {
            i["Id"] for i in found}


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove the images built during the session (a session running beside it on the same
    engine could lose its own: run one at a time)."""
    if _is_xdist_worker(session.config):
        return
    before = session.config.stash.get(_IMAGES_BEFORE, None)
    tagged, dangling = _image_summaries(), _image_summaries(dangling=True)
    if before is None or tagged is None or dangling is None:
        return
    import docker

    client = docker.from_env()
    ours = [i["Id"] for i in tagged if i["Id"] not in before and (
        (i.get("Labels") or {}).get("org.mlflow-preproc.model-uri")
        or any(t.startswith(_TEST_IMAGE_PREFIXES) for t in i.get("RepoTags") or []))]
    ours += [i["Id"] for i in dangling if i["Id"] not in before]  # left by rebuilds of a tag
    for image in ours:  # the build layers of each go with it
        try:
            client.images.remove(image, force=True)
        except docker.errors.APIError:
            pass  # removed with its child meanwhile, or in use by a container


_IMAGES_BEFORE = pytest.StashKey[set | None]()


@pytest.fixture(scope="session")
def docker_client():
    """The local Docker engine; under CI=true a missing engine fails instead of skipping.
    The images built during the session are removed at its end (pytest_sessionfinish)."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        message = f"no Docker engine ({exc}); run bash scripts/docker-engine.sh start"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return client


@pytest.fixture
def deployments(docker_client):
    """Names to deploy under with the preproc target (``make("-r1-2")`` ends one with that);
    whatever is left is deleted by its Docker label."""
    import uuid

    names = []

    def make(suffix: str = "") -> str:
        names.append(f"t{uuid.uuid4().hex[:8]}{suffix}")
        return names[-1]

    yield make
    for name in names:
        for c in docker_client.containers.list(
                all=True, filters={"label": f"org.mlflow-preproc.deployment={name}"}):
            c.remove(force=True)


# ---- Kafka: Apache Kafka (and the embedded broker), real clients, real consumer groups ----

# The tests of a Kafka guarantee run on Apache Kafka (tests/apache_kafka.py: the broker our
# users run, fetched by scripts/kafka-broker.sh); the embedded Tansu broker keeps the tests of
# `mlflow-preproc broker` and of the documented quickstart, and a smoke subset of the stream
# tests runs on both (the `any_broker` fixture).

# A member killed without leaving the group holds its partitions until its session expires
# (librdkafka's default: 45 s); with the classic protocol the client sets it. With
# group.protocol=consumer (KIP-848) the broker does (tests/apache_kafka.py), and librdkafka
# refuses these settings: STREAM_GROUP_ENV is what a test's stream processes get.
FAST_GROUP_ENV = {"LIBRDKAFKA_SESSION_TIMEOUT_MS": "6000",
                  "LIBRDKAFKA_HEARTBEAT_INTERVAL_MS": "1000"}
# LIBRDKAFKA_GROUP_PROTOCOL=consumer runs every stream of the suite in KIP-848 groups.
GROUP_PROTOCOL = os.environ.get("LIBRDKAFKA_GROUP_PROTOCOL", "classic")


def group_env(protocol: str = GROUP_PROTOCOL) -> dict[str, str]:
    """The consumer group settings of a test's stream process for ``protocol``."""
    if protocol == "consumer":
        return {"LIBRDKAFKA_GROUP_PROTOCOL": "consumer"}
    return dict(FAST_GROUP_ENV)


STREAM_GROUP_ENV = group_env()
_names = iter(range(10**6))


def unique(prefix: str) -> str:
    """A fresh topic or group name: tests sharing a broker never see each other's records,
    offsets or members."""
    return f"{prefix}-{os.getpid()}-{next(_names)}"


def stream_env(bootstrap: str, model_uri: str, input_topic: str, **extra: str) -> dict[str, str]:
    """The environment of a ``stream`` of ``model_uri`` on ``input_topic``, in a group of its
    own; ``extra`` adds settings or overrides these."""
    return {"MODEL_URI": model_uri, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "INPUT_TOPIC": input_topic, "CONSUMER_GROUP_ID": unique("group"), **extra}


def _apache_kafka_or_skip():
    """tests/apache_kafka.py, once Java and the broker's jars are there; a skip naming what
    to install otherwise (a failure under CI=true, which installs both)."""
    import apache_kafka

    try:
        apache_kafka.java()
        apache_kafka.kafka_libs()
    except apache_kafka.KafkaUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    return apache_kafka


@pytest.fixture(scope="session")
def broker():
    """One Apache Kafka broker for the tests that can share it (under pytest-xdist, one per
    worker); isolation comes from unique topic and group names."""
    with _apache_kafka_or_skip().ApacheKafka() as b:
        yield b


@pytest.fixture(scope="session")
def embedded_broker():
    """The embedded Tansu broker (`mlflow-preproc broker`, the quickstart)."""
    from mlflow_preproc.streaming.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(params=["apache-kafka", "embedded"])
def any_broker(request):
    """Each broker of the suite in turn: the smoke tests that keep them from drifting."""
    if request.param == "embedded" and GROUP_PROTOCOL == "consumer":
        pytest.skip("the embedded broker (Tansu 0.6) never assigns partitions to a KIP-848 "
                    "consumer group")
    return request.getfixturevalue("broker" if request.param == "apache-kafka"
                                   else "embedded_broker")


@pytest.fixture
def own_broker():
    """An Apache Kafka broker of this test's own, to kill, freeze (SIGSTOP), restart or start
    late: ``own_broker(port=None, start=True)``."""
    apache_kafka = _apache_kafka_or_skip()
    started = []

    def make(port: int | None = None, start: bool = True):
        b = apache_kafka.ApacheKafka(port)
        started.append(b)
        return b.start() if start else b

    yield make
    for b in started:
        b.close()


@pytest.fixture
def kafka_cluster():
    """Three Apache Kafka brokers of this test's own: replication factor 3,
    min.insync.replicas=2."""
    with _apache_kafka_or_skip().KafkaCluster() as cluster:
        yield cluster


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes] | None = None,
            headers: list | None = None, linger_ms: int = 5) -> None:
    """Write ``values`` to ``topic``; a long ``linger_ms`` puts them in one record batch."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms})
    for i, value in enumerate(values):
        producer.produce(topic, value, keys[i] if keys else None,
                         headers=headers[i] if headers else None)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def consume(bootstrap: str, topic: str, expected: int, timeout: float = 60,
            until: Callable[[list], bool] | None = None) -> list:
    """Read a topic from the start until ``expected`` messages arrived (or time ran out).

    Where duplicates are allowed, ``until(messages)`` says when enough arrived instead.

    Reads by assignment, not in a group: no group join delay, and nothing is committed.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    # read_committed (librdkafka's default, said here): what exactly once is judged by
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"),
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    got = []
    deadline = time.monotonic() + timeout
    try:
        while True:  # the topic may not exist yet: the process under test creates it
            meta = consumer.list_topics(timeout=5).topics.get(topic)
            if meta is not None and meta.partitions:
                break
            if time.monotonic() > deadline:
                return got
            time.sleep(0.2)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        done = until or (lambda messages: len(messages) >= expected)
        while not done(got) and time.monotonic() < deadline:
            got += [m for m in consumer.consume(1000, 0.5) if m.error() is None]
    finally:
        consumer.close()
    return got


def headers_of(msg) -> dict[str, bytes]:
    return dict(msg.headers() or [])


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    """What ``group`` has committed on each partition of ``topic`` (-1001: nothing)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                   timeout=15)
    finally:
        consumer.close()
    return [tp.offset for tp in sorted(found, key=lambda tp: tp.partition)]


# ---- mlflow-preproc stream/bridge processes -----------------------------------------------

class StreamProcess:
    """`mlflow-preproc stream` in a subprocess, stopped by PID."""

    def __init__(self, log_dir: Path, env: dict[str, str], command: str = "stream",
                 args: tuple[str, ...] = ()):
        self.log_path = log_dir / f"{unique(command)}.log"
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow-preproc"), command, *args],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
            env={**os.environ, **group_env(env.get("LIBRDKAFKA_GROUP_PROTOCOL", GROUP_PROTOCOL)),
                 "LOG_FORMAT": "json", "BATCH_TIMEOUT_MS": "200",
                 "STATS_INTERVAL_S": "1", **env},
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def events(self, name: str) -> list[dict]:
        return [entry for entry in self.logs() if entry.get("event") == name]

    def logs(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # librdkafka's own log lines
        return lines

    def text(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def streams(tmp_path: Path):
    started: list[StreamProcess] = []

    def start(env: dict[str, str], command: str = "stream",
              args: tuple[str, ...] = ()) -> StreamProcess:
        s = StreamProcess(tmp_path, env, command, args)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


# ---- Spark: real pyspark on local[2] -------------------------------------------------------

# No web UI (its port) in tests, and the JVM's JIT at C1: on 2 CPUs C2 compiling Spark at
# start-up costs ~15 s of CPU per JVM (benchmarks/spark_batch.py, row d). Nothing else differs
# from how users run it.
SPARK_ENV = {"PYSPARK_SUBMIT_ARGS": "--conf spark.ui.enabled=false "
                                    "--driver-java-options -XX:TieredStopAtLevel=1 pyspark-shell"}


def require_spark() -> None:
    """Skip without pyspark or Java; under CI=true fail instead (CI installs both)."""
    from mlflow_preproc.spark.session import SparkUnavailable, check_java, require_pyspark

    try:
        require_pyspark()
        check_java()
    except SparkUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))

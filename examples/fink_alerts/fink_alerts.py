"""Real ZTF alerts through the whole pipeline, on an embedded Kafka-protocol broker.

    python examples/fink_alerts/fink_alerts.py [--alerts 400]

1. logs ``preprocessing/`` and a classifier trained on its features; registers both;
2. starts an embedded broker (Tansu, loopback) and fills ``fink-alert`` with the real ZTF alert
   packets in ``data/`` (one Avro container per message, as ZTF/Fink publish them);
3. ``mlflow-preproc stream`` drops the cutouts, computes features -> ``fink-preproc-1-preprocessed``;
4. ``mlflow models serve`` serves the classifier; ``mlflow-preproc bridge`` feeds it the
   features -> ``predictions``;
5. prints a summary, then stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import fastavro
import mlflow
import pandas as pd
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from sklearn.linear_model import LogisticRegression

from mlflow_preproc.streaming.embedded_broker import EmbeddedBroker

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
FEATURES = ["magpsf", "sigmapsf", "n_prv", "days_since_first"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_models() -> None:
    """Log and register the preprocessing and a classifier trained on its output."""
    packets = [p.read_bytes() for p in sorted((HERE / "data").glob("*.avro"))]
    alerts = [next(fastavro.reader(io.BytesIO(p))) for p in packets]
    with mlflow.start_run():
        info = mlflow.preproc.log_model(
            str(HERE / "preprocessing"), name="preprocessing",
            registered_model_name="fink-preproc",
            input_example={k: v for k, v in alerts[0].items() if not k.startswith("cutout")})
        rows = mlflow.pyfunc.load_model(info.model_uri).predict(
            [{k: v for k, v in a.items() if not k.startswith("cutout")} for a in alerts])
        # Two real alerts are too few to train on: jitter them into a small training set.
        frame = pd.DataFrame(rows)[FEATURES].astype(float)
        train = pd.concat([frame.assign(magpsf=frame.magpsf + d) for d in
                           (-3, -2, -1, -0.5, 0, 0.5, 1, 2, 3)], ignore_index=True)
        model = LogisticRegression().fit(train, (train.magpsf < frame.magpsf.mean()).astype(int))
        # The signature says the classes are integers (inferred, MLflow warns that integer
        # columns cannot hold missing values: true, and beside the point for class labels).
        signature = ModelSignature(Schema([ColSpec("double", f) for f in FEATURES]),
                                   Schema([ColSpec("long")]))
        mlflow.sklearn.log_model(model, name="classifier", input_example=train.head(2),
                                 signature=signature, registered_model_name="fink-classifier")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def read_topic(bootstrap: str, topic: str, expected: int, timeout: float) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fink-example-reader",
                         "log.connection.close": False})
    deadline = time.monotonic() + timeout
    while topic not in consumer.list_topics(timeout=5).topics:
        if time.monotonic() > deadline:
            return []
        time.sleep(0.2)
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    got = []
    while len(got) < expected and time.monotonic() < deadline:
        got += [m for m in consumer.consume(500, 0.5) if m.error() is None]
    consumer.close()
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=400, help="alerts to stream")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fink-alerts-"))
    os.chdir(workdir)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    log_models()

    packets = [p.read_bytes() for p in sorted((HERE / "data").glob("*.avro"))]
    processes = []
    with EmbeddedBroker() as broker:
        broker.create_topics("fink-alert")
        # The broker closes the producer's connection once it is idle: not worth a log line.
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers,
                             "log.connection.close": False})
        for i in range(args.alerts):
            producer.produce("fink-alert", packets[i % len(packets)], key=b"alert-%d" % i)
        producer.flush(30)
        kafka = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "LOG_FORMAT": "text",
                 # Tansu forms groups in about session.timeout.ms / 2
                 "LIBRDKAFKA_SESSION_TIMEOUT_MS": "6000",
                 "LIBRDKAFKA_HEARTBEAT_INTERVAL_MS": "1000"}
        port = free_port()
        try:
            started = time.monotonic()
            processes.append(start(
                [str(BIN / "mlflow-preproc"), "stream", "-m", "models:/fink-preproc/latest"],
                {**kafka, "INPUT_TOPIC": "fink-alert", "INPUT_FORMAT": "avro",
                 "SKIP_CUTOUTS": "true"}, workdir / "stream.log"))
            processes.append(start(
                [str(BIN / "mlflow"), "models", "serve", "-m", "models:/fink-classifier/latest",
                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                {"PATH": f"{BIN}:{os.environ['PATH']}"}, workdir / "serve.log"))
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            processes.append(start(
                [str(BIN / "mlflow-preproc"), "bridge"],
                {**kafka, "INPUT_TOPIC": "fink-preproc-1-preprocessed",
                 "OUTPUT_TOPIC": "predictions", "API_URL": f"http://127.0.0.1:{port}",
                 "BATCH_SIZE": "100"}, workdir / "bridge.log"))
            predictions = read_topic(broker.bootstrap_servers, "predictions", args.alerts, 120)
            elapsed = time.monotonic() - started
            features = read_topic(broker.bootstrap_servers, "fink-preproc-1-preprocessed",
                                  args.alerts, 10)
        finally:
            for proc in reversed(processes):
                stop(proc)

    print(f"\n{args.alerts} ZTF alerts -> {len(features)} feature records -> "
          f"{len(predictions)} predictions in {elapsed:.1f} s (including start-up)")
    for feature, prediction in list(zip(features, predictions))[:2]:
        f = json.loads(feature.value())
        print(f"  {prediction.key().decode()}: {f['objectId']} band={f['band']} "
              f"mag={f['magpsf']:.2f} n_prv={f['n_prv']} -> class {json.loads(prediction.value())}")
    print(f"logs and the MLflow store: {workdir}")
    if len(predictions) != args.alerts:
        raise SystemExit(f"expected {args.alerts} predictions, got {len(predictions)}; "
                         f"see {workdir}/*.log")


if __name__ == "__main__":
    main()

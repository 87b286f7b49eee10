"""The picture of the dashboard in docs/guides/monitoring.md, from real components.

Two stream members share a 2-partition topic on the embedded broker; a producer sends ~300
records/s for a minute (3% that the function fails on, and a burst in the middle that makes
lag); a real Prometheus scrapes both members every second; then every dashboard panel is
drawn from Prometheus' data (mlflow_preproc.monitoring.snapshot).

    python benchmarks/dashboard_snapshot.py [--seconds 60] [-o docs/images/dashboard.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import yaml

import mlflow_preproc  # noqa: F401 -- mlflow.preproc
from mlflow_preproc.monitoring.snapshot import render
from mlflow_preproc.streaming.embedded_broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent


def features(record):
    if record.get("bad"):
        raise ValueError("a bad record")
    return {"id": record["id"], "double": record["x"] * 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def produce(bootstrap: str, topic: str, seconds: float, stop: threading.Event) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    started, i = time.monotonic(), 0
    while not stop.is_set() and time.monotonic() - started < seconds:
        burst = abs(time.monotonic() - started - seconds / 2) < 3  # lag, for a moment
        for _ in range(3000 if burst else 30):
            producer.produce(topic, json.dumps({"id": i, "x": i, "bad": i % 33 == 0}).encode(),
                             str(i).encode())
            i += 1
        producer.poll(0)
        time.sleep(0.1)
    producer.flush(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "images" / "dashboard.png"))
    args = parser.parse_args()
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        sys.exit("needs Prometheus: apt-get install prometheus")
    work = Path(tempfile.mkdtemp(prefix="dashboard-snapshot-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with mlflow.start_run():
        model = mlflow.preproc.log_model(features, name="p").model_uri
    bin_dir = Path(sys.executable).parent
    processes = []
    with EmbeddedBroker() as broker:
        broker.create_topics("raw", partitions=2)
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            env = {**os.environ, "MODEL_URI": model, "INPUT_TOPIC": "raw",
                   "OUTPUT_TOPIC": "clean", "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                   "CONSUMER_GROUP_ID": "snapshot", "METRICS_PORT": str(port),
                   "METRICS_HOST": "127.0.0.1", "LIBRDKAFKA_SESSION_TIMEOUT_MS": "6000",
                   "LIBRDKAFKA_HEARTBEAT_INTERVAL_MS": "1000", "DLQ_BRAKE_RATIO": "1",
                   # as the preproc target starts them (the "Revision running" panel)
                   "MLFLOW_PREPROC_DEPLOYMENT": "snapshot", "MLFLOW_PREPROC_REVISION": "2"}
            processes.append(subprocess.Popen(
                [str(bin_dir / "mlflow-preproc"), "stream"], env=env,
                stdout=open(work / f"stream-{i}.log", "wb"), stderr=subprocess.STDOUT))
        prom_port = free_port()
        config = work / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "fink-preproc", "static_configs": [
                {"targets": [f"127.0.0.1:{p}" for p in ports]}]}]}))
        processes.append(subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb")))
        try:
            time.sleep(15)  # both members join the group
            start = time.time()
            stop = threading.Event()
            producer = threading.Thread(target=produce, args=(broker.bootstrap_servers, "raw",
                                                              args.seconds, stop))
            producer.start()
            producer.join()
            time.sleep(10)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            drawn = render(f"http://127.0.0.1:{prom_port}", args.output, start, time.time())
        finally:
            for proc in processes:
                proc.send_signal(signal.SIGTERM)
            for proc in processes:
                proc.wait(60)
    print(f"{args.output}: " + ", ".join(f"{title} {n}" for title, n in drawn.items()))


if __name__ == "__main__":
    main()

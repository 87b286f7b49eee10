"""ZTF alerts on Apache Kafka through ``mlflow-preproc stream`` and through a Spark
Structured Streaming query (``mlflow-preproc run --engine spark kafka:TOPIC``).

The same topic of generated ZTF alerts (tests/ztf_archive.py: real schemas and histories,
full-size cutouts, one Avro container per message, as ZTF sends them) goes through:

(a) ``mlflow-preproc stream``                                    one process (the baseline)
(b) the query, ``--trigger available-now``, ``local[2]``         the whole topic, then end
(c) the query on a one-alert topic                               (b)'s start-up cost
(d) the query, ``--trigger '1 second'``, alerts arriving at a steady rate once it runs:
    latency
(e) the same, ``--trigger '10 seconds'``

with the ZTF feature extraction of benchmarks/stream_throughput.py and ``SKIP_CUTOUTS``.
``CPU`` is user + system time of the command's process tree (driver, JVM, Python workers),
sampled from /proc; ``alerts/s after start-up`` is ``alerts / (wall - start-up)``. Latency
is an output's CreateTime minus its input's (both written on this machine), p50/p99 over
the alerts of (d)/(e). Every run's outputs are checked against (a)'s, by source offset.

Usage::

    python benchmarks/spark_streaming.py            # 4,000 alerts (~6 min here)
    python benchmarks/spark_streaming.py --quick    # 1,000 alerts
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

import mlflow  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402

import apache_kafka  # noqa: E402 -- the test suite's Apache Kafka broker
import stream_throughput  # noqa: E402 -- the feature extraction, one definition for all
from spark_batch import TreeCPU  # noqa: E402
from throughput_common import percentile  # noqa: E402
from ztf_archive import write_archive  # noqa: E402

SCRIPT = Path(sys.executable).parent / "mlflow-preproc"
SOURCE = "x-preproc-source"


def produce(bootstrap: str, topic: str, values: list[bytes], rate: float | None = None) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "message.max.bytes": 2_000_000})
    started = time.monotonic()
    for i, value in enumerate(values):
        if rate:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        producer.produce(topic, value, str(i).encode())
        producer.poll(0)
    assert producer.flush(120) == 0


def read(bootstrap: str, topic: str, n: int, timeout: float = 900) -> list:
    """The first ``n`` distinct sources' outputs of ``topic`` (by assignment, no group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-reader",
                         "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    while topic not in consumer.list_topics(timeout=5).topics:
        time.sleep(0.2)
    parts = consumer.list_topics(topic, timeout=5).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    got: dict[bytes, object] = {}
    while len(got) < n and time.monotonic() < deadline:
        for m in consumer.consume(1000, 0.5):
            if m.error() is None:
                got.setdefault(dict(m.headers())[SOURCE], m)
    consumer.close()
    if len(got) < n:
        raise SystemExit(f"{topic}: {len(got)} of {n} outputs after {timeout} s")
    return list(got.values())


def timed(command: list[str], env: dict, until=None) -> tuple[float, dict[str, float]]:
    """Run ``command`` to its end (or, with ``until``, until it returns, then SIGTERM);
    wall seconds and CPU seconds of its process tree by kind."""
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    sampler = TreeCPU(proc.pid)
    sampler.start()
    if until is not None:
        until()
        wall = time.monotonic() - started
        sampler.sample()
        proc.terminate()
        proc.wait(120)
    else:
        err = proc.stderr.read()
        sampler.sample()
        proc.wait(1800)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"{command[1]} failed:\n{err.decode()[-3000:]}")
    sampler.done.set()
    return wall, sampler.totals()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alerts", type=int, default=4000)
    parser.add_argument("--quick", action="store_true", help="1,000 alerts")
    args = parser.parse_args(argv)
    n = 1000 if args.quick else args.alerts
    work = Path(tempfile.mkdtemp(prefix="bench-spark-streaming-"))
    jars = subprocess.run(["bash", str(ROOT / "scripts" / "spark-kafka.sh"), sys.executable],
                          capture_output=True, text=True, check=True).stdout.strip()
    alerts = [p.read_bytes() for p in write_archive(work / "alerts", n, 1)]
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    with mlflow.start_run():
        model = mlflow.preproc.log_model(stream_throughput.ztf_features, name="ztf").model_uri
    rows = []
    (work / "kafka").mkdir()
    with apache_kafka.ApacheKafka(workdir=work / "kafka") as broker:
        bootstrap = broker.bootstrap_servers
        broker.create_topics("raw", "one", partitions=2)
        produce(bootstrap, "raw", alerts)
        produce(bootstrap, "one", alerts[:1])
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
               "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "INPUT_FORMAT": "avro",
               "SKIP_CUTOUTS": "true", "LIBRDKAFKA_MESSAGE_MAX_BYTES": "2000000",
               "PYSPARK_SUBMIT_ARGS": f"--jars {jars} --conf spark.ui.enabled=false "
                                      "pyspark-shell"}

        def stream(topic: str, out: str, count: int) -> tuple[float, dict]:
            return timed([str(SCRIPT), "stream"], {
                **env, "MODEL_URI": model, "INPUT_TOPIC": topic, "OUTPUT_TOPIC": out,
                "CONSUMER_GROUP_ID": f"g-{out}", "LIBRDKAFKA_SESSION_TIMEOUT_MS": "6000"},
                until=lambda: read(bootstrap, out, count))

        def query(topic: str, out: str, *extra: str, until=None) -> tuple[float, dict]:
            return timed([str(SCRIPT), "run", "--engine", "spark", "--master", "local[2]",
                          "-m", model, f"kafka:{topic}", "-o", f"kafka:{out}",
                          "--checkpoint-location", str(work / f"ck-{out}"), *extra],
                         env, until)

        def row(name, wall, cpu, startup=None, latency=None):
            total = sum(cpu.values())
            rate = n / (wall - startup) if startup is not None else None
            rows.append((name, wall, n / wall, startup, rate, total / n * 1e6,
                         " / ".join(f"{cpu[k]:.1f}" for k in ("driver", "jvm", "workers")),
                         latency))

        stream_startup, _ = stream("one", "out-s1", 1)
        wall, cpu = stream("raw", "out-stream", n)
        reference = {dict(m.headers())[SOURCE]: m.value()
                     for m in read(bootstrap, "out-stream", n)}
        cpu = {"driver": sum(cpu.values()), "jvm": 0.0, "workers": 0.0}
        row("(a) `stream`", wall, cpu, stream_startup)
        startup, _ = query("one", "out-q1")
        wall, cpu = query("raw", "out-query")
        got = {dict(m.headers())[SOURCE]: m.value() for m in read(bootstrap, "out-query", n)}
        assert got == reference, "the query's outputs differ from the stream's"
        row("(b) query, available-now, local[2]", wall, cpu, startup)
        rows.append(("(c) query start-up (one alert)", startup, None, None, None, None, "",
                     None))
        for trigger, rate in (("1 second", 100.0), ("10 seconds", 100.0)):
            topic, out = f"steady-{trigger[:2].strip()}", f"out-steady-{trigger[:2].strip()}"
            broker.create_topics(topic, partitions=2)
            feed = threading.Thread(target=produce, args=(bootstrap, topic, alerts, rate))
            outputs: list = []

            def arrived(topic=topic, out=out):
                # One alert first: the latency is the running query's, not its start-up's.
                produce(bootstrap, topic, alerts[:1])
                warm_up = dict(read(bootstrap, out, 1)[0].headers())[SOURCE]
                feed.start()
                outputs.extend(m for m in read(bootstrap, out, n + 1)
                               if dict(m.headers())[SOURCE] != warm_up)

            wall, cpu = query(topic, out, "--trigger", trigger, until=arrived)
            feed.join()
            inputs = _input_times(bootstrap, topic)
            lat = [m.timestamp()[1] - inputs[dict(m.headers())[SOURCE]] for m in outputs]
            row(f"({'d' if trigger == '1 second' else 'e'}) query, trigger {trigger}, {rate:.0f} alerts/s in", wall, cpu,
                latency=(percentile(lat, 50) / 1000, percentile(lat, 99) / 1000))

    print(f"\n{n} ZTF alerts on Apache Kafka, {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| run | wall s | alerts/s | start-up s | alerts/s after start-up | CPU µs/alert | "
          "CPU s: driver / JVM / Python workers | latency p50 / p99 s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, wall, rate, startup, after, cpu_us, split, latency in rows:
        print(f"| {name} | {wall:.1f} | {_n(rate)} | {_f(startup)} | {_n(after)} | "
              f"{_n(cpu_us)} | {split} | "
              f"{f'{latency[0]:.1f} / {latency[1]:.1f}' if latency else '–'} |")
    return 0


def _input_times(bootstrap: str, topic: str) -> dict[bytes, int]:
    """``topic/partition/offset`` -> CreateTime (ms) of every input of ``topic``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-inputs",
                         "enable.auto.commit": False})
    parts = consumer.list_topics(topic, timeout=5).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    times: dict[bytes, int] = {}
    idle = 0
    while idle < 3:
        batch = [m for m in consumer.consume(1000, 1.0) if m.error() is None]
        idle = 0 if batch else idle + 1
        for m in batch:
            times[f"{topic}/{m.partition()}/{m.offset()}".encode()] = m.timestamp()[1]
    consumer.close()
    return times


def _n(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())

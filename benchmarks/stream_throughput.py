"""Throughput of ``mlflow-preproc stream`` against a raw confluent-kafka loop and a naive one.

Runs everything on the embedded broker (Tansu on loopback, see
:mod:`mlflow_preproc.streaming.embedded_broker`) and prints one table, in one run:

(a) raw       a plain confluent-kafka consume -> produce loop, no preprocessing: the ceiling.
              ``consume(500)``, each value produced unchanged (``produce`` + ``poll(0)``),
              an asynchronous commit per batch; same client settings as the stream
              (``linger.ms=5``, ``enable.idempotence=true``, ``fetch.queue.backoff.ms=10``).
(a') json     the same loop, each value parsed and serialised again with orjson and nothing
              else: the ceiling of any loop that reads its JSON records.
(b) naive     one message at a time, like the legacy runner: ``poll()``, ``json.loads``,
              ``pre_processing`` (identity), ``json.dumps``, ``produce``, ``flush()`` and a
              synchronous commit per message. Slow, so it runs on fewer records.
(c) stream    the real ``mlflow-preproc stream`` console script with an identity model
              logged with ``mlflow.preproc.log_model`` into a temporary sqlite store.
(d) stream    the same with a realistic feature-extraction model on the real ZTF alerts of
    ztf-avro  ``tests/data/*.avro`` (one Avro container per message, ``INPUT_FORMAT=avro``,
              ``SKIP_CUTOUTS=true``), replicated to volume.

(a), (a'), (b) and (c) use the same ~1 KB JSON records (a flattened ZTF candidate: 34 numeric
fields and a few strings, values jittered per record) and (a), (a') and (c) the same number.

Method, the same for every scenario: a fresh input topic is filled with N records first; then
the loop under test is started as its own process ((a), (a') and (b) are this script re-run with
``--worker``, (c) and (d) the ``mlflow-preproc`` console script); a watcher in this process
reads the output topic by assignment (no group, so no join delay) until it has all N outputs,
noting when each output arrived. The rate is counted from the end of the first batch to the
last output::

    records/s = (N - B) / (t[N] - t[B])        B = 500 (one consume batch), 1 for (b)

so process start-up, model loading, the consumer-group join (~3 s on Tansu) and the first
batch are left out, and what is measured is outputs landing in the output topic, whole
batches of consume + process + produce + delivery. The "records" column is N - B, "seconds"
is t[N] - t[B]; MB/s is input bytes per second. The watcher reads a full topic at about
300,000 messages/s here, several times the fastest loop, so it does not limit the result.

Cross-checks printed under the table: the same formula on the outputs' CreateTime timestamps
(stamped when the loop called ``produce()``; for (a) this runs ahead of delivery, since the
loop only fills librdkafka's local queue) and the median of the stream's own 1 s stats lines.
The loops stop by themselves ((a) and (b) after N records, (c) and (d) on SIGTERM sent to their
PID once all outputs are in); the broker is stopped by PID at the end. Only loopback is used.

Usage::

    python benchmarks/stream_throughput.py              # full size (about 5 minutes)
    python benchmarks/stream_throughput.py --quick      # a small run (well under a minute)
    python benchmarks/stream_throughput.py --records 100000 --naive-records 3000

The issue's goal, on ~1 KB JSON records: c/a >= 0.8 and c/b >= 10. c/a' is printed too: how
close the stream comes to a loop that does nothing but move and re-serialise the JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import confluent_kafka
import fastavro
import orjson
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, Consumer, Producer, \
    TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import mlflow_preproc
from mlflow_preproc.streaming.embedded_broker import EmbeddedBroker

DEFAULT_ALERTS_DIR = Path(mlflow_preproc.__file__).resolve().parents[1] / "tests" / "data"

# The stream's client settings (mlflow_preproc/kafka_loop.py), used by (a), (a') and (b) too,
# so that the loops differ in what they do per record and not in tuning.
PRODUCER_SETTINGS = {"linger.ms": 5, "enable.idempotence": True}
CONSUMER_SETTINGS = {"fetch.queue.backoff.ms": 10}
# Tansu joins a group in about session.timeout.ms / 2 (FIELD-NOTES section 7).
GROUP_SETTINGS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}
CONSUME_BATCH = 500
SCENARIO_TIMEOUT_S = 600.0

ZTF_STRING_FIELDS = ("isdiffpos", "programpi", "rbversion", "ssnamenr")
N_NUMERIC_FIELDS = 34


# ---- the preprocessing functions logged as models ------------------------------------------

def identity(record: dict) -> dict:
    """(c): no preprocessing at all."""
    return record


def ztf_features(alert: dict) -> dict:
    """(d): features of one ZTF alert, as a classifier's preprocessing would compute them."""
    c = alert["candidate"]
    prv = alert.get("prv_candidates") or []
    prv_mags = [p["magpsf"] for p in prv if p.get("magpsf") is not None]
    prv_jds = [p["jd"] for p in prv if p.get("jd") is not None]
    return {
        "objectId": alert["objectId"],
        "candid": alert["candid"],
        "jd": c["jd"],
        "fid": c["fid"],
        "magpsf": c["magpsf"],
        "sigmapsf": c["sigmapsf"],
        "rb": c["rb"],
        "drb": c.get("drb"),
        "snr": 1.0857 / c["sigmapsf"] if c["sigmapsf"] else None,
        "isdiffpos": c["isdiffpos"] in ("t", "1"),
        "n_prv": len(prv),
        "n_prv_detections": len(prv_mags),
        "prv_mag_mean": statistics.fmean(prv_mags) if prv_mags else None,
        "prv_mag_std": statistics.pstdev(prv_mags) if len(prv_mags) > 1 else None,
        "mag_delta_last": c["magpsf"] - prv_mags[-1] if prv_mags else None,
        "days_since_first": c["jd"] - min(prv_jds) if prv_jds else 0.0,
        "ndethist": c["ndethist"],
        "distnr": c["distnr"],
        "ra": c["ra"],
        "dec": c["dec"],
    }


# ---- input data --------------------------------------------------------------------------

def read_alert_files(alerts_dir: Path) -> list[bytes]:
    """The real ZTF alerts: each file is one Avro container, sent whole as one message."""
    paths = sorted(alerts_dir.glob("*.avro"))
    if not paths:
        raise SystemExit(f"no *.avro alerts in {alerts_dir}; pass --alerts-dir")
    return [p.read_bytes() for p in paths]


def make_json_records(n: int, alert_bytes: bytes, seed: int = 42) -> list[bytes]:
    """``n`` JSON records of about 1 KB: a ZTF candidate flattened, values jittered per record."""
    alert = next(iter(fastavro.reader(io.BytesIO(alert_bytes))))
    candidate = alert["candidate"]
    numeric = [k for k, v in candidate.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)][:N_NUMERIC_FIELDS]
    rng = random.Random(seed)
    values = []
    for i in range(n):
        record: dict = {"objectId": f"ZTF18{i:07d}", "candid": candidate["candid"] + i}
        for key in numeric:
            v = candidate[key]
            record[key] = v if isinstance(v, int) else v * (1 + rng.uniform(-1e-3, 1e-3))
        for key in ZTF_STRING_FIELDS:
            record[key] = candidate.get(key) or ""
        values.append(json.dumps(record).encode())
    return values


# ---- broker helpers ----------------------------------------------------------------------

_name_counter = 0


def fresh_name(prefix: str) -> str:
    """A topic or group name used once: a reused group can get stuck on Tansu."""
    global _name_counter
    _name_counter += 1
    return f"bench-{prefix}-{os.getpid()}-{_name_counter}"


def fill_topic(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce ``values`` (keyed by index) and wait until the broker has them all."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "message.max.bytes": 2_000_000})
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(topic, value, str(i).encode())
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} messages were not acknowledged while filling {topic}")


def create_topics(bootstrap: str, topics: list[str]) -> None:
    """Create fresh single-partition topics (the loops under test then find them ready)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        future.result(15)


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Free the broker's memory (Tansu keeps everything in RAM)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics, operation_timeout=15).values():
        try:
            future.result(15)
        except Exception:  # noqa: BLE001 -- best effort, the broker goes away at the end anyway
            pass


@dataclass
class Watch:
    """What the watcher saw on the output topic, one entry per output, in topic order."""

    timestamps_ms: list[int]    # CreateTime: when the loop under test called produce()
    arrivals: list[float]       # when the watcher received it (time.monotonic())


def watch_output(bootstrap: str, topic: str, expected: int, proc: subprocess.Popen,
                 timeout: float) -> Watch:
    """Read ``topic`` from the start by assignment until ``expected`` outputs arrived."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": fresh_name("watcher"),
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    w = Watch([], [])
    deadline = time.monotonic() + timeout
    try:
        while len(w.arrivals) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(w.arrivals)}/{expected} outputs after "
                                   f"{timeout:.0f} s")
            exited = proc.poll() is not None
            batch = consumer.consume(1000, 2.0 if exited else 0.2)
            now = time.monotonic()
            good = [m for m in batch if m.error() is None]
            if exited and not good:
                raise RuntimeError(f"the process exited with {proc.returncode} after "
                                   f"{len(w.arrivals)}/{expected} outputs")
            for m in good:
                kind, ts = m.timestamp()
                if kind != TIMESTAMP_CREATE_TIME:
                    raise RuntimeError(f"output without a CreateTime timestamp ({kind})")
                w.timestamps_ms.append(ts)
                w.arrivals.append(now)
    finally:
        consumer.close()
    return w


# ---- results -----------------------------------------------------------------------------

@dataclass
class Result:
    scenario: str
    records: int
    seconds: float
    input_bytes: int
    note: str = ""
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / self.seconds / 1e6 if self.seconds > 0 else float("nan")


def result_from_watch(scenario: str, w: Watch, values: list[bytes], skip: int,
                      note: str = "") -> Result:
    """Rate from the ``skip``-th output to the last one (see the docstring).

    ``skip`` is one consume batch for the batched loops: the first batch's outputs appear only
    once it has been processed, so counting from the end of the first batch measures whole
    batches (consume + process + produce) and leaves the start-up out.
    """
    n = len(w.arrivals)
    if n <= skip:
        raise RuntimeError(f"{n} outputs are too few to measure past the first {skip}; "
                           "use more records")
    counted = n - skip
    seconds = w.arrivals[-1] - w.arrivals[skip - 1]
    avg_size = sum(len(v) for v in values) / len(values)
    produce_s = (w.timestamps_ms[-1] - w.timestamps_ms[skip - 1]) / 1000
    cross_check = (f"produce() timestamps: {counted / produce_s:,.0f} rec/s"
                   if produce_s > 0 else "")
    return Result(scenario, counted, seconds, int(counted * avg_size),
                  note="; ".join(x for x in (note, cross_check) if x))


# ---- (a) and (b): loops run in a child process (this script with --worker) ---------------

def _clients(bootstrap: str, input_topic: str, group: str) -> tuple[Consumer, Producer]:
    """A subscribed consumer and a producer with the stream's settings."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         **GROUP_SETTINGS, **CONSUMER_SETTINGS})
    consumer.subscribe([input_topic])
    return consumer, Producer({"bootstrap.servers": bootstrap, **PRODUCER_SETTINGS})


def _batched_loop(bootstrap: str, input_topic: str, output_topic: str, group: str, n: int,
                  transform: Callable[[bytes], bytes] | None) -> None:
    """consume a batch -> produce each value (transformed) -> asynchronous commit."""
    consumer, producer = _clients(bootstrap, input_topic, group)
    done = 0
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    while done < n and time.monotonic() < deadline:
        messages = consumer.consume(CONSUME_BATCH, 1.0)
        for msg in messages:
            if msg.error() is not None:
                continue
            value = msg.value() if transform is None else transform(msg.value())
            while True:
                try:
                    producer.produce(output_topic, value, msg.key())
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            done += 1
        if messages:
            consumer.commit(asynchronous=True)
    producer.flush(30)
    consumer.close()


def raw_loop(bootstrap: str, input_topic: str, output_topic: str, group: str, n: int) -> None:
    """(a) consume a batch -> produce each value unchanged -> asynchronous commit."""
    _batched_loop(bootstrap, input_topic, output_topic, group, n, None)


def json_loop(bootstrap: str, input_topic: str, output_topic: str, group: str, n: int) -> None:
    """(a') the same, each value parsed and serialised again with orjson, nothing else."""
    _batched_loop(bootstrap, input_topic, output_topic, group, n,
                  lambda value: orjson.dumps(orjson.loads(value)))


def naive_loop(bootstrap: str, input_topic: str, output_topic: str, group: str, n: int) -> None:
    """(b) one message at a time, flushing and committing synchronously after each."""
    consumer, producer = _clients(bootstrap, input_topic, group)
    done = 0
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    while done < n and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is None or msg.error() is not None:
            continue
        record = json.loads(msg.value())
        output = identity(record)
        producer.produce(output_topic, json.dumps(output).encode(), msg.key())
        producer.flush()
        consumer.commit(message=msg, asynchronous=False)
        done += 1
    consumer.close()


WORKERS: dict[str, Callable[[str, str, str, str, int], None]] = {
    "raw": raw_loop, "json": json_loop, "naive": naive_loop}


def run_worker_scenario(scenario: str, worker: str, bootstrap: str, values: list[bytes],
                        log_dir: Path) -> Result:
    """Fill a fresh topic, run ``worker`` in a child process, watch its outputs."""
    input_topic, output_topic = fresh_name("in"), fresh_name("out")
    create_topics(bootstrap, [input_topic, output_topic])
    fill_topic(bootstrap, input_topic, values)
    log_path = log_dir / f"{fresh_name(worker)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", worker,
             "--bootstrap", bootstrap, "--input-topic", input_topic,
             "--output-topic", output_topic, "--group", fresh_name("group"),
             "--records", str(len(values))],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        w = watch_output(bootstrap, output_topic, len(values), proc, SCENARIO_TIMEOUT_S)
        proc.wait(60)  # it stops by itself after N records
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        stop_pid(proc)
        delete_topics(bootstrap, [input_topic, output_topic])
    skip = 1 if worker == "naive" else CONSUME_BATCH
    return result_from_watch(scenario, w, values, skip)


# ---- (c) and (d): the real `mlflow-preproc stream` -------------------------------------------

def log_models(tracking_dir: Path) -> tuple[str, dict[str, str]]:
    """Log the identity and the ZTF feature models; return the tracking URI and model URIs."""
    import mlflow

    uri = f"sqlite:///{tracking_dir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment(
        "stream-throughput", artifact_location=(tracking_dir / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        mlflow.preproc.log_model(identity, name="identity",
                                 registered_model_name="bench-identity")
        mlflow.preproc.log_model(ztf_features, name="ztf",
                                 registered_model_name="bench-ztf-features")
    return uri, {"identity": "models:/bench-identity/1", "ztf": "models:/bench-ztf-features/1"}


def run_stream_scenario(scenario: str, bootstrap: str, tracking_uri: str, model_uri: str,
                        values: list[bytes], log_dir: Path, extra_env: dict[str, str],
                        name: str, stream_command: list[str]) -> Result:
    """Fill a fresh topic, run ``mlflow-preproc stream`` on it, watch its outputs, SIGTERM it."""
    input_topic, output_topic = fresh_name("in"), fresh_name("out")
    dlq_topic = f"{input_topic}-dlq"
    create_topics(bootstrap, [input_topic, output_topic, dlq_topic])
    fill_topic(bootstrap, input_topic, values)
    env = {**os.environ,
           "MLFLOW_TRACKING_URI": tracking_uri,
           "MODEL_URI": model_uri,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "INPUT_TOPIC": input_topic,
           "OUTPUT_TOPIC": output_topic,
           "CONSUMER_GROUP_ID": fresh_name("group"),
           "LIBRDKAFKA_SESSION_TIMEOUT_MS": "6000",
           "LIBRDKAFKA_HEARTBEAT_INTERVAL_MS": "1000",
           "LOG_FORMAT": "json",
           "STATS_INTERVAL_S": "1",
           "BATCH_SIZE": str(CONSUME_BATCH),
           **extra_env}
    log_path = log_dir / f"{fresh_name(name)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(stream_command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        w = watch_output(bootstrap, output_topic, len(values), proc, SCENARIO_TIMEOUT_S)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        if code != 0:
            raise RuntimeError(f"mlflow-preproc stream exited with {code}")
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        stop_pid(proc)
        delete_topics(bootstrap, [input_topic, output_topic, dlq_topic])
    counts, own_rate = parse_stream_log(log_path)
    if counts.get("in") != len(values) or counts.get("out") != len(values):
        raise RuntimeError(f"the stream's stop line says {counts}, expected in=out="
                           f"{len(values)}; log: {log_path}")
    note = f"own stats lines: median {own_rate:,.0f} rec/s" if own_rate else ""
    return result_from_watch(scenario, w, values, skip=CONSUME_BATCH, note=note)


def parse_stream_log(path: Path) -> tuple[dict, float | None]:
    """The stop line's counts, and the median rate of its 1 s stats lines while busy."""
    counts: dict = {}
    rates = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # librdkafka's own log lines
        if not isinstance(entry, dict):
            continue
        if entry.get("event") == "stop":
            counts = {k: entry.get(k) for k in ("in", "out", "dropped", "failed")}
        elif entry.get("event") == "stats" and entry.get("records_per_s", 0) > 0:
            rates.append(entry["records_per_s"])
    # The first and last busy intervals are partly idle: leave them out when there are more.
    busy = rates[1:-1] if len(rates) > 2 else rates
    return counts, (statistics.median(busy) if busy else None)


def stop_pid(proc: subprocess.Popen) -> None:
    """Stop a process this script started, by its PID, if it is still running."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def median_of(runs: list[Result]) -> Result:
    """The run with the median rate, its note saying the spread of all runs."""
    ordered = sorted(runs, key=lambda r: r.rate)
    median = ordered[(len(ordered) - 1) // 2]
    if len(runs) > 1:
        spread = (f"median of {len(runs)} runs "
                  f"({ordered[0].rate:,.0f}-{ordered[-1].rate:,.0f} rec/s)")
        median.note = f"{spread}; {median.note}" if median.note else spread
    return median


# ---- the table ---------------------------------------------------------------------------

def machine_info() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: nproc={os.cpu_count()}{' (' + cpu + ')' if cpu else ''}, "
            f"load average {load}, python {platform.python_version()}, "
            f"confluent-kafka {confluent_kafka.__version__}, "
            f"librdkafka {confluent_kafka.libversion()[0]}, broker: Tansu (embedded, loopback)")


def label(r: Result) -> str:
    """``(a)``, ``(a')``... of a scenario name."""
    return r.scenario.split(" ", 1)[0]


def print_table(results: list[Result], wall_s: float) -> None:
    header = f"{'scenario':<34} {'records':>9} {'seconds':>9} {'records/s':>11} {'MB/s':>8}"
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error:
            print(f"{r.scenario:<34} {'FAILED':>9}  {r.error}")
            continue
        print(f"{r.scenario:<34} {r.records:>9,} {r.seconds:>9.2f} {r.rate:>11,.0f} "
              f"{r.mb_per_s:>8.2f}")
    print("-" * len(header))
    by_key = {label(r): r for r in results if not r.error}
    a, a_json, b, c = (by_key.get(k) for k in ("(a)", "(a')", "(b)", "(c)"))
    if a and c:
        ratio = c.rate / a.rate
        print(f"c/a = {ratio:.2f}   (goal >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
    if b and c:
        ratio = c.rate / b.rate
        print(f"c/b = {ratio:.1f}   (goal >= 10: {'met' if ratio >= 10 else 'NOT met'})")
    if a_json and c:
        print(f"c/a' = {c.rate / a_json.rate:.2f}  (a' = a + orjson loads/dumps per record)")
    for r in results:
        if r.note and not r.error:
            print(f"  {label(r)} {r.note}")
    print(machine_info())
    print(f"total wall time: {wall_s:.0f} s")


# ---- main --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # A few seconds per run at ~100k records/s: shorter runs are dominated by noise here.
    p.add_argument("--records", type=int, default=200_000,
                   help="JSON records for (a), (a') and (c) (default 200000)")
    p.add_argument("--naive-records", type=int, default=2_000,
                   help="JSON records for the slow one-at-a-time loop (b) (default 2000)")
    p.add_argument("--alerts", type=int, default=5_000,
                   help="Avro alert messages for (d) (default 5000)")
    p.add_argument("--quick", action="store_true",
                   help="a small run: 5000 / 300 / 1500 records, once each")
    p.add_argument("--alerts-dir", type=Path, default=DEFAULT_ALERTS_DIR,
                   help=f"folder of ZTF *.avro alerts (default {DEFAULT_ALERTS_DIR})")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each scenario; the table shows the median run (default 3)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temporary folder with the processes' logs")
    # Internal: run loop (a), (a') or (b) in this process (the benchmark starts itself this way).
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--input-topic", help=argparse.SUPPRESS)
    p.add_argument("--output-topic", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.naive_records, args.alerts, args.repeat = 5_000, 300, 1_500, 1
    return args


def stream_command() -> list[str]:
    """The real console script installed beside this interpreter."""
    script = Path(sys.executable).parent / "mlflow-preproc"
    if not script.exists():
        raise SystemExit(f"{script} not found; pip install -e . into this environment first")
    return [str(script), "stream"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args.bootstrap, args.input_topic, args.output_topic, args.group,
                             args.records)
        return 0

    started = time.monotonic()
    alerts = read_alert_files(args.alerts_dir)
    json_values = make_json_records(args.records, alerts[0])
    naive_values = json_values[:args.naive_records]
    alert_values = [alerts[i % len(alerts)] for i in range(args.alerts)]
    avg_json = sum(len(v) for v in json_values) / len(json_values)
    avg_alert = sum(len(v) for v in alert_values) / len(alert_values)
    print(f"JSON records: {len(json_values):,} x {avg_json:,.0f} B; naive: "
          f"{len(naive_values):,}; ZTF alerts: {len(alert_values):,} x {avg_alert / 1e3:,.1f} kB "
          f"({len(alerts)} distinct, cutouts included)", flush=True)

    work_dir = Path(tempfile.mkdtemp(prefix="stream-throughput-"))
    results: list[Result] = []
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        tracking_uri, models = log_models(work_dir)
        command = stream_command()
        scenarios: list[tuple[str, Callable[[], Result]]] = [
            ("(a) raw confluent-kafka loop",
             lambda: run_worker_scenario("(a) raw confluent-kafka loop", "raw", bootstrap,
                                         json_values, work_dir)),
            ("(a') raw loop + JSON round trip",
             lambda: run_worker_scenario("(a') raw loop + JSON round trip", "json", bootstrap,
                                         json_values, work_dir)),
            ("(b) naive 1-at-a-time loop",
             lambda: run_worker_scenario("(b) naive 1-at-a-time loop", "naive", bootstrap,
                                         naive_values, work_dir)),
            ("(c) mlflow-preproc stream, identity",
             lambda: run_stream_scenario("(c) mlflow-preproc stream, identity", bootstrap,
                                         tracking_uri, models["identity"], json_values,
                                         work_dir, {}, "stream-identity", command)),
            ("(d) stream, ZTF Avro features",
             lambda: run_stream_scenario("(d) stream, ZTF Avro features", bootstrap,
                                         tracking_uri, models["ztf"], alert_values, work_dir,
                                         {"INPUT_FORMAT": "avro", "SKIP_CUTOUTS": "true"},
                                         "stream-ztf", command)),
        ]
        for name, run in scenarios:
            print(f"running {name} ({args.repeat}x) ...", flush=True)
            try:
                results.append(median_of([run() for _ in range(args.repeat)]))
            except Exception as exc:  # noqa: BLE001 -- reported in the table, the rest goes on
                results.append(Result(name, 0, 0.0, 0, error=str(exc)))
    print_table(results, time.monotonic() - started)
    if args.keep_logs or any(r.error for r in results):
        print(f"logs: {work_dir}")
    else:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

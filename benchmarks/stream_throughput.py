"""Throughput of ``mlflow-preproc stream`` against raw loops, the peers users would pick
instead, the Avro decode ceiling, more processes, and REST serving: one table, one run.

Kafka rows run on the embedded broker (Tansu on loopback, see
:mod:`mlflow_preproc.streaming.embedded_broker`), or with ``--broker apache-kafka`` on Apache
Kafka (a single-node KRaft broker on loopback, ``tests/apache_kafka.py``, with the JVM settings
of Kafka's own start script), or on both in one run (``--broker embedded,apache-kafka``: each
row once per broker, the Apache Kafka ones marked ``[AK]``); each loop in its own process:

(a)  raw       a plain confluent-kafka consume -> produce loop, no parsing. ``consume(500)``,
               each value produced unchanged (``produce`` + ``poll(0)``), an asynchronous
               commit per batch; the stream's client settings (``linger.ms=5``,
               ``enable.idempotence=true``, ``fetch.queue.backoff.ms=10``).
(a') json      the same loop plus ``orjson.loads``/``dumps`` per record: the JSON ceiling.
(a'') provenance  (a') plus what the stream adds to each output in the client: its two
               provenance headers (source topic/partition/offset, model) and a delivery
               callback object per input message (a delivery report carries no headers, so
               the callback is what names an output's source when its delivery fails).
(b)  naive     one message at a time, like the legacy runner: ``poll()``, ``json.loads``,
               identity, ``json.dumps``, ``produce``, ``flush()``, a synchronous commit.
(c)  stream    the ``mlflow-preproc stream`` console script, a preprocessing model logged with
               ``mlflow.preproc.log_model`` doing identity plus one field
               (``candid_next = candid + 1``, :func:`throughput_common.add_field`).
(q)  quix      Quix Streams 3.x: a default ``Application``, ``sdf.apply(add_field)``,
               ``to_topic``, JSON serde (``peers/quix_app.py``, in its own virtualenv).
(m)  mlserver  MLServer 1.7 in its Kafka mode serving an MLflow pyfunc doing the same
               (``peers/mlserver_model.py``, its own virtualenv). Its input contract is one V2
               inference request per message, so each record is sent as one: every field a
               ``[1]``-shaped tensor, ``content_type: pd``; outputs are V2 responses.
(d)  ztf       the stream with a feature-extraction model on the real ZTF alerts of
               ``tests/data/*.avro`` (one Avro container per message, ``INPUT_FORMAT=avro``,
               ``SKIP_CUTOUTS=true``), replicated to volume.
(d0) fastavro  the ceiling of (d): ``fastavro.schemaless_reader`` on each alert's record,
               the schema parsed once; no Kafka, one process.
(d1) decoder   what (d) does to each message before preprocessing: ``MessageDecoder`` with the
               cutouts skipped (container header, framing, skipping); no Kafka, one process.
(s1) (s2) (s4) the stream's image entrypoint (``MLFLOW_PREPROC_MODE=kafka``) with
               ``KAFKA_CONSUMERS`` = 1, 2, 4 stream processes in one group on a 4-partition
               topic, on the JSON records of (c).
(rp) (rf)      ``mlflow models serve`` of the preprocessing model of (c), and of a stock
               ``mlflow.pyfunc.PythonModel`` doing the same on its DataFrame
               (``peers/pyfunc_add_field.py``): one client posting 100-record
               ``dataframe_records`` batches one after the other (``throughput_rest.py``).

Every output of every row is counted and checked: the output has the input's fields, plus
``candid_next`` with the right value where the row runs the function; (d) outputs equal the
features computed here. The rate of every row is the same (:mod:`throughput_common`)::

    records/s = (outputs after the first one) / (last output's arrival - first output's arrival)

so start-up, model loading and the group join (~3 s on Tansu) are left out. Kafka outputs
arrive at a watcher in this process that reads the output topic by assignment; REST outputs
are the records of each response; decode outputs are decoded records. "CPU" is the cores the
processes under test (with their children) used between the first and the last output,
"broker" the broker's; a loop that is CPU-bound shows ~1.0 per Python process.

Peers live in virtualenvs under ``benchmarks/.venvs/`` that ``--setup`` creates (their pins
never touch this project's); a peer whose virtualenv is missing, or that cannot run on the
broker, gets a row saying why. The repeats run in rounds (every row once, then
again), so that the load of a shared machine drifting weighs on every row alike.

Usage::

    python benchmarks/stream_throughput.py --setup      # once: the peers' virtualenvs
    python benchmarks/stream_throughput.py              # full size, 3 rounds (~20 minutes)
    python benchmarks/stream_throughput.py --quick      # a small run, one round (~3 minutes)
    python benchmarks/stream_throughput.py --only c,q   # some rows
    python benchmarks/stream_throughput.py --only "a',c,q" --broker embedded,apache-kafka
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
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
from confluent_kafka import Consumer, Producer

import mlflow_preproc
import mlflow_preproc.config
from mlflow_preproc.config import ZTF_CUTOUTS
from mlflow_preproc.runtime.formats import MessageDecoder
from mlflow_preproc.runtime.jsonable import dumps as jsonable_dumps
from mlflow_preproc.streaming.embedded_broker import EmbeddedBroker

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
import apache_kafka  # noqa: E402 -- the test suite's Apache Kafka broker
import throughput_peers as peers  # noqa: E402 -- beside this script
import throughput_rest as rest  # noqa: E402
from throughput_common import (  # noqa: E402
    GROUP_SETTINGS, SCENARIO_TIMEOUT_S, CpuMeter, Result, add_field, check_outputs,
    create_topics, delete_topics, fill_topic, fresh_name, make_json_records, median_run,
    parse_stream_logs, percentile, rate_window, result_from_watch, same_record, stop_process,
    watch_output)

DEFAULT_ALERTS_DIR = Path(mlflow_preproc.__file__).resolve().parents[1] / "tests" / "data"

# The stream's client settings (mlflow_preproc/streaming/clients.py), used by (a), (a') and (b)
# too, so that the loops differ in what they do per record and not in tuning.
PRODUCER_SETTINGS = {"linger.ms": 5, "enable.idempotence": True}
CONSUMER_SETTINGS = {"fetch.queue.backoff.ms": 10}
CONSUME_BATCH = 500
SCALE_PARTITIONS = 4

# librdkafka settings reach `mlflow-preproc stream` through environment variables with one
# prefix (mlflow_preproc/config.py): the only place this script names it.
LIBRDKAFKA_ENV_PREFIX = getattr(mlflow_preproc.config, "LIBRDKAFKA_PREFIX", "KAFKA_")


def librdkafka_env(settings: dict) -> dict[str, str]:
    """``{"session.timeout.ms": 6000}`` as the stream's variables (``..._SESSION_TIMEOUT_MS``)."""
    return {LIBRDKAFKA_ENV_PREFIX + key.upper().replace(".", "_"): str(value)
            for key, value in settings.items()}


# ---- the preprocessing functions logged as models ------------------------------------------

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


def log_models(tracking_dir: Path) -> tuple[str, dict[str, str]]:
    """Log the add-field and the ZTF feature models; return the tracking URI and model URIs."""
    import mlflow

    uri = f"sqlite:///{tracking_dir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment(
        "stream-throughput", artifact_location=(tracking_dir / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        mlflow.preproc.log_model(add_field, name="add_field",
                                 registered_model_name="bench-add-field")
        mlflow.preproc.log_model(ztf_features, name="ztf",
                                 registered_model_name="bench-ztf-features")
    return uri, {"add_field": "models:/bench-add-field/1", "ztf": "models:/bench-ztf-features/1"}


# ---- input data --------------------------------------------------------------------------

def read_alert_files(alerts_dir: Path) -> list[bytes]:
    """The real ZTF alerts: each file is one Avro container, sent whole as one message."""
    paths = sorted(alerts_dir.glob("*.avro"))
    if not paths:
        raise SystemExit(f"no *.avro alerts in {alerts_dir}; pass --alerts-dir")
    return [p.read_bytes() for p in paths]


@dataclass
class Inputs:
    """The records of every row, made once."""

    json_values: list[bytes]     # (a), (a'), (c), (q), (s*): ~1 KB JSON records
    json_records: list[dict]     # the same, parsed: what outputs are checked against
    naive_count: int             # (b) uses the first ones
    peer_count: int              # (m) uses the first ones (it is slow)
    alert_values: list[bytes]    # (d), (d0), (d1): whole Avro containers, cutouts included
    rest_requests: int           # (r): 100-record requests per run

    def avg_json_bytes(self, n: int | None = None) -> float:
        values = self.json_values[:n]
        return sum(len(v) for v in values) / len(values)


# ---- (a), (a') and (b): loops run in a child process (this script with --worker) ---------

def _clients(bootstrap: str, input_topic: str, group: str) -> tuple[Consumer, Producer]:
    """A subscribed consumer and a producer with the stream's settings."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         **GROUP_SETTINGS, **CONSUMER_SETTINGS})
    consumer.subscribe([input_topic])
    return consumer, Producer({"bootstrap.servers": bootstrap, **PRODUCER_SETTINGS})


def _wait_for_sigterm(timeout: float = 120.0) -> None:
    """Stay alive until the benchmark has seen every output (it then sends SIGTERM), so that
    the CPU this process used can still be read from /proc."""
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopped.append(signum))
    deadline = time.monotonic() + timeout
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.05)


class _OnError:
    """(a'')'s delivery callback, one per input message as the stream's: it keeps the
    message, since a delivery report carries no headers to say where an output came from."""

    __slots__ = ("source", "headers")

    def __init__(self, source, headers):
        self.source, self.headers = source, headers

    def __call__(self, err, msg):
        if err is not None:
            raise SystemExit(f"delivery failed: {err}")


def _batched_loop(bootstrap: str, input_topic: str, output_topic: str, group: str, n: int,
                  transform: Callable[[bytes], bytes] | None, provenance: bool = False) -> None:
    """consume a batch -> produce each value (transformed) -> asynchronous commit. With
    ``provenance``, each output gets the stream's two headers (its source and its model)
    and a delivery callback of its own, as the stream's outputs do."""
    consumer, producer = _clients(bootstrap, input_topic, group)
    model_header = ("x-preproc-model", b"models:/bench-add-field/1")
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
                    if provenance:
                        headers = [("x-preproc-source", f"{msg.topic()}/{msg.partition()}/"
                                                        f"{msg.offset()}".encode()), model_header]
                        producer.produce(output_topic, value, msg.key(), headers=headers,
                                         on_delivery=_OnError(msg, headers))
                    else:
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
    _wait_for_sigterm()


def raw_loop(bootstrap: str, input_topic: str, output_topic: str, group: str, n: int) -> None:
    """(a) consume a batch -> produce each value unchanged -> asynchronous commit."""
    _batched_loop(bootstrap, input_topic, output_topic, group, n, None)


def json_loop(bootstrap: str, input_topic: str, output_topic: str, group: str, n: int) -> None:
    """(a') the same, each value parsed and serialised again with orjson, nothing else."""
    _batched_loop(bootstrap, input_topic, output_topic, group, n,
                  lambda value: orjson.dumps(orjson.loads(value)))


def provenance_loop(bootstrap: str, input_topic: str, output_topic: str, group: str,
                    n: int) -> None:
    """(a'') (a') plus, per output, the stream's provenance headers and delivery callback."""
    _batched_loop(bootstrap, input_topic, output_topic, group, n,
                  lambda value: orjson.dumps(orjson.loads(value)), provenance=True)


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
        producer.produce(output_topic, json.dumps(record).encode(), msg.key())
        producer.flush()
        consumer.commit(message=msg, asynchronous=False)
        done += 1
    consumer.close()
    _wait_for_sigterm()


WORKERS: dict[str, Callable[[str, str, str, str, int], None]] = {
    "raw": raw_loop, "json": json_loop, "provenance": provenance_loop, "naive": naive_loop}


def run_worker(worker: str, bootstrap: str, inputs: Inputs, n: int, log_dir: Path,
               broker: EmbeddedBroker) -> Result:
    """(a), (a'), (b): fill a fresh topic, run ``worker`` in a child process, watch it."""
    values = inputs.json_values[:n]
    input_topic, output_topic = fresh_name("in"), fresh_name("out")
    create_topics(bootstrap, [input_topic, output_topic])
    fill_topic(bootstrap, input_topic, values)
    log_path = log_dir / f"{fresh_name(worker)}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", worker,
             "--bootstrap", bootstrap, "--input-topic", input_topic,
             "--output-topic", output_topic, "--group", fresh_name("group"),
             "--records", str(n)],
            stdout=log, stderr=subprocess.STDOUT)
    meter, broker_meter = CpuMeter([proc.pid]), CpuMeter([broker.process.pid])
    try:
        w = watch_output(bootstrap, output_topic, n, [proc], [meter, broker_meter])
        proc.send_signal(signal.SIGTERM)  # it waits for this once its n records are out
        proc.wait(60)
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        stop_process(proc)
        delete_topics(bootstrap, [input_topic, output_topic])
    check_outputs(w, inputs.json_records[:n], same_record(extra_field=False))
    return result_from_watch(w, inputs.avg_json_bytes(n), [meter], broker_meter)


# ---- (c), (d), (s*): the real `mlflow-preproc stream` ---------------------------------------

@dataclass
class StreamRun:
    """One run of the stream, or of the image entrypoint running ``processes`` streams.

    With several processes in one group, one that joins late makes the group rebalance
    (~3 s on Tansu) in the middle of the run. So for the (s*) rows the input is written in
    a Kafka transaction left open, the processes are started, and once all have started
    and the group has settled the transaction is committed: every input record becomes
    visible to the group at once (the stream reads committed records only, as librdkafka
    does by default).
    """

    command: list[str]
    model_uri: str
    values: list[bytes]
    extra_env: dict[str, str]
    partitions: int = 1
    processes: int = 0  # > 0: write the input once this many have joined


# After the last process of a group has started: long enough for two rebalances on Tansu.
GROUP_SETTLE_S = 10.0


def run_stream(run: StreamRun, bootstrap: str, tracking_uri: str, log_dir: Path,
               broker: EmbeddedBroker, expect: Callable[[dict, dict], str | None],
               records: list[dict]) -> Result:
    """Fill a fresh topic, start the command, watch its outputs, SIGTERM it, check."""
    input_topic, output_topic = fresh_name("in"), fresh_name("out")
    dlq_topic = f"{input_topic}-dlq"
    topics = [input_topic, output_topic, dlq_topic]
    create_topics(bootstrap, topics, run.partitions)
    filler = fill_topic(bootstrap, input_topic, run.values,
                        transactional_id=fresh_name("fill") if run.processes else None)
    env = {**os.environ,
           "MLFLOW_TRACKING_URI": tracking_uri,
           "MODEL_URI": run.model_uri,
           "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "INPUT_TOPIC": input_topic,
           "OUTPUT_TOPIC": output_topic,
           "CONSUMER_GROUP_ID": fresh_name("group"),
           **librdkafka_env(GROUP_SETTINGS),
           "LOG_FORMAT": "json",
           "STATS_INTERVAL_S": "1",
           "BATCH_SIZE": str(CONSUME_BATCH),
           **run.extra_env}
    log_path = log_dir / f"{fresh_name('stream')}.log"
    with open(log_path, "wb") as log:
        # Its own session, so that stopping it stops the entrypoint's children too.
        proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    meter, broker_meter = CpuMeter([proc.pid]), CpuMeter([broker.process.pid])
    released_at, watched_at = "", ""
    try:
        if run.processes:
            _wait_for_starts(log_path, run.processes, proc)
            time.sleep(GROUP_SETTLE_S)
            released_at = _log_time_now()
            filler.commit_transaction(30)
        w = watch_output(bootstrap, output_topic, len(run.values), [proc],
                         [meter, broker_meter], run.partitions)
        watched_at = _log_time_now()
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(90)
        if code != 0:
            raise RuntimeError(f"{run.command[-1]} exited with {code}")
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        stop_process(proc)
        delete_topics(bootstrap, topics)
    counts, own_rate = parse_stream_logs(log_path)
    if counts.get("out", 0) < len(run.values) or counts.get("failed"):
        raise RuntimeError(f"the stop lines say {counts}, expected out>={len(run.values)} "
                           f"and no failure; log: {log_path}")
    check_outputs(w, records, expect)
    avg = sum(len(v) for v in run.values) / len(run.values)
    result = result_from_watch(w, avg, [meter], broker_meter)
    if own_rate and run.partitions == 1:
        result.notes.append(f"own stats lines: median {own_rate:,.0f} rec/s")
    if run.processes:
        late = _events_between(log_path, "revoke", released_at, watched_at)
        result.notes.append(f"input released once {run.processes} had joined"
                            + (f"; {late} rebalance(s) during the run" if late else
                               ", no rebalance during the run"))
    return result


def _wait_for_starts(log_path: Path, processes: int, proc: subprocess.Popen,
                     timeout: float = 180.0) -> None:
    """Until ``processes`` streams have logged their start (model loaded, consuming)."""
    deadline = time.monotonic() + timeout
    while _events_between(log_path, "start", "", "9999") < processes:
        if proc.poll() is not None:
            raise RuntimeError(f"the entrypoint exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {processes} streams started in {timeout:.0f} s")
        time.sleep(0.2)


def _log_time_now() -> str:
    """Now, as the stream's JSON log lines write ``asctime`` (comparable as text)."""
    now = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"


def _events_between(log_path: Path, event: str, since: str, until: str) -> int:
    """How many log lines of ``event`` the streams wrote from ``since`` to before ``until``
    (``asctime`` texts)."""
    count = 0
    for line in log_path.read_text(errors="replace").splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event \
                and since <= entry.get("asctime", "") < until:
            count += 1
    return count


def stream_command() -> list[str]:
    """The real console script installed beside this interpreter."""
    script = Path(sys.executable).parent / "mlflow-preproc"
    if not script.exists():
        raise SystemExit(f"{script} not found; pip install -e . into this environment first")
    return [str(script), "stream"]


def entrypoint_command() -> list[str]:
    """The serving image's entrypoint, as its Dockerfile runs it."""
    return [sys.executable, "-m", "mlflow_preproc.image.entrypoint"]


def expected_features(alert_values: list[bytes]) -> tuple[list[dict], Callable]:
    """(d)'s inputs as records to check against, and the check: the output is the features
    of its input alert, as JSON would carry them."""
    decoder = MessageDecoder("avro", skip=ZTF_CUTOUTS)
    by_value: dict[bytes, dict] = {}
    records = []
    for value in alert_values:
        if value not in by_value:
            [alert] = decoder.decode(value)
            by_value[value] = orjson.loads(jsonable_dumps(ztf_features(alert)))
        records.append(by_value[value])

    def expect(wanted: dict, output: dict) -> str | None:
        return None if output == wanted else "the features differ"
    return records, expect


# ---- (d0), (d1): decoding alone, in a child process -----------------------------------------

def decode_worker(which: str, alerts_dir: Path, n: int) -> None:
    """Decode ``n`` alert messages, note when each record is out, print the rate as JSON."""
    alerts = read_alert_files(alerts_dir)
    values = [alerts[i % len(alerts)] for i in range(n)]
    decode = _pure_fastavro_decode(alerts) if which == "fastavro" else \
        MessageDecoder("avro", skip=ZTF_CUTOUTS).decode
    gc.collect()
    gc.freeze()  # as the stream does: full collections over long-lived objects stall it
    arrivals = []
    cpu_start = time.process_time()
    for value in values:
        decode(value)
        arrivals.append(time.monotonic())
    cpu = time.process_time() - cpu_start
    counted, seconds = rate_window(arrivals)
    print(json.dumps({"records": counted, "seconds": seconds,
                      "cpu": cpu / (arrivals[-1] - arrivals[0] + 1e-9)}))


def _pure_fastavro_decode(alerts: list[bytes]) -> Callable[[bytes], dict]:
    """fastavro's decode of each alert's record, the schema parsed once: what is left of
    (d) when Kafka, container framing and preprocessing are taken away."""
    parts = {}
    for raw in alerts:
        reader = fastavro.reader(io.BytesIO(raw))
        schema = fastavro.parse_schema(reader.writer_schema)
        parts[raw] = (schema, _block_of(raw))

    def decode(value: bytes) -> dict:
        schema, block = parts[value]
        return fastavro.schemaless_reader(io.BytesIO(block), schema, None)
    return decode


def _block_of(raw: bytes) -> bytes:
    """The record bytes of a one-record, uncompressed container."""
    from mlflow_preproc.runtime.formats import OCF_HEADER_SCHEMA, _next_block

    buf = io.BytesIO(raw)
    header = fastavro.schemaless_reader(buf, OCF_HEADER_SCHEMA, None)
    if header["meta"].get("avro.codec", b"null") != b"null":
        raise SystemExit("the alerts are expected uncompressed, as ZTF sends them")
    _, block = _next_block(buf, b"null", header["sync"], limit=len(raw))
    return block


def run_decode(which: str, alerts_dir: Path, inputs: Inputs) -> Result:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "decode",
                           "--decode", which, "--alerts-dir", str(alerts_dir),
                           "--records", str(len(inputs.alert_values))],
                          capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    out = json.loads(proc.stdout.splitlines()[-1])
    avg = sum(len(v) for v in inputs.alert_values) / len(inputs.alert_values)
    return Result(out["records"], out["seconds"], out["records"] * avg, cpu=out["cpu"])


# ---- the rows ------------------------------------------------------------------------------

@dataclass
class Row:
    """One row of the table: how to run it once, and what it says."""

    key: str
    label: str
    run: Callable[[], Result] | None
    unit: str = "rec/s"
    skipped: str | None = None   # why it did not run (a peer that cannot)


@dataclass
class RowResult:
    row: Row
    median: Result | None = None
    low: float = float("nan")
    high: float = float("nan")
    error: str | None = None


def build_rows(args: argparse.Namespace, inputs: Inputs, bootstrap: str, broker: EmbeddedBroker,
               tracking_uri: str, models: dict[str, str], work_dir: Path) -> list[Row]:
    """Every row, in table order."""
    stream = stream_command()
    add_field_check = same_record(extra_field=True)
    n = len(inputs.json_values)
    alert_records, alert_check = expected_features(inputs.alert_values)

    def stream_row(values, model, extra_env, records, expect, command=stream, partitions=1,
                   processes=0):
        return lambda: run_stream(
            StreamRun(command, model, values, extra_env, partitions, processes),
            bootstrap, tracking_uri, work_dir, broker, expect, records)

    def scale_row(k: int) -> Callable[[], Result]:
        env = {"MLFLOW_PREPROC_MODE": "kafka", "KAFKA_CONSUMERS": str(k)}
        return stream_row(inputs.json_values, models["add_field"], env, inputs.json_records,
                          add_field_check, entrypoint_command(), SCALE_PARTITIONS, k)

    quix, mlserver = peers.quix_row(args, inputs, bootstrap, broker, work_dir), \
        peers.mlserver_row(args, inputs, bootstrap, broker, work_dir)
    rest_rows = rest.rows(inputs, tracking_uri, models["add_field"], work_dir)
    rows = [
        Row("a", "(a) raw confluent-kafka loop",
            lambda: run_worker("raw", bootstrap, inputs, n, work_dir, broker)),
        Row("a'", "(a') raw loop + orjson loads/dumps",
            lambda: run_worker("json", bootstrap, inputs, n, work_dir, broker)),
        Row("a''", "(a'') (a') + the stream's headers and callbacks",
            lambda: run_worker("provenance", bootstrap, inputs, n, work_dir, broker)),
        Row("b", "(b) naive 1-at-a-time loop",
            lambda: run_worker("naive", bootstrap, inputs, inputs.naive_count, work_dir,
                               broker)),
        Row("c", "(c) mlflow-preproc stream",
            stream_row(inputs.json_values, models["add_field"], {}, inputs.json_records,
                       add_field_check)),
        Row("q", quix.label, quix.run, skipped=quix.skipped),
        Row("m", mlserver.label, mlserver.run, skipped=mlserver.skipped),
        Row("d", "(d) stream, ZTF Avro alerts",
            stream_row(inputs.alert_values, models["ztf"],
                       {"INPUT_FORMAT": "avro", "SKIP_CUTOUTS": "true"}, alert_records,
                       alert_check), unit="alerts/s"),
        Row("d0", "(d0) fastavro decode only",
            lambda: run_decode("fastavro", args.alerts_dir, inputs), unit="alerts/s"),
        Row("d1", "(d1) MessageDecoder, cutouts skipped",
            lambda: run_decode("decoder", args.alerts_dir, inputs), unit="alerts/s"),
        *[Row(f"s{k}", f"(s{k}) KAFKA_CONSUMERS={k}, 4 partitions", scale_row(k))
          for k in (1, 2, 4)],
        *[Row(key, label, run) for key, label, run in rest_rows],
    ]
    return [r for r in rows if not args.only or r.key in args.only]


def run_rows(rows: list[Row], repeat: int) -> list[RowResult]:
    """Run every row ``repeat`` times, in rounds (each round runs every row once), so that
    the machine's load drifting over the run weighs on all rows alike."""
    runs: dict[str, list[Result]] = {row.key: [] for row in rows}
    errors: dict[str, str] = {row.key: row.skipped for row in rows if row.skipped}
    for round_no in range(1, repeat + 1):
        for row in rows:
            if row.key in errors:
                continue
            print(f"round {round_no}/{repeat}: {row.label} ...", flush=True)
            try:
                runs[row.key].append(row.run())
            except Exception as exc:  # noqa: BLE001 -- reported in the table, the rest goes on
                errors[row.key] = str(exc)
    results = []
    for row in rows:
        if row.key in errors:
            results.append(RowResult(row, error=errors[row.key]))
        else:
            median, low, high = median_run(runs[row.key])
            results.append(RowResult(row, median, low, high))
    return results


# ---- the table ---------------------------------------------------------------------------

def machine_info(brokers: list[str]) -> str:
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
            f"librdkafka {confluent_kafka.libversion()[0]}, brokers (loopback): "
            + ", ".join(BROKERS[b][0] for b in brokers)
            + (f"; Apache Kafka {apache_kafka.kafka_version()}" if "apache-kafka" in brokers
               else ""))


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None or x != x else format(x, spec)


def print_table(results: list[RowResult], repeat: int, load_before: str, wall_s: float,
                brokers: list[str]) -> None:
    header = (f"{'row':<40} {'records':>8} {'seconds':>7} {'rate':>9} {'spread':>15} "
              f"{'MB/s':>6} {'CPU':>4} {'/core':>7} {'broker':>6} {'p50 ms':>6} {'p99 ms':>6}")
    print()
    print(header)
    print("-" * len(header))
    for rr in results:
        if rr.median is None:
            print(f"{rr.row.label:<40} {'--':>8}  {rr.error}")
            continue
        r = rr.median
        spread = f"{rr.low:,.0f}-{rr.high:,.0f}" if repeat > 1 else ""
        p50 = percentile(r.latencies_ms, 0.50) if r.latencies_ms else None
        p99 = percentile(r.latencies_ms, 0.99) if r.latencies_ms else None
        per_core = r.rate / r.cpu if r.cpu else None
        print(f"{rr.row.label:<40} {r.records:>8,} {r.seconds:>7.2f} {r.rate:>9,.0f} "
              f"{spread:>15} {r.mb_per_s:>6.1f} {_fmt(r.cpu, '.2f'):>4} "
              f"{_fmt(per_core, ',.0f'):>7} {_fmt(r.broker_cpu, '.2f'):>6} "
              f"{_fmt(p50, '.1f'):>6} {_fmt(p99, '.1f'):>6}")
    print("-" * len(header))
    print(f"rate = outputs after the first / (last output's arrival - first output's arrival), "
          f"every row; median of {repeat} run(s) (run in rounds), spread = slowest-fastest run. "
          "Units: rec/s; "
          "alerts/s for (d*); REST rows count records (100 per request). CPU: cores used "
          "meanwhile by the processes under test (/core = rate per core of them), broker: by "
          "the broker.")
    for broker in brokers:
        suffix = BROKERS[broker][1]
        if len(brokers) > 1:
            print(f"on {BROKERS[broker][0]}:")
        print_goals({rr.row.key.removesuffix(suffix): rr.median for rr in results
                     if rr.median is not None and rr.row.key.endswith(suffix)
                     and (suffix or "@" not in rr.row.key)})
    for rr in results:
        if rr.median is not None and rr.median.notes:
            print(f"  {rr.row.label.split(' ')[0]} " + "; ".join(rr.median.notes))
    print(machine_info(brokers))
    print(f"load average before the run: {load_before}; total wall time: {wall_s:.0f} s")


def print_goals(by_key: dict[str, Result]) -> None:
    """The issue's goals, each with the numbers it is judged on."""
    def goal(text: str, value: float, target: float, fmt: str = ".2f") -> None:
        print(f"{text} = {value:{fmt}}  (goal >= {target:{fmt}}: "
              f"{'met' if value >= target else 'NOT met'})")

    def at_most(text: str, value: float, target: float) -> None:
        print(f"{text} = {value:.2f}  (goal <= {target:.2f}: "
              f"{'met' if value <= target else 'NOT met'})")

    def cpu_per_record(r: Result) -> float:
        return r.cpu / r.rate

    c, a_json, a_prov = by_key.get("c"), by_key.get("a'"), by_key.get("a''")
    if c and a_json:
        goal("c/a' records/s", c.rate / a_json.rate, 0.85)
        if c.cpu and a_json.cpu:
            at_most("c/a' CPU per record", cpu_per_record(c) / cpu_per_record(a_json), 1.25)
    if c and a_prov and c.cpu and a_prov.cpu:
        print(f"c/a'' CPU per record = {cpu_per_record(c) / cpu_per_record(a_prov):.2f} "
              "(the stream's own Python work over a loop with its headers and callbacks)")
    if a_prov and a_json and a_prov.cpu and a_json.cpu:
        print(f"a''/a' CPU per record = "
              f"{cpu_per_record(a_prov) / cpu_per_record(a_json):.2f} "
              "(what the provenance headers and per-message callbacks cost in the client)")
    best_peer = max((by_key[k] for k in ("q", "m") if k in by_key), key=lambda r: r.rate,
                    default=None)
    if c and best_peer:
        goal("c/best peer records/s", c.rate / best_peer.rate, 2.0, ".1f")
    if a_json and best_peer:
        print(f"a'/best peer records/s = {a_json.rate / best_peer.rate:.1f} (the ceiling of "
              "c/best peer: the JSON loop with nothing else)")
    d = by_key.get("d")
    if d and d.cpu:
        goal(f"d per core (d / its {d.cpu:.2f} CPU)", d.rate / d.cpu, 3000, ",.0f")
    s1 = by_key.get("s1")
    if s1:
        ups = [f"s{k}/s1 = {by_key[f's{k}'].rate / s1.rate:.2f}" for k in (2, 4)
               if f"s{k}" in by_key]
        if ups:
            print("speed-up: " + ", ".join(ups) + f" (on {os.cpu_count()} cores shared with "
                                                  "the broker)")
    r_pre, r_py = by_key.get("rp"), by_key.get("rf")
    if r_pre and r_py:
        goal("REST preprocessing/pyfunc records/s", r_pre.rate / r_py.rate, 0.9)
        print("REST p50/p99 preprocessing vs pyfunc: "
              f"{percentile(r_pre.latencies_ms, .5):.1f}/{percentile(r_pre.latencies_ms, .99):.1f}"
              f" vs {percentile(r_py.latencies_ms, .5):.1f}/"
              f"{percentile(r_py.latencies_ms, .99):.1f} ms")


# ---- main --------------------------------------------------------------------------------

# name -> (what the table calls it, the suffix of its rows' keys, of their labels)
BROKERS = {"embedded": ("Tansu (embedded)", "", ""),
           "apache-kafka": ("Apache Kafka (KRaft, one node)", "@ak", " [AK]")}
# Rows without a broker (decoding, REST): run once, with the first broker's rows.
NO_BROKER_ROWS = {"d0", "d1", "rp", "rf"}


def start_broker(name: str):
    """The broker ``name`` of ``--broker``, started; a context manager that stops it."""
    if name == "embedded":
        return EmbeddedBroker()
    if name == "apache-kafka":
        return apache_kafka.ApacheKafka(jvm_flags=apache_kafka.KAFKA_START_JVM_FLAGS)
    raise SystemExit(f"--broker {name}: not one of {', '.join(BROKERS)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # A few seconds per run at ~100k records/s: shorter runs are dominated by noise here.
    p.add_argument("--records", type=int, default=200_000,
                   help="JSON records for (a), (a'), (c), (q), (s*) (default 200000)")
    p.add_argument("--naive-records", type=int, default=2_000,
                   help="JSON records for the slow one-at-a-time loop (b) (default 2000)")
    p.add_argument("--mlserver-records", type=int, default=3_000,
                   help="JSON records for MLServer (m), which is slow (default 3000)")
    p.add_argument("--alerts", type=int, default=5_000,
                   help="Avro alert messages for (d), (d0), (d1) (default 5000)")
    p.add_argument("--rest-requests", type=int, default=300,
                   help="100-record requests per REST run (default 300)")
    p.add_argument("--quick", action="store_true",
                   help="a small run: 20000 / 300 / 2000 records, 1500 alerts, 50 requests, "
                        "once each")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each row; the table shows the median run (default 3)")
    p.add_argument("--only", type=lambda s: set(s.split(",")), default=None,
                   help="comma-separated row keys: a,a',b,c,q,m,d,d0,d1,s1,s2,s4,rp,rf")
    p.add_argument("--broker", type=lambda s: s.split(","), default=["embedded"],
                   help="the broker(s) of the Kafka rows, comma-separated: embedded (Tansu), "
                        "apache-kafka (fetched by scripts/kafka-broker.sh; needs Java 17 "
                        "and Maven) (default embedded)")
    p.add_argument("--setup", action="store_true",
                   help="create the peers' virtualenvs under benchmarks/.venvs and exit")
    p.add_argument("--alerts-dir", type=Path, default=DEFAULT_ALERTS_DIR,
                   help=f"folder of ZTF *.avro alerts (default {DEFAULT_ALERTS_DIR})")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temporary folder with the processes' logs")
    # Internal: run a loop or a decode in this process (the benchmark starts itself this way).
    p.add_argument("--worker", choices=[*sorted(WORKERS), "decode"], help=argparse.SUPPRESS)
    p.add_argument("--decode", choices=["fastavro", "decoder"], help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--input-topic", help=argparse.SUPPRESS)
    p.add_argument("--output-topic", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.naive_records, args.mlserver_records = 20_000, 300, 2_000
        args.alerts, args.rest_requests, args.repeat = 1_500, 50, 1
    return args


def make_inputs(args: argparse.Namespace) -> Inputs:
    alerts = read_alert_files(args.alerts_dir)
    json_values = make_json_records(args.records, alerts[0])
    inputs = Inputs(json_values, [orjson.loads(v) for v in json_values],
                    min(args.naive_records, args.records),
                    min(args.mlserver_records, args.records),
                    [alerts[i % len(alerts)] for i in range(args.alerts)], args.rest_requests)
    avg_alert = sum(len(v) for v in inputs.alert_values) / len(inputs.alert_values)
    print(f"JSON records: {len(json_values):,} x {inputs.avg_json_bytes():,.0f} B "
          f"(naive {inputs.naive_count:,}, MLServer {inputs.peer_count:,}); ZTF alerts: "
          f"{len(inputs.alert_values):,} x {avg_alert / 1e3:,.1f} kB ({len(alerts)} distinct, "
          f"cutouts included); REST: {args.rest_requests} x 100 records", flush=True)
    return inputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "decode":
        decode_worker(args.decode, args.alerts_dir, args.records)
        return 0
    if args.worker:
        WORKERS[args.worker](args.bootstrap, args.input_topic, args.output_topic, args.group,
                             args.records)
        return 0
    if args.setup:
        return peers.setup()

    started, load_before = time.monotonic(), ", ".join(f"{x:.1f}" for x in os.getloadavg())
    inputs = make_inputs(args)
    work_dir = Path(tempfile.mkdtemp(prefix="stream-throughput-"))
    with contextlib.ExitStack() as running:
        tracking_uri, models = log_models(work_dir)
        rows = []
        for name in args.broker:
            broker = running.enter_context(start_broker(name))
            rows += [Row(r.key + BROKERS[name][1], r.label + BROKERS[name][2], r.run, r.unit,
                         r.skipped)
                     for r in build_rows(args, inputs, broker.bootstrap_servers, broker,
                                         tracking_uri, models, work_dir)
                     if name == args.broker[0] or r.key not in NO_BROKER_ROWS]
        results = run_rows(rows, args.repeat)
    print_table(results, args.repeat, load_before, time.monotonic() - started, args.broker)
    return finish(results, work_dir, args.keep_logs)


def finish(results: list, work_dir: Path, keep_logs: bool) -> int:
    """The exit code of a benchmark run: 1 if a row failed; its logs kept if so (or asked)."""
    failed = [rr for rr in results if rr.error and not rr.row.skipped]
    if keep_logs or failed:
        print(f"logs: {work_dir}")
    else:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

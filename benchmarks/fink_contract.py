"""The 5 ms budget of the Fink contract: what the framework adds to a feature function.

The user function is ``examples/fink_contract/preprocessing.py`` (``FEATURE_NAMES`` and
``pre_processing(alert) -> list[float]``), run on the real ZTF alerts of
``../shared/data/ztf/`` (cutouts dropped, as ``SKIP_CUTOUTS=true`` does) replicated to
20,000 with jittered magnitudes. One table, one run:

(1) direct        ``pre_processing(alert)`` in a Python loop: the user's own cost.
(2) Preprocessor  the same alerts through :class:`Preprocessor` (the record contract, names
                  applied), 500 at a time, as every mode calls it.
(3) run           ``mlflow-preproc run`` on an Avro container file of the alerts, to JSON Lines
                  (Avro decode + the contract + JSON encode + file I/O); process start-up
                  (the same command on one alert) is subtracted.
(d0) fastavro     ``fastavro.reader`` decoding each of the stream's messages whole, in this
                  process, CPU time: the full-decode ceiling the stream rows are held to.
(4) stream        ``mlflow-preproc stream``, one alert per Kafka message (an Avro container,
                  as ZTF/Fink publish them), embedded broker on loopback: without and with
                  INPUT_FIELDS, decoded by fastavro (AVRO_COLUMNS=false) or polars-avro (the
                  columnar extra), and ``columnar.py``, the same features over columns
                  (batch_format="arrow").
(5) stream --prediction-model-uri
                  the same with a scikit-learn classifier trained on the named features,
                  in the stream's process: predictions/s.

Rates of (4) and (5) are taken between the arrival of the first and the last output, read by
a watcher by assignment (process start-up, model loading and the group join are left out);
over the same span, the stream process's CPU time (all its threads, from /proc) per alert,
and alerts/s per core from it: wall time shares the 2 cores with the broker and the watcher.
"overhead" is a row's time per alert minus the direct call's: what the framework costs on top
of the user's function, per alert. Only loopback is used; the broker is stopped by PID.

    python benchmarks/fink_contract.py            # 20,000 alerts
    python benchmarks/fink_contract.py --alerts 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fastavro

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALERTS_DIR = ROOT.parent / "shared" / "data" / "ztf"
EXAMPLE = ROOT / "examples" / "fink_contract" / "preprocessing.py"
COLUMNAR = ROOT / "examples" / "fink_contract" / "columnar.py"  # the same, batch_format="arrow"
BIN = Path(sys.executable).parent
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
FAST_GROUP = {"LIBRDKAFKA_SESSION_TIMEOUT_MS": "6000", "LIBRDKAFKA_HEARTBEAT_INTERVAL_MS": "1000"}


def load_example():
    spec = importlib.util.spec_from_file_location("fink_contract_preprocessing", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_alerts(n: int, seed: int = 7) -> tuple[dict, list[dict]]:
    """The writer schema and ``n`` alerts without cutouts, replicated from the real ones."""
    originals, schema = [], None
    for path in sorted(ALERTS_DIR.glob("*.avro")):
        with open(path, "rb") as f:
            reader = fastavro.reader(f)
            schema = schema or reader.writer_schema
            originals.append(next(reader))
    rng = random.Random(seed)
    alerts = []
    for i in range(n):
        alert = {k: v for k, v in originals[i % len(originals)].items() if k not in CUTOUTS}
        alert = {**alert, **dict.fromkeys(CUTOUTS)}
        alert["candidate"] = {**alert["candidate"],
                              "magpsf": alert["candidate"]["magpsf"] + rng.uniform(-2, 2)}
        alert["candid"] = alert["candid"] + i
        alerts.append(alert)
    return schema, alerts


def without_cutouts(alert: dict) -> dict:
    return {k: v for k, v in alert.items() if k not in CUTOUTS}


def per_alert_us(seconds: float, n: int) -> float:
    return seconds / n * 1e6


# ---- (1) and (2): in process ----------------------------------------------------------------

def direct(fn, alerts: list[dict]) -> float:
    started = time.perf_counter()
    for alert in alerts:
        fn(alert)
    return time.perf_counter() - started


def through_preprocessor(module, alerts: list[dict]) -> float:
    from mlflow_preproc.runtime.records import Preprocessor

    pre = Preprocessor(module.pre_processing, None, module.FEATURE_NAMES)
    started = time.perf_counter()
    for i in range(0, len(alerts), 500):
        pre.process_each(alerts[i:i + 500])
    return time.perf_counter() - started


def fastavro_ceiling(values: list[bytes]) -> float:
    """CPU seconds of ``fastavro.reader`` decoding every message whole: the stream's
    messages, with nothing else around them (row d0 of avro_decoders.py, on these)."""
    started = time.process_time()
    for value in values:
        for _ in fastavro.reader(io.BytesIO(value)):
            pass
    return time.process_time() - started


# ---- models ---------------------------------------------------------------------------------

def log_models(workdir: Path, module, alerts: list[dict]) -> tuple[str, str, str, str]:
    import mlflow
    import pandas as pd
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    train = pd.DataFrame([module.pre_processing(a) for a in alerts[:500]],
                         columns=module.FEATURE_NAMES)
    labels = (train["magpsf"] < train["magpsf"].median()).astype(int)
    classifier = make_pipeline(SimpleImputer(), LogisticRegression()).fit(train, labels)
    # The same function without its INPUT_FIELDS: every field of an alert decoded.
    undeclared = workdir / "undeclared" / "preprocessing.py"
    undeclared.parent.mkdir()
    undeclared.write_text(re.sub(r"\nINPUT_FIELDS = \[.*?\]\n", "\n", EXAMPLE.read_text(),
                                 flags=re.S))
    with mlflow.start_run():
        features = mlflow.preproc.log_model(str(EXAMPLE), name="features").model_uri
        columnar = mlflow.preproc.log_model(str(COLUMNAR), name="columnar",
                                            batch_format="arrow",
                                            input_example=without_cutouts(alerts[0])).model_uri
        every_field = mlflow.preproc.log_model(str(undeclared), name="all").model_uri
        model = mlflow.sklearn.log_model(classifier, name="classifier",
                                         input_example=train.head(3),
                                         skops_trusted_types=["numpy.dtype"]).model_uri
    return features, every_field, model, columnar


# ---- (3) run ----------------------------------------------------------------------------------

def timed_run(env: dict, model_uri: str, path: Path, out: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([str(BIN / "mlflow-preproc"), "run", "-m", model_uri, str(path),
                           "--skip-cutouts", "-o", str(out)], env=env, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode()[-2000:])
    return time.perf_counter() - started


def run_file(env: dict, model_uri: str, schema: dict, alerts: list[dict], workdir: Path
             ) -> float:
    archive, one = workdir / "alerts.avro", workdir / "one.avro"
    for path, batch in ((archive, alerts), (one, alerts[:1])):
        with open(path, "wb") as f:
            fastavro.writer(f, schema, batch, codec="deflate")
    start_up = min(timed_run(env, model_uri, one, workdir / "one.jsonl") for _ in range(3))
    return timed_run(env, model_uri, archive, workdir / "out.jsonl") - start_up


# ---- (4) and (5) stream ---------------------------------------------------------------------

def containers(schema: dict, alerts: list[dict]) -> list[bytes]:
    values = []
    parsed = fastavro.parse_schema(schema)
    for alert in alerts:
        buf = io.BytesIO()
        fastavro.writer(buf, parsed, [alert])
        values.append(buf.getvalue())
    return values


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream_rate(env: dict, bootstrap: str, model_uri: str, values: list[bytes],
                prediction_model: str | None, tag: str, **settings: str
                ) -> tuple[float, float]:
    """Outputs/s between the first and the last output, and the stream process's CPU
    seconds per output over the same span."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    topic, out = f"fink-{tag}", f"fink-{tag}-out"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until its futures resolve
    for future in admin.create_topics([NewTopic(topic, 1)]).values():
        future.result(15)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i, value in enumerate(values):
        producer.produce(topic, value)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(60)
    command = [str(BIN / "mlflow-preproc"), "stream", "-m", model_uri]
    if prediction_model:
        command += ["--prediction-model-uri", prediction_model, "--keep-fields", "objectId,candid"]
    proc = subprocess.Popen(command, env={
        **env, **FAST_GROUP, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "INPUT_TOPIC": topic,
        "OUTPUT_TOPIC": out, "INPUT_FORMAT": "avro", "SKIP_CUTOUTS": "true",
        "CONSUMER_GROUP_ID": f"bench-{tag}", "LOG_LEVEL": "WARNING", **settings},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"watch-{tag}",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        while out not in consumer.list_topics(timeout=5).topics:
            time.sleep(0.1)
        consumer.assign([TopicPartition(out, 0, OFFSET_BEGINNING)])
        arrivals: list[float] = []
        cpu: list[float] = []
        deadline = time.monotonic() + 600
        while len(arrivals) < len(values) and time.monotonic() < deadline:
            got = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
            if got:
                cpu.append(_cpu_seconds(proc.pid))
            arrivals += [time.monotonic()] * len(got)
        consumer.close()
        if len(arrivals) < len(values):
            raise RuntimeError(f"{len(arrivals)}/{len(values)} outputs")
        return ((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
                (cpu[-1] - cpu[0]) / (len(arrivals) - 1))
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)


# ---- the table --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=20_000)
    args = parser.parse_args(argv)
    from mlflow_preproc.streaming.embedded_broker import EmbeddedBroker

    module = load_example()
    schema, alerts = make_alerts(args.alerts)
    bare = [without_cutouts(a) for a in alerts]
    n = len(alerts)
    rows: list[tuple[str, float, str]] = []  # (what, seconds per alert, unit note)
    rows.append(("(1) pre_processing called directly", direct(module.pre_processing, bare) / n,
                 "alerts/s"))
    rows.append(("(2) through Preprocessor (names applied)",
                 through_preprocessor(module, bare) / n, "alerts/s"))
    with tempfile.TemporaryDirectory(prefix="fink-contract-") as tmp:
        workdir = Path(tmp)
        features, every_field, classifier, columnar = log_models(workdir, module, bare)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
        os.chdir(workdir)
        rows.append(("(3) mlflow-preproc run (Avro file -> JSON Lines), no INPUT_FIELDS",
                     run_file(env, every_field, schema, alerts, workdir) / n, "alerts/s"))
        rows.append(("(3) mlflow-preproc run, INPUT_FIELDS declared",
                     run_file(env, features, schema, alerts, workdir) / n, "alerts/s"))
        values = containers(schema, alerts)
        d0 = fastavro_ceiling(values) / n
        rows.append(("(d0) fastavro.reader of each message, whole, in process (no Kafka)", d0,
                     "alerts/s", d0))
        with EmbeddedBroker() as broker:
            def stream(what: str, model: str, tag: str, prediction: str | None = None,
                       unit: str = "alerts/s", **settings: str) -> None:
                rate, cpu = stream_rate(env, broker.bootstrap_servers, model, values,
                                        prediction, tag, **settings)
                rows.append((what, 1 / rate, unit, cpu))

            stream("(4) mlflow-preproc stream, no INPUT_FIELDS, fastavro (AVRO_COLUMNS=false)",
                   every_field, "all-fastavro", AVRO_COLUMNS="false")
            stream("(4) stream, no INPUT_FIELDS, polars-avro (the columnar extra)", every_field,
                   "all")
            stream("(4) stream, INPUT_FIELDS, fastavro (AVRO_COLUMNS=false)", features,
                   "fastavro", AVRO_COLUMNS="false")
            stream("(4) stream, INPUT_FIELDS, polars-avro (the columnar extra)", features,
                   "stream")
            stream("(4) stream, batch_format='arrow' (columnar.py), polars-avro", columnar,
                   "arrow")
            stream("(5) mlflow-preproc stream --prediction-model-uri (sklearn)", features,
                   "model", classifier, "predictions/s")
    base = rows[0][1]
    print(f"\nFink contract on {n:,} ZTF alerts ({platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()})\n")
    print("| path | per alert (µs) | rate | overhead per alert (µs) | budget (5 ms) used | "
          "stream CPU per alert (µs) | alerts/s per core |")
    print("|---|---|---|---|---|---|---|")
    for what, seconds, unit, *cpu in rows:
        per_core = f"{cpu[0] * 1e6:,.0f} | {1 / cpu[0]:,.0f}" if cpu and cpu[0] else " | "
        print(f"| {what} | {seconds * 1e6:,.1f} | {1 / seconds:,.0f} {unit} | "
              f"{(seconds - base) * 1e6:,.1f} | {seconds / 5e-3:.1%} | {per_core} |")
    print("\noverhead: the row's time per alert minus the direct call's. (3) excludes process "
          "start-up (the same command on one alert); (4) and (5) are rates between the first "
          "and the last output's arrival.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

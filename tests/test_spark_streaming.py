"""Spark Structured Streaming on Apache Kafka: a query gives the stream's outputs and dead
letters, and a restart from its checkpoint loses nothing (Parquet: each record once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from conftest import BIN, consume, headers_of, produce, require_spark, stream_env, unique
from verdict_cells import verdict
from ztf_archive import write_archive

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.kafka]

ROOT = Path(__file__).parent.parent
SOURCE = "x-preproc-source"
GARBAGE = [b"not avro at all", b"Obj\x01\x00garbage after the magic"]


def alert_features(alert):
    c = alert["candidate"]
    if alert["candid"] % 5 == 0:
        raise ValueError(f"candid {alert['candid']} is a multiple of 5")
    return {"objectId": alert["objectId"], "candid": alert["candid"], "magpsf": c["magpsf"],
            "n_prv": len(alert.get("prv_candidates") or [])}


@pytest.fixture(scope="module")
def spark_env() -> dict[str, str]:
    """Spark with its Kafka source (fetched with Maven by scripts/spark-kafka.sh), no web UI
    and the JIT at C1, as tests/conftest.py's SPARK_ENV."""
    require_spark()
    jars = subprocess.run(["bash", str(ROOT / "scripts" / "spark-kafka.sh"), sys.executable],
                          capture_output=True, text=True, timeout=600)
    assert jars.returncode == 0, jars.stderr
    return {"PYSPARK_SUBMIT_ARGS": f"--jars {jars.stdout.strip()} --conf spark.ui.enabled=false "
                                   "--driver-java-options -XX:TieredStopAtLevel=1 pyspark-shell"}


@pytest.fixture(scope="module")
def alerts(tmp_path_factory) -> list[bytes]:
    """40 ZTF alerts, one Avro container each (as alert brokers receive them), small stamps."""
    folder = tmp_path_factory.mktemp("alerts")
    return [p.read_bytes() for p in write_archive(folder, 40, 1, stamp_bytes=64)]


@pytest.fixture
def model(tracking_uri) -> str:
    with mlflow.start_run():
        return mlflow.preproc.log_model(alert_features, name="features",
                                        pip_requirements=[]).model_uri


def failing(alerts: list[bytes]) -> int:
    """How many of ``alerts`` alert_features refuses."""
    import io

    import fastavro

    return sum(1 for value in alerts for alert in fastavro.reader(io.BytesIO(value))
               if alert["candid"] % 5 == 0)


def query(spark_env: dict, env: dict, model: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "mlflow-preproc"), "run", "--engine", "spark", "--master", "local[2]",
         "-m", model, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, **spark_env, **env}, start_new_session=True)


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and its JVM, as a node that dies."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def by_source(messages) -> dict[bytes, list[tuple[bytes, dict]]]:
    found: dict[bytes, list[tuple[bytes, dict]]] = {}
    for m in messages:
        found.setdefault(headers_of(m)[SOURCE], []).append((m.value(), headers_of(m)))
    return found


@verdict("decode", "bad record")
@verdict("pre_processing", "bad record")
def test_a_query_gives_the_streams_outputs_and_dead_letters_and_a_killed_driver_loses_none(
        broker, model, alerts, spark_env, streams, tmp_path):
    raw = unique("raw")
    broker.create_topics(raw, partitions=2)
    values = alerts[:20] + GARBAGE + alerts[20:]
    refused = failing(alerts)
    settings = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "INPUT_TOPIC": raw,
                "INPUT_FORMAT": "avro", "SKIP_CUTOUTS": "true"}
    produce(broker.bootstrap_servers, raw, values[:22], keys=[b"k%d" % i for i in range(22)])

    # The query, micro-batches every second, killed (driver and JVM) once it wrote outputs;
    # meanwhile the rest arrives; then it runs again from its checkpoint, to the end.
    k_out, k_dlq = unique("spark-out"), unique("spark-dlq")
    broker.create_topics(k_out, k_dlq)
    env = {**settings, "DLQ_TOPIC": k_dlq}
    args = (f"kafka:{raw}", "-o", f"kafka:{k_out}", "--checkpoint-location",
            str(tmp_path / "checkpoint"))
    first = query(spark_env, env, model, *args, "--trigger", "1 second", cwd=tmp_path)
    assert consume(broker.bootstrap_servers, k_out, 1, timeout=240), \
        first.stdout.read1().decode() if first.poll() is not None else "no output"
    kill(first)
    produce(broker.bootstrap_servers, raw, values[22:],
            keys=[b"k%d" % i for i in range(22, len(values))])
    finished(query(spark_env, env, model, *args, cwd=tmp_path))

    # The stream on the same topic.
    s_out, s_dlq = unique("stream-out"), unique("stream-dlq")
    stream = streams(stream_env(broker.bootstrap_servers, model, raw, **settings,
                                OUTPUT_TOPIC=s_out, DLQ_TOPIC=s_dlq))
    expected_out, expected_dlq = 40 - refused, refused + len(GARBAGE)
    from_stream = by_source(consume(broker.bootstrap_servers, s_out, expected_out))
    stream_dead = by_source(consume(broker.bootstrap_servers, s_dlq, expected_dlq))
    assert stream.stop() == 0
    assert (len(from_stream), len(stream_dead)) == (expected_out, expected_dlq)

    def every_source(messages: list) -> bool:
        return len(by_source(messages)) >= len(from_stream)

    from_spark = by_source(consume(broker.bootstrap_servers, k_out, 0, until=every_source))
    spark_dead = by_source(consume(broker.bootstrap_servers, k_dlq, 0,
                                   until=lambda m: len(by_source(m)) >= expected_dlq))
    # At least once: nothing lost, the same bytes and headers; duplicates (the killed
    # driver's last micro-batch written again) are counted, never different.
    for spark, stream_ in ((from_spark, from_stream), (spark_dead, stream_dead)):
        assert set(spark) == set(stream_)
        for source, copies in spark.items():
            assert {(v, tuple(sorted(h.items()))) for v, h in copies} == \
                {(v, tuple(sorted(h.items()))) for v, h in stream_[source]}
    duplicates = sum(len(c) - 1 for c in from_spark.values())
    print(f"Kafka sink after a killed driver: {duplicates} duplicate output(s) of "
          f"{len(from_spark)}")
    stages = Counter(h["x-preproc-stage"] for copies in spark_dead.values() for _, h in copies[:1])
    assert stages == {b"decode": len(GARBAGE), b"preprocess": refused}


def rubin_features(alert):
    source = alert["diaSource"]
    if alert["diaSourceId"] % 7 == 0:
        raise ValueError(f"diaSourceId {alert['diaSourceId']} is a multiple of 7")
    return {"id": alert["diaSourceId"], "flux": source["psfFlux"], "band": source["band"],
            "n_prv": len(alert["prvDiaSources"] or [])}


@verdict("schema registry in", "bad record")
def test_rubin_alerts_through_a_query_to_parquet_are_the_streams_each_once_after_a_kill(
        broker, tracking_uri, spark_env, streams, schema_registry, tmp_path):
    # Rubin alerts as Rubin sends them (Confluent framing, a schema id), a model declaring
    # the fields it reads; a message of an id the registry does not know and one cut short.
    import pyarrow.dataset as ds

    from rubin_alerts import RUBIN_FIELDS, SCHEMA_ID, alerts as rubin_alerts, framed

    schema, records = rubin_alerts(40, cutout_bytes=64)
    schema_registry.register(SCHEMA_ID, schema)
    with mlflow.start_run():
        example = next(r for r in records if r["diaSourceId"] % 7)
        model = mlflow.preproc.log_model(rubin_features, name="rubin", input_example=example,
                                         input_fields=RUBIN_FIELDS, pip_requirements=[]).model_uri
    values = framed(schema, records)
    values[5] = framed(schema, records[5:6], schema_id=999)[0]  # an id the registry lacks
    values[9] = values[9][:40]  # cut short
    raw = unique("raw")
    broker.create_topics(raw, partitions=2)
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "INPUT_FORMAT": "confluent-avro",
           "SCHEMA_REGISTRY_URL": schema_registry.url}
    out, rejects = tmp_path / "features", tmp_path / "rejects"
    args = (f"kafka:{raw}", "-o", str(out), "--rejects", str(rejects),
            "--checkpoint-location", str(tmp_path / "checkpoint"))

    # Alerts arrive all along; the driver is killed while micro-batches run, then the query
    # runs again from its checkpoint to the end.
    def feed() -> None:
        for value in values:
            produce(broker.bootstrap_servers, raw, [value])
            time.sleep(0.1)

    feeding = threading.Thread(target=feed)
    first = query(spark_env, env, model, *args, "--trigger", "1 second", cwd=tmp_path)
    feeding.start()
    deadline = time.monotonic() + 240
    while not list(out.glob("batch=*/*.parquet")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    kill(first)
    feeding.join()
    finished(query(spark_env, env, model, *args, cwd=tmp_path))

    def rows(folder: Path) -> dict[bytes, list[tuple[bytes, dict]]]:
        table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
        found: dict[bytes, list[tuple[bytes, dict]]] = {}
        for value, headers in zip(table.column("value").to_pylist(),
                                  table.column("headers").to_pylist()):
            headers = {h["key"]: h["value"] for h in headers}
            found.setdefault(headers[SOURCE], []).append((value, headers))
        return found

    written, dead = rows(out), rows(rejects)
    assert all(len(copies) == 1 for copies in [*written.values(), *dead.values()]), \
        "a record written twice"

    # The stream on the same topic: the same outputs and dead letters, bytes and headers.
    s_out, s_dlq = unique("stream-out"), unique("stream-dlq")
    stream = streams(stream_env(broker.bootstrap_servers, model, raw, **env,
                                OUTPUT_TOPIC=s_out, DLQ_TOPIC=s_dlq))
    from_stream = by_source(consume(broker.bootstrap_servers, s_out, len(written)))
    stream_dead = by_source(consume(broker.bootstrap_servers, s_dlq, len(dead)))
    assert stream.stop() == 0
    assert len(written) + len(dead) == len(values), "a record lost"
    for spark, stream_ in ((written, from_stream), (dead, stream_dead)):
        assert {k: [(v, h) for v, h in c] for k, c in spark.items()} == stream_
    refused = [i for i, r in enumerate(records) if r["diaSourceId"] % 7 == 0 and i not in (5, 9)]
    stages = Counter(h["x-preproc-stage"] for (_, h), in dead.values())
    assert stages == {b"decode": 2, b"preprocess": len(refused)}

"""Preprocessing in a Spark Structured Streaming query on Kafka, as the stream does it.

    spark.readStream.format("kafka") -> transform_kafka (the stream's data path in the tasks)
        -> outputs and dead letters -> Kafka (OUTPUT_TOPIC, DLQ_TOPIC) or Parquet folders

:func:`transform_kafka` is the library form (``mlflow_preproc.spark.transform`` calls it for a
DataFrame of Kafka rows); :func:`run` is ``mlflow-preproc run --engine spark kafka:TOPIC``.
Spark needs its Kafka source on the classpath: ``spark-sql-kafka-0-10`` of pyspark's version
(``scripts/spark-kafka.sh`` fetches it with Maven; docs/spark.md).

Delivery: Spark's Kafka sink is at least once (a micro-batch that fails after some rows were
written is written again); the Parquet sink writes each micro-batch to a folder of its own,
replaced when the batch runs again after a failure, so it holds every record exactly once.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow_preproc import config as settings
from mlflow_preproc.config import Config, ConfigError
from mlflow_preproc.runtime.model_identity import resolve_model
from mlflow_preproc.spark import session
from mlflow_preproc.spark.kafka_rows import DEAD_LETTER, KAFKA_COLUMNS, KIND, OUTPUT, \
    KafkaRowsJob, rows_schema
from mlflow_preproc.spark.model_files import ship

KAFKA_SCHEME = "kafka:"
AVAILABLE_NOW = "available-now"
_FETCH_KAFKA_SOURCE = ("Spark's Kafka source is not on its classpath: start Spark with "
                       "--jars \"$(bash scripts/spark-kafka.sh)\" (PYSPARK_SUBMIT_ARGS for "
                       "pyspark, spark-submit otherwise) or --packages "
                       "org.apache.spark:spark-sql-kafka-0-10_2.13:{version}")


@dataclass
class KafkaTransformed:
    """What :func:`transform_kafka` makes of Kafka rows, lazily (a streaming DataFrame
    stays one).

    ``rows``: every output and dead letter, with the columns Spark's Kafka sink takes
    (``topic``, ``key``, ``value``, ``headers``): write it to Kafka as it is. ``output`` and
    ``dead_letters`` are its two halves, for sinks that keep them apart.
    """

    tagged: Any  # rows with their KIND
    rows: Any
    output: Any
    dead_letters: Any

    @classmethod
    def of(cls, tagged: Any) -> KafkaTransformed:
        from pyspark.sql import functions as F

        return cls(tagged, tagged.drop(KIND),
                   tagged.where(F.col(KIND) == OUTPUT).drop(KIND),
                   tagged.where(F.col(KIND) == DEAD_LETTER).drop(KIND))


def stream_config(overrides: Mapping[str, str] | None = None) -> Config:
    """The stream's settings from the environment, ``overrides`` (setting names, as
    ``stream`` takes them) winning."""
    environ = {**os.environ, **(overrides or {})}
    config = settings.load("stream", environ=environ)
    config.require("INPUT_TOPIC")  # it names the default DLQ_TOPIC, as in stream
    return config


def transform_kafka(df: Any, model_uri: str, stream_settings: Mapping[str, str] | None = None,
                    workdir: str | None = None) -> KafkaTransformed:
    """Run a preprocessing model over a (streaming) DataFrame of Kafka rows.

    Args:
        df: Rows of Spark's Kafka source (``key``, ``value``, ``topic``, ``partition``,
            ``offset``; ``headers`` with ``includeHeaders=true``).
        model_uri: Any MLflow model URI of a preprocessing model.
        stream_settings: The settings of ``mlflow-preproc stream`` by name (``INPUT_TOPIC``,
            ``INPUT_FORMAT``, ``SCHEMA_REGISTRY_URL``, ``DROP_FIELDS``, ``SKIP_CUTOUTS``,
            ``OUTPUT_TOPIC``, ``DLQ_TOPIC``, ``OUTPUT_FORMAT``...); the environment's
            otherwise. ``INPUT_TOPIC`` is required: it names the default ``DLQ_TOPIC``.
        workdir: Where the model is downloaded (a new temporary folder by default); it must
            outlive the query.

    Returns:
        A :class:`KafkaTransformed`: the outputs and dead letters of ``stream``, record for
        record, headers included.
    """
    from mlflow_preproc.streaming.stream import default_output_topic

    missing = [c for c in KAFKA_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"transform_kafka takes the rows of Spark's Kafka source; the "
                          f"DataFrame has no {', '.join(missing)} (columns: {df.columns})")
    config = stream_config(stream_settings)
    identity = resolve_model(model_uri)
    _, shipped = ship(df.sparkSession, identity.download_uri, workdir, config["PARITY_CHECK"])
    columns = [c for c in (*KAFKA_COLUMNS, "headers") if c in df.columns]
    job = KafkaRowsJob(shipped, config, identity, default_output_topic(config, identity))
    return KafkaTransformed.of(df.select(*columns).mapInArrow(job, rows_schema()))


def read_kafka(spark: Any, config: Config) -> Any:
    """The streaming DataFrame of ``INPUT_TOPIC``, from the earliest offset or the
    checkpoint's, with headers."""
    reader = (spark.readStream.format("kafka")
              .option("kafka.bootstrap.servers", config["KAFKA_BOOTSTRAP_SERVERS"])
              .option("subscribe", config["INPUT_TOPIC"])
              .option("startingOffsets", config["AUTO_OFFSET_RESET"])
              .option("includeHeaders", "true"))
    for key, value in config.kafka.items():
        if key != "bootstrap.servers" and key.startswith(("security.", "sasl.", "ssl.")):
            reader = reader.option(f"kafka.{key}", value)
    return reader.load()


def run(model_uri: str, source: str, output: str | None, *, master: str,
        checkpoint: str | None, rejects_path: str | None, trigger: str,
        progress: bool | None) -> int:
    """``mlflow-preproc run --engine spark kafka:TOPIC``: a Structured Streaming query from
    ``TOPIC`` to Kafka (``-o kafka:TOPIC``, or ``OUTPUT_TOPIC``) or to a Parquet folder.

    ``trigger`` ``available-now`` processes what the topic holds and ends; a duration
    (``10 seconds``) runs a micro-batch at that interval until SIGTERM or Ctrl-C. Returns the
    number of micro-batches that ran."""
    if not checkpoint:
        raise ConfigError("a query on Kafka keeps its offsets in a checkpoint: pass "
                          "--checkpoint-location DIR (the same folder on every restart)")
    overrides = {"INPUT_TOPIC": source[len(KAFKA_SCHEME):]}
    to_kafka = output is None or output.startswith(KAFKA_SCHEME)
    if output and to_kafka:
        overrides["OUTPUT_TOPIC"] = output[len(KAFKA_SCHEME):]
    elif output:  # a folder: the rows name no topic, but the stream's data path needs one
        overrides["OUTPUT_TOPIC"] = os.path.basename(output.rstrip("/")) or "output"
    config = stream_config(overrides)
    spark = session.start(master, "mlflow-preproc run", progress)
    df = _kafka_source(spark, config)
    with tempfile.TemporaryDirectory(prefix="mlflow-preproc-run-") as workdir:
        transformed = transform_kafka(df, model_uri, overrides, workdir)
        if to_kafka:
            writer = (transformed.rows.writeStream.format("kafka")
                      .option("kafka.bootstrap.servers", config["KAFKA_BOOTSTRAP_SERVERS"]))
        else:
            writer = transformed.tagged.writeStream.foreachBatch(
                ParquetBatches(output, rejects_path or f"{output.rstrip('/')}.rejects"))
        writer = writer.option("checkpointLocation", checkpoint)
        writer = writer.trigger(availableNow=True) if trigger == AVAILABLE_NOW \
            else writer.trigger(processingTime=trigger)
        query = writer.start()
        _await(query)
        return len(query.recentProgress)


@dataclass
class ParquetBatches:
    """The Parquet sink: each micro-batch's outputs and dead letters in folders named by its
    id (``batch=N``), replaced whole when Spark runs that batch again after a failure (the
    same offsets: the checkpoint logs them before the batch runs), so each record is there
    once. The rows are the messages ``stream`` would produce (``key``, ``value`` in
    ``OUTPUT_FORMAT``, ``headers`` with the provenance and, for dead letters, the reason)."""

    output: str
    rejects: str

    def __call__(self, batch: Any, batch_id: int) -> None:
        from pyspark.sql import functions as F

        batch.persist()  # the model runs once for both folders
        try:
            for path, kind in ((self.output, OUTPUT), (self.rejects, DEAD_LETTER)):
                (batch.where(F.col(KIND) == kind).drop(KIND, "topic")
                 .write.mode("overwrite").parquet(os.path.join(path, f"batch={batch_id}")))
        finally:
            batch.unpersist()


def _kafka_source(spark: Any, config: Config) -> Any:
    from pyspark.errors import AnalysisException

    try:
        return read_kafka(spark, config)
    except AnalysisException as exc:
        if "kafka" in str(exc).lower() and "data source" in str(exc).lower():
            import pyspark

            raise session.SparkUnavailable(
                _FETCH_KAFKA_SOURCE.format(version=pyspark.__version__)) from None
        raise


def _await(query: Any) -> None:
    """Wait for ``query`` to end; SIGTERM or Ctrl-C stops it between micro-batches."""
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda sig, _: stopping.append(sig))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not query.awaitTermination(1):
            if stopping:
                print("mlflow-preproc run: stopping the query", file=sys.stderr)
                query.stop()
                break
        if query.exception() is not None:
            raise RuntimeError(f"the query failed: {query.exception()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""``transform(df, model_uri)``: a preprocessing model over a DataFrame, with record semantics.

A UDF gives one value per row; preprocessing may drop a record (``None``), fan it out (a list)
or fail on it. So the model runs through ``mapInArrow``, where a partition's rows go in and
any number of rows come out (:mod:`mlflow_preproc.spark.tasks`), and a record that fails goes
to the rejects instead of failing the job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mlflow_preproc.runtime.batch_run import RunCounts
from mlflow_preproc.runtime.flavor import LoadedPreprocessing
from mlflow_preproc.runtime.formats import FILE_FORMATS
from mlflow_preproc.spark import schemas
from mlflow_preproc.spark.kafka import KafkaTransformed, transform_kafka
from mlflow_preproc.spark.kafka_rows import is_kafka_rows
from mlflow_preproc.spark.model_files import ship
from mlflow_preproc.spark.tasks import COUNTS, COUNTS_FIELDS, FILE_COLUMN, OUTPUT, REJECT, \
    ROW_COLUMN, PartitionJob, tagged_schema


@dataclass
class Transformed:
    """The outputs and rejects of :func:`transform`: two views of one pass over the input.

    ``output`` has the columns of the output schema, or one string column ``value`` holding
    each output as the JSON line ``mlflow-preproc run`` writes. ``rejects`` has the fields
    of ``run``'s rejects file: ``input``, ``index``, ``stage``, ``error`` and ``record`` (the
    input record as JSON, null when it could not be decoded).

    Both are lazy; reading both runs the model twice unless :meth:`persist` is called first.
    """

    tagged: Any
    output: Any
    rejects: Any

    @classmethod
    def of(cls, tagged: Any) -> Transformed:
        """Split the tasks' tagged rows into outputs and rejects."""
        from pyspark.sql import functions as F
        from pyspark.sql.types import StringType

        outputs = tagged.where(F.col(OUTPUT).isNotNull())
        if isinstance(tagged.schema[OUTPUT].dataType, StringType):  # JSON lines
            output = outputs.select(F.col(OUTPUT).alias("value"))
        else:
            output = outputs.select(f"{OUTPUT}.*")
        rejects = tagged.where(F.col(REJECT).isNotNull()).select(f"{REJECT}.*")
        return cls(tagged, output, rejects)

    def counts(self) -> RunCounts:
        """Records read, written, dropped and failed (runs a job, or reads the cache)."""
        from pyspark.sql import functions as F

        row = (self.tagged.where(F.col(COUNTS).isNotNull())
               .agg(*(F.sum(f"{COUNTS}.{k}").alias(k) for k in COUNTS_FIELDS))
               .first())
        return RunCounts(read=row["read"] or 0, written=row["written"] or 0,
                         dropped=row["dropped"] or 0, failed=row["failed"] or 0)

    def persist(self) -> Transformed:
        """Keep the model's results (memory, then disk), so outputs, rejects and counts are
        computed once."""
        from pyspark import StorageLevel

        self.tagged.persist(StorageLevel.MEMORY_AND_DISK)
        return self

    def unpersist(self) -> None:
        self.tagged.unpersist()


def transform(df: Any, model_uri: str, *, input_format: str | None = None,
              drop_fields: Iterable[str] = (), output_schema: Any = None,
              stream_settings: Mapping[str, str] | None = None) -> Transformed | KafkaTransformed:
    """Run a preprocessing model over a Spark DataFrame.

    Args:
        df: One record per row (nested structs become dicts, arrays lists, nulls ``None``),
            or with ``input_format``, files as ``spark.read.format("binaryFile")`` reads them,
            or the rows of Spark's Kafka source (a streaming DataFrame too): then the
            stream's data path runs, with ``stream_settings``
            (:func:`mlflow_preproc.spark.kafka.transform_kafka`).
        model_uri: Any MLflow model URI of a preprocessing model.
        input_format: ``"avro"`` (object container files: one alert per file or many),
            ``"json"`` or ``"jsonl"``: decode each file of ``df`` in the tasks, as
            ``mlflow-preproc run`` reads files. No spark-avro package is needed.
        drop_fields: Dotted field paths removed before ``pre_processing`` (e.g.
            ``mlflow_preproc.config.ZTF_CUTOUTS``).
        output_schema: The output columns: a ``StructType``, a DDL string or an Avro schema.
            Default: the model's ``output_avro_schema``, else its signature's outputs, else
            JSON lines in a ``value`` column. ``"json"`` forces JSON lines.

    Returns:
        A :class:`Transformed` with ``output`` and ``rejects`` DataFrames; for Kafka rows a
        :class:`~mlflow_preproc.spark.kafka.KafkaTransformed`.
    """
    if input_format is None and is_kafka_rows(df):
        return transform_kafka(df, model_uri, stream_settings)
    if input_format is not None and input_format not in FILE_FORMATS:
        raise ValueError(f"input_format={input_format!r} is not supported; use one of "
                         f"{FILE_FORMATS} for files, or None for a DataFrame of records")
    if input_format is not None and not {"path", "content"} <= set(df.columns):
        raise ValueError(f"input_format={input_format!r} decodes files: pass a DataFrame of "
                         "files, spark.read.format('binaryFile').load(...), not one with "
                         f"columns {df.columns}")
    return transform_files(df, model_uri, files=input_format is not None,
                           input_format=input_format, drop_fields=drop_fields,
                           output_schema=output_schema)


def transform_files(df: Any, model_uri: str, *, files: bool, input_format: str | None = None,
                    drop_fields: Iterable[str] = (), output_schema: Any = None,
                    names: dict[str, str] | None = None, workdir: str | None = None,
                    parity_check: str | None = None) -> Transformed:
    """:func:`transform`, plus what the CLI needs: files whose format is sniffed one by one
    (``files=True``, ``input_format=None``), their names as the user gave them (``names``:
    Spark path -> name), where the model is downloaded (``workdir``) and ``PARITY_CHECK``
    (default: the driver's environment variable)."""
    spark = df.sparkSession
    loaded, shipped = ship(spark, model_uri, workdir, parity_check)
    output_type = resolve_output_type(loaded, output_schema)
    schema = tagged_schema(output_type)
    if files:
        rows = df.select("path", "content")
    else:
        rows = _with_provenance(df)
        if loaded.preprocessor.fields is not None:
            rows = rows.select(*_declared(df.schema, loaded.preprocessor.fields),
                               *[c for c in (FILE_COLUMN, ROW_COLUMN) if c in rows.columns])
    job = PartitionJob(shipped, schema, output_type, tuple(drop_fields), files, input_format,
                       dict(names or {}))
    return Transformed.of(rows.mapInArrow(job, schema))


def resolve_output_type(loaded: LoadedPreprocessing, output_schema: Any) -> Any | None:
    """The Spark struct of the outputs, or None for JSON lines (see :func:`transform`)."""
    if isinstance(output_schema, str) and output_schema == "json":
        return None
    if output_schema is not None:
        return schemas.output_struct(output_schema)
    if loaded.output_avro_schema is not None:
        return schemas.spark_schema(loaded.output_avro_schema)
    from mlflow.models import Model

    signature = Model.load(os.path.join(loaded.model_dir, "MLmodel")).signature
    if signature is not None and signature.outputs is not None:
        return signature.outputs.as_spark_schema()
    return None


def _declared(struct: Any, fields: dict) -> list[Any]:
    """The columns of ``struct`` (a DataFrame's schema) cut to the model's declared input
    fields, in the schema's order: Spark prunes the rest from what it reads, nested fields of
    Parquet included (``ReadSchema`` of the scan; tests/test_spark.py checks it). What the
    function sees does not change: its records are projected to the same fields anyway."""
    from pyspark.sql import functions as F

    return [_cut(F.col(f.name), f.dataType, fields[f.name]).alias(f.name)
            for f in struct.fields if f.name in fields]


def _cut(column: Any, data_type: Any, sub: dict | None) -> Any:
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, StructType

    if sub is None:
        return column
    if isinstance(data_type, ArrayType):
        element = data_type.elementType
        if isinstance(element, StructType) and \
                all(sub[f.name] is None for f in element.fields if f.name in sub):
            # Leaf fields of the structs: zipped from their own columns (``array.field``),
            # the form Spark 4.2 prunes from Parquet (through ``transform`` it reads whole
            # structs: ZTF's 30-field history for one magnitude). The price: an element
            # that is null itself (never in an Avro alert: items are records) arrives as a
            # record of nulls.
            kept = [f.name for f in element.fields if f.name in sub]
            if kept:
                return F.arrays_zip(*[column[name].alias(name) for name in kept])
        return F.transform(column, lambda item: _cut(item, element, sub))
    if not isinstance(data_type, StructType):
        return column  # a map or a leaf: whole, as the Avro decoders read map values whole
    kept = [f for f in data_type.fields if f.name in sub]
    if not kept:  # none of the declared fields exist here: as a full read has it
        return column
    struct = F.struct(*[_cut(column[f.name], f.dataType, sub[f.name]).alias(f.name)
                        for f in kept])
    return F.when(column.isNull(), None).otherwise(struct)


def _with_provenance(df: Any) -> Any:
    """``df`` plus the file and row each record came from, when Spark knows them.

    Files read by Spark (Parquet, JSON, ...) expose ``_metadata.file_path``, and Parquet
    ``_metadata.row_index``; other DataFrames name rejects by partition and position.
    """
    from pyspark.errors import AnalysisException
    from pyspark.sql import functions as F

    # PySpark logs every AnalysisException with a traceback, even one that is caught: mute
    # it while asking Spark whether the columns exist.
    quiet = logging.getLogger("DataFrameQueryContextLogger")
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        for columns in ((F.col("_metadata.file_path").alias(FILE_COLUMN),
                         F.col("_metadata.row_index").alias(ROW_COLUMN)),
                        (F.col("_metadata.file_path").alias(FILE_COLUMN),)):
            try:
                return df.select("*", *columns)  # resolved now: raises if there is no such column
            except AnalysisException:
                continue
        return df
    finally:
        quiet.disabled = was_disabled

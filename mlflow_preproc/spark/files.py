"""``mlflow-preproc run --engine spark``: files in, a folder of part files out.

    files -> binaryFile rows -> tasks (decode -> drop fields -> pre_processing -> encode)
          -> outputs (JSON Lines or Parquet, partitioned when asked) + rejects + counts

JSON, JSON Lines and Avro files are read whole by Spark's ``binaryFile`` source and decoded
inside the tasks by the code ``run`` uses, so records, rejects and their indexes are the
same; a file is the unit of parallelism. Parquet is read by Spark (split by row groups).
The model's results are cached once, then the counts, the outputs and the rejects are read
from the cache.
"""

from __future__ import annotations

import glob
import os
import tempfile

from mlflow_preproc.config import ConfigError
from mlflow_preproc.runtime.batch_run import RunCounts
from mlflow_preproc.spark import session
from mlflow_preproc.spark.transform import Transformed, transform_files

OUTPUT_FORMATS = ("jsonl", "parquet")
_PARQUET = "parquet"


def run(model_uri: str, inputs: list[str], output: str | None, *, master: str,
        input_format: str | None, output_format: str, output_schema: str | None,
        rejects_path: str, fields_to_drop: list[str], partition_by: list[str],
        progress: bool | None) -> RunCounts:
    """Preprocess every record of ``inputs`` (files, folders, globs) into the folder ``output``."""
    if not output:
        raise ConfigError("--engine spark writes a folder of part files: pass -o OUT")
    if not inputs or "-" in inputs:
        raise ConfigError("--engine spark reads files, not stdin: pass files, folders or globs")
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--engine spark writes {' or '.join(OUTPUT_FORMATS)}, not "
                          f"{output_format}; for Avro output use --engine local")
    for path in (output, rejects_path):
        if os.path.exists(path):
            raise ConfigError(f"{path} already exists; remove it or pass another path (Spark "
                              "writes a new folder)")
    parquet, others, names = _split_inputs(inputs, input_format)

    spark = session.start(master, "mlflow-preproc run", progress)
    # JSON Lines are written as run writes them; Parquet needs columns.
    schema = "json" if output_format == "jsonl" else output_schema
    with tempfile.TemporaryDirectory(prefix="mlflow-preproc-run-") as workdir:
        parts = []
        if others:
            files = spark.read.format("binaryFile").option("recursiveFileLookup", "true") \
                .load(others)
            parts.append(transform_files(files, model_uri, files=True,
                                         input_format=input_format if input_format != _PARQUET
                                         else None,
                                         drop_fields=fields_to_drop, output_schema=schema,
                                         names=names, workdir=workdir))
        if parquet:
            parts.append(transform_files(spark.read.parquet(*parquet), model_uri, files=False,
                                         drop_fields=fields_to_drop, output_schema=schema,
                                         names=names, workdir=workdir))
        result = _union(parts).persist()
        try:
            counts = result.counts()
            counts.rejects_path = rejects_path
            _write_output(spark, result, output, output_format, partition_by)
            if counts.failed:
                _write_rejects(result, rejects_path)
        finally:
            result.unpersist()
    return counts


def _split_inputs(inputs: list[str], input_format: str | None
                  ) -> tuple[list[str], list[str], dict[str, str]]:
    """Parquet inputs, other inputs, and Spark's name of each explicit local file -> ours."""
    parquet, others, names = [], [], {}
    for where in inputs:
        remote = "://" in where
        if not remote and not glob.has_magic(where) and not os.path.exists(where):
            raise FileNotFoundError(f"cannot read input {where}: No such file or directory")
        if not remote and not glob.has_magic(where) and os.path.isfile(where):
            names[f"file:{os.path.abspath(where)}"] = where
        is_parquet = input_format == _PARQUET or (input_format is None and (
            where.rstrip("/").endswith(".parquet")
            or (os.path.isdir(where) and bool(glob.glob(os.path.join(where, "*.parquet"))))))
        (parquet if is_parquet else others).append(where)
    return parquet, others, names


def _union(parts: list[Transformed]) -> Transformed:
    tagged = parts[0].tagged
    for part in parts[1:]:
        tagged = tagged.unionByName(part.tagged)
    return Transformed.of(tagged)  # split after the union, so persisting it covers all


def _write_output(spark, result: Transformed, output: str, output_format: str,
                  partition_by: list[str]) -> None:
    from pyspark.sql import functions as F

    frame = result.output
    typed = frame.columns != ["value"]
    if output_format == "jsonl":
        # The lines are those of `run`; partition columns are read back out of them.
        frame = frame.select("value", *(F.get_json_object("value", f"$.{c}").alias(c)
                                        for c in partition_by))
        frame.write.partitionBy(*partition_by).text(output)
        return
    if not typed:
        # No output schema: Spark infers one from the JSON outputs (types widened over all).
        frame = spark.read.json(frame.rdd.map(lambda row: row.value))
    missing = [c for c in partition_by if c not in frame.columns]
    if missing:
        raise ConfigError(f"--partition-by {','.join(missing)}: no such output column; the "
                          f"output columns are {', '.join(frame.columns)}")
    frame.write.partitionBy(*partition_by).parquet(output)


def _write_rejects(result: Transformed, rejects_path: str) -> None:
    # One file (rejects are few), each line as run's rejects file has it: the record as an
    # object, not as the JSON string the rejects DataFrame holds.
    result.rejects.mapInArrow(_reject_lines, "value string").coalesce(1) \
        .write.text(rejects_path)


def _reject_lines(batches):
    import orjson
    import pyarrow as pa

    from mlflow_preproc.runtime.jsonable import dumps

    for batch in batches:
        lines = []
        for r in batch.to_pylist():
            record = orjson.loads(r["record"]) if r["record"] is not None else None
            lines.append(dumps({"input": r["input"], "index": r["index"], "stage": r["stage"],
                                "error": r["error"], "record": record}))
        yield pa.RecordBatch.from_arrays([pa.array(lines, pa.string())], names=["value"])

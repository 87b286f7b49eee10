"""``mlflow-preproc run --engine spark``: files in, a folder of part files out.

    files -> binaryFile rows -> tasks (decode -> drop fields -> pre_processing -> encode)
          -> outputs (JSON Lines or Parquet, partitioned when asked) + rejects + counts

JSON, JSON Lines and Avro files are read whole by Spark's ``binaryFile`` source and decoded
inside the tasks by the code ``run`` uses, so records, rejects and their indexes are the
same; a file is the unit of parallelism. Parquet is read by Spark (split by row groups).
A folder is read for its data files only (``DATA_SUFFIXES``): an archive keeps its schemas
and notes beside the alerts, and those are not records. Files and globs named on the command
line are read whatever their names.
The model's results are cached once, then the counts, the outputs and the rejects are read
from the cache.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile

from mlflow_preproc.config import ConfigError
from mlflow_preproc.runtime.batch_run import RunCounts
from mlflow_preproc.spark import session
from mlflow_preproc.spark.transform import Transformed, transform_files

OUTPUT_FORMATS = ("jsonl", "parquet")
_PARQUET = "parquet"
# What a folder is read for, by --input-format (None: any of them).
DATA_SUFFIXES = {"avro": (".avro",), "json": (".json",), "jsonl": (".jsonl", ".ndjson")}


def run(model_uri: str, inputs: list[str], output: str | None, *, master: str,
        input_format: str | None, output_format: str, output_schema: str | None,
        rejects_path: str, fields_to_drop: list[str], partition_by: list[str],
        progress: bool | None, parity_check: str | None = None) -> RunCounts:
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
    suffixes = DATA_SUFFIXES.get(input_format or "") or tuple(
        x for group in DATA_SUFFIXES.values() for x in group)
    spark = session.start(master, "mlflow-preproc run", progress)
    folders = [w for w in others if _is_folder(spark, w)]
    others = [w for w in others if w not in folders]
    for folder in folders:
        _say_what_a_folder_skips(folder, suffixes)
    # JSON Lines are written as run writes them; Parquet needs columns.
    schema = "json" if output_format == "jsonl" else output_schema
    with tempfile.TemporaryDirectory(prefix="mlflow-preproc-run-") as workdir:
        parts = []
        sources = [_binary_files(spark, others)] if others else []
        if folders:
            # Hadoop's glob filter matches file names (not paths) in every folder below.
            pattern = "*.{" + ",".join(x.lstrip(".") for x in suffixes) + "}"
            sources.append(_binary_files(spark, folders, pathGlobFilter=pattern))
        for files in sources:
            parts.append(transform_files(files, model_uri, files=True,
                                         input_format=input_format if input_format != _PARQUET
                                         else None,
                                         drop_fields=fields_to_drop, output_schema=schema,
                                         names=names, workdir=workdir,
                                         parity_check=parity_check))
        if parquet:
            parts.append(transform_files(spark.read.parquet(*parquet), model_uri, files=False,
                                         drop_fields=fields_to_drop, output_schema=schema,
                                         names=names, workdir=workdir,
                                         parity_check=parity_check))
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


def _binary_files(spark, paths: list[str], **options: str):
    return spark.read.format("binaryFile").option("recursiveFileLookup", "true") \
        .options(**options).load(paths)


def _is_folder(spark, where: str) -> bool:
    """Whether ``where`` names a folder (asked of Hadoop's file system for a URI: an
    ``s3a://bucket/alerts`` folder has no trailing slash to tell it)."""
    if "://" not in where:
        return os.path.isdir(where)
    if glob.has_magic(where):
        return False
    path = spark._jvm.org.apache.hadoop.fs.Path(where)
    fs = path.getFileSystem(spark._jsc.hadoopConfiguration())
    return bool(fs.exists(path) and fs.getFileStatus(path).isDirectory())


def _local(where: str) -> str | None:
    """The local path of a plain path or a ``file:`` URI, else None."""
    if where.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(where).path)
    return None if "://" in where else where


def _say_what_a_folder_skips(folder: str, suffixes: tuple[str, ...]) -> None:
    """Name the files of a local folder that are not read, so none is missed silently."""
    local = _local(folder)
    if local is None:
        return
    # As Hadoop's glob filter matches: case-sensitive (alert.AVRO is not read)
    skipped = sorted(os.path.relpath(os.path.join(d, f), local)
                     for d, _, names in os.walk(local) for f in names
                     if not f.endswith(suffixes) and not f.startswith((".", "_")))
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5
                                          else "")
        print(f"mlflow-preproc run: {folder}: reading its {', '.join(suffixes)} files; "
              f"skipping {len(skipped)} others ({shown}); name a file or a glob to read it",
              file=sys.stderr)


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
        _name_parts_jsonl(output)
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
    _name_parts_jsonl(rejects_path)


def _name_parts_jsonl(folder: str) -> None:
    """Spark's text writer names its parts ``part-*.txt``; they are JSON Lines, and tools
    (and ``run --input-format`` sniffing) go by the name. Local folders only: object stores
    have no cheap rename."""
    if "://" in folder and not folder.startswith("file:"):
        return
    root = folder[len("file:"):] if folder.startswith("file:") else folder
    for d, _, names in os.walk(root):
        for name in names:
            # Hadoop's checksum of a part is .NAME.crc: renamed with it, so it still matches.
            for prefix, suffix in (("part-", ".txt"), (".part-", ".txt.crc")):
                if name.startswith(prefix) and name.endswith(suffix):
                    new = name[:-len(suffix)] + suffix.replace(".txt", ".jsonl")
                    os.rename(os.path.join(d, name), os.path.join(d, new))


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

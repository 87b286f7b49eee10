"""File and stdin runs: ``mlflow-preproc run -m MODEL [FILE ...|-]``.

Records stream through in batches, so memory stays flat whatever the input size:

    file in -> decode -> drop fields -> pre_processing -> encode -> file out

A record that fails at any stage is written to the rejects file (JSON Lines: input, index,
stage, error, record; the record of a bad JSON line is its text) and the run goes on; the exit
status says whether any failed.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT
from mlflow_preproc.runtime.formats import (
    DecodeError,
    EncodeError,
    FileWriter,
    drop_fields,
    read_records,
    sniff_file_format,
)
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.output_files import PendingFile, refuse_inputs_as_outputs
from mlflow_preproc.runtime.parquet_files import ParquetWriter, is_parquet, read_parquet
from mlflow_preproc.runtime.records import Preprocessor, RecordError

BATCH_SIZE = 1000


@dataclass
class RunCounts:
    """What a run did; ``failed`` records are in the rejects file."""

    read: int = 0
    written: int = 0
    dropped: int = 0
    failed: int = 0
    rejects_path: str | None = None
    per_stage: dict[str, int] = field(default_factory=dict)
    earlier_rejects: bool = False  # a rejects file of an earlier run was at rejects_path

    def summary(self) -> str:
        text = (f"in={self.read} out={self.written} dropped={self.dropped} "
                f"failed={self.failed}")
        if self.failed:
            text += f" (rejects: {self.rejects_path}" + (
                ", replacing an earlier run's)" if self.earlier_rejects else ")")
        elif self.earlier_rejects:
            text += f" (removed {self.rejects_path} of an earlier run)"
        return text


class _Rejects:
    """The rejects file of this run, written beside its path and put in place when the run
    finishes. One an earlier run left at the same path is replaced, or removed by a run
    without failures, so what is there after a run is always that run's (as its output is);
    a run cut short leaves it as it was."""

    def __init__(self, path: str):
        self.path = path
        self._pending = PendingFile(path)
        self.earlier = os.path.isfile(path)

    def write(self, where: str, index: int, stage: str, error: Exception, record: Any) -> None:
        line = {"input": where, "index": index, "stage": stage, "error": str(error),
                "record": record}
        self._pending.open().write(dumps(line) + b"\n")

    def close(self, finished: bool) -> None:
        """Put this run's rejects in place if it ``finished``; a run that finished without
        failures removes an earlier run's file."""
        if not finished:
            self._pending.discard()
        elif self._pending.opened:
            self._pending.commit()
        elif self.earlier:
            os.remove(self.path)


def run(preprocessor: Preprocessor, inputs: list[str], output: IO[bytes], *,
        input_format: str | None = None, output_format: str = "jsonl",
        output_schema: dict | None = None, rejects_path: str = "rejects.jsonl",
        fields_to_drop: list[str] | None = None, progress: bool | None = None,
        max_decoded_bytes: int = MAX_DECODED_BYTES_DEFAULT,
        avro_columns: bool = True) -> RunCounts:
    """Preprocess every record of ``inputs`` (paths, ``-`` for stdin) into ``output``.

    An Avro block decoding to more than ``max_decoded_bytes`` is one reject. With
    ``avro_columns`` and polars-avro installed, Avro is read by the column reader, the same
    records: the blocks of a file a batch at a time, and runs of small Avro files (one alert
    each, as archives of alerts are) a batch of files at a time.
    """
    refuse_inputs_as_outputs(inputs, [(
        "the rejects file", rejects_path, "pass --rejects another path (or -o OUT, whose "
        "rejects go to OUT.rejects.jsonl)")])
    counts = RunCounts(rejects_path=rejects_path)
    writer = ParquetWriter(output, output_schema) if output_format == "parquet" else \
        FileWriter(output, output_format, output_schema)
    rejects = _Rejects(rejects_path)
    finished = False
    columns = _column_reader(preprocessor, max_decoded_bytes) if avro_columns else None
    pending = list(inputs or ["-"])
    try:
        while pending:
            small = _small_avro_files(pending, input_format, max_decoded_bytes) \
                if columns is not None else []
            if small:
                del pending[:len(small)]
                _run_small_files(preprocessor, small, columns, writer, rejects, counts,
                                 fields_to_drop or [], max_decoded_bytes)
                continue
            where = pending.pop(0)
            if where != "-" and is_parquet(where, input_format):
                records = read_parquet(where, preprocessor.fields, BATCH_SIZE)
                for batch in _batches(records, BATCH_SIZE):
                    _process_batch(preprocessor, [(where, i, r) for i, r in batch],
                                   writer, rejects, counts, fields_to_drop or [])
                continue
            with _open_input(where) as stream:
                fmt = input_format or sniff_file_format(None if where == "-" else where,
                                                        _peek(stream))
                read_before = counts.read
                with _progress_bar(stream, where, progress) as advance:
                    records = read_records(stream, fmt, where, max_decoded_bytes,
                                           preprocessor.fields,
                                           columns.blocks if columns is not None else None)
                    for batch in _batches(records, BATCH_SIZE):
                        _process_batch(preprocessor, [(where, i, r) for i, r in batch],
                                       writer, rejects, counts, fields_to_drop or [])
                        advance(counts.read - read_before)
        finished = True
    finally:
        writer.close()
        rejects.close(finished)
        counts.earlier_rejects = rejects.earlier
    return counts


# A file of at most this many bytes is read whole with others, one batch of files a call.
_SMALL_FILE_BYTES = 1024 * 1024


def _column_reader(preprocessor: Preprocessor, max_decoded_bytes: int):
    """The column reader of a run (polars-avro installed), else None. It leaves the dropped
    fields in: the rejects file holds the records as read, as without it."""
    from mlflow_preproc.runtime import avro_columns  # imports polars, when it is installed

    if not avro_columns.installed():
        return None
    return avro_columns.ColumnReader(preprocessor.fields, (), max_decoded_bytes)


def _small_avro_files(pending: list[str], input_format: str | None, limit: int) -> list[str]:
    """The run of small Avro files at the head of ``pending`` (two or more), up to a batch."""
    run: list[str] = []
    for where in pending[:BATCH_SIZE]:
        if where == "-" or input_format not in (None, "avro") or \
                not where.lower().endswith(".avro"):
            break
        try:
            if os.path.getsize(where) > min(_SMALL_FILE_BYTES, limit):
                break
        except OSError:
            break  # said by _open_input, in its turn
        run.append(where)
    return run if len(run) > 1 else []


def _run_small_files(preprocessor, paths, columns, writer, rejects, counts, fields_to_drop,
                     limit) -> None:
    """Small Avro files read in one call of the column reader, their records one batch;
    a file it leaves is read by the file reader, which judges it."""
    values = []
    for where in paths:
        with _open_input(where) as stream:
            values.append(stream.read())
    batch: list[tuple[str, int, Any]] = []
    for where, value, records in zip(paths, values, columns.records(values)):
        if records is None:
            records = read_records(io.BytesIO(value), "avro", where, limit, preprocessor.fields)
        batch += [(where, index, record) for index, record in enumerate(records)]
    for start in range(0, len(batch), BATCH_SIZE):
        _process_batch(preprocessor, batch[start:start + BATCH_SIZE], writer, rejects, counts,
                       fields_to_drop)


def _process_batch(preprocessor, batch, writer, rejects, counts, fields_to_drop) -> None:
    # pre_processing sees the decodable records of the batch at once; outputs and rejects
    # are then written in input order
    decoded = [drop_fields(item, fields_to_drop) for _, _, item in batch
               if not isinstance(item, DecodeError)]
    results = iter(preprocessor.process_each(decoded))
    # Parquet: the outputs of the batch are one row group, written after it
    deferred: list[tuple[str, int, Any, Any]] | None = \
        [] if isinstance(writer, ParquetWriter) else None
    for where, index, item in batch:
        counts.read += 1
        if isinstance(item, DecodeError):
            _reject(rejects, counts, where, index, "decode", item, item.raw_text())
            continue
        result = next(results)
        if isinstance(result, RecordError):
            _reject(rejects, counts, where, index, "preprocess", result.at(index), item)
            continue
        if not result:
            counts.dropped += 1
        if deferred is not None:
            deferred += [(where, index, item, out) for out in result]
            continue
        for out in result:
            try:
                writer.write(out)
                counts.written += 1
            except EncodeError as exc:
                _reject(rejects, counts, where, index, "encode", exc, item)
    if deferred:
        errors = writer.write_many([out for *_, out in deferred])
        for (where, index, item, _), error in zip(deferred, errors):
            if error is None:
                counts.written += 1
            else:
                _reject(rejects, counts, where, index, "encode", error, item)


def _reject(rejects, counts, where, index, stage, error, record) -> None:
    counts.failed += 1
    counts.per_stage[stage] = counts.per_stage.get(stage, 0) + 1
    rejects.write(where, index, stage, error, record)


def _batches(items: Iterator, size: int) -> Iterator[list[tuple[int, Any]]]:
    batch = []
    for index, item in enumerate(items):
        batch.append((index, item))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _open_input(where: str) -> Iterator[IO[bytes]]:
    if where == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(where, "rb")
    except OSError as exc:
        raise FileNotFoundError(f"cannot read input {where}: {exc.strerror}") from None
    with f:
        yield f


def _peek(stream: IO[bytes]) -> bytes:
    return stream.peek(8)[:8] if isinstance(stream, io.BufferedReader) else b""


@contextlib.contextmanager
def _progress_bar(stream: IO[bytes], where: str, enabled: bool | None):
    """A progress bar on a terminal when the input size is known: it moves by bytes (the only
    total known before reading) and counts records, which is what the user asked about."""
    size = None
    if where != "-":
        size = os.fstat(stream.fileno()).st_size
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or not size:
        yield lambda records: None
        return
    from tqdm import tqdm

    started = time.monotonic()
    with tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(where),
              file=sys.stderr, leave=False, mininterval=0, miniters=1) as bar:  # per batch
        def advance(records: int) -> None:
            rate = records / max(time.monotonic() - started, 1e-6)
            bar.set_postfix_str(f"{records:,} records, {rate:,.0f}/s", refresh=False)
            bar.update(stream.tell() - bar.n)

        yield advance

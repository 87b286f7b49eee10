"""What runs inside the Spark tasks: one partition of input in, tagged rows out.

    record in -> decode -> drop fields -> pre_processing -> encode -> record out

The stages and their rejects are those of ``mlflow-preproc run``
(:func:`mlflow_preproc.runtime.batch_run.run`): files are read with the same
:func:`~mlflow_preproc.runtime.formats.read_records`, in batches of the same size, through the
same :meth:`~mlflow_preproc.runtime.records.Preprocessor.process_each`, so a record gives the
same outputs, and fails with the same message, on one machine or on a cluster.

A task emits Arrow batches of one schema (:func:`tagged_schema`) with three columns, exactly
one of them set on each row: ``output`` (one output record), ``reject`` (``input``, ``index``,
``stage``, ``error``, ``record``: the fields of ``run``'s rejects file, the record as JSON) or,
once per partition, ``counts``. The caller splits them into DataFrames; nothing fails a task
but a broken model or executor. Counts travel as rows rather than accumulators because a
retried task replaces its rows, whereas accumulators updated in transformations can count
twice.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mlflow_preproc.runtime.batch_run import BATCH_SIZE
from mlflow_preproc.runtime.formats import DecodeError, EncodeError, drop_fields, read_records, \
    sniff_file_format
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.records import COLUMNAR_FORMATS, Preprocessor, RecordError
from mlflow_preproc.spark.model_files import ShippedModel

OUTPUT, REJECT, COUNTS = "output", "reject", "counts"
REJECT_FIELDS = {"input": "string", "index": "long", "stage": "string", "error": "string",
                 "record": "string"}  # the fields of run's rejects file, the record as JSON
COUNTS_FIELDS = ("read", "written", "dropped", "failed")
# Columns that transform() adds to typed input rows to name where they came from.
FILE_COLUMN, ROW_COLUMN = "__mlflow_preproc_file", "__mlflow_preproc_row"
# Rows per emitted Arrow batch: bounded memory in the Python worker, few JVM round trips.
_EMIT_ROWS = 1000


def tagged_schema(output_type: Any | None) -> Any:
    """The Spark schema of the tasks' rows; ``output_type`` None means JSON lines."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    types = {"string": StringType(), "long": LongType()}
    reject = StructType([StructField(k, types[v], True) for k, v in REJECT_FIELDS.items()])
    counts = StructType([StructField(k, LongType(), True) for k in COUNTS_FIELDS])
    return StructType([
        StructField(OUTPUT, output_type or StringType(), True),
        StructField(REJECT, reject, True),
        StructField(COUNTS, counts, True),
    ])


@dataclass
class PartitionJob:
    """The function given to ``mapInArrow``; pickled to the executors with its settings.

    ``files``: the rows are files (``path``, ``content`` as ``binaryFile`` reads them), decoded
    here in ``input_format`` (None: from each file's name or first bytes, as ``run`` does).
    Otherwise the rows are records, with :data:`FILE_COLUMN`/:data:`ROW_COLUMN` naming where
    each came from when known. ``output_type`` is the Spark struct of the output records, or
    None for JSON lines written exactly as ``run`` writes them.
    """

    model: ShippedModel
    schema: Any  # tagged_schema(output_type)
    output_type: Any | None
    fields_to_drop: tuple[str, ...] = ()
    files: bool = False
    input_format: str | None = None
    names: dict[str, str] = field(default_factory=dict)

    def __call__(self, batches: Iterable[Any]) -> Iterator[Any]:
        preprocessor = self.model.load().preprocessor
        sink = _Sink(self.schema, self.output_type)
        # A columnar function over records Spark hands as Arrow gets them as they come: no
        # records are built (transform() cut the DataFrame to the declared fields already).
        columnar = preprocessor.batch_format in COLUMNAR_FORMATS and not self.files and \
            not self.fields_to_drop
        seen = 0  # rows of the partition so far
        for batch in batches:
            if columnar:
                for places, table in self._tables(batch, seen):
                    self._process_columns(preprocessor, places, table, sink)
                    yield from sink.emit()
            else:
                for chunk in _chunks(self._items(batch, seen, preprocessor.fields), BATCH_SIZE):
                    self._process(preprocessor, chunk, sink)
                    yield from sink.emit()
            seen += batch.num_rows
        yield from sink.emit(final=True)

    def _tables(self, batch: Any, seen: int) -> Iterator[tuple[list[tuple[str, int]], Any]]:
        """The records of an Arrow batch as tables of at most ``BATCH_SIZE`` rows of one
        input each (as :func:`_chunks`), with the (where, index) of each row."""
        import pyarrow as pa

        table = pa.Table.from_batches([batch])
        if FILE_COLUMN in table.column_names:
            files = [self._name(w) for w in table.column(FILE_COLUMN).to_pylist()]
            rows = table.column(ROW_COLUMN).to_pylist() if ROW_COLUMN in table.column_names \
                else [None] * table.num_rows
            table = table.drop_columns([c for c in (FILE_COLUMN, ROW_COLUMN)
                                        if c in table.column_names])
        else:
            from pyspark import TaskContext

            where = f"partition {TaskContext.get().partitionId()}"
            files = [where] * table.num_rows
            rows = list(range(seen, seen + table.num_rows))
        start = 0
        while start < table.num_rows:
            end = start + 1
            while end < table.num_rows and end - start < BATCH_SIZE and files[end] == files[start]:
                end += 1
            yield list(zip(files[start:end], rows[start:end])), table.slice(start, end - start)
            start = end

    def _process_columns(self, preprocessor: Preprocessor, places: list[tuple[str, int]],
                         table: Any, sink: _Sink) -> None:
        for row, ((where, index), result) in enumerate(
                zip(places, preprocessor.process_columns(table))):
            sink.counts["read"] += 1
            sink.result(where, index, result, _Row(table, row))

    # ---- record in -> decode -----------------------------------------------------------

    def _items(self, batch: Any, seen: int, fields: Any = None
               ) -> Iterator[tuple[str, int, Any]]:
        """(where, index, record or DecodeError) for every input of an Arrow batch."""
        if self.files:
            # One file's bytes in Python at a time, not the whole batch's.
            for path, content in zip(batch.column("path").to_pylist(), batch.column("content")):
                yield from self._file_records(path, content.as_py(), fields)
            return
        rows = batch.to_pylist()
        if not rows or FILE_COLUMN not in rows[0]:
            # Without a file to point at, a row is named by its place in its partition.
            from pyspark import TaskContext

            where = f"partition {TaskContext.get().partitionId()}"
            for index, row in enumerate(rows, seen):
                yield where, index, row
            return
        for row in rows:
            where, index = row.pop(FILE_COLUMN), row.pop(ROW_COLUMN, None)
            yield self._name(where), index, row

    def _file_records(self, path: str, content: bytes, fields: Any = None
                      ) -> Iterator[tuple[str, int, Any]]:
        where = self._name(path)
        # A BufferedReader, as run reads files: read_records peeks at the first bytes.
        stream = io.BufferedReader(io.BytesIO(content))
        fmt = self.input_format or sniff_file_format(where, stream.peek(8)[:8])
        index = -1
        try:
            # the model's declared input fields: the only ones an Avro file is decoded for
            for index, item in enumerate(read_records(stream, fmt, where, fields=fields,
                                                      columns=_column_blocks(fields))):
                yield where, index, item
        except Exception as exc:  # fastavro fails mid-file on a truncated or corrupt block
            yield where, index + 1, DecodeError(
                f"{where} is corrupt after record {index} ({type(exc).__name__}: {exc}); the "
                "rest of the file is skipped")

    def _name(self, path: str | None) -> str | None:
        if path is None:
            return None
        if path in self.names:
            return self.names[path]
        return path[len("file:"):] if path.startswith("file:") else path

    # ---- drop fields -> pre_processing -> encode ----------------------------------------

    def _process(self, preprocessor: Preprocessor, chunk: list[tuple[str, int, Any]],
                 sink: _Sink) -> None:
        # As batch_run._process_batch: pre_processing sees the decodable records of the
        # batch at once, then each input gets its outputs or its reject.
        decoded = [drop_fields(item, self.fields_to_drop) for _, _, item in chunk
                   if not isinstance(item, DecodeError)]
        results = iter(preprocessor.process_each(decoded))
        for where, index, item in chunk:
            sink.counts["read"] += 1
            if isinstance(item, DecodeError):
                sink.reject(where, index, "decode", item, item.raw_text())
                continue
            sink.result(where, index, next(results), item)


_readers: dict[str, Any] = {}


def _column_blocks(fields: Any) -> Any:
    """``ColumnReader.blocks`` for Avro files, as ``run`` reads them (polars-avro installed
    in the executor), else None: fastavro decodes every block. One reader per Python worker
    and set of fields."""
    from mlflow_preproc.runtime import avro_columns

    if not avro_columns.installed():
        return None
    key = repr(fields)
    if key not in _readers:
        _readers[key] = avro_columns.ColumnReader(fields, ())
    return _readers[key].blocks


def _chunks(items: Iterator[tuple[str, int, Any]], size: int
            ) -> Iterator[list[tuple[str, int, Any]]]:
    """Batches of ``size``, never spanning two inputs (``run`` batches each file alone)."""
    chunk: list[tuple[str, int, Any]] = []
    for item in items:
        if chunk and (len(chunk) == size or item[0] != chunk[0][0]):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


class _Sink:
    """Collects outputs, rejects and counts; encodes them into Arrow batches."""

    def __init__(self, schema: Any, output_type: Any | None):
        import pyarrow as pa
        from pyspark.sql.pandas.types import to_arrow_schema

        self._pa = pa
        self.arrow_schema = to_arrow_schema(schema)
        self._output_type = self.arrow_schema.field(OUTPUT).type
        self._typed = output_type is not None
        self.counts = dict.fromkeys(COUNTS_FIELDS, 0)
        self._outputs: list[Any] = []   # JSON lines, or (where, index, output, input)
        self._rejects: list[dict] = []

    def result(self, where: str, index: int, result: list | RecordError, item: Any) -> None:
        """What pre_processing made of input ``index`` of ``where``: its outputs (none: it
        was dropped) or its reject."""
        if isinstance(result, RecordError):
            self.reject(where, index, "preprocess", result.at(index), item)
            return
        if not result:
            self.counts["dropped"] += 1
        for out in result:
            self.output(where, index, out, item)

    def output(self, where: str, index: int, out: dict, item: Any) -> None:
        if self._typed:
            self._outputs.append((where, index, out, item))  # encoded a batch at a time
            return
        try:
            line = dumps(out)
        except TypeError as exc:  # as FileWriter.write for JSON Lines output
            self.reject(where, index, "encode", EncodeError(str(exc)), item)
            return
        self._outputs.append(line)
        self.counts["written"] += 1

    def reject(self, where: str, index: int, stage: str, error: Exception, record: Any) -> None:
        self.counts["failed"] += 1
        self._rejects.append({"input": where, "index": index, "stage": stage,
                              "error": str(error), "record": _json_or_none(record)})

    def emit(self, final: bool = False) -> Iterator[Any]:
        if self._outputs and (final or len(self._outputs) >= _EMIT_ROWS):
            column = self._encode_typed() if self._typed else self._pa.array(
                self._outputs, self._output_type)
            self._outputs = []
            if len(column):
                yield self._batch(OUTPUT, column)
        if self._rejects and (final or len(self._rejects) >= _EMIT_ROWS):
            yield self._batch(REJECT, self._pa.array(self._rejects,
                                                     self.arrow_schema.field(REJECT).type))
            self._rejects = []
        if final:
            yield self._batch(COUNTS, self._pa.array([self.counts],
                                                     self.arrow_schema.field(COUNTS).type))

    def _encode_typed(self) -> Any:
        pa = self._pa
        records = [out for _, _, out, _ in self._outputs]
        try:
            column = pa.array(records, self._output_type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # Find the records that do not fit, one at a time; the others are kept.
            good = []
            for where, index, out, item in self._outputs:
                try:
                    pa.array([out], self._output_type)
                except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                    self.reject(where, index, "encode", EncodeError(
                        f"the output record does not match the output schema "
                        f"({type(exc).__name__}: {exc}); fix pre_processing or the schema"), item)
                else:
                    good.append(out)
            column = pa.array(good, self._output_type)
        self.counts["written"] += len(column)
        return column

    def _batch(self, name: str, column: Any) -> Any:
        pa = self._pa
        arrays = [column if f.name == name else pa.nulls(len(column), f.type)
                  for f in self.arrow_schema]
        return pa.RecordBatch.from_arrays(arrays, schema=self.arrow_schema)


class _Row:
    """Row ``index`` of ``table``, made a record only if a reject needs it."""

    __slots__ = ("table", "index")

    def __init__(self, table: Any, index: int):
        self.table, self.index = table, index

    def record(self) -> dict:
        return self.table.slice(self.index, 1).to_pylist()[0]


def _json_or_none(record: Any) -> str | None:
    if isinstance(record, _Row):
        record = record.record()
    if record is None:
        return None
    try:
        return dumps(record).decode()
    except TypeError:
        return None  # a value no JSON rule covers; the error message still says what failed

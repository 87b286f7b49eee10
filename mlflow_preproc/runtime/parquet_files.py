"""Parquet in and out for ``mlflow-preproc run --engine local`` (pyarrow).

Input: a Parquet file's rows are its records, read a batch at a time (memory stays flat), only
the leaf columns of the model's declared input fields when it declares them, nested ones
included (the rest of the file is never read, nor built into Python values: on Rubin alerts
~30x less CPU than reading the declared top-level columns whole); a row is named by its file
and its place in it, as Spark names it.
A file that is not Parquet, or is damaged, is one reject, after the rows read before.

Output: the outputs of each batch are one row group, typed by the output Avro schema when
there is one (the model's ``output_avro_schema`` or ``--output-schema``), else by the first
batch's outputs (pyarrow's inference); an output that does not fit those columns is a reject
at the encode stage, alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import IO, Any

from mlflow_preproc.runtime.formats import DecodeError, EncodeError, Record
from mlflow_preproc.runtime.input_fields import Tree

SUFFIX = ".parquet"


def is_parquet(where: str, input_format: str | None) -> bool:
    """Whether ``where`` is read as Parquet: asked for, or named so."""
    return input_format == "parquet" or (input_format is None
                                         and where.lower().endswith(SUFFIX))


# The levels Parquet writers put between a list or map column and its values: not field names.
_WRAPPERS = frozenset({"list", "element", "array", "item", "bag", "key_value", "map", "key",
                       "value"})


def _declared(path: str, fields: Tree) -> bool:
    """Whether the leaf column at dotted ``path`` holds a declared field (or part of one)."""
    node: Tree | None = fields
    for part in path.split("."):
        if node is None:
            return True  # below a field declared whole
        if part in node:
            node = node[part]
        elif part not in _WRAPPERS:
            return False
    return True


def read_parquet(where: str, fields: Tree | None, batch_size: int
                 ) -> Iterator[Record | DecodeError]:
    """The rows of the Parquet file ``where`` as records (only the declared fields' columns)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(where)
        columns = None if fields is None else [
            path for path in (parquet.schema.column(i).path
                              for i in range(parquet.metadata.num_columns))
            if _declared(path, fields)]
        batches = parquet.iter_batches(batch_size=batch_size, columns=columns)
        count = 0
        for batch in batches:
            rows = batch.to_pylist()
            count += len(rows)
            yield from rows
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        at = "" if not locals().get("count") else f" after row {count}"
        yield DecodeError(f"{where} is not a readable Parquet file{at} "
                          f"({type(exc).__name__}: {exc}); the rest of it is skipped")


class ParquetWriter:
    """Outputs written to ``stream`` as a Parquet file, a row group per batch."""

    def __init__(self, stream: IO[bytes], schema: dict | None = None):
        from mlflow_preproc.runtime import batch_schema

        self._stream = stream
        self._schema = batch_schema.from_avro(schema) if schema is not None else None
        self._writer = None

    def write_many(self, records: Sequence[Record]) -> list[EncodeError | None]:
        """Write ``records`` as one row group; the error of each that does not fit."""
        import pyarrow as pa

        if not records:
            return []
        errors: list[EncodeError | None] = [None] * len(records)
        try:
            table = pa.Table.from_pylist(list(records), schema=self._schema)
        except (pa.ArrowException, TypeError, ValueError):
            # one or more do not fit: each alone, the others written
            if self._schema is None:  # the columns of the first output that has them
                self._schema = next((t.schema for t in map(_alone, records) if t is not None),
                                    None)
            kept = []
            for i, record in enumerate(records):
                try:
                    pa.Table.from_pylist([record], schema=self._schema)
                    kept.append(record)
                except (pa.ArrowException, TypeError, ValueError) as exc:
                    errors[i] = EncodeError(f"the output record does not fit the Parquet "
                                            f"columns ({type(exc).__name__}: {exc})")
            if not kept:
                return errors
            table = pa.Table.from_pylist(kept, schema=self._schema)
        self._write(table)
        return errors

    def _write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._schema = table.schema  # the first batch's, when no Avro schema gave it
            self._writer = pq.ParquetWriter(self._stream, self._schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is None and self._schema is not None:  # no output: no rows
            import pyarrow as pa

            self._write(pa.Table.from_pylist([], schema=self._schema))
        if self._writer is not None:
            self._writer.close()
        self._stream.flush()


def _alone(record: Record) -> Any:
    import pyarrow as pa

    try:
        return pa.Table.from_pylist([record])
    except (pa.ArrowException, TypeError, ValueError):
        return None

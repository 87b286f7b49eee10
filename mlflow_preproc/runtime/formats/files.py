"""Files and stdin: a file's format sniffed from its name or first bytes, its records read in
that format, output records written as JSON Lines or an Avro container."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import fastavro

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT
from mlflow_preproc.runtime.formats.avro_container import OCF_MAGIC, BlockReader, _avro_file
from mlflow_preproc.runtime.formats.base import FILE_FORMATS, DecodeError, EncodeError, Record
from mlflow_preproc.runtime.formats.json_files import _json_array, _json_lines, _peek_nonspace
from mlflow_preproc.runtime.input_fields import Tree
from mlflow_preproc.runtime.jsonable import dumps

# A file named neither JSON nor Avro whose first bytes are neither either (a .csv, a .txt).
UNKNOWN_FORMAT = "unknown"


def sniff_file_format(path: str | None, head: bytes) -> str:
    """Guess a file's input format from its name, else from its first bytes:
    :data:`UNKNOWN_FORMAT` for a file whose name and first bytes say neither."""
    suffix = Path(path).suffix.lower() if path else ""
    if suffix == ".avro" or head.startswith(OCF_MAGIC):
        return "avro"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    # stdin, a name without a suffix and a .json file are JSON whatever they start with: a
    # bad first line is one reject and the next lines are read. A .csv is one reject, not one
    # "not valid JSON" per line.
    if suffix not in ("", ".json") and head.strip() and head.lstrip()[:1] not in b"{[":
        return UNKNOWN_FORMAT
    return "json"  # reads an object, an array, or JSON Lines alike


def read_records(stream: IO[bytes], fmt: str, where: str,
                 max_decoded_bytes: int = MAX_DECODED_BYTES_DEFAULT,
                 fields: Tree | None = None, columns: BlockReader | None = None
                 ) -> Iterator[Record | DecodeError]:
    """Stream records from a binary file; a bad record yields a :class:`DecodeError`.

    Memory stays constant: JSON is read line by line (an object spread over several lines
    is gathered first), arrays are parsed incrementally (ijson), Avro containers block by
    block, none decoding to more than ``max_decoded_bytes`` (a block over it is one error,
    and the next blocks are read). Damage ends a file with one error, after the records read
    before it. ``fields``: the model's declared input fields, the only ones Avro decodes;
    ``columns``: reads runs of Avro blocks at once (``ColumnReader.blocks``), the blocks it
    leaves decoded here.
    """
    if fmt == "avro":
        yield from _avro_file(stream, where, max_decoded_bytes, fields, columns)
        return
    if fmt == UNKNOWN_FORMAT:
        start = stream.readline(40).rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        yield DecodeError(f"{where} is neither JSON nor Avro (it starts with {start!r}); run "
                          "reads JSON, JSON Lines and Avro container files (--input-format; "
                          "parquet with --engine spark): convert it to one of them")
        return
    if fmt not in FILE_FORMATS:  # avro returned above
        raise ValueError(f"input format {fmt!r} is not supported for files; use json, jsonl "
                         "or avro")
    if fmt == "json" and _peek_nonspace(stream) == b"[":
        yield from _json_array(stream, where)
        return
    yield from _json_lines(stream, where, one_per_line=fmt == "jsonl")


class FileWriter:
    """Writes output records to a binary stream as JSON Lines or an Avro container."""

    def __init__(self, stream: IO[bytes], fmt: str, schema: dict | None = None):
        if fmt not in FILE_FORMATS:
            raise ValueError(f"output format {fmt!r} is not supported for files; use jsonl or avro")
        if fmt == "avro" and schema is None:
            raise ValueError("avro output needs an output schema: pass --output-schema or log "
                             "the model with output_avro_schema=...")
        self._stream = stream
        self._avro = None
        if fmt == "avro":
            self._avro = fastavro.write.Writer(stream, fastavro.parse_schema(schema))

    def write(self, record: Record) -> None:
        if self._avro is None:
            try:
                line = dumps(record)
            except TypeError as exc:
                raise EncodeError(str(exc)) from None
            self._stream.write(line + b"\n")
            return
        try:
            # Encoded on its own first: a record that fails half way would otherwise leave
            # its first fields in the container's block, shifting every record after it.
            fastavro.schemaless_writer(io.BytesIO(), self._avro.schema, record)
        except Exception as exc:
            raise EncodeError(f"the output record does not match the output Avro schema "
                              f"({type(exc).__name__}: {exc})") from None
        self._avro.write(record)

    def close(self) -> None:
        if self._avro is not None:
            self._avro.flush()
        self._stream.flush()

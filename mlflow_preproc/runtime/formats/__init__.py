"""Record formats: bytes in -> records, records -> bytes out. Used by every mode.

Input formats
=============
``json``            one JSON object per Kafka message; in files, one object or an array of them
``jsonl``           files: one JSON object per line (also accepted for ``json`` files)
``avro``            Kafka: an Avro object container (the schema travels in the message, as in
                    the ZTF/Fink alert streams), or else schemaless Avro decoded with the
                    configured schema; files: Avro object container files
``confluent-avro``  Kafka: the Confluent wire format (byte 0, 4-byte schema id, schemaless
                    Avro), schemas fetched from a Schema Registry URL or read from local
                    ``<id>.avsc`` files

Output formats
==============
``json``/``jsonl``  JSON objects (bytes as base64, NaN as null: see :mod:`mlflow_preproc.runtime.jsonable`)
``avro``            Kafka: schemaless Avro with the output schema; files: an object container
``confluent-avro``  Kafka: Confluent wire format, schema registered under ``<topic>-value``

Every decode error is a :class:`DecodeError` whose message names the problem and the fix, so
streams can send the record to the dead-letter topic with that reason.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fastavro
from orjson import loads  # strict and fast; its errors are ValueErrors

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT
from mlflow_preproc.runtime.avro_binary import advance, skip_sized, zigzag
from mlflow_preproc.runtime.avro_codecs import CODECS, inflate
from mlflow_preproc.runtime.avro_bounds import (
    MAX_SCHEMA_TEXT_BYTES,
    ValuesOverBound,
    amplifies,
    max_values,
    value_walker,
    zero_width,
)
from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema
from mlflow_preproc.runtime.dependencies import Misconfigured, Unavailable
from mlflow_preproc.runtime.input_fields import Tree, reader_schema
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.model_input import scoring_records
from mlflow_preproc.secrets import redact_url
from mlflow_preproc.runtime.formats.base import (  # noqa: F401
    Record,
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    DecodeError,
    BlockTooLarge,
    EncodeError,
    drop_fields,
    _without,
)
from mlflow_preproc.runtime.formats.avro_records import (  # noqa: F401
    _RecordReader,
    Skipper,
    _plan_steps,
    _run_schema,
    _by_name,
    _skipper,
    _FIXED_WIDTH,
    _count_skipper,
    _block_skipper,
)
from mlflow_preproc.runtime.formats.avro_container import (  # noqa: F401
    OCF_MAGIC,
    OCF_HEADER_SCHEMA,
    _ContainerReader,
    read_header,
    _HEADER_ROOM,
    _Bounded,
    _next_block,
    _check_consumed,
    _read_long,
    _step_over,
    BlockReader,
    _AHEAD_RECORDS,
    _AHEAD_BYTES,
    _avro_file,
    _decoded_blocks,
    _Start,
    _FILE_READERS,
    _MAX_FILE_READERS,
    _file_reader,
    _damaged,
)
from mlflow_preproc.runtime.formats.schema_registry import (  # noqa: F401
    _SchemaById,
    _registry_client_class,
    _NOT_FOUND,
    _registry_failure,
)
from mlflow_preproc.runtime.formats.messages import (  # noqa: F401
    _CONFLUENT_MAGIC,
    MessageDecoder,
    _json_value,
    _json_object,
    _schemaless,
    MessageEncoder,
)
from mlflow_preproc.runtime.formats.json_files import (  # noqa: F401
    _MAX_SPREAD_BYTES,
    _json_lines,
    _items,
    _never_ends,
    _is_object_line,
    _UNFINISHED,
    _parse,
    _lines,
    _peek_nonspace,
    _json_array,
    _Recording,
    _Replayed,
)

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
    if fmt not in ("json", "jsonl"):
        raise ValueError(f"input format {fmt!r} is not supported for files; use json, jsonl "
                         "or avro")
    if fmt == "json" and _peek_nonspace(stream) == b"[":
        yield from _json_array(stream, where)
        return
    yield from _json_lines(stream, where, one_per_line=fmt == "jsonl")


class FileWriter:
    """Writes output records to a binary stream as JSON Lines or an Avro container."""

    def __init__(self, stream: IO[bytes], fmt: str, schema: dict | None = None):
        if fmt not in ("json", "jsonl", "avro"):
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

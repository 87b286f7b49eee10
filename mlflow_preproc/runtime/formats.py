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
import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fastavro
from orjson import loads  # strict and fast; its errors are ValueErrors

from mlflow_preproc.config import ZTF_CUTOUTS  # noqa: F401 (re-exported)
from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema
from mlflow_preproc.runtime.jsonable import dumps

Record = dict[str, Any]

INPUT_FORMATS = ("json", "jsonl", "avro", "confluent-avro")
OUTPUT_FORMATS = ("json", "jsonl", "avro", "confluent-avro")

_OCF_MAGIC = b"Obj\x01"
_CONFLUENT_MAGIC = 0


class DecodeError(ValueError):
    """Bytes that cannot be read as records in the configured format."""


class EncodeError(ValueError):
    """A record that cannot be written in the configured format."""


# ---- field dropping ----------------------------------------------------------------------

def drop_fields(record: Record, paths: Iterable[str]) -> Record:
    """Remove dotted field paths (``cutoutScience``, ``candidate.pdiffimfilename``) in place.

    Missing fields are ignored: alerts of different schema versions carry different fields.
    """
    for path in paths:
        *parents, leaf = path.split(".")
        node: Any = record
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return record


# ---- Kafka message values ----------------------------------------------------------------

class MessageDecoder:
    """Decodes one Kafka message value into the records it holds (usually one)."""

    def __init__(
        self,
        fmt: str,
        schema: dict | None = None,
        schema_dir: str | None = None,
        registry_url: str | None = None,
        registry_config: dict | None = None,
        any_json: bool = False,
    ):
        """``any_json``: a JSON message may hold any value (a feature vector for a model),
        not only an object (a record to preprocess)."""
        if fmt not in ("json", "avro", "confluent-avro"):
            raise ValueError(f"input format {fmt!r} is not supported for Kafka messages; use "
                             "json, avro or confluent-avro")
        if fmt == "confluent-avro" and not (schema_dir or registry_url):
            raise ValueError("confluent-avro input needs SCHEMA_REGISTRY_URL or "
                             "AVRO_SCHEMA_DIR (a folder of <schema id>.avsc files)")
        self.fmt = fmt
        self.any_json = any_json
        self._schema = fastavro.parse_schema(schema) if schema else None
        self._by_id = _SchemaById(schema_dir, registry_url, registry_config)
        self._containers = _ContainerReader()

    def decode(self, value: bytes | None) -> list[Record]:
        if value is None:
            raise DecodeError("the message has no value (a tombstone); nothing to preprocess")
        if self.fmt == "json":
            return [_json_value(value) if self.any_json else _json_object(value)]
        if self.fmt == "avro":
            if value[:4] == _OCF_MAGIC:
                return self._containers.read(value)
            if self._schema is None:
                raise DecodeError(
                    "the message is schemaless Avro but no schema is configured; set "
                    "AVRO_SCHEMA_PATH or log the model with avro_schema=..."
                )
            return [_schemaless(value, self._schema)]
        if len(value) < 5 or value[0] != _CONFLUENT_MAGIC:
            raise DecodeError("the message is not in the Confluent wire format (magic byte 0 "
                              "and a 4-byte schema id); check INPUT_FORMAT")
        (schema_id,) = struct.unpack(">I", value[1:5])
        return [_schemaless(value[5:], self._by_id.get(schema_id))]


def _json_value(value: bytes) -> Any:
    try:
        return loads(value)
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
        raise DecodeError(f"the message is not valid JSON ({exc}); check INPUT_FORMAT") from None


def _json_object(value: bytes) -> Record:
    try:
        record = loads(value)
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
        raise DecodeError(f"the message is not valid JSON ({exc}); check INPUT_FORMAT") from None
    if not isinstance(record, dict):
        raise DecodeError(f"the message is a JSON {type(record).__name__}, not an object; "
                          "send one JSON object per message")
    return record


def _schemaless(value: bytes, parsed_schema: dict) -> Record:
    buf = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(buf, parsed_schema, None)
    except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError... on bad bytes
        raise DecodeError(f"cannot decode Avro with the configured schema "
                          f"({type(exc).__name__}: {exc}); check the schema") from None
    if buf.tell() != len(value):
        raise DecodeError(f"Avro decoding left {len(value) - buf.tell()} bytes unread: the "
                          "schema does not match the writer's; check the schema")
    return record


class _ContainerReader:
    """Reads Avro object containers sent as single messages, parsing each writer schema once.

    Alert streams (ZTF, Fink) send every alert as a whole container: a header carrying the
    ~20 kB schema, then one block. ``fastavro.reader`` parses that schema for every message,
    a third of the decode time of a ZTF alert; here parsed schemas are kept by their text.
    Codecs other than null and deflate go through ``fastavro.reader``.
    """

    _HEADER = fastavro.parse_schema({
        "type": "record", "name": "org.apache.avro.file.Header", "fields": [
            {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
            {"name": "meta", "type": {"type": "map", "values": "bytes"}},
            {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}}]})
    _LONG = fastavro.parse_schema("long")
    _MAX_SCHEMAS = 64

    def __init__(self) -> None:
        self._schemas: dict[bytes, dict] = {}

    def read(self, value: bytes) -> list[Record]:
        try:
            return self._read(value)
        except DecodeError:
            raise
        except Exception as exc:  # truncated or corrupt bytes fail anywhere inside fastavro
            raise DecodeError(f"corrupt Avro container ({type(exc).__name__}: {exc})") from None

    def _read(self, value: bytes) -> list[Record]:
        buf = io.BytesIO(value)
        header = fastavro.schemaless_reader(buf, self._HEADER, None)
        codec = header["meta"].get("avro.codec", b"null")
        if codec not in (b"null", b"deflate"):
            return list(fastavro.reader(io.BytesIO(value)))
        schema = self._schema(header["meta"]["avro.schema"])
        records: list[Record] = []
        while buf.tell() < len(value):
            count = fastavro.schemaless_reader(buf, self._LONG, None)
            size = fastavro.schemaless_reader(buf, self._LONG, None)
            data = buf.read(size)
            if codec == b"deflate":
                data = zlib.decompress(data, -15)  # raw deflate, as the Avro spec says
            block = io.BytesIO(data)
            records.extend(fastavro.schemaless_reader(block, schema, None) for _ in range(count))
            if buf.read(16) != header["sync"]:
                raise DecodeError("corrupt Avro container (a block does not end with the "
                                  "file's sync marker)")
        return records

    def _schema(self, text: bytes) -> dict:
        schema = self._schemas.get(text)
        if schema is None:
            if len(self._schemas) >= self._MAX_SCHEMAS:
                self._schemas.clear()
            schema = self._schemas[text] = fastavro.parse_schema(json.loads(text))
        return schema


class _SchemaById:
    """Schemas of the Confluent wire format: local ``<id>.avsc`` files, else the registry."""

    def __init__(self, schema_dir: str | None, registry_url: str | None,
                 registry_config: dict | None):
        self._dir = Path(schema_dir) if schema_dir else None
        self._registry_url = registry_url
        self._registry_config = registry_config or {}
        self._client = None
        self._cache: dict[int, dict] = {}

    def get(self, schema_id: int) -> dict:
        if schema_id not in self._cache:
            schema = self._fetch(schema_id)
            try:
                self._cache[schema_id] = fastavro.parse_schema(schema)
            except Exception as exc:  # noqa: BLE001 -- fastavro's schema errors have no base
                raise DecodeError(f"schema id {schema_id} cannot be used "
                                  f"({type(exc).__name__}: {exc}); define every named type it "
                                  "uses in it, or put the defining .avsc files beside it"
                                  ) from None
        return self._cache[schema_id]

    def _fetch(self, schema_id: int) -> dict:
        if self._dir and (self._dir / f"{schema_id}.avsc").is_file():
            try:
                return load_avro_schema(self._dir / f"{schema_id}.avsc")
            except SchemaError as exc:
                raise DecodeError(f"schema id {schema_id}: {exc}") from None
        if not self._registry_url:
            raise DecodeError(f"no schema with id {schema_id}: add {schema_id}.avsc to "
                              f"{self._dir} or set SCHEMA_REGISTRY_URL")
        try:
            return json.loads(self._registry().get_schema(schema_id).schema_str)
        except Exception as exc:
            raise DecodeError(f"schema id {schema_id} not found in the registry at "
                              f"{self._registry_url} ({exc})") from None

    def _registry(self):
        if self._client is None:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            self._client = SchemaRegistryClient({"url": self._registry_url,
                                                 **self._registry_config})
        return self._client


class MessageEncoder:
    """Encodes one output record as a Kafka message value."""

    def __init__(self, fmt: str, schema: dict | None = None, registry_url: str | None = None,
                 registry_config: dict | None = None, topic: str | None = None):
        if fmt == "jsonl":
            fmt = "json"
        if fmt not in ("json", "avro", "confluent-avro"):
            raise ValueError(f"output format {fmt!r} is not supported; use json, avro or "
                             "confluent-avro")
        if fmt != "json" and schema is None:
            raise ValueError(f"{fmt} output needs an output schema: set OUTPUT_AVRO_SCHEMA_PATH "
                             "or log the model with output_avro_schema=...")
        if fmt == "confluent-avro" and not registry_url:
            raise ValueError("confluent-avro output needs SCHEMA_REGISTRY_URL")
        self.fmt = fmt
        self._schema = fastavro.parse_schema(schema) if schema else None
        self._prefix = b""
        if fmt == "confluent-avro":
            from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

            client = SchemaRegistryClient({"url": registry_url, **(registry_config or {})})
            schema_id = client.register_schema(f"{topic}-value", Schema(json.dumps(schema), "AVRO"))
            self._prefix = struct.pack(">bI", _CONFLUENT_MAGIC, schema_id)

    def encode(self, record: Record) -> bytes:
        if self.fmt == "json":
            try:
                return dumps(record)
            except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
                raise EncodeError(str(exc)) from None
        buf = io.BytesIO()
        buf.write(self._prefix)
        try:
            fastavro.schemaless_writer(buf, self._schema, record)
        except Exception as exc:
            raise EncodeError(f"the output record does not match the output Avro schema "
                              f"({type(exc).__name__}: {exc}); fix pre_processing or the schema"
                              ) from None
        return buf.getvalue()


# ---- files and stdin ---------------------------------------------------------------------

def sniff_file_format(path: str | None, head: bytes) -> str:
    """Guess a file's input format from its name, else from its first bytes."""
    suffix = Path(path).suffix.lower() if path else ""
    if suffix == ".avro" or head.startswith(_OCF_MAGIC):
        return "avro"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return "json"  # reads an object, an array, or JSON Lines alike


def read_records(stream: IO[bytes], fmt: str, where: str) -> Iterator[Record | DecodeError]:
    """Stream records from a binary file; a bad record yields a :class:`DecodeError`.

    Memory stays constant: JSON is read line by line (an object spread over several lines
    is gathered first), arrays are parsed incrementally (ijson), Avro containers block by
    block. Damage ends a file with one error, after the records read before it.
    """
    if fmt == "avro":
        yield from _avro_file(stream, where)
        return
    if fmt not in ("json", "jsonl"):
        raise ValueError(f"input format {fmt!r} is not supported for files; use json, jsonl "
                         "or avro")
    if fmt == "json" and _peek_nonspace(stream) == b"[":
        yield from _json_array(stream, where)
        return
    yield from _json_lines(stream, where)


def _avro_file(stream: IO[bytes], where: str) -> Iterator[Record | DecodeError]:
    try:
        reader = fastavro.reader(stream)
    except Exception as exc:  # noqa: BLE001 -- fastavro raises many types on a bad header
        yield DecodeError(f"{where} is not an Avro object container file ({exc})")
        return
    count = 0
    try:
        for record in reader:
            yield record
            count += 1
    except Exception as exc:  # noqa: BLE001 -- truncated/corrupt blocks: EOFError, IndexError,
        # zlib.error, ValueError... whatever the bytes make fastavro do
        yield DecodeError(f"{where} is damaged after record {count} ({type(exc).__name__}: "
                          f"{exc}); the rest of the file is skipped")


# A JSON value spread over lines is gathered up to this size; past it, it is a bad record.
_MAX_SPREAD_BYTES = 64 * 1024 * 1024


def _json_lines(stream: IO[bytes], where: str) -> Iterator[Record | DecodeError]:
    """JSON Lines, where a line that is not valid JSON is one bad record, whatever its place.

    A line that is the unfinished start of a JSON value (``{`` of a pretty-printed object)
    is joined with the next ones until the value is complete. When a later line cannot
    continue it, the unfinished lines are one bad record and that line is read on its own,
    so a truncated line never takes a good one with it.
    """
    pending, first = b"", 0
    for line_no, line in enumerate(stream, 1):
        if not pending:
            if not line.strip():
                continue
            first = line_no
        value, error = _parse(pending + line)
        if error is _UNFINISHED and len(pending) + len(line) < _MAX_SPREAD_BYTES:
            pending += line
            continue
        if error is not None and pending:
            yield DecodeError(f"{where} {_lines(first, line_no - 1)} hold a JSON value that "
                              "never ends")
            pending, first = b"", line_no
            value, error = _parse(line)
            if error is _UNFINISHED:
                pending = line
                continue
        pending = b""
        if error is not None:
            reason = "a JSON value that never ends" if error is _UNFINISHED else error
            yield DecodeError(f"{where} {_lines(first, line_no)} is not valid JSON ({reason})")
        elif isinstance(value, dict):
            yield value
        else:
            yield DecodeError(f"{where} {_lines(first, line_no)} is a JSON "
                              f"{type(value).__name__}, not an object")
    if pending:
        yield DecodeError(f"{where} ends inside a JSON value started on line {first}")


_UNFINISHED = "unfinished"


def _parse(text: bytes) -> tuple[Any, str | None]:
    try:
        return loads(text), None
    except ValueError as exc:  # orjson.JSONDecodeError
        if getattr(exc, "pos", -1) >= len(text.rstrip()):
            return None, _UNFINISHED  # valid so far: the value goes on in the next line
        return None, str(exc)


def _lines(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _peek_nonspace(stream: IO[bytes]) -> bytes:
    peek = getattr(stream, "peek", None)
    head = peek(64) if peek else b""
    return head.lstrip()[:1]


def _json_array(stream: IO[bytes], where: str) -> Iterator[Record | DecodeError]:
    import ijson

    index = -1
    try:
        for index, item in enumerate(ijson.items(stream, "item", use_float=True)):
            if isinstance(item, dict):
                yield item
            else:
                yield DecodeError(f"{where} item {index} is a JSON {type(item).__name__}, "
                                  "not an object")
    except ijson.JSONError as exc:
        yield DecodeError(f"{where} is not valid JSON after item {index} ({exc}); the rest of "
                          "the file is skipped")


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
            self._avro.write(record)
        except Exception as exc:
            raise EncodeError(f"the output record does not match the output Avro schema "
                              f"({type(exc).__name__}: {exc})") from None

    def close(self) -> None:
        if self._avro is not None:
            self._avro.flush()
        self._stream.flush()

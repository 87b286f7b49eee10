"""Kafka message values to records (:class:`MessageDecoder`) and records to message values
(:class:`MessageEncoder`): JSON, Avro containers or schemaless Avro, the Confluent wire
format."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Collection
from typing import Any

import fastavro
from orjson import loads  # strict and fast; its errors are ValueErrors

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT, MESSAGE_FORMATS
from mlflow_preproc.runtime.formats.avro_container import OCF_MAGIC, _ContainerReader
from mlflow_preproc.runtime.formats.avro_records import _RecordReader
from mlflow_preproc.runtime.formats.base import DecodeError, EncodeError, Record, _without
from mlflow_preproc.runtime.formats.schema_registry import _SchemaById
from mlflow_preproc.runtime.input_fields import Tree
from mlflow_preproc.runtime.jsonable import dumps

_CONFLUENT_MAGIC = 0


class MessageDecoder:
    """Decodes one Kafka message value into the records it holds (usually one).

    ``skip`` names top-level fields left out of every record. Avro input never decodes them:
    their bytes are stepped over (see :class:`_RecordReader`). Nested paths are not skipped
    here; :func:`drop_fields` removes those after decoding.
    """

    def __init__(
        self,
        fmt: str,
        schema: dict | None = None,
        schema_dir: str | None = None,
        registry_url: str | None = None,
        registry_config: dict | None = None,
        skip: Collection[str] = (),
        any_json: bool = False,
        max_decoded_bytes: int = MAX_DECODED_BYTES_DEFAULT,
        fields: Tree | None = None,
    ):
        """``skip``: top-level fields left out of the records (not decoded, for Avro);
        ``any_json``: a JSON message may hold any value (a feature vector for a model), not
        only an object (a record to preprocess); ``max_decoded_bytes``: what the blocks of
        an Avro container message may decode to (MAX_DECODED_BYTES); ``fields``: the model's
        declared input fields (:mod:`~mlflow_preproc.runtime.input_fields`), the only ones an
        Avro decoder reads."""
        if fmt not in MESSAGE_FORMATS:
            raise ValueError(f"input format {fmt!r} is not supported for Kafka messages; use "
                             "json, avro or confluent-avro")
        if fmt == "confluent-avro" and not (schema_dir or registry_url):
            raise ValueError("confluent-avro input needs SCHEMA_REGISTRY_URL or "
                             "AVRO_SCHEMA_DIR (a folder of <schema id>.avsc files)")
        self.fmt = fmt
        self.any_json = any_json
        self._skip = frozenset(name for name in skip if "." not in name)
        self.fields = fields
        self._limit = max_decoded_bytes
        self._reader = _RecordReader(schema, self._skip, fields, max_decoded_bytes) \
            if schema else None
        self._by_id = _SchemaById(schema_dir, registry_url, registry_config)
        self._readers_by_id: dict[int, _RecordReader] = {}
        self._containers = _ContainerReader(self._skip, max_decoded_bytes, fields)

    def decode(self, value: bytes | None) -> list[Record]:
        if value is None:
            raise DecodeError("the message has no value (a tombstone); nothing to preprocess")
        if self.fmt == "json":
            if self.any_json:
                return [_json_value(value)]
            record = _json_object(value)
            # A call per record costs ~3% of the stream's time on 1 KB records: only if needed.
            return [_without(record, self._skip) if self._skip else record]
        if self.fmt == "avro":
            if value[:4] == OCF_MAGIC:
                return self._containers.read(value)
            if self._reader is None:
                raise DecodeError(
                    "the message is schemaless Avro but no schema is configured; set "
                    "AVRO_SCHEMA_PATH or log the model with avro_schema=..."
                )
            return [_schemaless(value, self._reader)]
        if len(value) < 5 or value[0] != _CONFLUENT_MAGIC:
            raise DecodeError("the message is not in the Confluent wire format (magic byte 0 "
                              "and a 4-byte schema id); check INPUT_FORMAT")
        (schema_id,) = struct.unpack(">I", value[1:5])
        reader = self._readers_by_id.get(schema_id)
        if reader is None:
            reader = self._readers_by_id[schema_id] = _RecordReader(
                self._by_id.get(schema_id), self._skip, self.fields, self._limit)
        return [_schemaless(value[5:], reader)]

    def writer_schema(self, schema_id: int) -> dict:
        """The writer schema (parsed) of a Confluent schema id, from ``AVRO_SCHEMA_DIR`` or
        the registry; raises as :meth:`decode` does (``Unavailable`` while the registry is
        down, ``DecodeError`` for an id it does not know)."""
        return self._by_id.get(schema_id)


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


def _schemaless(value: bytes, reader: _RecordReader) -> Record:
    buf = io.BytesIO(value)
    try:
        record = reader.read(value, buf)
    except DecodeError:
        raise
    except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError... on bad bytes
        raise DecodeError(f"cannot decode Avro with the configured schema "
                          f"({type(exc).__name__}: {exc}); check the schema") from None
    if buf.tell() != len(value):
        raise DecodeError(f"Avro decoding left {len(value) - buf.tell()} bytes unread: the "
                          "schema does not match the writer's; check the schema")
    return record



class MessageEncoder:
    """Encodes one output record as a Kafka message value.

    ``confluent-avro`` registers the output schema under ``<topic>-value`` on first use
    (:meth:`prepare`), not when the encoder is made: a registry that is down at start-up
    is waited for like the input side's, not a fatal error."""

    def __init__(self, fmt: str, schema: dict | None = None, registry_url: str | None = None,
                 registry_config: dict | None = None, topic: str | None = None):
        if fmt == "jsonl":
            fmt = "json"
        if fmt not in MESSAGE_FORMATS:
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
        self._registration = None
        if fmt == "confluent-avro":
            self._registration = (_SchemaById(None, registry_url, registry_config),
                                  f"{topic}-value", json.dumps(schema))

    @property
    def prepared(self) -> bool:
        """Whether :meth:`encode` can run (the output schema is registered, if it must be)."""
        return self._registration is None

    def prepare(self) -> None:
        """Register the output schema: raises
        :class:`~mlflow_preproc.runtime.dependencies.Unavailable` while the registry does not
        answer, :class:`~mlflow_preproc.runtime.dependencies.Misconfigured` if it refuses
        this client or the schema (the stream waits for the one, stops on the other)."""
        if self._registration is None:
            return
        registry, subject, text = self._registration
        from confluent_kafka.schema_registry import Schema

        schema_id = registry.ask_register(subject, Schema(text, "AVRO"))
        self._prefix = struct.pack(">bI", _CONFLUENT_MAGIC, schema_id)
        self._registration = None

    def encode(self, record: Record) -> bytes:
        if self._registration is not None:
            self.prepare()
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

"""One Avro record of a writer schema: read by fastavro (whole, in runs of kept fields, or
projected on the declared fields), its skipped fields stepped over by a skipper."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Collection
from typing import Any

import fastavro

from mlflow_preproc.config import MAX_DECODED_BYTES_DEFAULT
from mlflow_preproc.runtime.avro_binary import advance, skip_sized, zigzag
from mlflow_preproc.runtime.avro_bounds import (
    ValuesOverBound,
    amplifies,
    max_values,
    value_walker,
    zero_width,
)
from mlflow_preproc.runtime.formats.base import DecodeError, Record
from mlflow_preproc.runtime.input_fields import Tree, reader_schema

class _RecordReader:
    """Decodes records of one writer schema, stepping over the bytes of skipped fields.

    Skipped fields are never decoded: the three image cutouts of a ZTF alert (~40 of its
    70 kB) are stepped over, not copied out and then dropped. (That saves little time:
    fastavro copies a 13 kB bytes field in ~2 us, and nearly all of an alert's decode time
    goes to the ~3,000 small fields of ``candidate`` and ``prv_candidates``.) fastavro's own
    way, a reader schema without the fields, resolves every field of the alert against it
    and decodes twice as slowly as reading everything. Instead the writer's top-level fields
    are cut into runs: each run of kept fields is decoded by fastavro as one record of just
    those fields (Avro writes a record's fields back to back, so that reads exactly their
    bytes), and each run of skipped fields is stepped over by a :func:`_skipper`, which
    reads only lengths and union indexes. A skipped string is not checked to be UTF-8.
    """

    def __init__(self, writer_schema: dict | list | str, skip: Collection[str] = (),
                 fields: Tree | None = None,
                 max_decoded_bytes: int = MAX_DECODED_BYTES_DEFAULT):
        """``writer_schema`` as JSON, or as ``fastavro.parse_schema`` returned it; with
        declared ``fields`` only those are read (Avro schema resolution against a reader
        schema of just them, done by fastavro's compiled reader, which steps over the rest:
        measured in benchmarks/avro_decoders.py). ``max_decoded_bytes`` bounds the values a
        record may decode to, for a schema whose counts the bytes do not bound
        (:mod:`~mlflow_preproc.runtime.avro_bounds`)."""
        self.schema = fastavro.parse_schema(writer_schema)  # returns a parsed one as it is
        self._projection = None
        self._steps = None
        named = self.schema.get("__named_schemas", {}) if isinstance(self.schema, dict) else {}
        self._walk = value_walker(self.schema, named) if amplifies(self.schema, named) else None
        self._max_values = max_values(max_decoded_bytes)
        if fields is not None and isinstance(self.schema, dict) and \
                self.schema.get("type") == "record":
            kept = {name: sub for name, sub in fields.items() if name not in skip}
            self._projection = fastavro.parse_schema(reader_schema(writer_schema, kept))
            return
        self._steps = _plan_steps(self.schema, frozenset(skip), named)

    def read(self, data: bytes, buf: io.BytesIO) -> Record:
        """The next record of ``buf``, a stream over ``data`` positioned at it."""
        if self._walk is not None:  # counts the bytes do not bound: checked before decoding
            try:
                self._walk(data, buf.tell(), self._max_values)
            except ValuesOverBound as exc:
                raise DecodeError(str(exc)) from None
        if self._steps is None:
            return fastavro.schemaless_reader(buf, self.schema, self._projection)
        record: Record = {}
        for kept, skip in self._steps:
            if kept is not None:
                record.update(fastavro.schemaless_reader(buf, kept, None))
            else:
                buf.seek(skip(data, buf.tell()))
        return record


Skipper = Callable[[bytes, int], int]  # (data, position of a value) -> position after it


def _plan_steps(schema: Any, skip: frozenset[str], named: dict[str, Any]
                ) -> list[tuple[dict | None, Skipper | None]] | None:
    """``(run schema, None)`` and ``(None, skipper)`` steps in the writer's field order, or
    None when the schema has none of the skipped fields (it is then decoded whole)."""
    if not (isinstance(schema, dict) and schema.get("type") == "record"
            and skip & {f["name"] for f in schema["fields"]}):
        return None
    steps: list[tuple[dict | None, Skipper | None]] = []
    for is_skipped, fields in itertools.groupby(schema["fields"], lambda f: f["name"] in skip):
        fields = list(fields)
        if is_skipped:
            steps.append((None, _skipper({"type": "record", "fields": fields}, named)))
        else:
            steps.append((_run_schema(fields, len(steps), named), None))
    return steps


def _run_schema(fields: list[dict], index: int, named: dict[str, Any]) -> dict:
    """A record of just ``fields``. Named types are referred to by their full names: the
    whole writer schema defined them, possibly in a field this run does not include. The
    record's own name has no namespace, so that names without one still resolve as in the
    writer's schema."""
    return fastavro.parse_schema(
        {"type": "record", "name": f"mlflow_preproc_kept_fields_{index}",
         "fields": [{"name": f["name"], "type": _by_name(f["type"])} for f in fields]},
        named_schemas=dict(named))


def _by_name(schema: Any) -> Any:
    """``schema`` with each named type's definition replaced by its (full) name."""
    if isinstance(schema, list):
        return [_by_name(branch) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    kind = schema["type"]
    if kind in ("record", "error", "enum", "fixed"):
        return schema["name"]
    if kind == "array":
        return {**schema, "items": _by_name(schema["items"])}
    if kind == "map":
        return {**schema, "values": _by_name(schema["values"])}
    return schema


def _skipper(schema: Any, named: dict[str, Any]) -> Skipper:
    """A function stepping over one value of ``schema`` without decoding it.

    Truncated data raises the EOFError fastavro raises when it reads the same bytes
    (``Expected N bytes, read M``), a bad union index fastavro's IndexError.
    """
    if isinstance(schema, list):
        branches = [_skipper(branch, named) for branch in schema]

        def skip_union(data: bytes, pos: int) -> int:
            index, pos = zigzag(data, pos)
            return branches[index](data, pos)
        return skip_union
    kind = schema if isinstance(schema, str) else schema["type"]
    if kind in _FIXED_WIDTH or kind == "fixed":
        width = schema["size"] if kind == "fixed" else _FIXED_WIDTH[kind]
        return lambda data, pos: advance(data, pos, width)
    if kind in ("int", "long", "enum"):
        return lambda data, pos: zigzag(data, pos)[1]
    if kind in ("string", "bytes"):
        return skip_sized
    if kind in ("record", "error"):
        fields = [_skipper(field["type"], named) for field in schema["fields"]]

        def skip_record(data: bytes, pos: int) -> int:
            for skip in fields:
                pos = skip(data, pos)
            return pos
        return skip_record
    if kind == "array":
        if zero_width(schema["items"], named):
            return _count_skipper  # 2^62 nulls are stepped over, not looped over
        return _block_skipper([_skipper(schema["items"], named)])
    if kind == "map":
        return _block_skipper([skip_sized, _skipper(schema["values"], named)])
    if isinstance(schema, dict):  # a primitive with a logical type: {"type": "long", ...}
        return _skipper(kind, named)
    # A named type, by name: resolved on first use, as a recursive type refers to itself.
    resolved: list[Skipper] = []

    def skip_named(data: bytes, pos: int) -> int:
        if not resolved:
            resolved.append(_skipper(named[kind], named))
        return resolved[0](data, pos)
    return skip_named


_FIXED_WIDTH = {"null": 0, "boolean": 1, "float": 4, "double": 8}


def _count_skipper(data: bytes, pos: int) -> int:
    """An array of items that take no bytes: only its block counts."""
    while True:
        count, pos = zigzag(data, pos)
        if count == 0:
            return pos
        if count < 0:
            size, pos = zigzag(data, pos)
            pos = advance(data, pos, size)


def _block_skipper(item: list[Skipper]) -> Skipper:
    """Arrays and maps: blocks of items (map entries: key, value), ending with an empty
    block. A writer may put a block's size in bytes before it (a negative count), which lets
    the whole block be jumped."""
    def skip_blocks(data: bytes, pos: int) -> int:
        while True:
            count, pos = zigzag(data, pos)
            if count == 0:
                return pos
            if count < 0:
                size, pos = zigzag(data, pos)
                pos = advance(data, pos, size)
                continue
            for _ in range(count):
                for skip in item:
                    pos = skip(data, pos)
    return skip_blocks

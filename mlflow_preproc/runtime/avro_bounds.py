"""Bounds on what the bytes of one Avro record may make a decoder build.

fastavro and polars-avro believe a record's counts: an array whose block says 2^62 items is
read item by item. Where each item takes at least a byte, the bytes of the message bound the
count; where an item takes no bytes at all (``null``, a record of nulls, ``fixed`` of size
0), nothing does: a 216-byte message asked for 2^62 nulls, grew a stream to 2.9 GB and would
have been OOM-killed in a pod, then read again from the same offset, for ever. The same holds,
more slowly, for items that take a byte but decode to many values (a record of a hundred
nulls and an int).

So each writer schema is looked at once (:func:`amplifies`). A schema whose collections all
hold items of at least one byte per :data:`MAX_VALUES_PER_BYTE` values (the ZTF and Rubin alert
schemas, and nearly every schema in use) is decoded as it is: its records cannot decode to more
than that many values per byte. For any other schema, each record is first walked without
building anything (:func:`value_walker`), counting the values it would decode to, zero-width
items counted without a loop; past ``max_values`` (``MAX_DECODED_BYTES`` / 8: a value costs at
least a pointer) the record is refused by :class:`ValuesOverBound`, before any is built.

The schema text of a container header is bounded too (:data:`MAX_SCHEMA_TEXT_BYTES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlflow_preproc.runtime.avro_binary import advance, skip_sized, zigzag

# The ZTF alert schema is ~20 kB of text and Rubin's lsst.v11 ~60 kB; a header whose schema
# claims more is damaged (or not an alert stream), and parsing it is not bounded by anything.
MAX_SCHEMA_TEXT_BYTES = 1 << 20
# Items that decode to more values than this per byte they take are walked before decoding.
MAX_VALUES_PER_BYTE = 16
# A decoded value costs at least a pointer in its list or dict.
BYTES_PER_VALUE = 8

_WIDTH = {"null": 0, "boolean": 1, "int": 1, "long": 1, "float": 4, "double": 8,
          "bytes": 1, "string": 1, "enum": 1}


def max_values(max_decoded_bytes: int) -> int:
    """The values one record may decode to under ``MAX_DECODED_BYTES``."""
    return max(1, max_decoded_bytes // BYTES_PER_VALUE)


class _Shape:
    """The smallest encoding of each type of one schema, and the values it decodes to."""

    def __init__(self, named: dict[str, Any]):
        self.named = named
        self._memo: dict[str, tuple[int, int]] = {}

    def of(self, schema: Any) -> tuple[int, int]:
        """(bytes of its smallest encoding, values it decodes to then)."""
        if isinstance(schema, list):  # a union: its index, then the smallest branch
            widths = [self.of(branch) for branch in schema] or [(0, 1)]
            width, values = min(widths)
            return width + 1, values
        kind = schema if isinstance(schema, str) else schema.get("type")
        if isinstance(kind, (dict, list)):
            return self.of(kind)
        if kind in _WIDTH:
            return _WIDTH[kind], 1
        if kind == "fixed":
            return schema["size"], 1
        if kind in ("array", "map"):
            return 1, 1  # the closing count 0: an empty collection
        if kind in ("record", "error"):
            width = values = 0
            for f in schema["fields"]:
                w, v = self.of(f["type"])
                width += w
                values += v
            return width, values + 1
        # A named type, by name. A recursive type reads as zero-width while it is being
        # looked at, so its collections are walked: safe, only slower.
        if kind not in self._memo:
            self._memo[kind] = (0, 1)
            self._memo[kind] = self.of(self.named[kind])
        return self._memo[kind]

    def amplifying(self, items: Any) -> bool:
        width, values = self.of(items)
        return width == 0 or values > MAX_VALUES_PER_BYTE * width


def zero_width(schema: Any, named: dict[str, Any]) -> bool:
    """Whether a value of ``schema`` can take no bytes at all."""
    return _Shape(named).of(schema)[0] == 0


def amplifies(schema: Any, named: dict[str, Any]) -> bool:
    """Whether a collection of ``schema`` holds items that take no bytes, or decode to more
    than :data:`MAX_VALUES_PER_BYTE` values per byte (``named``: the schema's named types, as
    ``fastavro.parse_schema`` lists them)."""
    shape = _Shape(named)
    seen: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, list):
            return any(visit(branch) for branch in node)
        if isinstance(node, str):
            if node in named and node not in seen:
                seen.add(node)
                return visit(named[node])
            return False
        kind = node.get("type")
        if isinstance(kind, (dict, list)):
            return visit(kind)
        if kind == "array":
            return shape.amplifying(node["items"]) or visit(node["items"])
        if kind == "map":
            return shape.amplifying(node["values"]) or visit(node["values"])
        if kind in ("record", "error"):
            if node.get("name"):
                seen.add(node["name"])
            return any(visit(f["type"]) for f in node["fields"])
        return False

    return visit(schema)


class ValuesOverBound(ValueError):
    """A record whose counts say it decodes to more values than its bound."""

    def __init__(self, limit: int):
        super().__init__(
            f"the record's item counts say it decodes to more than {limit} values "
            f"(MAX_DECODED_BYTES / {BYTES_PER_VALUE}); refused before decoding. Raise "
            "MAX_DECODED_BYTES if records this large are expected and the memory limit allows")
        self.limit = limit


Walker = Callable[[bytes, int, list[int]], int]  # (data, pos, [values left]) -> pos after


def value_walker(schema: Any, named: dict[str, Any]) -> Callable[[bytes, int, int], int]:
    """A function ``(data, pos, limit) -> pos after the record`` that walks one record of
    ``schema`` at ``pos`` without building it and raises :class:`ValuesOverBound` once it
    would decode to more than ``limit`` values; truncated data raises EOFError."""
    shape = _Shape(named)
    walk = _walker(schema, named, shape)

    def walk_record(data: bytes, pos: int, limit: int) -> int:
        try:
            return walk(data, pos, [limit])
        except _Over:
            raise ValuesOverBound(limit) from None
    return walk_record


def _spend(left: list[int], values: int) -> None:
    left[0] -= values
    if left[0] < 0:
        raise _Over()


class _Over(Exception):
    pass


def _walker(schema: Any, named: dict[str, Any], shape: _Shape) -> Walker:
    if isinstance(schema, list):
        branches = [_walker(branch, named, shape) for branch in schema]

        def walk_union(data: bytes, pos: int, left: list[int]) -> int:
            index, pos = zigzag(data, pos)
            if not 0 <= index < len(branches):
                raise IndexError(f"union index {index} out of range")
            return branches[index](data, pos, left)
        return walk_union
    kind = schema if isinstance(schema, str) else schema["type"]
    if isinstance(kind, (dict, list)):
        return _walker(kind, named, shape)
    if kind in ("null", "boolean", "float", "double", "fixed"):
        width = schema["size"] if kind == "fixed" else _WIDTH[kind]

        def walk_fixed(data: bytes, pos: int, left: list[int]) -> int:
            _spend(left, 1)
            return advance(data, pos, width)
        return walk_fixed
    if kind in ("int", "long", "enum"):
        def walk_varint(data: bytes, pos: int, left: list[int]) -> int:
            _spend(left, 1)
            return zigzag(data, pos)[1]
        return walk_varint
    if kind in ("string", "bytes"):
        def walk_sized(data: bytes, pos: int, left: list[int]) -> int:
            _spend(left, 1)
            return skip_sized(data, pos)
        return walk_sized
    if kind in ("record", "error"):
        fields = [_walker(f["type"], named, shape) for f in schema["fields"]]

        def walk_fields(data: bytes, pos: int, left: list[int]) -> int:
            _spend(left, 1)
            for walk in fields:
                pos = walk(data, pos, left)
            return pos
        return walk_fields
    if kind in ("array", "map"):
        items = schema["items"] if kind == "array" else schema["values"]
        item = _walker(items, named, shape)
        width, values = shape.of(items)
        key = skip_sized if kind == "map" else None

        def walk_blocks(data: bytes, pos: int, left: list[int]) -> int:
            _spend(left, 1)
            while True:
                count, pos = zigzag(data, pos)
                if count == 0:
                    return pos
                if count < 0:  # a block with its size in bytes first
                    count = -count
                    _, pos = zigzag(data, pos)
                if width == 0 and key is None:
                    # Items of no bytes: counted, not looped over (2^62 of them is a bound
                    # exceeded at once, not a loop)
                    _spend(left, count * values)
                    continue
                for _ in range(count):
                    if key is not None:
                        pos = key(data, pos)
                        _spend(left, 1)
                    pos = item(data, pos, left)
        return walk_blocks
    resolved: list[Walker] = []  # a named type, by name: resolved on first use

    def walk_named(data: bytes, pos: int, left: list[int]) -> int:
        if not resolved:
            resolved.append(_walker(named[kind], named, shape))
        return resolved[0](data, pos, left)
    return walk_named

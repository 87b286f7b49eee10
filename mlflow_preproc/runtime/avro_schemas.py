"""Load Avro schemas given as a dict, a JSON string or an ``.avsc`` path.

Real schemas are often split over several files that name each other (the ZTF ``alert.avsc``
refers to ``ztf.alert.candidate``, defined in ``candidate.avsc``). fastavro's own loader
expects each file to be named after the full type name; ours reads every ``.avsc`` beside the
main file and inlines the named types, so the stored schema is one self-contained document.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fastavro

Schema = dict[str, Any]


class SchemaError(ValueError):
    """An Avro schema cannot be read; the message says which and how to fix it."""


def load_avro_schema(source: str | os.PathLike | Schema) -> Schema:
    """Return ``source`` as one self-contained Avro schema (named types inlined)."""
    if isinstance(source, dict):
        schema, siblings = source, {}
    elif isinstance(source, str) and source.lstrip().startswith("{"):
        schema, siblings = _parse_json(source, "the schema string"), {}
    else:
        path = Path(source)
        if not path.is_file():
            raise SchemaError(f"Avro schema file '{path}' does not exist; pass an .avsc path")
        schema = _parse_json(path.read_text(encoding="utf-8"), str(path))
        siblings = _named_schemas_in(path.parent, exclude=path)
    expanded = _inline(schema, siblings, defined=set(), namespace=schema.get("namespace"))
    try:
        fastavro.parse_schema(expanded)
    except Exception as exc:  # fastavro raises several unrelated types for bad schemas
        raise SchemaError(f"invalid Avro schema: {exc}; fix the schema document") from None
    return expanded


def _parse_json(text: str, where: str) -> Schema:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{where} is not valid JSON ({exc}); an Avro schema is JSON") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} is not an Avro record schema (a JSON object)")
    return schema


def _fullname(schema: Schema, namespace: str | None) -> str:
    name = schema["name"]
    ns = schema.get("namespace", namespace)
    return name if "." in name or not ns else f"{ns}.{name}"


def _named_schemas_in(folder: Path, exclude: Path) -> dict[str, Schema]:
    named: dict[str, Schema] = {}
    for other in sorted(folder.glob("*.avsc")):
        if other.resolve() == exclude.resolve():
            continue
        try:
            doc = json.loads(other.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # an unrelated or broken file beside ours only matters if referenced
        if isinstance(doc, dict) and "name" in doc:
            named[_fullname(doc, None)] = doc
    return named


_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _inline(node: Any, named: dict[str, Schema], defined: set[str], namespace: str | None) -> Any:
    # Avro allows a named type to be defined once and referenced by name afterwards, so only
    # the first reference to a sibling type is replaced by its definition.
    if isinstance(node, str):
        if node in _PRIMITIVES:
            return node
        full = node if "." in node or not namespace else f"{namespace}.{node}"
        for candidate in (full, node):
            if candidate in named and candidate not in defined:
                return _inline(named[candidate], named, defined, namespace)
        return node
    if isinstance(node, list):
        return [_inline(n, named, defined, namespace) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if node.get("type") in ("record", "error", "enum", "fixed") and "name" in node:
        defined.add(_fullname(node, namespace))
        namespace = node.get("namespace", namespace)
    if "fields" in node:
        # A field without a type is left for fastavro to report.
        out["fields"] = [
            {**f, "type": _inline(f["type"], named, defined, namespace)}
            if isinstance(f, dict) and "type" in f else f
            for f in node["fields"]
        ]
    for key in ("items", "values"):
        if key in node:
            out[key] = _inline(node[key], named, defined, namespace)
    if isinstance(node.get("type"), (dict, list)) or (
        isinstance(node.get("type"), str) and node["type"] not in _PRIMITIVES | {
            "record", "error", "enum", "fixed", "array", "map"}
    ):
        out["type"] = _inline(node["type"], named, defined, namespace)
    return out

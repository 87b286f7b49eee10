"""The columns and types of a batch, fixed when the model is logged.

With ``batch_format`` ``"pandas"``, ``"arrow"`` or ``"polars"``, ``pre_processing`` gets a batch
as a table. Were its columns and types read off each batch, a record's output would depend on
the records beside it: a record missing ``x`` had ``x`` null in a batch and no ``x`` column
alone (a dead letter), an int came out as ``2`` or ``2.0`` as its neighbours were ints or
floats. So the schema of a batch is taken once, from the input example when the model is
logged (only the declared input fields, if any), or from the model's Avro schema
(``avro_schema=``, which knows the type of a field the example leaves null), stored with the
model (``batch_schema.arrow``),
and every batch of every mode is built to it: a field a record lacks is null, a value is cast to
its column's type, and a value that cannot be (``2.5`` for an ``int64`` column) is that
record's error, alone or in a batch. Tables that arrive as columns (polars-avro's, Spark's)
are cast to it the same way.

pandas frames get pandas' nullable types for ints and booleans (``Int64``, ``boolean``), so
that a missing value does not turn a column of ints into floats in one batch and not another;
nested values stay Python dicts and lists, as in records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILE = "batch_schema.arrow"


class BatchSchemaError(ValueError):
    """The input example cannot give a batch schema; the message says what to change."""


def from_example(records: Sequence[dict]) -> Any:
    """The ``pyarrow.Schema`` of a batch of ``records`` (the input example, projected to the
    declared fields). A field that is null in every record has no type to keep."""
    import pyarrow as pa

    from mlflow_preproc.runtime.input_fields import plain

    try:
        schema = pa.Table.from_pylist([plain(r) for r in records]).schema
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise BatchSchemaError(f"the input example cannot be read as Arrow columns ({exc}); "
                               "give each field one type in every example record") from None
    untyped = [path for path in _null_paths(schema)]
    if untyped:
        raise BatchSchemaError(
            f"the input example has no value for {', '.join(untyped[:10])}"
            f"{' and more' if len(untyped) > 10 else ''}, so its type cannot be known (a "
            "batch's columns and types are taken from the example): give the example a "
            "record where it has a value, declare the input fields the function reads, or "
            "pass avro_schema= (the types of every field)")
    return schema.remove_metadata()


def from_avro(schema: Any, fields: Any = None) -> Any:
    """The ``pyarrow.Schema`` of batches of records of the Avro record ``schema`` as the
    decoders hand them over (only the declared ``fields``, a tree, if any)."""
    import fastavro
    import pyarrow as pa

    parsed = fastavro.parse_schema(schema)
    named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    kind = _arrow(parsed, named, fields, "")
    if not pa.types.is_struct(kind):
        raise BatchSchemaError("avro_schema is not a record: a batch's columns are the "
                               "fields of a record")
    return pa.schema(list(kind))


def _arrow(node: Any, named: dict, tree: Any, path: str) -> Any:
    """The Arrow type of the values fastavro decodes from Avro ``node``."""
    import pyarrow as pa

    if isinstance(node, list):  # a union: nullable; more than one other type has no column
        others = [b for b in node if b != "null"]
        if len(others) != 1:
            raise BatchSchemaError(f"avro_schema field {path or 'the record'} is a union of "
                                   f"{len(others)} types, which no one column type holds; "
                                   "declare input fields without it")
        return _arrow(others[0], named, tree, path)
    if isinstance(node, str):
        if node in named:
            return _arrow(named[node], named, tree, path)
        node = {"type": node}
    kind = node["type"]
    if isinstance(kind, (dict, list)):
        return _arrow(kind, named, tree, path)
    logical = node.get("logicalType")
    if logical in ("timestamp-millis", "timestamp-micros"):
        return pa.timestamp("us", tz="UTC")
    if logical == "date":
        return pa.date32()
    if logical == "uuid":
        return pa.string()
    if logical == "decimal":
        return pa.decimal128(node["precision"], node.get("scale", 0))
    simple = {"null": pa.null(), "boolean": pa.bool_(), "int": pa.int64(), "long": pa.int64(),
              "float": pa.float64(), "double": pa.float64(), "string": pa.string(),
              "bytes": pa.binary(), "enum": pa.string(), "fixed": pa.binary()}
    if kind in simple:
        return simple[kind]
    if kind == "array":
        return pa.list_(_arrow(node["items"], named, tree, path))
    if kind == "map":
        return pa.map_(pa.string(), _arrow(node["values"], named, None, path))
    if kind in ("record", "error"):
        present = {f["name"]: f for f in node["fields"]}
        names = list(tree) if tree else list(present)
        children = []
        for name in names:
            where = f"{path}.{name}" if path else name
            if name not in present:
                raise BatchSchemaError(f"input field {where} is not in avro_schema; declare "
                                       "fields the schema has, or fix the schema")
            children.append(pa.field(name, _arrow(present[name]["type"], named,
                                                  tree[name] if tree else None, where)))
        return pa.struct(children)
    raise BatchSchemaError(f"avro_schema field {path} has type {kind!r}, which has no column "
                           "type here")


def _null_paths(schema: Any, prefix: str = "") -> list[str]:
    import pyarrow as pa

    found = []
    for field in schema:
        name = f"{prefix}{field.name}"
        kind = field.type
        while pa.types.is_list(kind) or pa.types.is_large_list(kind):
            kind = kind.value_type
        if pa.types.is_null(kind):
            found.append(name)
        elif pa.types.is_struct(kind):
            found += _null_paths(list(kind), f"{name}.")
    return found


def save(schema: Any, model_dir: str) -> str:
    """Write ``schema`` into the model folder; the file name, for the MLmodel."""
    Path(model_dir, FILE).write_bytes(schema.serialize().to_pybytes())
    return FILE


def load(model_dir: str, name: str | None) -> Any:
    """The stored schema, or None for a model logged without one."""
    if not name:
        return None
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(Path(model_dir, name).read_bytes()))


def table(records: Sequence[dict], schema: Any) -> Any:
    """``records`` as a ``pyarrow.Table`` of ``schema``; raises the Arrow error of a value
    that does not fit its column."""
    import pyarrow as pa

    from mlflow_preproc.runtime.input_fields import plain

    return pa.Table.from_pylist([plain(r) for r in records], schema=schema)


def conform(columns: Any, schema: Any) -> Any:
    """A ``pyarrow.Table`` read as columns (polars-avro, Spark) as one of ``schema``: its
    columns in the schema's order, a missing one null, each cast to the schema's type."""
    import pyarrow as pa

    if columns.schema.remove_metadata() == schema:
        return columns
    names = set(columns.column_names)
    arrays = [_conform(columns.column(f.name), f.type) if f.name in names
              else pa.nulls(columns.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _conform(array: Any, kind: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        return pa.chunked_array([_conform(chunk, kind) for chunk in array.chunks], type=kind)
    if array.type == kind:
        return array
    if pa.types.is_struct(kind) and pa.types.is_struct(array.type):
        present = {array.type.field(i).name for i in range(array.type.num_fields)}
        children = [_conform(array.field(f.name), f.type) if f.name in present
                    else pa.nulls(len(array), f.type) for f in kind]
        return pa.StructArray.from_arrays(children, fields=list(kind),
                                          mask=array.is_null() if array.null_count else None)
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and \
            (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        values = _conform(array.flatten(), kind.value_type)
        offsets = pc.subtract(array.offsets, array.offsets[0]).cast(
            pa.int64() if pa.types.is_large_list(kind) else pa.int32())
        maker = pa.LargeListArray if pa.types.is_large_list(kind) else pa.ListArray
        return maker.from_arrays(offsets, values, type=kind,
                                 mask=array.is_null() if array.null_count else None)
    return pc.cast(array, kind)


def frame(records: Sequence[dict], schema: Any, fields: Any = None) -> Any:
    """``records`` as a pandas DataFrame of ``schema``'s columns: ints and booleans in pandas'
    nullable types, floats as float64, nested values as Python dicts and lists (each record's
    nested dicts projected to ``fields`` again, so an undeclared read still raises)."""
    import pandas as pd
    import pyarrow as pa

    from mlflow_preproc.runtime.input_fields import project

    built = table(records, schema)
    data = {}
    for field in schema:
        column = built.column(field.name)
        kind = field.type
        if pa.types.is_integer(kind):
            data[field.name] = pd.array(column.to_pylist(), dtype="Int64")
        elif pa.types.is_boolean(kind):
            data[field.name] = pd.array(column.to_pylist(), dtype="boolean")
        elif pa.types.is_floating(kind):
            data[field.name] = column.to_numpy(zero_copy_only=False).astype("float64")
        else:
            values = column.to_pylist()
            sub = fields.get(field.name) if fields else None
            if sub:
                values = [project(v, sub, field.name) for v in values]
            data[field.name] = pd.Series(values, dtype=object)
    built_frame = pd.DataFrame(data, index=pd.RangeIndex(len(records)))
    return _guarded(built_frame) if fields is not None else built_frame


_GUARDED: list[type] = []


def _guarded(frame: Any) -> Any:
    """``frame`` as a DataFrame whose ``[name]``, ``.get(name)`` and ``name in`` raise
    :class:`~mlflow_preproc.runtime.input_fields.UndeclaredFieldError` for a column that is
    not an input field, as a projected record does (a ``.get("x", 1)`` default would
    otherwise hide a field the declaration left out). What it derives is a plain frame."""
    if not _GUARDED:
        import pandas as pd

        from mlflow_preproc.runtime.input_fields import undeclared

        class ProjectedFrame(pd.DataFrame):
            @property
            def _constructor(self) -> type:
                return pd.DataFrame

            def _check(self, key: Any) -> None:
                if isinstance(key, str) and key not in self.columns:
                    raise undeclared(key)

            def __getitem__(self, key: Any) -> Any:
                self._check(key)
                return super().__getitem__(key)

            def get(self, key: Any, default: Any = None) -> Any:
                self._check(key)
                return super().get(key, default)

            def __contains__(self, key: Any) -> bool:
                self._check(key)
                return super().__contains__(key)

        _GUARDED.append(ProjectedFrame)
    return _GUARDED[0](frame)

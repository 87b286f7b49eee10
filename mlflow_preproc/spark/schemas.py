"""Spark types for preprocessing outputs (and Avro inputs), from Avro schemas or signatures.

Two mappings of the same Avro schema, because the two ways of running a model on Spark hand
Spark different values:

- :func:`spark_schema`: the values ``pre_processing`` returns, as they are (``bytes`` stay
  binary, ``datetime`` stays a timestamp). Used by :func:`mlflow_preproc.spark.transform`
  for typed output columns, and to build DataFrames of Avro records.
- :func:`result_type`: the values of ``pyfunc.predict``, which are JSON-ready (``bytes`` are
  base64 strings, timestamps and decimals strings), restricted to the types MLflow's
  ``spark_udf`` accepts (int, long, float, double, string, boolean, arrays, structs, maps).

Every field is nullable: an Avro field without ``null`` in its type still arrives as null
when ``pre_processing`` leaves it out, and Spark must not be told otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fastavro

from mlflow_preproc.runtime.avro_schemas import load_avro_schema

# pyspark is imported inside the functions: this module is imported by the CLI before it knows
# whether pyspark is installed (session.require_pyspark says how to install it).


class OutputSchemaError(ValueError):
    """An output schema cannot be turned into Spark columns; the message names the fix."""


def spark_schema(avro_schema: dict | str | os.PathLike) -> Any:
    """The Spark ``StructType`` of records of an Avro record schema (dict, JSON or ``.avsc``)."""
    return _AvroToSpark(for_udf=False).convert_root(load_avro_schema(avro_schema))


def result_type(model_uri: str) -> Any:
    """A ``result_type`` for ``mlflow.pyfunc.spark_udf`` on a preprocessing model.

    A ``StructType`` matching one output record, from the model's ``output_avro_schema``, else
    its signature's outputs. Raises :class:`OutputSchemaError` when the model has neither.

    .. code-block:: python

        udf = mlflow.pyfunc.spark_udf(spark, uri, result_type=mlflow_preproc.spark.result_type(uri))
        df.withColumn("features", udf(struct(*df.columns)))
    """
    import tempfile

    from mlflow.models import Model
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    with tempfile.TemporaryDirectory() as tmp:
        # The whole model (small: code and environment files); sub-paths of models:/m-<id>
        # URIs cannot be downloaded on their own.
        local = _download_artifact_from_uri(model_uri, output_path=tmp)
        model = Model.load(os.path.join(local, "MLmodel"))
        conf = model.flavors.get("preprocessing")
        if conf is None:
            raise OutputSchemaError(f"{model_uri} is not a preprocessing model; log it with "
                                    "mlflow.preproc.log_model")
        if conf.get("output_avro_schema"):
            schema = load_avro_schema(os.path.join(local, conf["output_avro_schema"]))
            return _AvroToSpark(for_udf=True).convert_root(schema)
    if model.signature is not None and model.signature.outputs is not None:
        return model.signature.outputs.as_spark_schema()
    raise OutputSchemaError(
        f"{model_uri} has no output schema to derive a result type from; pass result_type= "
        "yourself (e.g. 'objectId string, magpsf double'), or log the model with "
        "output_avro_schema=... or a signature with outputs"
    )


def output_struct(schema: Any) -> Any:
    """A Spark ``StructType`` from what a user passes as an output schema.

    Accepts a ``StructType``, a Spark DDL string (``"id long, mag double"``), or an Avro
    schema (dict, JSON string, ``.avsc`` path).
    """
    from pyspark.sql.types import StructType

    if isinstance(schema, StructType):
        return schema
    if isinstance(schema, dict) or (isinstance(schema, (str, os.PathLike)) and (
            str(schema).lstrip().startswith("{") or Path(schema).suffix == ".avsc")):
        return spark_schema(schema)
    if isinstance(schema, str):
        return _parse_ddl(schema)
    raise OutputSchemaError(f"cannot use a {type(schema).__name__} as an output schema; pass a "
                            "StructType, a DDL string or an Avro schema")


def _parse_ddl(ddl: str) -> Any:
    from pyspark.sql.types import StructType, _parse_datatype_string

    try:
        parsed = _parse_datatype_string(ddl)
    except Exception as exc:  # pyspark raises several types; the message is what matters
        raise OutputSchemaError(f"output schema {ddl!r} is not a Spark DDL schema ({exc}); "
                                "write it as 'name type, ...', e.g. 'id long, mag double'"
                                ) from None
    if not isinstance(parsed, StructType):
        raise OutputSchemaError(f"output schema {ddl!r} is a {parsed.simpleString()}, not a "
                                "record; write it as 'name type, ...'")
    return parsed


class _AvroToSpark:
    """Walks a parsed Avro schema, resolving named types the way Avro does."""

    def __init__(self, for_udf: bool):
        self.for_udf = for_udf
        self.named: dict[str, Any] = {}

    def convert_root(self, schema: dict) -> Any:
        from pyspark.sql.types import StructType

        parsed = fastavro.parse_schema(schema, named_schemas=self.named)
        converted = self.convert(parsed, "the schema")
        if not isinstance(converted, StructType):
            raise OutputSchemaError("the Avro schema is not a record schema; Spark rows need a "
                                    "record")
        return converted

    def convert(self, node: Any, where: str) -> Any:
        from pyspark.sql import types as T

        if isinstance(node, list):
            return self._union(node, where)
        if isinstance(node, str):
            if node in self.named:
                return self.convert(self.named[node], where)
            node = {"type": node}
        kind = node["type"]
        if isinstance(kind, (dict, list)):
            return self.convert(kind, where)
        logical = node.get("logicalType")
        if logical:
            mapped = self._logical(logical, node, where)
            if mapped is not None:
                return mapped
        if kind == "record" or kind == "error":
            return T.StructType([
                T.StructField(f["name"], self.convert(f["type"], f"field {f['name']!r}"), True)
                for f in node["fields"]])
        if kind == "array":
            return T.ArrayType(self.convert(node["items"], where), True)
        if kind == "map":
            return T.MapType(T.StringType(), self.convert(node["values"], where), True)
        if kind == "enum":
            return T.StringType()
        if kind in ("bytes", "fixed"):
            # pyfunc.predict gives bytes as base64 strings; spark_udf takes no binary type.
            return T.StringType() if self.for_udf else T.BinaryType()
        primitive = {"boolean": T.BooleanType, "int": T.IntegerType, "long": T.LongType,
                     "float": T.FloatType, "double": T.DoubleType, "string": T.StringType,
                     "null": T.NullType}.get(kind)
        if primitive is None:
            raise OutputSchemaError(f"{where}: unknown Avro type {kind!r}")
        if primitive is T.NullType and self.for_udf:
            raise OutputSchemaError(f"{where} is always null; spark_udf has no null type")
        return primitive()

    def _union(self, branches: list, where: str) -> Any:
        non_null = [b for b in branches if b != "null"]
        if len(non_null) == 1:
            return self.convert(non_null[0], where)
        if not non_null:
            return self.convert("null", where)
        names = json.dumps([b if isinstance(b, str) else b.get("type") for b in non_null])
        raise OutputSchemaError(
            f"{where} is a union of several types {names}; a Spark column has one type: pass "
            "an output schema with one type for it (a Spark DDL string or StructType)")

    def _logical(self, logical: str, node: dict, where: str) -> Any:
        from pyspark.sql import types as T

        if self.for_udf and logical in ("decimal", "date", "timestamp-millis",
                                        "timestamp-micros", "local-timestamp-millis",
                                        "local-timestamp-micros", "uuid"):
            return T.StringType()  # what to_jsonable makes of them in predict's output
        if logical == "decimal":
            return T.DecimalType(node.get("precision", 10), node.get("scale", 0))
        if logical == "date":
            return T.DateType()
        if logical in ("timestamp-millis", "timestamp-micros"):
            return T.TimestampType()
        if logical in ("local-timestamp-millis", "local-timestamp-micros"):
            return T.TimestampNTZType()
        if logical in ("time-millis", "time-micros"):
            raise OutputSchemaError(f"{where} is an Avro {logical}; Spark has no time-of-day "
                                    "type: make it a long or a string in the schema")
        return None  # uuid and unknown logical types: the underlying type

"""Preprocessing models on Apache Spark: archives and backfills.

- :func:`transform`: a DataFrame in, a DataFrame out, with the record semantics of every other
  mode (drops and fan-outs change the row count; failures go to a rejects DataFrame).
- :func:`result_type`: the ``result_type`` for ``mlflow.pyfunc.spark_udf`` on a preprocessing
  model (one output per row).
- :func:`spark_schema`: the Spark schema of an Avro record schema.
- ``mlflow-preproc run --engine spark``: files to files (:mod:`mlflow_preproc.spark.files`).

Needs the ``spark`` extra (``pip install '.[spark]'`` in the mlflow-preproc clone) and Java
17+. Not part of a
model's runtime: models never carry this package, and the core never imports it.
"""

from mlflow_preproc.spark.schemas import OutputSchemaError, result_type, spark_schema
from mlflow_preproc.spark.transform import Transformed, transform

__all__ = ["OutputSchemaError", "Transformed", "result_type", "spark_schema", "transform"]

"""Preprocessing models on Spark, in-process: spark_udf and transform on local[2]."""

from __future__ import annotations

import json
import os
import statistics

import fastavro
import mlflow
import pytest

from conftest import DATA, SPARK_ENV, require_spark
from mlflow_preproc.config import ZTF_CUTOUTS

pytestmark = [pytest.mark.slow, pytest.mark.spark]

ZTF_PACKETS = sorted(DATA.glob("*.avro"))
FEATURES_SCHEMA = {"type": "record", "name": "Features", "fields": [
    {"name": "objectId", "type": "string"},
    {"name": "candid", "type": "long"},
    {"name": "fid", "type": "int"},
    {"name": "magpsf", "type": "float"},
    {"name": "n_prv", "type": "int"},
    {"name": "prv_mag_mean", "type": ["null", "double"]},
    {"name": "stamp_head", "type": "bytes"},
]}


@pytest.fixture(scope="module")
def spark():
    require_spark()
    from mlflow_preproc.spark import session

    saved = {k: os.environ.get(k) for k in SPARK_ENV}
    os.environ.update(SPARK_ENV)
    spark = session.start("local[2]", "mlflow-preproc tests", progress=False)
    spark.conf.set("spark.sql.shuffle.partitions", "2")
    yield spark
    spark.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def alerts() -> list[dict]:
    out = []
    for packet in ZTF_PACKETS:
        with open(packet, "rb") as f:
            out.append(next(fastavro.reader(f)))
    return out


def ztf_features(alert):
    c = alert["candidate"]
    prv = alert.get("prv_candidates") or []
    mags = [p["magpsf"] for p in prv if p.get("magpsf") is not None]
    return {"objectId": alert["objectId"], "candid": alert["candid"], "fid": c["fid"],
            "magpsf": c["magpsf"], "n_prv": len(prv),
            "prv_mag_mean": statistics.fmean(mags) if mags else None,
            "stamp_head": alert["cutoutScience"]["stampData"][:8]}


def ztf_features_batch(frame):
    return [ztf_features(row) for row in frame.to_dict(orient="records")]


def alerts_frame(spark):
    import mlflow_preproc.spark as mps

    return spark.createDataFrame(alerts(), mps.spark_schema(DATA / "alert.avsc"))


def ztf_features_table(table):
    return [ztf_features(row) for row in table.to_pylist()]


@pytest.mark.parametrize("batch_format", [None, "pandas", "arrow"])
def test_spark_udf_output_equals_pyfunc_predict(spark, tracking_uri, batch_format):
    from pyspark.sql.functions import struct

    import mlflow_preproc.spark as mps

    fn = {None: ztf_features, "pandas": ztf_features_batch,
          "arrow": ztf_features_table}[batch_format]
    with mlflow.start_run():
        # A batch's column types: the alert schema's (its example leaves some fields null)
        info = mlflow.preproc.log_model(fn, name="f", batch_format=batch_format,
                                        output_avro_schema=FEATURES_SCHEMA,
                                        avro_schema=DATA / "alert.avsc", pip_requirements=[])
    result_type = mps.result_type(info.model_uri)
    assert result_type.simpleString() == (
        "struct<objectId:string,candid:bigint,fid:int,magpsf:float,n_prv:int,"
        "prv_mag_mean:double,stamp_head:string>")  # bytes: base64, as predict gives them
    udf = mlflow.pyfunc.spark_udf(spark, info.model_uri, result_type=result_type)
    df = alerts_frame(spark)
    got = [r.f.asDict(recursive=True)
           for r in df.select(udf(struct(*df.columns)).alias("f")).orderBy("f.candid").collect()]
    expected = sorted(mlflow.pyfunc.load_model(info.model_uri).predict(alerts()),
                      key=lambda r: r["candid"])
    assert got == expected
    # the nested history came through as a list of records
    assert [r["n_prv"] for r in got] == [11, 28] and got[1]["prv_mag_mean"] is not None


def test_spark_udf_refuses_a_drop_and_names_transform(spark, tracking_uri):
    from pyspark.sql.functions import struct

    import mlflow_preproc.spark as mps

    with mlflow.start_run():
        info = mlflow.preproc.log_model(
            lambda a: None if a["candidate"]["rb"] < 0.5 else ztf_features(a), name="d",
            output_avro_schema=FEATURES_SCHEMA, pip_requirements=[])
    udf = mlflow.pyfunc.spark_udf(spark, info.model_uri, result_type=mps.result_type(info.model_uri))
    df = alerts_frame(spark)
    with pytest.raises(Exception) as err:
        df.select(udf(struct(*df.columns))).collect()
    message = str(err.value)
    assert "pre_processing dropped it (returned None), and a Spark UDF gives one value per row" \
        in message
    assert "mlflow_preproc.spark.transform" in message


def test_result_type_comes_from_the_signature_or_says_what_to_do(tracking_uri):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import mlflow_preproc.spark as mps

    signature = ModelSignature(inputs=Schema([ColSpec("double", "x")]),
                               outputs=Schema([ColSpec("long", "id"), ColSpec("string", "band")]))
    with mlflow.start_run():
        signed = mlflow.preproc.log_model(lambda r: r, name="s", signature=signature,
                                          pip_requirements=[])
        bare = mlflow.preproc.log_model(lambda r: r, name="b", pip_requirements=[])
    assert mps.result_type(signed.model_uri).simpleString() == "struct<id:bigint,band:string>"
    with pytest.raises(mps.OutputSchemaError, match="pass result_type= yourself"):
        mps.result_type(bare.model_uri)


def records_model(record):
    if record.get("drop"):
        return None
    if record.get("fanout"):
        return [{"id": record["id"], "double": float(p)} for p in range(record["fanout"])]
    if record["id"] == 7:
        return {"id": 7, "double": "not a number"}  # does not fit the output schema
    return {"id": record["id"], "double": record["x"] * 2}


def test_transform_keeps_drops_fanouts_and_sends_failures_to_rejects(spark, tracking_uri):
    import mlflow_preproc.spark as mps

    schema = {"type": "record", "name": "F", "fields": [
        {"name": "id", "type": "long"}, {"name": "double", "type": "double"}]}
    with mlflow.start_run():
        info = mlflow.preproc.log_model(records_model, name="p", output_avro_schema=schema,
                                        pip_requirements=[])
    rows = [{"id": 1, "x": 1.5, "drop": False, "fanout": 0},
            {"id": 2, "x": 2.0, "drop": True, "fanout": 0},
            {"id": 3, "x": 3.0, "drop": False, "fanout": 3},
            {"id": 4, "x": None, "drop": False, "fanout": 0},   # x * 2 raises
            {"id": 7, "x": 7.0, "drop": False, "fanout": 0}]
    df = spark.createDataFrame(rows, "id long, x double, drop boolean, fanout long") \
        .repartition(2)
    result = mps.transform(df, info.model_uri).persist()
    try:
        assert result.output.columns == ["id", "double"]
        assert sorted(tuple(r) for r in result.output.collect()) == [
            (1, 3.0), (3, 0.0), (3, 1.0), (3, 2.0)]
        rejects = sorted((r.asDict() for r in result.rejects.collect()), key=lambda r: r["stage"])
        assert [(r["stage"], json.loads(r["record"])["id"]) for r in rejects] == [
            ("encode", 7), ("preprocess", 4)]
        assert "does not match the output schema" in rejects[0]["error"]
        assert "pre_processing raised TypeError" in rejects[1]["error"]
        assert set(rejects[0]) == {"input", "index", "stage", "error", "record"}
        assert all(r["input"].startswith("partition ") for r in rejects)
        counts = result.counts()
        assert (counts.read, counts.written, counts.dropped, counts.failed) == (5, 4, 1, 2)
    finally:
        result.unpersist()


def test_transform_decodes_avro_files_in_the_tasks(spark, tracking_uri):
    import mlflow_preproc.spark as mps

    with mlflow.start_run():
        info = mlflow.preproc.log_model(
            lambda a: {"objectId": a["objectId"], "fields": sorted(a)}, name="z",
            pip_requirements=[])
    files = spark.read.format("binaryFile").load([str(p) for p in ZTF_PACKETS])
    result = mps.transform(files, info.model_uri, input_format="avro", drop_fields=ZTF_CUTOUTS)
    got = sorted(json.loads(r.value)["objectId"] for r in result.output.collect())
    assert got == sorted(a["objectId"] for a in alerts())
    fields = {tuple(json.loads(r.value)["fields"]) for r in result.output.collect()}
    assert fields == {("candid", "candidate", "objectId", "prv_candidates", "publisher",
                       "schemavsn")}
    assert result.rejects.count() == 0


def fink_like(alert):
    c = alert["candidate"]
    mags = [p["magpsf"] for p in alert["prv_candidates"] or [] if p["magpsf"] is not None]
    return {"objectId": alert["objectId"], "mag": c["magpsf"], "history": len(mags),
            "mean": sum(mags) / len(mags) if mags else None}


def test_declared_input_fields_prune_what_spark_reads_of_parquet(spark, tracking_uri, tmp_path):
    import re

    import mlflow_preproc.spark as mps
    from mlflow_preproc.spark.schemas import spark_schema

    with open(ZTF_PACKETS[0], "rb") as f:
        reader = fastavro.reader(f)
        schema, batch = reader.writer_schema, list(reader)
    spark.createDataFrame(batch, spark_schema(schema)).write.parquet(str(tmp_path / "a.parquet"))
    example = {k: v for k, v in batch[0].items() if not k.startswith("cutout")}
    with mlflow.start_run():
        undeclared = mlflow.preproc.log_model(fink_like, name="u", pip_requirements=[]).model_uri
        declared = mlflow.preproc.log_model(
            fink_like, name="d", input_example=example,
            input_fields=["objectId", "candidate.magpsf", "prv_candidates.magpsf"],
            pip_requirements=[]).model_uri

    def run(model: str):
        result = mps.transform(spark.read.parquet(str(tmp_path / "a.parquet")), model)
        plan = result.output._jdf.queryExecution().executedPlan().toString()
        return ([json.loads(r.value) for r in result.output.collect()],
                re.findall(r"ReadSchema: (\S+)", plan))

    spark.conf.set("spark.sql.maxMetadataStringLength", "100000")  # the whole ReadSchema
    try:
        full, full_read = run(undeclared)
        pruned, pruned_read = run(declared)
    finally:
        spark.conf.unset("spark.sql.maxMetadataStringLength")
    assert pruned == full and full[0]["objectId"] == batch[0]["objectId"]
    assert "cutoutScience" in full_read[0]
    # the declared fields, and the row index Parquet gives each reject's provenance
    assert pruned_read == ["struct<objectId:string,candidate:struct<magpsf:float>,"
                           "prv_candidates:array<struct<magpsf:float>>,"
                           "_tmp_metadata_row_index:bigint>"]


def columnar_magnitudes(table):
    """Over Spark's own Arrow columns (cast to the model's batch schema: Parquet's float32
    magnitudes as the example's doubles); fails on the alert without history."""
    import pyarrow.compute as pc

    magpsf = pc.struct_field(table.column("candidate"), "magpsf")
    lengths = pc.list_value_length(table.column("prv_candidates"))
    if pc.any(pc.is_null(lengths)).as_py() or pc.any(pc.equal(lengths, 0)).as_py():
        raise ValueError("an alert without history")
    return [{"objectId": o, "mag": m, "n": n, "type": str(magpsf.type)}
            for o, m, n in zip(table.column("objectId").to_pylist(), magpsf.to_pylist(),
                               lengths.to_pylist())]


def columnar_magnitudes_polars(frame):
    """The same over polars' frame of Spark's Arrow batch (batch_format="polars")."""
    import polars as pl

    magpsf = frame.select(pl.col("candidate").struct.field("magpsf"))["magpsf"]
    lengths = frame["prv_candidates"].list.len()
    if lengths.is_null().any() or (lengths == 0).any():
        raise ValueError("an alert without history")
    kind = {pl.Float32: "float", pl.Float64: "double"}[magpsf.dtype]
    return [{"objectId": o, "mag": m, "n": n, "type": kind}
            for o, m, n in zip(frame["objectId"].to_list(), magpsf.to_list(), lengths.to_list())]


@pytest.mark.parametrize("batch_format, fn", [("arrow", columnar_magnitudes),
                                              ("polars", columnar_magnitudes_polars)])
def test_a_columnar_model_takes_sparks_arrow_batches_and_rejects_a_row_alone(
        spark, tracking_uri, tmp_path, batch_format, fn):
    import mlflow_preproc.spark as mps
    from mlflow_preproc.spark.schemas import spark_schema

    with open(ZTF_PACKETS[0], "rb") as f:
        reader = fastavro.reader(f)
        schema, batch = reader.writer_schema, list(reader)
    rows = batch + [dict(batch[0], objectId="ZTFnohistory", prv_candidates=None)]
    spark.createDataFrame(rows, spark_schema(schema)).coalesce(1) \
        .write.parquet(str(tmp_path / "a.parquet"))
    example = {k: v for k, v in batch[0].items() if not k.startswith("cutout")}
    with mlflow.start_run():
        model = mlflow.preproc.log_model(
            fn, name="c", batch_format=batch_format, input_example=example,
            input_fields=["objectId", "candidate.magpsf", "prv_candidates.magpsf"],
            pip_requirements=[]).model_uri
    result = mps.transform(spark.read.parquet(str(tmp_path / "a.parquet")), model).persist()
    try:
        outputs = [json.loads(r.value) for r in result.output.collect()]
        # the type of the example's magnitudes, as in every other mode (#32 finding 9)
        assert outputs == [{"objectId": a["objectId"], "mag": a["candidate"]["magpsf"],
                            "n": len(a["prv_candidates"]), "type": "double"} for a in batch]
        [reject] = [r.asDict() for r in result.rejects.collect()]
        assert reject["stage"] == "preprocess" and "an alert without history" in reject["error"]
        assert json.loads(reject["record"])["objectId"] == "ZTFnohistory"
        assert reject["input"].endswith(".parquet") and reject["index"] == len(batch)
        counts = result.counts()
        assert (counts.read, counts.written, counts.failed) == (len(rows), len(batch), 1)
    finally:
        result.unpersist()


def zero_pointed(record):
    # A zero point from the environment: a setting that differs from one place to another.
    return {"id": record["id"], "mag": record["mag"] + float(os.environ.get("MAG_ZEROPOINT", "0"))}


def test_each_executor_checks_the_reference_records_before_its_first_rows(spark, tracking_uri,
                                                                          monkeypatch):
    # #38: the driver's environment is the one the model was logged in; the executors' Python
    # workers get another (sc.environment: spark.executorEnv.* of a running session).
    import mlflow_preproc.spark as mps

    with mlflow.start_run():
        info = mlflow.preproc.log_model(zero_pointed, name="p", pip_requirements=[],
                                        input_example=[{"id": 1, "mag": 18.25}])
    # One partition: one Python worker to start with the changed environment.
    df = spark.createDataFrame(spark.sparkContext.parallelize([(2, 17.0)], 1),
                               "id long, mag double")
    spark.sparkContext.environment["MAG_ZEROPOINT"] = "0.5"
    try:
        refused = mps.transform(df, info.model_uri)  # the driver's own check passes
        with pytest.raises(Exception) as err:
            refused.output.collect()
        message = str(err.value)
        assert "on a Spark executor: 1 of 1 reference records give other outputs here" in \
            message, message[-3000:]
        assert "record 0 (id=1): field mag: expected 18.25, got 18.75" in message
        monkeypatch.setenv("PARITY_CHECK", "warn")  # the driver's setting reaches executors
        warned = mps.transform(df, info.model_uri)
        assert [json.loads(r.value) for r in warned.output.collect()] == [{"id": 2, "mag": 17.5}]
    finally:
        del spark.sparkContext.environment["MAG_ZEROPOINT"]

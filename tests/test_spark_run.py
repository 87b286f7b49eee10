"""`mlflow-preproc run --engine spark`: the same rows as `mlflow-preproc run`, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from conftest import BIN, DATA, SPARK_ENV, require_spark
from ztf_archive import write_archive

pytestmark = [pytest.mark.slow, pytest.mark.spark]

ZTF_PACKETS = sorted(DATA.glob("*.avro"))


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlflow-preproc"), "run", *args], capture_output=True,
                          cwd=cwd, timeout=600, env={**os.environ, **SPARK_ENV, **(env or {})})


def lines(path: Path) -> list[bytes]:
    """The lines of a file, or of the part files of a Spark output folder, sorted."""
    files = sorted(path.rglob("part-*")) if path.is_dir() else [path]
    return sorted(line for f in files for line in f.read_bytes().splitlines() if line.strip())


def summary(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.decode().strip().splitlines()[-1]


def archive_features(alert):
    """Features with every record outcome: kept, dropped, fanned out, failed."""
    c = alert["candidate"]
    if c["rb"] < 0.2:
        return None
    if c["fid"] == 3 and c["rb"] > 0.9:
        raise ValueError(f"fid 3 with rb {c['rb']:.3f}")
    features = {"objectId": alert["objectId"], "candid": alert["candid"], "fid": c["fid"],
                "magpsf": c["magpsf"], "n_prv": len(alert.get("prv_candidates") or []),
                "fields": sorted(alert)}
    if c["rb"] > 0.8:
        return [dict(features, half=h) for h in (0, 1)]
    return features


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """2,000 generated alerts (19 files of 100, some deflated, and 100 files of one), the
    two real packets with their full cutouts, a file that is not Avro, and, as in a real
    archive, notes and schemas beside the alerts."""
    require_spark()
    folder = tmp_path_factory.mktemp("archive")
    write_archive(folder / "packed", 1900, 100, stamp_bytes=256, deflate_every=3)
    write_archive(folder / "single", 100, 1, seed=8, stamp_bytes=256)
    for packet in ZTF_PACKETS:
        (folder / "real").mkdir(exist_ok=True)
        (folder / "real" / packet.name).write_bytes(packet.read_bytes())
    (folder / "real" / "truncated.avro").write_bytes(b"Obj\x01 not really")
    (folder / "real" / "ABOUT.md").write_text("# Two ZTF alerts and their schemas\n")
    (folder / "real" / "alert.avsc").write_bytes((DATA / "alert.avsc").read_bytes())
    (folder / "real" / "OLD.AVRO").write_bytes(b"not read: Hadoop's filter is case-sensitive")
    return folder


def test_spark_engine_gives_the_rows_run_gives_on_an_alert_archive(archive, tracking_uri,
                                                                    tmp_path):
    with mlflow.start_run():
        info = mlflow.preproc.log_model(archive_features, name="features", pip_requirements=[])
    inputs = [str(p) for p in sorted(archive.rglob("*.avro"))]

    local = run_cli("-m", info.model_uri, *inputs, "--skip-cutouts", "-o", "local.jsonl",
                    cwd=tmp_path)
    # Spark is given the folder, as a URI without a trailing slash (as a bucket's would be):
    # it reads the alerts in it, not the notes and schemas, and says which it skips.
    spark = run_cli("-m", info.model_uri, archive.as_uri(), "--skip-cutouts", "-o", "spark",
                    "--engine", "spark", "--master", "local[2]", cwd=tmp_path)

    assert (local.returncode, spark.returncode) == (1, 1), spark.stderr.decode()[-3000:]
    assert (f"{archive.as_uri()}: reading its .avro, .json, .jsonl, .ndjson files; skipping "
            "3 others (real/ABOUT.md, real/OLD.AVRO, real/alert.avsc)") in spark.stderr.decode()
    for noise in ("FutureWarning", "Downloading artifacts", "resolves to a loopback address"):
        assert noise not in spark.stderr.decode()  # the JVM's start-up lines remain
    parts = {p.suffix for p in (tmp_path / "spark").glob("part-*")}
    assert parts == {".jsonl"} == {p.suffix for p in (tmp_path / "spark.rejects.jsonl")
                                   .glob("part-*")}
    out = lines(tmp_path / "local.jsonl")
    assert lines(tmp_path / "spark") == out
    assert lines(tmp_path / "spark.rejects.jsonl") == lines(tmp_path / "local.jsonl.rejects.jsonl")
    assert summary(spark).replace("spark.rejects.jsonl", "local.jsonl.rejects.jsonl") \
        == summary(local)
    # The archive exercises every outcome: (in, out, dropped, failed) all non-trivial.
    counts = dict(kv.split("=") for kv in summary(spark).split(": ", 1)[1].split()[:4])
    assert int(counts["in"]) == 2_003 and int(counts["dropped"]) > 150
    assert int(counts["failed"]) > 20 and int(counts["out"]) > 1700
    rejects = [json.loads(r) for r in lines(tmp_path / "spark.rejects.jsonl")]
    assert {r["stage"] for r in rejects} == {"decode", "preprocess"}
    assert set(rejects[0]) == {"input", "index", "stage", "error", "record"}
    fields = {tuple(json.loads(o)["fields"]) for o in out}
    assert fields == {("candid", "candidate", "objectId", "prv_candidates", "publisher",
                       "schemavsn")}  # the cutouts were dropped before pre_processing


def jsonl_model(record):
    if record.get("drop"):
        return None
    if record.get("fanout"):
        return [{"id": record["id"], "part": float(p)} for p in range(record["fanout"])]
    return {"id": record["id"], "part": record["x"] * 2.0}


def test_jsonl_and_parquet_in_partitioned_parquet_out(tracking_uri, tmp_path):
    require_spark()
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = {"type": "record", "name": "F", "fields": [
        {"name": "id", "type": "long"}, {"name": "part", "type": "double"}]}
    with mlflow.start_run():
        info = mlflow.preproc.log_model(jsonl_model, name="j", output_avro_schema=schema,
                                        pip_requirements=[])
    (tmp_path / "in.jsonl").write_bytes(
        b'{"id": 1, "x": 2}\n{"id": 2, "drop": true}\n{"id": 3, "fanout": 2}\nnot json\n'
        b'{"id": 5}\n{"id": 6, "x": 0.5}\n')
    pq.write_table(pa.Table.from_pylist([{"id": 11, "x": 1.0}, {"id": 12, "x": None},
                                         {"id": 13, "x": 3.0}]), tmp_path / "in.parquet")

    local = run_cli("-m", info.model_uri, "in.jsonl", "-o", "local.jsonl", cwd=tmp_path)
    spark = run_cli("-m", info.model_uri, "in.jsonl", "in.parquet", "-o", "out.parquet",
                    "--engine", "spark", "--master", "local[2]", "--output-format", "parquet",
                    "--partition-by", "id", cwd=tmp_path)

    assert (local.returncode, spark.returncode) == (1, 1), spark.stderr.decode()[-3000:]
    assert summary(spark) == ("mlflow-preproc run: in=9 out=6 dropped=1 failed=3 "
                              "(rejects: out.parquet.rejects.jsonl)")
    assert sorted(p.name for p in (tmp_path / "out.parquet").glob("id=*")) == [
        "id=1", "id=11", "id=13", "id=3", "id=6"]
    rows = pq.read_table(tmp_path / "out.parquet", partitioning="hive").to_pylist()
    from_jsonl = [json.loads(line) for line in lines(tmp_path / "local.jsonl")]
    key = lambda r: (int(r["id"]), r["part"])  # noqa: E731
    assert sorted(({"id": int(r["id"]), "part": r["part"]} for r in rows), key=key) == sorted(
        from_jsonl + [{"id": 11, "part": 2.0}, {"id": 13, "part": 6.0}], key=key)
    # #36: --engine local reads and writes Parquet too, with Spark's rows and rejects
    local_parquet = run_cli("-m", info.model_uri, "in.jsonl", "in.parquet", "-o",
                            "local.parquet", "--output-format", "parquet", cwd=tmp_path)
    assert local_parquet.returncode == 1, local_parquet.stderr.decode()[-3000:]
    assert summary(local_parquet) == ("mlflow-preproc run: in=9 out=6 dropped=1 failed=3 "
                                      "(rejects: local.parquet.rejects.jsonl)")
    table = pq.read_table(tmp_path / "local.parquet")
    assert table.schema.field("id").type == pa.int64()  # the output Avro schema's types
    assert sorted(table.to_pylist(), key=key) == sorted(
        ({"id": int(r["id"]), "part": r["part"]} for r in rows), key=key)
    assert lines(tmp_path / "local.parquet.rejects.jsonl") == lines(
        tmp_path / "out.parquet.rejects.jsonl")
    # The JSON Lines rejects are run's (same fields, indexes, messages); the Parquet one
    # names its file and row.
    rejects = lines(tmp_path / "out.parquet.rejects.jsonl")
    from_parquet = [r for r in rejects if b'"input":"in.parquet"' in r]
    assert sorted(set(rejects) - set(from_parquet)) == lines(tmp_path / "local.jsonl.rejects.jsonl")
    [reject] = [json.loads(r) for r in from_parquet]
    assert (reject["index"], reject["stage"], reject["record"]) == (
        1, "preprocess", {"id": 12, "x": None})


@pytest.mark.parametrize("args, env, message", [
    (["--engine", "spark", "in.jsonl"], {},
     "--engine spark writes a folder of part files: pass -o OUT"),
    (["--output-format", "parquet", "in.jsonl"], {},
     "--output-format parquet writes a file: pass -o OUT.parquet"),
    (["--engine", "spark", "in.jsonl", "-o", "out"], {"JAVA_HOME": "/nonexistent"},
     "Spark needs Java (JAVA_HOME=/nonexistent has no bin/java); install a Java 17+ runtime "
     "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless) or set JAVA_HOME to one"),
])
def test_setup_errors_are_one_line(tmp_path, args, env, message):
    require_spark()  # the Java check comes after pyspark's
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n')
    proc = run_cli("-m", "models:/unused/1", *args, cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [f"mlflow-preproc run: error: {message}"]


def test_without_pyspark_the_error_says_how_to_install_it(tmp_path):
    # A pyspark that cannot be imported, first on the path: as on a machine without the extra.
    (tmp_path / "shadow" / "pyspark").mkdir(parents=True)
    (tmp_path / "shadow" / "pyspark" / "__init__.py").write_text(
        "raise ImportError('No module named pyspark')\n")
    (tmp_path / "in.jsonl").write_text('{"id": 1}\n')
    path = os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])
    proc = run_cli("-m", "models:/unused/1", "--engine", "spark", "in.jsonl", "-o", "out",
                   cwd=tmp_path, env={"PYTHONPATH": path})
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [
        "mlflow-preproc run: error: the Spark engine needs pyspark, which is not installed: "
        "pip install '.[spark]' in the mlflow-preproc clone"]

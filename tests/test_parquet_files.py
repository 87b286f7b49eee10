"""Parquet for `run --engine local` (#36): declared input fields read only their columns; an
output that does not fit the columns is one reject; a damaged file is one reject."""

from __future__ import annotations

import io

import pytest

from mlflow_preproc.runtime import batch_run
from mlflow_preproc.runtime.formats import DecodeError
from mlflow_preproc.runtime.input_fields import parse
from mlflow_preproc.runtime.parquet_files import ParquetWriter, read_parquet
from mlflow_preproc.runtime.records import Preprocessor

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_declared_fields_read_only_their_columns_and_damage_is_one_reject(tmp_path):
    rows = [{"id": i, "c": {"m": i / 2, "n": "x"}, "h": [{"m": 1.0, "n": "y"}] * i,
             "cutout": b"\0" * 100} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    # only the declared leaves, nested ones and those inside lists too: cutout, c.n and h.n
    # are never read
    assert list(read_parquet(str(tmp_path / "a.parquet"), parse(["c.m", "id", "h.m"]), 2)) == [
        {"id": r["id"], "c": {"m": r["c"]["m"]}, "h": [{"m": 1.0}] * r["id"]} for r in rows]
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not really")
    [error] = read_parquet(str(tmp_path / "b.parquet"), None, 2)
    assert isinstance(error, DecodeError) and "b.parquet is not a readable Parquet" in str(error)


def test_a_parquet_run_writes_a_row_group_a_batch_and_rejects_an_output_that_does_not_fit(
        tmp_path):
    pq.write_table(pa.Table.from_pylist([{"id": i, "x": float(i)} for i in range(4)]),
                   tmp_path / "in.parquet")

    def f(r):
        return {"id": r["id"], "y": "text" if r["id"] == 2 else r["x"] * 2}

    out = io.BytesIO()
    schema = {"type": "record", "name": "F", "fields": [{"name": "id", "type": "long"},
                                                         {"name": "y", "type": "double"}]}
    counts = batch_run.run(Preprocessor(f, input_fields=["id", "x"]),
                           [str(tmp_path / "in.parquet")], out, output_format="parquet",
                           output_schema=schema, rejects_path=str(tmp_path / "r.jsonl"))
    assert counts.summary().startswith("in=4 out=3 dropped=0 failed=1")
    assert pq.read_table(io.BytesIO(out.getvalue())).to_pylist() == [
        {"id": 0, "y": 0.0}, {"id": 1, "y": 2.0}, {"id": 3, "y": 6.0}]
    assert b'"stage":"encode"' in (tmp_path / "r.jsonl").read_bytes()
    # no output schema: the first batch's columns
    writer = ParquetWriter(io.BytesIO())
    assert [e is None for e in writer.write_many([{"a": 1}, {"a": "x"}])] == [True, False]

"""batch_format="arrow": pre_processing over a batch's columns gives what the per-record
function gives, on the real ZTF alerts, in pyfunc, `run` and Spark's transform."""

from __future__ import annotations

import json
import subprocess

import fastavro
import mlflow
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import BIN, DATA
from mlflow_preproc.runtime.records import Preprocessor, RecordError

PACKETS = sorted(DATA.glob("*.avro"))
FEATURE_NAMES = ["magpsf", "sigmapsf", "rb", "n_history", "history_mean"]
INPUT_FIELDS = ["candidate.magpsf", "candidate.sigmapsf", "candidate.rb",
                "prv_candidates.magpsf"]


def alerts() -> list[dict]:
    out = []
    for packet in PACKETS:
        with open(packet, "rb") as f:
            out.extend(fastavro.reader(f))
    return out


def per_record(alert: dict) -> list[float | None]:
    c = alert["candidate"]
    mags = [p["magpsf"] for p in alert["prv_candidates"] or [] if p["magpsf"] is not None]
    return [c["magpsf"], c["sigmapsf"], c["rb"], float(len(mags)),
            sum(mags) / len(mags) if mags else None]


def columnar(table: pa.Table) -> pa.Array:
    """The same features, over columns: one feature vector per row."""
    candidate = table.column("candidate")
    history = pc.struct_field(pc.list_flatten(table.column("prv_candidates")), "magpsf")
    parents = pc.list_parent_indices(table.column("prv_candidates"))
    rows = []
    for i in range(table.num_rows):  # the history per alert; the rest is whole columns
        mags = pc.drop_null(pc.filter(history, pc.equal(parents, i)))
        rows.append([pc.struct_field(candidate, "magpsf")[i].as_py(),
                     pc.struct_field(candidate, "sigmapsf")[i].as_py(),
                     pc.struct_field(candidate, "rb")[i].as_py(), float(len(mags)),
                     pc.mean(mags).as_py() if len(mags) else None])
    return pa.array(rows)


def columnar_polars(frame):
    """The same features over a polars DataFrame (batch_format="polars"): a frame out."""
    import polars as pl

    c = pl.col("candidate")
    mags = pl.col("prv_candidates").fill_null([]).list.eval(
        pl.element().struct.field("magpsf").drop_nulls())
    return frame.select(
        c.struct.field("magpsf").alias("magpsf"), c.struct.field("sigmapsf").alias("sigmapsf"),
        c.struct.field("rb").alias("rb"), mags.list.len().cast(pl.Float64).alias("n_history"),
        mags.list.mean().alias("history_mean"))


def _close(a: list, b: list) -> bool:
    return all(x == pytest.approx(y, rel=1e-6) if isinstance(x, float) else x == y
               for x, y in zip(a, b, strict=True))


def test_the_columnar_function_gives_what_the_per_record_one_gives_on_the_real_alerts():
    records = alerts()
    expected = Preprocessor(per_record, None, FEATURE_NAMES).process(records)
    for fields in (None, INPUT_FIELDS):
        got = Preprocessor(columnar, "arrow", FEATURE_NAMES, fields).process(records)
        assert len(got) == len(expected) == len(records)
        for outputs, wanted in zip(got, expected):
            assert _close([outputs[0][n] for n in FEATURE_NAMES],
                          [wanted[0][n] for n in FEATURE_NAMES])


def test_declared_fields_are_the_only_columns_and_a_table_out_is_one_record_per_row():
    seen = []

    def names(table: pa.Table) -> pa.Table:
        seen.append(table.schema)
        return pa.table({"n": pc.fill_null(pc.list_value_length(
            table.column("prv_candidates")), 0)})

    got = Preprocessor(names, "arrow", None, INPUT_FIELDS).process(alerts())
    assert seen[0].names == ["candidate", "prv_candidates"]
    assert [f.name for f in seen[0].field("candidate").type] == ["magpsf", "sigmapsf", "rb"]
    assert got == [[{"n": len(a["prv_candidates"] or [])}] for a in alerts()]


def test_a_wrong_row_count_is_named_and_a_record_arrow_cannot_hold_fails_alone():
    short = Preprocessor(lambda t: t.slice(0, 1), "arrow")
    with pytest.raises(RecordError, match="returned 1 rows for 2 input records; return one "
                                          "row per input"):
        short.process([{"x": 1}, {"x": 2}])
    doubled = Preprocessor(lambda t: t.append_column("y", pc.multiply(t.column("x"), 2)),
                           "arrow")
    # "x" is a string in one record only: the batch fails, then each record is run alone
    results = doubled.process_each([{"x": 1}, {"x": "one"}, {"x": 3}])
    assert results[0] == [{"x": 1, "y": 2}] and results[2] == [{"x": 3, "y": 6}]
    assert isinstance(results[1], RecordError) and results[1].index == 1
    # a list comes back as in records mode: None drops a record, a list of dicts fans it out
    mixed = Preprocessor(lambda t: [None, [{"a": 1}, {"a": 2}]], "arrow")
    assert mixed.process([{"x": 1}, {"x": 2}]) == [[], [{"a": 1}, {"a": 2}]]


def test_a_polars_function_gets_a_frame_and_gives_frames_series_or_lists():
    pl = pytest.importorskip("polars")
    records = alerts()
    expected = Preprocessor(per_record, None, FEATURE_NAMES).process(records)
    for fields in (None, INPUT_FIELDS):
        got = Preprocessor(columnar_polars, "polars", None, fields).process(records)
        for outputs, wanted in zip(got, expected, strict=True):
            assert _close([outputs[0][n] for n in FEATURE_NAMES],
                          [wanted[0][n] for n in FEATURE_NAMES])
    seen = []

    def doubled(frame):
        seen.append(type(frame))
        return frame.select((pl.col("x") * 2).alias("y"))

    assert Preprocessor(doubled, "polars").process([{"x": 1}, {"x": 2}]) == [[{"y": 2}],
                                                                          [{"y": 4}]]
    assert seen == [pl.DataFrame]
    # a Series is one value per input, named by FEATURE_NAMES; a list drops or fans out
    assert Preprocessor(lambda f: f["x"] * 1.5, "polars", ["f"]).process(
        [{"x": 1}, {"x": 2}]) == [[{"f": 1.5}], [{"f": 3.0}]]
    assert Preprocessor(lambda f: [None, [{"a": 1}, {"a": 2}]], "polars").process(
        [{"x": 1}, {"x": 2}]) == [[], [{"a": 1}, {"a": 2}]]
    with pytest.raises(RecordError, match="returned 1 rows for 2 input records"):
        Preprocessor(lambda f: f.head(1), "polars").process([{"x": 1}, {"x": 2}])
    # a record the table cannot hold fails alone, as in arrow mode
    results = Preprocessor(doubled, "polars").process_each([{"x": 1}, {"x": "one"}, {"x": 3}])
    assert results[0] == [{"y": 2}] and results[2] == [{"y": 6}]
    assert isinstance(results[1], RecordError) and results[1].index == 1


def test_polars_frames_returned_in_other_modes_are_read_as_rows_not_crashes():
    pl = pytest.importorskip("polars")
    # an arrow function that hands back polars' frame of its table
    assert Preprocessor(lambda t: pl.from_arrow(t), "arrow").process_each(
        [{"x": 1}, {"x": 2}]) == [[{"x": 1}], [{"x": 2}]]
    # a per-record function returning a frame: its rows are the record's outputs
    assert Preprocessor(lambda r: pl.DataFrame([r, r]), None).process([{"x": 1}]) == \
        [[{"x": 1}, {"x": 1}]]


@pytest.mark.parametrize("batch_format, fn", [("arrow", columnar), ("polars", columnar_polars)])
def test_a_columnar_model_serves_predict_and_run_as_the_per_record_model(
        tracking_uri, tmp_path, batch_format, fn):
    if batch_format == "polars":
        pytest.importorskip("polars")
    example = {k: v for k, v in alerts()[0].items() if not k.startswith("cutout")}
    with mlflow.start_run():
        arrow_model = mlflow.preproc.log_model(fn, name="a", batch_format=batch_format,
                                               feature_names=FEATURE_NAMES,
                                               input_fields=INPUT_FIELDS,
                                               input_example=example,
                                               pip_requirements=[]).model_uri
        record_model = mlflow.preproc.log_model(per_record, name="r",
                                                feature_names=FEATURE_NAMES,
                                                pip_requirements=[]).model_uri
    predicted = mlflow.pyfunc.load_model(arrow_model).predict(alerts())
    wanted = mlflow.pyfunc.load_model(record_model).predict(alerts())
    assert len(predicted) == len(wanted) == 2
    for got, expected in zip(predicted, wanted):
        assert _close([got[n] for n in FEATURE_NAMES], [expected[n] for n in FEATURE_NAMES])

    outputs = {}
    for name, model in (("arrow", arrow_model), ("records", record_model)):
        out = tmp_path / f"{name}.jsonl"
        ran = subprocess.run([str(BIN / "mlflow-preproc"), "run", "-m", model,
                              *map(str, PACKETS), "-o", str(out)],
                             capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    for got, expected in zip(outputs["arrow"], outputs["records"], strict=True):
        assert _close([got[n] for n in FEATURE_NAMES], [expected[n] for n in FEATURE_NAMES])

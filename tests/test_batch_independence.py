"""A record's outputs, or its verdict, never depend on the records beside it in its batch
(#32 findings 9 and 10): a pandas or columnar batch is built to the schema the input example
gave when the model was logged, never to one read off the batch."""

from __future__ import annotations

import io
import math

import fastavro
import mlflow
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_preproc.runtime.flavor import load_preprocessing
from mlflow_preproc.runtime.records import RecordError


def arrow_y(table):
    return [{"y": v} for v in pc.multiply(table["x"], 2).to_pylist()]


def polars_y(frame):
    import polars as pl

    return frame.select((pl.col("x") * 2).alias("y"))


def pandas_y(frame):
    return frame.assign(y=frame["x"] * 2)[["y"]]


def records_y(records):
    return [{"y": None if r["x"] is None else r["x"] * 2} for r in records]


def one_y(record):
    return {"y": None if record["x"] is None else record["x"] * 2}


MODELS = {"arrow": arrow_y, "polars": polars_y, "pandas": pandas_y, "records": records_y,
          None: one_y}


@pytest.fixture(scope="module")
def preprocessors(tmp_path_factory):
    """Each batch format's model, logged once with the example ``{"x": 1.5}``."""
    folder = tmp_path_factory.mktemp("models")
    loaded = {}
    for batch_format, fn in MODELS.items():
        path = folder / str(batch_format)
        mlflow.preproc.save_model(fn, str(path), batch_format=batch_format,
                                  input_fields=["x"], input_example={"x": 1.5})
        loaded[batch_format] = load_preprocessing(str(path)).preprocessor
    return loaded


def verdicts(results) -> list:
    """Outputs as JSON would carry them (2 and 2.0 differ), errors by their reason."""
    def shown(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        return (type(value).__name__, value) if value is not None else None
    return [("error", r.reason) if isinstance(r, RecordError)
            else [{k: shown(v) for k, v in out.items()} for out in r] for r in results]


def test_a_record_missing_a_field_or_holding_an_int_gets_what_it_gets_alone(preprocessors):
    # The finding: with batch_format="arrow" a record missing x gave y=None in a batch and was
    # dead-lettered alone; an int came out as 2 or 2.0 depending on its neighbours.
    records = [{"x": 1.5}, {}, {"x": 1}]
    for batch_format, preprocessor in preprocessors.items():
        together = verdicts(preprocessor.process_each(records))
        alone = [verdicts(preprocessor.process_each([r]))[0] for r in records]
        assert together == alone, batch_format
        assert alone[1] == [{"y": None}], batch_format
        if batch_format in ("arrow", "polars", "pandas"):  # x is the example's double column
            assert alone[2] == [{"y": ("float", 2.0)}], batch_format


def test_a_value_that_cannot_be_its_columns_type_is_that_records_error_alone(preprocessors):
    records = [{"x": 1.5}, {"x": "bright"}, {"x": 4.0}]
    for batch_format in ("arrow", "polars", "pandas"):
        results = verdicts(preprocessors[batch_format].process_each(records))
        assert results[0] == [{"y": ("float", 3.0)}] and results[2] == [{"y": ("float", 8.0)}]
        assert results[1][0] == "error" and "input example" in results[1][1], results[1]


ALERT = {"type": "record", "name": "A", "fields": [
    {"name": "x", "type": ["null", "double"]}, {"name": "n", "type": ["null", "long"]}]}


def _container(record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, ALERT, [{"x": record.get("x"), "n": record.get("n")}])
    return buf.getvalue()


values = st.one_of(st.none(), st.integers(-10**6, 10**6),
                   st.floats(allow_nan=False, allow_infinity=False, width=32))
records_st = st.lists(st.fixed_dictionaries({}, optional={"x": values, "n": st.integers(0, 9)}),
                      min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(records=records_st, cuts=st.lists(st.integers(0, 12), max_size=4))
def test_random_batches_give_every_record_what_it_gets_alone(preprocessors, records, cuts):
    bounds = sorted({0, len(records), *(c for c in cuts if c < len(records))})
    batches = [records[a:b] for a, b in zip(bounds, bounds[1:])]
    for batch_format, preprocessor in preprocessors.items():
        alone = [verdicts(preprocessor.process_each([r]))[0] for r in records]
        batched = [v for batch in batches for v in verdicts(preprocessor.process_each(batch))]
        assert batched == alone, batch_format


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(records=records_st, cuts=st.lists(st.integers(0, 12), max_size=4))
def test_columns_read_by_polars_avro_give_what_the_records_give(preprocessors, records, cuts):
    # The stream's columnar path: Avro containers read into a table, cast to the model's
    # batch schema, whatever other messages share the batch.
    pytest.importorskip("polars_avro")
    from mlflow_preproc.runtime.avro_columns import ColumnReader
    from mlflow_preproc.runtime.input_fields import parse

    bounds = sorted({0, len(records), *(c for c in cuts if c < len(records))})
    for batch_format in ("arrow", "polars"):
        preprocessor = preprocessors[batch_format]
        reader = ColumnReader(parse(["x"]))
        alone = [verdicts(preprocessor.process_each([{"x": r.get("x")}]))[0] for r in records]
        got = []
        for a, b in zip(bounds, bounds[1:]):
            table, rows = reader.table([_container(r) for r in records[a:b]])
            assert rows == list(range(b - a))
            got += verdicts(preprocessor.process_columns(table))
        assert got == alone, batch_format


def test_a_pandas_function_reading_an_undeclared_column_is_refused_at_logging(tmp_path):
    # Finding 10: df.get("boost", 1) read an undeclared field as absent (y=3 instead of 30)
    # with no error, and log_model logged it.
    def boosted(frame):
        return frame.assign(y=frame["x"] * frame.get("boost", 1))[["y"]]

    with pytest.raises(mlflow.exceptions.MlflowException, match="'boost'.*input_fields"):
        mlflow.preproc.save_model(boosted, str(tmp_path / "m"), batch_format="pandas",
                                  input_fields=["x"], input_example={"x": 3})

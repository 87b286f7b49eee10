"""A record that exhausts memory in pre_processing or in the model is that record's verdict,
found alone, never its batch's (#32's table: resource bound exceeded)."""

from __future__ import annotations

import pytest

from mlflow_preproc.runtime.prediction import PredictionError, Predictor
from mlflow_preproc.runtime.records import Preprocessor, RecordError
from verdict_cells import verdict


def allocates(record):
    if record["n"] > 1000:
        raise MemoryError()  # what a record asking for too much memory makes Python raise
    return {"n": record["n"]}


def allocates_batch(records):
    return [allocates(r) for r in records]


@verdict("pre_processing", "resource bound exceeded")
@pytest.mark.parametrize("fn, batch_format", [(allocates, None), (allocates_batch, "records")])
def test_a_memory_error_on_a_record_is_that_records_error_alone(fn, batch_format):
    results = Preprocessor(fn, batch_format).process_each([{"n": 1}, {"n": 10**9}, {"n": 2}])
    assert results[0] == [{"n": 1}] and results[2] == [{"n": 2}]
    assert isinstance(results[1], RecordError) and "MemoryError" in results[1].reason


class Allocating:
    """A model that runs out of memory on a record with a large value."""

    def predict(self, features):
        if any(f["n"] > 1000 for f in features.to_dict(orient="records")):
            raise MemoryError()
        return [f * 2 for f in features["n"]]


@verdict("in-process predict", "resource bound exceeded")
def test_a_memory_error_of_the_model_on_a_record_is_that_records_error_alone():
    predictions = Predictor(Allocating(), "models:/m/1").predict_each(
        [{"n": 1}, {"n": 10**9}, {"n": 2}])
    assert predictions[0] == 2 and predictions[2] == 4
    assert isinstance(predictions[1], PredictionError) and "MemoryError" in str(predictions[1])


class Refusing:
    """A model that refuses a record it cannot predict (a NaN feature, say)."""

    def predict(self, features):
        if features["n"].isna().any():
            raise ValueError("Input X contains NaN")
        return list(features["n"] * 2)


@verdict("in-process predict", "bad record")
def test_a_record_the_model_fails_on_is_that_records_error_and_the_rest_is_predicted():
    predictions = Predictor(Refusing(), "models:/m/1").predict_each(
        [{"n": 1}, {"n": None}, {"n": 3}])
    assert predictions[0] == 2 and predictions[2] == 6
    assert isinstance(predictions[1], PredictionError) and "NaN" in str(predictions[1])

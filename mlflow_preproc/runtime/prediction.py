"""A prediction model in the same process as the preprocessing: features in, predictions out.

``mlflow-preproc stream --prediction-model-uri MODEL_URI`` runs it after ``pre_processing`` on
every batch, so the stream produces predictions in one hop, without a model server and a
bridge. Each prediction becomes a record of the key fields the user names (``KEEP_FIELDS``) and
the prediction itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlflow_preproc.runtime.dependencies import Misconfigured
from mlflow_preproc.runtime.model_input import model_input, per_record

PREDICTION_FIELD = "prediction"


class PredictionError(Exception):
    """The model failed on one record; the message is the model's."""


class Predictor:
    """A pyfunc model and the fields of the input kept beside its predictions."""

    def __init__(self, model, uri: str, keep_fields: Sequence[str] = ()):
        self.model = model
        self.uri = uri
        self.keep_fields = list(keep_fields)

    @classmethod
    def load(cls, model_uri: str, keep_fields: Sequence[str] = ()) -> Predictor:
        """Load ``model_uri``; a folder (a model baked into an image) is named by the
        identity written into it, for the provenance header."""
        import os

        import mlflow

        from mlflow_preproc.runtime.model_identity import local_identity, require_store

        name = local_identity(model_uri).uri if os.path.isdir(model_uri) else model_uri
        require_store(model_uri)
        try:
            model = mlflow.pyfunc.load_model(model_uri)
        except ImportError as exc:  # refused at start, before any record is read
            raise Misconfigured(f"the prediction model {name} needs {exc.name or exc!s}, which "
                                f"cannot be imported here ({exc}); install the model's "
                                "requirements (mlflow models prepare-env, or its "
                                "requirements.txt) where the stream runs") from None
        return cls(model, name, keep_fields)

    def predict_each(self, features: Sequence[Any]) -> list[Any]:
        """One prediction per feature record; a record the model fails on gets a
        :class:`PredictionError` instead, the rest of the batch is still predicted."""
        if not features:
            return []
        try:
            return per_record(self.model.predict(model_input(features)), len(features))
        except Exception as exc:  # noqa: BLE001 -- whatever the model raises, find the record
            if len(features) == 1:
                return [PredictionError(f"the model failed: {type(exc).__name__}: {exc}")]
        return [self.predict_each([f])[0] for f in features]

    def output(self, record: dict, features: Any, prediction: Any) -> dict:
        """The record produced for one prediction: the kept fields (from the input record,
        else from the features), then the prediction."""
        out = {}
        for path in self.keep_fields:
            value = _get(record, path)
            if value is None and isinstance(features, dict):
                value = _get(features, path)
            out[path] = value
        out[PREDICTION_FIELD] = prediction
        return out


def _get(record: Any, path: str) -> Any:
    node = record
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node

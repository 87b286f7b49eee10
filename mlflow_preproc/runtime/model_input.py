"""What a model is given for a batch of preprocessed records, and what comes back per record.

Preprocessing outputs are named records (dicts, e.g. from ``FEATURE_NAMES``) or bare feature
vectors. A model trained on named features (a column signature) wants them as columns; one
trained on arrays wants rows of values. The bridge sends them over REST in the MLflow scoring
protocol (:func:`payload`); the stream with a prediction model passes them to
``pyfunc.predict`` in process (:func:`model_input`). Both read the answer back one prediction
per record (:func:`per_record`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def columns(records: Sequence[dict]) -> list[str]:
    """Every key of ``records``, in the order they first appear."""
    return list(dict.fromkeys(key for record in records for key in record))


def payload(records: Sequence[Any], fmt: str = "auto") -> dict:
    """The scoring-protocol body for ``records``.

    ``auto``: named records as ``dataframe_split`` (columns once, then rows), feature vectors
    as ``instances``. The other formats are MLflow's own; ``inputs`` suits tensor signatures.
    """
    if fmt == "auto":
        fmt = "dataframe_split" if all(isinstance(r, dict) for r in records) else "instances"
    if fmt == "dataframe_split":
        names = columns(records)
        return {"dataframe_split": {"columns": names,
                                    "data": [[r.get(n) for n in names] for r in records]}}
    if fmt == "dataframe_records":
        return {"dataframe_records": list(records)}
    return {fmt: list(records)}


def scoring_records(value: Any) -> list[Any] | None:
    """The records of an MLflow scoring payload (``{"inputs": [...]}``, ``instances``,
    ``dataframe_records`` or ``dataframe_split``, the key alone), or None for anything else:
    a file written for ``mlflow models predict -i`` reads as its records in ``run`` too."""
    if not isinstance(value, dict) or len(value) != 1:
        return None
    (key, body), = value.items()
    if key in ("inputs", "instances", "dataframe_records") and isinstance(body, list):
        return body
    if key == "dataframe_split" and isinstance(body, dict) and \
            isinstance(body.get("data"), list) and isinstance(body.get("columns"), list):
        return [dict(zip(body["columns"], row)) if isinstance(row, list) else row
                for row in body["data"]]
    return None


def model_input(records: Sequence[Any]):
    """``records`` as ``pyfunc.predict`` takes them: a DataFrame with one column per name for
    named records, else a 2-d array of the vectors."""
    if all(isinstance(r, dict) for r in records):
        import pandas as pd

        return pd.DataFrame(list(records), columns=columns(records))
    import numpy as np

    return np.asarray(list(records))


def per_record(predictions: Any, expected: int) -> list[Any]:
    """One prediction per input record from what a model returned (a list, an array, a
    Series, a DataFrame, or the ``predictions`` of a scoring server's answer)."""
    kind = type(predictions).__name__
    if kind == "DataFrame":
        rows = predictions.to_dict(orient="records")
    elif kind in ("Series", "ndarray"):
        rows = list(predictions)
    elif isinstance(predictions, dict):  # columns of values: {"label": [...], "score": [...]}
        rows = [dict(zip(predictions, row)) for row in zip(*predictions.values())]
    else:
        rows = list(predictions)
    if len(rows) != expected:
        raise ValueError(f"the model returned {len(rows)} predictions for {expected} records; "
                         "it must return one per record")
    return rows

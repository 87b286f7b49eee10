"""The body ``predict`` posts to a deployment's ``/invocations``, from what MLflow hands it."""

from __future__ import annotations

import json
from typing import Any

_PAYLOAD_KEYS = ("inputs", "dataframe_records", "dataframe_split", "instances")


def scoring_payload(inputs: Any) -> dict:
    """The scoring-protocol body for what ``predict`` was given: a payload of any of MLflow's
    forms, a list of records, one record, or what ``mlflow deployments predict -I`` makes of a
    file (``pandas.read_json``: a payload file becomes a one-column frame named after its key)."""
    import pandas as pd

    if isinstance(inputs, pd.DataFrame):
        if len(inputs.columns) == 1 and inputs.columns[0] in _PAYLOAD_KEYS:
            key = inputs.columns[0]
            # A list became rows 0..n-1; an object (dataframe_split, columnar inputs) became
            # an index of its keys.
            orient = "values" if isinstance(inputs.index, pd.RangeIndex) else "index"
            return {key: json.loads(inputs[key].to_json(orient=orient))}
        return {"inputs": json.loads(inputs.to_json(orient="records"))}
    if isinstance(inputs, dict) and set(_PAYLOAD_KEYS) & set(inputs):
        return inputs
    return {"inputs": inputs if isinstance(inputs, list) else [inputs]}

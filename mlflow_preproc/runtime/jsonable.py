"""Turn preprocessing outputs into values that serialise to valid JSON.

Every JSON boundary of the package (the pyfunc/REST output, JSON and JSON Lines files,
JSON Kafka records) goes through :func:`to_jsonable`, so a record looks the same whichever
way it leaves. The rules, documented in docs/concepts.md:

==========================================  ================================================
value                                       JSON
==========================================  ================================================
numpy integer / float / bool scalars        number / boolean
numpy arrays, tuples, sets                  arrays (sets sorted when sortable)
``float('nan')``, ``inf``, ``-inf``          ``null`` (JSON has no NaN; strict parsers reject it)
``datetime``, ``date``, ``time``,           ISO 8601 strings; pandas ``NaT`` -> ``null``
pandas ``Timestamp``
``bytes``, ``bytearray``, ``memoryview``    base64 strings (standard alphabet, padded)
``decimal.Decimal``                         string, so no precision is lost
``uuid.UUID``, ``pathlib.Path``, enums      string (an enum gives its value)
==========================================  ================================================
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import enum
import math
import pathlib
import uuid
from typing import Any

import numpy as np
import orjson


def to_jsonable(value: Any) -> Any:
    """Return ``value`` with every nested element converted to a JSON-native type."""
    # The common cases first: most records are flat dicts of str/int/float.
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())  # a 0-d array gives a scalar
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        # pandas.NaT is a datetime subclass whose isoformat() is the string "NaT".
        return None if value != value else value.isoformat()
    if isinstance(value, (set, frozenset)):
        try:
            return [to_jsonable(v) for v in sorted(value)]
        except TypeError:
            return [to_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, (decimal.Decimal, uuid.UUID, pathlib.PurePath)):
        return str(value)
    if hasattr(value, "to_dict"):  # pandas Series and the like
        return to_jsonable(value.to_dict())
    if value is getattr(np, "nan", object()) or _is_na(value):
        return None
    raise TypeError(
        f"cannot convert a {type(value).__name__} to JSON; return only JSON-friendly values "
        "(dict, list, str, number, bool, None, numpy, datetime, bytes) from pre_processing"
    )


def _is_na(value: Any) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (ImportError, TypeError, ValueError):
        return False


def dumps(value: Any) -> bytes:
    """Serialise ``value`` to compact UTF-8 JSON bytes using the rules above.

    orjson does the common types in C (it already writes NaN as null, numpy and datetimes as
    above); anything else goes through :func:`to_jsonable`.
    """
    try:
        return orjson.dumps(value, default=to_jsonable, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:
        # Non-string dict keys: orjson's option for them costs ~40% on every record, so it
        # is only used when needed.
        return orjson.dumps(value, default=to_jsonable,
                            option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


"""``@verdict(boundary, fault)``: marks a test as one that shows the outcome of a cell of
:data:`mlflow_preproc.verdicts.TABLE` (tests/test_verdicts.py checks every applicable cell
has one)."""

from __future__ import annotations

import pytest

from mlflow_preproc.verdicts import TABLE, Outcome


def verdict(boundary: str, fault: str) -> pytest.MarkDecorator:
    """The marker of the test of cell (``boundary``, ``fault``), which must be in the table
    and applicable."""
    found = TABLE[(boundary, fault)]  # a KeyError: a cell the table does not have
    if found.outcome is Outcome.NOT_APPLICABLE:
        raise ValueError(f"({boundary}, {fault}) is not applicable: {found.note}")
    return pytest.mark.verdict(boundary, fault)

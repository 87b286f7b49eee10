"""The verdict table (mlflow_preproc/verdicts.py) and the suite agree: every fault class at
every boundary has an outcome, every applicable one a test marked ``@verdict(...)`` that
shows it, and docs/concepts.md shows the table as it is (#32)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mlflow_preproc.verdicts import BOUNDARIES, FAULTS, TABLE, Outcome, cells, table_markdown

TESTS = Path(__file__).parent
CONCEPTS = TESTS.parent / "docs" / "concepts.md"


def marked() -> dict[tuple[str, str], list[str]]:
    """Cell -> the tests marked for it (``module::test``), read from the test files."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", "") == \
                        "verdict":
                    cell = tuple(arg.value for arg in decorator.args)
                    found.setdefault(cell, []).append(f"{path.stem}::{node.name}")
    return {cell: sorted(tests) for cell, tests in found.items()}


def test_every_fault_at_every_boundary_has_a_verdict():
    assert set(TABLE) == set(cells()) and len(TABLE) == len(BOUNDARIES) * len(FAULTS)
    assert all(verdict.note for verdict in TABLE.values())


@pytest.mark.parametrize("cell", cells(), ids=lambda c: f"{c[0]}|{c[1]}")
def test_every_applicable_cell_has_a_test_and_no_other_has(cell):
    tests = marked().get(cell, [])
    if TABLE[cell].outcome is Outcome.NOT_APPLICABLE:
        assert not tests, f"{cell} is not applicable, yet {tests} claim it"
    else:
        assert tests, f"no test is marked @verdict{cell}: {TABLE[cell]}"


def test_marks_name_only_cells_of_the_table():
    assert set(marked()) <= set(TABLE)


def test_the_concepts_page_shows_the_table_as_it_is():
    assert table_markdown(marked()) in CONCEPTS.read_text(), \
        "regenerate the table in docs/concepts.md from mlflow_preproc.verdicts.table_markdown"

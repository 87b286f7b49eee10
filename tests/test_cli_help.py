"""The ``--help`` of every ``mlflow-preproc`` command, word for word, against texts kept in
tests/data/cli_help/ (one file per command: ``mlflow-preproc.txt`` for the top one,
``mlflow-preproc_dlq_inspect.txt`` for ``mlflow-preproc dlq inspect``). A move of the parser's
code (issue #39) must leave every text as it was; a change of a help text is a change a user
sees, made on purpose, with the files written again.

To write the files again (after a help text changed on purpose), from the repository root::

    COLUMNS=100 .venv/bin/python tests/test_cli_help.py

The width is fixed (argparse wraps to ``$COLUMNS``) and so is Python's minor version: argparse's
layout changed between versions (3.13 prints ``-m, --model-uri MODEL_URI``), so the texts are
those of the Python in tests/data/cli_help/PYTHON, the project's, and another one skips.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from test_cli import parsers

TEXTS = Path(__file__).resolve().parent / "data" / "cli_help"
COLUMNS = "100"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _file(words: str) -> Path:
    return TEXTS / ("_".join(["mlflow-preproc", *words.split()]) + ".txt")


def _help_texts() -> dict[str, str]:
    """Every command's --help, by its command words, at the fixed width."""
    return {words: parser.format_help() for words, parser in parsers().items()}


@pytest.fixture()
def fixed_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", COLUMNS)
    monkeypatch.delenv("LINES", raising=False)
    if (TEXTS / "PYTHON").read_text().strip() != PYTHON:
        pytest.skip(f"the help texts are argparse's of Python "
                    f"{(TEXTS / 'PYTHON').read_text().strip()}, this is {PYTHON}")


def test_every_command_has_its_help_text(fixed_width):
    """A command added or removed changes the files too (a new command's text is kept)."""
    kept = {p.name for p in TEXTS.glob("*.txt")}
    assert kept == {_file(words).name for words in parsers()}, (
        f"write the texts again: COLUMNS={COLUMNS} .venv/bin/python tests/test_cli_help.py")


@pytest.mark.parametrize("words", sorted(parsers()), ids=lambda w: w or "mlflow-preproc")
def test_help_text_is_unchanged(fixed_width, words):
    assert parsers()[words].format_help() == _file(words).read_text(), (
        f"the --help of mlflow-preproc {words} changed; if on purpose, write the texts again: "
        f"COLUMNS={COLUMNS} .venv/bin/python tests/test_cli_help.py")


if __name__ == "__main__":  # write the texts again: see the module's docstring
    if os.environ.get("COLUMNS") != COLUMNS:
        sys.exit(f"run with COLUMNS={COLUMNS}, the width the test uses")
    TEXTS.mkdir(parents=True, exist_ok=True)
    for old in TEXTS.glob("*.txt"):
        old.unlink()
    for words, text in _help_texts().items():
        _file(words).write_text(text)
    (TEXTS / "PYTHON").write_text(PYTHON + "\n")
    print(f"wrote {len(_help_texts())} help texts to {TEXTS}")

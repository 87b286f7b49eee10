"""The ``mlflow-preproc`` command line as parsed: help text, flags and their meaning. Pure
argparse and the settings table; the commands themselves run in the other test files."""

from __future__ import annotations

import argparse

import pytest

from mlflow_preproc import cli
from mlflow_preproc import config as settings

COMMANDS = (["run"], ["stream"], ["bridge"], ["manifests"], ["builds", "serve"], ["broker"],
            ["verify"])


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the command, by its command words (``""`` is the top one)."""
    found = {"": cli._parser()}
    todo = [("", found[""])]
    while todo:
        words, parser = todo.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    key = f"{words} {name}".strip()
                    found[key] = sub
                    todo.append((key, sub))
    return found


def parse(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(list(argv))


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# ---- finding 4: help that teaches, flags that mean one thing ----------------------------------

@pytest.mark.parametrize("words", [" ".join(c) for c in COMMANDS])
def test_each_command_has_plain_help_with_examples(words):
    text = parsers()[words].format_help()
    assert "``" not in text, text
    examples = text.split("examples:", 1)
    assert len(examples) == 2, f"no examples in mlflow-preproc {words} --help"
    assert f"mlflow-preproc {words}" in examples[1]


def test_the_top_help_is_plain_text():
    assert "``" not in parsers()[""].format_help()


@pytest.mark.parametrize("words, needed", [
    ("stream", ("-m MODEL_URI", "--input-topic")),
    ("bridge", ("--input-topic", "--output-topic", "--api-url")),
])
def test_usage_lines_show_the_options_that_matter(words, needed):
    usage = parsers()[words].format_usage()
    assert len(usage.splitlines()) <= 3, usage  # a usage line, not every setting again
    for flag in needed:
        assert flag in usage, usage


def test_abbreviated_flags_are_refused_everywhere(capsys):
    assert all(not p.allow_abbrev for p in parsers().values())
    err = refused(capsys, "run", "-m", "models:/m/1", "--skip-cutout")
    assert "unrecognized arguments: --skip-cutout" in err
    assert "unrecognized arguments: --input-top" in refused(capsys, "stream", "--input-top", "t")


@pytest.mark.parametrize("argv, usage, said", [
    (["run", "-m", "models:/m/1", "--ouput", "out.jsonl", "in.json"], "mlflow-preproc run",
     "unrecognized arguments: --ouput (did you mean --output?)"),
    (["stream", "--input-topic", "t", "--kafka-bootstrap-server", "b:9092"],
     "mlflow-preproc stream",
     "unrecognized arguments: --kafka-bootstrap-server b:9092 (did you mean "
     "--kafka-bootstrap-servers?)"),
    (["dlq", "replay", "t-dlq", "--froce"], "mlflow-preproc dlq replay",
     "unrecognized arguments: --froce (did you mean --force?)"),
    (["status", "--group", "g", "--xyzzy"], "mlflow-preproc status",
     "unrecognized arguments: --xyzzy"),
])
def test_a_mistyped_flag_shows_its_commands_usage_and_the_closest_flag(capsys, argv, usage,
                                                                        said):
    """The top-level usage and no suggestion were all a typo got (#37 item 7)."""
    err = refused(capsys, *argv).strip().splitlines()
    assert err[0].startswith(f"usage: {usage} "), err
    assert err[-1] == f"{usage}: error: {said}", err


@pytest.mark.parametrize("command", [["run", "-m", "models:/m/1"], ["stream"]])
def test_skip_cutouts_is_a_flag_in_run_and_stream_and_the_variable_still_works(command):
    mode = command[0]
    flagged = settings.load(mode, parse(*command, "--skip-cutouts"), environ={})
    assert flagged["SKIP_CUTOUTS"] is True
    from_env = settings.load(mode, parse(*command), environ={"SKIP_CUTOUTS": "true"})
    assert from_env["SKIP_CUTOUTS"] is True
    unset = settings.load(mode, parse(*command), environ={})
    assert unset["SKIP_CUTOUTS"] is False
    overridden = settings.load(mode, parse(*command, "--no-skip-cutouts"),
                               environ={"SKIP_CUTOUTS": "true"})
    assert overridden["SKIP_CUTOUTS"] is False


def test_on_stream_m_is_the_preprocessing_model_and_the_classifier_flag_says_so(capsys):
    args = parse("stream", "-m", "models:/prep/1", "--prediction-model-uri", "models:/clf/1")
    cfg = settings.load("stream", args, environ={})
    assert (cfg["MODEL_URI"], cfg["PREDICTION_MODEL_URI"]) == ("models:/prep/1", "models:/clf/1")
    assert settings.load("stream", parse("stream", "--model-uri", "models:/prep/1"),
                         environ={})["MODEL_URI"] == "models:/prep/1"
    # --model read as the classifier beside -m as the preprocessing model: one meaning too many
    assert "unrecognized arguments: --model" in refused(capsys, "stream", "--model", "x")


def test_every_error_class_the_command_prints_as_one_line_exists():
    """cli._USER_ERRORS names them by module and class, so that printing status's or dlq's
    line does not import MLflow (7 s): a renamed class would make its errors tracebacks."""
    import importlib

    for module, name in cli._USER_ERRORS:
        assert isinstance(getattr(importlib.import_module(module), name), type), (module, name)

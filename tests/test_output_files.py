"""Files a run writes whole or not at all (mlflow_preproc.runtime.output_files); the CLI's
side is in test_batch_run.py."""

from __future__ import annotations

import os

import pytest

from mlflow_preproc.runtime.output_files import (
    InputOverwritten,
    refuse_inputs_as_outputs,
    replaced_when_done,
)


def test_an_output_naming_an_input_by_any_spelling_or_link_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    for output in ("in.jsonl", "./in.jsonl", str(tmp_path / "in.jsonl"), "link.jsonl",
                   "sub/../in.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(InputOverwritten, match=f"the output {output} is also an input"):
            refuse_inputs_as_outputs(["in.jsonl"], [("the output", output, "fix")])
    refuse_inputs_as_outputs(["in.jsonl", "-"], [("the output", "out.jsonl", "fix")])


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_a_block_that_raises_leaves_the_old_file_and_no_temporary_file(tmp_path, interruption):
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old\n")
    with pytest.raises(interruption):
        with replaced_when_done(str(target)) as out:
            out.write(b"half of the new content")
            raise interruption()
    assert target.read_bytes() == b"old\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_a_block_that_ends_replaces_the_file_and_keeps_its_mode(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old\n")
    target.chmod(0o640)
    with replaced_when_done(str(target)) as out:
        out.write(b"new\n")
        assert target.read_bytes() == b"old\n"  # not before the end
    assert target.read_bytes() == b"new\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)
    assert os.listdir(tmp_path) == ["out.jsonl"]

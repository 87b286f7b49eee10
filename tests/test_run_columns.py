"""`run` on Avro files through the column reader (#36): a container file a batch of blocks at
a time, a folder of one-alert files a batch of files at a time; the outputs and rejects are
those of fastavro's path, record by record (compressed and damaged files are left to it)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mlflow_preproc.runtime import batch_run
from mlflow_preproc.runtime.records import Preprocessor
from ztf_archive import write_archive

avro_columns = pytest.importorskip("mlflow_preproc.runtime.avro_columns")
if not avro_columns.installed():
    pytest.skip("polars-avro (the columnar extra) is not installed", allow_module_level=True)

FINK_FIELDS = ["candid", "objectId", "candidate.magpsf", "candidate.sigmapsf", "candidate.jd",
               "candidate.isdiffpos", "prv_candidates.magpsf", "prv_candidates.jd"]


def features(record):
    if record["candidate"]["magpsf"] > 18.6:
        raise ValueError("too faint")  # a preprocess reject, in its place
    return {k: v for k, v in record.items() if not k.startswith("cutout")}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[str]:
    """A container file of 60 alerts, then 30 one-alert files (every 7th deflated, one cut
    short), then the container again."""
    root = tmp_path_factory.mktemp("archive")
    [big] = write_archive(root / "big", 60, 60, stamp_bytes=64)
    small = write_archive(root / "small", 30, 1, stamp_bytes=64, deflate_every=7)
    small[12].write_bytes(small[12].read_bytes()[:-300])
    return [str(p) for p in (big, *small, big)]


def run(paths: list[str], fields, tmp: Path, columns: bool) -> tuple[bytes, bytes, str]:
    out = io.BytesIO()
    (tmp / str(columns)).mkdir()
    rejects = tmp / str(columns) / "rejects.jsonl"
    counts = batch_run.run(Preprocessor(features, input_fields=fields), paths, out,
                           rejects_path=str(rejects), avro_columns=columns,
                           fields_to_drop=["candidate.rb"])
    return out.getvalue(), rejects.read_bytes(), counts.summary().replace(str(columns), "")


@pytest.mark.parametrize("fields", [FINK_FIELDS, None], ids=["declared", "whole"])
def test_a_run_on_avro_files_reads_them_into_columns_with_fastavros_outputs(
        archive, fields, tmp_path, monkeypatch):
    taken = []
    real = avro_columns.ColumnReader.records

    def counted(self, values):  # the real reader, counted: how many messages it read
        got = real(self, values)
        taken.append(sum(r is not None for r in got))
        return got

    monkeypatch.setattr(avro_columns.ColumnReader, "records", counted)
    with_columns = run(archive, fields, tmp_path, True)
    assert taken and sum(taken) >= 2 + 30 - 5 - 1, taken  # 2 blocks, the plain small files
    assert len(taken) <= 4, "the blocks of a file, and the small files, read a batch a call"
    taken.clear()
    assert with_columns == run(archive, fields, tmp_path, False)
    assert not taken
    assert "failed=" in with_columns[2] and b'"stage":"decode"' in with_columns[1]


def test_spark_tasks_read_avro_files_through_the_column_reader_with_the_same_records(
        archive, monkeypatch):
    # run --engine spark's executors read each file with read_records as run does: with
    # polars-avro there, through the column reader, the records those of fastavro's path.
    from mlflow_preproc.runtime.formats import DecodeError, read_records
    from mlflow_preproc.runtime.input_fields import parse
    from mlflow_preproc.spark.tasks import PartitionJob

    taken = []
    real = avro_columns.ColumnReader.records

    def counted(self, values):
        got = real(self, values)
        taken.append(sum(r is not None for r in got))
        return got

    monkeypatch.setattr(avro_columns.ColumnReader, "records", counted)
    job = PartitionJob(model=None, schema=None, output_type=None, files=True)
    fields = parse(FINK_FIELDS)
    for path in archive[:3]:
        content = Path(path).read_bytes()
        got = [item for _, _, item in job._file_records(path, content, fields)]
        expected = list(read_records(io.BufferedReader(io.BytesIO(content)), "avro", path,
                                     fields=fields))
        assert [str(x) if isinstance(x, DecodeError) else x for x in got] == \
            [str(x) if isinstance(x, DecodeError) else x for x in expected]
    assert sum(taken) >= 2, "the column reader read none of the files"

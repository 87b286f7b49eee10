"""`mlflow-preproc run`: files and stdin, as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import fastavro
import mlflow
import pytest

from conftest import BIN, DATA
from verdict_cells import verdict

pytestmark = pytest.mark.slow

ZTF_PACKETS = sorted(DATA.glob("*.avro"))


def features(record):
    if record.get("drop"):
        return None
    if record.get("fanout"):
        return [{"id": record["id"], "part": p} for p in range(record["fanout"])]
    return {"id": record["id"], "double": record["x"] * 2}


def ztf_features(alert):
    return {"objectId": alert["objectId"], "magpsf": alert["candidate"]["magpsf"],
            "fields": sorted(alert)}


@pytest.fixture
def model(tracking_uri):
    out_schema = {"type": "record", "name": "F", "fields": [
        {"name": "id", "type": "long"}, {"name": "double", "type": "double"}]}
    with mlflow.start_run():
        info = mlflow.preproc.log_model(features, name="p", output_avro_schema=out_schema,
                                        pip_requirements=[])
    return info.model_uri


def run_cli(*args: str, stdin: bytes = b"", cwd: Path | None = None, env: dict | None = None):
    import os

    return subprocess.run([str(BIN / "mlflow-preproc"), "run", *args], input=stdin,
                          capture_output=True, cwd=cwd, timeout=300,
                          env={**os.environ, **(env or {})})


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_jsonl_from_stdin_to_stdout(model, tmp_path):
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in [
        {"id": 1, "x": 2}, {"id": 2, "drop": True}, {"id": 3, "fanout": 2}])
    proc = run_cli("-m", model, stdin=lines, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert jsonl(proc.stdout) == [{"id": 1, "double": 4}, {"id": 3, "part": 0},
                                  {"id": 3, "part": 1}]
    assert b"in=3 out=3 dropped=1 failed=0" in proc.stderr
    assert not (tmp_path / "rejects.jsonl").exists()


def test_json_array_and_object_files_to_a_file(model, tmp_path):
    (tmp_path / "batch.json").write_text(json.dumps([{"id": 1, "x": 1}, {"id": 2, "x": 2}]))
    (tmp_path / "one.json").write_text(json.dumps({"id": 3, "x": 3}, indent=2))
    proc = run_cli("-m", model, "batch.json", "one.json", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert jsonl((tmp_path / "out.jsonl").read_bytes()) == [
        {"id": 1, "double": 2}, {"id": 2, "double": 4}, {"id": 3, "double": 6}]


@verdict("pre_processing", "bad record")
def test_failed_records_go_to_the_rejects_file_and_set_the_exit_code(model, tmp_path):
    data = b'{"id": 1, "x": 1}\n{"id": 2}\nnot json\n{"id": 4, "x": 4}\n'
    (tmp_path / "in.jsonl").write_bytes(data)
    proc = run_cli("-m", model, "in.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 1
    assert b"in=4 out=2 dropped=0 failed=2 (rejects: out.jsonl.rejects.jsonl)" in proc.stderr
    assert [r["id"] for r in jsonl((tmp_path / "out.jsonl").read_bytes())] == [1, 4]
    rejects = jsonl((tmp_path / "out.jsonl.rejects.jsonl").read_bytes())
    assert [(r["index"], r["stage"]) for r in rejects] == [(1, "preprocess"), (2, "decode")]
    assert rejects[0]["error"] == "record 1: pre_processing raised KeyError: 'x'"
    assert rejects[0]["record"] == {"id": 2}
    assert "line 3 is not valid JSON" in rejects[1]["error"]
    assert rejects[1]["record"] == "not json\n"  # what was rejected, as it was

    # The rejects file is the run's: the next run with failures replaces it and says so; a
    # clean one removes it, so an earlier run's rejects are never taken for this one's.
    (tmp_path / "in.jsonl").write_bytes(b'{"id": 5}\n')
    proc = run_cli("-m", model, "in.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert b"failed=1 (rejects: out.jsonl.rejects.jsonl, replacing an earlier run's)" \
        in proc.stderr
    assert [r["record"] for r in jsonl((tmp_path / "out.jsonl.rejects.jsonl").read_bytes())] \
        == [{"id": 5}]
    (tmp_path / "in.jsonl").write_bytes(b'{"id": 6, "x": 1}\n')
    proc = run_cli("-m", model, "in.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 0
    assert b"failed=0 (removed out.jsonl.rejects.jsonl of an earlier run)" in proc.stderr
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()

    # Never at the cost of data: a run cut short keeps the earlier rejects, and a rejects
    # path that is an input (stdout output, `run rejects.jsonl`) is refused, not deleted.
    (tmp_path / "rejects.jsonl").write_bytes(b'{"id": 7, "x": 1}\n')
    (tmp_path / "earlier.rejects.jsonl").write_bytes(b'{"index": 0}\n')
    proc = run_cli("-m", model, "in.jsonl", "missing.jsonl", "--rejects",
                   "earlier.rejects.jsonl", cwd=tmp_path)
    assert proc.returncode == 2 and (tmp_path / "earlier.rejects.jsonl").exists()
    proc = run_cli("-m", model, "rejects.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert b"the rejects file rejects.jsonl is also an input; pass --rejects another path" \
        in proc.stderr
    assert (tmp_path / "rejects.jsonl").read_bytes() == b'{"id": 7, "x": 1}\n'


def test_the_progress_bar_counts_records(model, tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"".join(b'{"id": %d, "x": 1}\n' % i
                                                 for i in range(2500)))
    proc = run_cli("-m", model, "in.jsonl", "-o", "out.jsonl", "--progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    bar = proc.stderr.decode()
    assert "in.jsonl" in bar and "1,000 records" in bar and "2,500 records" in bar


def test_ztf_avro_files_with_cutouts_dropped(tracking_uri, tmp_path):
    with mlflow.start_run():
        info = mlflow.preproc.log_model(ztf_features, name="ztf", pip_requirements=[])
    proc = run_cli("-m", info.model_uri, *map(str, ZTF_PACKETS), "--skip-cutouts", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    out = jsonl(proc.stdout)
    expected = []
    for packet in ZTF_PACKETS:
        with open(packet, "rb") as f:
            alert = next(fastavro.reader(f))
        expected.append({"objectId": alert["objectId"], "magpsf": alert["candidate"]["magpsf"],
                         "fields": ["candid", "candidate", "objectId", "prv_candidates",
                                    "publisher", "schemavsn"]})
    assert out == expected


def test_skip_cutouts_and_drop_fields_are_read_from_the_environment(tracking_uri, tmp_path):
    with mlflow.start_run():
        info = mlflow.preproc.log_model(ztf_features, name="ztf", pip_requirements=[])
    proc = run_cli("-m", info.model_uri, *map(str, ZTF_PACKETS), cwd=tmp_path,
                   env={"SKIP_CUTOUTS": "true", "DROP_FIELDS": "publisher,schemavsn"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert {tuple(r["fields"]) for r in jsonl(proc.stdout)} == {
        ("candid", "candidate", "objectId", "prv_candidates")}


def test_cutout_bytes_are_base64_in_json_output(tracking_uri, tmp_path):
    with mlflow.start_run():
        info = mlflow.preproc.log_model(
            lambda a: {"stamp": a["cutoutScience"]["stampData"]}, name="stamp",
            pip_requirements=[])
    proc = run_cli("-m", info.model_uri, str(ZTF_PACKETS[0]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    import base64

    with open(ZTF_PACKETS[0], "rb") as f:
        stamp = next(fastavro.reader(f))["cutoutScience"]["stampData"]
    assert base64.b64decode(jsonl(proc.stdout)[0]["stamp"]) == stamp


@verdict("encode", "bad record")
@verdict("file write", "bad record")
def test_avro_output_file(model, tmp_path):
    # Record 1 fails the output schema half way ("id" fits, "double" does not): a reject,
    # and no partial bytes left in the file to shift the records after it.
    proc = run_cli("-m", model, "--output-format", "avro", "-o", "out.avro",
                   stdin=b'{"id": 1, "x": 1.5}\n{"id": 9, "x": "ab"}\n{"id": 2, "x": 2}\n'
                         b'{"id": 3, "x": 3}\n', cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr.decode()
    with open(tmp_path / "out.avro", "rb") as f:
        assert list(fastavro.reader(f)) == [{"id": 1, "double": 3.0}, {"id": 2, "double": 4.0},
                                            {"id": 3, "double": 6.0}]
    [reject] = jsonl((tmp_path / "out.avro.rejects.jsonl").read_bytes())
    assert (reject["index"], reject["stage"]) == (1, "encode")


@verdict("file read", "dependency down")
def test_a_missing_input_file_is_one_clear_line(model, tmp_path):
    proc = run_cli("-m", model, "nope.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        "mlflow-preproc run: error: cannot read input nope.jsonl: No such file or directory")


@verdict("decode", "bad record")
def test_a_bad_first_line_is_one_reject_and_the_other_lines_are_read(model, tmp_path):
    lines = b'not json\n{"id": 1, "x": 1}\n{"id": 2, "x": 2}\n{"id": 3, "x": 3}\n'
    for args, stdin in (((), lines), (("in.json",), b"")):
        (tmp_path / "in.json").write_bytes(lines)
        proc = run_cli("-m", model, *args, stdin=stdin, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr.decode()
        assert b"in=4 out=3 dropped=0 failed=1" in proc.stderr
        assert [r["id"] for r in jsonl(proc.stdout)] == [1, 2, 3]
        [reject] = jsonl((tmp_path / "rejects.jsonl").read_bytes())
        assert (reject["index"], reject["stage"]) == (0, "decode")
        assert "line 1 is not valid JSON" in reject["error"]


def test_a_csv_file_and_a_cut_short_avro_file_are_called_what_they_are(model, tmp_path):
    """A CSV file got one "not valid JSON" reject per line and no word on the formats run
    reads; an Avro file cut inside its header was "not an Avro object container file" (#37)."""
    import io

    import fastavro

    (tmp_path / "x.csv").write_bytes(b"id,x\n1,1\n2,2\n")
    whole = io.BytesIO()
    fastavro.writer(whole, {"type": "record", "name": "R", "fields": [
        {"name": "id", "type": "long"}, {"name": "x", "type": "long"}]}, [{"id": 1, "x": 1}])
    (tmp_path / "cut.avro").write_bytes(whole.getvalue()[:60])
    (tmp_path / "empty.avro").write_bytes(b"")
    proc = run_cli("-m", model, "x.csv", "cut.avro", "empty.avro", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"in=3 out=0 dropped=0 failed=3" in proc.stderr
    csv, cut, empty = (r["error"] for r in jsonl((tmp_path / "rejects.jsonl").read_bytes()))
    assert csv == ("x.csv is neither JSON nor Avro (it starts with 'id,x'); run reads JSON, "
                   "JSON Lines and Avro container files (--input-format; parquet with --engine "
                   "spark): convert it to one of them"), csv
    assert cut.startswith("cut.avro is cut short: it ends 60 bytes into its Avro container "
                          "header (EOFError: "), cut
    assert cut.endswith("); no record of it can be read, copy it again"), cut
    assert empty == "empty.avro is empty (no Avro container header)", empty


def test_a_truncated_line_does_not_take_the_next_good_one_with_it(model, tmp_path):
    data = b'{"id": 1, "x": 1}\n{"id": 2, "x"\n{"id": 3, "x": 3}\n{\n  "id": 4,\n  "x": 4\n}\n'
    proc = run_cli("-m", model, stdin=data, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr.decode()
    assert [r["id"] for r in jsonl(proc.stdout)] == [1, 3, 4]  # 4 is spread over four lines
    [reject] = jsonl((tmp_path / "rejects.jsonl").read_bytes())
    assert "line 2 is not valid JSON (a JSON value that never ends)" in reject["error"]
    assert reject["record"] == '{"id": 2, "x"\n'


def alerts_container(codec: str, count: int = 6) -> bytes:
    import io

    with open(ZTF_PACKETS[0], "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    buf = io.BytesIO()
    alerts = [dict(alert, candid=alert["candid"] + i) for i in range(count)]
    # One alert per block, so damage in a block leaves the blocks before it readable.
    fastavro.writer(buf, schema, alerts, codec=codec, sync_interval=1)
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["truncated mid-block", "corrupt bytes", "truncated deflate"])
def test_an_avro_file_damaged_after_its_header_gives_what_came_before_and_one_reject(
        tracking_uri, tmp_path, damage):
    with mlflow.start_run():
        model = mlflow.preproc.log_model(ztf_features, name="ztf", pip_requirements=[]).model_uri
    good = alerts_container("deflate" if damage == "truncated deflate" else "null")
    if damage == "corrupt bytes":
        # Flip the bytes of the sync marker that ends the third block (most bytes of an alert
        # are image stamps, where flipped bytes still decode).
        sync = good[-16:]
        third = [i for i in range(len(good)) if good.startswith(sync, i)][3]
        data = good[:third] + bytes(b ^ 0x5A for b in sync) + good[third + 16:]
    else:
        data = good[:len(good) * 2 // 3]
    (tmp_path / "alerts.avro").write_bytes(data)
    proc = run_cli("-m", model, "alerts.avro", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    summary = proc.stderr.decode().strip().splitlines()[-1]
    assert summary.startswith("mlflow-preproc run: in=") and "failed=1" in summary, summary
    rejects = jsonl((tmp_path / "out.jsonl.rejects.jsonl").read_bytes())
    assert [r["stage"] for r in rejects] == ["decode"]
    assert "alerts.avro is damaged after record" in rejects[0]["error"]
    # The alerts read before the damage came out.
    before = int(rejects[0]["error"].split("after record ")[1].split(" ")[0])
    assert 1 <= before < 6
    assert len(jsonl((tmp_path / "out.jsonl").read_bytes())) == before
    assert f"in={before + 1} out={before} dropped=0 failed=1" in summary


def test_an_avro_block_over_max_decoded_bytes_is_one_reject_and_the_next_blocks_are_read(
        tracking_uri, tmp_path):
    import io

    with mlflow.start_run():
        model = mlflow.preproc.log_model(ztf_features, name="ztf", pip_requirements=[]).model_uri
    with open(ZTF_PACKETS[0], "rb") as f:
        reader = fastavro.reader(f)
        schema, alert = reader.writer_schema, next(reader)
    # 4 MiB of zeros in a stamp: a block of a few kB that inflates past the 1 MiB bound.
    bomb = dict(alert, cutoutScience=dict(alert["cutoutScience"], stampData=bytes(4 << 20)))
    buf = io.BytesIO()
    fastavro.writer(buf, schema, [alert, bomb, alert], codec="xz", sync_interval=1)
    (tmp_path / "alerts.avro").write_bytes(buf.getvalue())
    proc = run_cli("-m", model, "alerts.avro", "-o", "out.jsonl", cwd=tmp_path,
                   env={"MAX_DECODED_BYTES": str(1 << 20)})
    assert proc.returncode == 1, proc.stderr.decode()
    assert b"in=3 out=2 dropped=0 failed=1" in proc.stderr
    assert len(jsonl((tmp_path / "out.jsonl").read_bytes())) == 2
    [reject] = jsonl((tmp_path / "out.jsonl.rejects.jsonl").read_bytes())
    assert (reject["index"], reject["stage"]) == (1, "decode")
    assert reject["error"].startswith("alerts.avro: after record 1, 1 Avro record(s) decode to "
                                      "more than MAX_DECODED_BYTES=1048576 bytes; raise")


# ---- #19 finding 10: an unknown model says where it was looked for -------------------------

def test_an_unknown_model_names_the_store_and_a_missing_store_is_not_created(tracking_uri,
                                                                             tmp_path):
    import os

    (tmp_path / "r.json").write_text('{"id": 1, "x": 2}')
    proc = run_cli("-m", "models:/nope/1", "r.json", cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"models:/nope/1 was not found in the MLflow store at {tracking_uri}" in err
    assert "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    # No store configured, none where MLflow looks by default: said, and ./mlflow.db is
    # not left behind (MLflow creates it, empty, on first use).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "r.json").write_text('{"id": 1, "x": 2}')
    unset = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([str(BIN / "mlflow-preproc"), "run", "-m", "models:/nope/1",
                           "r.json"], capture_output=True, cwd=elsewhere, timeout=300, env=unset)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "MLFLOW_TRACKING_URI is not set" in err and "export MLFLOW_TRACKING_URI=" in err, err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["r.json"]


@pytest.mark.slow
def test_no_command_creates_the_store_it_reads_a_model_from(tmp_path):
    """stream, manifests and a prediction model with no store configured: the same line as
    run, and no ./mlflow.db (stream made one, empty, then said "not found"; from then on run
    in that folder lost its message too) (#37 item 3)."""
    import os

    import mlflow_preproc

    local = tmp_path / "prep"  # a model on disk: only the prediction model needs the store
    mlflow_preproc.save_model(lambda r: r, str(local))
    nothing_listens = "127.0.0.1:9"
    commands = {
        "stream": ["stream", "-m", "models:/quickstart/1", "--input-topic", "alerts"],
        "manifests": ["manifests", "-m", "models:/quickstart/1", "--name", "q"],
        "prediction": ["stream", "-m", str(local), "--input-topic", "alerts",
                       "--prediction-model-uri", "models:/classifier/1"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    running = {}
    for name, argv in commands.items():
        (tmp_path / name).mkdir()
        running[name] = subprocess.Popen(
            [str(BIN / "mlflow-preproc"), *argv], cwd=tmp_path / name, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**env, "KAFKA_BOOTSTRAP_SERVERS": nothing_listens})
    for name, proc in running.items():
        err = proc.communicate(timeout=300)[1]
        assert proc.returncode == 2, (name, err[-2000:])
        assert "MLFLOW_TRACKING_URI is not set" in err, (name, err[-2000:])
        assert list((tmp_path / name).iterdir()) == [], name


# ---- #32 finding 1: run never damages a file it did not finish ------------------------------

def test_an_output_that_is_one_of_the_inputs_is_refused_and_the_input_kept(model, tmp_path):
    original = b'{"id": 1, "x": 2}\n{"id": 2, "x": 3}\n'
    (tmp_path / "in.jsonl").write_bytes(original)
    proc = run_cli("-m", model, "in.jsonl", "-o", "in.jsonl", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr.decode()
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        "mlflow-preproc run: error: the output in.jsonl is also an input; pass -o another "
        "path: the input would be gone before it is read")
    assert (tmp_path / "in.jsonl").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(
        ("mlflow", "mlruns"))) == ["in.jsonl"]


@verdict("file read", "dependency down")
def test_a_run_that_fails_leaves_the_previous_output_as_it_was(model, tmp_path):
    (tmp_path / "out.jsonl").write_bytes(b'{"earlier": "run"}\n')
    proc = run_cli("-m", model, "missing.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot read input missing.jsonl" in proc.stderr.decode()
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"earlier": "run"}\n'
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def blocks_at_record_1500(record):
    import os
    import time

    if record["id"] == 1500:  # the first batch of 1,000 outputs is written by now
        open(os.environ["RUN_STARTED_MARKER"], "w").close()
        while True:
            time.sleep(0.1)
    return {"id": record["id"]}


@verdict("file read", "signal")
@verdict("file write", "signal")
def test_a_stopped_run_leaves_neither_a_truncated_output_nor_a_partial_file(tracking_uri,
                                                                           tmp_path):
    import os
    import signal
    import time

    with mlflow.start_run():
        uri = mlflow.preproc.log_model(blocks_at_record_1500, name="p",
                                       pip_requirements=[]).model_uri
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(2000)))
    (tmp_path / "out.jsonl").write_bytes(b'{"earlier": "run"}\n')
    marker = tmp_path / "started"
    proc = subprocess.Popen([str(BIN / "mlflow-preproc"), "run", "-m", uri, "in.jsonl",
                             "-o", "out.jsonl"], cwd=tmp_path, stderr=subprocess.PIPE,
                            env={**os.environ, "RUN_STARTED_MARKER": str(marker)})
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGTERM, proc.stderr.read().decode()
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"earlier": "run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(
        ("mlflow", "mlruns"))) == ["in.jsonl", "out.jsonl", "started"]

"""Train/serve parity (#38): reference records logged with their outputs and the versions of the
packages that gave them, checked by every runtime before it serves, and `mlflow-preproc
verify`, the gate between a registered version and its promotion.

An environment is changed the way they change in practice: a variable the function reads,
and a virtualenv with another version of a package it imports. The image build and Spark's
executors are in tests/test_docker.py and tests/test_spark.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fastavro
import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException

import mlflow_preproc
from conftest import BIN, DATA, free_port, stop_process
from mlflow_preproc.runtime import parity
from mlflow_preproc.runtime.flavor import load_preprocessing
from verdict_cells import verdict

ALERTS = [{"objectId": "ZTF1", "magpsf": 18.25, "stamp": b"\x1f\x8b\x00"},
          {"objectId": "ZTF2", "magpsf": 19.5, "stamp": b"\x00"}]


def calibrated(record):
    # A zero point from the environment: a setting that differs from one place to another.
    return {"objectId": record["objectId"],
            "mag": record["magpsf"] + float(os.environ.get("MAG_ZEROPOINT", "0")),
            "stamp_bytes": len(record["stamp"])}


def log(fn=calibrated, **kwargs):
    kwargs.setdefault("pip_requirements", [])  # no requirements inferred: a process fewer
    with mlflow.start_run():
        return mlflow.preproc.log_model(fn, name="p", **kwargs)


def mlmodel(model_uri: str) -> dict:
    path = mlflow.artifacts.download_artifacts(model_uri)
    return yaml.safe_load(Path(path, "MLmodel").read_text())["flavors"]["preprocessing"]


# ---- what log_model stores ---------------------------------------------------------------

def test_log_model_stores_the_examples_outputs_with_the_package_versions(tracking_uri):
    info = log(input_example=ALERTS, reference_tolerance=1e-6)
    assert mlmodel(info.model_uri)["reference"] == {
        "path": "reference.jsonl", "records": 2, "tolerance": 1e-6}
    stored = parity.read(load_preprocessing(info.model_uri).reference.path)
    assert stored.records == ALERTS  # bytes come back as bytes
    assert stored.outputs == [[{"objectId": "ZTF1", "mag": 18.25, "stamp_bytes": 3}],
                              [{"objectId": "ZTF2", "mag": 19.5, "stamp_bytes": 1}]]
    environment = stored.environment
    import numpy

    assert environment["packages"]["numpy"] == numpy.__version__
    assert environment["packages"]["mlflow"] == mlflow.__version__
    assert environment["packages"]["mlflow-preproc"] == mlflow_preproc.__version__
    assert environment["python"] == ".".join(map(str, sys.version_info[:3]))


def test_reference_records_replace_the_example_and_an_empty_list_stores_none(tracking_uri):
    chosen = log(input_example=ALERTS[:1], reference_records=ALERTS)
    assert mlmodel(chosen.model_uri)["reference"]["records"] == 2
    assert "reference" not in mlmodel(log(input_example=ALERTS, reference_records=[]).model_uri)
    assert "reference" not in mlmodel(log().model_uri)  # no example, nothing to refer to


def test_log_model_refuses_reference_records_it_could_not_check_later(tracking_uri, caplog):
    calls = iter(range(10**6))
    with pytest.raises(MlflowException, match="from one call to the next .*record 0 "
                       r"\(objectId=ZTF1\): field n: expected 0, got 1.*reference_records=\[\]"):
        log(lambda r: {"n": next(calls)}, reference_records=ALERTS[:1])
    with pytest.raises(MlflowException, match="fails on reference record 1 .*KeyError"):
        log(lambda r: {"v": r["magpsf"] if r["objectId"] == "ZTF1" else r["nope"]},
            reference_records=ALERTS)
    with pytest.raises(MlflowException, match="reference record 0 holds a builtins.set at "
                                              "tags, which a reference record cannot"):
        log(reference_records=[{**ALERTS[0], "tags": {"a"}}])
    with pytest.raises(MlflowException, match="reference_tolerance=-1 is not a number"):
        log(input_example=ALERTS, reference_tolerance=-1)
    # The input example of such values logs as before, without reference records, saying so.
    caplog.set_level(logging.WARNING)
    quiet = log(lambda r: {"n": len(r["tags"])}, input_example=[{"tags": ("a", "b")}])
    assert "reference" not in mlmodel(quiet.model_uri)
    assert "no reference records stored: the input example's reference record 0 holds a " \
           "builtins.tuple at tags" in caplog.text
    stamped = log(lambda r: {"n": next(calls)}, input_example=ALERTS[:1])  # a clock, say
    assert "reference" not in mlmodel(stamped.model_uri)
    assert "no reference records stored: pre_processing gives other outputs for the same " \
           "record from one call to the next" in caplog.text


def test_log_model_runs_no_parity_check_of_its_own(tracking_uri, caplog):
    # MLflow loads the model while logging it (the serving-input check in this process, the
    # requirements in another): the environment that has just made the outputs is not checked.
    caplog.set_level(logging.INFO, logger="mlflow_preproc")
    info = log(input_example=ALERTS)
    assert not [r for r in caplog.records if getattr(r, "event", "") == "parity_checked"]
    mlflow.pyfunc.load_model(info.model_uri)  # a load to serve is checked
    assert [r for r in caplog.records if getattr(r, "event", "") == "parity_checked"]


# ---- the check before serving --------------------------------------------------------------

@verdict("pre_processing", "environment drift")
def test_a_pyfunc_load_where_outputs_differ_is_refused_with_the_diff(tracking_uri,
                                                                    monkeypatch, caplog):
    info = log(input_example=ALERTS)
    assert mlflow.pyfunc.load_model(info.model_uri).predict(ALERTS[:1]) == [
        {"objectId": "ZTF1", "mag": 18.25, "stamp_bytes": 3}]
    monkeypatch.setenv("MAG_ZEROPOINT", "0.01")
    with pytest.raises(parity.ParityError) as refused:
        mlflow.pyfunc.load_model(info.model_uri)
    message = str(refused.value)
    assert "2 of 2 reference records give other outputs here than when the model was " \
           "logged" in message
    assert "record 0 (objectId=ZTF1): field mag: expected 18.25, got 18.26" in message
    assert "record 1 (objectId=ZTF2): field mag: expected 19.5, got 19.51" in message
    assert "no package version differs from where the model was logged" in message
    assert "PARITY_CHECK=warn" in message

    monkeypatch.setenv("PARITY_CHECK", "warn")  # drift accepted knowingly: said, and served
    caplog.set_level(logging.WARNING, logger="mlflow_preproc")
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.predict(ALERTS[:1])[0]["mag"] == pytest.approx(18.26)
    assert "PARITY_CHECK=warn: " in caplog.text and "expected 18.25, got 18.26" in caplog.text


def test_floats_match_within_the_tolerance_logged_and_types_must_match(tracking_uri,
                                                                       monkeypatch):
    tolerant = log(input_example=ALERTS, reference_tolerance=1e-6)
    monkeypatch.setenv("MAG_ZEROPOINT", "1e-6")  # |a-b| <= 1e-6 * 19.5: a float32-size drift
    mlflow.pyfunc.load_model(tolerant.model_uri)
    monkeypatch.setenv("MAG_ZEROPOINT", "1e-3")
    with pytest.raises(parity.ParityError, match="expected 18.25, got 18.251"):
        mlflow.pyfunc.load_model(tolerant.model_uri)

    monkeypatch.delenv("MAG_ZEROPOINT")
    typed = log(lambda r: {"n": int(os.environ.get("AS_FLOAT", "0")) and 1.0 or 1},
                reference_records=ALERTS[:1])
    monkeypatch.setenv("AS_FLOAT", "1")
    with pytest.raises(parity.ParityError, match="field n: expected 1, got 1.0"):
        mlflow.pyfunc.load_model(typed.model_uri)


def test_the_diff_names_drops_fan_outs_errors_and_missing_fields():
    def diff(expected, actual):
        return [d.text() for d in parity.compare([expected], [actual], 0.0,
                                                 [{"candid": 7, "x": 1}])]

    assert diff([{"a": 1}], []) == ['record 0 (candid=7): outputs: expected {"a": 1}, got '
                                    'no output (dropped)']
    assert diff([{"a": 1}, {"a": 2}], [{"a": 1}, {"a": 3}]) == [
        "record 0 (candid=7): field output 1.a: expected 2, got 3"]
    assert diff([{"a": {"b": [1.0, 2.0]}}], [{"a": {"b": [1.0, 2.5]}, "c": None}]) == [
        "record 0 (candid=7): field a.b[1]: expected 2.0, got 2.5",
        "record 0 (candid=7): field c: expected no such field, got null"]
    assert diff([{"a": 1}], parity.Failure("pre_processing raised KeyError: 'x'")) == [
        "record 0 (candid=7): expected {\"a\": 1}, got an error: pre_processing raised "
        "KeyError: 'x'"]


# ---- runtimes, in processes of their own --------------------------------------------------

def run_cli(*args, env=None, cwd=None, timeout=300):
    return subprocess.run([str(BIN / "mlflow-preproc"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
@verdict("pre_processing", "environment drift")
def test_run_and_stream_are_refused_at_start_and_verify_says_why(tracking_uri, tmp_path):
    with mlflow.start_run():
        mlflow.preproc.log_model(calibrated, name="p", input_example=ALERTS,
                                 registered_model_name="zp")
    (tmp_path / "in.jsonl").write_text('{"objectId": "ZTF9", "magpsf": 17.0, "stamp": ""}\n')
    drift = {"MAG_ZEROPOINT": "0.5"}

    same = run_cli("verify", "-m", "models:/zp/1")
    assert (same.returncode, same.stdout) == (
        0, "models:/zp/1: 2 reference records give the outputs logged\n"), same.stderr

    checked = run_cli("verify", "-m", "models:/zp/1", env=drift)
    assert checked.returncode == 1, checked.stderr
    assert checked.stdout.splitlines() == [
        "models:/zp/1: 2 of 2 reference records give other outputs here than when the model "
        "was logged",
        "  record 0 (objectId=ZTF1): field mag: expected 18.25, got 18.75",
        "  record 1 (objectId=ZTF2): field mag: expected 19.5, got 20.0",
        "no package version differs from where the model was logged: the difference is "
        "elsewhere in the environment (variables, locale, time zone, native libraries, files "
        "the function reads)"]

    refused = run_cli("run", "-m", "models:/zp/1", "in.jsonl", "-o", "out.jsonl", env=drift,
                      cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("mlflow-preproc run: error: models:/zp/1: 2 of 2 reference "
                           "records give other outputs here"), line
    assert "record 0 (objectId=ZTF1): field mag: expected 18.25, got 18.75" in line
    assert not (tmp_path / "out.jsonl").exists() and "Traceback" not in refused.stderr

    # The stream refuses before it reaches for a broker: none listens on this port.
    stream = run_cli("stream", "-m", "models:/zp/1", "--input-topic", "in",
                     "--output-topic", "out", env={
                         **drift, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                         "LOG_FORMAT": "text"}, timeout=120)
    assert stream.returncode == 2, stream.stderr[-2000:]
    assert "mlflow-preproc stream: error: models:/zp/1: 2 of 2 reference records give other " \
           "outputs here" in stream.stderr
    assert "expected 19.5, got 20.0" in stream.stderr


@pytest.mark.slow
@verdict("replay", "environment drift")
def test_a_replay_through_a_model_that_drifted_is_refused_before_reading_a_dead_letter(
        tracking_uri):
    info = log(input_example=ALERTS)
    replay = run_cli("dlq", "replay", "raw-dlq", "--through", info.model_uri, env={
        "MAG_ZEROPOINT": "0.5", "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
        timeout=120)
    assert replay.returncode == 2, replay.stderr[-2000:]
    assert "mlflow-preproc dlq: error: " in replay.stderr
    assert "field mag: expected 18.25, got 18.75" in replay.stderr


@pytest.mark.slow
def test_mlflow_models_serve_is_refused_where_outputs_differ(tracking_uri):
    info = log(input_example=ALERTS)
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", info.model_uri, "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(free_port()), "-w", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "MAG_ZEROPOINT": "0.5", "PATH": f"{BIN}:{os.environ['PATH']}"})
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode != 0
    assert "ParityError" in out and "field mag: expected 18.25, got 18.75" in out, out[-3000:]


# ---- another virtualenv: a package the function imports, at another version ------------------

PROBE = "parity-probe"


def _probe_wheel(folder: Path, version: str, scale: str) -> Path:
    """A wheel of ``parity-probe`` (a calibration constant, as a package ships one), written
    as the wheel format says: no build backend, nothing fetched."""
    import base64
    import hashlib
    import zipfile

    files = {"parity_probe/__init__.py": f"SCALE = {scale}\n",
             f"parity_probe-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n",
             f"parity_probe-{version}.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                 "Tag: py3-none-any\n",
             f"parity_probe-{version}.dist-info/top_level.txt": "parity_probe\n"}
    record = f"parity_probe-{version}.dist-info/RECORD"
    lines = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        lines.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[record] = "\n".join([*lines, f"{record},,"]) + "\n"
    folder.mkdir(parents=True)
    wheel = folder / f"parity_probe-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def _virtualenv(folder: Path, probe: Path) -> Path:
    """A virtualenv seeing this one's packages, with the wheel ``probe`` installed in its own
    site-packages by pip."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next(folder.glob("lib/python*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and
                Path(p, "mlflow").is_dir())
    # addsitedir, not a bare path: this one's .pth files (the editable install) apply too;
    # the virtualenv's own packages stay first.
    (site / "zz-parent.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", str(site), str(probe)], check=True)
    return folder / "bin" / "python"


@pytest.fixture(scope="module")
def probe_envs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe")
    return {version: _virtualenv(root / f"venv-{version}",
                                 _probe_wheel(root / f"dist-{version}", version, scale))
            for version, scale in (("1.0", "1.0"), ("2.0", "1.5"))}


@pytest.mark.slow
def test_a_model_logged_with_one_package_version_is_refused_where_another_is_installed(
        tracking_uri, tmp_path, probe_envs):
    code = tmp_path / "code"
    code.mkdir()
    (code / "preprocessing.py").write_text(textwrap.dedent("""\
        import parity_probe


        def pre_processing(record):
            return {"objectId": record["objectId"], "flux": record["flux"] * parity_probe.SCALE}
        """))
    (tmp_path / "log.py").write_text(textwrap.dedent(f"""\
        import mlflow
        with mlflow.start_run():
            mlflow.preproc.log_model({str(code / "preprocessing.py")!r}, name="p",
                                     input_example=[{{"objectId": "ZTF1", "flux": 2.0}}],
                                     registered_model_name="probe", pip_requirements=[])
        """))
    logged = subprocess.run([str(probe_envs["1.0"]), str(tmp_path / "log.py")],
                            capture_output=True, text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr[-3000:]
    (tmp_path / "in.jsonl").write_text('{"objectId": "ZTF5", "flux": 4.0}\n')

    def run(python: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), "-m", "mlflow_preproc.cli", *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    same = run(probe_envs["1.0"], "run", "-m", "models:/probe/1", "in.jsonl")
    assert same.returncode == 0, same.stderr[-2000:]
    assert json.loads(same.stdout) == {"objectId": "ZTF5", "flux": 4.0}

    other = run(probe_envs["2.0"], "run", "-m", "models:/probe/1", "in.jsonl")
    assert other.returncode == 2, other.stderr[-2000:]
    line = other.stderr.strip().splitlines()[-1]
    assert "record 0 (objectId=ZTF1): field flux: expected 2.0, got 3.0" in line, line
    assert "package versions that differ from where the model was logged: " \
           "parity-probe 1.0 -> 2.0" in line, line
    assert other.stdout == ""


# ---- verify --against: the candidate against the champion, on real alerts ------------------

def champion(alert):
    c = alert["candidate"]
    if c["rb"] < 0.5:
        return None
    return {"objectId": alert["objectId"], "band": "grz"[c["fid"] - 1],
            "mag": round(c["magpsf"], 3)}


def candidate(alert):
    c = alert["candidate"]
    if c["rb"] < 0.55:  # a stricter real/bogus cut
        return None
    return {"objectId": alert["objectId"], "band": "gri"[c["fid"] - 1],  # fid 3 is i
            "mag": round(c["magpsf"], 3)}


@pytest.mark.slow
def test_verify_against_the_champion_lists_exactly_the_alerts_whose_outputs_change(
        tracking_uri, tmp_path):
    from ztf_archive import write_archive

    [archive] = write_archive(tmp_path / "night", 40, 40, stamp_bytes=64, seed=38)
    with open(archive, "rb") as f:
        alerts = list(fastavro.reader(f))
    changed = [i for i, a in enumerate(alerts) if champion(a) != candidate(a)]
    assert 0 < len(changed) < len(alerts)  # the night has both
    real = [next(fastavro.reader(open(p, "rb"))) for p in sorted(DATA.glob("*.avro"))]
    with mlflow.start_run():
        mlflow.preproc.log_model(champion, name="c", input_example=real,
                                 registered_model_name="fink", pip_requirements=[])
        mlflow.preproc.log_model(candidate, name="c", input_example=real,
                                 registered_model_name="fink", pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias("fink", "champion", "1")

    gate = run_cli("verify", "-m", "models:/fink/2", "--reference", str(archive),
                   "--against", "models:/fink@champion")
    assert gate.returncode == 1, gate.stderr[-2000:]
    lines = gate.stdout.splitlines()
    assert lines[0] == (f"models:/fink/2: {len(changed)} of 40 records give other outputs "
                        "than models:/fink@champion")
    listed = [int(line.split()[1]) for line in lines[1:]]
    assert listed == changed
    for line, i in zip(lines[1:], changed):
        assert f"(objectId={alerts[i]['objectId']})" in line
        if alerts[i]["candidate"]["fid"] == 3 and champion(alerts[i]) and candidate(alerts[i]):
            assert 'field band: expected "z", got "i"' in line, line

    same = run_cli("verify", "-m", "models:/fink/1", "--reference", str(archive),
                   "--against", "models:/fink@champion")
    assert (same.returncode, same.stdout) == (
        0, "models:/fink/1: the outputs of all 40 records are models:/fink@champion's\n")
    plain = run_cli("verify", "-m", "models:/fink/2", "--reference", str(archive))
    assert plain.returncode == 2 and "holds records without the outputs expected of them; " \
        "add --against MODEL_URI" in plain.stderr

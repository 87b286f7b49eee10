"""Declared input fields: the function sees only them, wherever it runs; the Avro decoders
read only them; reading any other field is an error naming input_fields, never a quiet None.
On the real ZTF alerts (two schema versions) and the Fink contract function."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
from pathlib import Path

import fastavro
import mlflow
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from conftest import BIN, DATA
from mlflow_preproc.runtime.formats import DecodeError, MessageDecoder, read_records
from mlflow_preproc.runtime.input_fields import UndeclaredFieldError, parse, project
from mlflow_preproc.runtime.records import Preprocessor, RecordError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fink_contract"
ALERTS = sorted(DATA.glob("*.avro"))  # the real ZTF alerts, two schema versions


def fink():
    spec = importlib.util.spec_from_file_location("fink_contract_under_test",
                                                  EXAMPLE / "preprocessing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_alerts() -> list[dict]:
    alerts = []
    for path in ALERTS:
        with open(path, "rb") as f:
            alerts += list(fastavro.reader(f))
    return alerts


def as_json(outputs) -> str:
    return json.dumps(outputs, default=str)  # NaN == NaN, as text


def test_the_fink_function_gives_the_same_vectors_on_the_declared_fields_alone():
    module = fink()
    alerts = full_alerts()
    assert len(ALERTS) == 2 and len(alerts) == 2
    full = Preprocessor(module.pre_processing, None, module.FEATURE_NAMES).process(alerts)
    declared = Preprocessor(module.pre_processing, None, module.FEATURE_NAMES,
                            module.INPUT_FIELDS)
    assert as_json(declared.process(alerts)) == as_json(full)
    # ... and decoded with only those fields read (the rest stepped over by fastavro)
    for path in ALERTS:
        with open(path, "rb") as f:
            decoded = list(read_records(f, "avro", str(path), fields=declared.fields))
        with open(path, "rb") as f:
            whole = list(read_records(f, "avro", str(path)))
        assert as_json(declared.process(decoded)) == as_json(declared.process(whole))
        assert len(json.dumps(decoded, default=str)) < len(json.dumps(whole, default=str)) / 20


def test_every_decoder_reads_the_declared_fields_as_fastavro_does():
    # the three cutouts share one named type, here read with different fields
    fields = ["objectId", "candid", "candidate.magpsf", "candidate.drb", "candidate.fid",
              "prv_candidates.jd", "prv_candidates.magpsf", "cutoutScience.fileName",
              "cutoutTemplate.stampData"]
    tree = parse(fields)
    for path in ALERTS:
        value = path.read_bytes()
        with open(path, "rb") as f:
            expected = [project(r, tree) for r in fastavro.reader(f)]
            f.seek(0)
            writer = json.loads(fastavro.reader(f).metadata["avro.schema"])
        container = MessageDecoder("avro", fields=tree).decode(value)  # a message
        records = list(read_records(io.BufferedReader(io.BytesIO(value)), "avro", "f",
                                    fields=tree))  # a file
        body = io.BytesIO()
        fastavro.schemaless_writer(body, fastavro.parse_schema(writer), expected_whole(path))
        schemaless = MessageDecoder("avro", writer, fields=tree).decode(body.getvalue())
        for got in (container, records, schemaless):
            assert [project(r, tree) for r in got] == expected


def expected_whole(path: Path) -> dict:
    with open(path, "rb") as f:
        return next(iter(fastavro.reader(f)))


def test_a_field_one_schema_version_lacks_reads_as_none():
    v1 = {"type": "record", "name": "alert", "fields": [
        {"name": "id", "type": "long"},
        {"name": "c", "type": {"type": "record", "name": "cand", "fields": [
            {"name": "mag", "type": "float"}]}}]}
    v2 = {**v1, "fields": [*v1["fields"], {"name": "drb", "type": ["null", "float"]}]}
    v2["fields"][1] = {"name": "c", "type": {"type": "record", "name": "cand", "fields": [
        {"name": "mag", "type": "float"}, {"name": "rb", "type": "float"}]}}
    tree = parse(["id", "c.mag", "c.rb", "drb"])
    old = io.BytesIO()
    fastavro.schemaless_writer(old, fastavro.parse_schema(v1), {"id": 1, "c": {"mag": 17.5}})
    new = io.BytesIO()
    fastavro.schemaless_writer(new, fastavro.parse_schema(v2),
                               {"id": 2, "c": {"mag": 18.5, "rb": 0.5}, "drb": 0.25})
    assert MessageDecoder("avro", v1, fields=tree).decode(old.getvalue()) == [
        {"id": 1, "c": {"mag": 17.5, "rb": None}, "drb": None}]
    assert MessageDecoder("avro", v2, fields=tree).decode(new.getvalue()) == [
        {"id": 2, "c": {"mag": 18.5, "rb": 0.5}, "drb": 0.25}]


def test_a_path_below_a_map_names_its_keys_in_avro_as_in_json():
    schema = {"type": "record", "name": "r", "fields": [
        {"name": "m", "type": {"type": "map", "values": {"type": "record", "name": "v",
                                                         "fields": [{"name": "k", "type": "int"},
                                                                    {"name": "z",
                                                                     "type": "string"}]}}}]}
    record = {"m": {"g": {"k": 1, "z": "a"}, "h": {"k": 2, "z": "b"}}}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), record)
    tree = parse(["m.g"])
    (decoded,) = MessageDecoder("avro", schema, fields=tree).decode(body.getvalue())
    assert project(decoded, tree) == project(record, tree) == {"m": {"g": {"k": 1, "z": "a"}}}


def test_reading_an_undeclared_field_is_an_error_naming_input_fields():
    record = {"candidate": {"magpsf": 18.0, "rb": 0.9}, "objectId": "ZTF1"}
    seen = project(record, parse(["candidate.magpsf"]))
    assert seen == {"candidate": {"magpsf": 18.0}}
    for read in (lambda r: r["objectId"], lambda r: r.get("objectId"),
                 lambda r: r["candidate"].get("rb", 0.0), lambda r: "rb" in r["candidate"],
                 lambda r: r.pop("objectId", None), lambda r: r.setdefault("objectId"),
                 lambda r: r.copy().get("objectId")):
        with pytest.raises(UndeclaredFieldError) as caught:
            read(seen)
        assert "not one of the model's input_fields" in str(caught.value)
    assert "'candidate.rb'" in str(pytest.raises(
        UndeclaredFieldError, lambda: seen["candidate"]["rb"]).value)
    # A function that catches KeyError for an optional field does not swallow it.

    def careful(r):
        try:
            return {"rb": r["candidate"]["rb"]}
        except KeyError:
            return {"rb": None}

    with pytest.raises(RecordError, match="UndeclaredFieldError.*'candidate.rb'"):
        Preprocessor(careful, input_fields=["candidate.magpsf"]).process([record])
    # what a function passes on is a plain dict again: encoders look fields up with `in`
    (out,), = Preprocessor(lambda r: {"c": r["candidate"]},
                           input_fields=["candidate.magpsf"]).process([record])
    assert type(out["c"]) is dict and "rb" not in out["c"]


def test_log_model_refuses_fields_that_change_the_outputs_and_stores_good_ones(tracking_uri):
    example = [{"candidate": {"magpsf": 18.0, "rb": 0.9}, "objectId": "ZTF1"}]

    def counts_fields(r):
        return {"n": len(r["candidate"]), "mag": r["candidate"]["magpsf"]}

    with mlflow.start_run():
        with pytest.raises(MlflowException, match="other outputs on input example record 0"):
            mlflow.preproc.log_model(counts_fields, name="p", input_example=example,
                                     input_fields=["candidate.magpsf"])
        with pytest.raises(MlflowException, match="'objectId', which is not one of"):
            mlflow.preproc.log_model(lambda r: {"id": r["objectId"]}, name="p",
                                     input_example=example, input_fields=["candidate"])
        # a function that changes its input is checked on an untouched copy
        mlflow.preproc.log_model(lambda r: {"mag": r["candidate"].pop("magpsf")}, name="p",
                                 input_example=example, input_fields=["candidate.magpsf"],
                                 pip_requirements=[])
        with pytest.raises(MlflowException, match="input_fields: 'a..b' is not a field path"):
            mlflow.preproc.log_model(counts_fields, name="p", input_fields=["a..b"])
        info = mlflow.preproc.log_model(str(EXAMPLE / "preprocessing.py"), name="fink",
                                        input_example=full_alerts()[:1], pip_requirements=[])
    conf = info.flavors["preprocessing"]
    assert conf["input_fields"] == fink().INPUT_FIELDS  # INPUT_FIELDS of the module
    # served: the REST path projects too (a field outside gives the documented error)
    model = mlflow.pyfunc.load_model(info.model_uri)
    vectors = model.predict(full_alerts())
    assert len(vectors) == 2 and vectors[0]["magpsf"] == pytest.approx(
        full_alerts()[0]["candidate"]["magpsf"])


@pytest.mark.slow
def test_run_decodes_and_projects_the_declared_fields(tracking_uri, tmp_path):
    def reads_too_much(alert):
        return {"mag": alert["candidate"]["magpsf"], "ra": alert["candidate"]["ra"]}

    with mlflow.start_run():
        uri = mlflow.preproc.log_model(reads_too_much, name="p",
                                       input_fields=["candidate.magpsf"],
                                       pip_requirements=[]).model_uri
    out = subprocess.run([str(BIN / "mlflow-preproc"), "run", "-m", uri,
                          *map(str, ALERTS), "-o", str(tmp_path / "out.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    rejects = [json.loads(line) for line in (tmp_path / "out.jsonl.rejects.jsonl").open()]
    assert len(rejects) == 2 and "'candidate.ra', which is not one of the model's " \
        "input_fields" in rejects[0]["error"]


def test_suggest_traces_the_fields_a_function_reads():
    module = fink()
    suggested = mlflow.preproc.suggest_input_fields(module.pre_processing, full_alerts())
    assert sorted(suggested) == sorted(module.INPUT_FIELDS)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 5000))
def test_any_bytes_with_declared_fields_end_as_records_or_a_decode_error(junk, cut):
    alert = ALERTS[0].read_bytes()
    tree = parse(["objectId", "candidate.magpsf", "prv_candidates.jd"])
    decoder = MessageDecoder("avro", fields=tree)
    for value in (junk, alert[:cut] + junk, alert[:len(alert) - cut] + junk[:10]):
        try:
            records = decoder.decode(value)
        except DecodeError:
            continue
        assert all(isinstance(r, dict) for r in records)

"""The `preprocessing` flavor against a real MLflow tracking store (sqlite in a temp dir)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

import mlflow_preproc
from mlflow_preproc.runtime.records import RecordError


def band(record):
    return {"mag": record["magpsf"], "band": "gri"[record["fid"] - 1]}


def log(pre_processing, **kwargs):
    # Requirements given, not inferred (MLflow infers them in a subprocess that loads the model:
    # seconds each); the tests of inferred requirements pass pip_requirements=None.
    kwargs.setdefault("pip_requirements", [])
    with mlflow.start_run():
        return mlflow.preproc.log_model(pre_processing, name="preproc", **kwargs)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_function_model_round_trips_through_pyfunc(tracking_uri):
    info = log(band, input_example={"magpsf": 18.5, "fid": 1})
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.predict([{"magpsf": 17.0, "fid": 2}, {"magpsf": 19.1, "fid": 3}]) == [
        {"mag": 17.0, "band": "r"},
        {"mag": 19.1, "band": "i"},
    ]
    # The native flavor gives back the user's callable itself.
    assert mlflow.preproc.load_model(info.model_uri)({"magpsf": 1.0, "fid": 1}) == {
        "mag": 1.0, "band": "g"}


def test_registered_model_loads_by_name_and_by_run_uri(tracking_uri):
    with mlflow.start_run() as run:
        mlflow_preproc.log_model(band, name="preproc", registered_model_name="fink-preproc",
                                 pip_requirements=[])
    record = [{"magpsf": 18.0, "fid": 1}]
    expected = [{"mag": 18.0, "band": "g"}]
    assert mlflow.pyfunc.load_model("models:/fink-preproc/1").predict(record) == expected
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/preproc").predict(record) == expected


def test_artifact_path_is_still_accepted(tracking_uri):
    with mlflow.start_run() as run:
        mlflow.preproc.log_model(band, artifact_path="legacy", pip_requirements=[])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/legacy")
    assert model.predict([{"magpsf": 1.0, "fid": 1}]) == [{"mag": 1.0, "band": "g"}]


def test_none_drops_a_record_and_a_list_fans_it_out(tracking_uri):
    def split(record):
        if record["n"] == 0:
            return None
        return [{"i": i} for i in range(record["n"])]

    model = mlflow.pyfunc.load_model(log(split).model_uri)
    assert model.predict([{"n": 2}, {"n": 0}, {"n": 1}]) == [{"i": 0}, {"i": 1}, {"i": 0}]


def test_outputs_are_json_ready(tracking_uri):
    def awkward(record):
        return {
            "i": np.int64(3), "f": np.float32(0.5), "arr": np.arange(3), "nan": float("nan"),
            "inf": np.inf, "when": dt.datetime(2024, 1, 2, 3, 4, 5), "day": dt.date(2024, 1, 2),
            "raw": b"\x00\xff", "nested": {"t": (1, 2)},
        }

    out = mlflow.pyfunc.load_model(log(awkward).model_uri).predict([{}])
    assert out == [{
        "i": 3, "f": 0.5, "arr": [0, 1, 2], "nan": None, "inf": None,
        "when": "2024-01-02T03:04:05", "day": "2024-01-02", "raw": "AP8=", "nested": {"t": [1, 2]},
    }]
    json.dumps(out, allow_nan=False)  # strict JSON


def test_dataframe_and_single_dict_inputs_are_records(tracking_uri):
    model = mlflow.pyfunc.load_model(log(band).model_uri)
    frame = pd.DataFrame([{"magpsf": 1.0, "fid": 1}, {"magpsf": 2.0, "fid": 3}])
    assert model.predict(frame) == [{"mag": 1.0, "band": "g"}, {"mag": 2.0, "band": "i"}]
    assert model.predict({"magpsf": 5.0, "fid": 2}) == [{"mag": 5.0, "band": "r"}]


def test_module_file_captures_sibling_modules_and_requirements(tracking_uri, tmp_path):
    code = tmp_path / "code"
    write(code / "processor.py", """
        SCALE = 10
        def scale(x):
            return x * SCALE
    """)
    write(code / "preprocessing.py", """
        from processor import scale
        def pre_processing(data):
            return {"y": scale(data["x"])}
    """)
    write(code / "requirements.txt", "six==1.16.0\n")
    info = log(str(code / "preprocessing.py"), pip_requirements=None)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert sorted(p.name for p in (local / "preprocessing").iterdir()) == [
        "preprocessing.py", "processor.py"]
    requirements = (local / "requirements.txt").read_text().split()
    assert "six==1.16.0" in requirements
    # Moving the source away proves the model runs from its own copy.
    code.rename(tmp_path / "gone")
    assert mlflow.pyfunc.load_model(info.model_uri).predict([{"x": 2}]) == [{"y": 20}]


@pytest.mark.parametrize("form", ["file", "folder"])
def test_a_requirements_pin_beside_the_code_wins_over_the_installed_version(tracking_uri,
                                                                            tmp_path, form):
    installed = np.__version__
    pinned = "2.2.6" if installed != "2.2.6" else "2.2.5"  # any release but the installed one
    code = tmp_path / "code"
    write(code / "preprocessing.py", """
        import numpy as np
        def pre_processing(data):
            return {"y": float(np.float64(data["x"]))}
    """)
    write(code / "requirements.txt", f"# what the model was written for\nnumpy=={pinned}\n")
    info = log(str(code / "preprocessing.py") if form == "file" else str(code),
               pip_requirements=None)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    requirements = (local / "requirements.txt").read_text().split()
    assert [r for r in requirements if r.startswith("numpy")] == [f"numpy=={pinned}"]
    assert {"cloudpickle", "fastavro", "confluent-kafka[schemaregistry]"} <= {
        r.split("==")[0] for r in requirements}


@pytest.mark.parametrize("form", ["file", "folder"])
def test_only_python_is_captured_and_never_a_symlink_out_of_the_folder(tracking_uri, tmp_path,
                                                                       form, caplog):
    home = tmp_path / "home"
    write(home / ".ssh" / "id_rsa", "-----BEGIN PRIVATE KEY-----\n")
    write(home / "elsewhere" / "shared.py", "WHO = 'outside'\n")
    code = tmp_path / "code"
    write(code / "preprocessing.py", """
        from features import colour
        def pre_processing(record):
            return {"colour": colour(record)}
    """)
    write(code / "features" / "__init__.py", "def colour(r):\n    return r['g'] - r['r']\n")
    write(code / "features" / "training_set.csv", "g,r\n19.5,19.0\n")  # a package's data
    write(code / "notes.txt", "todo\n")
    write(code / "alerts" / "one.avro", "not code\n")
    (code / "features" / "id_rsa").symlink_to(home / ".ssh" / "id_rsa")
    (code / "id_rsa").symlink_to(home / ".ssh" / "id_rsa")
    (code / "shared.py").symlink_to(home / "elsewhere" / "shared.py")
    (code / "features" / "same.py").symlink_to(code / "features" / "__init__.py")  # inside

    info = log(str(code / "preprocessing.py") if form == "file" else str(code))
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "preprocessing"
    captured = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
    assert captured == ["features/__init__.py", "features/same.py", "preprocessing.py"]
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"features/id_rsa -> {home / '.ssh' / 'id_rsa'}" in warned
    assert f"shared.py -> {home / 'elsewhere' / 'shared.py'}" in warned
    assert "features/training_set.csv" in warned and "extra_files" in warned
    if form == "folder":  # beside a lone module file, the folder was never the model's
        assert "notes.txt" in warned and "alerts/" in warned
    assert mlflow.pyfunc.load_model(info.model_uri).predict([{"g": 19.5, "r": 19.0}]) == [
        {"colour": 0.5}]


def test_files_the_code_reads_are_captured_when_named(tracking_uri, tmp_path):
    code = tmp_path / "code"
    write(code / "preprocessing.py", """
        import json
        import pathlib
        ZERO_POINTS = json.loads((pathlib.Path(__file__).parent / "tables" / "zp.json")
                                 .read_text())
        def pre_processing(record):
            return {"mag": ZERO_POINTS[str(record["fid"])] - record["flux"]}
    """)
    write(code / "tables" / "zp.json", '{"1": 25.0}')
    write(tmp_path / "outside.json", "{}")
    info = log(str(code / "preprocessing.py"), extra_files=["tables/zp.json"])
    code.rename(tmp_path / "gone")  # the model runs from its own copy
    assert mlflow.pyfunc.load_model(info.model_uri).predict([{"fid": 1, "flux": 6.0}]) == [
        {"mag": 19.0}]
    write(code / "preprocessing.py", "def pre_processing(r):\n    return r\n")
    for given, message in ((str(tmp_path / "outside.json"), "is outside the code's folder"),
                           ("../outside.json", "is outside the code's folder"),
                           ("tables/nope.json", "does not exist in")):
        with pytest.raises(MlflowException, match=f"extra_files: '{re.escape(given)}' "
                                                  f"{message}"):
            log(str(code / "preprocessing.py"), extra_files=[given])
    with pytest.raises(MlflowException, match="extra_files needs pre_processing as a module "
                                              "file or folder"):
        log(band, extra_files=["tables/zp.json"])


def test_module_file_in_a_package_keeps_relative_imports(tracking_uri, tmp_path):
    pkg = tmp_path / "fink_prep"
    write(pkg / "__init__.py", "")
    write(pkg / "features.py", "def colour(r):\n    return r['g'] - r['r']\n")
    write(pkg / "preprocessing.py", """
        from .features import colour
        def pre_processing(record):
            return {"colour": colour(record)}
    """)
    model = mlflow.pyfunc.load_model(log(str(pkg / "preprocessing.py")).model_uri)
    assert model.predict([{"g": 19.5, "r": 19.0}]) == [{"colour": 0.5}]


def test_folder_with_preprocessing_module(tracking_uri, tmp_path):
    folder = tmp_path / "prep"
    write(folder / "preprocessing.py", """
        import helpers
        def pre_processing(data):
            return helpers.tag(data)
    """)
    write(folder / "helpers.py", "def tag(d):\n    return {**d, 'tagged': True}\n")
    model = mlflow.pyfunc.load_model(log(str(folder)).model_uri)
    assert model.predict([{"a": 1}]) == [{"a": 1, "tagged": True}]


def test_folder_that_is_a_package_exporting_pre_processing(tracking_uri, tmp_path):
    folder = tmp_path / "alertprep"
    write(folder / "__init__.py", "from .impl import pre_processing\n")
    write(folder / "impl.py", "def pre_processing(d):\n    return {'n': len(d)}\n")
    model = mlflow.pyfunc.load_model(log(str(folder)).model_uri)
    assert model.predict([{"a": 1, "b": 2}]) == [{"n": 2}]


def test_two_models_with_the_same_module_name_run_their_own_code(tracking_uri, tmp_path):
    uris = []
    for version in (1, 2):
        write(tmp_path / f"v{version}" / "preprocessing.py",
              f"def pre_processing(d):\n    return {{'version': {version}}}\n")
        uris.append(log(str(tmp_path / f"v{version}" / "preprocessing.py")).model_uri)
    first, second = (mlflow.pyfunc.load_model(u) for u in uris)
    assert first.predict([{}]) == [{"version": 1}]
    assert second.predict([{}]) == [{"version": 2}]


def test_log_model_leaves_the_callers_sys_path_and_modules_as_they_were(tracking_uri, tmp_path):
    trainer = tmp_path / "trainer"
    write(trainer / "processor.py", "WHO = 'the trainer'\n")
    sys.path.insert(0, str(trainer))
    sys.modules.pop("processor", None)  # another test's model may have loaded one
    try:
        import processor

        code = tmp_path / "code"
        write(code / "processor.py", "WHO = 'the model'\ndef scale(x):\n    return x * 10\n")
        write(code / "preprocessing.py", """
            from processor import scale
            def pre_processing(data):
                return {"y": scale(data["x"])}
        """)
        path_before, modules_before = list(sys.path), set(sys.modules)
        info = log(str(code / "preprocessing.py"), input_example={"x": 1})
        assert sys.path == path_before  # no temporary model folder left behind
        assert sys.modules["processor"] is processor and processor.WHO == "the trainer"
        assert "preprocessing" not in set(sys.modules) - modules_before
    finally:
        sys.path.remove(str(trainer))
        sys.modules.pop("processor", None)
    assert mlflow.pyfunc.load_model(info.model_uri).predict([{"x": 2}]) == [{"y": 20}]


def test_batch_mode_records_and_pandas(tracking_uri):
    def vectorised(frame):
        frame = frame[frame["x"] > 0]  # dropped rows keep out of the output
        return frame.assign(y=frame["x"] * 2)

    def listwise(records):
        return [None if r["x"] < 0 else {"y": r["x"]} for r in records]

    pandas_model = mlflow.pyfunc.load_model(log(vectorised, batch_format="pandas",
                                                input_example={"x": 1}).model_uri)
    assert pandas_model.predict([{"x": 1}, {"x": -1}, {"x": 3}]) == [
        {"x": 1, "y": 2}, {"x": 3, "y": 6}]
    records_model = mlflow.pyfunc.load_model(log(listwise, batch_format="records").model_uri)
    assert records_model.predict([{"x": -2}, {"x": 5}]) == [{"y": 5}]


def test_user_pip_requirements_keep_the_runtime_dependencies(tracking_uri):
    info = log(band, pip_requirements=["pandas"])
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    names = {line.split("==")[0] for line in (local / "requirements.txt").read_text().split()}
    # the registry client's extra too: an image streaming confluent-avro needs it (#32)
    assert {"pandas", "mlflow", "cloudpickle", "fastavro", "confluent-kafka[schemaregistry]",
            "prometheus-client"} <= names
    assert "mlflow-preproc" not in names  # not on any index: it travels in code/
    assert "polars-avro" not in names  # whole records, no declared fields: no column reader
    assert (local / "code" / "mlflow_preproc" / "runtime" / "flavor.py").is_file()
    # Only the runtime travels with a model, not the control plane.
    assert not (local / "code" / "mlflow_preproc" / "deploy").exists()
    assert not (local / "code" / "mlflow_preproc" / "builds").exists()


def test_avro_schema_is_stored_with_the_model(tracking_uri, ztf_schema_path):
    info = log(band, avro_schema=str(ztf_schema_path))
    loaded = mlflow.preproc.load_preprocessing(info.model_uri)
    assert loaded.avro_schema["name"] == "alert"
    candidate = next(f for f in loaded.avro_schema["fields"] if f["name"] == "candidate")
    assert candidate["type"]["name"] == "candidate"  # the sibling file's type was inlined


@pytest.fixture
def ztf_schema_path():
    return Path(__file__).parent / "data" / "alert.avsc"


# ---- errors: one clear line naming the problem and the fix, as early as possible ----------

def test_file_without_pre_processing_is_refused_at_log_time(tracking_uri, tmp_path):
    path = write(tmp_path / "clean.py", "def clean(d):\n    return d\n")
    with pytest.raises(MlflowException, match=r"does not define pre_processing\(data\); add"):
        log(str(path))


def test_folder_without_entry_module_is_refused(tracking_uri, tmp_path):
    write(tmp_path / "prep" / "helpers.py", "x = 1\n")
    with pytest.raises(MlflowException, match="has no entry module: add a preprocessing.py"):
        log(str(tmp_path / "prep"))


def test_missing_path_is_refused(tracking_uri, tmp_path):
    with pytest.raises(MlflowException, match="does not exist; pass the path of a .py file"):
        log(str(tmp_path / "nope.py"))


def test_non_callable_is_refused(tracking_uri):
    with pytest.raises(MlflowException, match="must be a function, a module file or a folder"):
        log(42)


def test_function_that_fails_on_its_input_example_is_refused(tracking_uri):
    with pytest.raises(MlflowException, match=r"fails on the input example, record 1: "
                       r"pre_processing raised KeyError: 'fid'"):
        log(band, input_example=[{"magpsf": 1.0, "fid": 1}, {"magpsf": 2.0}])
    # MLflow keeps the attempt as a FAILED logged model; nothing usable was produced.
    assert [m.status.name for m in mlflow.search_logged_models(output_format="list")] == ["FAILED"]


def test_the_input_example_error_is_one_exception_naming_the_functions_line(tracking_uri):
    """Three chained tracebacks (the KeyError, the record's error, MLflow's) came before the
    one line that says what to do; the line says where the function failed instead (#37)."""
    with pytest.raises(MlflowException) as raised:
        log(band, input_example={"magpsf": 2.0})
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert str(raised.value) == (
        "pre_processing fails on the input example, record 0: pre_processing raised KeyError: "
        f"'fid' (in band, line {band.__code__.co_firstlineno + 1}); fix the function, or pass "
        "an input_example it can process")


def test_predict_error_names_the_record_and_keeps_the_cause(tracking_uri):
    model = mlflow.pyfunc.load_model(log(band).model_uri)
    with pytest.raises(RecordError, match="record 2: pre_processing raised KeyError") as err:
        model.predict([{"magpsf": 1.0, "fid": 1}, {"magpsf": 1.0, "fid": 2}, {"magpsf": 1.0}])
    assert err.value.index == 2
    assert isinstance(err.value.__cause__, KeyError)


def test_a_return_value_that_mixes_records_and_values_is_named(tracking_uri):
    model = mlflow.pyfunc.load_model(log(lambda d: [{"a": 1}, 2]).model_uri)
    with pytest.raises(RecordError, match="record 0: pre_processing returned a list that mixes "
                       "dicts and values"):
        model.predict([{}])


def test_pickled_function_refused_when_pickle_is_disallowed(tracking_uri, monkeypatch):
    info = log(band)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION is not 'true'"):
        mlflow.pyfunc.load_model(info.model_uri)


def test_module_models_load_without_pickle(tracking_uri, tmp_path, monkeypatch):
    path = write(tmp_path / "p" / "preprocessing.py", "def pre_processing(d):\n    return d\n")
    info = log(str(path))
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    assert mlflow.pyfunc.load_model(info.model_uri).predict([{"a": 1}]) == [{"a": 1}]


def test_other_flavors_do_not_inherit_this_package_as_a_requirement(tracking_uri):
    from sklearn.linear_model import LogisticRegression

    with mlflow.start_run():
        info = mlflow.sklearn.log_model(LogisticRegression().fit([[0.0], [1.0]], [0, 1]),
                                        name="clf")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    requirements = (local / "requirements.txt").read_text()
    assert "scikit-learn" in requirements and "mlflow-preproc" not in requirements


def test_loading_a_model_of_another_flavor_is_refused(tracking_uri):
    from sklearn.linear_model import LinearRegression

    with mlflow.start_run():
        info = mlflow.sklearn.log_model(LinearRegression().fit([[0], [1]], [0, 1]), name="lr",
                                        pip_requirements=[])
    with pytest.raises(MlflowException, match="is not a preprocessing model"):
        mlflow.preproc.load_model(info.model_uri)


# ---- fresh interpreters -----------------------------------------------------------------

def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        env={**os.environ, **env}, cwd="/", timeout=120,
    )


def test_mlflow_preproc_exists_after_a_plain_import_mlflow():
    proc = run_python("""
        import sys
        import mlflow
        assert "mlflow_preproc.runtime.flavor" not in sys.modules  # lazy: nothing heavy yet
        print(mlflow.preproc.FLAVOR_NAME, callable(mlflow.preproc.log_model))
        import mlflow.preproc as mp
        assert mp.log_model is mlflow.preproc.log_model
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["preprocessing", "True"]


def test_function_loads_where_its_defining_module_is_gone(tracking_uri, tmp_path):
    module_dir = tmp_path / "trainer"
    write(module_dir / "feature_code.py", """
        OFFSET = 100
        def pre_processing(record):
            return {"shifted": record["x"] + OFFSET}
    """)
    sys.path.insert(0, str(module_dir))
    try:
        import feature_code

        info = log(feature_code.pre_processing)
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop("feature_code", None)
    proc = run_python(f"""
        import importlib.util, mlflow
        assert importlib.util.find_spec("feature_code") is None
        print(mlflow.pyfunc.load_model("{info.model_uri}").predict([{{"x": 1}}]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[{'shifted': 101}]"


def site_packages_without_this_package(tmp_path: Path) -> Path:
    """A real environment view where every installed distribution but mlflow-preproc is
    importable: symlinks to site-packages entries, minus this package and its metadata."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site-without-mlflow-preproc"
    view.mkdir()
    for entry in site.iterdir():
        if "mlflow_preproc" in entry.name or "mlflow-preproc" in entry.name:
            continue
        (view / entry.name).symlink_to(entry)
    return view


def test_model_loads_where_this_package_is_not_installed(tracking_uri, tmp_path):
    info = log(band)
    view = site_packages_without_this_package(tmp_path)
    # -S skips site-packages (and .pth files such as an editable install's finder).
    proc = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(f"""
            import sys
            sys.path.append({str(view)!r})
            import importlib.util
            assert importlib.util.find_spec("mlflow_preproc") is None, "package is visible"
            import mlflow
            model = mlflow.pyfunc.load_model("{info.model_uri}")
            print(model.predict([{{"magpsf": 20.0, "fid": 3}}]))
            print(sys.modules["mlflow_preproc.runtime.flavor"].__file__)
        """)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    prediction, flavor_file = proc.stdout.strip().splitlines()
    assert prediction == "[{'mag': 20.0, 'band': 'i'}]"
    assert flavor_file.endswith(os.path.join("code", "mlflow_preproc", "runtime", "flavor.py"))


def test_a_model_declaring_input_fields_brings_the_column_reader_into_its_image(tracking_uri):
    # #36: the column reader reached an image only if the user added mlflow-preproc[columnar]
    # to the model's requirements; a model declaring its fields reads them into columns.
    def names(info):
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
        return {line.split("==")[0].split(">=")[0]
                for line in (local / "requirements.txt").read_text().split()}

    # given requirements (no inference: a lean test); inferred ones get the same runtime list
    assert {"polars-avro", "polars", "pandas"} <= names(log(
        band, input_fields=["magpsf", "fid"], pip_requirements=["pandas"]))
    # (a model reading whole records leaves it out: test_user_pip_requirements_keep_...)

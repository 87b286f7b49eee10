"""The ``preprocessing`` MLflow flavor: log preprocessing code as a model.

Produces an MLflow Model with two flavors:

- ``preprocessing``: the user's ``pre_processing(data)`` callable, returned by :func:`load_model`;
- ``python_function``: a pyfunc whose ``predict`` applies it to records, so ``mlflow models
  serve``, ``mlflow models predict`` and ``mlflow models build-docker`` work unchanged.

The model is self-contained: this package is copied into the model's ``code/`` directory
(MLflow puts that first on ``sys.path`` when loading), and the model's requirements name every
runtime dependency, so it serves where ``mlflow-preproc`` is on no package index.

Available as ``mlflow.preproc`` once this package is installed, and as ``mlflow_preproc``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import mlflow
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelInputExample, ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import (
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement

from mlflow_preproc.runtime import batch_schema, code_capture, parity
from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema
from mlflow_preproc.runtime.input_fields import parse as parse_input_fields
from mlflow_preproc.runtime.input_fields import paths as input_fields_paths
from mlflow_preproc.runtime.input_fields import project
from mlflow_preproc.runtime.jsonable import to_jsonable
from mlflow_preproc.runtime.model_identity import not_found, require_store
from mlflow_preproc.runtime.records import (
    BATCH_FORMATS,
    COLUMNAR_FORMATS,
    Preprocessor,
    RecordError,
    as_records,
)

FLAVOR_NAME = "preprocessing"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# What a model carries in its code/ folder: the runtime, not the control plane (deploy/,
# builds/, spark/), which runs where models are built and deployed, never inside them.
_RUNTIME_PARTS = ("__init__.py", "_mlflow_hook.py", "cli.py", "config.py", "secrets.py",
                  "runtime", "streaming", "image")
_INPUT_SCHEMA_FILE = "input_schema.avsc"
_OUTPUT_SCHEMA_FILE = "output_schema.avsc"

# What the runtime imports: the flavor itself, the stream and file modes of the serving image.
RUNTIME_PACKAGES = ("cloudpickle", "fastavro", "confluent-kafka", "prometheus-client", "orjson",
                     "ijson", "python-json-logger", "tqdm", "requests")
# Extras a model's image needs with them: an image streaming confluent-avro from a schema
# registry imports SchemaRegistryClient, which needs authlib and httpx (without them a
# stream of such an image was refused at start).
RUNTIME_EXTRAS = {"confluent-kafka": "schemaregistry"}
# The column reader (runtime/avro_columns.py, the columnar extra): a model declaring its input
# fields reads Avro messages and files into columns in its image, ~4-10x less CPU an alert,
# so its requirements name it (with the ranges of setup.py where this interpreter lacks it).
COLUMNAR_PACKAGES = {"polars-avro": "polars-avro>=0.13,<0.14", "polars": "polars>=1.30"}

_logger = logging.getLogger(__name__)


def get_default_pip_requirements() -> list[str]:
    """Return the pip requirements every preprocessing model needs at serving time.

    MLflow itself is added by MLflow. This package is not listed: it travels inside the
    model's ``code/`` directory.
    """
    pins = [_get_pinned_requirement(p) for p in RUNTIME_PACKAGES]
    return [pin.replace(name, f"{name}[{RUNTIME_EXTRAS[name]}]", 1)
            if (name := _requirement_name(pin)) in RUNTIME_EXTRAS else pin for pin in pins]


def get_default_conda_env() -> dict[str, Any]:
    """Return the default Conda environment of models produced by :func:`save_model`."""
    from mlflow.utils.environment import _mlflow_conda_env

    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


def save_model(
    pre_processing: Callable | str | os.PathLike,
    path: str,
    batch_format: str | None = None,
    feature_names: list[str] | None = None,
    avro_schema: str | os.PathLike | dict | None = None,
    output_avro_schema: str | os.PathLike | dict | None = None,
    conda_env: dict | str | None = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    input_fields: list[str] | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: list[str | os.PathLike] | None = None,
    reference_records: list[dict] | dict | None = None,
    reference_tolerance: float = parity.DEFAULT_TOLERANCE,
) -> None:
    """Save preprocessing code as an MLflow model at a local ``path``.

    Args:
        pre_processing: The preprocessing: a function ``pre_processing(data)``, the path of a
            module file that defines it (the modules beside it are captured too), or a folder
            whose ``preprocessing.py`` (or ``__init__.py``) defines it. Only Python is
            captured (``.py`` files and packages), never a symlink out of the folder.
        path: Local path where the model is to be saved; must not exist or be empty.
        batch_format: ``None`` (default) calls ``pre_processing`` once per record (a dict);
            ``"records"`` passes a list of records, ``"pandas"`` a DataFrame, ``"arrow"`` a
            ``pyarrow.Table``, ``"polars"`` a ``polars.DataFrame`` (the columnar extra;
            see docs/concepts.md).
        feature_names: Names of the values of the feature vector ``pre_processing`` returns,
            in order (default: the ``FEATURE_NAMES`` list of its module). Each vector becomes
            the record ``{name: value}``; the signature gets one output column per name and,
            unless ``output_avro_schema`` is given, an Avro output schema is derived.
        input_fields: The fields ``pre_processing`` reads, as dotted paths (default: the
            ``INPUT_FIELDS`` list of its module), e.g. ``["objectId", "candidate.magpsf",
            "prv_candidates.jd"]``. Every record is projected to them wherever the model runs,
            Avro decoders read only them, and reading another field raises an error naming
            it. Checked on ``input_example``: the outputs must not change. See
            docs/guides/input-fields.md.
        avro_schema: Avro schema of the input records (dict, JSON string or ``.avsc`` path),
            stored with the model so streams of schemaless Avro can be decoded; with a
            pandas or columnar ``batch_format``, the types of a batch's columns (else the
            ``input_example``'s).
        output_avro_schema: Avro schema of the output records, for Avro output.
        conda_env: A Conda environment (dict or path to a YAML file).
        code_paths: Extra local files or folders to put on ``sys.path`` when loading.
        mlflow_model: The :py:class:`mlflow.models.Model` this flavor is being added to.
        signature: A model signature. None is inferred by default: a column signature turns
            every input into a DataFrame, which breaks nested records; pass one if you want
            MLflow to enforce a schema.
        input_example: One record (dict) or a list of records. ``pre_processing`` is run on
            it at save time, so a function that cannot process its own example fails early.
        pip_requirements: Replaces the inferred requirements (the runtime packages this
            flavor needs are always added). Defaults to the ``requirements.txt`` beside a
            module file or in a folder, when there is one, on top of the inferred ones.
        extra_pip_requirements: Added to the default or inferred requirements.
        metadata: Custom metadata stored in the MLmodel file.
        extra_files: Files or folders of the code's folder (paths relative to it) that the
            code reads, e.g. ``["tables/calibration.csv"]``: captured at the same place
            beside the modules.
        reference_records: Records (dicts) whose outputs are stored with the model, with the
            versions of the packages that gave them, and checked wherever the model runs:
            a start whose outputs differ is refused with the diff (``PARITY_CHECK``).
            Default: the ``input_example``; ``[]`` stores none. Keep them few: they run at
            every start.
        reference_tolerance: Two floats of an output match when ``|a - b| <= tolerance *
            max(1, |a|, |b|)`` (default 1e-9); every other value must be equal.
    """
    if batch_format not in BATCH_FORMATS:
        raise MlflowException(
            f"batch_format={batch_format!r} is not supported; use one of {BATCH_FORMATS}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    if batch_format == "polars" and importlib.util.find_spec("polars") is None:
        raise MlflowException(
            "batch_format='polars' needs polars, which is not installed; install the "
            "columnar extra (pip install '.[columnar]' in the mlflow-preproc clone) or use "
            "batch_format='arrow'", error_code=INVALID_PARAMETER_VALUE)
    input_schema = _load_schema_arg(avro_schema, "avro_schema")
    output_schema = _load_schema_arg(output_avro_schema, "output_avro_schema")
    if isinstance(reference_tolerance, bool) or not isinstance(reference_tolerance, (int, float)) \
            or not 0 <= reference_tolerance < 1:
        raise MlflowException(f"reference_tolerance={reference_tolerance!r} is not a number "
                              "from 0 up to 1; e.g. reference_tolerance=1e-6",
                              error_code=INVALID_PARAMETER_VALUE)

    if isinstance(input_example, dict):
        # A lone dict would be stored as {"inputs": {...}}, which the scoring server turns into
        # 0-d arrays; one record in a list round-trips as a record.
        input_example = [input_example]

    _validate_and_prepare_target_save_path(path)
    example_outputs = None
    reference = None
    try:
        captured = code_capture.capture(pre_processing, path, extra_files)
        with code_capture.caller_imports_kept():
            # A function's module is where FEATURE_NAMES lives; its pickled copy keeps only
            # the globals the function uses. The example runs on what was captured.
            loaded = None if callable(pre_processing) else \
                code_capture.load(path, captured.to_conf())
            feature_names = _feature_names(feature_names, loaded or pre_processing)
            input_fields = _input_fields(input_fields, loaded or pre_processing)
            schema_of_batch = _batch_schema(batch_format, input_example, input_fields,
                                            input_schema)
            if input_example is not None:
                example_outputs = _check_runs_on_example(
                    loaded or code_capture.load(path, captured.to_conf()), batch_format,
                    feature_names, input_example, input_fields, schema_of_batch)
            records = _reference_records(reference_records, input_example)
            if records:
                # The preprocessor every runtime builds from the saved model.
                reference = _reference(Preprocessor(
                    loaded or code_capture.load(path, captured.to_conf()), batch_format,
                    feature_names, input_fields, schema_of_batch), records,
                    explicit=reference_records is not None)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # don't leave a half-written model behind
        raise
    if feature_names:
        types = _feature_types(feature_names, example_outputs)
        signature = signature or ModelSignature(outputs=Schema(
            [ColSpec(t, name) for name, t in types.items()]))
        if output_schema is None:
            output_schema = _derived_avro_schema(types)

    code_dir_subpath = _validate_and_copy_code_paths(code_paths, path) or "code"
    _copy_runtime(Path(path, code_dir_subpath, _PACKAGE_DIR.name))
    # Lets environment variables pick the mode of a stock build-docker image (entrypoint.py).
    hook = Path(path, code_dir_subpath, "sitecustomize.py")
    if not hook.exists():
        shutil.copy2(_PACKAGE_DIR / "image" / "sitecustomize.py", hook)

    if mlflow_model is None:
        mlflow_model = Model()
    _save_example(mlflow_model, input_example, path)
    if signature:
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata

    flavor_conf: dict[str, Any] = {
        **captured.to_conf(),
        "batch_format": batch_format,
        "mlflow_preproc_version": _package_version(),
    }
    if feature_names:
        flavor_conf["feature_names"] = feature_names
    if input_fields is not None:
        flavor_conf["input_fields"] = input_fields
    if schema_of_batch is not None:
        flavor_conf["batch_schema"] = batch_schema.save(schema_of_batch, path)
    if reference is not None:
        parity.write(os.path.join(path, parity.REFERENCE_FILE), reference)
        flavor_conf["reference"] = {"path": parity.REFERENCE_FILE,
                                    "records": len(reference.records),
                                    "tolerance": float(reference_tolerance)}
    for schema, filename, key in (
        (input_schema, _INPUT_SCHEMA_FILE, "avro_schema"),
        (output_schema, _OUTPUT_SCHEMA_FILE, "output_avro_schema"),
    ):
        if schema is not None:
            write_to(os.path.join(path, filename), json.dumps(schema, indent=1))
            flavor_conf[key] = filename

    pyfunc.add_to_model(
        mlflow_model,
        loader_module=__name__,
        code=code_dir_subpath,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
    )
    mlflow_model.add_flavor(FLAVOR_NAME, code=code_dir_subpath, **flavor_conf)
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    _write_requirements(path, captured, conda_env, pip_requirements, extra_pip_requirements,
                        columnar=input_fields is not None)


def _copy_runtime(dest: Path) -> None:
    dest.mkdir(parents=True)
    for part in _RUNTIME_PARTS:
        src = _PACKAGE_DIR / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / part)


def _reference_records(given: Any, input_example: Any) -> list[dict]:
    if given is None:
        return as_records(input_example) if input_example is not None else []
    if isinstance(given, dict):
        return [given]
    if isinstance(given, (str, bytes)) or not all(isinstance(r, dict) for r in given):
        raise MlflowException("reference_records must be records (dicts): a dict or a list "
                              "of dicts, e.g. reference_records=alerts[:20]",
                              error_code=INVALID_PARAMETER_VALUE)
    return list(given)


def _reference(preprocessor: Preprocessor, records: list[dict],
               explicit: bool) -> parity.Reference | None:
    """The reference records with their outputs and environment. An input example that
    cannot be stored as it is, or whose outputs change from one call to the next, leaves the
    model without reference records, saying so; reference_records given that way are
    refused."""
    try:
        parity.encode_records(records)
    except parity.UnstorableRecord as exc:
        if explicit:
            raise MlflowException(f"reference_records: {exc}; pass records of such values",
                                  error_code=INVALID_PARAMETER_VALUE) from None
        _logger.warning("no reference records stored: the input example's %s. Pass "
                        "reference_records= to have the model's outputs checked where it "
                        "runs", exc)
        return None
    try:
        return parity.make_reference(preprocessor, records)
    except ValueError as exc:
        if explicit:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        # A function that stamps its outputs (a clock, a uuid) logged as it always was.
        _logger.warning("no reference records stored: %s", exc)
        return None


def _load_schema_arg(source: Any, name: str) -> dict | None:
    if source is None:
        return None
    try:
        return load_avro_schema(source)
    except SchemaError as exc:
        raise MlflowException(f"{name}: {exc}", error_code=INVALID_PARAMETER_VALUE) from None


def _batch_schema(batch_format: str | None, input_example: Any,
                  input_fields: list[str] | None, avro_schema: dict | None) -> Any:
    """The schema every pandas or columnar batch is built to: the Avro schema's types, else
    the input example's."""
    if batch_format not in ("pandas", *COLUMNAR_FORMATS):
        return None
    fields = parse_input_fields(input_fields)
    try:
        if avro_schema is not None:
            return batch_schema.from_avro(avro_schema, fields)
        if input_example is None:
            raise batch_schema.BatchSchemaError(
                f"batch_format={batch_format!r} needs an input_example (or avro_schema=): the "
                "columns of a batch and their types are taken from it, so that a record's "
                "outputs never depend on the other records of its batch. Pass "
                "input_example=<a record or a list of records>")
        return batch_schema.from_example([project(r, fields)
                                          for r in as_records(input_example)])
    except batch_schema.BatchSchemaError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def _where_it_failed(exc: BaseException) -> str:
    """`` (in band, line 25)``: the line of the user's function that raised, or called what
    raised (the first frame past this package's), or nothing when there is none."""
    cause = exc.__cause__ or exc
    package = str(Path(__file__).resolve().parent.parent)
    frames = traceback.extract_tb(cause.__traceback__)
    for frame in frames:
        if not str(Path(frame.filename).resolve()).startswith(package):
            return f" (in {frame.name}, line {frame.lineno})"
    return ""


def _check_runs_on_example(fn, batch_format, feature_names, input_example,
                           input_fields=None, schema_of_batch=None) -> list[Any]:
    records = as_records(input_example)
    untouched = copy.deepcopy(records)  # for the projected run: fn may change its input
    try:
        outputs = Preprocessor(fn, batch_format, feature_names,
                               batch_schema=_unprojected(schema_of_batch, records,
                                                         input_fields)).process(records)
    except (RecordError, TypeError) as exc:
        # One exception, not three chained tracebacks before the line that says what to do;
        # where the function failed is in the line.
        raise MlflowException(
            f"pre_processing fails on the input example, {exc}{_where_it_failed(exc)}; fix the "
            "function, or pass an input_example it can process",
            error_code=INVALID_PARAMETER_VALUE,
        ) from None
    if input_fields is not None:
        _check_projection(fn, batch_format, feature_names, untouched, input_fields, outputs,
                          schema_of_batch)
    return [out for per_input in outputs for out in per_input]


def _unprojected(schema_of_batch: Any, records: list[dict], input_fields: Any) -> Any:
    """For the check against the declared fields, the batch schema of the run that sees every
    field of the example: read off the example (types it leaves null are of no use to it)."""
    if schema_of_batch is None or input_fields is None:
        return schema_of_batch
    try:
        return batch_schema.from_example(records)
    except batch_schema.BatchSchemaError:
        return None


def _check_projection(fn, batch_format, feature_names, records, input_fields, outputs,
                      schema_of_batch=None) -> None:
    """The function gives the same outputs on the example with only its input fields."""
    try:
        projected = Preprocessor(fn, batch_format, feature_names, input_fields,
                                 schema_of_batch).process(records)
    except RecordError as exc:
        raise MlflowException(
            f"pre_processing fails on the input example restricted to input_fields, {exc}",
            error_code=INVALID_PARAMETER_VALUE) from exc
    for i, (full, mine) in enumerate(zip(outputs, projected)):
        if _short(full, None) != _short(mine, None):  # as JSON: NaN equals NaN
            raise MlflowException(
                f"pre_processing gives other outputs on input example record {i} when it sees "
                f"only input_fields ({_short(mine)} instead of {_short(full)}): it reads a "
                "field they leave out, or tells a missing field from a None one; add the "
                "fields it reads to input_fields", error_code=INVALID_PARAMETER_VALUE)


def _short(value: Any, width: int | None = 200) -> str:
    text = json.dumps(to_jsonable(value), default=str, sort_keys=True)
    return text if width is None or len(text) <= width else text[:width - 1] + "…"


def _input_fields(given: list[str] | None, fn: Callable) -> list[str] | None:
    # INPUT_FIELDS beside pre_processing in its module, as FEATURE_NAMES is.
    declared = given if given is not None else getattr(fn, "__globals__", {}).get(
        "INPUT_FIELDS")
    if declared is None:
        return None
    try:
        return input_fields_paths(parse_input_fields(
            declared, "input_fields" if given is not None else "INPUT_FIELDS"))
    except ValueError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def _feature_names(given: list[str] | None, fn: Callable) -> list[str] | None:
    # FEATURE_NAMES beside pre_processing in its module, as the Fink pipeline writes it.
    names = given if given is not None else getattr(fn, "__globals__", {}).get("FEATURE_NAMES")
    if names is None:
        return None
    where = "feature_names" if given is not None else "FEATURE_NAMES"
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise MlflowException(f"{where} must be a list of non-empty strings, e.g. "
                              "['magpsf', 'sigmapsf']", error_code=INVALID_PARAMETER_VALUE)
    names = list(names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MlflowException(f"{where} names {', '.join(duplicates)} more than once; each "
                              "value of the vector needs a name of its own",
                              error_code=INVALID_PARAMETER_VALUE)
    return names


_COLUMN_TYPES = ((bool, "boolean"), (int, "long"), (float, "double"), (str, "string"))


def _feature_types(names: list[str], example_outputs: list[Any] | None) -> dict[str, str]:
    """Per name, the type of its values in the example's outputs (default double)."""
    types = dict.fromkeys(names, "double")
    for record in example_outputs or []:
        for name in names:
            value = to_jsonable(record.get(name)) if isinstance(record, dict) else None
            for kind, column_type in _COLUMN_TYPES:
                if isinstance(value, kind):
                    types[name] = column_type
                    break
    return types


def _derived_avro_schema(types: dict[str, str]) -> dict | None:
    import re

    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in types):
        _logger.warning("no Avro output schema derived: Avro field names allow only letters, "
                        "digits and _; pass output_avro_schema for Avro output")
        return None
    # Nullable: a feature that cannot be computed for an alert is commonly None (or NaN).
    return {"type": "record", "name": "Features", "namespace": "mlflow_preproc",
            "fields": [{"name": name, "type": ["null", t]} for name, t in types.items()]}


def _write_requirements(path, captured, conda_env, pip_requirements, extra_pip_requirements,
                        columnar: bool = False):
    runtime = get_default_pip_requirements()
    if columnar:
        runtime += [_columnar_requirement(name, spec) for name, spec in COLUMNAR_PACKAGES.items()]
    if conda_env is not None:
        conda_env, pip_reqs, constraints = _process_conda_env(conda_env)
    else:
        if pip_requirements is not None:
            # MLflow drops the defaults when requirements are given; the runtime still needs them.
            given = _requirement_names(_as_list(pip_requirements))
            pip_requirements = _as_list(pip_requirements) + [
                r for r in runtime if _requirement_name(r) not in given]
            default_reqs = None
        else:
            inferred = mlflow.models.infer_pip_requirements(
                path, FLAVOR_NAME, fallback=runtime,
                extra_env_vars={parity.LOGGING_ENV: "1"})  # no parity check in that load
            default_reqs = sorted(set(inferred).union(runtime))
            if captured.requirements_file:
                # The user's requirements.txt wins over the pins read off this interpreter: two
                # pins of one package make MLflow refuse the model as "incompatible".
                user = [f"-r {captured.requirements_file}"]
                names = _requirement_names(user)
                default_reqs = [r for r in default_reqs if _requirement_name(r) not in names]
                extra_pip_requirements = [*user, *_as_list(extra_pip_requirements)]
        conda_env, pip_reqs, constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements
        )
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def _columnar_requirement(name: str, spec: str) -> str:
    """``name`` pinned to this interpreter's version, else ``spec`` (setup.py's range)."""
    try:
        return _get_pinned_requirement(name)
    except Exception:  # noqa: BLE001 -- not installed here
        return spec


def _as_list(reqs: list[str] | str | None) -> list[str]:
    if reqs is None:
        return []
    if isinstance(reqs, str):  # a requirements file path, as MLflow accepts
        return [f"-r {reqs}"]
    return list(reqs)


def _requirement_name(line: str) -> str:
    import re

    return re.split(r"[=<>!~\[; @]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirement_names(lines: list[str]) -> set[str]:
    """Package names of requirement lines; ``-r file`` lines are read."""
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            target = line.split(None, 1)[1]
            names |= _requirement_names(Path(target).read_text().splitlines())
        elif line and not line.startswith("-"):
            names.add(_requirement_name(line))
    return names


def _package_version() -> str:
    from mlflow_preproc import __version__

    return __version__


def log_model(
    pre_processing: Callable | str | os.PathLike,
    artifact_path: str | None = None,
    batch_format: str | None = None,
    feature_names: list[str] | None = None,
    avro_schema: str | os.PathLike | dict | None = None,
    output_avro_schema: str | os.PathLike | dict | None = None,
    conda_env: dict | str | None = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    await_registration_for: int = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    name: str | None = None,
    extra_files: list[str | os.PathLike] | None = None,
    input_fields: list[str] | None = None,
    reference_records: list[dict] | dict | None = None,
    reference_tolerance: float = parity.DEFAULT_TOLERANCE,
    **kwargs: Any,
):
    """Log preprocessing code as an MLflow model in the current run.

    Takes the arguments of :func:`save_model` (except ``path`` and ``mlflow_model``), plus:

    Args:
        artifact_path: Deprecated by MLflow 3; use ``name``.
        registered_model_name: Also register the model under this name (a new version).
        await_registration_for: Seconds to wait for the model version to be ready.
        name: The model's name in the run.
        kwargs: Passed to :py:meth:`mlflow.models.Model.log` (``params``, ``tags``,
            ``model_type``, ``step``, ``model_id``...).

    Returns:
        A :py:class:`mlflow.models.model.ModelInfo`; ``model_info.model_uri`` loads the model.

    .. code-block:: python

        import mlflow

        def pre_processing(record):
            return {"mag": record["magpsf"], "band": "gri"[record["fid"] - 1]}

        with mlflow.start_run():
            info = mlflow.preproc.log_model(
                pre_processing, name="preproc", input_example={"magpsf": 18.2, "fid": 1}
            )
        mlflow.pyfunc.load_model(info.model_uri).predict([{"magpsf": 17.0, "fid": 2}])
    """
    import sys

    with code_capture.caller_imports_kept(), parity.logging_model():
        return Model.log(
            artifact_path=artifact_path,
            name=name,
            flavor=sys.modules[__name__],
            pre_processing=pre_processing,
            batch_format=batch_format,
            feature_names=feature_names,
            avro_schema=avro_schema,
            output_avro_schema=output_avro_schema,
            conda_env=conda_env,
            code_paths=code_paths,
            registered_model_name=registered_model_name,
            signature=signature,
            input_example=input_example,
            await_registration_for=await_registration_for,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            metadata=metadata,
            extra_files=extra_files,
            input_fields=input_fields,
            reference_records=reference_records,
            reference_tolerance=reference_tolerance,
            **kwargs,
        )


def suggest_input_fields(pre_processing: Callable, records: list[dict] | dict) -> list[str]:
    """The fields ``pre_processing`` reads of ``records`` (e.g. the input example), traced:
    a first ``input_fields`` to read over and paste into ``log_model`` or ``INPUT_FIELDS``.
    Never applied by itself: a field read only for some records (a branch the example does
    not take) is missed, and ``log_model`` checks the declaration on the example.

    .. code-block:: python

        print(mlflow.preproc.suggest_input_fields(pre_processing, alerts[:100]))
        # ['candidate.magpsf', 'candidate.sigmapsf', 'prv_candidates.jd', ...]
    """
    from mlflow_preproc.runtime.input_fields import suggest

    return suggest(pre_processing, [records] if isinstance(records, dict) else list(records))


def load_model(model_uri: str, dst_path: str | None = None) -> Callable:
    """Load the user's ``pre_processing`` callable from a preprocessing model.

    Args:
        model_uri: Any MLflow model URI: ``models:/name/1``, ``models:/m-<id>``,
            ``runs:/<run_id>/<name>``, or a local path.
        dst_path: Local folder to download the model to (a temporary one by default).
    """
    return load_preprocessing(model_uri, dst_path).preprocessor.fn


@dataclass
class LoadedPreprocessing:
    """A loaded preprocessing model: what the pyfunc, file and stream modes run."""

    preprocessor: Preprocessor
    model_dir: str
    avro_schema: dict | None
    output_avro_schema: dict | None
    reference: parity.Stored | None = None  # the reference records and their outputs

    def check_parity(self, model: str, action: str | None = None) -> parity.Report | None:
        """Before serving: the reference records give the outputs logged, else the start is
        refused with the diff (:func:`~mlflow_preproc.runtime.parity.check_at_start`)."""
        return parity.check_at_start(self.preprocessor, self.reference, model, action)


def load_preprocessing(model_uri: str, dst_path: str | None = None) -> LoadedPreprocessing:
    """Download a preprocessing model and load everything the runtime needs from it."""
    require_store(model_uri)
    try:
        local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise not_found(model_uri, exc) from None
        raise
    return _load_from_dir(local_path)


def _load_from_dir(model_dir: str) -> LoadedPreprocessing:
    try:
        conf = _get_flavor_configuration(model_path=model_dir, flavor_name=FLAVOR_NAME)
    except MlflowException:
        raise MlflowException(
            f"the model at '{model_dir}' is not a preprocessing model (its MLmodel has no "
            f"'{FLAVOR_NAME}' flavor); log it with mlflow.preproc.log_model",
            error_code=INVALID_PARAMETER_VALUE,
        ) from None
    fn = code_capture.load(model_dir, conf)

    def schema(key: str) -> dict | None:
        name = conf.get(key)
        return json.loads(Path(model_dir, name).read_text()) if name else None

    return LoadedPreprocessing(
        Preprocessor(fn, conf.get("batch_format"), conf.get("feature_names"),
                     conf.get("input_fields"),
                     batch_schema.load(model_dir, conf.get("batch_schema"))),
        model_dir,
        schema("avro_schema"),
        schema("output_avro_schema"),
        parity.Stored.of(model_dir, conf.get("reference")),
    )


class _PreprocessingPyfunc:
    """The pyfunc face of a preprocessing model: records in, JSON-ready records out."""

    def __init__(self, loaded: LoadedPreprocessing):
        self.loaded = loaded

    def get_raw_model(self) -> Callable:
        return self.loaded.preprocessor.fn

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> list[dict]:
        """Apply ``pre_processing`` to each record and return all outputs, in order.

        Under ``mlflow.pyfunc.spark_udf`` every record must give exactly one output: a UDF
        returns one value per row, so a drop or a fan-out is an error that names
        ``mlflow_preproc.spark.transform``, which keeps them.

        Raises:
            RecordError: naming the failing record's index, with the original exception as
                its cause.
        """
        outputs = self.loaded.preprocessor.process(as_records(data))
        if _called_by_spark_udf():
            _check_one_output_each(outputs)
        return [to_jsonable(record) for per_input in outputs for record in per_input]


def _called_by_spark_udf() -> bool:
    """Whether ``mlflow.pyfunc.spark_udf`` is calling ``predict``.

    MLflow gives predict no sign of it: ``params`` need a params schema in the signature, and
    ``model_config`` is not passed to models loaded on a cluster's executors. So the caller's
    frames are looked at (once per batch): spark_udf predicts from ``_predict_row_batch`` in
    ``mlflow.pyfunc``. Were MLflow to rename it, a drop would fail with Spark's own
    RESULT_ROWS_MISMATCH error instead of this module's.
    """
    frame = sys._getframe(2)
    for _ in range(16):
        if frame is None:
            return False
        if frame.f_code.co_name == "_predict_row_batch" and \
                frame.f_globals.get("__name__") == "mlflow.pyfunc":
            return True
        frame = frame.f_back
    return False


def _check_one_output_each(outputs: list[list[dict]]) -> None:
    for index, per_input in enumerate(outputs):
        if len(per_input) != 1:
            what = "dropped it (returned None)" if not per_input else \
                f"fanned it out into {len(per_input)} outputs"
            raise RecordError(
                index,
                f"pre_processing {what}, and a Spark UDF gives one value per row; run models "
                "that drop or fan out records with mlflow_preproc.spark.transform (or "
                "mlflow-preproc run --engine spark), which keeps them")


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _PreprocessingPyfunc:
    # Called by MLflow once per scoring worker (mlflow models serve, an image's REST server),
    # by mlflow models predict, spark_udf and pyfunc.load_model, and during log_model; keep it
    # free of side effects. Kafka mode is started by the serving entrypoint, not here. The
    # parity check runs wherever the model is about to serve, never in log_model's own loads
    # (the environment that has just made the reference outputs).
    loaded = _load_from_dir(path)
    if not parity.at_logging():
        loaded.check_parity(path)
    return _PreprocessingPyfunc(loaded)

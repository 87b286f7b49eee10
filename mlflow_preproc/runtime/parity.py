"""Train/serve parity: reference records, and the outputs logged for them, checked where the
model runs.

``log_model`` runs ``pre_processing`` on a few reference records (default: the input example)
and stores them, with the outputs it gave and the versions of the packages that were loaded,
in the model (:data:`REFERENCE_FILE`; the ``reference`` key of the MLmodel's
``preprocessing`` flavor holds its tolerance). Every runtime runs them again before it serves
(:func:`check_at_start`): ``stream``, ``run``, ``dlq replay --through``, ``mlflow models serve``
and every other load through the pyfunc loader, each Spark executor, and the image build of
the ``preproc`` target (:mod:`mlflow_preproc.image.parity_check`). Outputs that
differ refuse the start with the diff: the record, the field, the value logged and the value
given here, and the package versions that differ from where the model was logged.
``PARITY_CHECK=warn`` logs the diff and goes on.

Outputs are compared as they are served: as JSON values (:func:`~mlflow_preproc.runtime.
jsonable.to_jsonable`), two floats matching when ``|a - b| <= tolerance * max(1, |a|, |b|)``;
any other value, and the kind of a value (an int is not a float), must be equal.

The reference file is JSON Lines: a header (``{"mlflow_preproc_reference": 1,
"environment": {...}}``), then one line per record, ``{"record": ..., "outputs": [...]}``.
Records keep what JSON cannot hold tagged: ``{"$bytes": base64}``, ``{"$datetime": iso}``,
``{"$date": iso}``, ``{"$decimal": text}``, and ``{"$dict": {...}}`` around a dict whose one
key starts with ``$``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import functools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow_preproc import config as settings
from mlflow_preproc.runtime.dependencies import Misconfigured
from mlflow_preproc.runtime.jsonable import to_jsonable
from mlflow_preproc.runtime.records import Preprocessor, RecordError

REFERENCE_FILE = "reference.jsonl"
FORMAT_KEY = "mlflow_preproc_reference"
DEFAULT_TOLERANCE = 1e-9
# Differences named in one line (an error, a log line); verify prints them all.
_SHOWN = 3
# Set in the subprocess in which MLflow infers a model's requirements while it is logged.
LOGGING_ENV = "MLFLOW_PREPROC_LOGGING_MODEL"

logger = logging.getLogger("mlflow_preproc")
_logging_model: ContextVar[bool] = ContextVar("mlflow_preproc_logging_model", default=False)


class ParityError(Misconfigured):
    """The reference records give other outputs here than where the model was logged: the
    environment is not the one the model was made in. Refused at start, with the diff."""


class UnstorableRecord(ValueError):
    """A reference record holds a value the reference file cannot give back as it was."""


# ---- what log_model stores -------------------------------------------------------------

@dataclass
class Reference:
    """Records, the outputs logged for each (a list, empty when it was dropped), and the
    environment that gave them (``python``, ``platform``, ``packages``: name -> version)."""

    records: list[dict]
    outputs: list[list[Any]]
    environment: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stored:
    """Where a model keeps its reference (the MLmodel's ``reference`` key, made absolute)."""

    path: Path
    tolerance: float
    records: int

    @classmethod
    def of(cls, model_dir: str, conf: dict[str, Any] | None) -> Stored | None:
        if not conf:
            return None
        return cls(Path(model_dir, conf["path"]), float(conf["tolerance"]), conf["records"])


@contextlib.contextmanager
def logging_model() -> Iterator[None]:
    """While a model is being logged: MLflow loads it through the pyfunc loader to check the
    serving input and to infer requirements, in the environment that has just made its
    reference outputs, where a check would only cost time."""
    token = _logging_model.set(True)
    try:
        yield
    finally:
        _logging_model.reset(token)


def at_logging() -> bool:
    """Whether this load is MLflow's own, while the model is being logged."""
    return _logging_model.get() or os.environ.get(LOGGING_ENV) == "1"


def make_reference(preprocessor: Preprocessor, records: Sequence[dict]) -> Reference:
    """Run ``preprocessor`` on ``records`` twice and keep the outputs. Raises ValueError when
    a record fails, or gives other outputs from one run to the next (nothing could be checked
    where the model runs)."""
    first = outputs_of(preprocessor, decode_records(encode_records(records)))
    for index, result in enumerate(first):
        if isinstance(result, Failure):
            raise ValueError(f"pre_processing fails on reference record {index} "
                             f"{_label(records[index])}({result.reason}); pass reference_records "
                             "it can process")
    again = outputs_of(preprocessor, decode_records(encode_records(records)))
    differences = compare(first, again, 0.0, records)
    if differences:
        raise ValueError(
            "pre_processing gives other outputs for the same record from one call to the next "
            f"({differences[0].text()}), so they cannot be checked where the model runs; make "
            "it deterministic (a seeded random generator, no clock), or pass "
            "reference_records=[]")
    return Reference(list(records), first, environment())


def write(path: str | os.PathLike, reference: Reference) -> None:
    """Write ``reference`` as a reference file."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(json.dumps({FORMAT_KEY: 1, "environment": reference.environment}) + "\n")
        for record, outputs in zip(encode_records(reference.records), reference.outputs):
            out.write(json.dumps({"record": record, "outputs": outputs}) + "\n")


def read(path: str | os.PathLike) -> Reference:
    """A reference file; raises ValueError when ``path`` is not one."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or FORMAT_KEY not in header:
        raise ValueError(f"{path} is not a reference file (its first line is no "
                         f'{{"{FORMAT_KEY}": 1, ...}} header)')
    records, outputs = [], []
    for n, line in enumerate(lines[1:], 2):
        try:
            item = json.loads(line)
            records.append(_decode(item["record"]))
            outputs.append(list(item["outputs"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} line {n} is no reference record ({{\"record\": ..., "
                             f"\"outputs\": [...]}}): {exc}") from None
    return Reference(records, outputs, header.get("environment") or {})


def is_reference_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with a reference file's header."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    return FORMAT_KEY.encode() in first


# ---- records as JSON, and back ----------------------------------------------------------

def encode_records(records: Sequence[dict]) -> list[Any]:
    """``records`` as JSON values; raises :class:`UnstorableRecord` naming the record and the
    field of a value that would not come back as it was."""
    out = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UnstorableRecord(f"reference record {index} is a {type(record).__name__}, "
                                   "not a record (a dict)")
        out.append(_encode(record, f"reference record {index}", ""))
    return out


def decode_records(encoded: Sequence[Any]) -> list[dict]:
    return [_decode(record) for record in encoded]


def _encode(value: Any, record: str, where: str) -> Any:
    # float before the numpy check: numpy's float64 is a float, and comes back as one
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UnstorableRecord(f"{record} has a key that is not a string at "
                                   f"{where or 'its top level'}")
        encoded = {k: _encode(v, record, f"{where}.{k}" if where else k)
                   for k, v in value.items()}
        if len(encoded) == 1 and next(iter(encoded)).startswith("$"):
            return {"$dict": encoded}
        return encoded
    if isinstance(value, list):
        return [_encode(v, record, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    raise UnstorableRecord(f"{record} holds a {type(value).__module__}.{type(value).__name__} "
                           f"at {where or 'its top level'}, which a reference record cannot "
                           "give back as it was (JSON values, bytes, datetime, date and "
                           "Decimal can)")


_TAGS = {"$bytes": lambda v: base64.b64decode(v), "$datetime": dt.datetime.fromisoformat,
         "$date": dt.date.fromisoformat, "$decimal": decimal.Decimal,
         "$dict": lambda v: {k: _decode(x) for k, x in v.items()}}


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1:
            key, inner = next(iter(value.items()))
            if key in _TAGS:
                return _TAGS[key](inner)
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


# ---- running and comparing --------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """A record ``pre_processing`` failed on."""

    reason: str


def outputs_of(preprocessor: Preprocessor, records: list[dict]) -> list[list[Any] | Failure]:
    """Each record's outputs as served (JSON values), or its :class:`Failure`."""
    results = []
    for result in preprocessor.process_each(records):
        if isinstance(result, RecordError):
            results.append(Failure(result.reason))
        else:
            results.append([json.loads(json.dumps(to_jsonable(out))) for out in result])
    return results


@dataclass(frozen=True)
class Difference:
    """Record ``index`` gave ``actual`` where ``expected`` was logged, at ``path`` of its
    outputs (empty: the whole result)."""

    index: int
    label: str
    path: str
    expected: Any
    actual: Any

    def where(self) -> str:
        return f"record {self.index} {self.label}".rstrip()

    def what(self) -> str:
        if isinstance(self.actual, Failure):
            return f"expected {_show(self.expected)}, got an error: {self.actual.reason}"
        if isinstance(self.expected, Failure):
            return f"expected an error ({self.expected.reason}), got {_show(self.actual)}"
        what = f"field {self.path}" if self.path else "outputs"
        return f"{what}: expected {_show(self.expected)}, got {_show(self.actual)}"

    def text(self) -> str:
        return f"{self.where()}: {self.what()}"


_MISSING = object()


def compare(expected: Sequence[list[Any] | Failure], actual: Sequence[list[Any] | Failure],
            tolerance: float, records: Sequence[dict]) -> list[Difference]:
    """Every difference between ``expected`` and ``actual`` results, record by record."""
    found: list[Difference] = []
    for index, (want, got) in enumerate(zip(expected, actual)):
        label = _label(records[index])
        if isinstance(want, Failure) or isinstance(got, Failure):
            if want != got:
                found.append(Difference(index, label, "", _whole(want), _whole(got)))
            continue
        if len(want) != len(got):
            found.append(Difference(index, label, "", _whole(want), _whole(got)))
            continue
        fanned = len(want) > 1
        for n, (one, other) in enumerate(zip(want, got)):
            for path, a, b in _walk(one, other, f"output {n}" if fanned else "", tolerance):
                found.append(Difference(index, label, path, a, b))
    return found


def _whole(result: list[Any] | Failure) -> Any:
    return result if isinstance(result, Failure) or len(result) != 1 else result[0]


def _walk(a: Any, b: Any, path: str, tolerance: float) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            yield from _walk(a.get(key, _MISSING), b.get(key, _MISSING),
                             f"{path}.{key}" if path else key, tolerance)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _walk(x, y, f"{path}[{i}]", tolerance)
        return
    if not _same(a, b, tolerance):
        yield path, a, b


def _same(a: Any, b: Any, tolerance: float) -> bool:
    if type(a) is not type(b):  # an int is not a float, nor a bool an int, in what is served
        return False
    if isinstance(a, float):
        return abs(a - b) <= tolerance * max(1.0, abs(a), abs(b))
    return a == b


def _show(value: Any, width: int = 80) -> str:
    if value is _MISSING:
        return "no such field"
    if isinstance(value, list) and not value:
        return "no output (dropped)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[:width - 1] + "…"


def _label(record: Any) -> str:
    """``(objectId=ZTF18abc)``: the record's first top-level id field, to find it by."""
    if isinstance(record, dict):
        for key, value in record.items():
            if key.lower().endswith("id") and isinstance(value, (str, int)) and \
                    not isinstance(value, bool):
                return f"({key}={value}) "
    return ""


# ---- the environment ---------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """This interpreter: its Python, platform and the versions of the distributions of every
    module loaded now (the function's own imports among them)."""
    import importlib.metadata as metadata

    from mlflow_preproc import __version__

    owners = _module_owners()
    names = sorted({d for top in {m.split(".")[0] for m in list(sys.modules)}
                    for d in owners.get(top, ())})
    packages = {}
    for name in names:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    # This package travels in the model's code/ folder: its version is the one that runs.
    packages["mlflow-preproc"] = __version__
    return {"python": platform.python_version(), "platform": _platform(), "packages": packages}


@functools.lru_cache(maxsize=1)
def _module_owners() -> dict[str, list[str]]:
    # Reads every distribution's file list: ~0.4 s, once per process (at logging time only).
    import importlib.metadata as metadata

    return metadata.packages_distributions()


def _platform() -> str:
    return f"{sys.platform}-{platform.machine()}"


def _version_here(name: str) -> str | None:
    import importlib.metadata as metadata

    if name == "mlflow-preproc":
        from mlflow_preproc import __version__

        return __version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class EnvironmentChanges:
    """What differs between where a model was logged and here: ``changed`` (name, then,
    now), and the packages not installed here."""

    changed: list[tuple[str, str, str]]
    missing: list[str]

    @classmethod
    def since(cls, logged: dict[str, Any]) -> EnvironmentChanges:
        changed, missing = [], []
        for name, here in (("python", platform.python_version()), ("platform", _platform())):
            if logged.get(name) and logged[name] != here:
                changed.append((name, logged[name], here))
        for name, then in sorted((logged.get("packages") or {}).items()):
            now = _version_here(name)
            if now is None:
                missing.append(name)
            elif now != then:
                changed.append((name, then, now))
        return cls(changed, missing)

    def text(self) -> str:
        parts = []
        if self.changed:
            parts.append("package versions that differ from where the model was logged: " +
                         ", ".join(f"{n} {a} -> {b}" for n, a, b in self.changed))
        if self.missing:
            parts.append("not installed here: " + _some(self.missing, 8))
        if not parts:
            return ("no package version differs from where the model was logged: the "
                    "difference is elsewhere in the environment (variables, locale, time "
                    "zone, native libraries, files the function reads)")
        return "; ".join(parts)


def _some(names: list[str], n: int) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---- the check ----------------------------------------------------------------------------

@dataclass
class Report:
    """The outcome of a check of ``checked`` records of ``model``."""

    model: str
    checked: int
    differences: list[Difference]
    changes: EnvironmentChanges | None = None  # when outputs differ
    against: str | None = None  # verify --against: the model whose outputs were expected

    @property
    def ok(self) -> bool:
        return not self.differences

    @property
    def records(self) -> list[int]:
        """The records whose outputs differ, in order."""
        return sorted({d.index for d in self.differences})

    def headline(self) -> str:
        if self.against:
            if self.ok:
                return (f"{self.model}: the outputs of all {self.checked} records are "
                        f"{self.against}'s")
            return (f"{self.model}: {len(self.records)} of {self.checked} records give other "
                    f"outputs than {self.against}")
        if self.ok:
            return f"{self.model}: {self.checked} reference records give the outputs logged"
        return (f"{self.model}: {len(self.records)} of {self.checked} reference records give "
                "other outputs here than when the model was logged")

    def one_line(self) -> str:
        """The headline, the first differences and what differs in the environment."""
        text = self.headline()
        if self.differences:
            shown = "; ".join(d.text() for d in self.differences[:_SHOWN])
            more = len(self.differences) - _SHOWN
            text += f": {shown}" + (f"; and {more} more difference(s)" if more > 0 else "")
        if self.changes is not None:
            text += f". {self.changes.text()}"
        return text

    def text(self) -> str:
        """The headline, a line per record that differs (every difference of it), the
        environment."""
        lines = [self.headline()]
        for index in self.records:
            mine = [d for d in self.differences if d.index == index]
            lines.append(f"  {mine[0].where()}: " + "; ".join(d.what() for d in mine))
        if self.changes is not None:
            lines.append(self.changes.text())
        return "\n".join(lines)


def check(preprocessor: Preprocessor, reference: Reference, tolerance: float,
          model: str) -> Report:
    """Run the reference records in this environment and compare with the logged outputs."""
    actual = outputs_of(preprocessor, [_copy(r) for r in reference.records])
    differences = compare(reference.outputs, actual, tolerance, reference.records)
    changes = EnvironmentChanges.since(reference.environment) if differences else None
    return Report(model, len(reference.records), differences, changes)


def _copy(record: dict) -> dict:
    # The function may change its input: each run gets the records as they were logged.
    return _decode(_encode(record, "", ""))


def action_from_env(environ: dict[str, str] | None = None) -> str:
    """``PARITY_CHECK`` of the environment, as the settings table reads it."""
    raw = (os.environ if environ is None else environ).get("PARITY_CHECK", "")
    return settings.parse_value("PARITY_CHECK", raw) if raw else \
        settings.SETTINGS["PARITY_CHECK"].default


def check_at_start(preprocessor: Preprocessor, stored: Stored | None, model: str,
                   action: str | None = None) -> Report | None:
    """Before a runtime serves: the reference records give the outputs logged, or the start
    is refused with the diff (:class:`ParityError`); with ``action`` ``"warn"`` (default: the
    ``PARITY_CHECK`` setting) the diff is logged and the start goes on. None for a model
    logged without reference records."""
    if stored is None:
        return None
    action = action or action_from_env()
    started = time.perf_counter()
    report = check(preprocessor, read(stored.path), stored.tolerance, model)
    ms = round((time.perf_counter() - started) * 1000, 1)
    if report.ok:
        logger.info("reference records give the outputs logged", extra={
            "event": "parity_checked", "records": report.checked, "ms": ms})
        return report
    if action != "warn":
        raise ParityError(f"{report.one_line()}. Refused to start; run it where the model "
                          "was logged, log it again here, or set PARITY_CHECK=warn to accept "
                          "the drift")
    logger.warning(f"PARITY_CHECK=warn: {report.one_line()}", extra={
        "event": "parity_mismatch", "records": report.records, "ms": ms})
    return report



"""Capture a user's preprocessing code into a model directory, and load it back.

Three forms are accepted, matching what users of the legacy runner already have:

* a function: pickled by value with cloudpickle, so it loads where the module that defined it
  cannot be imported;
* a module file defining ``pre_processing(data)``: the file and the Python modules beside it
  (and the packages beside it) are copied, so ``import processor`` keeps working;
* a folder: its modules are copied and the entry module is ``preprocessing.py`` or, for a
  package, its ``__init__.py``.

The captured code lives in ``<model>/preprocessing/``; the flavor configuration records how to
load it (``"pickle"`` or ``"module"`` with an entry module name).
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

ENTRY_FUNCTION = "pre_processing"
CODE_SUBDIR = "preprocessing"
PICKLE_FILE = "pre_processing.pkl"
DEFAULT_ENTRY_MODULE = "preprocessing"
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".*", "*.egg-info")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class CapturedCode:
    """Where captured code went and how to load it (stored in the flavor configuration)."""

    kind: str  # "pickle" or "module"
    entry_module: str | None = None
    requirements_file: str | None = None  # a requirements.txt found beside the user's code

    def to_conf(self) -> dict[str, Any]:
        conf: dict[str, Any] = {"code_kind": self.kind, "code_dir": CODE_SUBDIR}
        if self.entry_module:
            conf["entry_module"] = self.entry_module
        return conf


def capture(pre_processing: Callable | str | os.PathLike, model_dir: str) -> CapturedCode:
    """Copy or pickle ``pre_processing`` into ``model_dir/preprocessing``."""
    dest = Path(model_dir, CODE_SUBDIR)
    if callable(pre_processing):
        dest.mkdir(parents=True)
        _pickle_function(pre_processing, dest / PICKLE_FILE)
        return CapturedCode("pickle")
    if not isinstance(pre_processing, (str, os.PathLike)):
        raise _invalid(
            f"pre_processing must be a function, a module file or a folder, not a "
            f"{type(pre_processing).__name__}; pass e.g. pre_processing=my_function or "
            "pre_processing='code/preprocessing.py'"
        )
    src = Path(pre_processing)
    if not src.exists():
        raise _invalid(
            f"pre_processing path '{src}' does not exist; pass the path of a .py file that "
            "defines pre_processing(data), or of a folder containing preprocessing.py"
        )
    if src.is_file():
        return _capture_module_file(src, dest)
    return _capture_folder(src, dest)


def _pickle_function(fn: Callable, target: Path) -> None:
    import cloudpickle

    # cloudpickle pickles functions of importable modules by reference; registering the
    # defining module makes it by value, so the model loads where that module is absent.
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    by_value = (
        module is not None
        and module.__name__ != "__main__"
        and getattr(module, "__file__", None)
        and "site-packages" not in (module.__file__ or "")
    )
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        target.write_bytes(cloudpickle.dumps(fn))
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def _capture_module_file(src: Path, dest: Path) -> CapturedCode:
    if src.suffix != ".py":
        raise _invalid(
            f"pre_processing file '{src}' is not a Python module; pass a .py file that "
            "defines pre_processing(data)"
        )
    _require_entry_function(src)
    folder = src.parent
    if (folder / "__init__.py").exists():
        # The file lives in a package: keep the package so relative imports work.
        shutil.copytree(folder, dest / folder.resolve().name, ignore=_SKIP)
        entry = f"{folder.resolve().name}.{src.stem}"
    else:
        dest.mkdir(parents=True)
        for item in folder.iterdir():
            if item.suffix == ".py" and item.is_file():
                shutil.copy2(item, dest / item.name)
            elif item.is_dir() and (item / "__init__.py").exists():
                shutil.copytree(item, dest / item.name, ignore=_SKIP)
        entry = src.stem
    return CapturedCode("module", entry, _requirements_beside(folder))


def _capture_folder(src: Path, dest: Path) -> CapturedCode:
    entry_file = src / f"{DEFAULT_ENTRY_MODULE}.py"
    if entry_file.exists():
        _require_entry_function(entry_file)
        shutil.copytree(src, dest, ignore=_SKIP)
        return CapturedCode("module", DEFAULT_ENTRY_MODULE, _requirements_beside(src))
    init_file = src / "__init__.py"
    if init_file.exists() and _defines_entry_function(init_file):
        package = src.resolve().name
        shutil.copytree(src, dest / package, ignore=_SKIP)
        return CapturedCode("module", package, _requirements_beside(src))
    raise _invalid(
        f"folder '{src}' has no entry module: add a preprocessing.py that defines "
        "pre_processing(data) (or define it in the folder's __init__.py), or pass the module "
        "file itself, e.g. pre_processing='{}/main.py'".format(src)
    )


def _requirements_beside(folder: Path) -> str | None:
    req = folder / "requirements.txt"
    return str(req) if req.is_file() else None


def _defines_entry_function(path: Path) -> bool:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise _invalid(f"cannot parse '{path}': {exc}; fix the syntax error first") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == ENTRY_FUNCTION:
            return True
        # `pre_processing = make_pipeline(...)` or `from .impl import pre_processing`
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == ENTRY_FUNCTION for t in node.targets
        ):
            return True
        if isinstance(node, ast.ImportFrom) and any(
            (a.asname or a.name) == ENTRY_FUNCTION for a in node.names
        ):
            return True
    return False


def _require_entry_function(path: Path) -> None:
    if not _defines_entry_function(path):
        raise _invalid(
            f"'{path}' does not define {ENTRY_FUNCTION}(data); add `def {ENTRY_FUNCTION}(data): "
            "... return record` to it"
        )


def load(model_dir: str, conf: dict[str, Any]) -> Callable:
    """Load the captured ``pre_processing`` callable of a saved model."""
    code_dir = Path(model_dir, conf.get("code_dir", CODE_SUBDIR))
    if conf["code_kind"] == "pickle":
        return _unpickle_function(code_dir / PICKLE_FILE)
    return _import_entry(code_dir, conf["entry_module"])


def _unpickle_function(path: Path) -> Callable:
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION

    if not MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get():
        raise MlflowException(
            "refusing to load a cloudpickled pre_processing function because "
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION is not 'true'; unpickling can run arbitrary "
            "code, so set it to 'true' only for models you trust, or log the preprocessing as "
            "a module file or folder, which loads without pickle"
        )
    import cloudpickle

    with open(path, "rb") as f:
        return cloudpickle.load(f)


def _import_entry(code_dir: Path, entry_module: str) -> Callable:
    import importlib

    search_path = [code_dir]
    if "." in entry_module:
        search_path.append(code_dir / entry_module.split(".")[0])
    for p in reversed(search_path):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    _forget_shadowing_modules(search_path)
    module = importlib.import_module(entry_module)
    fn = getattr(module, ENTRY_FUNCTION, None)
    if not callable(fn):
        raise MlflowException(
            f"module '{entry_module}' of this model has no callable {ENTRY_FUNCTION}; the "
            "model was saved by a different tool or edited after logging; log it again"
        )
    return fn


def _forget_shadowing_modules(search_path: list[Path]) -> None:
    # Two models in one process (an update, a test run) often both have a `preprocessing`
    # module. A name already imported from elsewhere must be dropped from the module cache,
    # or this model would silently run the other model's code.
    roots = [str(p.resolve()) for p in search_path]
    names = {
        item.stem if item.suffix == ".py" else item.name
        for p in search_path
        for item in p.iterdir()
        if item.suffix == ".py" or (item / "__init__.py").exists()
    }
    for name in list(sys.modules):
        top = name.split(".")[0]
        if top not in names:
            continue
        file = getattr(sys.modules[name], "__file__", None) or ""
        if not any(os.path.realpath(file).startswith(root + os.sep) for root in roots):
            del sys.modules[name]


@contextlib.contextmanager
def caller_imports_kept() -> Iterator[None]:
    """Leave ``sys.path`` and ``sys.modules`` as the caller had them.

    Logging a model loads its code to try it (our input-example check, MLflow's signature and
    serving-input checks) from temporary folders that are deleted afterwards, and loading drops
    same-named modules (:func:`_forget_shadowing_modules`). In a trainer's interpreter that
    would leave dead folders on ``sys.path`` and replace the trainer's own ``processor``
    module with the model's copy.
    """
    path = list(sys.path)
    modules = dict(sys.modules)
    try:
        yield
    finally:
        added = [os.path.realpath(p) for p in sys.path if p not in path and p]
        sys.path[:] = path
        for name, module in list(sys.modules.items()):
            before = modules.get(name)
            if before is None:
                file = getattr(module, "__file__", None)
                if file and any(os.path.realpath(file).startswith(d + os.sep) for d in added):
                    del sys.modules[name]
            elif before is not module:
                sys.modules[name] = before
        for name, module in modules.items():
            sys.modules.setdefault(name, module)

"""Capture a user's preprocessing code into a model directory, and load it back.

Three forms are accepted, matching what users of the legacy runner already have:

* a function: pickled by value with cloudpickle, so it loads where the module that defined it
  cannot be imported;
* a module file defining ``pre_processing(data)``: the file and the Python modules beside it
  (and the packages beside it) are copied, so ``import processor`` keeps working;
* a folder: its modules are copied and the entry module is ``preprocessing.py`` or, for a
  package, its ``__init__.py``.

What is copied is what Python imports: ``.py`` files and packages (folders with an
``__init__.py``), plus the ``extra_files`` the user names (a table the code reads from its own
folder). Nothing else of the folder goes into the model, and so into its image; a symlink is
followed only when it points inside the code's folder. What was copied, and what was left out,
is logged.

The captured code lives in ``<model>/preprocessing/``; the flavor configuration records how to
load it (``"pickle"`` or ``"module"`` with an entry module name).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

ENTRY_FUNCTION = "pre_processing"
CODE_SUBDIR = "preprocessing"
PICKLE_FILE = "pre_processing.pkl"
DEFAULT_ENTRY_MODULE = "preprocessing"
_SHOWN = 8  # names listed in the capture summary
_logger = logging.getLogger(__name__)


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


@dataclass
class _Copy:
    """What one capture copied, left out and refused; nothing outside ``root`` is copied."""

    root: Path  # the code's folder, resolved
    copied: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # symlinks out of root: "name -> target"

    def inside(self, path: Path) -> bool:
        real = path.resolve()
        return real == self.root or self.root in real.parents


def capture(pre_processing: Callable | str | os.PathLike, model_dir: str,
            extra_files: Sequence[str | os.PathLike] | None = None) -> CapturedCode:
    """Copy or pickle ``pre_processing`` into ``model_dir/preprocessing``; ``extra_files``
    (paths in the code's folder, or relative to it) are copied to the same place beside it."""
    dest = Path(model_dir, CODE_SUBDIR)
    if callable(pre_processing):
        if extra_files:
            raise _invalid("extra_files needs pre_processing as a module file or folder: a "
                           "pickled function has no folder to put them beside")
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
        captured, folder, code_dest = _capture_module_file(src, dest)
    else:
        captured, folder, code_dest = _capture_folder(src, dest)
    copy = _Copy(folder.resolve())
    _copy(copy, folder, code_dest, "", python_only=True, report=code_dest != dest or src.is_dir())
    entry = src.name if src.is_file() else \
        "__init__.py" if code_dest != dest else f"{DEFAULT_ENTRY_MODULE}.py"
    if not (code_dest / entry).is_file():
        raise _invalid(f"'{folder / entry}' points to {os.path.realpath(folder / entry)}, "
                       f"outside the code's folder {copy.root}, and symlinks out of it are "
                       "never followed; copy the file itself into the folder")
    _copy_extra_files(copy, folder, code_dest, extra_files or ())
    _report(copy)
    return captured


def _copy(copy: _Copy, src: Path, dest: Path, rel: str, python_only: bool, report: bool,
          ancestors: frozenset[Path] = frozenset()) -> None:
    """The modules and packages of folder ``src`` (every file, unless ``python_only``)
    into ``dest``; ``report`` records what is left out (not for the folder beside a lone
    module file, which was never the model's)."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        name = f"{rel}{item.name}"
        if item.name.startswith(".") or item.name == "__pycache__" or \
                item.name.endswith((".egg-info", ".pyc")) or name == "requirements.txt":
            continue  # the requirements are read where they are, into the model's own
        folder = item.is_dir()
        wanted = not python_only or (
            (item / "__init__.py").is_file() if folder else item.suffix == ".py")
        if not copy.inside(item):
            # An id_rsa or a sibling's tree behind a symlink: never followed out of the folder.
            if wanted or report:
                copy.outside.append(f"{name} -> {os.path.realpath(item)}")
        elif not wanted:
            if report:
                copy.left_out.append(name + ("/" if folder else ""))
        elif folder:
            real = item.resolve()
            if real not in ancestors:  # a link to a parent folder would never end
                _copy(copy, item, dest / item.name, f"{name}/", python_only, True,
                      ancestors | {real})
        elif item.is_file():
            shutil.copy2(item, dest / item.name)
            copy.copied.append(name)


def _copy_extra_files(copy: _Copy, folder: Path, dest: Path,
                      extra_files: Sequence[str | os.PathLike]) -> None:
    for given in extra_files:
        path = Path(folder, given)  # an absolute path stays itself
        rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder)))
        if rel.parts[:1] == ("..",) or not copy.inside(path):
            raise _invalid(f"extra_files: '{given}' is outside the code's folder {folder}; "
                           "only files of that folder are captured with the code: copy it in "
                           "there and name it relative to the folder")
        if not path.exists():
            raise _invalid(f"extra_files: '{given}' does not exist in {folder}; name files "
                           "of the code's folder, relative to it (e.g. extra_files=['table.csv'])")
        if path.is_dir():
            _copy(copy, path, dest / rel, f"{rel.as_posix()}/", python_only=False, report=True)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
            copy.copied.append(rel.as_posix())
        named = rel.as_posix()
        copy.left_out = [n for n in copy.left_out
                         if n.rstrip("/") != named and not n.startswith(named + "/")]


def _report(copy: _Copy) -> None:
    _logger.info("captured %d file(s) of %s: %s", len(copy.copied), copy.root,
                 _names(copy.copied))
    if copy.outside:
        _logger.warning("not captured: %s (symlinks out of %s are never followed); copy what "
                        "the code needs into its folder", _names(copy.outside), copy.root)
    if copy.left_out:
        _logger.warning("not captured, not Python: %s; if the code reads them, pass "
                        "extra_files=[...] (paths in %s)", _names(copy.left_out), copy.root)


def _names(names: list[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


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


# The two forms below say what to load and where the code's folder goes; capture copies it.

def _capture_module_file(src: Path, dest: Path) -> tuple[CapturedCode, Path, Path]:
    if src.suffix != ".py":
        raise _invalid(
            f"pre_processing file '{src}' is not a Python module; pass a .py file that "
            "defines pre_processing(data)"
        )
    _require_entry_function(src)
    folder = src.parent
    if (folder / "__init__.py").exists():
        # The file lives in a package: keep the package so relative imports work.
        package = folder.resolve().name
        return (CapturedCode("module", f"{package}.{src.stem}", _requirements_beside(folder)),
                folder, dest / package)
    return CapturedCode("module", src.stem, _requirements_beside(folder)), folder, dest


def _capture_folder(src: Path, dest: Path) -> tuple[CapturedCode, Path, Path]:
    entry_file = src / f"{DEFAULT_ENTRY_MODULE}.py"
    if entry_file.exists():
        _require_entry_function(entry_file)
        return (CapturedCode("module", DEFAULT_ENTRY_MODULE, _requirements_beside(src)), src,
                dest)
    init_file = src / "__init__.py"
    if init_file.exists() and _defines_entry_function(init_file):
        package = src.resolve().name
        return CapturedCode("module", package, _requirements_beside(src)), src, dest / package
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

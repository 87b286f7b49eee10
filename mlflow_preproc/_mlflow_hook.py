"""Make ``mlflow.preproc`` exist after a plain ``import mlflow``.

MLflow has no entry point for flavors. It does load the ``mlflow.run_context_provider`` entry
point group while ``import mlflow`` runs, so this package registers :class:`FlavorHook` there:
loading it installs a lazy ``mlflow.preproc`` module, the way ``mlflow/__init__.py`` declares
its own flavors. Nothing heavy is imported until ``mlflow.preproc`` is first used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def install() -> None:
    """Expose ``mlflow_preproc.runtime.flavor`` as ``mlflow.preproc`` (lazily)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or "preproc" in mlflow.__dict__:
        return  # not imported yet: the entry point installs it during `import mlflow`
    from mlflow.utils.lazy_load import LazyLoader

    # Like MLflow's own flavors: an attribute of `mlflow`, not an entry of sys.modules.
    # Code that walks sys.modules and probes every module (skops, pickle's whichmodule,
    # MLflow's requirement capture) would otherwise load the flavor, and every model logged
    # where this package is installed would list mlflow-preproc as a requirement.
    mlflow.preproc = LazyLoader("mlflow.preproc", mlflow.__dict__, "mlflow_preproc.runtime.flavor")
    sys.meta_path.append(_AliasFinder())


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import mlflow.preproc`` import ``mlflow_preproc.runtime.flavor``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "mlflow.preproc":
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module("mlflow_preproc.runtime.flavor")

    def exec_module(self, module) -> None:
        pass  # already executed under its own name


class FlavorHook:
    """A run context provider that adds no tags; loading it installs ``mlflow.preproc``.

    Duck-typed rather than a ``RunContextProvider`` subclass: importing MLflow's base class
    from here would import ``mlflow`` itself, a cycle when this package is imported first.
    """

    def __init__(self) -> None:
        install()

    def in_context(self) -> bool:
        return False

    def tags(self) -> dict[str, str]:
        return {}

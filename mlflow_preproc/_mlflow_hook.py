"""Make ``mlflow.preproc`` exist after a plain ``import mlflow``.

MLflow has no entry point for flavors. It does load the ``mlflow.run_context_provider`` entry
point group while ``import mlflow`` runs, so this package registers :class:`FlavorHook` there:
loading it installs a lazy ``mlflow.preproc`` module, the way ``mlflow/__init__.py`` declares
its own flavors. Nothing heavy is imported until ``mlflow.preproc`` is first used.
"""

from __future__ import annotations

import sys


def install() -> None:
    """Expose ``mlflow_preproc.flavor`` as ``mlflow.preproc`` (lazily)."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or "mlflow.preproc" in sys.modules:
        return  # not imported yet: the entry point installs it during `import mlflow`
    from mlflow.utils.lazy_load import LazyLoader

    module = LazyLoader("mlflow.preproc", mlflow.__dict__, "mlflow_preproc.flavor")
    mlflow.preproc = module
    sys.modules["mlflow.preproc"] = module


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

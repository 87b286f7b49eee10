"""mlflow-preproc: data preprocessing as a first-class MLflow model.

``import mlflow_preproc`` is cheap: the flavor functions (``log_model``, ``save_model``,
``load_model``...) are loaded on first use, and importing this package also makes them
available as ``mlflow.preproc``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_FLAVOR_API = (
    "FLAVOR_NAME",
    "save_model",
    "log_model",
    "load_model",
    "load_preprocessing",
    "suggest_input_fields",
    "get_default_pip_requirements",
    "get_default_conda_env",
)


def __getattr__(name: str) -> Any:
    # PEP 562: importing mlflow.pyfunc here eagerly would form an import cycle when this
    # package is loaded from inside `import mlflow` (see mlflow_preproc/_mlflow_hook.py).
    if name in _FLAVOR_API:
        return getattr(importlib.import_module("mlflow_preproc.runtime.flavor"), name)
    raise AttributeError(f"module 'mlflow_preproc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FLAVOR_API])


from mlflow_preproc import _mlflow_hook  # noqa: E402  (registers mlflow.preproc)

_mlflow_hook.install()

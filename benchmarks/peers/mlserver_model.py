"""(m) The stock pyfunc of ``pyfunc_add_field.py`` saved for MLServer 1.7 (mlserver-mlflow).

Runs in the MLServer virtualenv that ``stream_throughput.py --setup`` makes, with that
virtualenv's MLflow (it imports nothing of mlflow-preproc)::

    python peers/mlserver_model.py FOLDER

writes ``FOLDER/model`` (``mlflow.pyfunc.save_model``, models from code) and
``FOLDER/model-settings.json`` (``mlserver_mlflow.MLflowRuntime``), ready for
``mlserver start FOLDER``. No signature: MLServer decodes each V2 request by its
``content_type: pd`` into a one-row DataFrame, the model returns it with the extra column,
and MLServer encodes that DataFrame as the V2 response.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow.pyfunc

MODEL_NAME = "add-field"
PYFUNC = Path(__file__).resolve().parent / "pyfunc_add_field.py"


def main() -> None:
    folder = Path(sys.argv[1])
    mlflow.pyfunc.save_model(str(folder / "model"), python_model=str(PYFUNC))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": MODEL_NAME,
        "implementation": "mlserver_mlflow.MLflowRuntime",
        "parameters": {"uri": str(folder / "model")},
    }))


if __name__ == "__main__":
    main()

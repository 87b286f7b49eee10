"""The benchmark's function as a stock MLflow pyfunc (models from code): what a user would
write without mlflow-preproc. Served by ``mlflow models serve`` for the REST rows and by
MLServer for (m), each logged by the MLflow of its own environment.

Identity plus one field, on the DataFrame the server made of the request:
``candid_next = candid + 1``.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class AddField(PythonModel):
    def predict(self, context, model_input, params=None):
        out = model_input.copy()
        out["candid_next"] = out["candid"] + 1
        return out


mlflow.models.set_model(AddField())

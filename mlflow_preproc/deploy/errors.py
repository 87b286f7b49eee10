"""The one error of the ``preproc`` target: a reason the user can fix, and how."""

from __future__ import annotations

import click
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class DeploymentError(MlflowException, click.ClickException):
    """A deployment failed for a reason the user can fix; the message says how.

    Also a ClickException, so the ``mlflow deployments`` CLI prints one line, not a traceback.
    """

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)
        click.ClickException.__init__(self, message)

    def __str__(self) -> str:
        return self.message


def not_found(name: str) -> DeploymentError:
    return DeploymentError(f"no deployment named {name}; mlflow deployments list -t "
                           "preproc shows the deployments")

"""What a backend of the ``preproc`` target does, whatever runs the deployment.

The adapter (:mod:`~mlflow_preproc.deploy.target`) checks the options with the planner and
hands them to one backend; a backend plans with :mod:`~mlflow_preproc.deploy.planner`, builds
with :mod:`~mlflow_preproc.deploy.model_image` and runs the result its own way. A backend
imports neither the adapter nor another backend.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.engine import Engine


class Backend(Protocol):
    """Create, roll out (with rollback), delete and read deployments on one kind of host."""

    name: ClassVar[str]  # its -C backend= value; options.OPTIONS says which keys it reads

    @classmethod
    def from_options(cls, engine: Engine, options: dict[str, str]) -> Backend:
        """The backend for these (resolved) options; ``engine`` builds the images."""

    def create(self, name: str, model_uri: str, options: dict[str, str]) -> dict:
        """Build and start ``name``; on failure leave nothing running."""

    def update(self, name: str, model_uri: str | None, given: dict[str, str]) -> dict:
        """Roll ``name`` out to a new revision (``given`` over what it runs now); on failure
        the previous revision runs again."""

    def delete(self, name: str, options: dict[str, str]) -> None:
        """Stop and remove every revision of ``name``."""

    def get(self, name: str) -> dict:
        """What ``name`` runs, with this backend's keys only."""

    def list(self) -> list[dict]:
        """Every deployment, one short item each (:func:`listed`)."""


def keys(backend: type[Backend] | Backend) -> list[str]:
    """The ``-C`` keys ``backend`` accepts (the options table's backends column)."""
    return [k for k, o in opts.OPTIONS.items() if backend.name in o.backends]


def listed(deployment: dict) -> dict:
    """What ``list`` gives of a deployment ``get`` describes: ``mlflow deployments list``
    prints the whole list as one Python value, so each item is kept to a line."""
    return {"name": deployment["name"], "flavor": deployment["flavor"],
            "backend": deployment["backend"], "model": deployment["model_uri"],
            "revision": deployment["revision"], "status": deployment["status"]}

"""Which registered model and version a model URI names, for topic and image names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

# Written into the model folder of images built by the deployment target.
REGISTERED_MODEL_FILE = "registered_model.json"

_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


class ModelNotFound(LookupError):
    """The model URI names nothing in the registry; the message says what was looked up."""


@dataclass(frozen=True)
class ModelIdentity:
    """A model URI with its registered name and version when it has them."""

    uri: str
    download_uri: str
    name: str | None = None
    version: str | None = None

    @property
    def provenance(self) -> str:
        """What names the model in the outputs' provenance header: ``models:/<name>/<version>``
        when it is a registered version (an alias or ``latest`` resolved), else the URI as
        given."""
        if self.version is not None:
            return f"models:/{self.name}/{self.version}"
        return self.uri


def resolve_model(uri: str) -> ModelIdentity:
    """Resolve ``models:/name/version``, ``models:/name/latest`` and ``models:/name@alias``.

    Other URIs (``models:/m-<id>``, ``runs:/``, paths) are kept as they are, with no name.
    """
    match = _REGISTERED.match(uri)
    if not match:
        return _baked_identity(uri) or ModelIdentity(uri, uri)
    require_store(uri)  # before MlflowClient, which would create ./mlflow.db to look in
    from mlflow import MlflowClient

    name, version, alias = match["name"], match["version"], match["alias"]
    client = MlflowClient()
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        elif version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ModelNotFound(f"registered model {name} has no versions; register one")
            version = str(max(int(v.version) for v in versions))
        elif version.isdigit():
            client.get_model_version(name, version)
        else:
            return ModelIdentity(uri, uri)  # a legacy stage name: let MLflow resolve it
    except MlflowException as exc:
        raise not_found(uri, exc) from None
    return ModelIdentity(uri, f"models:/{name}/{version}", name, str(version))


def local_identity(path: str, uri: str | None = None) -> ModelIdentity:
    """Who a model already on disk is (in an image: ``/opt/ml/model``), for provenance headers,
    topic and group names: what the deployment target wrote into it, else ``uri`` as the
    operator names it (``MODEL_URI``; not looked up, an image has no registry to ask), else the
    MLflow model id in its MLmodel, else the path."""
    baked = _baked_identity(path)
    if baked is not None:
        return baked
    if uri:
        match = _REGISTERED.match(uri)
        if match and (match["version"] or "").isdigit():
            return ModelIdentity(uri, path, match["name"], match["version"])
        return ModelIdentity(uri, path)
    model_id = _model_id(path)
    if model_id:
        return ModelIdentity(f"models:/{model_id}", path)
    return ModelIdentity(path, path)


def _model_id(path: str) -> str | None:
    import os

    import yaml

    mlmodel = os.path.join(path, "MLmodel")
    if not os.path.isfile(mlmodel):
        return None
    return (yaml.safe_load(open(mlmodel)) or {}).get("model_id")


def _baked_identity(path: str) -> ModelIdentity | None:
    # Images built by the deployment target carry the registry identity of their model.
    import json
    import os

    file = os.path.join(path, REGISTERED_MODEL_FILE)
    if not os.path.isfile(file):
        return None
    baked = json.load(open(file))
    return ModelIdentity(baked["uri"], path, baked.get("name"), baked.get("version"))


def require_store(uri: str) -> None:
    """Refuse a ``models:/`` or ``runs:/`` URI when no MLflow store is configured or present.
    Every command calls it before MLflow first touches the store: none creates a store it
    only reads from.

    With ``MLFLOW_TRACKING_URI`` unset, MLflow uses ``./mlflow.db`` and creates it, empty,
    on first use: the model is then "not found" and a stray database is left behind. Said
    first, with the fix, and nothing is created.
    """
    import os

    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if not uri.startswith(("models:/", "runs:/")) or is_tracking_uri_set() \
            or os.environ.get("MLFLOW_REGISTRY_URI"):
        return
    default = _tracking_uri()
    path = default.removeprefix("sqlite:///")
    if path != default and not os.path.exists(path):
        raise ModelNotFound(
            f"{uri} needs an MLflow store, and MLFLOW_TRACKING_URI is not set (MLflow's "
            f"default, {path}, does not exist); set it to where the "
            "model was logged, e.g. export MLFLOW_TRACKING_URI=sqlite:///path/to/mlflow.db "
            "or http://mlflow.example:5000")


def not_found(uri: str, exc: MlflowException) -> ModelNotFound:
    """``uri`` named nothing in the store MLflow asked: which store, and what to check."""
    return ModelNotFound(f"{uri} was not found in the MLflow store at {_tracking_uri()}: "
                         f"{exc.message.splitlines()[0]}; check the name and version, and "
                         "MLFLOW_TRACKING_URI")


def _tracking_uri() -> str:
    """The tracking URI as messages may show it (credentials in it redacted)."""
    import mlflow

    from mlflow_preproc.secrets import redact_url

    return redact_url(mlflow.get_tracking_uri())

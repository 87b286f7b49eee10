"""Options and model in, a checked :class:`~mlflow_preproc.deploy.spec.Deployment` out.

The place where "check everything before touching anything" holds for both backends: the
``-C`` keys (through :mod:`~mlflow_preproc.deploy.options` and the settings table), the
deployment name, the model (found, and a preprocessing model), the base image the Dockerfile
would name, a prediction model to bake in. Reads the model registry and the MLmodel files;
contacts no engine, no cluster and no broker.
"""

from __future__ import annotations

import contextlib
import os

from mlflow.exceptions import MlflowException

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.errors import DeploymentError
from mlflow_preproc.deploy.image_build import BuildError, base_image, docker_reference
from mlflow_preproc.deploy.spec import Deployment, with_stream_defaults

FLAVOR = "preprocessing"


def resolve_options(flavor: str | None, config: dict | None,
                    name: str | None = None) -> dict[str, str]:
    """The ``-C`` options with their defaults, checked (and ``name``, when given)."""
    if flavor not in (None, FLAVOR, "python_function"):
        raise DeploymentError(f"flavor {flavor!r} is not supported by the preproc target; "
                              f"omit --flavor or use {FLAVOR}")
    try:
        return opts.resolve(config or {}, name)
    except (opts.OptionError, settings.ConfigError) as exc:
        raise DeploymentError(str(exc)) from None


def plan(name: str, model_uri: str, options: dict[str, str], revision: int = 1) -> Deployment:
    """The deployment ``options`` describe, of the model at ``model_uri``."""
    from mlflow_preproc.runtime.model_identity import ModelNotFound, resolve_model

    try:
        identity = resolve_model(model_uri)
    except ModelNotFound as exc:
        raise DeploymentError(str(exc)) from None
    flavors = _require_preprocessing(model_uri, identity.download_uri)
    try:  # the Dockerfile is written from it: refused now, before anything is touched
        base_image(options, flavors.get("python_function", {}).get("python_version"))
    except BuildError as exc:
        raise DeploymentError(str(exc)) from None
    options = with_stream_defaults(name, identity, options)
    prediction_identity = None
    if options.get("prediction_model_uri"):
        try:  # baked into the image with the preprocessing model (one hop)
            prediction_identity = resolve_model(options["prediction_model_uri"])
        except ModelNotFound as exc:
            raise DeploymentError(str(exc)) from None
    default_repo = (f"preprocessing-{identity.name}-{identity.version}"
                    if identity.name else f"preprocessing-{name}")
    image = f"{docker_reference(options.get('image') or default_repo)}:" \
            f"{options.get('tag') or 'latest'}"
    if options.get("registry"):
        image = f"{options['registry'].rstrip('/')}/{image}"
    return Deployment(name, model_uri, identity, image, options, revision, prediction_identity)


def _require_preprocessing(model_uri: str, download_uri: str) -> dict:
    """The model's flavors; raises unless it is a preprocessing model."""
    from mlflow.models import get_model_info

    with no_download_bars():
        try:  # reads the MLmodel file only, for every kind of model URI
            flavors = get_model_info(download_uri).flavors
        except MlflowException as exc:
            raise DeploymentError(f"cannot download {model_uri}: "
                                  f"{exc.message.splitlines()[0]}") from None
    if FLAVOR not in flavors:
        raise DeploymentError(
            f"{model_uri} is not a preprocessing model (its flavors: "
            f"{', '.join(flavors) or 'none'}); the preproc target deploys models logged "
            "with mlflow.preproc.log_model; use mlflow models build-docker for others")
    return flavors


@contextlib.contextmanager
def no_download_bars():
    """MLflow draws a progress bar per artifact download; one line per step is enough here."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before

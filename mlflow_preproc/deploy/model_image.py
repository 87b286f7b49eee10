"""A deployment's serving image: download its model(s), write the build context, build it on
the engine. Shared by both backends (Kubernetes then pushes it to ``-C registry``)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import steps
from mlflow_preproc.deploy.errors import DeploymentError
from mlflow_preproc.deploy.image_build import (
    LABEL,
    BuildError,
    base_image,
    build_image,
    model_python_version,
    prepare_context,
)
from mlflow_preproc.deploy.planner import no_download_bars
from mlflow_preproc.deploy.spec import Deployment


def build(engine, d: Deployment, echo=None) -> None:
    """Build ``d.image`` on ``engine`` (a ``docker.DockerClient``); ``echo`` receives the
    build's output lines (default: only a failure's tail, in the error)."""
    import mlflow

    steps.step(1, f"building {d.image}")
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=25)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-preproc-model-"))
    (workdir / "model").mkdir()
    (workdir / "predict").mkdir()
    try:
        with no_download_bars():
            model_dir = Path(mlflow.artifacts.download_artifacts(
                d.identity.download_uri, dst_path=str(workdir / "model")))
            prediction_model = None
            if d.prediction_identity is not None:
                prediction_model = (Path(mlflow.artifacts.download_artifacts(
                    d.prediction_identity.download_uri, dst_path=str(workdir / "predict"))),
                    _identity_json(d.prediction_identity))
        try:
            base = base_image(d.options, model_python_version(model_dir))
            context = prepare_context(model_dir, base, _identity_json(d.identity),
                                      prediction_model)
        except BuildError as exc:
            raise DeploymentError(str(exc)) from None
        try:
            build_image(engine, context, d.image, {f"{LABEL}.model-uri": d.identity.uri},
                        network_mode=d.options["network_mode"],
                        nocache=settings.parse_bool(d.options["no_cache"], "no_cache"),
                        echo=echo or tail.append, buildargs=_build_args(d.options))
        except BuildError as exc:
            raise DeploymentError(str(exc)) from None
        finally:
            shutil.rmtree(context, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    steps.done(f"built {d.image} from {base}", started)


def _build_args(options: dict[str, str]) -> dict[str, str]:
    """What the image build's parity check does with a drift: the deployment's
    ``PARITY_CHECK`` (``-C parity_check=`` or ``-C env.PARITY_CHECK=``), as its containers
    will at start."""
    given = options.get("parity_check") or options.get("env.PARITY_CHECK")
    return {"PARITY_CHECK": settings.parse_value("PARITY_CHECK", given)} if given else {}


def _identity_json(identity) -> dict:
    return {"uri": identity.uri, "name": identity.name, "version": identity.version}

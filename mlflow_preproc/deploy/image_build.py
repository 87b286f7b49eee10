"""Build the serving image of a preprocessing model with the Docker SDK.

The image is the model's own environment (``requirements.txt`` installed on a Python base) with
the model in ``/opt/ml/model`` and :mod:`mlflow_preproc.image.entrypoint` as ENTRYPOINT. The
requirements layer comes before the model layer, so a new model version with the same
requirements rebuilds in seconds from the cache.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from mlflow_preproc.runtime.model_identity import REGISTERED_MODEL_FILE

MODEL_PATH = "/opt/ml/model"
LABEL = "org.mlflow-preproc"

PREDICTION_MODEL_PATH = "/opt/ml/prediction_model"

# Docker's reference grammar (distribution/reference): [host[:port]/]path[:tag][@digest].
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"{_NAME}(?:\.{_NAME})*"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(rf"(?:{_HOST}(?::[0-9]+)?/)?{_PATH}(?:/{_PATH})*"
                             r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                             r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:"
                             r"[0-9a-fA-F]{32,})?")
PYTHON_VERSION = re.compile(r"[0-9]+(?:\.[0-9]+){0,2}")

# The requirements layers come before the models: a new model version with the same
# requirements rebuilds from the cache in seconds. The last step runs the model's reference
# records in the image's environment: outputs other than those logged fail the build, so no
# image is tagged and no deployment made of them (PARITY_CHECK=warn, a build argument from
# the deployment's options, logs them instead).
DOCKERFILE = """\
FROM {base_image}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY model/requirements.txt /opt/ml/requirements.txt
{prediction_requirements}RUN python -m pip install --no-cache-dir -r /opt/ml/requirements.txt{also}
COPY model {model_path}
{prediction_model}ENV PYTHONPATH={model_path}/code
ARG PARITY_CHECK=refuse
RUN python -m mlflow_preproc.image.parity_check {model_path}
ENTRYPOINT ["python", "-m", "mlflow_preproc.image.entrypoint"]
"""


class BuildError(RuntimeError):
    """The image build failed; the message holds the failing step and its log tail."""


def docker_reference(text: str) -> str:
    """A valid Docker repository name: lowercase ``[a-z0-9._-]``, no leading separator."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    name = re.sub(r"[._-]{2,}", "-", name).strip("._-")
    return name[:128] or "preprocessing"


def model_python_version(model_dir: Path) -> str | None:
    """The Python version the model was logged with (MLmodel, python_function flavor)."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    return mlmodel["flavors"].get("python_function", {}).get("python_version")


def base_image(options: dict[str, str], model_python: str | None) -> str:
    """The image to build on: ``base_image``, else ``python:<version>-slim`` with
    ``python_version`` or the model's. Raises :class:`BuildError` for a version that is not
    one: it is written into the Dockerfile, where a newline would add build steps."""
    if options.get("base_image"):
        return options["base_image"]
    version = options.get("python_version") or model_python
    if not version or not PYTHON_VERSION.fullmatch(str(version)):
        # -C python_version was checked with the options: this is the model's MLmodel.
        raise BuildError(f"the model's python_version {version!r} is not a Python version "
                         "(its MLmodel file was edited, or written by another tool); pass "
                         "-C python_version=3.11 or -C base_image=IMAGE")
    return f"python:{version}-slim"


def prepare_context(model_dir: Path, base_image: str, registered: dict | None,
                    prediction_model: tuple[Path, dict] | None = None) -> Path:
    """A temporary build context: the model, its registry identity and the Dockerfile; with
    ``prediction_model`` (its folder and identity), that model too, for one-hop predictions.
    Both models' requirements are installed in one environment: if they conflict, the build
    fails at its pip step, and the bridge (two images) is the way."""
    if not IMAGE_REFERENCE.fullmatch(base_image):
        raise BuildError(f"base image {base_image!r} is not a Docker image reference; no "
                         "Dockerfile is written from it")
    context = Path(tempfile.mkdtemp(prefix="mlflow-preproc-build-"))
    shutil.copytree(model_dir, context / "model", ignore=shutil.ignore_patterns("__pycache__"))
    if registered:
        (context / "model" / REGISTERED_MODEL_FILE).write_text(json.dumps(registered))
    parts = {"prediction_requirements": "", "also": "", "prediction_model": ""}
    if prediction_model is not None:
        folder, identity = prediction_model
        shutil.copytree(folder, context / "prediction_model",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (context / "prediction_model" / REGISTERED_MODEL_FILE).write_text(json.dumps(identity))
        parts = {"prediction_requirements": "COPY prediction_model/requirements.txt "
                                            "/opt/ml/prediction-requirements.txt\n",
                 "also": " -r /opt/ml/prediction-requirements.txt",
                 "prediction_model": f"COPY prediction_model {PREDICTION_MODEL_PATH}\n"}
    (context / "Dockerfile").write_text(DOCKERFILE.format(base_image=base_image,
                                                          model_path=MODEL_PATH, **parts))
    return context


def build_image(client, context: Path, reference: str, labels: dict[str, str],
                network_mode: str = "host", nocache: bool = False,
                echo: Callable[[str], None] | None = None,
                buildargs: dict[str, str] | None = None) -> str:
    """Build ``reference`` from ``context``, streaming progress to ``echo`` (stderr).

    Returns the image id. Raises :class:`BuildError` with the failing step and its log tail.
    """
    echo = echo or (lambda line: print(line, end="", file=sys.stderr, flush=True))
    tail: deque[str] = deque(maxlen=25)
    step = "the build"
    image_id = None
    for chunk in client.api.build(path=str(context), tag=reference, labels=labels,
                                  network_mode=network_mode, nocache=nocache, rm=True,
                                  forcerm=True, decode=True, buildargs=buildargs):
        if "stream" in chunk:
            line = chunk["stream"]
            tail.append(line)
            echo(line)
            if line.startswith("Step "):
                step = line.strip()
            match = re.search(r"Successfully built ([0-9a-f]+)", line)
            if match:
                image_id = match.group(1)
        elif "error" in chunk:
            raise BuildError(f"image build failed at {step}: {chunk['error'].strip()}\n"
                             f"--- last build output ---\n{''.join(tail)}")
        elif "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
    if image_id is None:
        raise BuildError(f"image build of {reference} ended without an image; last output:\n"
                         f"{''.join(tail)}")
    return image_id

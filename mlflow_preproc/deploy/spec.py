"""What a deployment runs: one plan, and the container each replica is made of.

:class:`Deployment` is a deployment's whole resolved configuration (model, image, options,
consumer group, output topic, revision). :func:`container_spec` turns it into the image,
environment, command, ports, labels and mounts of one container. It is the only place that
decides them, so the Docker backend runs exactly what the Kubernetes manifests describe, and
:func:`check_settings` puts that same environment through the settings table the container
will read, so a bad value is refused before anything is built or stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mlflow_preproc import config as settings
from mlflow_preproc.deploy.image_build import LABEL, PREDICTION_MODEL_PATH
from mlflow_preproc.deploy.options import CONSUMING_MODES, SERVING_MODES, mounts, redacted
from mlflow_preproc.runtime.model_identity import ModelIdentity

DEPLOYMENT_LABEL = f"{LABEL}.deployment"
REVISION_LABEL = f"{LABEL}.revision"
# Options kept with the deployment but not part of what runs.
_NOT_STORED = ("remove_image",)


@dataclass(frozen=True)
class Deployment:
    """A deployment's resolved configuration; stored in its containers' labels."""

    name: str
    model_uri: str  # as the user gave it
    identity: ModelIdentity
    image: str
    options: dict[str, str]
    revision: int = 1
    prediction_identity: ModelIdentity | None = None  # a model baked in for one-hop predictions

    @property
    def mode(self) -> str:
        return self.options["mode"]

    @property
    def consuming(self) -> bool:
        return self.mode in CONSUMING_MODES

    @property
    def serving(self) -> bool:
        return self.mode in SERVING_MODES

    @property
    def consumers(self) -> int:
        """Stream processes per container (the bridge runs one)."""
        if self.mode == "bridge":
            return 1
        return int(self.options["consumers"]) if self.consuming else 0

    @property
    def replicas(self) -> int:
        return int(self.options["replicas"])


@dataclass(frozen=True)
class ContainerSpec:
    """One container: what ``docker run`` is given, and a Kubernetes container is made of."""

    name: str
    image: str
    env: dict[str, str]
    labels: dict[str, str]
    rest_port: int | None  # the scoring server (/ping, /health, /invocations)
    metrics_ports: list[int] = field(default_factory=list)  # /healthz and /metrics, per consumer
    mounts: dict[str, str] = field(default_factory=dict)  # container path -> host path
    # Kubernetes' resources ({"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": ...});
    # Docker applies the limits (requests are refused there).
    resources: dict[str, dict[str, str]] = field(default_factory=dict)


def default_consumer_group(name: str) -> str:
    """A deployment's own group: two deployments never split a topic's partitions by
    accident; the replicas of one share it."""
    return settings.sanitize_topic(f"mlflow-preproc-{name}")


def default_output_topic(identity: ModelIdentity, options: dict[str, str]) -> str | None:
    """The legacy runner's ``{model_name}-{version}-{suffix}``, for a registered model."""
    if identity.name is None:
        return None
    suffix = options.get("kafka_topic_suffix") or settings.SETTINGS["KAFKA_TOPIC_SUFFIX"].default
    return settings.sanitize_topic(f"{identity.name}-{identity.version}-{suffix}")


def with_stream_defaults(name: str, identity: ModelIdentity,
                         options: dict[str, str]) -> dict[str, str]:
    """``options`` with the consumer group and output topic a consuming deployment needs,
    resolved once so that an update keeps them."""
    options = dict(options)
    if options["mode"] in CONSUMING_MODES:
        options.setdefault("consumer_group_id", default_consumer_group(name))
    if options["mode"] in ("kafka", "both") and not options.get("output_topic"):
        topic = default_output_topic(identity, options)
        if topic:
            options["output_topic"] = topic
    return options


def container_spec(d: Deployment, replica: int, rest_port: int,
                   metrics_port: int | None) -> ContainerSpec:
    """Replica ``replica`` of ``d``, its REST server on ``rest_port`` and its consumers'
    ``/healthz`` on ``metrics_port``, ``metrics_port + 1``..."""
    env = {"MLFLOW_PREPROC_MODE": d.mode, "PORT": str(rest_port),
           "KAFKA_CONSUMERS": d.options["consumers"],
           settings.DEPLOYMENT_ENV: d.name, settings.REVISION_ENV: str(d.revision)}
    if d.options.get("workers"):
        env["MLFLOW_MODELS_WORKERS"] = d.options["workers"]
    for key, value in d.options.items():
        if key.upper() in settings.SETTINGS and key.upper() not in env:
            env[key.upper()] = value
        elif key.startswith("env."):
            env[key[len("env."):]] = value
    if d.consuming and metrics_port:
        env["METRICS_PORT"] = str(metrics_port)
    if d.options.get("prediction_model_uri"):
        env["PREDICTION_MODEL_URI"] = PREDICTION_MODEL_PATH  # baked into the image
    # The user's labels first: the target's own always win (options.resolve refuses them).
    labels = {k[len("label."):]: v for k, v in d.options.items() if k.startswith("label.")}
    labels.update({DEPLOYMENT_LABEL: d.name, REVISION_LABEL: str(d.revision),
                   f"{LABEL}.model-uri": d.model_uri, f"{LABEL}.image": d.image,
                   f"{LABEL}.mode": d.mode, f"{LABEL}.port": str(rest_port),
                   # Labels are readable by anyone who can list containers: no secret values.
                   f"{LABEL}.config": json.dumps(redacted({k: v for k, v in d.options.items()
                                                           if k not in _NOT_STORED}))})
    return ContainerSpec(
        name=f"{d.name}-{replica}", image=d.image, env=env, labels=labels,
        rest_port=rest_port if d.serving else None,
        metrics_ports=[metrics_port + j for j in range(d.consumers)] if metrics_port else [],
        mounts=mounts(d.options), resources=resources(d.options))


def resources(options: dict[str, str]) -> dict[str, dict[str, str]]:
    """The ``cpu_request``... ``memory_limit`` options as Kubernetes' container resources."""
    found: dict[str, dict[str, str]] = {}
    for kind in ("request", "limit"):
        for what in ("cpu", "memory"):
            if options.get(f"{what}_{kind}"):
                found.setdefault(f"{kind}s", {})[what] = options[f"{what}_{kind}"]
    return found


def check_settings(spec: ContainerSpec) -> settings.Config | None:
    """Read ``spec``'s environment with the settings table, as the container will; raises
    :class:`~mlflow_preproc.config.ConfigError` for a value it would refuse. Returns the
    consumer's resolved settings in a consuming mode."""
    env = spec.env
    settings.load("image", environ=env)
    mode = env["MLFLOW_PREPROC_MODE"]
    if mode not in CONSUMING_MODES:
        return None
    command = "bridge" if mode == "bridge" else "stream"
    cfg = settings.load(command, environ=_readable_config_file(env, spec.mounts))
    cfg.require("INPUT_TOPIC")
    if command == "bridge":
        cfg.require("OUTPUT_TOPIC")
        cfg.require("API_URL")
    elif not cfg["OUTPUT_TOPIC"]:
        cfg.require("OUTPUT_TOPIC")  # a model with no registered name has no default topic
    return cfg


def _readable_config_file(env: dict[str, str], container_mounts: dict[str, str]) -> dict:
    # KAFKA_CONFIG_FILE names a path in the container; read it here through its mount.
    path = env.get("KAFKA_CONFIG_FILE")
    if not path:
        return env
    for target, source in container_mounts.items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            if source.startswith(("secret:", "configmap:")):
                # On Kubernetes the file is in the cluster: checked by the pod, not here.
                return {k: v for k, v in env.items() if k != "KAFKA_CONFIG_FILE"}
            return {**env, "KAFKA_CONFIG_FILE": source + path[len(target):]}
    raise settings.ConfigError(
        f"KAFKA_CONFIG_FILE={path} is not mounted into the container; add "
        f"-C mount.{path}=<the file on this host>")

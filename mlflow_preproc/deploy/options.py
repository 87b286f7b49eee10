"""The ``-C key=value`` options of the ``preproc`` deployment target, and their first check.

Options are the keys below, every setting of the settings table by its lowercase name
(``-C input_topic=fink-alert``), and the prefixes :data:`PREFIXES`: ``env.NAME`` (a container
variable), ``label.NAME``, ``mount.PATH`` (read-only at PATH in the container) and, on
Kubernetes, ``secret_env.NAME``. Each key is applied by the backends its :class:`Option` names and refused
by the others (:func:`backends_of`): none is accepted and ignored. :func:`resolve` refuses
unknown keys, keys of the other backend and malformed values; the settings themselves are
checked by the settings table when the container environment is made
(:mod:`mlflow_preproc.deploy.spec`), before anything is built or stopped.

The options are stored with a deployment (a Docker label, a Kubernetes annotation) and shown
by ``get``; the values of secret ones (:func:`is_secret`) are stored as :data:`REDACTED`, and
an update takes them back from the running container (:func:`restore_secrets`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mlflow_preproc import config as settings
from mlflow_preproc.deploy.image_build import IMAGE_REFERENCE, LABEL, PYTHON_VERSION
from mlflow_preproc.deploy.resources import (
    DOCKER_MIN_MEMORY,
    DOCKER_MIN_NANO_CPUS,
    QuantityError,
    memory_bytes,
    nano_cpus,
    quantity,
)
from mlflow_preproc.secrets import REDACTED, is_secret_name, redact_url

MODES = ("serve", "kafka", "both", "run", "bridge")
CONSUMING_MODES = ("kafka", "both", "bridge")
SERVING_MODES = ("serve", "both")


BACKENDS = ("docker", "kubernetes")
DOCKER, KUBERNETES = ("docker",), ("kubernetes",)


@dataclass(frozen=True)
class Option:
    default: str
    help: str
    example: str
    # The backends that apply the key; the others refuse it (a key quietly ignored is a
    # promise broken), and get shows a deployment its own backend's keys.
    backends: tuple[str, ...] = BACKENDS
    instead: str = ""  # what to use on the other backend, said when it refuses the key


OPTIONS: dict[str, Option] = {
    "mode": Option("serve", "serve, kafka, both, run or bridge (see MLFLOW_PREPROC_MODE)", "both"),
    "port": Option("8080", "scoring server port on the host; replica i listens on port+i", "5001"),
    "replicas": Option("1", "containers; in kafka/both mode they share one consumer group", "2"),
    "consumers": Option("1", "Kafka consumer processes per container", "2"),
    "workers": Option("", "scoring server workers per container (MLflow's default: CPU "
                      "count)", "2"),
    "image": Option("preprocessing-{model_name}-{version}", "image repository name",
                    "fink-prep"),
    "tag": Option("latest", "image tag", "v1"),
    "base_image": Option("python:{python_version}-slim", "base image of the build",
                         "python:3.11-slim"),
    "python_version": Option("the model's", "Python version of the default base image",
                             "3.11.7"),
    # A pod has no network mode, but its image is built on the Docker engine too.
    "network_mode": Option("host", "Docker network mode of the image build (and of the "
                           "containers on Docker)", "host"),
    "docker_host": Option("DOCKER_HOST or the local socket", "Docker engine to use",
                          "unix:///run/docker.sock"),
    "no_cache": Option("false", "build without Docker's layer cache", "true"),
    "health_timeout": Option("120", "seconds to wait for new containers to be healthy (REST "
                             "answers, every consumer joined its group) before a create is "
                             "undone or an update rolled back", "300", DOCKER,
                             "on Kubernetes the pods' probes decide"),
    "remove_image": Option("false", "delete only: also remove the image", "true", DOCKER),
    # Kubernetes (-C backend=kubernetes, or mlflow-preproc manifests)
    "backend": Option("docker", "docker (containers on a Docker engine) or kubernetes "
                      "(manifests applied with your kubeconfig)", "kubernetes"),
    "namespace": Option("default", "Kubernetes namespace", "alerts", KUBERNETES),
    "kube_context": Option("the kubeconfig's current context", "kubeconfig context to use",
                           "prod", KUBERNETES),
    "registry": Option("", "image registry to push to and pull from (Kubernetes)",
                       "registry.example.org/fink"),
    "push": Option("true", "Kubernetes: push the image to the registry after building it",
                   "false", KUBERNETES),
    "autoscaling": Option("true", "kafka/both on Kubernetes: a KEDA ScaledObject scales on the "
                          "consumer group's lag", "false", KUBERNETES),
    "lag_threshold": Option("100", "KEDA: target lag per replica", "500", KUBERNETES),
    "min_replicas": Option("1", "KEDA: fewest replicas", "0", KUBERNETES),
    "max_replicas": Option("the input topic's partitions", "KEDA: most replicas (never more "
                           "than the partitions)", "8", KUBERNETES),
    "partitions": Option("read from the broker", "the input topic's partition count, when the "
                         "broker cannot be reached from here", "12", KUBERNETES),
    "cpu_request": Option("", "Kubernetes resources.requests.cpu", "250m", KUBERNETES,
                          "on Docker, -C cpu_limit caps a container's CPU"),
    "memory_request": Option("", "Kubernetes resources.requests.memory", "512Mi", KUBERNETES,
                             "on Docker, -C memory_limit caps a container's memory"),
    "cpu_limit": Option("", "CPUs a container may use: Kubernetes resources.limits.cpu, "
                        "Docker --cpus (500m or 0.5)", "1"),
    "memory_limit": Option("", "memory a container may use: Kubernetes "
                           "resources.limits.memory, Docker --memory (256Mi, 1Gi)", "1Gi"),
    "service_monitor": Option("false", "Kubernetes: also a Prometheus Operator ServiceMonitor "
                              "on /metrics", "true", KUBERNETES),
    "prometheus_rule": Option("false", "Kubernetes: also a Prometheus Operator PrometheusRule "
                              "with the alerting rules (mlflow-preproc alert-rules) for this "
                              "deployment's job", "true", KUBERNETES),
    "grafana_dashboard": Option("false", "Kubernetes: also a ConfigMap labelled "
                                "grafana_dashboard=1 holding the dashboard (mlflow-preproc "
                                "dashboard; needs the monitoring extra)", "true", KUBERNETES),
}
PREFIXES = {
    "env.": "set a container environment variable; e.g. -C env.LOG_LEVEL=DEBUG",
    "label.": "add a label (Docker, Kubernetes); e.g. -C label.team=alerts",
    "mount.": "mount read-only: Docker, a host file or folder (-C "
              "mount./etc/kafka/client.properties=/home/me/client.properties); Kubernetes, a "
              "Secret or ConfigMap, or one key of it (-C mount./etc/kafka/ca.pem=secret:kafka/ca)",
    "secret_env.": "Kubernetes: a container variable from a Secret's key; e.g. "
                   "-C secret_env.LIBRDKAFKA_SASL_PASSWORD=kafka-user/password",
}
# The backends a prefix's keys apply on, when not both.
_PREFIX_BACKENDS = {"secret_env.": KUBERNETES}
_RESOURCES = ("cpu_request", "memory_request", "cpu_limit", "memory_limit")
# Options with no fixed default: resolved from the model and the engine when absent.
_DERIVED = ("image", "base_image", "python_version", "docker_host", "workers", "kube_context",
            "max_replicas", "partitions")
# Whole numbers of at least 1, checked where the backend takes them (and given, for the
# derived ones).
_NUMBERS = ("port", "replicas", "consumers", "health_timeout", "lag_threshold", "max_replicas",
            "partitions")
# Labels the target sets itself: a user's label.* must not replace them (list, get, update
# and the Kubernetes selector find a deployment's containers by them).
_OWN_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/managed-by")
# Names Docker and Kubernetes accept; refused here, before anything is built (Docker's own
# refusal would come as an APIError after the build, a Kubernetes API server's at apply).
_DOCKER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_KUBERNETES_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_VARIABLE = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")  # Kubernetes' rule for env names


class OptionError(ValueError):
    """An option is unknown or malformed; the message names it and the fix."""


def setting_keys() -> set[str]:
    """Settings of the table a deployment passes on, by their lowercase ``-C`` name."""
    return {s.env.lower() for s in settings.SETTINGS.values() if s.modes != ("image",)}


def check_name(name: str, backend: str) -> None:
    """Raise :class:`OptionError` unless ``name`` can name a deployment on ``backend``: a
    Docker container name, or on Kubernetes an RFC 1123 label. Never rewritten: the name is
    how the user finds the deployment again, so the message gives the name to use."""
    if backend == "kubernetes":
        if not _KUBERNETES_NAME.fullmatch(name):
            fix = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].rstrip("-")
            raise OptionError(f"deployment name {name!r} is not a Kubernetes name (at most 63 "
                              "lowercase letters, digits and '-', starting and ending with a "
                              f"letter or digit); use --name {fix or 'fink'}")
    elif not _DOCKER_NAME.fullmatch(name):
        fix = re.sub(r"[^a-zA-Z0-9_.-]+", "-", name).lstrip("_.-")
        raise OptionError(f"deployment name {name!r} is not a Docker container name (letters, "
                          "digits, '_', '.' and '-', starting with a letter or digit); use "
                          f"--name {fix or 'fink'}")


def resolve(given: dict, name: str | None = None) -> dict[str, str]:
    """``given`` with the defaults of its backend's keys filled in; raises
    :class:`OptionError` for an unknown key, a key the chosen backend would not apply, a
    mode that does not exist, a number or a CPU or memory quantity that is not one, a mount
    of a missing host path, a bad ``tag`` or deployment ``name`` (when given), and
    :class:`~mlflow_preproc.config.ConfigError` for a setting's value the settings table
    refuses. Pure: nothing is contacted, so all of this is known before anything is."""
    given = {str(k): str(v) for k, v in (given or {}).items()}
    known = setting_keys()
    unknown = [k for k in given if k not in OPTIONS and k.lower() not in known
               and not k.startswith(tuple(PREFIXES))]
    if unknown:
        raise OptionError(
            f"unknown config key(s) {', '.join(sorted(unknown))}; valid keys: "
            f"{', '.join(OPTIONS)}, {', '.join(p + 'NAME' for p in PREFIXES)} and the "
            f"streaming settings ({', '.join(sorted(known))}); see mlflow deployments help -t "
            "preproc")
    given = {k.lower() if k.lower() in known else k: v for k, v in given.items()}
    backend = given.get("backend", OPTIONS["backend"].default)
    if backend not in BACKENDS:
        raise OptionError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    _refuse_other_backends(given, backend)
    resolved = {k: o.default for k, o in OPTIONS.items()
                if k not in _DERIVED and backend in o.backends}
    resolved.update(given)
    if resolved["mode"] not in MODES:
        raise OptionError(f"mode={resolved['mode']!r} is not one of {', '.join(MODES)}")
    if name is not None:
        check_name(name, resolved["backend"])
    # Each setting as the container will read it (INPUT_FORMAT=xml...); the whole container
    # environment is checked again with the plan (spec.check_settings).
    for key, value in resolved.items():
        if key in known and value != "":
            settings.parse_value(key.upper(), value)
    for key in (k for k in _NUMBERS if k in resolved):
        if not (resolved[key].isascii() and resolved[key].isdigit()) or int(resolved[key]) < 1:
            raise OptionError(f"{key}={resolved[key]!r} is not a whole number of at least 1; "
                              f"e.g. -C {key}={OPTIONS[key].example}")
    if "min_replicas" in resolved and not (resolved["min_replicas"].isascii()
                                           and resolved["min_replicas"].isdigit()):
        raise OptionError(f"min_replicas={resolved['min_replicas']!r} is not a whole number")
    for key in (k for k in _RESOURCES if resolved.get(k)):
        _check_quantity(key, resolved[key], backend)
    if resolved["tag"] and not _TAG.fullmatch(resolved["tag"]):  # empty: the default
        raise OptionError(f"tag={resolved['tag']!r} is not a Docker tag (at most 128 letters, "
                          "digits, '_', '.' and '-', not starting with '.' or '-'); e.g. "
                          f"-C tag={OPTIONS['tag'].example}")
    # Both are written into the Dockerfile's FROM line: a newline would add build steps.
    if "base_image" in resolved and not IMAGE_REFERENCE.fullmatch(resolved["base_image"]):
        raise OptionError(f"base_image={resolved['base_image']!r} is not a Docker image "
                          f"reference; e.g. -C base_image={OPTIONS['base_image'].example}")
    if "python_version" in resolved and not PYTHON_VERSION.fullmatch(resolved["python_version"]):
        raise OptionError(f"python_version={resolved['python_version']!r} is not a Python "
                          f"version; e.g. -C python_version={OPTIONS['python_version'].example}")
    # Written into the image reference the build is tagged with and the manifests name.
    if resolved.get("registry") and not IMAGE_REFERENCE.fullmatch(
            f"{resolved['registry'].rstrip('/')}/image"):
        raise OptionError(f"registry={resolved['registry']!r} is not a registry host and path; "
                          f"e.g. -C registry={OPTIONS['registry'].example}")
    for key in resolved:
        name = key[len("label."):]
        if key.startswith("label.") and (name.startswith(f"{LABEL}.") or name in _OWN_LABELS):
            raise OptionError(f"label.{name}: {LABEL}.* and {', '.join(_OWN_LABELS)} are the "
                              "target's own labels (they say which deployment and revision a "
                              "container is); choose another name, e.g. -C label.team=alerts")
        variable = key.partition(".")[2]
        if key.startswith(("env.", "secret_env.")) and not _VARIABLE.fullmatch(variable):
            raise OptionError(f"{key}: {variable!r} is not a variable name (letters, digits, "
                              "'_', '.' and '-', not starting with a digit: the names a pod "
                              "allows); e.g. -C env.LOG_LEVEL=DEBUG")
    kubernetes = backend == "kubernetes"
    for target, source in mounts(resolved).items():
        if not os.path.isabs(target):
            raise OptionError(f"mount.{target}: the path in the container must be absolute, "
                              f"e.g. -C mount./etc/kafka/client.properties={source}")
        if kubernetes and not source.startswith(("secret:", "configmap:")):
            raise OptionError(f"mount.{target}={source}: on Kubernetes a mount comes from a "
                              f"Secret or ConfigMap; e.g. -C mount.{target}=secret:NAME or "
                              f"secret:NAME/KEY")
        if not kubernetes and not os.path.exists(source):
            raise OptionError(f"mount.{target}={source}: {source} does not exist on this host")
    for name, ref in secret_env(resolved).items():
        if ref.count("/") != 1 or not all(ref.split("/")):
            raise OptionError(f"secret_env.{name}={ref}: name a Secret and its key, e.g. "
                              f"-C secret_env.{name}=kafka-user/password")
    for key in ("no_cache", "push", "autoscaling", "service_monitor", "prometheus_rule",
                "grafana_dashboard", "remove_image"):
        if key in resolved:
            settings.parse_bool(resolved[key], key)
    return resolved


def backends_of(key: str) -> tuple[str, ...]:
    """The backends that apply option ``key`` (a key of :data:`OPTIONS`, a prefixed key or
    a setting)."""
    if key in OPTIONS:
        return OPTIONS[key].backends
    for prefix, backends in _PREFIX_BACKENDS.items():
        if key.startswith(prefix):
            return backends
    return BACKENDS


def _refuse_other_backends(given: dict[str, str], backend: str) -> None:
    """Raise :class:`OptionError` naming the given keys ``backend`` would not apply, and the
    backend that does."""
    refused = [k for k in given if backend not in backends_of(k)]
    if not refused:
        return
    takes = backends_of(refused[0])
    hints = []
    for key in refused:
        if key.startswith("secret_env."):
            name = key[len("secret_env."):]
            hints.append(f"on {backend.capitalize()} use -C env.{name}=VALUE, or mount a "
                         "file with -C mount.PATH=HOST_FILE")
        elif key in OPTIONS and OPTIONS[key].instead:
            hints.append(OPTIONS[key].instead)
    them = "it" if len(refused) == 1 else "them"
    raise OptionError(
        f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} for "
        f"{' and '.join(b.capitalize() for b in takes)} only: a {backend.capitalize()} "
        f"deployment would ignore {them}; drop {them}, or deploy with -C backend={takes[0]}"
        + "".join(f"; {hint}" for hint in dict.fromkeys(hints)))


def _check_quantity(key: str, value: str, backend: str) -> None:
    """A CPU or memory value both backends read alike, within what Docker allows there."""
    try:
        amount = quantity(value)
    except QuantityError as exc:
        raise OptionError(f"{key}={value!r} {exc}; e.g. -C {key}={OPTIONS[key].example}") \
            from None
    if amount <= 0:
        raise OptionError(f"{key}={value!r} must be above 0; e.g. -C {key}="
                          f"{OPTIONS[key].example}")
    if backend != "docker":
        return
    if key == "memory_limit" and memory_bytes(value) < DOCKER_MIN_MEMORY:
        raise OptionError(f"{key}={value!r} is below 6Mi, the least memory Docker allows a "
                          f"container; e.g. -C {key}={OPTIONS[key].example}")
    if key == "cpu_limit" and nano_cpus(value) < DOCKER_MIN_NANO_CPUS:
        raise OptionError(f"{key}={value!r} must be at least 10m (0.01 CPUs) on Docker; "
                          f"e.g. -C {key}=500m")


def mounts(options: dict[str, str]) -> dict[str, str]:
    """Container path -> source, from the ``mount.`` options: an absolute host path, or
    ``secret:NAME[/KEY]`` / ``configmap:NAME[/KEY]`` on Kubernetes."""
    return {k[len("mount."):]: v if v.startswith(("secret:", "configmap:")) else
            os.path.abspath(v) for k, v in options.items() if k.startswith("mount.")}


def secret_env(options: dict[str, str]) -> dict[str, str]:
    """Variable -> ``secret/key``, from the ``secret_env.`` options."""
    return {k[len("secret_env."):]: v for k, v in options.items()
            if k.startswith("secret_env.")}


def env_name(key: str) -> str | None:
    """The container variable option ``key`` sets: ``env.NAME`` sets NAME, a setting its
    upper-case name; None for any other key."""
    if key.startswith("env."):
        return key[len("env."):]
    return key.upper() if key.upper() in settings.SETTINGS else None


def is_secret(key: str) -> bool:
    """Whether option ``key`` sets a variable whose name says it holds a credential; its
    value is not stored with the deployment. (``secret_env.*`` values are only references
    to a Secret's key, and are stored.)"""
    name = env_name(key)
    return name is not None and is_secret_name(name)


def shown(options: dict[str, str], backend: str) -> dict[str, str]:
    """``options`` as ``get`` shows them for a deployment on ``backend``: without the other
    backend's keys, whose defaults deployments made before the backends refused them
    stored too."""
    return applied_by(options, backend)[0]


def applied_by(options: dict[str, str], backend: str) -> tuple[dict[str, str], list[str]]:
    """Stored ``options`` split into the keys ``backend`` applies and the others that were
    set to something but their default (stored by a version that accepted every key on
    every backend, and ignored them)."""
    kept = {k: v for k, v in options.items() if backend in backends_of(k)}
    ignored = sorted(k for k, v in options.items() if k not in kept
                     and (k not in OPTIONS or v != OPTIONS[k].default))
    return kept, ignored


def redacted(options: dict[str, str]) -> dict[str, str]:
    """``options`` as stored and shown: secret values replaced by :data:`REDACTED`, URL
    credentials in the others too (the one rule of :mod:`mlflow_preproc.secrets`)."""
    return {k: REDACTED if is_secret(k) else redact_url(v) for k, v in options.items()}


def secret_values(options: dict[str, str]) -> list[str]:
    """The values :func:`redacted` hides, to take out of text that may quote them."""
    return [v for k, v in options.items() if is_secret(k) and v and v != REDACTED]


def restore_secrets(stored: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """Stored options with the redacted values taken back from ``env``, the running
    container's environment (which is where they are needed); one that is not there is
    left out, so the update runs without it rather than with the marker."""
    restored = {}
    for key, value in stored.items():
        if value != REDACTED:
            restored[key] = value
        elif env.get(env_name(key) or "") not in (None, REDACTED):
            restored[key] = env[env_name(key)]
    return restored


def options_table_markdown() -> str:
    """The ``-C`` keys table of docs/reference.md (tests/test_config.py keeps it in step)."""
    rows = ["| key | default | backends | meaning | example |", "|---|---|---|---|---|"]
    for key, o in OPTIONS.items():
        rows.append(f"| `{key}` | {o.default} | {', '.join(o.backends)} | {o.help} | "
                    f"`-C {key}={o.example}` |")
    for prefix, meaning in PREFIXES.items():
        rows.append(f"| `{prefix}NAME` | | {', '.join(backends_of(prefix))} | {meaning} | |")
    return "\n".join(rows)


def backend_keys_markdown(backend: str) -> str:
    """What the deployment guides say of the ``-C`` keys ``backend`` takes and refuses
    (tests/test_docs.py keeps the guides in step with this table)."""
    takes = [f"`{k}`" for k, o in OPTIONS.items() if backend in o.backends]
    takes += [f"`{p}NAME`" for p in PREFIXES if backend in backends_of(p)]
    refuses = [f"`{k}`" for k, o in OPTIONS.items() if backend not in o.backends]
    refuses += [f"`{p}NAME`" for p in PREFIXES if backend not in backends_of(p)]
    return (f"**{backend.capitalize()}** applies {', '.join(takes)} and every setting by its "
            f"lowercase name. It refuses {', '.join(refuses)}, naming the backend that takes "
            "them.")


def help_text() -> str:
    """The options part of ``mlflow deployments help -t preproc``."""
    lines = ["Config keys (-C key=value):", ""]
    for key, o in OPTIONS.items():
        only = "" if len(o.backends) > 1 else f" ({o.backends[0].capitalize()} only)"
        lines.append(f"  {key:<16} {o.help}{only}\n  {'':<16} default: {o.default}; e.g. "
                     f"-C {key}={o.example}")
    for prefix, meaning in PREFIXES.items():
        lines.append(f"  {prefix + 'NAME':<16} {meaning}")
    lines += ["", "Streaming settings, by lowercase name (see docs/reference.md, Settings):", ""]
    for s in settings.SETTINGS.values():
        if s.modes != ("image",):
            default = "" if s.default in (None, "") else f" (default {s.default})"
            lines.append(f"  {s.env.lower():<26} {s.help}{default}; e.g. -C "
                         f"{s.env.lower()}={s.example}")
    return "\n".join(lines)

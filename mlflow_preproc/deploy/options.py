"""The ``-C key=value`` options of the ``preproc`` deployment target, and their first check.

Options are the keys below, every setting of the settings table by its lowercase name
(``-C input_topic=fink-alert``), and three prefixes: ``env.NAME`` (a container variable),
``label.NAME`` (a Docker label) and ``mount.PATH`` (a host file or folder, read-only, at PATH
in the container). :func:`resolve` refuses unknown keys and malformed values; the settings
themselves are checked by the settings table when the container environment is made
(:mod:`mlflow_preproc.deploy.spec`), before anything is built or stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mlflow_preproc import config as settings

MODES = ("serve", "kafka", "both", "run", "bridge")
CONSUMING_MODES = ("kafka", "both", "bridge")
SERVING_MODES = ("serve", "both")


@dataclass(frozen=True)
class Option:
    default: str
    help: str
    example: str


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
    "network_mode": Option("host", "Docker network mode of builds and containers", "host"),
    "docker_host": Option("DOCKER_HOST or the local socket", "Docker engine to use",
                          "unix:///run/docker.sock"),
    "no_cache": Option("false", "build without Docker's layer cache", "true"),
    "health_timeout": Option("120", "seconds to wait for new containers to be healthy (REST "
                             "answers, every consumer joined its group) before a create is "
                             "undone or an update rolled back", "300"),
    "remove_image": Option("false", "delete only: also remove the image", "true"),
}
PREFIXES = {
    "env.": "set a container environment variable; e.g. -C env.LOG_LEVEL=DEBUG",
    "label.": "add a Docker label; e.g. -C label.team=alerts",
    "mount.": "mount a host file or folder read-only; e.g. "
              "-C mount./etc/kafka/client.properties=/home/me/client.properties",
}
# Options with no fixed default: resolved from the model and the engine when absent.
_DERIVED = ("image", "base_image", "python_version", "docker_host", "workers")
_WHOLE_NUMBERS = ("port", "replicas", "consumers", "health_timeout")


class OptionError(ValueError):
    """An option is unknown or malformed; the message names it and the fix."""


def setting_keys() -> set[str]:
    """Settings of the table a deployment passes on, by their lowercase ``-C`` name."""
    return {s.env.lower() for s in settings.SETTINGS.values() if s.modes != ("image",)}


def resolve(given: dict) -> dict[str, str]:
    """``given`` with the defaults filled in; raises :class:`OptionError` for an unknown key,
    a mode that does not exist, a number that is not one or a mount of a missing host path."""
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
    resolved = {k: o.default for k, o in OPTIONS.items() if k not in _DERIVED}
    resolved.update({k.lower() if k.lower() in known else k: v for k, v in given.items()})
    if resolved["mode"] not in MODES:
        raise OptionError(f"mode={resolved['mode']!r} is not one of {', '.join(MODES)}")
    for key in _WHOLE_NUMBERS:
        if not (resolved[key].isascii() and resolved[key].isdigit()) or int(resolved[key]) < 1:
            raise OptionError(f"{key}={resolved[key]!r} is not a whole number of at least 1; "
                              f"e.g. -C {key}={OPTIONS[key].example}")
    for target, source in mounts(resolved).items():
        if not os.path.isabs(target):
            raise OptionError(f"mount.{target}: the path in the container must be absolute, "
                              f"e.g. -C mount./etc/kafka/client.properties={source}")
        if not os.path.exists(source):
            raise OptionError(f"mount.{target}={source}: {source} does not exist on this host")
    settings.parse_bool(resolved["no_cache"], "no_cache")
    return resolved


def mounts(options: dict[str, str]) -> dict[str, str]:
    """Container path -> absolute host path, from the ``mount.`` options."""
    return {k[len("mount."):]: os.path.abspath(v) for k, v in options.items()
            if k.startswith("mount.")}


def help_text() -> str:
    """The options part of ``mlflow deployments help -t preproc``."""
    lines = ["Config keys (-C key=value):", ""]
    for key, o in OPTIONS.items():
        lines.append(f"  {key:<16} {o.help}\n  {'':<16} default: {o.default}; e.g. "
                     f"-C {key}={o.example}")
    for prefix, meaning in PREFIXES.items():
        lines.append(f"  {prefix + 'NAME':<16} {meaning}")
    lines += ["", "Streaming settings, by lowercase name (see README.md, Settings):", ""]
    for s in settings.SETTINGS.values():
        if s.modes != ("image",):
            default = "" if s.default in (None, "") else f" (default {s.default})"
            lines.append(f"  {s.env.lower():<26} {s.help}{default}; e.g. -C "
                         f"{s.env.lower()}={s.example}")
    return "\n".join(lines)

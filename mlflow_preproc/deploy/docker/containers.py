"""Deployments as containers on a Docker engine: start, prove healthy, stop, roll back.

Containers are labelled with their deployment and revision (see
:mod:`mlflow_preproc.deploy.spec`); the labels are the only state, so ``list`` and ``get`` can
never drift from what runs. "Healthy" means what the deployment will do: REST answers
``/ping`` when it serves, and every consumer's ``/healthz`` answers 200 with the consumer
joined to its group when it consumes.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from mlflow_preproc.deploy.errors import DeploymentError
from mlflow_preproc.deploy.image_build import LABEL
from mlflow_preproc.deploy.resources import docker_limits
from mlflow_preproc.deploy.spec import DEPLOYMENT_LABEL, REVISION_LABEL, ContainerSpec

# The entrypoint exits when a child dies (a stream without its broker for a minute exits 2).
# Docker restarts it, with its own growing delay, for as long as it takes: a retry limit would
# leave a deployment exited for good after a broker outage of a few minutes. "unless-stopped",
# not "always": a container that `delete` or `update` stopped stays stopped, also when the
# engine restarts. A restart while new containers start still fails them (wait_healthy).
_RESTARTS = {"Name": "unless-stopped"}
_LOG_LINES = 20


class NotHealthy(RuntimeError):
    """A container did not become healthy; the message holds its last log lines."""


class Containers:
    """The containers of deployments on one engine (a ``docker.DockerClient``)."""

    def __init__(self, client):
        self.client = client

    def containers(self, name: str | None = None, revision: int | None = None) -> list:
        """Containers of deployment ``name`` (every deployment by default), by name."""
        wanted = [f"{DEPLOYMENT_LABEL}={name}" if name else DEPLOYMENT_LABEL]
        if revision is not None:
            wanted.append(f"{REVISION_LABEL}={revision}")
        found = self.client.containers.list(all=True, filters={"label": wanted})
        return sorted(found, key=lambda c: c.name)

    def current(self, name: str) -> list:
        """The containers of the newest revision of ``name``."""
        found = self.containers(name)
        if not found:
            return []
        newest = max(revision_of(c) for c in found)
        return [c for c in found if revision_of(c) == newest]

    def run(self, spec: ContainerSpec, network_mode: str):
        """Start ``spec`` (detached); a container that exits is restarted until it is stopped.
        Raises :class:`~mlflow_preproc.deploy.errors.DeploymentError` when its name is taken:
        names are the engine's one atomic claim, so of two rollouts racing for a deployment
        the second to name a container stops there."""
        from docker.errors import APIError
        from docker.types import Mount

        try:
            return self.client.containers.run(
                spec.image, name=spec.name, detach=True, network_mode=network_mode,
                environment=spec.env, labels=spec.labels, restart_policy=_RESTARTS,
                # A list, not the volumes dict: that one is keyed by the host path, so two
                # mounts of one file kept only the last.
                mounts=[Mount(target, source, type="bind", read_only=True)
                        for target, source in spec.mounts.items()],
                **docker_limits(spec.resources.get("limits", {})))
        except APIError as exc:
            if exc.status_code != 409:
                raise
            raise busy(deployment_of(spec.labels), f"container {spec.name} exists (docker "
                       f"rm -f {spec.name} if nothing is under way)") from None

    def wait_healthy(self, pairs: list[tuple[object, ContainerSpec]], timeout: float,
                     on_progress=None) -> None:
        """Wait until every container is healthy; raise :class:`NotHealthy` naming the first
        that exits, restarts or runs out of time, with its last log lines."""
        deadline = time.monotonic() + timeout
        waiting = list(pairs)
        while waiting:
            for container, spec in list(waiting):
                container.reload()
                if container.status in ("exited", "dead") or container.attrs["RestartCount"]:
                    raise NotHealthy(f"container {container.name} exited during start-up "
                                     f"(exit code {container.attrs['State']['ExitCode']}); "
                                     f"its last log lines:\n{tail(container)}")
                try:
                    healthy = container.status == "running" and _is_healthy(spec)
                except NotHealthy as exc:
                    raise NotHealthy(f"container {container.name}: {exc}; its last log "
                                     f"lines:\n{tail(container)}") from None
                if healthy:
                    waiting.remove((container, spec))
                    if on_progress:
                        on_progress(container.name)
            if not waiting:
                return
            if time.monotonic() > deadline:
                container = waiting[0][0]
                raise NotHealthy(f"container {container.name} was not healthy within "
                                 f"{timeout:.0f} s ({_health_summary(waiting[0][1])}); its "
                                 f"last log lines:\n{tail(container)}")
            time.sleep(0.5)

    @staticmethod
    def stop(containers: list, timeout: int) -> None:
        """Stop gracefully: SIGTERM, so consumers commit, then SIGKILL after ``timeout``."""
        for container in containers:
            container.reload()
            if container.status in ("running", "restarting"):
                container.stop(timeout=timeout)

    @staticmethod
    def remove(containers: list) -> None:
        for container in containers:
            container.remove(force=True)


def spec_of(container) -> ContainerSpec:
    """What a running or stopped container was started with, read back from Docker."""
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"] or [])
    mode = container.labels.get(f"{LABEL}.mode", "serve")
    consumers = 1 if mode == "bridge" else int(env.get("KAFKA_CONSUMERS", "1"))
    metrics = int(env.get("METRICS_PORT", "0"))
    return ContainerSpec(
        container.name, container.labels.get(f"{LABEL}.image", ""), env, dict(container.labels),
        int(container.labels[f"{LABEL}.port"]) if mode in ("serve", "both") else None,
        [metrics + j for j in range(consumers)] if metrics and mode != "serve" else [])


def busy(name: str, why: str) -> DeploymentError:
    """The error of a rollout that lost the race for deployment ``name`` to another one."""
    return DeploymentError(f"another create or update of {name} is under way, or was "
                           f"interrupted: {why}; this one stopped before touching what runs. "
                           f"mlflow deployments get -t preproc --name {name} shows it")


def deployment_of(labels: dict[str, str]) -> str:
    """The deployment a container belongs to (a trial container's too)."""
    return labels.get(DEPLOYMENT_LABEL) or labels.get(f"{LABEL}.trial", "?")


def revision_of(container) -> int:
    return int(container.labels.get(REVISION_LABEL, "1"))


def options_of(container) -> dict[str, str]:
    return json.loads(container.labels.get(f"{LABEL}.config", "{}"))


def tail(container, lines: int = _LOG_LINES) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace").rstrip()
    except Exception as exc:  # noqa: BLE001 -- a container removed meanwhile has no logs
        return f"(no logs: {exc})"


def _is_healthy(spec: ContainerSpec) -> bool:
    """REST answers, and every consumer has joined its group and reached a verdict on the
    version (caught up, or handled a dead-letter brake window); a consumer whose brake
    engaged fails the rollout at once."""
    if spec.rest_port is not None and _get(f"http://127.0.0.1:{spec.rest_port}/ping") is None:
        return False
    for port in spec.metrics_ports:
        health = _get(f"http://127.0.0.1:{port}/healthz", accept=(200, 503))
        if health is not None and str(health.get("reason", "")).startswith("dead-letter brake"):
            raise NotHealthy(f"the consumer on :{port} failed: {health['reason']}")
        if health is None or health.get("status") != "ok" or not health.get("joined") \
                or not health.get("settled", True):
            return False
    return True


def _health_summary(spec: ContainerSpec) -> str:
    parts = []
    if spec.rest_port is not None:
        ok = _get(f"http://127.0.0.1:{spec.rest_port}/ping") is not None
        parts.append(f"REST {'answers' if ok else 'does not answer'}")
    for port in spec.metrics_ports:
        health = _get(f"http://127.0.0.1:{port}/healthz", accept=(200, 503))
        if health is None:
            parts.append(f"the consumer on :{port} does not answer /healthz")
        elif health.get("status") != "ok":
            parts.append(f"the consumer on :{port} is not healthy: {health.get('reason')}")
        elif not health.get("joined"):
            parts.append(f"the consumer on :{port} has not joined its group")
        elif not health.get("settled", True):
            parts.append(f"the consumer on :{port} has not caught up")
    return ", ".join(parts) or "not running"


def _get(url: str, accept: tuple[int, ...] = (200,)) -> dict | None:
    """The JSON (or an empty dict) of an answer with a status in ``accept``, else None."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    except (OSError, urllib.error.URLError):
        return None
    if status not in accept:
        return None
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count < 65536 and all(port_free(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0

"""Docker rollouts: start a revision and prove it healthy, swap one for the next, roll back.

Host networking means a new container cannot bind the old one's port while the old one runs,
so an update first proves the new image serves on a spare port (:func:`trial_serve`), then
stops the old revision (its consumers commit), starts the new one and, if it is not healthy,
starts the old one again with its image, settings and consumer group.
"""

from __future__ import annotations

import time
from dataclasses import replace

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import steps
from mlflow_preproc.deploy.docker.containers import (
    Containers,
    NotHealthy,
    busy,
    free_ports,
    options_of,
    revision_of,
    spec_of,
)
from mlflow_preproc.deploy.errors import DeploymentError
from mlflow_preproc.deploy.image_build import LABEL
from mlflow_preproc.deploy.spec import ContainerSpec, Deployment, container_spec


def start(containers: Containers, specs: list[ContainerSpec], d: Deployment) -> None:
    """Start ``specs`` and wait until they are healthy; if they are not (or anything
    interrupts), remove what was started and raise."""
    started = []
    try:
        for spec in specs:
            started.append(containers.run(spec, d.options["network_mode"]))
        waited = time.monotonic()
        what = "REST answers" if d.serving else ""
        if d.consuming:
            what += (" and " if what else "") + \
                f"every consumer joined group {d.options['consumer_group_id']}"
        steps.step(3, f"waiting until healthy ({what or 'running'})")
        containers.wait_healthy(list(zip(started, specs)), float(d.options["health_timeout"]))
    except BaseException:
        containers.remove(started)
        raise
    steps.done(f"{steps.count(len(started), 'container')} healthy", waited)


def swap(containers: Containers, old: list, d: Deployment, specs: list[ContainerSpec]) -> None:
    """Replace the revision ``old`` runs by ``d``'s; roll back if ``d`` is not healthy."""
    previous = revision_of(old[0])
    # Their names, kept: docker-py does not refresh container.name after rename(), and a
    # name cut back at "-r<n>" breaks a deployment whose own name contains it ("rvw-r1").
    names = [c.name for c in old]
    set_aside(old, names, d.name)
    steps.note(f"stopping revision {previous} (its consumers commit first)")
    containers.stop(old, stop_timeout(options_of(old[0])))
    steps.step(2, f"starting revision {d.revision}: {steps.count(d.replicas, 'container')}")
    try:
        start(containers, specs, d)
    except BaseException as exc:
        for container, original in zip(old, names):
            container.rename(original)
            container.start()
        steps.note(f"revision {d.revision} failed; starting revision {previous} again")
        try:
            containers.wait_healthy([(c, spec_of(c)) for c in old],
                                    float(options_of(old[0])["health_timeout"]))
        except NotHealthy as again:
            raise DeploymentError(
                f"update of {d.name} to revision {d.revision} failed ({exc}), and revision "
                f"{previous}, started again, is not healthy either: {again}; mlflow "
                f"deployments get -t preproc --name {d.name} shows its state") from None
        if isinstance(exc, NotHealthy):
            raise DeploymentError(
                f"update of {d.name} to revision {d.revision} failed and was rolled back: "
                f"revision {previous} ({old[0].labels.get(f'{LABEL}.image')}, same settings "
                f"and consumer group) is running again. The new revision: {exc}") from None
        raise
    containers.remove(old)


def set_aside(old: list, names: list[str], deployment: str) -> None:
    """Rename the running revision ``<name>-r<n>``, freeing its names for the next one. The
    first rename is the update's claim on the deployment: of two updates that read the same
    revision, the second finds it renamed (or removed) and stops, having touched nothing."""
    from docker.errors import APIError

    suffix = f"-r{revision_of(old[0])}"
    done = []
    try:
        for container, original in zip(old, names):
            container.rename(original + suffix)
            done.append((container, original))
    except APIError as exc:
        for container, original in done:
            container.rename(original)
        raise busy(deployment, f"revision {revision_of(old[0])} changed while this update "
                   f"was prepared ({exc.explanation or exc})") from None


def trial_serve(containers: Containers, d: Deployment) -> None:
    """Prove ``d``'s image serves, on a spare port, before the running revision is touched."""
    port = free_ports(1)
    trial = Deployment(d.name, d.model_uri, d.identity, d.image,
                       {**d.options, "mode": "serve", "port": str(port)}, d.revision)
    spec = replace(container_spec(trial, 0, port, None), name=f"{d.name}-trial",
                   labels={f"{LABEL}.trial": d.name})
    container = containers.run(spec, d.options["network_mode"])
    try:
        containers.wait_healthy([(container, spec)], float(d.options["health_timeout"]))
    except NotHealthy as exc:
        raise DeploymentError(f"the new revision of {d.name} does not serve, so the "
                              f"running one was left untouched: {exc}") from None
    finally:
        container.remove(force=True)


def stop_timeout(options: dict) -> int:
    """How long ``docker stop`` waits: the consumers' shutdown budget, and a margin."""
    shutdown = options.get("shutdown_timeout_s") or \
        settings.SETTINGS["SHUTDOWN_TIMEOUT_S"].default
    return int(float(shutdown)) + 10

"""The Docker engine the target talks to: both backends build their image on it, the Docker
backend also runs its containers there. Connected on first use, so a plan that fails its
checks never needs one."""

from __future__ import annotations

from mlflow_preproc.deploy.errors import DeploymentError


class Engine:
    """A Docker engine at ``host`` (``None``: ``DOCKER_HOST`` or the default socket)."""

    def __init__(self, host: str | None = None, client=None):
        self.host = host
        self._client = client

    @property
    def client(self):
        """The ``docker.DockerClient``, connected (and pinged) once."""
        if self._client is None:
            import docker

            try:
                client = docker.DockerClient(base_url=self.host) if self.host \
                    else docker.from_env()
                client.ping()
            except Exception as exc:  # docker raises DockerException, requests errors...
                where = self.host or "the default socket (DOCKER_HOST or /var/run/docker.sock)"
                raise DeploymentError(
                    f"cannot reach a Docker engine at {where} ({type(exc).__name__}); start "
                    "one (bash scripts/docker-engine.sh start, or systemctl start docker) or "
                    "point -C docker_host=... at a running engine") from None
            self._client = client
        return self._client

"""The Docker backend of the ``preproc`` target (:class:`DockerDeployments`)."""

from mlflow_preproc.deploy.docker.backend import DockerDeployments

__all__ = ["DockerDeployments"]

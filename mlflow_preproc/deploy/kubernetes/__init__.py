"""The Kubernetes backend of the ``preproc`` target (:class:`KubernetesDeployments`)."""

from mlflow_preproc.deploy.kubernetes.backend import KubernetesDeployments

__all__ = ["KubernetesDeployments"]

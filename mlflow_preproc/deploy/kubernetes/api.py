"""Deployments as Kubernetes objects, applied and read with the official ``kubernetes`` client.

The objects are :func:`~mlflow_preproc.deploy.kubernetes.manifests.render`'s. They are applied with
server-side apply (``PATCH`` with ``application/apply-patch+yaml``, field manager
``mlflow-preproc``), so re-applying is an update and fields other managers own are left alone;
Kubernetes rolls the pods. ``get`` and ``list`` read the Deployments back (ready replicas,
image, the stored configuration); ``delete`` deletes every object of the deployment.
Credentials are the user's kubeconfig (``kube_context`` picks a context), or the pod's own
service account inside a cluster. Needs ``pip install '.[kubernetes]' in the mlflow-preproc clone``.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow_preproc.deploy.options import shown
from mlflow_preproc.deploy.spec import DEPLOYMENT_LABEL

FIELD_MANAGER = "mlflow-preproc"

# kind -> (API group path, plural); core objects live under /api/v1, the rest under /apis.
_PATHS = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "ScaledObject": ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    "ServiceMonitor": ("/apis/monitoring.coreos.com/v1", "servicemonitors"),
    "PrometheusRule": ("/apis/monitoring.coreos.com/v1", "prometheusrules"),
    "ConfigMap": ("/api/v1", "configmaps"),
}


class KubernetesError(RuntimeError):
    """The API server refused a request; the message is its reason."""


def api_client(kube_context: str | None = None):
    """A ``kubernetes.client.ApiClient`` from the kubeconfig, else the in-cluster account."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise KubernetesError("the Kubernetes backend needs the kubernetes client: pip "
                              "install '.[kubernetes]' in the mlflow-preproc clone") from None
    try:
        config.load_kube_config(context=kube_context)
    except Exception as exc:  # noqa: BLE001 -- no kubeconfig: maybe we run in a pod
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise KubernetesError(f"no usable kubeconfig ({exc}) and not inside a cluster; "
                                  "set KUBECONFIG or -C kube_context=...") from None
    return client.ApiClient()


class KubernetesApi:
    """Applies, reads and deletes a deployment's objects in one namespace."""

    def __init__(self, api, namespace: str):
        self.api = api
        self.namespace = namespace

    def apply(self, objects: list[dict]) -> list[dict]:
        """Server-side apply each object; returns what the server stored."""
        # The client serialises only JSON content types itself; JSON is valid YAML.
        return [self._request("PATCH", self._path(o["kind"], o["metadata"]["name"]),
                              json.dumps(o),
                              query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                              content_type="application/apply-patch+yaml")
                for o in objects]

    def delete(self, name: str) -> list[str]:
        """Delete every object of deployment ``name`` that this target made (labelled
        ``app.kubernetes.io/managed-by: mlflow-preproc``); returns their kinds. A same-named
        ConfigMap or rule of someone else's is left as it is."""
        deleted = []
        for kind in _PATHS:
            path = self._path(kind, name)
            try:
                found = self._request("GET", path)
                labels = found.get("metadata", {}).get("labels") or {}
                if labels.get("app.kubernetes.io/managed-by") != FIELD_MANAGER:
                    continue
                self._request("DELETE", path, {"propagationPolicy": "Foreground"})
                deleted.append(kind)
            except KubernetesError as exc:
                if "404" not in str(exc):
                    raise
        return deleted

    def get(self, name: str) -> dict | None:
        """The Deployment object of ``name``, or None."""
        try:
            return self._request("GET", self._path("Deployment", name))
        except KubernetesError as exc:
            if "404" in str(exc):
                return None
            raise

    def list(self) -> list[dict]:
        """The Deployments made by this target in the namespace."""
        group, plural = _PATHS["Deployment"]
        found = self._request("GET", f"{group}/namespaces/{self.namespace}/{plural}",
                              query=[("labelSelector", DEPLOYMENT_LABEL)])
        return found.get("items", [])

    def _path(self, kind: str, name: str) -> str:
        group, plural = _PATHS[kind]
        return f"{group}/namespaces/{self.namespace}/{plural}/{name}"

    def _request(self, method: str, path: str, body: Any = None, query=None,
                 content_type: str = "application/json") -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self.api.param_serialize(method=method, resource_path=path,
                                              query_params=query or [], header_params=headers,
                                              body=body, auth_settings=["BearerToken"])
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api.call_api(*serialized)
            response.read()
        except ApiException as exc:
            raise KubernetesError(f"{method} {path}: {exc.status} {exc.reason}: "
                                  f"{_reason(exc.body)}") from None
        if response.status >= 400:
            raise KubernetesError(f"{method} {path}: {response.status} "
                                  f"{_reason(response.data)}")
        return json.loads(response.data or b"{}")


def _reason(body: Any) -> str:
    try:
        return json.loads(body).get("message", str(body))[:500]
    except (TypeError, ValueError, AttributeError):
        return str(body)[:500]


def summary(obj: dict) -> dict:
    """What ``mlflow deployments get`` shows of a Deployment."""
    status = obj.get("status", {})
    meta = obj.get("metadata", {})
    annotations = meta.get("annotations", {})
    labels = meta.get("labels", {})
    container = obj["spec"]["template"]["spec"]["containers"][0]
    config = json.loads(annotations.get("org.mlflow-preproc.config", "{}"))
    want = obj["spec"].get("replicas", 0)
    ready = status.get("readyReplicas", 0)
    return {
        "name": meta["name"], "flavor": "preprocessing", "backend": "kubernetes",
        "namespace": meta.get("namespace"),
        "status": "running" if want and ready >= want else f"{ready}/{want} ready",
        "mode": labels.get("org.mlflow-preproc.mode"),
        "revision": int(labels.get("org.mlflow-preproc.revision", "1")),
        "model_uri": annotations.get("org.mlflow-preproc.model-uri"),
        "image": container["image"], "replicas": want, "ready_replicas": ready,
        "consumer_group": config.get("consumer_group_id"),
        "output_topic": config.get("output_topic"), "config": shown(config, "kubernetes"),
    }

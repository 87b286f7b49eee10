"""MLflow model-registry webhooks: verify a delivery, read it, decide what to build.

MLflow (3.x tracking server, SQL backend) signs each delivery with HMAC-SHA256 over
``"{X-MLflow-Delivery-Id}.{X-MLflow-Timestamp}.{raw body}"`` and sends
``X-MLflow-Signature: v1,<base64 digest>``. Retries of one delivery repeat its id, timestamp
and signature, so the freshness window must outlast MLflow's retry backoff.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

MAX_AGE_S = 300


class Rejected(Exception):
    """A delivery that must not be acted upon (answered 401); the message says why."""


class Malformed(ValueError):
    """A verified delivery whose body is not an MLflow webhook event (answered 400)."""


@dataclass(frozen=True)
class VersionCreated:
    """A ``model_version.created`` event."""

    name: str
    version: str
    source: str | None
    run_id: str | None


def check_headers(headers: Mapping[str, str], secret: str | None, allow_unsigned: bool = False,
                  now: float | None = None) -> bool:
    """Raise :class:`Rejected` unless the headers may belong to a delivery signed with
    ``secret`` and fresh; returns whether it is signed (False: unsigned, and allowed). Needs
    no body: the service refuses with it before reading one."""
    signature = headers.get("x-mlflow-signature")
    if not signature:
        if allow_unsigned:
            return False
        raise Rejected("unsigned delivery: create the MLflow webhook with a secret, or start "
                       "the service with --allow-unsigned")
    if not secret:
        raise Rejected("signed delivery but no secret configured: set "
                       "MLFLOW_PREPROC_WEBHOOK_SECRET to the webhook's secret")
    delivery_id = headers.get("x-mlflow-delivery-id")
    timestamp = headers.get("x-mlflow-timestamp")
    # isdigit() is true for '²' and other Unicode digits that int() refuses: ASCII only.
    if not delivery_id or not timestamp or not (timestamp.isascii() and timestamp.isdigit()):
        raise Rejected("missing X-MLflow-Delivery-Id, or an X-MLflow-Timestamp that is not "
                       "Unix seconds")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > MAX_AGE_S:
        when = f"{round(age)} s old" if age > 0 else f"{round(-age)} s ahead of this clock"
        raise Rejected(f"timestamp is {when}, outside the {MAX_AGE_S} s window: a replayed "
                       "or delayed delivery, or clocks apart (synchronise them with NTP)")
    return True


def verify(body: bytes, headers: Mapping[str, str], secret: str | None,
           allow_unsigned: bool = False, now: float | None = None) -> None:
    """Raise :class:`Rejected` unless the delivery is signed with ``secret`` and fresh."""
    if not check_headers(headers, secret, allow_unsigned, now):
        return
    delivery_id, timestamp = headers["x-mlflow-delivery-id"], headers["x-mlflow-timestamp"]
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body,
                      hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(digest).decode()
    if not hmac.compare_digest(headers["x-mlflow-signature"].encode(), expected.encode()):
        raise Rejected("signature does not match: forged, or signed with another secret")


def sign(body: bytes, secret: str, delivery_id: str, timestamp: int) -> dict[str, str]:
    """Headers MLflow would send for ``body`` (for tests and for re-sending by hand)."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body,
                      hashlib.sha256).digest()
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": str(timestamp),
            "X-MLflow-Signature": "v1," + base64.b64encode(digest).decode(),
            "Content-Type": "application/json"}


def parse(body: bytes) -> VersionCreated | None:
    """The model version a delivery announces, or ``None`` for any other event.

    Raises :class:`Malformed` for a body that is not a JSON object, or a model version event
    without ``data.name`` and ``data.version``.
    """
    try:
        event = json.loads(body)
    except ValueError:
        raise Malformed("the delivery body is not JSON") from None
    if not isinstance(event, dict):
        raise Malformed(f"the delivery body is a JSON {type(event).__name__}, not an object")
    if (event.get("entity"), event.get("action")) != ("model_version", "created"):
        return None
    data = event.get("data")
    if not isinstance(data, dict) or not data.get("name") or not data.get("version"):
        raise Malformed("a model_version.created event needs data.name and data.version")
    run_id = data.get("run_id")
    return VersionCreated(str(data["name"]), str(data["version"]), data.get("source"),
                          str(run_id) if run_id else None)


class Gone(Exception):
    """The event names a model version or run that no longer exists: a verdict on the event,
    acknowledged (2xx) so that MLflow does not deliver it again."""


def plan_builds(event: VersionCreated) -> list[tuple[str, str, str | None]]:
    """``(kind, model_uri, image)`` to build for a new version.

    A preprocessing model builds its image. Another model builds nothing, unless its run also
    logged a preprocessing model (the legacy pairing by run): then both images are built,
    named after this registered version. Raises :class:`Gone` when the version or its run no
    longer exists; any other error (the tracking server down or failing) propagates.
    """
    from mlflow import MlflowClient

    uri = f"models:/{event.name}/{event.version}"
    with _gone_if_not_found(uri):
        flavors = _flavors(uri)
        if "preprocessing" in flavors:
            return [("preprocessing", uri, None)]
        run_id = event.run_id or MlflowClient().get_model_version(event.name,
                                                                  event.version).run_id
    if not run_id:
        return []
    with _gone_if_not_found(f"run {run_id} of {uri}"):
        partner = _preprocessing_model_of_run(run_id)
    if partner is None:
        return []
    return [("preprocessing", partner, f"preprocessing-{event.name}-{event.version}"),
            ("model", uri, None)]


@contextmanager
def _gone_if_not_found(what: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise Gone(f"{what} not found") from exc
        raise


def _flavors(artifact_uri: str) -> dict:
    """Flavors of the model at ``artifact_uri`` (a registered version or an artifact location)."""
    import tempfile

    import yaml
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        path = download_artifacts(f"{artifact_uri.rstrip('/')}/MLmodel", dst_path=tmp)
        return yaml.safe_load(open(path)).get("flavors", {})


def _preprocessing_model_of_run(run_id: str) -> str | None:
    import mlflow

    experiment = mlflow.get_run(run_id).info.experiment_id
    for logged in mlflow.search_logged_models(experiment_ids=[experiment],
                                              filter_string=f"source_run_id = '{run_id}'",
                                              output_format="list"):
        # models:/m-<id>/MLmodel would be read as a registered model named m-<id>
        if "preprocessing" in _flavors(logged.artifact_location):
            return f"models:/{logged.model_id}"
    return None

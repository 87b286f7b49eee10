"""Build service: MLflow webhooks and a REST API turn model versions into images.

    mlflow-preproc builds serve --port 8765      # its OpenAPI document: /openapi.json

- ``POST /webhooks/mlflow`` receives MLflow model-registry webhook deliveries. Each is
  verified (HMAC signature and timestamp, secret from ``MLFLOW_PREPROC_WEBHOOK_SECRET``);
  a new version of a preprocessing model queues its image build, and a new version of another
  model whose run also logged a preprocessing model (the legacy pairing by ``run_id``) queues
  both images: ``preprocessing-{name}-{version}`` and ``model-{name}-{version}``. An event
  for a version or run that no longer exists is acknowledged and ignored; a tracking server
  that does not answer is a 503, so that MLflow delivers the event again.
- ``POST /build`` (queued, returns an id), ``POST /build/sync``, ``GET /builds``,
  ``GET /builds/{id}``, ``DELETE /builds/{id}`` (these need the token, see
  :mod:`mlflow_preproc.builds.auth`), ``GET /health`` (liveness, open).

Builds live in SQLite (:mod:`mlflow_preproc.builds.store`) and run ``--max-builds`` at a time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mlflow_preproc.builds import webhooks
from mlflow_preproc.builds.auth import (SECRET_ENV, TOKEN_ENV, TOKEN_REFUSED, api_token,
                                        check_unsigned_webhooks, require_token, token_matches)
from mlflow_preproc.builds.bodies import GuardedBodies, Refusal
from mlflow_preproc.builds.store import STATUSES, Build, BuildStore
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.image_build import docker_reference

logger = logging.getLogger("mlflow_preproc")
WEBHOOK_PATH = "/webhooks/mlflow"


class BuildRequest(BaseModel):
    """A build asked for over the API."""

    model_uri: str = Field(min_length=1, description="models:/name/version, runs:/..., ...")
    kind: Literal["preprocessing", "model"] = Field(
        "preprocessing", description="preprocessing: the preproc image; model: build-docker")
    image: str | None = Field(None, description="image name (default from registry metadata)")
    deploy: dict[str, str] | None = Field(
        None, description="after a successful preprocessing build, create or update the "
        "deployment with these -C style keys (plus 'name')")


class Builder:
    """Runs queued builds in a bounded thread pool."""

    def __init__(self, store: BuildStore, max_builds: int = 1,
                 deploy: dict[str, str] | None = None):
        self.store = store
        self.deploy = deploy
        self._pool = ThreadPoolExecutor(max_builds, thread_name_prefix="build")
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()

    def submit(self, build: Build, deploy: dict[str, str] | None = None) -> Future:
        """Queue ``build``; ``deploy``: its deployment keys with their secret values, which
        the history holds redacted."""
        future = self._pool.submit(self._run, build, deploy)
        with self._lock:
            self._futures[build.id] = future
        return future

    def _run(self, build: Build, deploy: dict[str, str] | None = None) -> None:
        import time

        tail: deque[str] = deque(maxlen=40)
        deploy = deploy or build.config.get("deploy") or (
            self.deploy if build.kind == "preprocessing" else None)
        secrets = opts.secret_values(deploy or {})
        self.store.update(build.id, status="running", started_at=time.time())
        logger.info("build started", extra={"event": "build_started", "build": build.id,
                                            "kind": build.kind, "model_uri": build.model_uri})
        try:
            lost = sorted(k for k, v in (deploy or {}).items() if v == opts.REDACTED)
            if lost:  # queued before a restart: the values were in that process only
                raise RuntimeError(
                    f"the values of {', '.join(lost)} were kept in memory only (the history "
                    "never holds a secret) and the service restarted before this build "
                    "ran; submit it again")
            if build.kind == "preprocessing":
                image = self._build_preprocessing(build, tail)
            else:
                image = self._build_model(build, tail)
            self.store.update(build.id, status="succeeded", image=image,
                              finished_at=time.time(), log_tail="".join(tail))
            logger.info("build succeeded", extra={"event": "build_succeeded",
                                                  "build": build.id, "image": image})
            if deploy:
                self.store.update(build.id, deployment=self._deploy(build, deploy))
        except Exception as exc:  # a failed build is a record, not a crash of the service
            # A deployment's error may quote what a container printed: no secret in it.
            reason = _scrubbed(failure_reason(exc), secrets)
            logger.warning("build failed", extra={"event": "build_failed", "build": build.id,
                                                  "error": reason})
            self.store.update(build.id, status="failed", finished_at=time.time(),
                              error=reason, log_tail=_scrubbed("".join(tail), secrets))

    def _build_preprocessing(self, build: Build, tail: deque) -> str:
        from mlflow_preproc.deploy.target import PreprocDeploymentClient

        config = {"image": build.config["image"]} if build.config.get("image") else {}
        reference, _ = PreprocDeploymentClient("preproc").build_image(
            build.model_uri, config, echo=tail.append)
        return reference

    def _build_model(self, build: Build, tail: deque) -> str:
        """The model's image as `mlflow models build-docker` makes it (network: host)."""
        import tempfile

        from mlflow.models.docker_utils import build_image_from_context
        from mlflow.pyfunc.backend import PyFuncBackend
        from mlflow.tracking.artifact_utils import _download_artifact_from_uri

        from mlflow_preproc.runtime.model_identity import resolve_model

        identity = resolve_model(build.model_uri)
        image = build.config.get("image") or docker_reference(
            f"model-{identity.name}-{identity.version}" if identity.name else "model")
        with tempfile.TemporaryDirectory() as context:
            model_dir = _download_artifact_from_uri(identity.download_uri)
            PyFuncBackend(config={}, env_manager="local").generate_dockerfile(
                model_uri=model_dir, output_dir=context)
            tail.append(f"building {image} from {build.model_uri}\n")
            build_image_from_context(context, image, network="host")
        return image

    def _deploy(self, build: Build, deploy: dict[str, str]) -> str:
        from mlflow_preproc.deploy.target import PreprocDeploymentClient
        from mlflow_preproc.runtime.model_identity import resolve_model

        identity = resolve_model(build.model_uri)
        config = dict(deploy)
        name = config.pop("name", None) or docker_reference(identity.name or build.id)
        client = PreprocDeploymentClient("preproc")
        existing = {d["name"] for d in client.list_deployments()}
        if name in existing:
            client.update_deployment(name, build.model_uri, config=config)
        else:
            client.create_deployment(name, build.model_uri, config=config)
        return name

    def wait(self, build_id: str) -> None:
        with self._lock:
            future = self._futures.get(build_id)
        if future is not None:
            future.result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _scrubbed(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, opts.REDACTED)
    return text


def failure_reason(exc: BaseException) -> str:
    """A failed build's reason: the error's first line, or its type when it has no message."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0][:2000] if lines else type(exc).__name__


def create_app(db_path: str, secret: str | None, token: str, allow_unsigned: bool = False,
               max_builds: int = 1, deploy: dict[str, str] | None = None) -> FastAPI:
    """The build service as an ASGI app (``uvicorn`` runs it); ``token`` guards the API."""
    store = BuildStore(db_path)
    for lost in store.recover():
        logger.warning("marked a build interrupted by a restart as failed",
                       extra={"event": "build_recovered", "build": lost})
    builder = Builder(store, max_builds, deploy)
    # Builds queued before a restart never started: queue them again.
    for queued in store.list(status="queued"):
        builder.submit(queued)
    # The API's description is the token's too: no /docs or /redoc pages (a browser could
    # not send the token), /openapi.json with the token.
    app = FastAPI(title="mlflow-preproc build service",
                  description=__doc__.split("\n\n")[0], version="1", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.store, app.state.builder = store, builder
    authorized = [Depends(require_token(token))]

    def authenticate(request: Request) -> None:
        """Before a body is read: a webhook delivery's signature headers, else the token."""
        if request.url.path != WEBHOOK_PATH:
            if not token_matches(request.headers.get("authorization"), token):
                raise Refusal(401, TOKEN_REFUSED, {"WWW-Authenticate": "Bearer"})
            return
        try:
            webhooks.check_headers(request.headers, secret, allow_unsigned)
        except webhooks.Rejected as exc:
            refused(request, exc)
            raise Refusal(401, str(exc)) from None

    def refused(request: Request, exc: Exception) -> None:
        logger.warning("webhook delivery refused", extra={
            "event": "webhook_refused", "reason": str(exc),
            "client": request.client.host if request.client else None})

    app.add_middleware(GuardedBodies, authenticate=authenticate)

    def queue(kind: str, model_uri: str, config: dict[str, Any], event_key: str | None = None,
              deploy: dict[str, str] | None = None) -> tuple[Build, bool]:
        # Stored as the deployment target stores its options: secret values redacted, by
        # the same rule (options.redacted); the builder gets them from memory.
        stored = {**config, **({"deploy": opts.redacted(deploy)} if deploy else {})}
        build, created = store.add(kind, model_uri, stored, event_key)
        if created:
            builder.submit(build, deploy)
        return build, created

    @app.post("/build", status_code=202, summary="Queue an image build",
             dependencies=authorized)
    def post_build(request: BuildRequest) -> dict:
        build, _ = queue(request.kind, request.model_uri, {"image": request.image},
                         deploy=request.deploy)
        return {"id": build.id, "status": build.status}

    @app.post("/build/sync", summary="Build and wait for the result",
             dependencies=authorized)
    def post_build_sync(request: BuildRequest) -> dict:
        build, _ = queue(request.kind, request.model_uri, {"image": request.image},
                         deploy=request.deploy)
        builder.wait(build.id)
        return store.get(build.id).to_json()

    @app.get("/builds", summary="List builds, newest first",
             dependencies=authorized)
    def list_builds(status: Literal[STATUSES] | None = Query(None)) -> list[dict]:  # type: ignore[valid-type]
        return [b.to_json() for b in store.list(status)]

    @app.get("/builds/{build_id}", summary="One build: status, timings, image, log tail",
             dependencies=authorized)
    def get_build(build_id: str) -> dict:
        build = store.get(build_id)
        if build is None:
            raise HTTPException(404, f"no build {build_id}; GET /builds lists them")
        return build.to_json()

    @app.delete("/builds/{build_id}", status_code=204, summary="Forget a finished build",
             dependencies=authorized)
    def delete_build(build_id: str) -> Response:
        build = store.get(build_id)
        if build is None:
            raise HTTPException(404, f"no build {build_id}; GET /builds lists them")
        if build.status in ("queued", "running"):
            raise HTTPException(409, f"build {build_id} is {build.status}; delete it once it "
                                "has finished")
        store.delete(build_id)
        return Response(status_code=204)

    @app.get("/openapi.json", include_in_schema=False, dependencies=authorized)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/health", summary="Liveness (no token: for probes)")
    def health() -> dict:
        return {"status": "ok"}

    def accept(event: webhooks.VersionCreated) -> dict:
        """Plan and queue the builds of a verified event (asks the tracking server)."""
        try:
            plan = webhooks.plan_builds(event)
        except webhooks.Gone as exc:
            logger.info("webhook delivery ignored", extra={
                "event": "webhook_ignored", "model": f"{event.name}/{event.version}",
                "reason": str(exc)})
            return {"queued": [], "detail": f"ignored: {exc}"}
        except Exception as exc:  # noqa: BLE001 -- the environment failed, not the event
            logger.warning("webhook delivery failed", extra={
                "event": "webhook_failed", "model": f"{event.name}/{event.version}",
                "error": failure_reason(exc)})
            # 503: MLflow delivers the event again, once the tracking server answers
            raise HTTPException(503, "could not ask the tracking server about "
                                f"models:/{event.name}/{event.version}: "
                                f"{failure_reason(exc)}") from None
        logger.info("webhook delivery accepted", extra={
            "event": "webhook_accepted", "model": f"{event.name}/{event.version}",
            "builds": [kind for kind, _, _ in plan]})
        queued = []
        for kind, model_uri, image in plan:
            build, created = queue(kind, model_uri, {"image": image},
                                   f"{event.name}/{event.version}/{kind}")
            queued.append({"id": build.id, "kind": kind, "duplicate": not created})
        detail = "" if plan else "this version has no preprocessing model; nothing to build"
        return {"queued": queued, "detail": detail}

    @app.post(WEBHOOK_PATH, status_code=202, summary="MLflow model-registry webhook")
    async def mlflow_webhook(request: Request) -> dict:
        body = await request.body()  # its headers were checked and its size capped already
        try:
            webhooks.verify(body, request.headers, secret, allow_unsigned)
        except webhooks.Rejected as exc:
            refused(request, exc)
            raise HTTPException(401, str(exc)) from None
        try:
            event = webhooks.parse(body)
        except webhooks.Malformed as exc:
            logger.warning("webhook delivery refused", extra={"event": "webhook_malformed",
                                                               "reason": str(exc)})
            raise HTTPException(400, str(exc)) from None
        if event is None:
            return {"queued": [], "detail": "not a model version creation; nothing to build"}
        # The MLflow client is synchronous: on the event loop, a slow tracking server would
        # stall every request (/health too) until it answered.
        return await run_in_threadpool(accept, event)

    @app.on_event("shutdown")
    def close() -> None:
        builder.shutdown()

    return app


def serve(host: str, port: int, db_path: str, allow_unsigned: bool, max_builds: int,
          deploy: dict[str, str] | None) -> None:
    """Run the build service until interrupted."""
    import uvicorn

    secret = os.environ.get(SECRET_ENV) or None
    if allow_unsigned:
        check_unsigned_webhooks(host, secret, deploy)
    elif not secret:
        logger.warning(f"{SECRET_ENV} is not set: every webhook delivery will be refused")
    token, generated = api_token(os.environ)
    app = create_app(db_path, secret, token, allow_unsigned, max_builds, deploy)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    sock = config.bind_socket()  # bound first, so that the line below tells the truth
    where = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    # The one place a generated token is shown, like Jupyter's: whoever reads this log may
    # call the API.
    how = (f"API token {token} (generated at start; set {TOKEN_ENV} to choose one)"
           if generated else f"API token from {TOKEN_ENV}")
    logger.info(f"build service listening on {where}, {how}",
                extra={"event": "build_service_started", "url": where})
    uvicorn.Server(config).run(sockets=[sock])

"""Request bodies: a request is authenticated from its headers before its body is read, and
the body is capped.

Starlette reads a whole body when an endpoint asks for it, and FastAPI does so before any
dependency (the token check) runs: one unsigned 400 MB POST to ``/webhooks/mlflow`` took the
service from 202 MB to 1 GB before it was answered 401. :class:`GuardedBodies` sits in front
of every endpoint: a request that carries a body is refused (401) unless its headers pass
``authenticate``, refused (413) when it declares more than ``limit`` bytes, and otherwise
read here, at most ``limit`` bytes, before the endpoint sees it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from starlette.datastructures import Headers
from starlette.requests import Request

# MLflow's webhook deliveries are one model version's fields and a build request a few keys:
# a few kB each. A megabyte is generous for both.
MAX_BODY_BYTES = 2**20
logger = logging.getLogger("mlflow_preproc")


class Refusal(Exception):
    """A request refused from its headers: ``status``, the reason, extra headers."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, dict(headers or {})


class GuardedBodies:
    """ASGI middleware: ``authenticate(request)`` (its headers, path and client; not its
    body) raises :class:`Refusal` for a request with a body that must not be read; bodies
    above ``limit`` bytes are refused with 413."""

    def __init__(self, app, authenticate: Callable[[Request], None],
                 limit: int = MAX_BODY_BYTES):
        self.app, self.authenticate, self.limit = app, authenticate, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not chunked and length in (None, "0"):
            return await self.app(scope, receive, send)  # no body to guard
        try:
            self.authenticate(Request(scope))
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                raise self._too_large(f"{length} bytes")
            body = await self._read(receive)
        except Refusal as refusal:
            if refusal.status == 413:
                logger.warning("request refused", extra={
                    "event": "body_too_large", "path": scope["path"], "reason": refusal.detail,
                    "client": (scope.get("client") or (None,))[0]})
            return await _answer(send, refusal)
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes:
        """The body, read until its end or past ``limit`` (then :class:`Refusal`)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refusal(400, "the client went away before its body ended")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise self._too_large(f"more than {self.limit} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _too_large(self, size: str) -> Refusal:
        return Refusal(413, f"the request body is {size}; this service takes at most "
                            f"{self.limit} bytes (an MLflow webhook delivery or a build "
                            "request is a few kB)")


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A ``receive`` that gives the body read already, then what the client sends next (a
    disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _answer(send, refusal: Refusal) -> None:
    """Answer as FastAPI's HTTPException does, ``{"detail": ...}``; the connection is closed
    after it, as the body it announced is not read."""
    payload = json.dumps({"detail": refusal.detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode()), (b"connection", b"close"),
               *((k.lower().encode(), v.encode()) for k, v in refusal.headers.items())]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})

"""Who may use the build API: whoever holds the token, or nobody but this machine.

The service drives a Docker engine, which is root on its host, and deploys with any ``-C``
settings: an open API on a reachable port hands the host over. So the API endpoints take
``Authorization: Bearer <MLFLOW_PREPROC_API_TOKEN>``, and without a token the service listens
on loopback only. Webhook deliveries are authenticated by their HMAC signature instead.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Header, HTTPException

from mlflow_preproc.config import ConfigError

TOKEN_ENV = "MLFLOW_PREPROC_API_TOKEN"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_listen_address(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token."""
    if token or host in _LOOPBACK or host.startswith("127."):
        return
    raise ConfigError(f"refusing to listen on {host} without {TOKEN_ENV}: anyone who reaches "
                      "the port could build and deploy images with this host's Docker engine; "
                      f"set {TOKEN_ENV} to a secret (clients send it as 'Authorization: "
                      "Bearer <token>'), or listen on 127.0.0.1")


def require_token(token: str | None) -> Callable[..., None]:
    """A FastAPI dependency: the request carries the token (no check when there is none, on
    a service that only listens on loopback)."""

    def check(authorization: str | None = Header(None, description="Bearer <token>")) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the token matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise HTTPException(401, f"this endpoint needs 'Authorization: Bearer <token>' "
                                f"with the service's {TOKEN_ENV}",
                                headers={"WWW-Authenticate": "Bearer"})

    return check

"""Who may use the build service: whoever holds the token, or a signed webhook.

The service drives a Docker engine, which is root on its host, and deploys with any ``-C``
settings, so every endpoint but ``/health`` takes ``Authorization: Bearer <token>``. Loopback
is no trust boundary: deployed containers and image builds run with ``network_mode=host``, so
a model's code reaches 127.0.0.1 too. Without ``MLFLOW_PREPROC_API_TOKEN`` the service makes
a random token at start and logs it once (as Jupyter does). Webhook deliveries are
authenticated by their HMAC signature instead; unsigned ones only where they cannot do harm
(:func:`check_unsigned_webhooks`).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Mapping

from fastapi import Header, HTTPException

from mlflow_preproc.config import ConfigError

TOKEN_ENV = "MLFLOW_PREPROC_API_TOKEN"
SECRET_ENV = "MLFLOW_PREPROC_WEBHOOK_SECRET"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def api_token(environ: Mapping[str, str]) -> tuple[str, bool]:
    """``(token, generated)``: the configured token, or a new random one."""
    token = environ.get(TOKEN_ENV)
    if token:
        return token, False
    return secrets.token_urlsafe(32), True


def check_unsigned_webhooks(host: str, secret: str | None,
                            deploy: Mapping[str, str] | None) -> None:
    """Refuse ``--allow-unsigned`` wherever an unsigned delivery could be forged to harm.

    An unsigned delivery carries no credential: whoever reaches the port can send one. That
    is tolerable only for builds of registered versions on this machine, so not beyond
    loopback, not with ``-C`` (the delivery would deploy with those settings), and not next to
    a webhook secret (unsigned deliveries would walk around it).
    """
    fix = (f"create the MLflow webhook with a secret and set {SECRET_ENV} to it instead of "
           "--allow-unsigned")
    if host not in _LOOPBACK and not host.startswith("127."):
        raise ConfigError(f"refusing --allow-unsigned on {host}: anyone who reaches the port "
                          f"could queue builds without a credential; {fix}")
    if deploy:
        raise ConfigError("refusing --allow-unsigned with -C: any process on this machine (a "
                          "network_mode=host container too) could deploy with these settings "
                          f"by posting an unsigned delivery; {fix}")
    if secret:
        raise ConfigError(f"refusing --allow-unsigned with {SECRET_ENV} set: unsigned "
                          "deliveries would bypass the secret; drop --allow-unsigned")


TOKEN_REFUSED = (f"this endpoint needs 'Authorization: Bearer <token>' with the service's "
                 f"{TOKEN_ENV} (or the token it logged at start)")


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>``."""
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: the time taken says nothing about how much of the token matched
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


def require_token(token: str) -> Callable[..., None]:
    """A FastAPI dependency: the request carries ``Authorization: Bearer <token>``."""

    def check(authorization: str | None = Header(None, description="Bearer <token>")) -> None:
        if not token_matches(authorization, token):
            raise HTTPException(401, TOKEN_REFUSED, headers={"WWW-Authenticate": "Bearer"})

    return check

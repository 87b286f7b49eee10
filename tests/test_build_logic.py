"""The build service's pure logic, without a server: which start-up combinations are
refused."""

from __future__ import annotations

import pytest

from mlflow_preproc.builds.auth import check_unsigned_webhooks
from mlflow_preproc.config import ConfigError


@pytest.mark.parametrize("host, secret, deploy, refused", [
    ("0.0.0.0", None, None, "refusing --allow-unsigned on 0.0.0.0"),
    ("127.0.0.1", None, {"mode": "serve"}, "refusing --allow-unsigned with -C"),
    ("127.0.0.1", "s3cret", None, "refusing --allow-unsigned with MLFLOW_PREPROC_WEBHOOK_SECRET"),
    ("127.0.0.1", None, None, None),  # builds only, for this machine: local development
])
def test_unsigned_webhooks_are_refused_where_anyone_could_drive_the_service(
        host, secret, deploy, refused):
    if refused is None:
        check_unsigned_webhooks(host, secret, deploy)
        return
    with pytest.raises(ConfigError, match=refused):
        check_unsigned_webhooks(host, secret, deploy)

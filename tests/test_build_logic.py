"""The build service's pure logic, without a server: how a failed build is recorded, which
start-up combinations are refused."""

from __future__ import annotations

import pytest

from mlflow_preproc.builds.auth import check_unsigned_webhooks
from mlflow_preproc.builds.service import Builder
from mlflow_preproc.builds.store import BuildStore
from mlflow_preproc.config import ConfigError


class FakeFailingBuilder(Builder):
    """A builder whose image build raises an exception without a message (as a socket
    timeout inside the Docker SDK does); a real build cannot be made to do that on demand."""

    def _build_preprocessing(self, build, tail):
        tail.append("Step 1/3\n")
        raise TimeoutError()


def test_a_build_failing_with_an_empty_message_ends_failed_naming_the_exception(tmp_path):
    store = BuildStore(str(tmp_path / "builds.db"))
    builder = FakeFailingBuilder(store)
    build, _ = store.add("preprocessing", "models:/m/1")
    try:
        builder.submit(build).result(timeout=30)
    finally:
        builder.shutdown()
    done = store.get(build.id)
    assert (done.status, done.error, done.log_tail) == ("failed", "TimeoutError", "Step 1/3\n")
    assert done.finished_at is not None


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


def test_a_build_queued_with_secrets_before_a_restart_fails_asking_to_submit_it_again(tmp_path):
    # The history holds deploy secrets redacted (#33, finding 3); their values lived in the
    # process that queued the build. Deploying with "<redacted>" as a password would be worse.
    store = BuildStore(str(tmp_path / "builds.db"))
    build, _ = store.add("preprocessing", "models:/m/1", {"deploy": {
        "name": "m", "env.LIBRDKAFKA_SASL_PASSWORD": "<redacted>"}})
    builder = Builder(store)  # as a restarted service re-queues it: from the history alone
    try:
        builder.submit(build).result(timeout=30)
    finally:
        builder.shutdown()
    done = store.get(build.id)
    assert done.status == "failed" and done.error.startswith(
        "the values of env.LIBRDKAFKA_SASL_PASSWORD were kept in memory only")
    assert done.error.endswith("submit it again")

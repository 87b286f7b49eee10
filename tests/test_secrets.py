"""Credentials in URLs are shown redacted wherever the package writes them (#32 finding 11)."""

from __future__ import annotations

import pytest

from mlflow_preproc.secrets import REDACTED, redact_url


@pytest.mark.parametrize("text, shown", [
    ("http://user:S3cret@svc:8080/invocations", f"http://user:{REDACTED}@svc:8080/invocations"),
    ("the model server at https://tok3nvalue@svc/ answered", f"https://{REDACTED}@svc/"),
    ("https://host/p?X-Amz-Signature=abcd1234&x=1", f"?X-Amz-Signature={REDACTED}&x=1"),
    ("http://h/?api_key=abcdef&token=zzzz", f"?api_key={REDACTED}&token={REDACTED}"),
    ("http://127.0.0.1:8080/invocations", "http://127.0.0.1:8080/invocations"),
    ("plain text, no URL", "plain text, no URL"),
])
def test_url_credentials_are_redacted_and_nothing_else(text, shown):
    assert shown in redact_url(text)
    assert "S3cret" not in redact_url(text) and "abcd1234" not in redact_url(text)


def test_a_secret_quoted_apart_from_its_url_is_redacted_too():
    url = "http://svc-user:S3cretPassw0rd@svc:8080"
    message = "ConnectionError: auth S3cretPassw0rd refused by svc:8080"
    assert "S3cretPassw0rd" not in redact_url(message, secrets_of=url)

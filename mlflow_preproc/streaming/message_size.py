"""How large a message the producer may send, and the truncation of a dead letter that is
larger: a record too large for the output is still dead-lettered, cut to fit, with its size
and digest so that the original can be found (``x-preproc-source`` names where it is)."""

from __future__ import annotations

import hashlib

from mlflow_preproc.streaming.headers import ORIGINAL_SHA256, ORIGINAL_SIZE, Headers

# librdkafka's default message.max.bytes; room is kept for the headers and record framing.
_DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
_FRAMING_BYTES = 512


class MessageSize:
    """The producer's ``message.max.bytes`` (from the client settings ``kafka``) and what
    fits under it."""

    def __init__(self, kafka: dict):
        self.max_bytes = int(kafka.get("message.max.bytes", _DEFAULT_MAX_MESSAGE_BYTES))

    def too_large(self, value: bytes, key: bytes | None, headers: Headers) -> bool:
        """Whether ``value`` with its key and headers is over the producer's limit."""
        return len(value) + overhead(key, headers) > self.max_bytes

    def truncated(self, value: bytes, key: bytes | None, headers: Headers
                  ) -> tuple[bytes, Headers]:
        """``value`` cut to fit, and ``headers`` with its original size and digest."""
        # Keep a prefix for whoever reads the dead letter, and enough to find the original:
        # its size and digest (x-preproc-source names its topic, partition and offset).
        headers = [*headers,
                   (ORIGINAL_SIZE, str(len(value)).encode()),
                   (ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode())]
        room = max(0, self.max_bytes - overhead(key, headers))
        return value[:room], headers


def overhead(key: bytes | None, headers: Headers) -> int:
    """The bytes a message takes beside its value: key, headers and framing."""
    return len(key or b"") + sum(len(k) + len(v) for k, v in headers) + _FRAMING_BYTES

"""What stops a loop, or the batch in flight: the exceptions of
:class:`~mlflow_preproc.streaming.loop.KafkaLoop` that are the loop's, never a record's."""

from __future__ import annotations


class FatalError(RuntimeError):
    """The loop cannot go on; the message says why and what to change."""


class Abandon(Exception):
    """Raised by a handler to give up the batch in flight (shutting down while a dependency
    is down): nothing of that batch is committed, so the group processes it again."""


class Rewound(Exception):
    """Exactly once: the transaction was aborted while a batch was handled; the batch is
    given up, and its input read again from the last commit with everything since."""

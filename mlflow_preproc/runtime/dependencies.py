"""Failures of what processing a record depends on (a schema registry, a model server).

They are the environment's, never a verdict on the record: the stream and the bridge wait
for a dependency that is :class:`Unavailable` (input paused, nothing committed) and stop on
one that is :class:`Misconfigured` (exit 2, nothing committed). Only errors about the
record itself (:class:`~mlflow_preproc.runtime.formats.DecodeError`, a model's 400/422...)
become dead letters. The table of which is which is in docs/guides/kafka.md ("What becomes a dead
letter").
"""

from __future__ import annotations


class Unavailable(Exception):
    """A dependency does not answer now (down, overloaded, timing out): retry later.

    ``retry_after`` is the wait the dependency asked for, in seconds (0: our own backoff).
    """

    def __init__(self, dependency: str, problem: str, retry_after: float = 0.0):
        super().__init__(f"{dependency} unavailable: {problem}")
        self.dependency = dependency
        self.problem = problem
        self.retry_after = retry_after


class Misconfigured(Exception):
    """A dependency refuses this client (wrong URL, path or credentials); the message names
    the setting to fix. Retrying cannot help and dead-lettering would drain the topic."""

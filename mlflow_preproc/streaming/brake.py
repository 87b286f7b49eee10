"""The dead-letter brake: a version that fails every record must not move a topic to the DLQ.

Dead letters are meant for the odd poison record. When most records of a sliding window go to
the dead-letter topic, the fault is almost surely the model's or its configuration's (a field
renamed upstream, a bad release), not the records': the loop then stops committing, pauses its
input and turns ``/healthz`` unhealthy with the reason, so a rollout rolls back and an
orchestrator restarts it; once fixed, the uncommitted records are processed again.
"""

from __future__ import annotations

from collections import deque


class DeadLetterBrake:
    """Engages when more than ``ratio`` of the last ``window`` records (or a few more: whole
    batches are counted) were dead-lettered. ``ratio`` 1 never engages."""

    def __init__(self, ratio: float, window: int):
        self.ratio = ratio
        self.window = window
        self._batches: deque[tuple[int, int]] = deque()  # (records, dead letters) per batch
        self._records = 0
        self._failed = 0

    def observe(self, records: int, failed: int) -> str | None:
        """Count one handled batch; the reason to stop, when the brake engages."""
        self._batches.append((records, failed))
        self._records += records
        self._failed += failed
        while self._batches and self._records - self._batches[0][0] >= self.window:
            old_records, old_failed = self._batches.popleft()
            self._records -= old_records
            self._failed -= old_failed
        if self._records < self.window or self._failed <= self.ratio * self._records:
            return None
        return (f"{self._failed} of the last {self._records} records went to the dead-letter "
                f"topic (over DLQ_BRAKE_RATIO={self.ratio:g} of DLQ_BRAKE_WINDOW="
                f"{self.window}): the model or its settings fail, not the records; nothing "
                "is committed from now on, so the records are processed again once fixed")

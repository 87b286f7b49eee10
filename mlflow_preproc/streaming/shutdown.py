"""SIGTERM and Ctrl-C as a flag that every wait of the stream and bridge polls.

Installed as the command starts, before the model loads or the broker answers, so an
orchestrator's SIGTERM during start-up ends the process cleanly (exit 0, nothing consumed)
instead of killing it mid-way (-15) or being ignored until a start-up wait times out.
"""

from __future__ import annotations

import signal
import time


class Shutdown:
    """Set by SIGTERM/SIGINT (once :meth:`install` ran) or by :meth:`request`."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None

    def install(self) -> Shutdown:
        """Catch SIGTERM and SIGINT from now on (main thread only; elsewhere the embedding
        application owns the signals and calls :meth:`request`)."""
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        except ValueError:
            pass
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only a flag: a signal handler that takes locks can deadlock the thread it interrupts.
        self.signal = signum
        self.requested = True

    def request(self) -> None:
        """Ask for a clean stop, as SIGTERM does."""
        self.requested = True

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early (True) when a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.1))
        return True

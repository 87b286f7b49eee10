"""librdkafka's own log lines, through our logger and rate-limited.

Left alone, librdkafka prints ``%3|1700000000.123|FAIL|rdkafka#consumer-1| ...`` to stderr: not
JSON, so it breaks structured logs, and while a broker is down it repeats the same line for
every connection attempt (1,421 lines in 69 s, measured). Passed as the clients' ``logger``,
every line becomes a log record of ``mlflow_preproc.librdkafka``, and :class:`RateLimit` lets
one line of a kind through per interval, with a count of the ones it held back.
"""

from __future__ import annotations

import logging
import re
import time

LOGGER_NAME = "mlflow_preproc.librdkafka"
_DIGITS = re.compile(r"\d+")
# One set of LIBRDKAFKA_* settings configures every client of a command, so a consumer's
# property (LIBRDKAFKA_SESSION_TIMEOUT_MS) reaches the producer too, which says it ignores it.
_OTHER_CLIENTS_PROPERTY = re.compile(r"is a (consumer|producer) property and will be ignored "
                                     r"by this (producer|consumer) instance")


class RateLimit(logging.Filter):
    """Pass one record of each kind per ``interval_s``; the next one says how many were held.

    A kind is the message (and its ``error`` field, if any) with numbers removed, so "after
    12ms" and "after 15ms" count as the same line.
    """

    def __init__(self, interval_s: float = 30.0, clock=time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (last passed at, held since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = _DIGITS.sub("#", f"{record.getMessage()} {getattr(record, 'error', '')}")
        now = self._clock()
        passed_at, held = self._last.get(kind, (None, 0))
        if passed_at is not None and now - passed_at < self.interval_s:
            self._last[kind] = (passed_at, held + 1)
            return False
        if held:
            record.msg = f"{record.getMessage()} ({held} similar lines held back in the " \
                         f"last {now - passed_at:.0f} s)"
            record.args = ()
        if len(self._last) > 1000:  # bounded: kinds are few, but messages can embed names
            self._last.clear()
        self._last[kind] = (now, 0)
        return True


class OtherClientsProperty(logging.Filter):
    """Drops librdkafka's warning that a property belongs to another kind of client: by
    design here (see ``_OTHER_CLIENTS_PROPERTY``), and no reason for anyone to wonder."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _OTHER_CLIENTS_PROPERTY.search(record.getMessage())


def client_logger(interval_s: float = 30.0) -> logging.Logger:
    """The logger to pass as librdkafka's ``logger`` (one per process, rate-limited)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, RateLimit) for f in logger.filters):
        logger.addFilter(OtherClientsProperty())
        logger.addFilter(RateLimit(interval_s))
    return logger

"""Log lines about bad input or drops, at most a few per interval."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Logs up to ``burst`` lines per ``interval`` seconds, then counts the rest.

    When a new interval starts, one line says how many were suppressed. Used
    from several threads: a lock guards the counters (this is off the hot
    path: only bad input and drops get here).
    """

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, burst: int = 5, interval: float = 10.0):
        self._logger = logger
        self._level = level
        self._burst = burst
        self._interval = interval
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            suppressed = 0
            if now - self._window_start >= self._interval:
                suppressed, self._suppressed = self._suppressed, 0
                self._window_start = now
                self._logged = 0
            log_this = self._logged < self._burst
            if log_this:
                self._logged += 1
            else:
                self._suppressed += 1
        if suppressed:
            self._logger.log(
                self._level, "... %d similar log lines suppressed in the last %.0fs", suppressed, self._interval
            )
        if log_this:
            self._logger.log(self._level, msg, *args)

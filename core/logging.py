"""structlog set-up shared by every process: one JSON (or console) line per event."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable

import structlog


LOG_FORMATS = ("json", "console")


def configure_logging(role: str, *, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once per process; every line carries the role.

    FEEDRET_LOG_FORMAT: `json` (the default: one object per line, for log collectors) or
    `console` (aligned, for a terminal); `json` given by the caller wins. FEEDRET_LOG_LEVEL:
    debug, info (default), warning, error.
    """
    level_name = (level or os.environ.get("FEEDRET_LOG_LEVEL", "info")).upper()
    fmt = os.environ.get("FEEDRET_LOG_FORMAT", "json").strip().lower()
    if json is None:
        json = fmt != "console"
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(role=role)
    if fmt not in LOG_FORMATS:
        # A logging setting never stops a server; it says once that it was not understood.
        structlog.get_logger(__name__).warning("log_format_unknown", FEEDRET_LOG_FORMAT=fmt, formats=list(LOG_FORMATS),
                                               using="json" if json else "console")


class Throttle:
    """At most `per_second` events pass on average (bursts up to that many); the rest are held back.

    For log lines a flood would multiply: a broken model writing NaN vectors at full
    rate, or a load spike being shed. `allow()` returns None for an event held back,
    and for one that passes, how many were held back since the last that passed, so
    the line that does get logged says what it stands for. Thread-safe.
    """

    def __init__(self, per_second: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0:
            raise ValueError(f"per_second must be positive, got {per_second}")
        self.rate = per_second
        self.clock = clock
        self._tokens = per_second
        self._at = clock()
        self._held = 0
        self._lock = threading.Lock()

    def allow(self) -> int | None:
        with self._lock:
            now = self.clock()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                self._held += 1
                return None
            self._tokens -= 1
            held, self._held = self._held, 0
            return held


class bound:
    """`with bound(request_id=..., ...)`: keys bound to every log line of the block, then
    set back to what they were, as structlog.contextvars.bound_contextvars does.

    That one copies the whole context on entry to find the old values, and unbinds and
    binds again on exit; the tokens of ContextVar.set do the same for a fraction of the
    cost. It runs once or twice per RPC in every server (rpc_scope, a batch's requests).
    """

    __slots__ = ("_kw", "_tokens")

    def __init__(self, **kw: object) -> None:
        self._kw = kw

    def __enter__(self) -> None:
        self._tokens = structlog.contextvars.bind_contextvars(**self._kw)

    def __exit__(self, *exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self._tokens)

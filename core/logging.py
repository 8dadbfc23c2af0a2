"""structlog set-up shared by every process: one JSON (or console) line per event."""

from __future__ import annotations

import logging
import os
import sys

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

"""structlog set-up shared by every process: one JSON (or console) line per event."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(role: str, *, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog once per process; every line carries the role."""
    level_name = (level or os.environ.get("FEEDRET_LOG_LEVEL", "info")).upper()
    if json is None:
        json = os.environ.get("FEEDRET_LOG_FORMAT", "json") == "json"
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

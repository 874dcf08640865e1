"""Logging for NVA processes: one handler, and a filter that keeps resource ids and URL queries out of log lines and tracebacks."""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

# A FHIR resource path carries a patient or resource id; a query string carries search values. Neither is logged.
_RESOURCE_PATH = re.compile(r"\b([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_QUERY = re.compile(r"\?[^\s\"']*")
_NOISY = (
    "urllib3",
    "httpx",
    "httpcore",
    "chromadb",
    "filelock",
    "fsspec",
    "PIL",
    "matplotlib",
    "watchdog",
    "distributed",
    "asyncio",
    "tornado",
)


def redact(text: str) -> str:
    """Resource ids and query strings out of one log text."""
    return _QUERY.sub("?…", _RESOURCE_PATH.sub(r"\1/…", text))


class PhiSafeFilter(logging.Filter):
    """Last line of defence: NVA's own code logs no PHI, but libraries log URLs at DEBUG and tracebacks quote
    exception messages; both the message and the formatted exception are redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose args do not fit its format: keep the format only
            message = str(record.msg)
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _filtered(handler: logging.Handler) -> None:
    if not any(isinstance(f, PhiSafeFilter) for f in handler.filters):
        handler.addFilter(PhiSafeFilter())


def install_phi_filter() -> None:
    """For processes that set up logging themselves (the dashboard under streamlit): every handler of the root
    and of already-created loggers gets the PHI filter, and the root gets a filtered handler if it has none
    (otherwise records would reach logging.lastResort, which has no filter). Idempotent."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._nva = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in root.handlers:
        _filtered(handler)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        for handler in logger.handlers:
            _filtered(handler)
        # On the logger too: streamlit's loggers do not propagate and it may replace their handlers later.
        if not any(isinstance(f, PhiSafeFilter) for f in logger.filters):
            logger.addFilter(PhiSafeFilter())


def configure_logging(verbosity: int = 0, *, stream: TextIO | None = None) -> logging.Handler:
    """0 = warnings, 1 = info, 2 = debug for NVA's own loggers; libraries stay at warning unless -vvv."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PhiSafeFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_nva", False)]:
        root.removeHandler(old)
    handler._nva = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(level if verbosity >= 3 else max(level, logging.WARNING))
    return handler

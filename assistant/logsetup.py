"""Logging for NVA processes: one handler, and a filter that keeps resource ids and URL queries out of log lines."""

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


class PhiSafeFilter(logging.Filter):
    """Last line of defence: NVA's own code logs no PHI, but libraries log URLs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _QUERY.sub("?…", _RESOURCE_PATH.sub(r"\1/…", message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


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

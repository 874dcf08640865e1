"""The 'now' that rules and summaries judge against: an explicit time, a demo ward's anchor, or the wall clock."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)


class ClockError(ValueError):
    """A --now value that is not an ISO date-time."""


def parse_iso(text: str, *, what: str = "--now") -> datetime:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ClockError(f"{what} {text!r} is not an ISO date-time, e.g. 2026-03-02T07:00:00Z") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def demo_anchor(source: str | Path) -> datetime | None:
    """The anchor a demo ward was generated for (its ward.json), or None for any other source."""
    text = str(source)
    path = Path(text)
    if text.startswith(("http://", "https://")) or not path.is_dir() or not (path / "ward.json").is_file():
        return None
    try:
        raw = json.loads((path / "ward.json").read_text(encoding="utf-8")).get("anchor")
        return parse_iso(raw, what="ward.json anchor") if isinstance(raw, str) else None
    except (OSError, ValueError, AttributeError):
        log.warning("ward.json in the source directory is unreadable; using the wall clock")
        return None


def clinical_now(source: str | Path | None = None, override: str | None = None) -> datetime:
    """--now when given; a demo ward's anchor so its scenarios stay current on any day; else the wall clock."""
    if override:
        return parse_iso(override)
    anchor = demo_anchor(source) if source is not None else None
    return anchor or datetime.now(UTC).replace(microsecond=0)

"""HTTP helpers shared by the REST and bulk export clients: retry policy, Retry-After, OperationOutcome text."""

from __future__ import annotations

import email.utils
import json
import random
import time
from typing import Any

# Statuses worth retrying: the server is busy, restarting or behind a proxy that timed out.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed is None:
        return None
    return max(parsed.timestamp() - (time.time() if now is None else now), 0.0)


def maybe_json(body: bytes | str | None) -> Any:
    """The parsed body, or None when it is empty or not JSON (an error page, a truncated body)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def outcome_issues(body: Any) -> list[dict]:
    """The issue entries of an OperationOutcome (empty for anything else)."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return []
    return [i for i in body.get("issue") or [] if isinstance(i, dict)]


def issue_text(issue: dict) -> str:
    details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
    detail = issue.get("diagnostics") or details.get("text") or issue.get("code")
    return str(detail) if detail else ""


def outcome_text(body: Any) -> str:
    """The diagnostics of an OperationOutcome, for an error message."""
    parts = []
    for issue in outcome_issues(body):
        detail = issue_text(issue)
        if detail:
            parts.append(f"{issue.get('severity', 'error')}: {detail}")
    return "; ".join(parts)


def where(url: str) -> str:
    """The URL without its query string: query parameters may carry patient ids."""
    return url.split("?", 1)[0]


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None = None) -> float:
    """The server's Retry-After when it gave one, else full-jitter exponential backoff."""
    if retry_after is not None:
        return retry_after
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))  # noqa: S311 - jitter, not crypto

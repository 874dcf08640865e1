"""De-identify what goes to a remote LLM (names removed, ids tokenized, dates shifted) and re-identify its answer."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Generator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from assistant.llm.base import ChatMessage, ChatResult, ChatStream, LlmBackend
from assistant.model import Chart

_PROCESS_KEY = secrets.token_bytes(
    32
)  # date shifts differ per process, so they cannot be learned from outputs
_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::\d{2})?)?")
_TOKEN = re.compile(r"\bID-\d{3,}\b")
_SENTENCE_END = re.compile(r"(?<=[.!?\n])\s")


class Deidentifier:
    """Reversible for one chart: the same chart always maps to the same tokens and the same date shift."""

    def __init__(self, chart: Chart, *, key: bytes = _PROCESS_KEY) -> None:
        digest = hmac.new(key, chart.patient.ref.encode(), hashlib.sha256).digest()
        self.shift = timedelta(days=30 + int.from_bytes(digest[:4], "big") % 335)
        names = [
            part for part in re.split(r"[\s,]+", chart.patient.name) if len(part) > 1 and part[0].isalpha()
        ]
        self._names = sorted(set(names), key=len, reverse=True)
        identifiers = [chart.patient.mrn or "", chart.patient.ref.split("/", 1)[1]]
        identifiers += [ref.split("/", 1)[1] for ref in sorted(chart.fact_refs()) if "/" in ref]
        self._to_token: dict[str, str] = {}
        for ident in identifiers:
            if ident and len(ident) >= 4 and ident not in self._to_token:
                self._to_token[ident] = f"ID-{len(self._to_token) + 101}"
        self._from_token = {v: k for k, v in self._to_token.items()}
        ids = sorted(self._to_token, key=len, reverse=True)
        self._id_re = re.compile("|".join(re.escape(i) for i in ids)) if ids else None
        self._name_re = (
            re.compile(r"\b(" + "|".join(re.escape(n) for n in self._names) + r")\b", re.IGNORECASE)
            if self._names
            else None
        )

    def _shift_dates(self, text: str, sign: int) -> str:
        def move(m: re.Match[str]) -> str:
            year, month, day, hour, minute = m.groups()
            try:
                when = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0))
            except ValueError:
                return m.group(0)
            when += sign * self.shift
            return when.strftime("%Y-%m-%d %H:%M" if hour else "%Y-%m-%d").replace(
                " ", m.group(0)[10] if hour else " "
            )

        return _DATE.sub(move, text)

    def apply(self, text: str) -> str:
        if self._id_re:
            text = self._id_re.sub(lambda m: self._to_token[m.group(0)], text)
        if self._name_re:
            text = self._name_re.sub("[PATIENT]", text)
        return self._shift_dates(text, -1)

    def reverse(self, text: str) -> str:
        text = _TOKEN.sub(lambda m: self._from_token.get(m.group(0), m.group(0)), text)
        text = text.replace("[PATIENT]", "the patient")
        return self._shift_dates(text, +1)


class DeidentifyingBackend(LlmBackend):
    """Wraps a remote backend for one chart: what leaves is de-identified, what comes back is re-identified."""

    def __init__(self, inner: LlmBackend, chart: Chart) -> None:
        self.inner = inner
        self.deid = Deidentifier(chart)
        self.name = inner.name
        self.model = inner.model

    @property
    def available(self) -> bool:
        return self.inner.available

    def outgoing(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        return [ChatMessage(m.role, self.deid.apply(m.content)) for m in messages]

    def stream(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatStream:
        inner = self.inner.stream(self.outgoing(messages), **kwargs)

        def reidentified() -> Generator[str, None, ChatResult]:
            pending = ""
            for delta in inner:
                pending += delta
                # Re-identify whole sentences only: a date or token may be split across deltas.
                parts = _SENTENCE_END.split(pending)
                for done in parts[:-1]:
                    yield self.deid.reverse(done) + " "
                pending = parts[-1]
            if pending:
                yield self.deid.reverse(pending)
            result = inner.result
            return replace(result, text=self.deid.reverse(result.text))

        return ChatStream(reidentified())

    def close(self) -> None:
        self.inner.close()

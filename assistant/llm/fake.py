"""Deterministic scripted backend for tests of code that calls an LLM."""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

from .base import (
    DEFAULT_MAX_TOKENS,
    ChatMessage,
    ChatResult,
    ChatStream,
    LlmBackend,
    LlmError,
    check_messages,
    check_params,
)

Responder = Callable[[list[ChatMessage]], "str | BaseException"]


class ScriptedBackend(LlmBackend):
    """Answers from a list (in order) or a callable(messages) -> str.

    A response that is an exception instance is raised instead, to script failures (e.g. LlmTimeout).
    Every call is recorded in `.calls` as (messages, kwargs). Streaming yields the text split after
    whitespace, so joining the deltas gives back the exact text. Token counts are whitespace word counts.
    """

    name = "scripted"

    def __init__(self, responses: Iterable[str | BaseException] | Responder, model: str = "scripted") -> None:
        self.model = model
        self._responder: Responder | None = responses if callable(responses) else None
        self._queue: list[str | BaseException] = [] if callable(responses) else list(responses)
        self.calls: list[tuple[list[ChatMessage], dict[str, Any]]] = []

    def _next(self, msgs: list[ChatMessage]) -> str:
        if self._responder is not None:
            answer = self._responder(msgs)
        elif self._queue:
            answer = self._queue.pop(0)
        else:
            raise LlmError("ScriptedBackend ran out of responses: give it one per expected call")
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChatStream:
        msgs = check_messages(messages)
        check_params(max_tokens, temperature)
        self.calls.append(
            (
                msgs,
                {
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "json_schema": json_schema,
                    "timeout": timeout,
                },
            )
        )
        text = self._next(msgs)
        return ChatStream(self._deltas(msgs, text))

    def _deltas(self, msgs: list[ChatMessage], text: str) -> Generator[str, None, ChatResult]:
        pieces = re.findall(r"\S+\s*|\s+", text)
        yield from pieces
        return ChatResult(
            text=text,
            model=self.model,
            backend=self.name,
            prompt_tokens=sum(len(m.content.split()) for m in msgs),
            completion_tokens=len(text.split()),
            latency_s=0.0,
            first_token_s=0.0 if pieces else None,
            finish_reason="stop",
        )

"""LLM interface shared by every backend: messages, results, streams and typed errors."""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from assistant import settings as nva_settings

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_TOKENS: int = nva_settings.default("NVA_LLM_MAX_TOKENS")
DEFAULT_TIMEOUT_S: float = nva_settings.default("NVA_LLM_TIMEOUT")

ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"ChatMessage.role must be one of {sorted(ROLES)}, got {self.role!r}")

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ChatResult:
    """One finished completion.

    Token counts are None when neither the server nor the backend could tell. `first_token_s` is None for
    non-streaming HTTP calls (the whole body arrives at once). `schema_fallback` is True when a JSON schema
    was asked for, the server refused `response_format`, and the text was generated without it: callers
    must validate JSON output in every case, since servers may also ignore the field silently.
    """

    text: str
    model: str
    backend: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    first_token_s: float | None
    finish_reason: str | None = None
    schema_fallback: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        if not self.completion_tokens or self.latency_s <= 0:
            return None
        decode_s = self.latency_s - (self.first_token_s or 0.0)
        return self.completion_tokens / decode_s if decode_s > 0 else None


class LlmError(Exception):
    """Base of every LLM-layer error. Messages never quote prompt content (it holds patient data)."""

    retryable = False


class LlmTimeout(LlmError):
    retryable = True


class LlmUnavailable(LlmError):
    """Connection refused, DNS failure, or a 5xx answer: the server may come back."""

    retryable = True

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LlmRequestError(LlmError):
    """The server refused the request (4xx): retrying the same request will not help."""

    retryable = False

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LlmResponseError(LlmError):
    """The server answered 2xx but the body is not a chat completion."""

    retryable = False


class LlmConfigError(LlmError):
    """Settings are missing or wrong; the message names what to set."""

    retryable = False


class ResultStream(Iterator[T], Generic[T, R]):
    """Iterator over a generator's yields; after it is exhausted, `.result` holds what the generator returned.

    Use as a context manager (or call `.close()`) to stop early; closing runs the generator's cleanup.
    """

    unfinished_error: type[Exception] = RuntimeError

    def __init__(self, gen: Generator[T, None, R]) -> None:
        self._gen = gen
        self._result: R | None = None

    def __iter__(self) -> ResultStream[T, R]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self._result = stop.value
            raise StopIteration from None

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> R:
        if self._result is None:
            raise self.unfinished_error("stream not finished: iterate it to the end before reading .result")
        return self._result

    def collect(self) -> R:
        """Drain the remaining items and return the final result."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> ResultStream[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChatStream(ResultStream[str, ChatResult]):
    """Text deltas of one completion; `.result` is the final ChatResult (closing releases the connection)."""

    unfinished_error = LlmError


class LlmBackend(ABC):
    """A chat model. Implementations must be safe to call from one thread at a time."""

    name: str = "abstract"
    model: str = ""
    # A small in-process model: the summary asks it one fact at a time and never asks it for free judgement.
    small_model: bool = False

    @property
    def available(self) -> bool:
        return True

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChatResult:
        """Complete `messages`; default implementation drains `stream()`."""
        return self.stream(
            messages, max_tokens=max_tokens, temperature=temperature, json_schema=json_schema, timeout=timeout
        ).collect()

    @abstractmethod
    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChatStream:
        """Start a completion and return a ChatStream of text deltas."""

    def stream_many(
        self,
        requests: Sequence[Sequence[ChatMessage]],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
        stop: str | None = None,
        group: Hashable | None = None,
        optional: bool = False,
    ) -> list[ChatStream]:
        """Several completions for one caller, one stream each, in the order given.

        `stop`: a regular expression; a completion ends as soon as its text so far matches (finish_reason
        "stop"). `group`: calls passing the same key are one caller (one turn in a batched backend's round-robin;
        default: each call its own). In-process batched backends decode all of them together (and with other
        callers'); this default starts each call only when its stream is first read, so reading them in order is
        calling `stream()` in turn and a stream never read costs nothing.

        `optional`: the caller has a fallback for these (a template sentence), so a busy batched backend may
        answer them with no text (finish_reason "shed") rather than make every caller wait; this default never
        sheds.
        """
        kwargs = {"max_tokens": max_tokens, "temperature": temperature, "json_schema": json_schema}
        return [ChatStream(self._lazy(m, kwargs, timeout, stop)) for m in requests]

    def _lazy(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], timeout: float | None, stop: str | None
    ) -> Generator[str, None, ChatResult]:
        clock = Clock()
        pattern = re.compile(stop) if stop else None
        inner = self.stream(messages, timeout=timeout, **kwargs)
        text = ""
        try:
            for delta in inner:
                text += delta
                yield delta
                if pattern is not None and pattern.search(text):
                    break
        finally:
            if not inner.done:
                inner.close()
        if inner.done:
            return inner.result
        return ChatResult(
            text=text,
            model=self.model,
            backend=self.name,
            prompt_tokens=None,
            completion_tokens=None,
            latency_s=clock.elapsed(),
            first_token_s=None,
            finish_reason="stop",
        )

    def close(self) -> None:  # noqa: B027 -- optional hook, most backends hold nothing
        """Release connections; the backend must not be used afterwards."""


def check_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    msgs = list(messages)
    if not msgs:
        raise ValueError("messages is empty: pass at least one ChatMessage")
    for m in msgs:
        if not isinstance(m, ChatMessage):
            raise TypeError(f"messages must be ChatMessage instances, got {type(m).__name__}")
    return msgs


def check_params(max_tokens: int, temperature: float) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


class Clock:
    """Measures latency and time to first token for one call."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None

    def mark_first(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def log_result(result: ChatResult) -> None:
    logging.getLogger("assistant.llm").info(
        "llm call backend=%s model=%s prompt_tokens=%s completion_tokens=%s latency=%.2fs ttft=%s finish=%s",
        result.backend,
        result.model,
        result.prompt_tokens,
        result.completion_tokens,
        result.latency_s,
        f"{result.first_token_s:.2f}s" if result.first_token_s is not None else "-",
        result.finish_reason,
    )

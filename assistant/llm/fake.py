"""Deterministic scripted backend for tests of code that calls an LLM."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Generator, Hashable, Iterable, Sequence
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


class FakeBatchModel:
    """Word-level stand-in for an in-process model, driven by the real BatchScheduler (no weights).

    Each prompt is one token naming its registered answer; the "logits" of a row put all weight on the next word
    of that answer, so a row can only ever produce its own prompt's text: any mix-up between rows shows. An
    answer that is an exception is raised by the pre-fill (that request fails); `fail_steps` makes that many
    next decode steps raise (every row in the step fails). `step_s` sleeps per step (a slow model).
    """

    eos = frozenset({0})

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s
        self.vocab: list[str] = ["<eos>"]
        self.index: dict[str, int] = {"<eos>": 0}
        self.answers: list[list[int] | BaseException] = []
        self.fail_steps = 0
        self.prefills = 0
        self.widest = 0  # most rows in one decode step
        self.last_reused = 0
        self.idles = 0  # times the batch emptied

    def register(self, answer: str | BaseException) -> list[int]:
        """Token ids of a prompt whose answer is `answer`."""
        if isinstance(answer, BaseException):
            self.answers.append(answer)
        else:
            ids = []
            for piece in re.findall(r"\S+\s*|\s+", answer):
                if piece not in self.index:
                    self.index[piece] = len(self.vocab)
                    self.vocab.append(piece)
                ids.append(self.index[piece])
            self.answers.append(ids)
        return [-1 - (len(self.answers) - 1)]  # negative: never a vocabulary id

    def _logits(self, answer: list[int], pos: int, width: int | None = None) -> Any:
        import numpy as np

        out = np.zeros(width or len(self.vocab), dtype=np.float32)
        out[answer[pos] if pos < len(answer) else 0] = 100.0  # sampling, too, can only pick this word
        return out

    def prefill(self, ids: list[int]) -> tuple[Any, Any]:
        self.prefills += 1
        answer = self.answers[-1 - ids[0]]
        if isinstance(answer, BaseException):
            raise answer
        return [answer, 0], self._logits(answer, 0)

    def merge(self, batch: Any, keep: Sequence[int], new: Sequence[Any], lengths: Sequence[int]) -> list[Any]:
        return [batch[i] for i in keep] + list(new)

    def idle(self, batch: Any) -> None:
        self.idles += 1

    def step(self, batch: list[Any], tokens: Sequence[int], lengths: Sequence[int]) -> tuple[Any, Any]:
        import time

        import numpy as np

        if self.step_s:
            time.sleep(self.step_s)
        if self.fail_steps > 0:
            self.fail_steps -= 1
            raise RuntimeError("scripted engine failure")
        self.widest = max(self.widest, len(batch))
        rows = []
        width = len(self.vocab)  # other callers may register words meanwhile: one width per step
        for row, token in zip(batch, tokens, strict=True):
            answer, pos = row
            if answer[pos] != token:  # the fed token must be this row's own last one
                raise AssertionError("a row was fed another row's token")
            row[1] = pos + 1
            rows.append(self._logits(answer, row[1], width))
        return batch, np.stack(rows)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class BatchingFakeBackend(LlmBackend):
    """A scripted in-process "small model" behind the real batching scheduler: for tests of concurrent callers.

    `responder(messages) -> str | exception` gives each prompt's answer (a list is used in submission order).
    """

    name = "scripted-batch"
    small_model = True

    def __init__(
        self,
        responses: Iterable[str | BaseException] | Responder,
        *,
        step_s: float = 0.0,
        max_batch: int = 16,
        timeout: float = 30.0,
    ) -> None:
        from .batching import BatchScheduler

        self.model = "scripted-batch"
        self._responder: Responder | None = responses if callable(responses) else None
        self._queue: list[str | BaseException] = [] if callable(responses) else list(responses)
        self.engine = FakeBatchModel(step_s)
        self.scheduler = BatchScheduler(self.engine, max_batch=max_batch, name="fake-batch")
        self.timeout = timeout
        self.calls: list[list[ChatMessage]] = []
        self._lock = threading.Lock()

    def _encode(self, msgs: list[ChatMessage]) -> list[int]:
        with self._lock:
            self.calls.append(msgs)
            if self._responder is not None:
                answer = self._responder(msgs)
            elif self._queue:
                answer = self._queue.pop(0)
            else:
                answer = LlmError("BatchingFakeBackend ran out of responses: give it one per expected call")
            return self.engine.register(answer)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChatStream:
        return self.stream_many(
            [messages],
            max_tokens=max_tokens,
            temperature=temperature,
            json_schema=json_schema,
            timeout=timeout,
        )[0]

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
        from .batching import submit_streams

        return submit_streams(
            self,
            self.scheduler,
            self._encode,
            requests,
            max_tokens=max_tokens,
            temperature=temperature,
            timeout=timeout or self.timeout,
            stop=stop,
            group=group,
            optional=optional,
            schema_asked=json_schema is not None,
        )

    def close(self) -> None:
        self.scheduler.close()

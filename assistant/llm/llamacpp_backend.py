"""Optional in-process backend on llama-cpp-python (`pip install 'nva[llama-cpp]'`)."""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from .base import (
    DEFAULT_MAX_TOKENS,
    ChatMessage,
    ChatResult,
    ChatStream,
    Clock,
    LlmBackend,
    LlmConfigError,
    LlmError,
    LlmTimeout,
    check_messages,
    check_params,
    log_result,
)
from .config import LlmSettings
from .transformers_backend import resolve_model_source

_CACHE: dict[str, Any] = {}
_LOCK = threading.Lock()


def _llama_class() -> Any:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LlmConfigError(
            "llama-cpp backend needs llama-cpp-python: pip install 'nva[llama-cpp]' (compiles for ~5 minutes), "
            "or set NVA_LLM_BACKEND=transformers"
        ) from None
    return Llama


class LlamaCppBackend(LlmBackend):
    """GGUF models through llama.cpp. `json_schema` is enforced with llama.cpp's grammar support."""

    name = "llama-cpp"
    small_model = True

    def __init__(self, settings: LlmSettings) -> None:
        self._llama_cls = _llama_class()
        self.settings = settings
        source = resolve_model_source(settings.model_path)
        if not source.gguf_file:
            raise LlmConfigError("llama-cpp backend needs a .gguf file: point NVA_LLM_MODEL_PATH at one")
        self.gguf_path = str(Path(source.directory) / source.gguf_file)
        self.model = settings.model or source.gguf_file

    def _llama(self) -> Any:
        with _LOCK:
            if self.gguf_path not in _CACHE:
                _CACHE[self.gguf_path] = self._llama_cls(
                    model_path=self.gguf_path,
                    n_threads=self.settings.torch_threads,
                    n_ctx=4096,
                    verbose=False,
                )
            return _CACHE[self.gguf_path]

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
        return ChatStream(
            self._run(msgs, max_tokens, temperature, json_schema, timeout or self.settings.timeout)
        )

    def _run(
        self,
        msgs: list[ChatMessage],
        max_tokens: int,
        temperature: float,
        json_schema: dict[str, Any] | None,
        timeout: float,
    ) -> Generator[str, None, ChatResult]:
        llama = self._llama()
        clock = Clock()
        kwargs: dict[str, Any] = {
            "messages": [m.as_dict() for m in msgs],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
        }
        if json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": json_schema}
        parts: list[str] = []
        finish: str | None = None
        try:
            for chunk in llama.create_chat_completion(**kwargs):
                if clock.elapsed() > timeout:
                    raise LlmTimeout(
                        f"local model did not finish within {timeout:g}s: raise NVA_LLM_TIMEOUT or lower max_tokens"
                    )
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    clock.mark_first()
                    parts.append(delta)
                    yield delta
        except (RuntimeError, ValueError) as exc:
            raise LlmError(
                f"llama.cpp generation failed ({type(exc).__name__}): check the model file"
            ) from exc
        text = "".join(parts)
        result = ChatResult(
            text=text,
            model=self.model,
            backend=self.name,
            prompt_tokens=None,
            completion_tokens=len(parts),
            latency_s=clock.elapsed(),
            first_token_s=clock.first,
            finish_reason=finish,
        )
        log_result(result)
        return result

"""LLM layer: one chat interface (`LlmBackend`) over OpenAI-compatible servers, ONNX Runtime, transformers, llama.cpp."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import (
    ChatMessage,
    ChatResult,
    ChatStream,
    LlmBackend,
    LlmConfigError,
    LlmError,
    LlmRequestError,
    LlmResponseError,
    LlmTimeout,
    LlmUnavailable,
)
from .config import LlmSettings
from .fake import ScriptedBackend

__all__ = [
    "ChatMessage",
    "ChatResult",
    "ChatStream",
    "LlmBackend",
    "LlmConfigError",
    "LlmError",
    "LlmRequestError",
    "LlmResponseError",
    "LlmSettings",
    "LlmTimeout",
    "LlmUnavailable",
    "NoBackend",
    "ScriptedBackend",
    "make_backend",
    "warm",
]


class NoBackend(LlmBackend):
    """Stands in when no LLM is configured: `available` is False and every call raises LlmConfigError.

    Callers check `backend.available` and take their template (non-LLM) path instead.
    """

    name = "none"
    model = ""

    @property
    def available(self) -> bool:
        return False

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResult:
        raise self._error()

    def stream(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatStream:
        raise self._error()

    @staticmethod
    def _error() -> LlmConfigError:
        return LlmConfigError(
            "no LLM backend configured: set NVA_LLM_BACKEND to onnx, openai, transformers or llama-cpp "
            "(callers should check backend.available first)"
        )


def make_backend(settings: LlmSettings | Mapping[str, str] | None = None) -> LlmBackend:
    """Backend named by `settings.backend`; a mapping is read like the environment (NVA_LLM_* keys).

    Never returns None: `none` gives a NoBackend. Heavy imports (torch, llama_cpp) happen only for the
    backend chosen, and models load on first use (call `.load()` on the transformers backend to warm up).
    """
    if settings is None:
        settings = LlmSettings.from_env()
    elif not isinstance(settings, LlmSettings):
        settings = LlmSettings.from_env(settings)
    if settings.backend == "openai":
        from assistant.security.egress import EgressDenied, check_llm_egress

        from .openai_backend import OpenAIBackend

        backend = OpenAIBackend(settings)  # validates the URL, TLS and CA settings first
        hosts = tuple(h.strip() for h in settings.allow_hosts.split(",") if h.strip())
        try:
            egress = check_llm_egress(
                settings.base_url or "", allow_remote=settings.allow_remote, allow_list=hosts
            )
        except EgressDenied as exc:
            raise LlmConfigError(str(exc)) from exc
        backend.requires_deid = egress != "local" and settings.deidentify  # type: ignore[attr-defined]
        return backend
    if settings.backend == "onnx":
        from .onnx_backend import OnnxBackend

        return OnnxBackend(settings)
    if settings.backend == "transformers":
        from .transformers_backend import TransformersBackend

        return TransformersBackend(settings)
    if settings.backend == "llama-cpp":
        from .llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(settings)
    return NoBackend()


def warm(backend: LlmBackend | None, prompts: Sequence[Sequence[ChatMessage]] = ()) -> None:
    """Load an in-process model once and pre-fill `prompts` (prefixes every patient uses); call at app start.

    Never raises for LLM trouble (the summary falls back to templates and says why); logs the cause instead.
    A no-op for NoBackend and servers. `assistant.summary.warmup.warm_summary_model` passes the summary prompts.
    """
    import logging

    if backend is None or not backend.available or not getattr(backend, "small_model", False):
        return
    try:
        warmer = getattr(backend, "warm", None)
        if warmer is not None:
            warmer(prompts)
        else:
            load = getattr(backend, "load", None)
            if load is not None:
                load()
    except Exception as exc:  # noqa: BLE001 -- warm-up is best effort: the first patient would load it anyway
        logging.getLogger("assistant.llm").warning("LLM warm-up failed (%s): %s", type(exc).__name__, exc)

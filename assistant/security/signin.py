"""Sign-in configuration read fail-closed: an unreadable or invalid secrets file or [auth] section stops the app."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.settings import SettingsError, read_secrets

# What streamlit's st.login needs (https://docs.streamlit.io/develop/api-reference/user/st.login).
SHARED_KEYS = ("redirect_uri", "cookie_secret")
PROVIDER_KEYS = ("client_id", "client_secret", "server_metadata_url")


class SignInConfigError(RuntimeError):
    """Sign-in is configured wrongly (or cannot be read); nobody is let in until it is fixed."""


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """configured=False only when no secrets file has an `auth` key at all (the loopback demo may then run)."""

    configured: bool
    providers: tuple[str | None, ...] = ()  # named [auth.<name>] providers, or (None,) for [auth] itself
    files: tuple[str, ...] = ()  # the files that were read
    section: dict[str, Any] = field(default_factory=dict, repr=False)  # holds secrets: never log or show


def _text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def check_auth_section(section: Any, where: str) -> AuthConfig:
    """Validate one [auth] section (what st.login needs); SignInConfigError names each missing key."""
    if not isinstance(section, Mapping):
        raise SignInConfigError(
            f"`auth` in {where} is not a [auth] table; write it as a section (see .streamlit/secrets.toml.example)"
        )
    missing = [k for k in SHARED_KEYS if not _text(section.get(k))]
    named = {k: v for k, v in section.items() if isinstance(v, Mapping)}
    providers: tuple[str | None, ...]
    if named:
        for name, spec in named.items():
            missing += [f"{name}.{k}" for k in PROVIDER_KEYS if not _text(spec.get(k))]
        providers = tuple(named)
    else:
        missing += [k for k in PROVIDER_KEYS if not _text(section.get(k))]
        providers = (None,)
    if missing:
        raise SignInConfigError(
            f"the [auth] section in {where} lacks {', '.join(missing)} (non-empty strings); sign-in stays closed "
            "until they are set (see .streamlit/secrets.toml.example)"
        )
    return AuthConfig(True, providers, (where,), dict(section))


def read_auth_config(paths: Iterable[Path | str]) -> AuthConfig:
    """The sign-in configuration from secrets files (later files win, as in streamlit); fail closed on any doubt."""
    found: list[tuple[str, Any]] = []
    read: list[str] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and not str(raw).endswith(".toml"):
            # streamlit's directory-style secrets: an auth/ folder there is real sign-in config we cannot check
            if (path / "auth").exists():
                raise SignInConfigError(
                    f"{path}/auth: directory-style [auth] secrets are not supported by NVA; use a secrets.toml"
                )
            continue
        try:
            data = read_secrets(path)
        except SettingsError as exc:
            raise SignInConfigError(f"NVA cannot read its secrets file: {exc}") from None
        if path.exists():
            read.append(str(path))
        if "auth" in data:
            found.append((str(path), data["auth"]))
    if not found:
        return AuthConfig(False, files=tuple(read))
    where, section = found[-1]
    config = check_auth_section(section, where)
    return AuthConfig(True, config.providers, tuple(read), config.section)

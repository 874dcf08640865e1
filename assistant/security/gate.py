"""Who may use the dashboard at all: a signed-in user with an NVA role, or the local demo on a loopback address."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from assistant.security.roles import (
    AccessDenied,
    User,
    display_name,
    local_demo_user,
    subject_of,
    user_from_claims,
)

log = logging.getLogger(__name__)

# Gate states: ok (user set), sign-in (provider configured, nobody signed in), no-role (signed in, no NVA role or
# claims of the wrong shape), demo-exposed (no provider and the server listens beyond loopback), config-error
# (secrets.toml, [auth] or the role file unreadable or invalid: nobody is let in, demo mode included).
GATE_STATES = ("ok", "sign-in", "no-role", "demo-exposed", "config-error")

DEMO_EXPOSED = (
    "NVA is running without sign-in (local demo mode) on a non-loopback address ({address}), so anyone "
    "on the network could read charts. Start it with `streamlit run dashboard/app.py --server.address "
    "127.0.0.1` (or `make run`), or configure sign-in: an [auth] section in .streamlit/secrets.toml "
    "(see .streamlit/secrets.toml.example)."
)


@dataclass(frozen=True, slots=True)
class Gate:
    state: str
    user: User | None = None
    message: str = ""
    who: str = ""  # the signed-in name that was refused, for the access log
    subject: str = ""  # its "<iss> <sub>", for the access log


def config_error(exc: Exception) -> Gate:
    """Fail closed: a configuration that cannot be read or checked lets nobody in and says what to fix."""
    log.error("NVA sign-in configuration refused: %s", exc)
    return Gate("config-error", message=f"NVA cannot start: {exc}")


def is_loopback_address(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; an unset address means every interface, so False."""
    host = (address or "").strip().strip("[]")
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_gate(
    *,
    auth_configured: bool,
    server_address: str | None,
    claims: Mapping[str, Any] | None,
    role_claim: str = "nva_role",
    ward_claim: str = "nva_wards",
    role_file: Mapping[str, Mapping[str, Any]] | None = None,
) -> Gate:
    """The one decision every dashboard run starts with."""
    if not auth_configured:
        if not is_loopback_address(server_address):
            return Gate(
                "demo-exposed", message=DEMO_EXPOSED.format(address=server_address or "all interfaces")
            )
        return Gate("ok", local_demo_user())
    if not claims or not claims.get("is_logged_in"):
        return Gate("sign-in")
    try:
        user = user_from_claims(claims, role_claim=role_claim, ward_claim=ward_claim, role_file=role_file)
    except AccessDenied as exc:
        who, subject = display_name(claims), subject_of(claims)
        log.warning("sign-in refused for %s (%s): %s", who, subject or "no iss/sub", exc)
        return Gate("no-role", message=str(exc), who=who, subject=subject)
    return Gate("ok", user)

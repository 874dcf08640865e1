"""Roles and ward assignments: from an identity provider claim or a local role file."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("nurse", "charge-nurse", "auditor")
# What each role may open: pages are checked in the dashboard, actions in the core callers.
PERMISSIONS = {
    "nurse": {"patient", "handoff-view"},
    "charge-nurse": {"patient", "handoff-view", "handoff-export"},
    "auditor": {"patient", "handoff-view", "audit", "access-log"},
}


class AccessDenied(PermissionError):
    """The signed-in user may not open this ward, patient or page."""


@dataclass(frozen=True, slots=True)
class User:
    name: str  # shown and logged: the verified e-mail, else preferred_username, else sub
    role: str
    wards: tuple[str, ...] = ()  # Location refs; empty with all_wards=True for charge nurses and auditors
    all_wards: bool = False
    demo: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    subject: str = ""  # "<iss> <sub>": the identity itself (names and e-mails can be reassigned or spoofed)

    def can(self, permission: str) -> bool:
        # The local demo (loopback only, bannered) shows every page: there is nobody to tell apart.
        if self.demo:
            return any(permission in perms for perms in PERMISSIONS.values())
        return permission in PERMISSIONS.get(self.role, set())

    def may_see_ward(self, ward_ref: str | None) -> bool:
        return self.all_wards or (ward_ref is not None and ward_ref in self.wards)

    def require(self, permission: str) -> None:
        if not self.can(permission):
            raise AccessDenied(f"role {self.role} may not open {permission}; ask for the role that can")

    def require_ward(self, ward_ref: str | None) -> None:
        if not self.may_see_ward(ward_ref):
            raise AccessDenied("this patient is on a ward you are not assigned to")


def wards_value(value: Any, where: str) -> tuple[str, ...]:
    """A ward list: a list of non-empty strings (Location refs), or nothing; anything else is refused."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in value):
        raise AccessDenied(
            f'{where} must be a list of ward references (strings such as "Location/ward-4b"), '
            f"got {type(value).__name__}; an administrator must fix it"
        )
    return tuple(w.strip() for w in value)


def load_role_file(path: Path | str) -> dict[str, dict[str, Any]]:
    """TOML: [users."email@example.org"] role = "nurse", wards = ["Location/ward-4b"]; keys are verified e-mails."""
    with Path(path).open("rb") as fh:
        data = tomllib.load(fh)
    users = data.get("users", {})
    if not isinstance(users, dict):
        raise ValueError(f'role file {path}: `users` must be a table of [users."<e-mail>"] sections')
    for name, spec in users.items():
        if not isinstance(spec, dict) or spec.get("role") not in ROLES:
            role = spec.get("role") if isinstance(spec, dict) else spec
            raise ValueError(f"role file {path}: user {name} has role {role!r}; use one of {ROLES}")
        try:
            wards_value(spec.get("wards"), f"role file {path}: wards of {name}")
        except AccessDenied as exc:
            raise ValueError(str(exc)) from None
    return {name.strip().lower(): spec for name, spec in users.items()}


def _claim_text(claims: Mapping[str, Any], key: str) -> str:
    value = claims.get(key)
    return value.strip() if isinstance(value, str) else ""


def display_name(claims: Mapping[str, Any]) -> str:
    """Who to show and log: a verified e-mail, else "unverified: <preferred_username or e-mail>", else sub."""
    email = _claim_text(claims, "email").lower()
    if email and claims.get("email_verified") is True:
        return email
    other = _claim_text(claims, "preferred_username") or email
    return f"unverified: {other}" if other else (_claim_text(claims, "sub") or "unknown")


def subject_of(claims: Mapping[str, Any]) -> str:
    """The identity bound to this sign-in: "<iss> <sub>" ("" when the provider sent neither)."""
    iss, sub = _claim_text(claims, "iss"), _claim_text(claims, "sub")
    return f"{iss} {sub}" if iss and sub else ""


def user_from_claims(
    claims: Mapping[str, Any],
    *,
    role_claim: str = "nva_role",
    ward_claim: str = "nva_wards",
    role_file: Mapping[str, Mapping[str, Any]] | None = None,
) -> User:
    """A signed-in user's role: the identity provider's claim first, else the local role file; else no access.

    The identity is the issuer and subject (`iss` + `sub`). The role file is matched only by an e-mail the
    provider says it verified (`email_verified: true`); a `preferred_username` never matches it. Claims of the
    wrong type are refused with AccessDenied (and logged by the caller), never a traceback.
    """
    iss, sub = _claim_text(claims, "iss"), _claim_text(claims, "sub")
    if not sub or not iss:
        raise AccessDenied(
            "the identity provider sent no issuer and subject (iss, sub) for this sign-in; NVA cannot tell who "
            "this is"
        )
    email = _claim_text(claims, "email").lower()
    verified = claims.get("email_verified") is True
    name = display_name(claims)
    role = claims.get(role_claim)
    if role is not None:
        if not isinstance(role, str) or role not in ROLES:
            raise AccessDenied(
                f"{name}: the claim {role_claim} must be one of {', '.join(ROLES)}; an administrator must fix it"
            )
        wards = wards_value(claims.get(ward_claim), f"the claim {ward_claim}")
    elif role_file is not None and verified and email and email in role_file:
        spec = role_file[email]
        role = spec.get("role")
        wards = wards_value(spec.get("wards"), f"the role file's wards for {email}")
    else:
        hint = "" if verified or not email else " (the role file needs an e-mail the provider has verified)"
        raise AccessDenied(
            f"{name} has no NVA role{hint}; an administrator must add one (claim {role_claim} or the role file)"
        )
    if role not in ROLES:
        raise AccessDenied(f"{name} has no NVA role; an administrator must add one")
    all_wards = role in ("charge-nurse", "auditor") and not wards
    return User(name=name, role=role, wards=wards, all_wards=all_wards, subject=f"{iss} {sub}")


def local_demo_user() -> User:
    """Without an identity provider: one local user, clearly bannered, only on 127.0.0.1."""
    return User(name="local-demo", role="charge-nurse", all_wards=True, demo=True)


def visible_wards(user: User, ward_refs: list[str] | tuple[str, ...]) -> list[str]:
    """The wards of a source this user may open, in the source's order."""
    return [ref for ref in ward_refs if user.may_see_ward(ref)]

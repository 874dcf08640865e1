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
    name: str
    role: str
    wards: tuple[str, ...] = ()  # Location refs; empty with all_wards=True for charge nurses and auditors
    all_wards: bool = False
    demo: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

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


def load_role_file(path: Path | str) -> dict[str, dict[str, Any]]:
    """TOML: [users."email@example.org"] role = "nurse", wards = ["Location/ward-4b"]."""
    with Path(path).open("rb") as fh:
        data = tomllib.load(fh)
    users = data.get("users", {})
    for name, spec in users.items():
        if spec.get("role") not in ROLES:
            raise ValueError(
                f"role file {path}: user {name} has role {spec.get('role')!r}; use one of {ROLES}"
            )
    return users


def user_from_claims(
    claims: Mapping[str, Any],
    *,
    role_claim: str = "nva_role",
    ward_claim: str = "nva_wards",
    role_file: Mapping[str, Mapping[str, Any]] | None = None,
) -> User:
    """A signed-in user's role: the identity provider's claim first, else the local role file; else no access."""
    name = str(claims.get("email") or claims.get("preferred_username") or claims.get("sub") or "")
    if not name:
        raise AccessDenied("the identity provider sent no user name (email, preferred_username or sub)")
    role = claims.get(role_claim)
    wards = claims.get(ward_claim) or ()
    if role is None and role_file is not None and name in role_file:
        spec = role_file[name]
        role, wards = spec.get("role"), spec.get("wards", ())
    if role not in ROLES:
        raise AccessDenied(
            f"{name} has no NVA role; an administrator must add one (claim {role_claim} or the role file)"
        )
    if isinstance(wards, str):
        wards = tuple(w.strip() for w in wards.split(",") if w.strip())
    all_wards = role in ("charge-nurse", "auditor") and not wards
    return User(name=name, role=role, wards=tuple(wards), all_wards=all_wards)


def local_demo_user() -> User:
    """Without an identity provider: one local user, clearly bannered, only on 127.0.0.1."""
    return User(name="local-demo", role="charge-nurse", all_wards=True, demo=True)


def visible_wards(user: User, ward_refs: list[str] | tuple[str, ...]) -> list[str]:
    """The wards of a source this user may open, in the source's order."""
    return [ref for ref in ward_refs if user.may_see_ward(ref)]

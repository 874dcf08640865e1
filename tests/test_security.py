"""Roles, the append-only access log and the LLM egress rule."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from assistant.security.access_log import AccessLog
from assistant.security.egress import EgressDenied, check_llm_egress
from assistant.security.roles import AccessDenied, load_role_file, local_demo_user, user_from_claims


def test_access_log_records_and_refuses_edits(tmp_path):
    log = AccessLog(tmp_path / "a.sqlite", clock=lambda: datetime(2026, 3, 16, 7, tzinfo=UTC))
    log.record(user="rn1", role="nurse", action="view-chart", target="Patient/p1")
    log.record(user="cn1", role="charge-nurse", action="handoff-export", target="Location/ward-4b")
    events = log.events()
    assert [(e.user, e.action, e.target) for e in events] == [
        ("cn1", "handoff-export", "Location/ward-4b"),
        ("rn1", "view-chart", "Patient/p1"),
    ]
    db = sqlite3.connect(tmp_path / "a.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE access_log SET user = 'x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM access_log")
    with pytest.raises(ValueError, match="unknown access action"):
        log.record(user="rn1", role="nurse", action="peek", target="Patient/p1")


def test_roles_from_claims_and_role_file(tmp_path):
    role_file = tmp_path / "roles.toml"
    role_file.write_text('[users."ann@example.org"]\nrole = "nurse"\nwards = ["Location/ward-4b"]\n')
    users = load_role_file(role_file)
    ann = user_from_claims({"email": "ann@example.org"}, role_file=users)
    assert (
        ann.role == "nurse"
        and ann.may_see_ward("Location/ward-4b")
        and not ann.may_see_ward("Location/ward-5a")
    )
    assert ann.can("patient") and not ann.can("audit")
    with pytest.raises(AccessDenied):
        ann.require("audit")
    aud = user_from_claims({"email": "aud@example.org", "nva_role": "auditor"})
    assert aud.can("audit") and aud.all_wards
    with pytest.raises(AccessDenied, match="no NVA role"):
        user_from_claims({"email": "stranger@example.org"}, role_file=users)
    assert local_demo_user().demo


@pytest.mark.parametrize(
    ("url", "allow", "hosts", "expected"),
    [
        ("http://127.0.0.1:8000/v1", False, (), "local"),
        ("http://localhost:11434/v1", False, (), "local"),
        ("http://[::1]:8000/v1", False, (), "local"),
        ("https://llm.hospital.org/v1", False, ("llm.hospital.org",), "allow-listed"),
        ("https://api.example.com/v1", True, (), "remote-allowed"),
    ],
)
def test_llm_egress_allowed(url, allow, hosts, expected):
    assert check_llm_egress(url, allow_remote=allow, allow_list=hosts) == expected


def test_llm_egress_denied_without_explicit_setting():
    with pytest.raises(EgressDenied, match="NVA_LLM_ALLOW_REMOTE"):
        check_llm_egress("https://api.example.com/v1", allow_remote=False)
    with pytest.raises(EgressDenied):
        check_llm_egress("http://10.1.2.3:8000/v1", allow_remote=False)

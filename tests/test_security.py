"""Roles, the append-only access log and the LLM egress rule."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest

from assistant.security.access_log import AccessLog
from assistant.security.egress import EgressDenied, check_llm_egress
from assistant.security.roles import AccessDenied, load_role_file, local_demo_user, user_from_claims

IDP = {"iss": "https://login.example.org", "sub": "u-1"}


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
    ann = user_from_claims({**IDP, "email": "ann@example.org", "email_verified": True}, role_file=users)
    assert (
        ann.role == "nurse"
        and ann.may_see_ward("Location/ward-4b")
        and not ann.may_see_ward("Location/ward-5a")
    )
    assert ann.can("patient") and not ann.can("audit")
    with pytest.raises(AccessDenied):
        ann.require("audit")
    aud = user_from_claims({**IDP, "email": "aud@example.org", "nva_role": "auditor"})
    assert aud.can("audit") and aud.all_wards
    with pytest.raises(AccessDenied, match="no NVA role"):
        user_from_claims({**IDP, "email": "stranger@example.org", "email_verified": True}, role_file=users)
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


# --- sign-in fails closed (issue 12.6) -------------------------------------------------------------------
from assistant.security.gate import GATE_STATES, config_error, resolve_gate  # noqa: E402
from assistant.security.signin import SignInConfigError, read_auth_config  # noqa: E402

ROLE_FILE = '[users."ann@example.org"]\nrole = "auditor"\n'
AUTH = """
[auth]
redirect_uri = "https://nva.example.org/oauth2callback"
cookie_secret = "s3cret-s3cret"
client_id = "nva"
client_secret = "x"
server_metadata_url = "https://login.example.org/.well-known/openid-configuration"
"""


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text(ROLE_FILE)
    return load_role_file(path)


def test_role_file_matches_only_a_verified_email(users):
    ok = user_from_claims({**IDP, "email": "Ann@Example.org", "email_verified": True}, role_file=users)
    assert ok.role == "auditor" and ok.subject == "https://login.example.org u-1"
    for claims in (
        {**IDP, "email": "ann@example.org", "email_verified": False},
        {**IDP, "email": "ann@example.org"},  # no email_verified at all
        {**IDP, "email": "ann@example.org", "email_verified": "true"},  # a string is not a verified flag
        {**IDP, "preferred_username": "ann@example.org"},  # another user's e-mail as a user name
        {
            **IDP,
            "email": "mallory@example.org",
            "email_verified": True,
            "preferred_username": "ann@example.org",
        },
    ):
        with pytest.raises(AccessDenied, match="no NVA role"):
            user_from_claims(claims, role_file=users)


@pytest.mark.parametrize("missing", ["iss", "sub"])
def test_identity_needs_issuer_and_subject(users, missing):
    claims = {**IDP, "email": "ann@example.org", "email_verified": True, "nva_role": "nurse"}
    del claims[missing]
    with pytest.raises(AccessDenied, match="iss, sub"):
        user_from_claims(claims, role_file=users)
    with pytest.raises(AccessDenied, match="iss, sub"):
        user_from_claims({**claims, missing: 5}, role_file=users)


@pytest.mark.parametrize(
    "wards", [True, 5, [5], ["Location/ward-4b", 1], {"a": 1}, "Location/ward-4b", [""], [None]]
)
def test_ward_claim_must_be_a_list_of_strings(wards):
    claims = {**IDP, "email": "n@example.org", "nva_role": "nurse", "nva_wards": wards}
    with pytest.raises(AccessDenied, match="list of ward references"):
        user_from_claims(claims)
    gate = resolve_gate(
        auth_configured=True, server_address="0.0.0.0", claims={**claims, "is_logged_in": True}
    )
    assert gate.state == "no-role" and gate.user is None and "list of ward references" in gate.message


@pytest.mark.parametrize("role", [True, 1, ["nurse"], "admin", {"nurse": 1}])
def test_role_claim_of_the_wrong_type_is_refused(role):
    with pytest.raises(AccessDenied, match="nva_role must be one of"):
        user_from_claims({**IDP, "email": "n@example.org", "nva_role": role})


def test_ward_claim_list_is_accepted():
    user = user_from_claims({**IDP, "nva_role": "nurse", "nva_wards": [" Location/ward-4b "]})
    assert user.wards == ("Location/ward-4b",) and not user.all_wards and user.name == "u-1"


def test_role_file_with_bad_wards_is_refused_at_load(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text('[users."a@example.org"]\nrole = "nurse"\nwards = "Location/ward-4b"\n')
    with pytest.raises(ValueError, match="list of ward references"):
        load_role_file(path)


def test_refusals_are_logged(caplog):
    claims = {**IDP, "is_logged_in": True, "email": "x@example.org", "email_verified": True}
    with caplog.at_level("WARNING", logger="assistant.security.gate"):
        gate = resolve_gate(auth_configured=True, server_address="127.0.0.1", claims=claims)
    assert (
        gate.state == "no-role"
        and gate.who == "x@example.org"
        and gate.subject == "https://login.example.org u-1"
    )
    assert "sign-in refused for x@example.org" in caplog.text
    with caplog.at_level("ERROR", logger="assistant.security.gate"):
        bad = config_error(SignInConfigError("the [auth] section lacks cookie_secret"))
    assert bad.state == "config-error" in GATE_STATES and bad.user is None
    assert "cookie_secret" in bad.message and "configuration refused" in caplog.text


def test_no_secrets_or_no_auth_key_is_the_only_way_to_demo_mode(tmp_path):
    assert read_auth_config([tmp_path / "absent.toml"]).configured is False
    plain = tmp_path / "plain.toml"
    plain.write_text('NVA_SOURCE = "x"\n')
    assert read_auth_config([tmp_path / "absent.toml", plain]).configured is False
    good = tmp_path / "good.toml"
    good.write_text(AUTH)
    cfg = read_auth_config([plain, good])
    assert cfg.configured and cfg.providers == (None,) and "s3cret" not in repr(cfg)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (AUTH.replace('client_id = "nva"', "client_id = nva"), "not valid TOML"),  # a syntax error in [auth]
        ("[auth\n", "not valid TOML"),
        ('auth = "on"\n', r"not a \[auth\] table"),
        ("[auth]\n", "lacks redirect_uri, cookie_secret, client_id"),
        (AUTH.replace('cookie_secret = "s3cret-s3cret"', 'cookie_secret = ""'), "lacks cookie_secret"),
        (
            '[auth]\nredirect_uri = "r"\ncookie_secret = "c"\n[auth.okta]\nclient_id = "a"\n',
            "okta.client_secret, okta.server_metadata_url",
        ),
    ],
)
def test_invalid_auth_configuration_fails_closed(tmp_path, content, needle):
    path = tmp_path / "secrets.toml"
    path.write_text(content)
    with pytest.raises(SignInConfigError, match=needle):
        read_auth_config([path])


def test_unreadable_secrets_file_fails_closed(tmp_path):
    path = tmp_path / "secrets.toml"
    path.mkdir()  # exists, cannot be read as a file (root ignores chmod, a directory is unreadable for all)
    with pytest.raises(SignInConfigError, match="cannot be read"):
        read_auth_config([path])


# --- tamper-evident access log (issue 12.7) ----------------------------------------------------------------
from assistant.security.access_log import TRIGGERS, row_hash  # noqa: E402

CLOCK = datetime(2026, 3, 16, 9, 30, tzinfo=UTC)


def _filled(tmp_path, key=None):
    path = tmp_path / "log.sqlite"
    log = AccessLog(path, clock=lambda: CLOCK, key=key)
    for i in range(4):
        log.record(
            user=f"rn{i}", role="nurse", action="view-chart", target=f"Patient/p{i}", subject=f"iss s{i}"
        )
    return path, log


def test_chain_is_intact_and_links_every_row(tmp_path):
    path, log = _filled(tmp_path)
    status = log.verify()
    assert status.ok and status.rows == 4 and status.problems == ()
    assert AccessLog(path).status.ok  # verified on open as well
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, prev, hash FROM access_log ORDER BY seq").fetchall()
    assert [r[1] for r in rows[1:]] == [r[2] for r in rows[:-1]]  # each row names the one before
    assert len({r[2] for r in rows}) == 4


def test_insert_or_replace_cannot_rewrite_a_row(tmp_path):
    path, log = _filled(tmp_path)
    with sqlite3.connect(path) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute(
            "INSERT OR REPLACE INTO access_log (seq, at, user, role, action, target) "
            "VALUES (2, 'x', 'mallory', 'nurse', 'view-chart', 'Patient/p1')"
        )
    assert log.verify().ok and [e.user for e in log.events()][-2] == "rn1"


def _tamper(path, *sql):
    db = sqlite3.connect(path)
    for name in TRIGGERS:
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("sql", "needle", "first_bad"),
    [
        (("UPDATE access_log SET user = 'mallory' WHERE seq = 2",), "row 2 was changed", 2),
        (("DELETE FROM access_log WHERE seq = 2",), "row 3 does not follow", 3),
        (("DELETE FROM access_log WHERE seq = 4",), "rows after 3 are gone", None),
        ((), "append-only triggers are missing", None),
    ],
)
def test_tampering_is_detected_on_verify_and_on_open(tmp_path, sql, needle, first_bad):
    path, log = _filled(tmp_path)
    _tamper(path, *sql)
    status = log.verify()
    assert not status.ok and needle in status.text and status.first_bad_seq == first_bad
    reopened = AccessLog(path, clock=lambda: CLOCK)
    assert not reopened.status.ok
    # What the reopen repaired (triggers, head) is kept as an alert row: the banner stays on.
    again = AccessLog(path, clock=lambda: CLOCK)
    assert not again.status.ok and not again.verify().ok
    assert set(TRIGGERS) <= {
        r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='trigger'")
    }


def test_a_recomputed_chain_is_caught_by_the_head_file_or_the_key(tmp_path):
    path, log = _filled(tmp_path, key="k3y")
    _tamper(path, "UPDATE access_log SET user = 'mallory' WHERE seq = 4")
    # The attacker recomputes the last row's hash without the key: still a break.
    with sqlite3.connect(path) as db:
        row = dict(
            zip(
                ("seq", "at", "user", "subject", "role", "action", "target", "detail", "prev"),
                db.execute(
                    "SELECT seq, at, user, subject, role, action, target, detail, prev FROM access_log WHERE seq = 4"
                ).fetchone(),
                strict=True,
            )
        )
        db.execute("UPDATE access_log SET hash = ? WHERE seq = 4", (row_hash(row["prev"], row),))
    assert "row 4 was changed" in log.verify().text


def test_deleted_log_file_is_not_silently_recreated(tmp_path):
    path, log = _filled(tmp_path)
    path.unlink()
    assert "is missing" in log.verify().text
    fresh = AccessLog(path, clock=lambda: CLOCK)
    assert not fresh.status.ok and "log file was missing" in fresh.status.text
    assert [e.action for e in fresh.events()] == ["integrity-alert"]


def test_a_log_from_before_the_chain_is_sealed_once(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE access_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, user TEXT NOT NULL,"
            " role TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');"
            "INSERT INTO access_log (at, user, role, action, target) VALUES ('t', 'rn1', 'nurse', 'view-chart', 'Patient/p');"
            "CREATE TRIGGER access_log_no_update BEFORE UPDATE ON access_log BEGIN SELECT RAISE(ABORT, 'no'); END;"
            "CREATE TRIGGER access_log_no_delete BEFORE DELETE ON access_log BEGIN SELECT RAISE(ABORT, 'no'); END;"
        )
    log = AccessLog(path, clock=lambda: CLOCK)
    assert log.status.ok, log.status.text
    log.record(user="rn2", role="nurse", action="view-chart", target="Patient/q")
    assert log.verify().ok and [e.user for e in log.events()] == ["rn2", "rn1"]


def test_error_details_are_off_outside_development():
    """No exception text (which could quote chart data) reaches the browser from the shipped configuration."""
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["showErrorDetails"] in ("none", "type", False)
    assert cfg["server"]["address"] == "127.0.0.1"

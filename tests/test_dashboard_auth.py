"""Dashboard sign-in, roles and the access audit log under streamlit's AppTest (st.user seeded per test)."""

from __future__ import annotations

import html
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit import config  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "dashboard" / "app.py")
ANCHOR = datetime(2025, 1, 6, 7, 0, tzinfo=UTC)
W4B, W5A = "Location/ward-4b", "Location/ward-5a"
IDP = "https://login.example.org"
# Real OIDC ID-token claims as st.user shows them: the identity is iss + sub; e-mails are matched only if verified.
NURSE = {
    "is_logged_in": True,
    "iss": IDP,
    "sub": "u-nina",
    "email": "nina@example.org",
    "email_verified": True,
}
AUDITOR = {
    "is_logged_in": True,
    "iss": IDP,
    "sub": "u-audrey",
    "email": "audrey@example.org",
    "email_verified": True,
}
CHARGE = {
    "is_logged_in": True,
    "iss": IDP,
    "sub": "u-carl",
    "email": "carl@example.org",
    "email_verified": True,
    "nva_role": "charge-nurse",
}
NO_ROLE = {
    "is_logged_in": True,
    "iss": IDP,
    "sub": "u-x",
    "email": "stranger@example.org",
    "email_verified": True,
}
ROLES = f'''
[users."nina@example.org"]
role = "nurse"
wards = ["{W4B}"]

[users."audrey@example.org"]
role = "auditor"
'''


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from assistant.demo_ward import generate_demo_ward
    from connectors import open_source

    out = tmp_path_factory.mktemp("demo") / "demo-ward"
    generate_demo_ward(out, anchor=ANCHOR, seed=7)
    with open_source(out) as src:
        census = {w: [e.patient_id for e in src.ward_census(w)] for w in (W4B, W5A)}
        names = {pid: src.patient_chart(pid).patient.name for ids in census.values() for pid in ids}
    return {"dir": out, "census": census, "names": names}


@pytest.fixture
def address():
    """streamlit's server.address as the app reads it; loopback unless a test says otherwise."""
    old = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield lambda value: config.set_option("server.address", value)
    config.set_option("server.address", old)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, ward: dict, tmp_path: Path, address) -> Path:
    from dashboard import services

    roles = tmp_path / "roles.toml"
    roles.write_text(ROLES, encoding="utf-8")
    monkeypatch.setenv("NVA_SOURCE", str(ward["dir"]))
    monkeypatch.setenv("NVA_LLM_BACKEND", "none")
    monkeypatch.setenv("NVA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NVA_SECRETS_FILE", str(tmp_path / "no-secrets.toml"))
    monkeypatch.setenv("NVA_AUTH_ROLE_FILE", str(roles))
    monkeypatch.delenv("NVA_ACCESS_LOG", raising=False)
    monkeypatch.setattr(services, "auth_configured", lambda: False)
    return tmp_path / "data" / "access_log.sqlite"


@pytest.fixture
def signed_in(env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An identity provider is configured; each test seeds st.user through AppTest.user."""
    from dashboard import services

    monkeypatch.setattr(services, "auth_configured", lambda: True)
    return env


def _app(user: dict | None = None, patient: str | None = None, script: str = APP) -> AppTest:
    at = AppTest.from_file(script, default_timeout=60)
    if user is not None:
        at.user = dict(user)
    if patient:
        at.query_params["patient"] = patient
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _text(at: AppTest) -> str:
    return "\n".join(
        [m.value for m in at.markdown] + [e.value for e in at.error] + [i.value for i in at.info]
    )


def _rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return list(db.execute("SELECT user, role, action, target, detail FROM access_log ORDER BY seq"))


def test_demo_mode_is_bannered_on_loopback(env: Path, ward: dict) -> None:
    at = _app()
    assert "Local demo mode" in "\n".join(m.value for m in at.sidebar.markdown)
    at.switch_page("screens/audit.py").run()  # the demo shows every page
    assert not at.exception and "## Audit" in _text(at)


@pytest.mark.parametrize("where", ["0.0.0.0", None])
def test_demo_mode_refuses_a_non_loopback_address(env: Path, ward: dict, address, where: str | None) -> None:
    address(where)
    at = _app(patient=ward["census"][W4B][0])
    text = _text(at)
    assert "refuses to start in local demo mode" in text and "--server.address 127.0.0.1" in text
    assert not any(name in text for name in ward["names"].values())
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("screens/patient.py")


def test_sign_in_is_asked_before_anything(signed_in: Path, ward: dict) -> None:
    at = _app({"is_logged_in": False}, patient=ward["census"][W4B][0])
    assert "Sign in with your hospital account" in _text(at)
    assert not any(name in _text(at) for name in ward["names"].values())


def test_nurse_sees_her_ward_only_and_is_refused_another_wards_patient(signed_in: Path, ward: dict) -> None:
    at = _app(NURSE)
    assert at.selectbox(key="nva_ward").options == ["4B Med-Surg"]  # 5A Cardiology is not offered
    # The landing page is the ward census: one page link per patient of her ward (issue 15).
    labels = " | ".join(p.proto.label for p in at.get("page_link"))
    assert all(ward["names"][p] in labels for p in ward["census"][W4B])
    assert not any(ward["names"][p] in labels for p in ward["census"][W5A])
    assert "Signed in as **nina@example.org** · nurse" in "\n".join(c.value for c in at.sidebar.caption)

    other = ward["census"][W5A][0]
    at = _app(NURSE, patient=other)
    text = _text(at)
    assert f"Patient/{other} is not on a ward assigned to you" in text
    assert ward["names"][other] not in text
    rows = _rows(signed_in)
    assert (
        "nina@example.org",
        "nurse",
        "access-denied",
        f"Patient/{other}",
        "patient not on an assigned ward",
    ) in rows
    assert not [r for r in rows if r[2] == "view-chart"]


def test_views_are_logged_once_per_patient_without_chart_content(signed_in: Path, ward: dict) -> None:
    first, second = ward["census"][W4B][:2]
    at = _app(NURSE, patient=first)
    assert f"## {ward['names'][first]}" in _text(at)
    at.run()
    at.run()  # reruns of the same page are not new views
    at.selectbox(key="nva_patient").select(second).run()
    assert f"## {ward['names'][second]}" in _text(at)
    at.selectbox(key="nva_patient").select(first).run()
    rows = _rows(signed_in)
    views = [r[3] for r in rows if r[2] == "view-chart"]
    assert views == [f"Patient/{first}", f"Patient/{second}"]
    assert sorted(r[3] for r in rows if r[2] == "summary") == sorted(views)
    assert {r[:2] for r in rows} == {("nina@example.org", "nurse")}
    dump = (signed_in.read_bytes()).decode("utf-8", "replace")
    for name in ward["names"].values():
        assert name not in dump and name.split()[-1] not in " ".join(map(str, rows))


def test_a_view_that_cannot_be_logged_is_not_shown(
    signed_in: Path, ward: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = tmp_path / "not-a-file"
    blocked.mkdir()  # sqlite cannot open a directory
    monkeypatch.setenv("NVA_ACCESS_LOG", str(blocked))
    pid = ward["census"][W4B][0]
    at = _app(NURSE, patient=pid)
    text = _text(at)
    assert "Not shown: the access could not be recorded" in text
    assert ward["names"][pid] not in text


def test_auditor_gets_audit_and_access_log_pages_nurse_does_not(signed_in: Path, ward: dict) -> None:
    at = _app(NURSE)
    for page in ("screens/audit.py", "screens/access_log.py"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            at.switch_page(page)
    # Reached directly (a typed URL, a stale link), the page itself refuses and logs the refusal.
    direct = _app(NURSE, script=str(REPO / "dashboard" / "screens" / "audit.py"))
    assert "may not open the audit" in _text(direct) and not direct.button
    assert ("nina@example.org", "nurse", "access-denied", "page:audit", "page not allowed for role") in _rows(
        signed_in
    )

    at = _app(AUDITOR)
    assert at.selectbox(key="nva_ward").options == ["4B Med-Surg", "5A Cardiology"]
    at.switch_page("screens/audit.py").run()
    assert not at.exception and "## Audit" in _text(at)
    at.button(key="audit-start").click().run()
    assert not at.exception
    at.switch_page("screens/access_log.py").run()
    assert not at.exception and "## Access log" in _text(at)
    table = next(d.value for d in at.dataframe if "Action" in getattr(d.value, "columns", []))
    assert {"access-denied", "audit-run", "audit-view", "access-log-view"} <= set(table["Action"])
    at.multiselect(key="al-actions").select("access-denied").run()
    table = next(d.value for d in at.dataframe if "Action" in getattr(d.value, "columns", []))
    assert set(table["Action"]) == {"access-denied"} and set(table["User"]) == {"nina@example.org"}


def test_handoff_export_is_for_charge_nurses_and_logged(signed_in: Path, ward: dict) -> None:
    at = _app(NURSE)
    at.switch_page("screens/handoff.py").run()
    assert not at.exception and not [t for t in at.toggle if t.key == "handoff-print"]
    at = _app(CHARGE)
    at.switch_page("screens/handoff.py").run()
    at.toggle(key="handoff-print").set_value(True).run()
    assert not at.exception
    actions = [(r[0], r[2], r[3]) for r in _rows(signed_in)]
    assert ("carl@example.org", "handoff-view", W4B) in actions
    assert ("carl@example.org", "handoff-export", W4B) in actions
    assert ("nina@example.org", "handoff-view", W4B) in actions


def test_a_user_without_a_role_sees_only_the_no_role_page(signed_in: Path, ward: dict) -> None:
    at = _app(NO_ROLE, patient=ward["census"][W4B][0])
    text = _text(at)
    assert "You have no NVA role — ask your administrator" in text
    assert not any(name in text for name in ward["names"].values())
    assert not at.selectbox and not at.dataframe
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("screens/patient.py")
    assert _rows(signed_in) == [
        ("stranger@example.org", "none", "access-denied", "nva", "signed in without an NVA role")
    ]


# --- sign-in fails closed, claims checked, the access log's chain shown (issue 12.6, 12.7) ----------------------
from dashboard import services as _services  # noqa: E402

REAL_AUTH_CONFIGURED = _services.auth_configured  # the fixtures replace it; some tests need the real reading
AUTH_OK = """[auth]
redirect_uri = "http://127.0.0.1:8501/oauth2callback"
cookie_secret = "a-long-random-cookie-secret"
client_id = "nva"
client_secret = "x"
server_metadata_url = "https://login.example.org/.well-known/openid-configuration"
"""


@pytest.fixture
def secrets_files(monkeypatch: pytest.MonkeyPatch):
    """streamlit's secrets.files, pointed at a test file, and the real [auth] reading."""
    old = config.get_option("secrets.files")
    monkeypatch.setattr(_services, "auth_configured", REAL_AUTH_CONFIGURED)

    def use(path: Path) -> None:
        config.set_option("secrets.files", [str(path)])

    yield use
    config.set_option("secrets.files", old)


def _assert_closed(at: AppTest, ward: dict, needle: str) -> None:
    text = html.unescape(
        _text(at)
    )  # the configuration error is shown as inert text (punctuation as entities)
    assert "NVA cannot start" in text and needle in text, text
    assert not any(name in text for name in ward["names"].values())
    assert "Local demo mode" not in "\n".join(m.value for m in at.sidebar.markdown)
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("screens/patient.py")


def test_invalid_nva_secrets_file_stops_the_app_even_on_loopback(
    env: Path, ward: dict, tmp_path: Path, monkeypatch
):
    broken = tmp_path / "broken-secrets.toml"
    broken.write_text('NVA_SOURCE = "x"\n[auth\nclient_id = "nva"\n')
    monkeypatch.setenv("NVA_SECRETS_FILE", str(broken))
    _assert_closed(_app(patient=ward["census"][W4B][0]), ward, "not valid TOML")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (
            AUTH_OK.replace('client_id = "nva"', "client_id = nva"),
            "not valid TOML",
        ),  # syntax error inside [auth]
        ("[auth]\nclient_id = 'nva'\n", "lacks redirect_uri, cookie_secret"),
        ('auth = "yes"\n', "is not a [auth] table"),
    ],
)
def test_invalid_auth_section_is_not_demo_mode(
    env: Path, ward: dict, tmp_path: Path, secrets_files, content, needle
):
    path = tmp_path / "secrets.toml"
    path.write_text(content)
    secrets_files(path)
    _assert_closed(_app(patient=ward["census"][W4B][0]), ward, needle)


def test_valid_auth_section_asks_for_sign_in_and_no_auth_key_is_demo(
    env: Path, ward: dict, tmp_path, secrets_files
):
    path = tmp_path / "secrets.toml"
    path.write_text(AUTH_OK)
    secrets_files(path)
    assert "Sign in with your hospital account" in _text(_app({"is_logged_in": False}))
    path.write_text('NVA_LLM_BACKEND = "none"\n')  # a secrets file without any auth key at all
    assert "Local demo mode" in "\n".join(m.value for m in _app().sidebar.markdown)


@pytest.mark.parametrize(
    ("claims", "needle"),
    [
        ({**NURSE, "nva_role": "nurse", "nva_wards": True}, "list of ward references"),
        ({**NURSE, "nva_role": "nurse", "nva_wards": 5}, "list of ward references"),
        ({**NURSE, "nva_role": "nurse", "nva_wards": [W4B, 5]}, "list of ward references"),
        ({**NURSE, "nva_role": "nurse", "nva_wards": {"a": 1}}, "list of ward references"),
        ({**NURSE, "nva_role": ["auditor"]}, "must be one of"),
        ({**NURSE, "email_verified": False}, "no NVA role"),  # the role file needs a verified e-mail
        ({**NO_ROLE, "email_verified": False, "preferred_username": "audrey@example.org"}, "no NVA role"),
        ({key: v for key, v in NURSE.items() if key != "sub"}, "iss, sub"),
    ],
)
def test_bad_claims_get_the_no_role_page_and_are_logged(signed_in: Path, ward: dict, claims, needle) -> None:
    at = _app(claims, patient=ward["census"][W4B][0])
    text = _text(at)
    assert "You have no NVA role" in text and not at.exception
    assert not any(name in text for name in ward["names"].values())
    rows = _rows(signed_in)
    assert len(rows) == 1 and rows[0][1:4] == ("none", "access-denied", "nva")
    assert rows[0][0] != "audrey@example.org"  # an unverified name is never logged as another user


def test_access_log_page_shows_a_red_banner_when_the_chain_breaks(signed_in: Path, ward: dict) -> None:
    def page() -> AppTest:
        at = _app(AUDITOR)
        at.switch_page("screens/access_log.py").run()
        assert not at.exception
        return at

    def banner(at: AppTest) -> str:
        return "\n".join(html.unescape(e.value) for e in at.error if "integrity broken" in e.value)

    _app(NURSE, patient=ward["census"][W4B][0])
    assert banner(page()) == ""  # intact: no banner
    db = sqlite3.connect(signed_in)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute(
            "INSERT OR REPLACE INTO access_log (seq, at, user, role, action, target) "
            "VALUES (1, 'x', 'mallory', 'nurse', 'view-chart', 'Patient/x')"
        )
    db.execute("DROP TRIGGER access_log_no_update")
    db.execute("UPDATE access_log SET user = 'mallory' WHERE seq = 1")
    db.commit()
    text = banner(page())
    assert "row 1 was changed" in text and "append-only triggers are missing" in text
    db.execute("DROP TRIGGER IF EXISTS access_log_no_delete")
    db.execute("DELETE FROM access_log WHERE seq = 2")
    db.commit()
    db.close()
    assert "does not follow the row before it" in banner(page())
    signed_in.unlink()
    at = page()
    assert "is missing" in banner(at)


@pytest.mark.parametrize(
    "roles",
    [
        '[users."nina@example.org"\nrole = "nurse"\n',
        '[users."nina@example.org"]\nrole = "nurse"\nwards = 5\n',
    ],
)
def test_an_unreadable_role_file_lets_nobody_in(
    signed_in: Path, ward: dict, tmp_path: Path, monkeypatch, roles
) -> None:
    bad = tmp_path / "bad-roles.toml"
    bad.write_text(roles)
    monkeypatch.setenv("NVA_AUTH_ROLE_FILE", str(bad))
    at = _app(NURSE, patient=ward["census"][W4B][0])
    text = html.unescape(_text(at))
    assert "NVA cannot start" in text and "NVA_AUTH_ROLE_FILE" in text
    assert not any(name in text for name in ward["names"].values())

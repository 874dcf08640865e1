"""The dashboard in chromium (Playwright): census -> patient -> citation -> hold, handoff print/PDF, audit CSV."""

# Each step asserts what is on screen against what the core itself says about the demo ward.

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium, missing_requirements, screenshot, streamlit_server, wait_rendered

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(missing_requirements() is not None, reason=missing_requirements() or ""),
]
ANCHOR = datetime(2025, 1, 6, 7, 0, tzinfo=UTC)
WARD = "Location/ward-4b"
# Screenshots for the README when NVA_SCREENSHOT_DIR is set (e.g. docs/screenshots); a temp dir otherwise.
SHOTS = os.environ.get("NVA_SCREENSHOT_DIR")


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo ward and what the core says about it (views in acuity order), so assertions follow the core."""
    from assistant.demo_ward import generate_demo_ward
    from assistant.pipeline import patient_view
    from assistant.views import sort_by_acuity
    from connectors import open_source

    root = tmp_path_factory.mktemp("browser")
    demo = root / "demo-ward"
    generate_demo_ward(demo, anchor=ANCHOR, seed=7)
    with open_source(demo) as src:
        census = [e.patient_id for e in src.ward_census(WARD)]
        views = [patient_view(src.patient_chart(p), ANCHOR, patient_id=p) for p in census]
    return {"demo": demo, "root": root, "views": sort_by_acuity(views)}


@pytest.fixture(scope="module")
def app(ward: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    env = {
        "NVA_SOURCE": str(ward["demo"]),
        "NVA_DATA_DIR": str(ward["root"] / "data"),
        "NVA_LLM_BACKEND": "none",
        "NVA_SECRETS_FILE": str(ward["root"] / "none.toml"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    with streamlit_server(env) as base, chromium() as context:
        yield base, context


CENSUS_NAMES = """() => [...document.querySelectorAll('[class*="st-key-census-row-"]')]
  .filter(r => /st-key-census-row-\\d+$/.test([...r.classList].find(c => c.startsWith('st-key-')) || ''))
  .map(r => r.querySelector('[data-testid="stPageLink-NavLink"] [data-testid="stMarkdownContainer"]'))
  .map(m => m ? m.innerText.trim() : null)"""


def _shot(page: Any, name: str, **kw: Any) -> None:
    if SHOTS:
        path = screenshot(page, Path(SHOTS) / f"{name}.png", **kw)
        assert path.stat().st_size > 20_000, f"{name} screenshot looks blank"


def _text(page: Any) -> str:
    return page.evaluate("document.body.innerText")


def test_census_to_patient_to_citation_and_hold(app: tuple[str, Any], ward: dict[str, Any]) -> None:
    base, context = app
    views = ward["views"]
    page = context.new_page()
    page.goto(base)
    wait_rendered(page, ("Ward census", "New results", views[-1].chart.patient.name), timeout=180)
    text = _text(page)
    assert "Traceback" not in text
    # One row per patient in the core's acuity order: the first row is the core's sickest patient.
    names = [v.chart.patient.name for v in views]
    links = page.evaluate(CENSUS_NAMES)
    assert links == names
    first = views[0]
    row0 = page.locator(".st-key-census-row-0").inner_text()
    assert f"{first.news2_total} · " in row0 and first.header.news2.band_label.split(" ")[0] in row0
    if first.findings:
        assert f"{first.findings[0].severity.upper()}" in row0
    _shot(page, "census")

    # A patient with a dose due that a flag says not to give: the census marks it, the header marks it.
    held = next((v for v in views if any(d.hold for d in v.do_now)), None)
    assert held is not None, "the demo ward plants a due dose under a do-not-give flag"
    n = views.index(held)
    assert "HOLD — see flag" in page.locator(f".st-key-census-row-{n}").inner_text()
    # Keyboard: focus the patient's link and press Enter; the patient opens in the same tab and session.
    link = page.locator(f'.st-key-census-row-{n} [data-testid="stPageLink-NavLink"]').first
    link.focus()
    page.keyboard.press("Enter")
    name = held.chart.patient.name
    wait_rendered(page, (f"Flags ({len(held.findings)})", "What to do now", "Summary"), timeout=120)
    page.wait_for_function("(pid) => location.search.includes('patient=' + pid)", arg=held.patient_id)
    assert len(context.pages) == 1, "the patient opened in the same tab"
    header = _text(page)
    assert name in header and held.header.allergy_text in header
    assert f"NEWS2 {held.news2_total}" in header and (held.header.news2.response or "") in header
    dose = next(d for d in held.do_now if d.hold)
    assert "HOLD — see flag" in header and dose.label in header
    _shot(page, "patient")

    # A flag's citation, by keyboard: focus the first source button of the first flag and press Enter.
    ref = held.findings[0].evidence[0]
    button = (
        page.locator('[class*="st-key-flag-"] button').filter(has_text=_source_label(held.findings[0])).first
    )
    button.focus()
    page.keyboard.press("Enter")
    wait_rendered(page, (ref, "Show raw JSON"), timeout=60)
    assert page.locator('[role="dialog"]').count() == 1
    _shot(page, "patient-source", max_height=1000)
    page.keyboard.press("Escape")
    page.close()


def test_handoff_print_layout_and_pdf(app: tuple[str, Any], ward: dict[str, Any]) -> None:
    from pypdf import PdfReader

    base, context = app
    views = ward["views"]
    page = context.new_page()
    page.goto(f"{base}/handoff")
    wait_rendered(page, ("Ward handoff", "I — Illness severity", "Export PDF"), timeout=180)
    _shot(page, "handoff")
    page.get_by_text("Print-friendly layout").click()
    wait_rendered(page, ("Ward overview",), timeout=180)
    printed = _text(page)
    # The overview table comes first, then every patient's I-PASS, by name and bed.
    assert printed.index("Ward overview") < printed.index("I — Illness severity")
    for v in views:
        assert v.chart.patient.name in printed
    with page.expect_download() as dl:
        page.get_by_role("button", name="Export PDF").click()
    download = dl.value
    assert download.suggested_filename.startswith("handoff-") and download.suggested_filename.endswith(".pdf")
    data = Path(download.path()).read_bytes()
    pages = [p.extract_text() for p in PdfReader(io.BytesIO(data)).pages]
    first = " ".join(pages[0].split())
    assert "Ward handoff" in first and "Printed" in first and "judged at" in first
    # Page 1 is the overview: names and beds, not record ids.
    for v in views:  # the whole ward's overview fits page 1
        assert v.chart.patient.name in first
    assert "Patient/" not in first.split("Record ids:")[0]
    # One page per patient for the demo ward's (typical) patients.
    assert len(pages) <= 1 + len(views), len(pages)
    body = " ".join(" ".join(p.split()) for p in pages[1:])
    for v in views:
        assert v.chart.patient.name in body
        assert " ".join(v.header.allergy_text.split()) in body  # the app's allergy wording, word for word
    page.close()


def test_audit_filter_chart_and_csv(app: tuple[str, Any], ward: dict[str, Any]) -> None:
    base, context = app
    views = ward["views"]
    page = context.new_page()
    page.goto(f"{base}/audit")
    wait_rendered(page, ("Audit",), timeout=180)
    page.get_by_role("button", name="Audit 4B Med-Surg now").click()
    wait_rendered(page, ("Download CSV", "Patient evidence"), timeout=300)
    _shot(page, "audit")
    # Filter to one rule: the chart still draws and the count is that rule's.
    rule = next(f.rule_id for v in views for f in v.findings if not f.rule_id.startswith("news2"))
    page.locator('[data-testid="stMultiSelect"]').filter(has_text="Rule").locator("input").first.click()
    page.get_by_role("option", name=rule, exact=True).click()
    page.keyboard.press("Escape")
    expected = sum(1 for v in views for f in v.findings if f.rule_id == rule)
    # Wait for the filtered rerun itself (the page before it also says "Download CSV").
    page.wait_for_function(
        """(n) => { const m = document.querySelector('[data-testid="stMetric"]');
                   return !!m && m.innerText.trim().endsWith(String(n)); }""",
        arg=expected,
        timeout=120_000,
    )
    wait_rendered(page, ("Download CSV",), timeout=120)
    metric = page.locator('[data-testid="stMetric"]').first.inner_text()
    assert metric.split()[-1].isdigit() and int(metric.split()[-1]) >= 1
    charts = page.locator('[data-testid="stVegaLiteChart"]')
    assert charts.count() == 1 and charts.first.bounding_box()["height"] > 80
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download CSV").click()
    download = dl.value
    name = download.suggested_filename
    assert name.startswith("audit-") and name.endswith(".csv") and ".jsonl" not in name
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text(encoding="utf-8"))))
    assert rows and {r["rule_id"] for r in rows} == {rule}
    assert int(metric.split()[-1]) == len(rows), "the Findings metric counts what the CSV exports"
    flagged = {v.chart.patient.ref for v in views if any(f.rule_id == rule for f in v.findings)}
    assert {r["patient"] for r in rows} == flagged, "the audit finds the rule on the patients the core flags"
    by_ref = {v.chart.patient.ref: v for v in views}
    for r in rows:
        v = by_ref[r["patient"]]
        assert r["name"] == v.chart.patient.name and r["bed"] and r["ward_name"]
    page.close()


def test_status_page_renders(app: tuple[str, Any]) -> None:
    base, context = app
    page = context.new_page()
    page.goto(f"{base}/status")
    wait_rendered(page, ("Settings and status", "Guideline store"), timeout=180)
    assert "Traceback" not in _text(page)
    _shot(page, "status")
    page.close()


FOCUSED = """() => { const e = document.activeElement; if (!e || e === document.body) return null;
  return {tag: e.tagName, text: (e.innerText || e.getAttribute('aria-label') || '').slice(0, 80),
          toolbar: !!e.closest('[data-testid="stElementToolbar"]'),
          chart: !!e.closest('[data-testid="stVegaLiteChart"]'),
          flag: !!e.closest('[class*="st-key-flag-"]'),
          outline: getComputedStyle(e).outlineStyle + ' ' + getComputedStyle(e).outlineWidth}; }"""


def _source_label(finding: Any) -> str:
    """The words on a flag's first source button: what the record is (the evidence label), not its raw id."""
    from dashboard.render import source_name

    return source_name(finding.evidence[0], {v.ref: v.label for v in finding.values if v.ref})


def test_keyboard_reaches_citations_without_chart_toolbars(
    app: tuple[str, Any], ward: dict[str, Any]
) -> None:
    base, context = app
    view = next(v for v in ward["views"] if v.findings)
    page = context.new_page()
    page.goto(f"{base}/?patient={view.patient_id}")
    wait_rendered(page, (f"Flags ({len(view.findings)})", "Summary"), timeout=180)
    page.get_by_role(
        "tab", name="Vitals and NEWS2"
    ).click()  # charts on screen: their toolbars must not be stops
    wait_rendered(page, ("Vital signs and NEWS2",), timeout=60)
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    stops = []
    for _ in range(120):
        page.keyboard.press("Tab")
        stops.append(page.evaluate(FOCUSED))
    stops = [s for s in stops if s]
    assert stops, "nothing takes keyboard focus"
    assert not [s for s in stops if s["toolbar"]], "chart toolbars are Tab stops"
    cited = [s for s in stops if s["flag"] and s["tag"] == "BUTTON"]
    assert cited and any(_source_label(view.findings[0])[:40] in s["text"] for s in cited)
    # A visible focus ring on every stop (not the current-page highlight alone).
    assert all(s["outline"].startswith("solid") for s in cited), cited[:3]
    page.close()


def test_isolation_in_the_census_row_and_patient_header(
    app: tuple[str, Any], ward: dict[str, Any], tmp_path: Path
) -> None:
    """Issue 15.3: a demo patient on contact precautions shows it, in words beside the colour, cited Flag/<id>."""
    base, context = app
    views = ward["views"]
    isolated = next(v for v in views if v.header.isolation.status == "charted")
    none = next(v for v in views if v.header.isolation.status == "none")
    iso = isolated.header.isolation
    page = context.new_page()
    page.goto(base)
    wait_rendered(page, ("Ward census", isolated.chart.patient.name), timeout=180)
    n = views.index(isolated)
    assert iso.badge in page.locator(f".st-key-census-row-{n}").inner_text()
    assert "ISOLATION" not in page.locator(f".st-key-census-row-{views.index(none)}").inner_text()
    screenshot(page, Path(SHOTS or tmp_path) / "census-isolation.png", max_height=1400)
    page.goto(f"{base}/?patient={isolated.patient_id}")
    line = iso.lines[0]
    wait_rendered(page, (iso.badge, line.text, "What to do now"), timeout=180)
    header = _text(page)
    assert line.line in header and f"({iso.ref})" in header
    # The badge is drawn in colour, and its words say what it is (never colour alone).
    badge = page.get_by_text(iso.badge, exact=True).first
    assert badge.is_visible()
    screenshot(page, Path(SHOTS or tmp_path) / "patient-isolation.png", max_height=1400)
    page.goto(f"{base}/?patient={none.patient_id}")
    wait_rendered(page, ("Isolation:", "No isolation charted"), timeout=180)
    # The I-PASS handoff says it in the same words, first in the patient's summary.
    page.goto(f"{base}/handoff")
    wait_rendered(page, ("Ward handoff", "I — Illness severity"), timeout=180)
    page.get_by_text("Print-friendly layout").click()  # every patient's I-PASS drawn (not only the top three)
    wait_rendered(page, ("Ward overview", iso.text), timeout=180)
    printed = _text(page)
    assert iso.badge in printed and printed.index(iso.badge) < printed.index(iso.text)  # overview row first
    screenshot(page, Path(SHOTS or tmp_path) / "handoff-isolation.png", max_height=2400)
    page.close()


def test_retrospective_audit_drill_down_lists_doses_and_the_csv_names_patients(
    app: tuple[str, Any], ward: dict[str, Any]
) -> None:
    from datetime import timedelta

    from assistant.audit.report import episode_rows
    from assistant.pipeline import audit_patients
    from connectors import open_source

    base, context = app
    views = ward["views"]
    period = (ANCHOR - timedelta(hours=72), ANCHOR)  # the page's default period before the judged time
    with open_source(ward["demo"]) as src:
        ids = [e.patient_id for e in src.ward_census(WARD)]
        episodes = episode_rows(audit_patients(src, ids, ANCHOR, origin="test", period=period))
    by_ref = {v.chart.patient.ref: v for v in views}
    dosed = [e for e in episodes if e["doses"]]
    assert dosed, "the demo ward plants doses given while a contradiction held"
    target = max(dosed, key=lambda e: (len(e["doses"]), e["patient"]))["patient"]
    patient = by_ref[target]
    name, bed = patient.chart.patient.name, patient.header.bed

    def human(iso: str) -> str:
        return f"{datetime.fromisoformat(iso):%d %b %Y %H:%M} UTC"

    page = context.new_page()
    page.goto(f"{base}/audit")
    wait_rendered(page, ("Audit", "What to audit"), timeout=180)
    page.get_by_text("A past period (episodes)").click()
    wait_rendered(page, ("Period before the judged time", "Audit the period"), timeout=60)
    page.get_by_role("button", name="Audit the period").click()
    page.wait_for_function(
        """(n) => { const m = document.querySelector('[data-testid="stMetric"]');
                   return !!m && m.innerText.includes('Episodes') && m.innerText.trim().endsWith(String(n)); }""",
        arg=len(episodes),
        timeout=300_000,
    )
    wait_rendered(page, ("Download CSV", "Patient evidence"), timeout=120)

    # The drill-down picker names the patient by bed and name; the episodes show human times and every dose.
    picker = page.locator('[data-testid="stSelectbox"] input').last
    for _ in range(3):  # a click landing during the run's last repaint leaves the list closed: click again
        picker.click()
        try:
            page.get_by_role("option").first.wait_for(timeout=10_000)
            break
        except Exception:  # noqa: BLE001, S112 - Playwright's TimeoutError; retried
            continue
    options = page.get_by_role("option").all_inner_texts()
    assert any(o.startswith(f"{bed} · {name} · ") and target in o for o in options), options[:5]
    picker.fill(name)
    page.keyboard.press("Enter")
    wait_rendered(page, ("Held", "Doses given while it held"), timeout=120)
    text = _text(page)
    mine = [e for e in episodes if e["patient"] == target]
    assert text.count("Held ") >= len(mine)
    for e in mine:
        assert e["title"] in text and f"from {human(e['start'])}" in text
        if e["end"]:
            assert f"until {human(e['end'])}" in text
        for d in e["doses"]:
            assert f"{human(d['time'])} · {d['text']}" in text, d
            assert d["time"] not in text, "dose times are shown as human times, not ISO strings"
    assert "nan" not in text.split("Patient evidence", 1)[1].split(), "a missing end is blank, never 'nan'"

    # The CSV is named for the run and carries name and bed beside each episode.
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download CSV").click()
    download = dl.value
    fname = download.suggested_filename
    assert fname.startswith("audit-ward-4b-period-") and fname.endswith(".csv") and ".jsonl" not in fname
    rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text(encoding="utf-8"))))
    assert rows and list(rows[0])[:3] == ["name", "bed", "ward_name"]
    assert {"start", "end", "duration_hours", "doses_count"} <= set(rows[0])
    assert sorted((r["patient"], r["rule_id"], r["start"]) for r in rows) == sorted(
        (e["patient"], e["rule_id"], e["start"]) for e in episodes
    )
    for r in rows:
        v = by_ref[r["patient"]]
        assert (r["name"], r["bed"]) == (v.chart.patient.name, v.header.bed)
        assert r["ward_name"] == v.header.ward
    page.close()


APP_PAGES = ["Ward census", "Patient", "Ward handoff", "Audit", "Access log", "Settings and status"]
SIDEBAR_NAV = """() => [...document.querySelectorAll('[data-testid="stSidebarNav"] a')]
  .map(a => a.innerText.trim().split('\\n').pop().trim())"""


def _fresh_server_env(ward: dict[str, Any], tmp_path: Path, secrets: str = "") -> dict[str, str]:
    path = tmp_path / "secrets.toml"
    path.write_text(secrets, encoding="utf-8")
    return {
        "NVA_SOURCE": str(ward["demo"]),
        "NVA_DATA_DIR": str(tmp_path / "data"),
        "NVA_LLM_BACKEND": "none",
        "NVA_SECRETS_FILE": str(path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def test_a_page_url_opened_first_shows_the_app_navigation(
    app: tuple[str, Any], ward: dict[str, Any], tmp_path: Path
) -> None:
    """A fresh server's first session opened by a page URL gets the app's navigation and page (with a `pages/` folder
    Streamlit would run the page file alone and list the folder's file names); so do later sessions on other URLs."""
    browser = app[1].browser  # the module's chromium (one Playwright per thread), a new server and context
    with streamlit_server(_fresh_server_env(ward, tmp_path)) as base:
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.goto(f"{base}/audit")
        wait_rendered(page, ("What to audit", "Local demo mode"), timeout=240)
        assert page.url.startswith(f"{base}/audit")
        assert page.evaluate(SIDEBAR_NAV) == APP_PAGES
        for path, heading in (("access-log", "Access log"), ("status", "Settings and status")):
            other = context.new_page()
            other.goto(f"{base}/{path}")
            wait_rendered(other, (heading, "Local demo mode"), timeout=120)
            assert other.evaluate(SIDEBAR_NAV) == APP_PAGES, path
            other.close()
        context.close()


AUTH_SECRETS = """[auth]
redirect_uri = "http://127.0.0.1:8501/oauth2callback"
cookie_secret = "a-long-random-cookie-secret"
client_id = "nva"
client_secret = "x"
server_metadata_url = "https://login.example.org/.well-known/openid-configuration"
"""


def test_a_page_url_opened_first_still_asks_to_sign_in(
    app: tuple[str, Any], ward: dict[str, Any], tmp_path: Path
) -> None:
    """With sign-in configured, a fresh server's first session on /audit gets the sign-in page: no audit page, no
    page list, no patient."""
    browser = app[1].browser
    with streamlit_server(_fresh_server_env(ward, tmp_path, AUTH_SECRETS)) as base:
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.goto(f"{base}/audit")
        wait_rendered(page, ("Sign in with your hospital account",), timeout=240)
        text = _text(page)
        assert "What to audit" not in text and "Audit run" not in text
        assert page.evaluate(SIDEBAR_NAV) == []
        assert not any(v.chart.patient.name in text for v in ward["views"])
        context.close()

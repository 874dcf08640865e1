"""Isolation precautions end to end: FHIR Flag -> chart -> header, census, I-PASS, PDF, every connector (issue 15.3)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from assistant import pipeline, views
from assistant.demo_ward import generate_demo_ward
from assistant.normalize import build_chart
from assistant.summary.handoff import compose_handoff
from assistant.terminology import isolation_codes
from connectors.bulk_export import bulk_export
from connectors.bundle_dir import BundleDirSource
from connectors.ndjson_dir import NdjsonDirSource
from connectors.rest import RestFhirSource, RestOptions

SNOMED = "http://snomed.info/sct"
CONTACT = "409529001"  # SNOMED CT Contact precautions (fhir_codes.toml [isolation.codes])
DROPLET = "409525007"  # SNOMED CT Respiratory secretion (droplet) precautions
# A frozen clock, not UTC: 07:00 UTC on the test shift, seen from UTC-05:00.
NOW = datetime(2026, 3, 16, 7, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=-5)))
ANCHOR = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)


def _iso(hours_ago: float) -> str:
    return (NOW - timedelta(hours=hours_ago)).isoformat()


def patient() -> dict:
    return {"resourceType": "Patient", "id": "p1", "name": [{"family": "Test", "given": ["Iso"]}]}


def flag(fid: str, *, code: str | None = CONTACT, text: str | None = None, status="active", **period) -> dict:
    concept: dict = {}
    if code:
        display = {CONTACT: "Contact precautions", DROPLET: "Respiratory secretion precautions"}.get(code)
        concept["coding"] = [{"system": SNOMED, "code": code, **({"display": display} if display else {})}]
    if text:
        concept["text"] = text
    res = {"resourceType": "Flag", "id": fid, "subject": {"reference": "Patient/p1"}, "code": concept}
    if status is not None:
        res["status"] = status
    if period:
        res["period"] = {k: _iso(v) for k, v in period.items()}
    return res


def chart_of(*flags: dict, **kw):
    return build_chart([patient(), *flags], source="test", patient_id="p1", **kw)


# --- normalization ----------------------------------------------------------------------------------------


def test_only_current_isolation_flags_are_in_force() -> None:
    chart = chart_of(
        flag("active", text="Contact precautions — MRSA", start=30),
        flag("inactive", status="inactive", start=80, end=50),
        flag("expired", start=80, end=2),  # active status, but its period ended two hours ago
        flag("error", status="entered-in-error", start=10),
        flag("future", code=DROPLET, text="Droplet precautions from tomorrow", start=-20),
    )
    by_ref = {i.ref: i for i in chart.isolation}
    assert "Flag/error" not in by_ref  # entered in error: never true, not in the chart at all
    assert set(by_ref) == {"Flag/active", "Flag/inactive", "Flag/expired", "Flag/future"}
    assert [i.ref for i in chart.current_isolation(NOW)] == ["Flag/active"]
    active = by_ref["Flag/active"]
    assert (active.kind, active.kind_label, active.status) == ("contact", "Contact", "active")
    assert active.text == "Contact precautions — MRSA" and active.matched_by == "code"
    assert active.start == NOW - timedelta(hours=30) and active.end is None
    # The future flag comes into force when its period starts.
    assert "Flag/future" in {i.ref for i in chart.current_isolation(NOW + timedelta(hours=21))}
    assert "Flag/active" in chart.fact_refs() and chart.resources["Flag/active"]["id"] == "active"


def test_a_local_code_is_read_by_its_words_and_other_flags_are_not_isolation() -> None:
    local = flag("local", code=None, text="Protective isolation (neutropenic)", start=5)
    local["code"]["coding"] = [{"system": "http://hospital.example/flags", "code": "PI"}]
    chart = chart_of(
        local,
        flag("falls", code="129839007", text="Fall precautions", start=5),  # precautions, but not isolation
        flag("ic", code=None, text="Follow Infection Control Level 3 Protocol", start=5),
    )
    got = {i.ref: (i.kind, i.matched_by, i.text) for i in chart.current_isolation(NOW)}
    assert got == {
        "Flag/local": ("protective", "text", "Protective isolation (neutropenic)"),
        "Flag/ic": ("isolation", "text", "Follow Infection Control Level 3 Protocol"),
    }
    assert not chart.issues


def test_bad_shapes_become_issues_and_cost_nothing_else() -> None:
    bad_code = flag("bad-code")
    bad_code["code"] = "contact"  # not a CodeableConcept: whether it is isolation is unknown
    bad_period = flag("bad-period", text="Contact precautions", start=3)
    bad_period["period"]["end"] = "tomorrow"
    no_status = flag("no-status", code=DROPLET, text="Droplet precautions", status=None, start=3)
    list_status = flag("list-status", status=["active"], start=3)  # a wrong type costs only that field
    chart = chart_of(bad_code, bad_period, no_status, list_status)
    issues = {(i.source, i.code, i.severity) for i in chart.issues}
    assert ("Flag/bad-code", "invalid-resource", "error") in issues
    assert ("Flag/bad-period", "invalid-resource", "error") in issues
    assert ("Flag/no-status", "flag-status-unknown", "warning") in issues
    current = {i.ref: i for i in chart.current_isolation(NOW)}
    # An unreadable end keeps the flag shown (the issue says why); a missing status is shown, not hidden.
    assert set(current) == {"Flag/bad-period", "Flag/no-status", "Flag/list-status"}
    assert ("Flag/list-status", "invalid-resource", "error") in issues
    assert current["Flag/no-status"].status == "unknown"
    assert chart.patient.name == "Iso Test"
    iso = views.isolation_status(chart, NOW)
    assert iso.status == "charted" and "Flag/bad-code" in iso.text  # the unreadable one is named, not dropped
    assert "status not recorded" in iso.text


def test_codes_and_phrases_are_data_with_sources() -> None:
    codes = isolation_codes()
    assert codes.codes[CONTACT][0] == "contact" and codes.codes[DROPLET][0] == "droplet"
    assert "409522005" not in codes.codes  # standard precautions are for everyone: not isolation
    assert codes.by_text("fall precautions") is None and codes.by_text("Strict ISOLATION") is not None
    toml = (Path(__file__).resolve().parent.parent / "assistant" / "data" / "fhir_codes.toml").read_text()
    section = toml.split("[isolation]", 1)[1]
    assert (
        "hl7.org/fhir/R4/flag.html" in section
        and "hl7.org/fhir/uv/saner/ValueSet/IsolationPrecautions" in section
    )


# --- header: charted, none charted, not retrieved -----------------------------------------------------------


def test_header_distinguishes_charted_none_and_not_retrieved() -> None:
    charted = views.isolation_status(chart_of(flag("f1", text="Contact precautions — MRSA", start=30)), NOW)
    assert charted.status == "charted" and charted.refs == ("Flag/f1",)
    assert charted.text.startswith("ISOLATION: Contact precautions — MRSA (since ")
    assert charted.badge == "ISOLATION · Contact"
    none = views.isolation_status(chart_of(flag("old", status="inactive", start=80, end=50)), NOW)
    assert (none.status, none.text, none.badge) == ("none", views.ISOLATION_NONE_TEXT, "")
    missing = chart_of()
    missing.missing_types = {"Flag": "not served by the server (absent from its CapabilityStatement)"}
    gone = views.isolation_status(missing, NOW)
    assert gone.status == "not-retrieved" and "not served by the server" in gone.text
    assert "no isolation" not in gone.text.lower() and gone.badge == "ISOLATION NOT RETRIEVED"
    unknown = chart_of()
    unknown.missing_types = {"*": "the bulk export did not finish"}
    assert views.isolation_status(unknown, NOW).status == "not-retrieved"
    other = chart_of()
    other.missing_types = {"MedicationAdministration": "not served"}  # another type: isolation is still known
    assert views.isolation_status(other, NOW).status == "none"
    unreadable = chart_of({"resourceType": "Flag", "id": "x", "subject": {"reference": "Patient/p1"}})
    assert views.isolation_status(unreadable, NOW).status == "not-retrieved"


def test_view_header_and_census_row_carry_isolation() -> None:
    chart = chart_of(flag("f1", text="Contact precautions — C. difficile", start=30))
    view = pipeline.patient_view(chart, NOW)
    assert view.header is not None and view.header.isolation.refs == ("Flag/f1",)
    row = views.census_row(view)
    assert row.isolation is not None and row.isolation.badge == "ISOLATION · Contact"


# --- I-PASS and PDF -----------------------------------------------------------------------------------------


def test_handoff_patient_summary_leads_with_isolation_cited() -> None:
    chart = chart_of(flag("f1", text="Contact precautions — MRSA", start=30))
    entry = compose_handoff(chart, [], now=NOW)
    first = entry.sections["patient"][0]
    assert first.text.startswith("ISOLATION: Contact precautions — MRSA") and first.citations == ("Flag/f1",)
    missing = chart_of()
    missing.missing_types = {"Flag": "flags (isolation) could not be loaded (FhirTemporaryError)"}
    first = compose_handoff(missing, [], now=NOW).sections["patient"][0]
    assert first.text.startswith("Isolation not retrieved") and not first.citations
    none = compose_handoff(chart_of(), [], now=NOW).sections["patient"]
    assert not any("solation" in s.text for s in none)


@pytest.fixture(scope="module")
def ward(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("iso-ward")
    manifest = generate_demo_ward(out, anchor=ANCHOR, seed=7)
    return out, manifest.scenario_patients


def test_demo_ward_charts_isolation_consistent_with_conditions(ward) -> None:
    out, keys = ward
    src = BundleDirSource(out)
    got = {}
    for key in ("p11", "u2", "p05", "p01"):
        chart = src.patient_chart(keys[key])
        got[key] = views.isolation_status(chart, NOW)
    assert got["p11"].lines[0].text == "Contact precautions — MRSA"  # sepsis due to MRSA cellulitis
    assert got["u2"].lines[0].text == "Contact precautions — C. difficile"  # diarrhoea on fidaxomicin
    # Droplet precautions were charted for the pneumonia and lifted once the viral PCR was negative.
    p05 = src.patient_chart(keys["p05"])
    assert p05.isolation and p05.isolation[0].status == "inactive" and got["p05"].status == "none"
    assert got["p01"].status == "none"


def test_pdf_prints_the_header_isolation_with_its_flag_source(ward) -> None:
    from pypdf import PdfReader

    from dashboard import pdf, services

    out, keys = ward
    src = BundleDirSource(out)
    rows = []
    for key in ("p11", "p01"):
        view = pipeline.patient_view(src.patient_chart(keys[key]), NOW)
        rows.append(services.HandoffRow(view, None, "", []))
    data = pdf.ward_handoff_pdf("4B Med-Surg", rows, NOW)
    pages = [" ".join(p.extract_text().split()) for p in PdfReader(io.BytesIO(data)).pages]
    text = " ".join(pages)
    iso = rows[0].view.header.isolation
    assert "ISOLATION: Contact precautions" in text and "MRSA" in text
    assert "ISOLATION · Contact" in pages[0]  # the overview table says it too
    assert f"[1] {iso.ref}" in text  # the Flag id is the page's first source
    assert "judged at 16 Mar 2026 07:00 UTC" in pages[0]  # the non-UTC clock is printed in UTC
    p01 = rows[1].view.chart.patient.name
    assert not any("ISOLATION" in page for page in pages[1:] if p01 in page)  # none charted: nothing printed


# --- connectors ---------------------------------------------------------------------------------------------


def _rest(url: str) -> RestFhirSource:
    return RestFhirSource(
        url, options=RestOptions(retries=1, read_timeout=5, backoff_base=0.01), sleep=lambda s: None
    )


def test_rest_fetches_flags_from_the_server(ward, fhir_server_factory) -> None:
    out, keys = ward
    server = fhir_server_factory(out, everything=False)
    caps = [r["type"] for r in server.capability_statement("x")["rest"][0]["resource"]]
    assert "Flag" in caps
    chart = _rest(server.base_url).patient_chart(keys["p11"])
    assert any(r.path.endswith("/Flag") for r in server.requests)
    assert views.isolation_status(chart, NOW).lines[0].text == "Contact precautions — MRSA"
    assert not chart.missing_types


def test_flag_refused_by_the_server_reads_not_retrieved(ward, fhir_server_factory) -> None:
    out, keys = ward
    server = fhir_server_factory(out, everything=False, unserved_types={"Flag"})
    source = _rest(server.base_url)
    chart = source.patient_chart(keys["p11"])
    assert "Flag" in chart.missing_types and not any("/Flag" in r.path for r in server.requests)
    view = pipeline.patient_view(chart, NOW)
    iso = view.header.isolation
    assert iso.status == "not-retrieved" and iso.text.startswith("Isolation not retrieved")
    assert views.census_row(view).isolation.badge == "ISOLATION NOT RETRIEVED"


def test_isolation_not_retrieved_alone_keeps_the_acuity_order(ward, fhir_server_factory) -> None:
    out, keys = ward
    flagless = fhir_server_factory(out, everything=False, unserved_types={"Flag"})
    no_mar = fhir_server_factory(out, everything=False, unserved_types={"Flag", "MedicationAdministration"})
    pid = keys["p05"]  # INR 4.8 on warfarin: a high flag
    full = pipeline.patient_view(BundleDirSource(out).patient_chart(pid), NOW)
    without_flag = pipeline.patient_view(_rest(flagless.base_url).patient_chart(pid), NOW)
    without_mar = pipeline.patient_view(_rest(no_mar.base_url).patient_chart(pid), NOW)
    # The banner still says Flag was not loaded, and the header says isolation was not retrieved ...
    assert without_flag.quality.incomplete and "Flag" in without_flag.quality.banner
    assert without_flag.header.isolation.status == "not-retrieved"
    # ... but no flag or NEWS2 rests on Flag: the patient keeps its place; a missing MAR still goes first.
    assert without_flag.acuity.tier == full.acuity.tier != 0
    assert without_mar.acuity.tier == 0


def test_a_failed_flag_search_reads_not_retrieved(ward, fhir_server_factory) -> None:
    out, keys = ward
    server = fhir_server_factory(out, everything=False)
    server.faults.add("status", path=r"/Flag(\?|$)", status=503)  # the search, with its query
    chart = _rest(server.base_url).patient_chart(keys["p11"])
    assert "Flag" in chart.missing_types
    assert views.isolation_status(chart, NOW).status == "not-retrieved"


def test_bulk_export_and_ndjson_carry_flags(ward, fhir_server_factory, tmp_path) -> None:
    out, keys = ward
    server = fhir_server_factory(out, export_polls=0)
    export = bulk_export(_rest(server.base_url), tmp_path / "export")
    assert (export / "Flag.ndjson").is_file() or any("Flag" in p.name for p in export.iterdir())
    chart = NdjsonDirSource(export).patient_chart(keys["u2"])
    assert views.isolation_status(chart, NOW).lines[0].text == "Contact precautions — C. difficile"
    refused = fhir_server_factory(out, export_polls=0, unserved_types={"Flag"})
    export2 = bulk_export(_rest(refused.base_url), tmp_path / "export2")
    chart2 = NdjsonDirSource(export2).patient_chart(keys["u2"])
    assert "Flag" in chart2.missing_types and views.isolation_status(chart2, NOW).status == "not-retrieved"


# --- dashboard ----------------------------------------------------------------------------------------------


@pytest.fixture
def local_app(monkeypatch, tmp_path):
    """The dashboard in local demo mode on a source the test names (AppTest, loopback only)."""
    pytest.importorskip("streamlit")
    from streamlit import config

    from dashboard import services

    monkeypatch.setattr(services, "auth_configured", lambda: False)
    old_address = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    for name, value in {
        "NVA_LLM_BACKEND": "none",
        "NVA_DATA_DIR": str(tmp_path / "data"),
        "NVA_SECRETS_FILE": str(tmp_path / "no-secrets.toml"),
    }.items():
        monkeypatch.setenv(name, value)

    def open_patient(source: str, patient_id: str):
        from streamlit.testing.v1 import AppTest

        monkeypatch.setenv("NVA_SOURCE", source)
        at = AppTest.from_file(
            str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py"), default_timeout=90
        )
        at.query_params["patient"] = patient_id
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    yield open_patient
    config.set_option("server.address", old_address)


def test_patient_page_says_isolation_not_retrieved_when_the_server_refuses_flag(
    ward, local_app, fhir_server_factory
) -> None:
    out, keys = ward
    server = fhir_server_factory(out, everything=False, unserved_types={"Flag"})
    at = local_app(server.base_url, keys["u2"])
    html = "\n".join(h.value for h in at.get("html"))
    line = next(m for m in html.splitlines() if "nva-isolation" in m)
    assert 'class="nva-isolation unknown"' in line and "ISOLATION NOT RETRIEVED" in line
    assert "Isolation not retrieved" in line and "No isolation charted" not in html


def test_patient_page_shows_isolation_in_the_header(ward, local_app) -> None:
    out, keys = ward
    at = local_app(str(out), keys["u2"])
    html = "\n".join(h.value for h in at.get("html"))
    line = next(m for m in html.splitlines() if "nva-isolation" in m)
    iso = views.isolation_status(BundleDirSource(out).patient_chart(keys["u2"]), NOW)
    assert 'class="nva-isolation"' in line and f"<strong>{iso.badge}</strong>" in line
    assert "Contact precautions — C. difficile (since " in line and f"({iso.ref})" in line
    at = local_app(str(out), keys["p01"])
    text = "\n".join(m.value for m in at.markdown)
    assert "**Isolation:** :gray[No isolation charted]" in text


def test_nva_census_text_names_isolation(ward) -> None:
    from assistant.cli import main

    out_dir, keys = ward
    out = io.StringIO()
    assert main(["census", str(out_dir), "--ward", "4B Med-Surg", "--now", NOW.isoformat()], out=out) == 0
    text = out.getvalue()
    chart = BundleDirSource(out_dir).patient_chart(keys["p11"])
    block = text.split(chart.patient_ref, 1)[1].split("\nbed ", 1)[0]
    iso = views.isolation_status(chart, NOW)
    assert f"{iso.text}  ({iso.ref})" in block
    src = BundleDirSource(out_dir)
    charted = [
        e.patient_id
        for e in src.ward_census("Location/ward-4b")
        if views.isolation_status(src.patient_chart(e.patient_id), NOW).status == "charted"
    ]
    assert len(charted) >= 2 and text.count("ISOLATION: ") == len(charted)  # none charted prints nothing


def test_since_last_shift_says_isolation_started_and_lifted() -> None:
    chart = chart_of(
        flag("new", text="Contact precautions — MRSA", start=3),  # started inside the last 12 h
        flag("old", text="Contact precautions — C. difficile", start=40),  # started before: not news
        flag("lifted", code=DROPLET, text="Droplet — influenza", status="inactive", start=30, end=5),
        flag("future", code=DROPLET, text="Droplet from tomorrow", start=-20),  # not in force: not "started"
    )
    delta = views.patient_delta(chart, NOW, NOW - timedelta(hours=12))
    got = {(i.kind, i.refs) for i in delta.items if i.kind.startswith("isolation")}
    assert got == {("isolation-started", ("Flag/new",)), ("isolation-lifted", ("Flag/lifted",))}
    texts = [i.text for i in delta.items if i.kind.startswith("isolation")]
    assert "Isolation started: Contact — Contact precautions — MRSA" in texts
    assert any(t.startswith("Isolation lifted: ") and "influenza" in t for t in texts)
    # a shorter look-back no longer reaches the lift 5 h ago
    short = views.patient_delta(chart, NOW, NOW - timedelta(hours=4))
    assert {i.kind for i in short.items if i.kind.startswith("isolation")} == {"isolation-started"}

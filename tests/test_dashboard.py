"""Dashboard pages under streamlit's AppTest on the demo ward: render, citations, banners, handoff, audit, status."""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "dashboard" / "app.py")
ANCHOR = datetime(2025, 1, 6, 7, 0, tzinfo=UTC)
WARD = "Location/ward-4b"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from assistant.demo_ward import generate_demo_ward

    out = tmp_path_factory.mktemp("demo") / "demo-ward"
    generate_demo_ward(out, anchor=ANCHOR, seed=7)
    return out


@pytest.fixture(scope="module")
def ward_facts(demo: Path) -> dict:
    """What the core says about the demo ward, so assertions follow the core rather than hard-coded ids."""
    from assistant.rules.engine import evaluate
    from connectors import open_source

    with open_source(demo) as src:
        census = [e.patient_id for e in src.ward_census(WARD)]
        charts = {pid: src.patient_chart(pid) for pid in census}
    findings = {pid: evaluate(c, now=ANCHOR) for pid, c in charts.items()}
    flagged = max(census, key=lambda p: (sum(f.severity == "high" for f in findings[p]), len(findings[p]), p))
    # What the screens flag: the catalogue's findings plus the NEWS2 escalation flags (assistant.pipeline).
    from assistant.pipeline import findings_for

    flags = {pid: findings_for(c, ANCHOR) for pid, c in charts.items()}
    return {"census": census, "charts": charts, "findings": findings, "flags": flags, "flagged": flagged}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, demo: Path, tmp_path: Path) -> Iterator[Path]:
    from streamlit import config

    from dashboard import services

    # Local demo mode whatever the checkout's secrets.toml or config.toml say: no provider, loopback address.
    monkeypatch.setattr(services, "auth_configured", lambda: False)
    old_address = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    monkeypatch.setenv("NVA_SOURCE", str(demo))
    monkeypatch.setenv("NVA_LLM_BACKEND", "none")
    monkeypatch.setenv("NVA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NVA_SECRETS_FILE", str(tmp_path / "no-secrets.toml"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield demo
    config.set_option("server.address", old_address)


def _app(patient: str | None = None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    if patient:
        at.query_params["patient"] = patient
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _md(at: AppTest) -> str:
    # Markdown and st.html blocks (app-written HTML around escaped chart text, issue 12).
    return "\n".join([m.value for m in at.markdown] + [h.value for h in at.get("html")])


def test_patient_view_shows_header_flags_labs_and_cited_summary(env: Path, ward_facts: dict) -> None:
    pid = ward_facts["flagged"]
    chart = ward_facts["charts"][pid]
    findings = ward_facts["flags"][pid]
    at = _app(patient=pid)
    text = _md(at)
    assert f"## {chart.patient.name}" in text
    assert "nva-allergy" in text  # the allergy banner is always drawn: allergies, NKA or "not recorded"
    assert f"### Flags ({len(findings)})" in text
    assert findings[0].title in text and ":red-badge[HIGH]" in text
    assert findings[0].action[:40] in text
    # Labs: latest values with abnormal rows highlighted, the full history table, and trend charts.
    assert "### Labs" in text and 'class="nva-labs"' in text and '<tr class="abn">' in text
    labs = [d.value for d in at.dataframe if "Test" in getattr(d.value, "columns", [])]
    assert labs and len(labs[0]) > 0
    assert at.multiselect(key=f"trend-{pid}").value, "abnormal analytes are trended by default"
    # The summary: template sentences with numbered citations, composed without an LLM.
    assert "### Summary" in text and ":gray[&#91;1&#93;" in text
    assert any("Composed by template" in c.value for c in at.caption)
    assert any(c.value.startswith("Data as of") for c in at.caption)
    assert not at.error


def test_vitals_and_medication_tabs_render_on_demand(env: Path, ward_facts: dict) -> None:
    pid = ward_facts["flagged"]
    at = _app(patient=pid)
    assert "### Vital signs and NEWS2" not in _md(at)  # lazy tabs: hidden charts are not drawn at first paint
    at.session_state["nva_tab"] = "Vitals and NEWS2"
    at.run()
    assert not at.exception
    assert "### Vital signs and NEWS2" in _md(at)
    assert any(m.label == "NEWS2" for m in at.metric)
    at.session_state["nva_tab"] = "Medications and MAR"
    at.run()
    assert not at.exception
    text = _md(at)
    assert "### Active medications" in text and "**MAR timeline**" in text
    at.session_state["nva_tab"] = "Nursing notes"
    at.run()
    assert "### Recent nursing notes" in _md(at)


def test_patient_picker_sets_the_url(env: Path, ward_facts: dict) -> None:
    at = _app()
    # The landing page is the ward census (issue 15): every patient as a link to the patient view.
    links = " | ".join(p.proto.label for p in at.get("page_link"))
    assert all(ward_facts["charts"][p].patient.name in links for p in ward_facts["census"])
    at.switch_page("screens/patient.py").run()
    assert "Choose a patient" in " ".join(i.value for i in at.info)
    picker = at.selectbox(key="nva_patient")
    names = [ward_facts["charts"][p].patient.name for p in ward_facts["census"]]
    assert all(any(n in picker.format_func(o) for o in picker.options) for n in names)
    target = ward_facts["census"][0]
    picker.select(target).run()
    assert not at.exception
    assert at.query_params["patient"] == [target] or at.query_params["patient"] == target
    assert f"## {ward_facts['charts'][target].patient.name}" in _md(at)


def test_citation_opens_its_source_readably_and_as_raw_json(env: Path, ward_facts: dict) -> None:
    pid = ward_facts["flagged"]
    at = _app(patient=pid)
    cite = next(b for b in at.button if str(b.key).startswith("cite-"))
    ref = html.unescape(cite.help)  # the button says what the record is; its tooltip is the full reference
    assert "/" in ref and (cite.label != ref or len(ref.split("/", 1)[1]) <= 9)
    cite.click().run()
    assert not at.exception
    assert f"#### {ref}" in _md(at)
    assert at.table, "the source is rendered as a readable field/value table"
    at.toggle(key=f"raw-{ref}").set_value(True).run()
    raw = json.loads(at.code[0].value)
    assert f"{raw['resourceType']}/{raw['id']}" == ref


def test_unknown_patient_shows_an_error_banner(env: Path) -> None:
    at = _app(patient="no-such-patient")
    assert any("could not be loaded" in e.value and "no-such-patient" in e.value for e in at.error)


def test_corrupted_source_file_shows_a_banner(
    env: Path, ward_facts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken-ward"
    shutil.copytree(env, broken)
    victim, keep = ward_facts["census"][0], ward_facts["census"][1]
    files = [p for p in broken.glob("*.json") if victim in p.read_text(encoding="utf-8")[:4000]]
    assert files
    files[0].write_text('{"resourceType": "Bundle", "entry": [', encoding="utf-8")
    monkeypatch.setenv("NVA_SOURCE", str(broken))
    at = _app(patient=keep)
    banners = [e.value for e in at.error]
    assert any("could not be read" in b and files[0].name in b for b in banners), banners
    assert f"## {ward_facts['charts'][keep].patient.name}" in _md(at)  # the rest of the ward still shows


def test_chart_error_issue_shows_which_part_failed(
    env: Path, ward_facts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    damaged = tmp_path / "damaged-ward"
    shutil.copytree(env, damaged)
    pid = ward_facts["census"][0]
    path = next(p for p in damaged.glob("*.json") if pid in p.read_text(encoding="utf-8")[:4000])
    bundle = json.loads(path.read_text(encoding="utf-8"))
    bundle["entry"].append(
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "subject": {"reference": f"Patient/{pid}"},
            }
        }
    )
    path.write_text(json.dumps(bundle), encoding="utf-8")
    monkeypatch.setenv("NVA_SOURCE", str(damaged))
    at = _app(patient=pid)
    banners = [e.value for e in at.error]
    assert any("Part of this chart could not be loaded" in b and "has no id" in b for b in banners), banners


def test_handoff_lists_the_ward_by_acuity_with_ipass(env: Path, ward_facts: dict) -> None:
    at = _app(page="screens/handoff.py")
    table = next(d.value for d in at.dataframe if "NEWS2" in getattr(d.value, "columns", []))
    assert len(table) == len(ward_facts["census"])
    assert set(table["Patient"]) == {c.patient.name for c in ward_facts["charts"].values()}
    levels = {"unstable": 0, "watcher": 1, "stable": 2}
    ranks = [levels.get(x, 3) for x in table["Severity"]]
    assert ranks == sorted(ranks) or table["NEWS2"].iloc[0] == table["NEWS2"].max()
    text = _md(at)
    for heading in (
        "I — Illness severity",
        "P — Patient summary",
        "A — Action list",
        "S — Situation awareness",
    ):
        assert heading in text
    assert at.get("download_button")
    at.toggle(key="handoff-print").set_value(True).run()
    assert not at.exception
    assert not [d for d in at.dataframe if "NEWS2" in getattr(d.value, "columns", [])]
    assert _md(at).count("I — Illness severity") == len(ward_facts["census"])


def test_handoff_pdf_has_every_patient(env: Path, ward_facts: dict) -> None:
    import io

    from pypdf import PdfReader

    from dashboard import pdf, services

    rows = []
    for pid, chart in ward_facts["charts"].items():
        view = services.PatientView(pid, chart, findings=ward_facts["findings"][pid], now=ANCHOR)
        rows.append(services.HandoffRow(view, None, "", services.pending_items(view)))
    data = pdf.ward_handoff_pdf("4B Med-Surg", rows, ANCHOR)
    assert data.startswith(b"%PDF")
    pages = [" ".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(data)).pages]
    text = " ".join(pages)
    for chart in ward_facts["charts"].values():
        assert chart.patient.name in text
        assert chart.patient.name in pages[0]  # the overview of the whole ward is page 1 (issue 15.7)
    assert len(pages) <= 1 + len(rows)  # then at most one page per (typical) patient


def test_audit_run_filters_drill_down_and_csv(env: Path, ward_facts: dict) -> None:
    at = _app(page="screens/audit.py")
    assert any("No audit run yet" in i.value for i in at.info)
    at.button(key="audit-start").click().run()
    assert not at.exception
    total = sum(len(f) for f in ward_facts["findings"].values())
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Findings"] == str(total)
    at.multiselect(key="audit-sev").select("high").run()
    highs = sum(f.severity == "high" for fs in ward_facts["findings"].values() for f in fs)
    assert {m.label: m.value for m in at.metric}["Findings"] == str(highs)
    at.selectbox(key="audit-patient").select_index(0).run()
    assert not at.exception
    assert "Suggested nursing action" in _md(at)
    assert at.get("download_button")


def test_audit_csv_and_jsonl_reader() -> None:
    from dashboard import services

    lines = [
        json.dumps(
            {
                "patient": "Patient/a",
                "ward": "4B",
                "rule_id": "r1",
                "severity": "high",
                "title": "T",
                "message": "M",
                "evidence": ["Observation/1"],
                "values": [{"label": "K", "ref": "Observation/1", "value": "6 mmol/L", "time": None}],
            }
        ),
        "not json",
        "",
    ]
    rows, bad = services.read_audit_jsonl(lines)
    assert bad == 1 and rows[0]["patient"] == "Patient/a"
    csv_text = services.audit_csv(rows).decode()
    assert csv_text.splitlines()[0].startswith("patient,ward,rule_id")
    assert "K=6 mmol/L@ [Observation/1]" in csv_text


def test_status_page_reports_source_llm_store_and_now(env: Path) -> None:
    at = _app(page="screens/status.py")
    text = _md(at)
    assert str(env) in text and "demo ward anchor" in text and ANCHOR.strftime("%Y-%m-%d %H:%M") in text
    assert "Backend **none**" in text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Health"] == "OK" and metrics["Patients"] == str(len(list(env.glob("*.json"))) - 3)
    assert "Documents" in metrics and "Chunks" in metrics


def test_patient_data_is_never_cached_across_sessions() -> None:
    """Charts live in st.session_state only; st.cache_data is not used and cached resources take no chart."""
    import inspect

    from dashboard import services

    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "dashboard").rglob("*.py"))
    assert "cache_data" not in source
    for name in ("llm_backend", "guideline_store", "guideline_retriever"):
        fn = getattr(services, name)
        params = inspect.signature(fn).parameters
        assert not any("chart" in p or "patient" in p for p in params)


def test_rules_now_is_the_demo_anchor_or_wall_clock(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dashboard import services

    cfg = services.app_config()
    assert cfg.is_demo and cfg.rules_now() == ANCHOR
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("NVA_SOURCE", str(plain))
    cfg = services.app_config()
    assert not cfg.is_demo and abs((cfg.rules_now() - datetime.now(UTC)).total_seconds()) < 60


def test_demo_ward_is_generated_on_first_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dashboard import services

    monkeypatch.delenv("NVA_SOURCE", raising=False)
    monkeypatch.setenv("NVA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NVA_SECRETS_FILE", str(tmp_path / "none.toml"))
    cfg = services.app_config()
    assert cfg.setup_error is None and cfg.is_demo
    assert (tmp_path / "demo-ward" / "ward.json").is_file()
    assert cfg.anchor is not None and cfg.anchor.hour == 7


def test_mar_marks_given_due_and_late(ward_facts: dict) -> None:
    from dashboard import services

    states = set()
    for chart in ward_facts["charts"].values():
        for e in services.mar_events(chart, ANCHOR):
            states.add(e.state)
            if e.state in ("given", "held"):
                assert e.ref and e.ref.startswith("MedicationAdministration/")
            if e.state == "late":
                assert e.time < ANCHOR
    assert {"given", "due"} <= states


def test_audit_page_shows_an_incomplete_retrospective_run_with_its_episodes(env: Path) -> None:
    """A real `nva audit --period` against a server that serves no MedicationAdministration: the page says the run
    is incomplete (and what was not judged) and lists episodes with their duration."""
    import io
    import os

    from assistant.audit.report import read_findings, read_status
    from assistant.cli import main
    from tests import fhir_test_server as server_mod

    out = Path(os.environ["NVA_DATA_DIR"]) / "audit" / "audit-period.jsonl"
    out.parent.mkdir(parents=True)
    with server_mod.FhirTestServer(
        env, export_polls=1, export_retry_after=0, unserved_types=["MedicationAdministration"]
    ) as server:
        rc = main(
            ["audit", server.base_url, "--period", "/", "--out", str(out), "--no-progress"], out=io.StringIO()
        )
    assert rc == 3
    status = read_status(out)
    episodes = read_findings(out)
    assert status is not None and "MedicationAdministration" in status["missing_types"] and episodes
    at = _app(page="screens/audit.py")
    banners = " ".join(e.value for e in at.error)
    assert "INCOMPLETE AUDIT" in banners and "MedicationAdministration" in banners
    assert {m.label: m.value for m in at.metric}["Episodes"] == str(len(episodes))  # episodes, not findings
    table = at.dataframe[0].value
    assert "Hours" in table.columns and "Doses given while it held" in table.columns


def test_a_rule_citation_opens_its_catalogue_entry_and_sources(env: Path) -> None:
    """Issue 11: a threshold cites `rule:<id>`; its source view shows the catalogue entry and its public sources."""
    from assistant.rules.engine import default_catalogue

    rule = next(r for r in default_catalogue().rules if r.threshold is not None)

    def script(rule_id: str) -> None:
        from dashboard import render

        render.render_source(None, f"rule:{rule_id}")  # type: ignore[arg-type]

    at = AppTest.from_function(script, args=(rule.id,), default_timeout=30).run()
    assert not at.exception, [e.value for e in at.exception]
    import html

    text = html.unescape(_md(at)).replace("\u2060", "")  # md() breaks autolinks with a word joiner
    assert rule.title in text and rule.threshold.display in text
    assert all(src in text for src in rule.sources)
    missing = AppTest.from_function(script, args=("no-such-rule",), default_timeout=30).run()
    assert any("not in the rule catalogue" in w.value for w in missing.warning)

"""The dashboard in a real browser: `streamlit run` on 127.0.0.1, headless Debian chromium, one screenshot per page."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.browser import REPO, chromium, missing_requirements, streamlit_server

pytestmark = [pytest.mark.browser, pytest.mark.slow]
_MISSING = missing_requirements()
ANCHOR = datetime(2025, 1, 6, 7, 0, tzinfo=UTC)
SHOTS = Path(os.environ.get("NVA_SCREENSHOT_DIR", REPO / "docs" / "screenshots"))

CLICK_FIRST_CITATION = """(() => {
  const re = /(Observation|MedicationRequest)\\/[A-Za-z0-9.-]+/;
  const b = [...document.querySelectorAll('button')].find(x => re.test(x.innerText));
  if (!b) return null; b.click(); return b.innerText.match(re)[0]; })()"""


@pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")
def test_every_page_renders_in_chromium(tmp_path: Path) -> None:
    from assistant.audit.runner import AuditOptions, run_audit
    from assistant.demo_ward import generate_demo_ward
    from assistant.rules.engine import evaluate
    from connectors import open_source

    demo = tmp_path / "demo-ward"
    generate_demo_ward(demo, anchor=ANCHOR, seed=7)
    # A guideline store already ingested (NVA_TEST_DATA_DIR) makes the flags show their passages.
    data_dir = Path(os.environ.get("NVA_TEST_DATA_DIR") or tmp_path / "data")
    with open_source(demo) as src:
        census = [e.patient_id for e in src.ward_census("Location/ward-4b")]
        charts = {p: src.patient_chart(p) for p in census}
        run_audit(src, tmp_path / "audit.jsonl", options=AuditOptions(now=ANCHOR, progress=False))
    audit_out = data_dir / "audit" / "audit-demo.jsonl"
    audit_out.parent.mkdir(parents=True, exist_ok=True)
    audit_out.write_bytes((tmp_path / "audit.jsonl").read_bytes())
    pid = max(census, key=lambda p: (sum(f.severity == "high" for f in evaluate(charts[p], now=ANCHOR)), p))
    name = charts[pid].patient.name

    env = {
        "NVA_SOURCE": str(demo),
        "NVA_DATA_DIR": str(data_dir),
        "NVA_LLM_BACKEND": "none",
        "NVA_SECRETS_FILE": str(tmp_path / "none.toml"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    pages = [
        ("patient", f"/?patient={pid}", (name, "Flags", "Labs", "Summary")),
        ("handoff", "/handoff", ("Ward handoff", "I — Illness severity", "Export PDF")),
        ("audit", "/audit", ("Audit", "Findings", "Download CSV")),
        ("status", "/status", ("Settings and status", "demo ward anchor", "Guideline store")),
    ]
    with streamlit_server(env) as base, chromium() as browser:
        for page, path, texts in pages:
            browser.navigate(base + path)
            browser.wait_for(texts, finished=True, timeout=180)
            text = browser.evaluate("document.body.innerText")
            assert "Traceback" not in text and "Error running app" not in text, page
            shot = browser.screenshot(SHOTS / f"{page}.png")
            assert shot.stat().st_size > 20_000, f"{page} screenshot looks blank"
            if page == "patient":
                ref = browser.evaluate(CLICK_FIRST_CITATION)
                assert ref, "no citation button on the patient view"
                browser.wait_for((ref, "Show raw JSON"), finished=True, timeout=60)
                assert browser.evaluate("!!document.querySelector('[role=\"dialog\"]')")
                browser.screenshot(SHOTS / "patient-source.png", max_height=1000)

"""Patient text is inert (issue 12): textsafe helpers, and a hostile chart rendered in chromium by the dashboard."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pypdf import PdfReader

from assistant.textsafe import html_text, inert_text, markdown_text, one_line
from tests.browser import Beacon, chromium, missing_requirements, streamlit_server, wait_rendered

ANCHOR = datetime(2025, 1, 6, 7, 0, tzinfo=UTC)
RLO = "\u202e"


def hostile(beacon: str) -> str:
    """Everything that once rendered as markup, navigated or called out of the page (issue 12)."""
    return (
        f'<style>/*hostile-css*/*{{display:none !important}}</style><meta http-equiv="refresh" content="0;url={beacon}/meta">'
        f'<object data="{beacon}/object"></object><embed src="{beacon}/embed"><img src="{beacon}/img">'
        f"<style>@import url({beacon}/import); body{{background:url({beacon}/url)}}</style>"
        f" ![x]({beacon}/beacon) :green-badge[VERIFIED: potassium normal] **bold** [link]({beacon}/link)"
        f" :material/check: $x^2$ lm 0001{RLO} nul\x00"
    )


# --- the helpers -------------------------------------------------------------------------------------------
def test_inert_text_marks_bidi_and_control_characters() -> None:
    assert inert_text(f"lm 0001{RLO}") == "lm 0001⟨U+202E⟩"
    assert inert_text("a\x00b\x1b[31mc") == "a⟨U+0000⟩b⟨U+001B⟩[31mc"
    assert inert_text("zero\u200bwidth \u2066iso\u2069") == "zero⟨U+200B⟩width ⟨U+2066⟩iso⟨U+2069⟩"
    assert inert_text("line\r\nnext\ttab") == "line\nnext\ttab"
    assert inert_text("Zoë 中文 😀") == "Zoë 中文 😀"
    assert one_line(" a \n b ") == "a b"


def test_html_text_escapes_markup_and_attributes() -> None:
    out = html_text(hostile("http://127.0.0.1:9"))
    assert "<" not in out and ">" not in out and '"' not in out
    assert html.unescape(out) == one_line(inert_text(hostile("http://127.0.0.1:9")))
    assert html_text("a\nb", multiline=True) == "a<br>b"


@pytest.mark.parametrize(
    "text",
    [
        ":green-badge[VERIFIED]",
        "**bold** _it_ `code` ~~s~~",
        "![](http://127.0.0.1:9/x) [l](http://e.com)",
        "<b>x</b> &#58; &amp;",
        "- item",
        "12. item",
        "# heading",
        "$x^2$ :material/check: :smile:",
        "| a | b |",
    ],
)
def test_markdown_text_leaves_no_markup_character_unescaped(text: str) -> None:
    out = markdown_text(text)
    # Every character with a Markdown or Streamlit meaning is a character reference; decoding gives the text back.
    bare = re.sub(r"&#\d+;", "", out)
    assert not any(c in bare for c in "*_`~[]<>:|$#!&")
    assert html.unescape(out).replace("\u2060", "") == text
    assert not out.lstrip().startswith(("-", "1"))


def test_markdown_text_breaks_autolinks_and_keeps_plain_punctuation() -> None:
    assert "http\u2060" in html.unescape(markdown_text("see http://example.com"))
    assert "www\u2060." in markdown_text("www.example.com")
    assert "\u2060@" in markdown_text("a@b.org")
    assert markdown_text("K 5.9 mmol/L (high); O'Brien") == "K 5.9 mmol/L (high); O'Brien"


# --- the hostile chart in the browser -------------------------------------------------------------------
def _inject(demo: Path, beacon: str) -> str:
    """Put hostile text in a flagged patient's name, admission reason, drugs, code status, notes and isolation;
    return the id."""
    from assistant.rules.engine import evaluate
    from connectors import open_source

    with open_source(demo) as src:
        census = [e.patient_id for e in src.ward_census("Location/ward-4b")]
        charts = {p: src.patient_chart(p) for p in census}
    pid = max(census, key=lambda p: (sum(f.severity == "high" for f in evaluate(charts[p], now=ANCHOR)), p))
    path = demo / f"{pid}.json"
    bundle = json.loads(path.read_text(encoding="utf-8"))
    text = hostile(beacon)
    for entry in bundle["entry"]:
        r = entry["resource"]
        kind = r["resourceType"]
        if kind == "Patient":
            r["name"][0]["family"] = f"Hostile{RLO}{text}"
            r["name"][0]["given"] = ["Ada **bold**"]
        elif kind == "Encounter":
            r["reasonCode"] = [{"text": f"Reason {text}"}]
        elif kind == "MedicationRequest":
            r["medicationCodeableConcept"]["text"] = r["medicationCodeableConcept"]["text"] + " " + text
        elif kind == "Observation" and "100822-6" in json.dumps(r.get("code")):
            r["valueCodeableConcept"]["text"] = f"Full code {text}"
        elif kind == "DocumentReference":
            r["description"] = f"Note {text}"
            for content in r.get("content", []):
                body = base64.b64encode(f"Note body {text}".encode()).decode()
                content.setdefault("attachment", {})["data"] = body
    # An isolation Flag in the chart's own words (issue 15.3): the header, handoff and PDF print them.
    bundle["entry"].append(
        {
            "resource": {
                "resourceType": "Flag",
                "id": f"{pid}-hostile-isolation",
                "status": "active",
                "code": {
                    "coding": [{"system": "http://snomed.info/sct", "code": "409529001"}],
                    "text": f"Contact precautions {text}",
                },
                "subject": {"reference": f"Patient/{pid}"},
                "period": {"start": "2025-01-05T07:00:00+00:00"},
            }
        }
    )
    path.write_text(json.dumps(bundle), encoding="utf-8")
    return pid


def _expected_flags(demo: Path, pid: str) -> int:
    """What the core itself flags on the hostile chart (engine flags and, where the pipeline adds them, NEWS2)."""
    from connectors import open_source

    try:
        from assistant.pipeline import findings_for
    except ImportError:  # an older core without the pipeline module
        from assistant.rules.engine import evaluate as findings_for  # type: ignore[assignment]

    with open_source(demo) as src:
        chart = src.patient_chart(pid)
    try:
        return len(findings_for(chart, ANCHOR))
    except TypeError:
        return len(findings_for(chart, now=ANCHOR))


PAGE_CHECK = """(beacon) => {
  const q = (s) => [...document.querySelectorAll(s)];
  const flags = q('[class*="st-key-flag-"]');
  return {
    url: location.href,
    badges: q('.stMarkdownBadge').map(b => b.textContent),
    strongs: q('[data-testid="stMarkdownContainer"] strong').map(b => b.textContent),
    injected: q('object, embed, iframe, meta[http-equiv], img[src^="' + beacon + '"], a[href^="' + beacon + '"]')
      .map(e => e.outerHTML.slice(0, 120)),
    styles: q("style").filter(s => s.textContent.includes("hostile-css")
      || s.textContent.includes(beacon)).map(s => s.textContent.slice(0, 300)),
    flagBoxes: flags.length,
    flagsVisible: flags.filter(f => f.getBoundingClientRect().height > 20
      && getComputedStyle(f).display !== 'none').length,
    heading: (q('h3').map(h => h.textContent).find(t => t.startsWith('Flags (')) || ''),
    text: document.body.innerText,
  };
}"""


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(missing_requirements() is not None, reason=missing_requirements() or "")
def test_hostile_chart_renders_inert_in_chromium(tmp_path: Path) -> None:
    from assistant.demo_ward import generate_demo_ward

    demo = tmp_path / "demo-ward"
    generate_demo_ward(demo, anchor=ANCHOR, seed=7)
    with Beacon() as beacon:
        pid = _inject(demo, beacon.url)
        expected = _expected_flags(demo, pid)
        assert expected >= 2, "the hostile patient must carry flags the injected text could hide"
        env = {
            "NVA_SOURCE": str(demo),
            "NVA_DATA_DIR": str(tmp_path / "data"),
            "NVA_LLM_BACKEND": "none",
            "NVA_SECRETS_FILE": str(tmp_path / "none.toml"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        outside: list[str] = []
        with streamlit_server(env) as base, chromium() as context:
            page = context.new_page()
            page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
            checks = []
            page.goto(f"{base}/?patient={pid}")
            wait_rendered(page, ("Flags (", "Summary", "Hostile"), timeout=180)
            checks.append(("patient", page.evaluate(PAGE_CHECK, beacon.url)))
            tabs = {
                "Medications and MAR": "Active medications",
                "Nursing notes": "Recent nursing notes",
                "Vitals and NEWS2": "Vital signs and NEWS2",
                "Since last shift": "Since last shift (",
            }
            for tab, heading in tabs.items():
                page.get_by_role("tab", name=tab).click()
                # The tab's own heading first: a rerun that has not started yet must not pass for a finished one.
                wait_rendered(page, (heading,), timeout=60)
                checks.append((tab, page.evaluate(PAGE_CHECK, beacon.url)))
            page.goto(base)
            wait_rendered(page, ("Ward census", "Hostile"), timeout=180)
            checks.append(("census", page.evaluate(PAGE_CHECK, beacon.url)))
            page.goto(f"{base}/handoff")
            wait_rendered(page, ("Ward handoff", "Hostile"), timeout=180)
            checks.append(("handoff", page.evaluate(PAGE_CHECK, beacon.url)))
            with page.expect_download() as dl:
                page.get_by_role("button", name="Export PDF").click()
            pdf_text = " ".join(
                p.extract_text() for p in PdfReader(io.BytesIO(Path(dl.value.path()).read_bytes())).pages
            )
            page.goto(f"{base}/audit")
            wait_rendered(page, ("Audit",), timeout=180)
            page.get_by_role("button", name="Audit 4B Med-Surg now").click()
            wait_rendered(page, ("Download CSV", "Patient evidence"), timeout=300)
            picker = page.locator('[data-testid="stSelectbox"] input').last  # the drill-down "Patient"
            picker.click()
            picker.fill("Hostile")
            page.keyboard.press("Enter")
            wait_rendered(page, ("Suggested nursing action",), timeout=120)
            checks.append(("audit", page.evaluate(PAGE_CHECK, beacon.url)))
            time.sleep(1.5)  # a meta refresh or a late image would have fired by now
            final_url = page.url
        patient = checks[0][1]
        assert patient["heading"] == f"Flags ({expected})", patient["heading"]
        assert patient["flagBoxes"] == expected and patient["flagsVisible"] == expected
        assert "ISOLATION · Contact — Contact precautions <style>" in patient["text"]  # shown, as written
        for where, c in checks:
            assert c["url"].startswith(base), (where, c["url"])
            assert not c["injected"], (where, c["injected"])
            assert c["styles"] == [], (where, c["styles"])
            assert not [b for b in c["badges"] if "VERIFIED" in b], (where, c["badges"])
            assert "bold" not in " ".join(c["strongs"]), where
            # The text is shown as written, with the bidi control made visible.
            assert ":green-badge[VERIFIED: potassium normal]" in c["text"], where
            assert RLO not in c["text"] and "⟨U+202E⟩" in c["text"], where
        assert final_url.startswith(base)
        # The PDF prints the same text as text, the bidi control visible.
        assert RLO not in pdf_text and "⟨U+202E⟩" in pdf_text and "green-badge[VERIFIED" in pdf_text
        assert beacon.hits == [], beacon.hits
        assert outside == [], outside

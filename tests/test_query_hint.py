"""A nurse's question with a lab value is routed to the rule it trips, and so to the right guideline first."""

from __future__ import annotations

import io
import json

import pytest

from assistant.cli import main
from assistant.rules.query_hint import lab_mentions, rules_suggested_by


@pytest.mark.parametrize(
    ("question", "rules"),
    [
        ("what do I do if K is 5.9 and KCl is ordered", ["hyperkalemia-k-raising-drug"]),
        ("K+ 5.6 on lisinopril", ["hyperkalemia-k-raising-drug"]),
        ("potassium 5.0 and KCl due", []),  # at the threshold, not above it
        ("K 3.1 and on lasix", ["hypokalemia-diuretic"]),
        ("INR 4.8 on warfarin", ["inr-supratherapeutic-warfarin"]),
        ("INR 3.9 on warfarin", []),
        ("BG 3.1 pt on insulin", ["hypoglycemia-insulin-sulfonylurea"]),
        ("blood sugar 58 mg/dL after glipizide", ["hypoglycemia-insulin-sulfonylurea"]),
        ("eGFR 22 metformin due", ["metformin-low-egfr"]),
        ("Na 127 sertraline", ["hyponatremia-thiazide-ssri"]),
        ("QTc 524 on haloperidol", ["qtc-prolonged-qt-drug"]),
        ("K 4.2", []),
    ],
)
def test_questions_point_at_rules(question, rules):
    assert rules_suggested_by(question) == rules


def test_units_in_questions_are_converted():
    assert lab_mentions("glucose 3.2 mmol/L") == [("glucose", pytest.approx(57.65, abs=0.01))]
    assert lab_mentions("creatinine 124 umol/L") == [("creatinine", pytest.approx(1.403, abs=0.001))]


@pytest.mark.slow
def test_guideline_search_puts_potassium_guidance_first(tmp_path, monkeypatch):
    monkeypatch.setenv("NVA_DATA_DIR", str(tmp_path))
    assert main(["guidelines", "ingest", "guidelines/corpus"], out=io.StringIO()) == 0
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        code = main(
            ["guidelines", "search", "what do I do if K is 5.9 and KCl is ordered", "--format", "json"]
        )
    assert code == 0
    hits = json.loads(out.getvalue())
    assert hits[0]["doc_id"] == "potassium-hyperkalemia"

"""Rule engine: every catalogue rule at its threshold edges, with unit variants, stale values and stopped orders."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from assistant.model import Finding
from assistant.normalize import build_chart
from assistant.rules import default_catalogue, evaluate
from assistant.rules.engine import CatalogueError, load_catalogue

NOW = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
PID = "p1"
_ids = itertools.count(1)

# --- small FHIR factories ------------------------------------------------------------------------------------

RX = {  # ingredient -> RxNorm code used by these tests
    "potassium chloride": "8591",
    "spironolactone": "9997",
    "lisinopril": "29046",
    "losartan": "52175",
    "digoxin": "3407",
    "furosemide": "4603",
    "hydrochlorothiazide": "5487",
    "warfarin": "11289",
    "insulin glargine": "274783",
    "glipizide": "4821",
    "metformin": "6809",
    "ibuprofen": "5640",
    "ketorolac": "35827",
    "gentamicin": "4413",
    "vancomycin": "11124",
    "heparin": "5224",
    "enoxaparin": "67108",
    "apixaban": "1364430",
    "lithium carbonate": "42351",
    "haloperidol": "5093",
    "sertraline": "36437",
    "amoxicillin": "723",
    "cefazolin": "2180",
    "acetaminophen": "161",
    "morphine": "7052",
    "methadone": "6813",
    "oxycodone": "7804",
    "ondansetron": "26225",
}
LOINC = {
    "potassium": "2823-3",
    "sodium": "2951-2",
    "glucose": "2345-7",
    "poc_glucose": "41653-7",
    "creatinine": "2160-0",
    "egfr": "98979-8",
    "inr": "6301-6",
    "platelets": "777-3",
    "digoxin": "10535-3",
    "lithium": "14334-7",
    "vanc_trough": "4090-7",
    "vanc_peak": "4089-9",
    "qtc": "8636-3",
}


def iso(hours_ago: float) -> str:
    return (NOW - timedelta(hours=hours_ago)).isoformat()


def patient(pid: str = PID) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Test", "given": ["Pat"]}],
        "gender": "female",
        "birthDate": "1950-01-01",
    }


def encounter(pid: str = PID, status: str = "in-progress") -> dict:
    return {
        "resourceType": "Encounter",
        "id": f"enc-{next(_ids)}",
        "status": status,
        "class": {"code": "IMP"},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": iso(120)},
    }


def order(
    drug: str,
    *,
    status: str = "active",
    coded: bool = True,
    text: str | None = None,
    started_h: float = 72,
    freq: int | None = 1,
    period: float = 1,
    unit: str = "d",
    prn: bool = False,
    end_h: float | None = None,
    rid: str | None = None,
    pid: str = PID,
) -> dict:
    concept: dict[str, Any] = {"text": text or drug.capitalize()}
    if coded:
        concept["coding"] = [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": RX[drug]}]
    dosage: dict[str, Any] = {"text": "as directed"}
    repeat: dict[str, Any] = {"boundsPeriod": {"start": iso(started_h)}}
    if freq:
        repeat.update({"frequency": freq, "period": period, "periodUnit": unit})
    if end_h is not None:
        repeat["boundsPeriod"]["end"] = iso(end_h)
    dosage["timing"] = {"repeat": repeat}
    if prn:
        dosage["asNeededBoolean"] = True
    return {
        "resourceType": "MedicationRequest",
        "id": rid or f"mr-{next(_ids)}",
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": concept,
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": iso(started_h),
        "dosageInstruction": [dosage],
    }


def obs(
    analyte: str,
    value: float | None,
    unit: str,
    hours_ago: float,
    *,
    status: str = "final",
    rid: str | None = None,
    pid: str = PID,
) -> dict:
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid or f"obs-{next(_ids)}",
        "status": status,
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": LOINC[analyte]}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": iso(hours_ago),
    }
    if value is not None:
        res["valueQuantity"] = {"value": value, "unit": unit}
    return res


def allergy(
    substance: str,
    *,
    coded: bool = False,
    status: str = "active",
    verification: str = "confirmed",
    pid: str = PID,
) -> dict:
    code: dict[str, Any] = {"text": substance}
    if coded:
        code["coding"] = [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": RX[substance]}]
    return {
        "resourceType": "AllergyIntolerance",
        "id": f"al-{next(_ids)}",
        "patient": {"reference": f"Patient/{pid}"},
        "code": code,
        "category": ["medication"],
        "clinicalStatus": {"coding": [{"code": status}]},
        "verificationStatus": {"coding": [{"code": verification}]},
    }


def admin(
    drug: str, hours_ago: float, *, request: str | None = None, status: str = "completed", pid: str = PID
) -> dict:
    res: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": f"ma-{next(_ids)}",
        "status": status,
        "medicationCodeableConcept": {
            "text": drug.capitalize(),
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": RX[drug]}],
        },
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": iso(hours_ago),
    }
    if request:
        res["request"] = {"reference": f"MedicationRequest/{request}"}
    return res


def run(*resources: dict, admitted: bool = True, now: datetime = NOW) -> list[Finding]:
    base = [patient()] + ([encounter()] if admitted else [])
    chart = build_chart([*base, *resources], source="test", patient_id=PID)
    return evaluate(chart, now=now)


def fired(findings: list[Finding], rule: str) -> list[Finding]:
    return [f for f in findings if f.rule_id == rule]


def administered(mr: dict, hours: tuple[float, ...] = (2, 26)) -> list[dict]:
    """Charted doses for a scheduled order, so order-not-administered stays quiet in tests about other rules."""
    drug = next(
        k for k, v in RX.items() if v == mr["medicationCodeableConcept"].get("coding", [{}])[0].get("code")
    )
    return [admin(drug, h, request=mr["id"]) for h in hours]


# --- catalogue --------------------------------------------------------------------------------------------------

PLANTED_IDS = {
    "hyperkalemia-k-raising-drug",
    "hypokalemia-digoxin",
    "hypokalemia-diuretic",
    "inr-supratherapeutic-warfarin",
    "hypoglycemia-insulin-sulfonylurea",
    "metformin-low-egfr",
    "nsaid-low-egfr",
    "nsaid-aki",
    "nephrotoxic-creatinine-rise",
    "heparin-platelet-fall-hit",
    "digoxin-level-high",
    "lithium-level-high",
    "vancomycin-trough-high",
    "qtc-prolonged-qt-drug",
    "hyponatremia-thiazide-ssri",
    "allergy-order-conflict",
    "duplicate-therapy",
    "administration-without-order",
    "order-not-administered",
    "monitoring-gap-warfarin-inr",
    "monitoring-gap-heparin-platelets",
}


def test_catalogue_has_every_planted_rule_with_sources_and_actions():
    cat = default_catalogue()
    assert PLANTED_IDS <= set(cat.ids)
    for rule in cat.rules:
        assert rule.sources and all("http" in s for s in rule.sources), rule.id
        assert rule.action and rule.message and rule.severity in ("high", "medium", "low")


def corpus_links() -> tuple[dict[str, set[str]], set[str]]:
    """rule id -> guideline ids from each corpus document's front matter, and every document id (read here, in
    the test: the rule engine does not read the guidelines package)."""
    corpus = Path(__file__).resolve().parents[1] / "guidelines" / "corpus"
    links: dict[str, set[str]] = {}
    ids: set[str] = set()
    for path in sorted(corpus.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        if not text.startswith("---"):
            continue
        meta = yaml.safe_load(text[3 : text.find("\n---", 3)]) or {}
        doc_id = str(meta.get("id") or path.stem)
        ids.add(doc_id)
        for rule_id in meta.get("rules") or []:
            links.setdefault(str(rule_id), set()).add(doc_id)
    return links, ids


def test_guideline_ids_agree_with_the_corpus_front_matter():
    links, ids = corpus_links()
    if not ids:
        pytest.skip("guideline corpus not present")
    cat = default_catalogue()
    assert "warfarin-inr" in cat.rule("inr-supratherapeutic-warfarin").guideline_ids
    for rule in cat.rules:
        assert set(rule.guideline_ids) >= links.get(rule.id, set()), (
            rule.id
        )  # every document's link is listed
        assert set(rule.guideline_ids) <= ids, rule.id  # and names a document that exists


def test_malformed_catalogue_is_rejected_with_a_named_rule(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(
        "rules:\n  - {id: x, category: c, title: t, kind: threshold-latest, severity: high, message: m,"
        " action: a, drugs: {classes: [no-such-class]}, lab: {analyte: potassium},"
        " threshold: {op: '>', value: 5, unit: mmol/L}}\n"
    )
    with pytest.raises(CatalogueError, match="'x'.*no-such-class"):
        load_catalogue(bad)


# --- threshold-on-latest rules at their edges ------------------------------------------------------------------

EDGE_CASES = [
    # rule, drug, analyte, unit, value that fires, value that does not, window hours
    ("hyperkalemia-k-raising-drug", "potassium chloride", "potassium", "mmol/L", 5.1, 5.0, 24),
    ("hyperkalemia-k-raising-drug", "spironolactone", "potassium", "mEq/L", 5.1, 5.0, 24),
    ("hyperkalemia-k-raising-drug", "lisinopril", "potassium", "mmol/L", 6.0, 4.9, 24),
    ("hyperkalemia-k-raising-drug", "losartan", "potassium", "mmol/L", 5.01, 5.0, 24),
    ("hypokalemia-digoxin", "digoxin", "potassium", "mmol/L", 3.4, 3.5, 24),
    ("hypokalemia-diuretic", "furosemide", "potassium", "mEq/L", 3.4, 3.5, 24),
    ("hypokalemia-diuretic", "hydrochlorothiazide", "potassium", "mmol/L", 3.49, 3.5, 24),
    ("inr-supratherapeutic-warfarin", "warfarin", "inr", "{INR}", 4.1, 4.0, 48),
    ("hypoglycemia-insulin-sulfonylurea", "insulin glargine", "glucose", "mg/dL", 69, 70, 24),
    ("hypoglycemia-insulin-sulfonylurea", "glipizide", "poc_glucose", "mmol/L", 3.8, 3.9, 24),
    ("metformin-low-egfr", "metformin", "egfr", "mL/min/{1.73_m2}", 29, 30, 72),
    ("nsaid-low-egfr", "ibuprofen", "egfr", "mL/min/1.73m2", 29.9, 30, 72),
    ("digoxin-level-high", "digoxin", "digoxin", "ng/mL", 2.1, 2.0, 72),
    (
        "digoxin-level-high",
        "digoxin",
        "digoxin",
        "nmol/L",
        2.7,
        2.5,
        72,
    ),  # 2.7 nmol/L = 2.11 ng/mL; 2.5 = 1.95
    ("lithium-level-high", "lithium carbonate", "lithium", "mEq/L", 1.3, 1.2, 72),
    ("vancomycin-trough-high", "vancomycin", "vanc_trough", "ug/mL", 20.5, 20, 72),
    ("qtc-prolonged-qt-drug", "haloperidol", "qtc", "ms", 501, 500, 72),
    ("qtc-prolonged-qt-drug", "ondansetron", "qtc", "s", 0.51, 0.5, 72),
    ("hyponatremia-thiazide-ssri", "hydrochlorothiazide", "sodium", "mmol/L", 129, 130, 48),
    ("hyponatremia-thiazide-ssri", "sertraline", "sodium", "mEq/L", 125, 131, 48),
]


@pytest.mark.parametrize(("rule", "drug", "analyte", "unit", "bad", "ok", "window"), EDGE_CASES)
def test_threshold_edges(rule, drug, analyte, unit, bad, ok, window):
    mr = order(drug)
    doses = administered(mr)
    hit = obs(analyte, bad, unit, 2)
    findings = fired(run(mr, *doses, hit), rule)
    assert len(findings) == 1
    f = findings[0]
    assert f.patient == f"Patient/{PID}"
    assert set(f.evidence) == {f"MedicationRequest/{mr['id']}", f"Observation/{hit['id']}"}
    assert f.action and f.sources and f.message
    assert any(v.ref == f"Observation/{hit['id']}" and v.value and v.time for v in f.values)
    assert not fired(run(mr, *doses, obs(analyte, ok, unit, 2)), rule)
    # outside the window the same value is stale
    assert not fired(run(mr, *doses, obs(analyte, bad, unit, window + 1)), rule)


@pytest.mark.parametrize(("rule", "drug", "analyte", "unit", "bad", "ok", "window"), EDGE_CASES[:8])
def test_a_newer_normal_value_supersedes_an_abnormal_one(rule, drug, analyte, unit, bad, ok, window):
    mr = order(drug)
    findings = run(mr, *administered(mr), obs(analyte, bad, unit, 10), obs(analyte, ok, unit, 2))
    assert not fired(findings, rule)


@pytest.mark.parametrize(
    "status", ["stopped", "completed", "cancelled", "on-hold", "draft", "entered-in-error"]
)
def test_only_active_orders_count(status):
    assert fired(
        run(order("potassium chloride"), obs("potassium", 6.1, "mmol/L", 1)), "hyperkalemia-k-raising-drug"
    )
    assert not fired(
        run(order("potassium chloride", status=status), obs("potassium", 6.1, "mmol/L", 1)),
        "hyperkalemia-k-raising-drug",
    )


def test_an_active_order_whose_period_ended_does_not_count():
    mr = order("potassium chloride", end_h=5)
    assert not fired(run(mr, obs("potassium", 6.1, "mmol/L", 1)), "hyperkalemia-k-raising-drug")


def test_medication_statement_is_not_an_order():
    stmt = {
        "resourceType": "MedicationStatement",
        "id": "ms1",
        "status": "active",
        "medicationCodeableConcept": {"text": "Potassium chloride"},
        "subject": {"reference": f"Patient/{PID}"},
    }
    assert not fired(run(stmt, obs("potassium", 6.1, "mmol/L", 1)), "hyperkalemia-k-raising-drug")


@pytest.mark.parametrize("text", ["KCl 20 mEq tablet", "Klor-Con 10 mEq", "potassium chloride ER 20 mEq"])
def test_text_only_medication_is_resolved_by_name(text):
    mr = order("potassium chloride", coded=False, text=text)
    findings = fired(run(mr, obs("potassium", 5.8, "mmol/L", 1)), "hyperkalemia-k-raising-drug")
    assert len(findings) == 1 and f"MedicationRequest/{mr['id']}" in findings[0].evidence


def test_missing_or_unusable_values_never_fire():
    mr = order("warfarin")
    assert not fired(run(mr, obs("inr", None, "", 2)), "inr-supratherapeutic-warfarin")
    assert not fired(run(mr, obs("inr", 6.0, "furlongs", 2)), "inr-supratherapeutic-warfarin")  # unknown unit
    assert not fired(
        run(mr, obs("inr", 6.0, "{INR}", 2, status="entered-in-error")), "inr-supratherapeutic-warfarin"
    )
    assert not fired(
        run(mr, obs("inr", 6.0, "{INR}", 2, status="registered")), "inr-supratherapeutic-warfarin"
    )
    assert not fired(run(mr, obs("inr", 6.0, "{INR}", -2)), "inr-supratherapeutic-warfarin")  # after `now`
    assert not fired(
        run(mr), "inr-supratherapeutic-warfarin"
    )  # no INR at all: not normal, just not this rule


def test_hypoglycemia_counts_any_low_in_window_even_if_rechecked_normal():
    mr = order("insulin glargine")
    low = obs("poc_glucose", 58, "mg/dL", 4)
    findings = fired(run(mr, low, obs("poc_glucose", 96, "mg/dL", 3)), "hypoglycemia-insulin-sulfonylurea")
    assert len(findings) == 1 and f"Observation/{low['id']}" in findings[0].evidence


def test_vancomycin_peak_is_not_a_trough():
    mr = order("vancomycin")
    assert not fired(run(mr, obs("vanc_peak", 35, "mg/L", 2)), "vancomycin-trough-high")


def test_drug_without_its_class_does_not_fire():
    mr = order("acetaminophen")
    assert not fired(run(mr, obs("potassium", 6.5, "mmol/L", 1)), "hyperkalemia-k-raising-drug")


# --- relative change ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "latest", "unit", "hours_between", "expect"),
    [
        (1.0, 1.3, "mg/dL", 24, True),  # +0.3 within 48 h (edge, float-safe)
        (1.0, 1.29, "mg/dL", 24, False),
        (0.9, 1.2, "mg/dL", 47, True),  # 1.2 - 0.9 is 0.29999... in floating point
        (1.0, 1.3, "mg/dL", 50, False),  # same rise but over more than 48 h, and < 1.5x
        (1.0, 1.5, "mg/dL", 150, True),  # 1.5x the lowest within 7 days
        (1.0, 1.49, "mg/dL", 150, False),
        (1.0, 1.6, "mg/dL", 170, False),  # baseline older than 7 days
        (76, 124, "umol/L", 24, True),  # 0.86 -> 1.40 mg/dL
        (88.4, 106, "umol/L", 24, False),  # 1.00 -> 1.20 mg/dL
    ],
)
def test_kdigo_creatinine_rise(base, latest, unit, hours_between, expect):
    for rule, drug in (
        ("nephrotoxic-creatinine-rise", "gentamicin"),
        ("nephrotoxic-creatinine-rise", "vancomycin"),
        ("nsaid-aki", "ibuprofen"),
    ):
        mr = order(drug, started_h=200)
        b, latest_obs = obs("creatinine", base, unit, 2 + hours_between), obs("creatinine", latest, unit, 2)
        findings = fired(run(mr, b, latest_obs), rule)
        assert bool(findings) is expect, (rule, base, latest)
        if expect:
            assert set(findings[0].evidence) == {
                f"MedicationRequest/{mr['id']}",
                f"Observation/{b['id']}",
                f"Observation/{latest_obs['id']}",
            }


def test_creatinine_rise_needs_a_recent_latest_value():
    mr = order("gentamicin")
    assert not fired(
        run(mr, obs("creatinine", 1.0, "mg/dL", 80), obs("creatinine", 2.0, "mg/dL", 60)),
        "nephrotoxic-creatinine-rise",
    )


@pytest.mark.parametrize(
    ("values", "expect"),
    [
        ([(100, 262), (2, 112)], True),  # 57 % fall
        ([(100, 200), (2, 100)], False),  # exactly 50 %: not more than 50 %
        ([(100, 200), (2, 99)], True),
        ([(100, 280), (2, 196)], False),  # 30 %
        ([(150, 400), (100, 200), (2, 150)], False),  # the 400 predates heparin by more than 24 h
        ([(130, 300), (50, 320), (2, 150)], True),  # pre-treatment value within 24 h of the start counts
    ],
)
def test_heparin_platelet_fall(values, expect):
    mr = order("heparin", started_h=120, freq=None)
    rows = [obs("platelets", v, "10*3/uL", h) for h, v in values]
    findings = fired(run(mr, *rows), "heparin-platelet-fall-hit")
    assert bool(findings) is expect


def test_platelet_units_are_converted():
    mr = order("enoxaparin", started_h=120)
    findings = fired(
        run(mr, obs("platelets", 250000, "/uL", 60), obs("platelets", 100, "10^9/L", 2)),
        "heparin-platelet-fall-hit",
    )
    assert findings


# --- allergy, duplicates, administrations, gaps ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("allergen", "coded", "drug", "expect"),
    [
        ("penicillin", False, "amoxicillin", True),  # class cross-reactivity
        ("amoxicillin", True, "amoxicillin", True),  # same drug, coded
        ("ibuprofen", False, "ketorolac", True),  # NSAID class
        ("penicillin", False, "vancomycin", False),
        ("penicillin", False, "cefazolin", False),  # beta-lactam grouping is not cross-reactivity here
        ("morphine", True, "oxycodone", True),
    ],
)
def test_allergy_order_conflict(allergen, coded, drug, expect):
    al = allergy(allergen, coded=coded)
    mr = order(drug)
    findings = fired(run(al, mr, *administered(mr)), "allergy-order-conflict")
    assert bool(findings) is expect
    if expect:
        assert set(findings[0].evidence) == {
            f"MedicationRequest/{mr['id']}",
            f"AllergyIntolerance/{al['id']}",
        }


@pytest.mark.parametrize(
    ("status", "verification"),
    [
        ("inactive", "confirmed"),
        ("resolved", "confirmed"),
        ("active", "refuted"),
        ("active", "entered-in-error"),
    ],
)
def test_inactive_or_refuted_allergy_does_not_fire(status, verification):
    assert not fired(
        run(allergy("penicillin", status=status, verification=verification), order("amoxicillin")),
        "allergy-order-conflict",
    )


@pytest.mark.parametrize(
    ("drugs", "expect"),
    [
        (("enoxaparin", "apixaban"), True),
        (("warfarin", "enoxaparin"), False),  # bridging
        (("warfarin", "heparin"), False),  # bridging
        (("warfarin", "apixaban"), True),
        (("ibuprofen", "ketorolac"), True),
        (("lisinopril", "losartan"), True),
        (("insulin glargine", "glipizide"), False),
        (("spironolactone", "furosemide"), False),
    ],
)
def test_duplicate_therapy(drugs, expect):
    orders = [order(d) for d in drugs]
    findings = fired(run(*orders), "duplicate-therapy")
    assert bool(findings) is expect
    if expect:
        assert set(findings[0].evidence) == {f"MedicationRequest/{o['id']}" for o in orders}


def test_duplicate_long_acting_opioids_by_text_and_prn_exempt():
    a = order("methadone", text="Methadone 10 mg tablet")
    b = order("oxycodone", text="OxyContin (oxycodone ER) 20 mg tablet", coded=True)
    assert fired(run(a, b), "duplicate-therapy")
    c = order("oxycodone", text="Oxycodone 5 mg tablet", prn=True)
    assert not fired(run(a, c), "duplicate-therapy")


def test_administration_without_order():
    stray = admin("ondansetron", 3)
    findings = fired(run(stray), "administration-without-order")
    assert [f.evidence for f in findings] == [(f"MedicationAdministration/{stray['id']}",)]
    # covered by an active order for the same drug (no request link)
    assert not fired(
        run(order("ondansetron", prn=True), admin("ondansetron", 3)), "administration-without-order"
    )
    # not given, or outside the window
    assert not fired(run(admin("ondansetron", 3, status="not-done")), "administration-without-order")
    assert not fired(run(admin("ondansetron", 30)), "administration-without-order")


def test_administration_against_cancelled_or_missing_or_ended_order():
    cancelled = order("morphine", status="cancelled", rid="mr-c")
    assert fired(run(cancelled, admin("morphine", 3, request="mr-c")), "administration-without-order")
    assert fired(run(admin("morphine", 3, request="mr-gone")), "administration-without-order")
    stopped = order("morphine", status="stopped", rid="mr-s", end_h=10)
    assert fired(run(stopped, admin("morphine", 3, request="mr-s")), "administration-without-order")
    # given before the stop time, or on hold with no stop time: given while the order ran
    assert not fired(run(stopped, admin("morphine", 12, request="mr-s")), "administration-without-order")
    held = order("morphine", status="on-hold", rid="mr-h")
    assert not fired(run(held, admin("morphine", 7, request="mr-h")), "administration-without-order")


@pytest.mark.parametrize(
    ("kwargs", "admin_hours", "expect"),
    [
        ({"freq": 2, "period": 1, "unit": "d"}, (), True),
        ({"freq": 2, "period": 1, "unit": "d"}, (23,), False),
        ({"freq": 2, "period": 1, "unit": "d"}, (25,), True),
        ({"freq": 1, "period": 1, "unit": "d"}, (30,), False),  # daily: window is 1.5 x 24 h = 36 h
        ({"freq": 1, "period": 1, "unit": "d"}, (37,), True),
        ({"freq": 1, "period": 1, "unit": "wk"}, (100,), False),  # weekly: window 252 h
        ({"freq": 2, "period": 1, "unit": "d", "prn": True}, (), False),
        ({"freq": 2, "period": 1, "unit": "d", "started_h": 20}, (), False),  # started < 24 h ago
        ({"freq": None}, (), False),  # no schedule (e.g. an infusion)
        ({"freq": 2, "period": 1, "unit": "d", "status": "on-hold"}, (), False),
    ],
)
def test_order_not_administered(kwargs, admin_hours, expect):
    mr = order("digoxin", rid="mr-d", **kwargs)
    doses = [admin("digoxin", h, request="mr-d") for h in admin_hours]
    findings = fired(run(mr, *doses), "order-not-administered")
    assert bool(findings) is expect
    if expect:
        # The order, and the last charted dose the message states ("last charted ..."), each cited.
        last = [f"MedicationAdministration/{d['id']}" for d in doses[-1:]]
        assert findings[0].evidence == ("MedicationRequest/mr-d", *last)


def test_held_doses_do_not_count_as_given_and_outpatients_have_no_mar():
    mr = order("lithium carbonate", rid="mr-l", freq=2)
    held = [admin("lithium carbonate", h, request="mr-l", status="not-done") for h in (10, 22)]
    assert fired(run(mr, *held), "order-not-administered")
    assert not fired(run(mr, *held, admitted=False), "order-not-administered")


@pytest.mark.parametrize(
    ("rule", "drug", "analyte", "unit", "value"),
    [
        ("monitoring-gap-warfarin-inr", "warfarin", "inr", "{INR}", 2.4),
        ("monitoring-gap-heparin-platelets", "heparin", "platelets", "10*3/uL", 210),
    ],
)
def test_monitoring_gaps(rule, drug, analyte, unit, value):
    mr = order(drug, freq=None)
    assert fired(run(mr), rule)  # none ever
    old = obs(analyte, value, unit, 73)
    stale = fired(run(mr, old), rule)
    # The order, and the stale result the message states ("last INR 2.4 at ..."), each cited.
    assert stale and stale[0].evidence == (f"MedicationRequest/{mr['id']}", f"Observation/{old['id']}")
    assert not fired(run(mr, obs(analyte, value, unit, 71)), rule)
    assert not fired(run(mr, admitted=False), rule)


def test_findings_are_sorted_by_severity_and_deterministic():
    mr_k, mr_d = order("potassium chloride"), order("furosemide")
    resources = [mr_k, mr_d, obs("potassium", 3.0, "mmol/L", 1), allergy("penicillin"), order("amoxicillin")]
    a = run(*resources)
    b = run(*resources)
    assert a == b
    ranks = [{"high": 0, "medium": 1, "low": 2}[f.severity] for f in a]
    assert ranks == sorted(ranks)


def test_now_must_be_aware():
    chart = build_chart([patient()], source="t")
    with pytest.raises(ValueError, match="timezone"):
        evaluate(chart, now=datetime(2026, 1, 1))  # noqa: DTZ001


# --- copies of one order (Synthea and real exports repeat prescriptions) --------------------------------------


def test_an_allergy_conflict_with_a_duplicated_order_is_one_flag_citing_every_copy():
    al = allergy("penicillin")
    copies = [order("amoxicillin", rid=f"mr-amox-{i}") for i in range(3)]
    doses = [d for mr in copies for d in administered(mr)]
    findings = fired(run(al, *copies, *doses), "allergy-order-conflict")
    assert len(findings) == 1  # it was one flag per copy
    assert set(findings[0].evidence) == {
        *(f"MedicationRequest/mr-amox-{i}" for i in range(3)),
        f"AllergyIntolerance/{al['id']}",
    }
    # two different drugs against one allergy are still two flags
    nsaid = allergy("ibuprofen")
    pair = [order("ibuprofen"), order("ketorolac")]
    assert len(fired(run(nsaid, *pair), "allergy-order-conflict")) == 2


def test_a_dose_charted_against_one_copy_covers_the_drug_and_a_missed_drug_is_one_flag():
    a = order("digoxin", rid="mr-d1")
    b = order("digoxin", rid="mr-d2")
    given = admin("digoxin", 2, request="mr-d1")
    assert not fired(run(a, b, given), "order-not-administered")  # flagged mr-d2 before
    old = admin("digoxin", 60, request="mr-d2")
    (finding,) = fired(run(a, b, old), "order-not-administered")  # was one flag per copy
    assert finding.evidence == (
        "MedicationRequest/mr-d1",
        "MedicationRequest/mr-d2",
        f"MedicationAdministration/{old['id']}",
    )
    # a different drug is judged on its own
    c = order("lithium carbonate", rid="mr-l")
    flagged = fired(run(a, b, c, given), "order-not-administered")
    assert [f.evidence[0] for f in flagged] == ["MedicationRequest/mr-l"]

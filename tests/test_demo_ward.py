"""Tests for the demo ward generator: determinism, FHIR validity, references, and the planted answer key."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from assistant.demo_ward import DemoWardError, ckd_epi_2021, generate_demo_ward, load_scenarios

ANCHOR = datetime(2025, 3, 10, 7, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def ward(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    manifest = generate_demo_ward(out, anchor=ANCHOR, seed=7)
    bundles = {pid: json.loads((out / f"{pid}.json").read_text("utf-8")) for pid in manifest.patient_ids}
    return {
        "out": out,
        "manifest": manifest,
        "bundles": bundles,
        "locations": json.loads((out / "locations.json").read_text("utf-8")),
        "key": json.loads((out / "answer_key.json").read_text("utf-8")),
        "ward": json.loads((out / "ward.json").read_text("utf-8")),
    }


def _resources(bundle):
    return [e["resource"] for e in bundle["entry"]]


def _dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_anchor_and_seed_give_identical_bytes(ward, tmp_path):
    generate_demo_ward(tmp_path, anchor=ANCHOR, seed=7)
    assert _dir_bytes(tmp_path) == _dir_bytes(ward["out"])


def test_other_seed_changes_ids_but_not_the_scenarios(ward, tmp_path):
    m = generate_demo_ward(tmp_path, anchor=ANCHOR, seed=8)
    assert set(m.patient_ids).isdisjoint(ward["manifest"].patient_ids)
    key8 = json.loads((tmp_path / "answer_key.json").read_text("utf-8"))
    assert sorted(e["rule"] for e in key8["expected"]) == sorted(e["rule"] for e in ward["key"]["expected"])


def test_rerun_with_new_seed_removes_stale_patient_files(tmp_path):
    generate_demo_ward(tmp_path, anchor=ANCHOR, seed=1)
    m = generate_demo_ward(tmp_path, anchor=ANCHOR, seed=2)
    bundles = {p.name for p in tmp_path.iterdir()} - {"ward.json", "answer_key.json", "locations.json"}
    assert bundles == {f"{pid}.json" for pid in m.patient_ids}


def test_naive_anchor_is_rejected(tmp_path):
    with pytest.raises(DemoWardError, match="timezone-aware"):
        generate_demo_ward(tmp_path, anchor=datetime(2025, 3, 10, 7), seed=7)


def test_every_file_is_a_collection_bundle_and_every_resource_parses_as_r4b(ward):
    fhir = pytest.importorskip("fhir.resources.R4B")
    for bundle in [*ward["bundles"].values(), ward["locations"]]:
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
        fhir.get_fhir_model_class("Bundle").model_validate(
            {k: v for k, v in bundle.items() if k != "entry"} | {"entry": []}
        )
        for resource in _resources(bundle):
            cls = fhir.get_fhir_model_class(resource["resourceType"])
            cls.model_validate(resource)


def _references(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def test_references_resolve_within_bundle_or_to_ward_locations(ward):
    locations = {f"Location/{r['id']}" for r in _resources(ward["locations"])}
    for pid, bundle in ward["bundles"].items():
        local = {f"{r['resourceType']}/{r['id']}" for r in _resources(bundle)}
        for resource in _resources(bundle):
            for ref in _references(resource):
                assert "/" in ref and not ref.startswith(("http", "urn:"))
                assert ref in local or ref in locations, (pid, resource["resourceType"], ref)
            owner = resource.get("subject") or resource.get("patient")
            if resource["resourceType"] != "Patient":
                assert owner == {"reference": f"Patient/{pid}"} or owner["reference"] == f"Patient/{pid}"


def _times(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "birthDate" and isinstance(v, str) and len(v) > 10 and v[4] == "-" and "T" in v:
                yield datetime.fromisoformat(v)
            else:
                yield from _times(v)
    elif isinstance(node, list):
        for item in node:
            yield from _times(item)


def test_all_times_are_at_or_before_the_anchor(ward):
    seen = 0
    for bundle in ward["bundles"].values():
        for t in _times(bundle):
            assert t <= ANCHOR
            seen += 1
    assert seen > 1000


def test_ward_metadata_and_census(ward):
    wards = {w["id"]: w for w in ward["ward"]["wards"]}
    assert wards["ward-4b"]["name"] == "4B Med-Surg"
    assert 18 <= len(wards["ward-4b"]["patients"]) <= 24
    assert 1 <= len(wards["ward-5a"]["patients"]) <= 2
    assert ward["ward"]["anchor"] == ANCHOR.isoformat()
    for pid, bundle in ward["bundles"].items():
        enc = next(r for r in _resources(bundle) if r["resourceType"] == "Encounter")
        ward_ref, bed_ref = (loc["location"]["reference"] for loc in enc["location"])
        assert f"Patient/{pid}" in wards[ward_ref.split("/")[1]]["patients"]
        assert bed_ref.startswith(ward_ref + "-bed-")
        assert enc["status"] == "in-progress" and enc["class"]["code"] == "IMP"
        kinds = {r["resourceType"] for r in _resources(bundle)}
        assert {
            "Patient",
            "Encounter",
            "Condition",
            "MedicationRequest",
            "Observation",
            "DocumentReference",
        } <= kinds
        categories = {
            c["coding"][0]["code"]
            for r in _resources(bundle)
            if r["resourceType"] == "Observation"
            for c in r.get("category", [])
        }
        assert {"vital-signs", "laboratory", "survey"} <= categories
    beds = [r for r in _resources(ward["locations"]) if r["physicalType"]["coding"][0]["code"] == "bd"]
    assert all(b["partOf"]["reference"] in ("Location/ward-4b", "Location/ward-5a") for b in beds)


def test_answer_key_evidence_exists_in_the_patients_bundle(ward):
    key = ward["key"]
    assert key["anchor"] == ANCHOR.isoformat() and key["seed"] == 7
    for item in key["expected"]:
        pid = item["patient"].split("/")[1]
        local = {f"{r['resourceType']}/{r['id']}" for r in _resources(ward["bundles"][pid])}
        assert item["evidence"] and set(item["evidence"]) <= local, item


def test_injection_note_is_planted_once(ward):
    notes = {}
    for bundle in ward["bundles"].values():
        for r in _resources(bundle):
            if r["resourceType"] == "DocumentReference":
                notes[f"DocumentReference/{r['id']}"] = base64.b64decode(
                    r["content"][0]["attachment"]["data"]
                ).decode()
    hits = [ref for ref, text in notes.items() if "ignore previous instructions" in text.lower()]
    assert hits == ward["key"]["injection_notes"] and len(hits) == 1


def test_ckd_epi_2021_matches_published_examples():
    # Inker 2021: 50-year-old, creatinine 1.0 mg/dL -> about 92 (male) and 69 (female).
    assert ckd_epi_2021(1.0, 50, female=False) == 92
    assert ckd_epi_2021(1.0, 50, female=True) == 68 or ckd_epi_2021(1.0, 50, female=True) == 69


# ---- reference oracle: the rule thresholds from the brief, applied to the generated charts -----------------------
K_RAISING = {"potassium chloride", "spironolactone", "lisinopril", "losartan"}
DIURETICS = {"furosemide", "hydrochlorothiazide"}
GLUCOSE_LOWERING = {"insulin glargine", "insulin lispro", "glipizide"}
NSAIDS = {"ibuprofen", "ketorolac"}
NEPHROTOXIC = {"gentamicin", "vancomycin"}
QT_DRUGS = {"haloperidol", "ondansetron", "citalopram", "amiodarone"}
HYPONATREMIA = {"hydrochlorothiazide", "citalopram", "sertraline"}
DUP_CLASSES = {
    "anticoagulant": {"warfarin", "heparin", "enoxaparin", "apixaban"},
    "opioid": {"morphine", "oxycodone", "hydromorphone", "codeine"},
    "ssri": {"citalopram", "sertraline"},
    "nsaid": NSAIDS,
    "raas": {"lisinopril", "losartan"},
    "statin": {"atorvastatin"},
    "beta-blocker": {"metoprolol"},
}
PENICILLINS = {"amoxicillin", "piperacillin", "penicillin"}
K_CODES, NA, CREAT, CREAT_UMOL, EGFR = {"2823-3", "6298-4"}, "2951-2", "2160-0", "14682-9", "98979-8"
GLUCOSE_MG, GLUCOSE_MMOL = {"2345-7", "41653-7"}, "15074-8"


def _chart(bundle, data):
    by_code = {m["rxcui"]: m["ingredient"] for m in data["meds"].values()}
    names = {m["ingredient"] for m in data["meds"].values()}

    def ingredient(concept):
        for c in concept.get("coding", []):
            if c["code"] in by_code:
                return by_code[c["code"]]
        text = concept.get("text", "").lower()
        return next((n for n in names if n in text), None)

    res = _resources(bundle)
    orders = {
        r["id"]: r | {"_ing": ingredient(r["medicationCodeableConcept"])}
        for r in res
        if r["resourceType"] == "MedicationRequest"
    }
    admins = [
        r | {"_ing": ingredient(r["medicationCodeableConcept"])}
        for r in res
        if r["resourceType"] == "MedicationAdministration"
    ]
    obs = [
        r
        for r in res
        if r["resourceType"] == "Observation" and r["status"] == "final" and "valueQuantity" in r
    ]
    allergies = [r for r in res if r["resourceType"] == "AllergyIntolerance"]
    return orders, admins, obs, allergies


ALL_RULES = {
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
_NOW = [ANCHOR]  # the anchor the oracle measures result ages from


def _age_h(ts: str) -> float:
    return (_NOW[0] - datetime.fromisoformat(ts)).total_seconds() / 3600


def _series(obs, codes, factor_for=None, within_h=None):
    out = []
    for o in obs:
        code = o["code"]["coding"][0]["code"]
        if code in codes:
            v = o["valueQuantity"]["value"] * (factor_for(code) if factor_for else 1.0)
            h = _age_h(o["effectiveDateTime"])
            if within_h is None or h <= within_h:
                out.append((h, v, o))
    return sorted(out, key=lambda x: x[0])  # newest first


def _creat_rise(obs):
    s = _series(obs, {CREAT, CREAT_UMOL}, lambda c: 1 / 88.42 if c == CREAT_UMOL else 1.0)
    if not s or s[0][0] > 48:
        return False
    h0, latest, _ = s[0]
    prior48 = [v for h, v, _ in s[1:] if h - h0 < 48]
    prior7d = [v for h, v, _ in s[1:] if h - h0 <= 168]
    return bool((prior48 and latest - min(prior48) >= 0.3) or (prior7d and latest >= 1.5 * min(prior7d)))


def _fired(bundle, data):  # noqa: C901 - one branch per rule keeps the oracle readable
    orders, admins, obs, allergies = _chart(bundle, data)
    active = {o["_ing"] for o in orders.values() if o["status"] == "active" and o["_ing"]}
    fired = set()

    def latest(codes, within, factor=None):
        s = _series(obs, codes, factor, within)
        return s[0][1] if s else None

    k = latest(K_CODES, 24)
    if k is not None and k > 5.0 and active & K_RAISING:
        fired.add("hyperkalemia-k-raising-drug")
    if k is not None and k < 3.5 and "digoxin" in active:
        fired.add("hypokalemia-digoxin")
    if k is not None and k < 3.5 and active & DIURETICS:
        fired.add("hypokalemia-diuretic")
    inr = latest({"6301-6"}, 48)
    if inr is not None and inr > 4.0 and "warfarin" in active:
        fired.add("inr-supratherapeutic-warfarin")
    glucose = _series(obs, GLUCOSE_MG | {GLUCOSE_MMOL}, lambda c: 18.016 if c == GLUCOSE_MMOL else 1.0, 24)
    if any(v < 70 for _, v, _ in glucose) and active & GLUCOSE_LOWERING:
        fired.add("hypoglycemia-insulin-sulfonylurea")
    egfr = latest({EGFR}, 72)
    if egfr is not None and egfr < 30 and "metformin" in active:
        fired.add("metformin-low-egfr")
    if egfr is not None and egfr < 30 and active & NSAIDS:
        fired.add("nsaid-low-egfr")
    if _creat_rise(obs) and active & NSAIDS:
        fired.add("nsaid-aki")
    if _creat_rise(obs) and active & NEPHROTOXIC:
        fired.add("nephrotoxic-creatinine-rise")
    heparin = [o for o in orders.values() if o["status"] == "active" and o["_ing"] == "heparin"]
    for o in heparin:
        plts = [v for h, v, _ in _series(obs, {"777-3"}) if h <= _age_h(o["authoredOn"])]
        if plts and plts[0] < 0.5 * max(plts):
            fired.add("heparin-platelet-fall-hit")
    for code, limit, ing, rule in (
        ("10535-3", 2.0, "digoxin", "digoxin-level-high"),
        ("14334-7", 1.2, "lithium carbonate", "lithium-level-high"),
        ("4090-7", 20.0, "vancomycin", "vancomycin-trough-high"),
    ):
        level = latest({code}, 72)
        if level is not None and level > limit and ing in active:
            fired.add(rule)
    qtc = latest({"8636-3"}, 72)
    if qtc is not None and qtc > 500 and active & QT_DRUGS:
        fired.add("qtc-prolonged-qt-drug")
    na = latest({NA}, 48)
    if na is not None and na < 130 and active & HYPONATREMIA:
        fired.add("hyponatremia-thiazide-ssri")
    for a in allergies:
        code = a["code"]["coding"][0]["code"]
        sub = {
            "70618": "penicillin",
            "5640": "ibuprofen",
            "10180": "sulfamethoxazole",
            "2670": "codeine",
        }.get(code)
        if sub and (sub in active or (sub == "penicillin" and active & PENICILLINS)):
            fired.add("allergy-order-conflict")
    if any(len(active & members) >= 2 for members in DUP_CLASSES.values()):
        fired.add("duplicate-therapy")
    for a in admins:
        ref = a.get("request", {}).get("reference", "")
        order = orders.get(ref.split("/")[-1])
        if (
            a["status"] == "completed"
            and (order is None or order["status"] in ("entered-in-error", "cancelled"))
            and a["_ing"] not in active
        ):
            fired.add("administration-without-order")
    for oid, o in orders.items():
        dosage = o["dosageInstruction"][0]
        if o["status"] != "active" or dosage.get("asNeededBoolean") or _age_h(o["authoredOn"]) <= 24:
            continue
        given = [
            a
            for a in admins
            if a.get("request", {}).get("reference") == f"MedicationRequest/{oid}"
            and a["status"] == "completed"
            and _age_h(
                a.get("effectiveDateTime") or a["effectivePeriod"].get("end", a["effectivePeriod"]["start"])
            )
            <= 24
        ]
        if not given:
            fired.add("order-not-administered")
    if "warfarin" in active and latest({"6301-6"}, 72) is None:
        fired.add("monitoring-gap-warfarin-inr")
    infusion = [o for o in heparin if "rateQuantity" in o["dosageInstruction"][0]["doseAndRate"][0]]
    if infusion and latest({"777-3"}, 72) is None:
        fired.add("monitoring-gap-heparin-platelets")
    return fired


def test_oracle_fires_exactly_the_planted_rules(ward):
    data = load_scenarios()
    key = ward["key"]
    expected = {(e["patient"], e["rule"]) for e in key["expected"]}
    must_not = {(m["patient"], m["rule"]) for m in key["must_not_fire"]}
    fired = {(f"Patient/{pid}", rule) for pid, b in ward["bundles"].items() for rule in _fired(b, data)}
    assert fired - expected == set(), "unplanned rule firings"
    assert expected - fired == set(), "planted rules the thresholds do not trigger"
    assert not fired & must_not
    assert {e["rule"] for e in key["expected"]} == ALL_RULES
    assert len(must_not) >= 10 and {m["rule"] for m in key["must_not_fire"]} <= ALL_RULES


def test_answer_key_holds_for_other_seeds_and_anchor_times(tmp_path):
    data = load_scenarios()
    for seed, anchor in ((1, ANCHOR), (99, ANCHOR + timedelta(hours=8, minutes=30))):
        out = tmp_path / f"s{seed}"
        m = generate_demo_ward(out, anchor=anchor, seed=seed)
        key = json.loads((out / "answer_key.json").read_text("utf-8"))
        _NOW[0] = anchor
        try:
            fired = {
                (f"Patient/{pid}", r)
                for pid in m.patient_ids
                for r in _fired(json.loads((out / f"{pid}.json").read_text()), data)
            }
        finally:
            _NOW[0] = ANCHOR
        assert fired == {(e["patient"], e["rule"]) for e in key["expected"]}, seed


def test_planted_units_and_codes_are_present(ward):
    codes = {}
    for bundle in ward["bundles"].values():
        for r in _resources(bundle):
            if r["resourceType"] == "Observation" and "valueQuantity" in r:
                codes.setdefault(r["code"]["coding"][0]["code"], set()).add(r["valueQuantity"]["code"])
    assert "meq/L" in codes["2823-3"] and "6298-4" in codes
    assert codes["14682-9"] == {"umol/L"} and codes["15074-8"] == {"mmol/L"}
    for loinc in (
        "8867-4",
        "9279-1",
        "8310-5",
        "59408-5",
        "72514-3",
        "38227-7",
        "59460-6",
        "8636-3",
        "41653-7",
        "98979-8",
    ):
        assert loinc in codes, loinc
    statuses = {
        r["status"]
        for b in ward["bundles"].values()
        for r in _resources(b)
        if r["resourceType"] == "MedicationRequest"
    }
    assert {"active", "stopped", "completed", "on-hold"} <= statuses
    text_only = [
        r
        for b in ward["bundles"].values()
        for r in _resources(b)
        if r["resourceType"] == "MedicationRequest" and "coding" not in r["medicationCodeableConcept"]
    ]
    assert len(text_only) >= 3


def test_deteriorating_patients_in_the_answer_key_score_news2_high(demo_ward_dir, demo_anchor):
    import json

    from assistant.rules.news2 import news2
    from connectors.bundle_dir import BundleDirSource

    key = json.loads((demo_ward_dir / "answer_key.json").read_text())
    source = BundleDirSource(demo_ward_dir)
    flagged = {d["patient"] for d in key["deteriorating"]}
    assert flagged
    for pid in source.iter_patient_ids():
        score = news2(source.patient_chart(pid), now=demo_anchor)
        if f"Patient/{pid}" in flagged:
            assert score.total >= 7, pid

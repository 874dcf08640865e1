"""Normalization: unit and code tables, medication resolution, and malformed input that must not break a chart."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from assistant.normalize import (
    PatientNotFoundError,
    build_chart,
    code_status,
    current_encounter,
    is_current_encounter,
    parse_datetime,
)
from assistant.terminology import fhir_codes, terminology

PID = "p1"


def patient(**extra):
    return {
        "resourceType": "Patient",
        "id": PID,
        "name": [{"given": ["Ada"], "family": "Test"}],
        "birthDate": "1950-02-03",
        "gender": "female",
        **extra,
    }


def obs(
    oid, loinc, value, unit, *, when="2026-03-16T05:00:00Z", status="final", category="laboratory", **extra
):
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": status,
        "subject": {"reference": f"Patient/{PID}"},
        "category": [{"coding": [{"code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": unit},
        **extra,
    }


def med_request(mid, text=None, code=None, status="active", **extra):
    concept = {}
    if text:
        concept["text"] = text
    if code:
        concept["coding"] = [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code}]
    return {
        "resourceType": "MedicationRequest",
        "id": mid,
        "status": status,
        "intent": "order",
        "subject": {"reference": f"Patient/{PID}"},
        "medicationCodeableConcept": concept,
        **extra,
    }


def chart_of(*resources, **kw):
    return build_chart([patient(), *resources], source="test", **kw)


@pytest.mark.parametrize(
    ("loinc", "value", "unit", "analyte", "expected"),
    [
        ("2823-3", 5.9, "mmol/L", "potassium", 5.9),
        ("6298-4", 5.6, "mEq/L", "potassium", 5.6),
        ("2345-7", 65, "mg/dL", "glucose", 65),
        ("41653-7", 3.2, "mmol/L", "glucose", 57.6512),
        ("15074-8", 5.0, "mmol/L", "glucose", 90.08),
        ("2160-0", 1.2, "mg/dL", "creatinine", 1.2),
        ("14682-9", 88.4, "umol/L", "creatinine", 1.0),
        ("33914-3", 22, "mL/min/{1.73_m2}", "egfr", 22),
        ("62238-1", 45, "mL/min/1.73m2", "egfr", 45),
        ("98979-8", 28, "mL/min/1.73m2", "egfr", 28),
        ("6301-6", 4.8, "{INR}", "inr", 4.8),
        ("777-3", 150000, "/uL", "platelets", 150),
        ("777-3", 210, "10*9/L", "platelets", 210),
        ("718-7", 95, "g/L", "hemoglobin", 9.5),
        ("10535-3", 3.2, "nmol/L", "digoxin", 2.4992),
        ("14334-7", 1.6, "mEq/L", "lithium", 1.6),
        ("4090-7", 24, "ug/mL", "vancomycin", 24),
        ("8636-3", 0.52, "s", "qtc", 520),
        ("8310-5", 98.6, "[degF]", "temperature", 37.0),
        ("8310-5", 38.4, "Cel", "temperature", 38.4),
        ("2951-2", 128, "mEq/L", "sodium", 128),
    ],
)
def test_units_convert_to_one_canonical_unit_per_analyte(loinc, value, unit, analyte, expected):
    chart = chart_of(obs("o1", loinc, value, unit))
    (result,) = chart.results
    assert result.analyte == analyte
    assert result.unit == terminology().analytes[analyte].canonical_unit
    assert result.value == pytest.approx(expected, abs=1e-3)
    assert result.original.value == value and result.original.unit == unit
    assert not chart.issues


def test_unknown_unit_is_an_issue_and_never_a_value():
    chart = chart_of(obs("o1", "2823-3", 5.9, "mg/furlong"))
    (result,) = chart.results
    assert result.value is None and result.original.unit == "mg/furlong"
    (issue,) = chart.issues
    assert issue.code == "unknown-unit" and issue.source == "Observation/o1"
    assert "lab_analytes.toml" in issue.message


def test_unmapped_loinc_keeps_its_own_unit():
    chart = chart_of(obs("o1", "1234-5", 7, "widgets"))
    assert chart.results[0].analyte == "loinc:1234-5" and chart.results[0].unit == "widgets"


def test_every_loinc_code_maps_to_one_analyte_only():
    seen = {}
    for analyte in terminology().analytes.values():
        for code in analyte.loinc:
            assert code not in seen, (code, seen.get(code), analyte.key)
            seen[code] = analyte.key


@pytest.mark.parametrize(
    ("text", "code", "ingredient", "how"),
    [
        ("KCl 20 mEq PO BID", None, "potassium-chloride", "name"),
        ("Lasix 40 mg IV daily", None, "furosemide", "name"),
        ("Coumadin 5 mg", None, "warfarin", "name"),
        (None, "11289", "warfarin", "rxnorm"),
        ("Warfarin Sodium 5 MG Oral Tablet", "855332", "warfarin", "rxnorm"),
        ("Insulin glargine 100 unit/mL", None, "insulin-glargine", "name"),
        ("amoxicillin 500 MG Oral Capsule", "308191", "amoxicillin", "rxnorm"),
        ("Acetaminophen 325 MG / oxyCODONE Hydrochloride 5 MG Oral Tablet", None, "oxycodone", "name"),
    ],
)
def test_medication_resolves_by_rxnorm_or_by_name(text, code, ingredient, how):
    chart = chart_of(med_request("m1", text=text, code=code))
    (order,) = chart.orders
    assert ingredient in order.ingredients
    assert order.resolved_by == how


def test_code_that_contradicts_the_name_is_flagged_and_the_name_wins():
    chart = chart_of(med_request("m1", text="Furosemide 40 mg", code="11289"))
    assert chart.orders[0].ingredients == ("furosemide",)
    assert [i.code for i in chart.issues] == ["code-text-conflict"]


def test_unknown_medication_is_an_issue():
    chart = chart_of(med_request("m1", text="Unobtainium 5 mg"))
    assert chart.orders[0].resolved_by == "unresolved"
    assert chart.issues[0].code == "unknown-medication"


def test_allergy_to_a_class_keeps_the_class():
    allergy = {
        "resourceType": "AllergyIntolerance",
        "id": "a1",
        "patient": {"reference": f"Patient/{PID}"},
        "code": {"text": "Penicillins"},
        "category": ["medication"],
        "clinicalStatus": {"coding": [{"code": "active"}]},
    }
    chart = chart_of(allergy)
    assert "penicillin" in chart.allergies[0].classes and chart.allergies[0].is_active


def test_a_wrong_type_costs_only_its_field_and_says_so():
    bad = obs("bad", "2823-3", "five point nine", "mmol/L", when="2026-03-16T06:00:00Z")
    bad_date = obs("bad-date", "2823-3", 4.0, "mmol/L", when="yesterday")
    good = obs("good", "2823-3", 4.1, "mmol/L")
    chart = chart_of(
        bad, bad_date, good, med_request("m1", text="KCl 20 mEq", dosageInstruction="twice daily")
    )
    # Every resource is still in the chart; only the unreadable field is gone.
    assert {r.ref for r in chart.results} == {"Observation/bad", "Observation/bad-date", "Observation/good"}
    by_ref = {r.ref: r for r in chart.results}
    assert by_ref["Observation/bad"].value is None
    assert by_ref["Observation/bad"].value_text == "five point nine mmol/L"  # what the source says, not 4.1
    assert by_ref["Observation/bad-date"].time is None and by_ref["Observation/bad-date"].value == 4.0
    order = chart.orders[0]
    assert order.ref == "MedicationRequest/m1" and order.ingredients == ("potassium-chloride",)
    assert order.is_active and order.dose_text is None
    issues = {i.source: i for i in chart.issues if i.code == "invalid-resource"}
    assert set(issues) == {"Observation/bad", "Observation/bad-date", "MedicationRequest/m1"}
    assert all(i.severity == "error" for i in chart.issues)
    assert {i.code for i in chart.issues if i.source != "Observation/bad"} == {"invalid-resource"}
    # The unreadable value is the newest potassium: the chart says that the latest value shown is older.
    assert {i.code for i in chart.issues if i.source == "Observation/bad"} == {
        "invalid-resource",
        "stale-latest",
    }
    assert "dosageInstruction" in issues["MedicationRequest/m1"].message
    # A result without its value or time says that an older one may show as the latest.
    assert "older one may show" in issues["Observation/bad"].message
    assert "older one may show" in issues["Observation/bad-date"].message


def test_an_unreadable_newest_value_says_the_latest_shown_is_older():
    chart = chart_of(
        obs("old", "2823-3", 4.6, "mmol/L", when="2026-03-15T05:00:00Z"),
        obs("new", "2823-3", "5,9", "mmol/L", when="2026-03-16T05:00:00Z"),
    )
    assert chart.latest("potassium").ref == "Observation/new" and chart.latest("potassium").value is None
    stale = [i for i in chart.issues if i.code == "stale-latest"]
    assert len(stale) == 1 and stale[0].source == "Observation/new" and "Observation/old" in stale[0].message
    fine = chart_of(
        obs("old", "2823-3", 4.6, "mmol/L", when="2026-03-15T05:00:00Z"),
        obs("new", "2823-3", 5.9, "mmol/L", when="2026-03-16T05:00:00Z"),
    )
    assert fine.issues == []


def test_a_numeric_string_is_read_as_a_number_with_a_warning():
    chart = chart_of(
        obs("old", "2823-3", 4.6, "mmol/L", when="2026-03-15T05:00:00Z"),
        obs("new", "2823-3", "5.9", "mmol/L", when="2026-03-16T05:00:00Z"),
    )
    assert chart.latest("potassium").ref == "Observation/new"
    assert chart.latest("potassium").value == 5.9
    [issue] = chart.issues
    assert (issue.source, issue.code, issue.severity) == ("Observation/new", "numeric-string", "warning")
    assert "'5.9'" in issue.message


@pytest.mark.parametrize("text", ["5,9", "<5", "5.9.1", "1e999", "nan", " "])
def test_a_string_that_is_not_a_plain_number_is_refused_with_an_issue(text):
    chart = chart_of(obs("new", "2823-3", text, "mmol/L"))
    assert chart.results[0].value is None
    assert [i.code for i in chart.issues] == ["invalid-resource"]


def test_a_bad_birth_date_keeps_the_name_and_mrn():
    p = patient(
        birthDate="1950-02-31",
        identifier=[{"type": {"coding": [{"code": "MR"}]}, "value": "MRN-7"}],
    )
    chart = build_chart([p, obs("k", "2823-3", 4.0, "mmol/L")], source="t")
    assert (chart.patient.name, chart.patient.mrn, chart.patient.birth_date) == ("Ada Test", "MRN-7", None)
    assert chart.patient.sex == "female"
    assert [(i.source, i.code) for i in chart.issues] == [(f"Patient/{PID}", "invalid-resource")]
    assert "birthDate" in chart.issues[0].message


def test_given_name_as_a_number_keeps_the_family_name():
    chart = build_chart([patient(name=[{"given": 5, "family": "Test"}])], source="t")
    assert chart.patient.name == "Test"
    assert "given" in chart.issues[0].message


def test_encounter_location_as_a_string_keeps_the_encounter():
    enc = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "in-progress",
        "class": {"code": "IMP"},
        "subject": {"reference": f"Patient/{PID}"},
        "period": {"start": "2026-03-14T10:00:00Z"},
        "location": [{"location": "Location/ward-a"}, "junk"],
    }
    chart = chart_of(enc)
    assert chart.encounter is not None and chart.encounter.ref == "Encounter/e1"
    assert chart.encounter.ward_ref is None
    assert len(chart.issues) == 2 and {i.source for i in chart.issues} == {"Encounter/e1"}


def test_an_unattributable_subject_is_not_shown():
    bad = obs("k", "2823-3", 6.5, "mmol/L", subject="Patient/p1")
    chart = chart_of(bad)
    assert chart.results == []
    assert chart.issues[0].source == "Observation/k" and "attributed" in chart.issues[0].message


def test_duplicates_are_merged_newest_last_updated_wins_and_counted():
    older = obs("k", "2823-3", 4.0, "mmol/L", meta={"lastUpdated": "2026-03-16T05:00:00Z"})
    newer = obs("k", "2823-3", 6.1, "mmol/L", meta={"lastUpdated": "2026-03-16T06:00:00+01:00"})
    newest = obs("k", "2823-3", 5.2, "mmol/L", meta={"lastUpdated": "2026-03-16T05:30:00Z"})
    chart = chart_of(older, newest, newer)  # 06:00+01:00 is 05:00Z, older than 05:30Z
    assert [r.value for r in chart.results] == [5.2]
    [issue] = chart.issues
    assert issue.code == "duplicate-resource" and issue.message.startswith("2 duplicate resources")
    chart = chart_of(newest, older)
    assert [r.value for r in chart.results] == [5.2]


def test_shared_resource_copies_are_not_counted_as_duplicates():
    loc = {"resourceType": "Location", "id": "w", "name": "Ward W"}
    chart = chart_of(loc, dict(loc))
    assert chart.issues == [] and "Location/w" in chart.resources


def test_reference_to_a_missing_resource_is_reported():
    admin = {
        "resourceType": "MedicationAdministration",
        "id": "ma1",
        "status": "completed",
        "subject": {"reference": f"Patient/{PID}"},
        "request": {"reference": "MedicationRequest/gone"},
        "medicationCodeableConcept": {"text": "heparin 5000 units"},
        "effectiveDateTime": "2026-03-16T06:00:00Z",
    }
    by_ref = med_request(
        "m2", medicationCodeableConcept=None, medicationReference={"reference": "Medication/x"}
    )
    chart = chart_of(admin, by_ref)
    assert chart.administrations[0].order_ref == "MedicationRequest/gone"
    issues = {(i.source, i.code) for i in chart.issues}
    assert ("MedicationAdministration/ma1", "unresolved-reference") in issues
    assert ("MedicationRequest/m2", "unresolved-reference") in issues


def test_resources_of_other_patients_are_not_shown():
    other = obs("o2", "2823-3", 6.5, "mmol/L")
    other["subject"] = {"reference": "Patient/someone-else"}
    assert chart_of(other).results == []


def test_entries_that_are_not_resources_or_lack_ids():
    chart = build_chart([patient(), "junk", {"resourceType": "Observation"}], source="t")
    assert sorted(i.code for i in chart.issues) == ["invalid-resource", "invalid-resource"]


def test_missing_patient_is_a_clear_error():
    with pytest.raises(PatientNotFoundError, match="check the patient id"):
        build_chart([patient()], source="t", patient_id="other")


def test_strict_mode_rejects_what_fhir_resources_rejects():
    bad = obs("o1", "2823-3", 4.0, "mmol/L", notAnR4Field=True)  # the fast path ignores unknown fields
    chart = chart_of(bad, obs("o2", "2823-3", 4.2, "mmol/L"), strict=True)
    assert [r.ref for r in chart.results] == ["Observation/o2"]
    assert chart.issues[0].source == "Observation/o1" and "R4B" in chart.issues[0].message


def test_notes_decode_and_entered_in_error_is_dropped():
    def note(nid, text, status="current"):
        return {
            "resourceType": "DocumentReference",
            "id": nid,
            "status": status,
            "subject": {"reference": f"Patient/{PID}"},
            "date": "2026-03-16T04:00:00Z",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain",
                        "data": base64.b64encode(text.encode()).decode(),
                    }
                }
            ],
        }

    chart = chart_of(note("n1", "Slept well."), note("n2", "wrong chart", "entered-in-error"))
    assert [n.text for n in chart.notes] == ["Slept well."]


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2026", "2026-01-01T00:00:00+00:00"),
        ("2026-03", "2026-03-01T00:00:00+00:00"),
        ("2026-03-16", "2026-03-16T00:00:00+00:00"),
        ("2026-03-16T05:00:00-04:00", "2026-03-16T09:00:00+00:00"),
        ("2026-03-16T05:00:00Z", "2026-03-16T05:00:00+00:00"),
    ],
)
def test_fhir_datetimes_become_utc(text, iso):
    assert parse_datetime(text).isoformat() == iso


def encounter(eid, status, cls="IMP", start="2026-03-14T10:00:00Z"):
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": status,
        "class": {"code": cls},
        "subject": {"reference": f"Patient/{PID}"},
        "period": {"start": start},
    }


def test_current_encounter_uses_the_statuses_and_classes_in_fhir_codes():
    codes = fhir_codes()
    assert {"in-progress", "arrived", "triaged", "onleave"} <= codes.current_encounter_statuses
    assert "finished" not in codes.current_encounter_statuses
    chart = chart_of(
        encounter("done", "finished", start="2026-03-15T00:00:00Z"),
        encounter("amb", "in-progress", cls="AMB", start="2026-03-15T09:00:00Z"),
        encounter("stay", "onleave"),
    )
    assert (
        chart.encounter.ref == "Encounter/stay"
    )  # current, and an inpatient class wins over a later AMB visit
    assert current_encounter(chart.encounters) is chart.encounter
    assert chart_of(encounter("done", "finished")).encounter is None
    assert is_current_encounter(encounter("x", "triaged")) and not is_current_encounter(
        {"status": ["arrived"]}
    )


def code_status_obs(oid, code, text, when="2026-03-15T06:00:00Z", loinc="100822-6"):
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"Patient/{PID}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}], "text": "Code status"},
        "effectiveDateTime": when,
        "valueCodeableConcept": {
            "coding": [{"system": "http://snomed.info/sct", "code": code}],
            "text": text,
        },
    }


def test_code_status_is_read_from_loinc_100822_6_not_from_keywords():
    chart = chart_of(
        code_status_obs("cs1", "304252001", "Full code", when="2026-03-14T06:00:00Z"),
        code_status_obs("cs2", "304253006", "Not for resus (ward wording)"),
        code_status_obs("other", "304253006", "DNR", loinc="8310-5"),  # a DNR word under another code: not it
    )
    status = code_status(chart)
    assert (status.ref, status.kind, status.text) == (
        "Observation/cs2",
        "dnr",
        "Not for resus (ward wording)",
    )
    assert code_status(chart_of(obs("k", "2823-3", 4.0, "mmol/L"))) is None
    unknown = code_status(chart_of(code_status_obs("cs3", "999", "Limited interventions")))
    assert (unknown.kind, unknown.text) == ("unknown", "Limited interventions")


def test_every_fhir_code_table_names_its_public_source():
    text = (Path(__file__).resolve().parent.parent / "assistant" / "data" / "fhir_codes.toml").read_text()
    tables = [line for line in text.splitlines() if line.startswith("[")]
    assert tables
    for block in text.split("\n[")[1:]:
        assert "Source" in block or "Sources" in block or "http" in block, block.splitlines()[0]


def test_the_demo_ward_code_status_is_found(demo_ward_dir):
    from connectors.bundle_dir import BundleDirSource

    source = BundleDirSource(demo_ward_dir)
    kinds = {code_status(source.patient_chart(pid)).kind for pid in source.iter_patient_ids()}
    assert kinds == {"full", "dnr"}

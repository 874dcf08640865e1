"""Wrong JSON types in any field: no exception, only that field lost (and said), everything else intact."""

from __future__ import annotations

import base64
import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant.normalize import PatientNotFoundError, build_chart
from assistant.rules.engine import evaluate
from connectors.bundle_dir import BundleDirSource

NOW = datetime(2026, 3, 16, 9, 0, tzinfo=UTC)  # a frozen clock; UTC like every chart time
LOINC = "http://loinc.org"
# One value of every JSON type, plus a numeric string: each replaces fields of another type.
WRONG = [None, True, 0, 2.5, "x", "5.9", [], [1], ["x"], {}, {"a": 1}]
# Fields that say WHAT or WHOSE a resource is: changing them is a different resource, tested apart.
IDENTITY = {
    ("resourceType",),
    ("id",),
    ("subject",),
    ("patient",),
    ("subject", "reference"),
    ("patient", "reference"),
}


def patient_resources(pid: str) -> list[dict]:
    subject = {"reference": f"Patient/{pid}"}
    note = base64.b64encode(b"Patient comfortable overnight.").decode()
    return [
        {
            "resourceType": "Patient",
            "id": pid,
            "name": [{"use": "official", "given": ["Ada", "B"], "family": "Test"}],
            "birthDate": "1950-02-03",
            "gender": "female",
            "identifier": [{"type": {"coding": [{"code": "MR"}]}, "value": f"MRN-{pid}"}],
        },
        {
            "resourceType": "Encounter",
            "id": f"{pid}-enc",
            "status": "in-progress",
            "class": {"code": "IMP"},
            "subject": subject,
            "period": {"start": "2026-03-14T10:00:00Z"},
            "reasonCode": [{"text": "Heart failure"}],
            "location": [{"location": {"reference": "Location/bed-1"}, "status": "active"}],
        },
        {
            "resourceType": "Observation",
            "id": f"{pid}-k",
            "status": "final",
            "subject": subject,
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": "2823-3", "display": "Potassium"}]},
            "effectiveDateTime": "2026-03-16T05:00:00Z",
            "valueQuantity": {"value": 6.4, "unit": "mmol/L"},
            "referenceRange": [{"low": {"value": 3.5}, "high": {"value": 5.1}}],
            "interpretation": [{"coding": [{"code": "H"}]}],
        },
        {
            "resourceType": "Observation",
            "id": f"{pid}-bp",
            "status": "final",
            "subject": subject,
            "category": [{"coding": [{"code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
            "effectiveDateTime": "2026-03-16T06:00:00Z",
            "component": [
                {
                    "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                    "valueQuantity": {"value": 92, "unit": "mm[Hg]"},
                },
                {
                    "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                    "valueQuantity": {"value": 55, "unit": "mm[Hg]"},
                },
            ],
        },
        {
            "resourceType": "MedicationRequest",
            "id": f"{pid}-kcl",
            "status": "active",
            "intent": "order",
            "subject": subject,
            "medicationCodeableConcept": {"text": "Potassium chloride 20 mEq oral tablet"},
            "authoredOn": "2026-03-15T08:00:00Z",
            "dosageInstruction": [
                {
                    "text": "20 mEq twice daily",
                    "route": {"text": "oral"},
                    "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}},
                    "doseAndRate": [{"doseQuantity": {"value": 20, "unit": "mEq"}}],
                }
            ],
        },
        {
            "resourceType": "MedicationAdministration",
            "id": f"{pid}-kcl-1",
            "status": "completed",
            "subject": subject,
            "request": {"reference": f"MedicationRequest/{pid}-kcl"},
            "medicationCodeableConcept": {"text": "Potassium chloride 20 mEq oral tablet"},
            "effectiveDateTime": "2026-03-16T08:00:00Z",
            "dosage": {"dose": {"value": 20, "unit": "mEq"}},
        },
        {
            "resourceType": "AllergyIntolerance",
            "id": f"{pid}-pen",
            "patient": subject,
            "code": {"text": "Penicillin"},
            "category": ["medication"],
            "criticality": "high",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "reaction": [{"manifestation": [{"text": "Anaphylaxis"}]}],
        },
        {
            "resourceType": "Condition",
            "id": f"{pid}-hf",
            "subject": subject,
            "code": {"text": "Heart failure"},
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "onsetDateTime": "2020-01-01",
        },
        {
            "resourceType": "DocumentReference",
            "id": f"{pid}-note",
            "status": "current",
            "subject": subject,
            "date": "2026-03-16T04:00:00Z",
            "type": {"text": "Nursing note"},
            "content": [{"attachment": {"contentType": "text/plain", "data": note}}],
        },
    ]


LOCATIONS = [
    {
        "resourceType": "Location",
        "id": "ward-1",
        "name": "Ward 1",
        "physicalType": {"coding": [{"code": "wa"}]},
    },
    {
        "resourceType": "Location",
        "id": "bed-1",
        "name": "Bed 1",
        "physicalType": {"coding": [{"code": "bd"}]},
        "partOf": {"reference": "Location/ward-1"},
    },
]
MINE, OTHER = patient_resources("p1"), patient_resources("p2")


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every field and array entry under a resource, as a path of keys and indices."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out.extend(paths(value, (*prefix, key)))
    return out


def json_type(value: Any) -> str:
    return (
        "bool"
        if isinstance(value, bool)
        else "number"
        if isinstance(value, (int, float))
        else type(value).__name__
    )


def replaced(resource: dict, path: tuple, value: Any) -> dict:
    out = copy.deepcopy(resource)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def value_at(resource: dict, path: tuple) -> Any:
    node: Any = resource
    for key in path:
        node = node[key]
    return node


CASES = [
    (n, path, wrong)
    for n, resource in enumerate(MINE)
    for path in paths(resource)
    if path not in IDENTITY and not (resource["resourceType"] == "Patient" and path == ("id",))
    for wrong in WRONG
    if json_type(wrong) != json_type(value_at(resource, path))
]


def facts_by_ref(chart) -> dict[str, list]:
    """What the chart shows, per source resource (the patient's demographics under its own ref)."""
    out: dict[str, list] = {chart.patient.ref: [repr(chart.patient)]}
    for group in (
        chart.encounters,
        chart.allergies,
        chart.conditions,
        chart.orders,
        chart.administrations,
        chart.results,
        chart.notes,
    ):
        for item in group:
            out.setdefault(item.ref, []).append(repr(item))
    return out


def charts(resources: list[dict]):
    everything = [*resources, *OTHER, *LOCATIONS]
    return (
        build_chart(everything, source="t", patient_id="p1"),
        build_chart(everything, source="t", patient_id="p2"),
    )


BASE_MINE, BASE_OTHER = charts(MINE)
BASE_FACTS, OTHER_FACTS = facts_by_ref(BASE_MINE), facts_by_ref(BASE_OTHER)


def check(n: int, mutated: dict, *, nulled: bool = False) -> None:
    resources = [mutated if i == n else r for i, r in enumerate(MINE)]
    mine, other = charts(resources)  # no exception, whatever the shape
    evaluate(mine, now=NOW)
    evaluate(other, now=NOW)
    ref = f"{MINE[n]['resourceType']}/{MINE[n]['id']}"
    # The other patient is untouched.
    assert facts_by_ref(other) == OTHER_FACTS
    facts = facts_by_ref(mine)
    # Every other resource of this patient reads exactly as before.
    assert {k: v for k, v in facts.items() if k != ref} == {k: v for k, v in BASE_FACTS.items() if k != ref}
    # The damaged resource is still shown (only a field was lost) ...
    assert ref in facts, f"{ref} was dropped whole"
    # ... and when what it shows changed, the chart says why, on that resource (a null is a field left out, and
    # shows as such, e.g. "(no name recorded)").
    if facts[ref] != BASE_FACTS[ref] and not nulled:
        assert any(i.source == ref for i in mine.issues), f"{ref} changed silently"


def test_the_baseline_chart_reads_every_resource():
    assert set(BASE_FACTS) == {f"{r['resourceType']}/{r['id']}" for r in MINE}
    assert BASE_MINE.issues == [] and BASE_MINE.encounter.ward_ref == "Location/ward-1"
    assert len(CASES) > 400  # the sweep below reaches nested fields, not only the top level


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CASES))
def test_any_field_of_any_wrong_type_costs_only_that_field(case):
    n, path, wrong = case
    check(n, replaced(MINE[n], path, wrong), nulled=wrong is None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(CASES), min_size=2, max_size=4))
def test_several_wrong_fields_in_one_resource(cases):
    n = cases[0][0]
    mutated = copy.deepcopy(MINE[n])
    nulled = False
    for m, path, wrong in cases:
        if m != n:
            continue
        try:
            mutated = replaced(mutated, path, wrong)
            nulled = nulled or wrong is None
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed the parent of this path
    check(n, mutated, nulled=nulled)


OWNED = [(n, field) for n, r in enumerate(MINE) for field in ("subject", "patient") if field in r]


@pytest.mark.parametrize(("n", "field"), OWNED, ids=[f"{MINE[n]['id']}.{f}" for n, f in OWNED])
def test_an_unreadable_owner_drops_only_that_resource_and_says_so(n, field):
    ref = f"{MINE[n]['resourceType']}/{MINE[n]['id']}"
    for wrong in ("Patient/p1", 5, ["Patient/p1"], {"reference": 5}, {}):
        mine, other = charts(
            [replaced(MINE[n], (field,), wrong) if i == n else r for i, r in enumerate(MINE)]
        )
        assert ref not in facts_by_ref(mine), wrong  # never shown in a chart it may not belong to
        assert any(i.source == ref for i in mine.issues), wrong
        assert facts_by_ref(other) == OTHER_FACTS


def test_a_patient_id_that_is_not_a_string_is_named_in_the_error():
    with pytest.raises(PatientNotFoundError, match="without a string id"):
        charts([replaced(MINE[0], ("id",), ["p1"]), *MINE[1:]])


def write_folder(root: Path, mine: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, resources in (("p1.json", mine), ("p2.json", OTHER), ("locations.json", LOCATIONS)):
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": r} for r in resources],
        }
        (root / name).write_text(json.dumps(bundle))
    return root


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.sampled_from(CASES + [(0, ("id",), w) for w in WRONG if not isinstance(w, str)]))
def test_bundle_folder_lists_wards_census_and_every_other_patient(tmp_path_factory, case):
    n, path, wrong = case
    root = write_folder(
        tmp_path_factory.mktemp("wt"),
        [replaced(MINE[n], path, wrong) if i == n else r for i, r in enumerate(MINE)],
    )
    source = BundleDirSource(root)
    ids = list(source.iter_patient_ids())
    assert "p2" in ids
    assert [w.ref for w in source.wards()] == ["Location/ward-1"]
    census = {e.patient_id for e in source.ward_census("Location/ward-1")}
    assert "p2" in census
    records = {r.patient_id: r for r in source.iter_patient_records()}
    assert records["p2"].error is None
    assert facts_by_ref(source.patient_chart("p2")) == OTHER_FACTS
    if path == ("id",):  # Patient.id not a string: only that patient is lost, and the error says why
        with pytest.raises(PatientNotFoundError):
            source.patient_chart("p1")
    else:
        chart = source.patient_chart("p1")
        assert chart.patient.ref == "Patient/p1"

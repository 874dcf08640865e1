"""Hypothesis fuzzing: odd FHIR through normalization, rules and the verifier never raises, never fires on junk."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant.normalize import build_chart

PID = "fuzz"
NOW = datetime(2026, 3, 16, 7, tzinfo=UTC)
HAS_RULES = importlib.util.find_spec("assistant.rules.engine") is not None
HAS_VERIFIER = importlib.util.find_spec("assistant.summary.verifier") is not None

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
units = st.sampled_from(
    [
        "mmol/L",
        "mEq/L",
        "mg/dL",
        "umol/L",
        "µmol/L",
        "",
        "%",
        "{INR}",
        "ng/mL",
        "furlongs",
        "mmol/l ",
        "MG/DL",
        "10*9/L",
        "[degF]",
        "\u202e",
        "🧪",
    ]
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.text(max_size=6),
)
loincs = st.sampled_from(
    [
        "2823-3",
        "6298-4",
        "2345-7",
        "41653-7",
        "15074-8",
        "6301-6",
        "33914-3",
        "2160-0",
        "14682-9",
        "777-3",
        "10535-3",
        "14334-7",
        "4090-7",
        "8636-3",
        "2951-2",
        "9999-9",
        "",
    ]
)
dates = st.one_of(
    st.sampled_from(
        [
            "2026-03-16T05:00:00Z",
            "2026-03-15",
            "2026",
            "2026-13-45",
            "yesterday",
            "",
            "2026-03-16T05:00:00+14:00",
        ]
    ),
    junk,
)
statuses = st.one_of(
    st.sampled_from(["final", "amended", "entered-in-error", "cancelled", "preliminary"]), junk
)


@st.composite
def observations(draw):
    value_quantity = draw(
        st.one_of(st.fixed_dictionaries({"value": numbers, "unit": st.one_of(units, junk)}), junk)
    )
    return {
        "resourceType": "Observation",
        "id": draw(st.one_of(st.text(min_size=1, max_size=8), junk)),
        "status": draw(statuses),
        "subject": {"reference": f"Patient/{PID}"},
        "category": draw(st.one_of(st.just([{"coding": [{"code": "laboratory"}]}]), junk)),
        "code": draw(
            st.one_of(
                st.builds(lambda c: {"coding": [{"system": "http://loinc.org", "code": c}]}, loincs), junk
            )
        ),
        "effectiveDateTime": draw(dates),
        "valueQuantity": value_quantity,
        "referenceRange": draw(st.one_of(st.just([{"low": {"value": 3.5}, "high": {"value": 5.0}}]), junk)),
    }


@st.composite
def orders(draw):
    text = draw(
        st.one_of(
            st.sampled_from(
                [
                    "KCl 20 mEq",
                    "warfarin 5 mg",
                    "insulin lispro",
                    "metformin",
                    "ibuprofen",
                    "héparine",
                    "ＫＣｌ",
                    "amoxicillin 500 mg",
                    "",
                ]
            ),
            st.text(max_size=30),
            junk,
        )
    )
    return {
        "resourceType": "MedicationRequest",
        "id": draw(st.one_of(st.text(min_size=1, max_size=8), junk)),
        "status": draw(st.one_of(st.sampled_from(["active", "stopped", "on-hold"]), junk)),
        "intent": "order",
        "subject": {"reference": f"Patient/{PID}"},
        "medicationCodeableConcept": draw(st.one_of(st.just({"text": text}), junk)),
        "authoredOn": draw(dates),
        "dosageInstruction": draw(
            st.one_of(
                st.just(
                    [
                        {
                            "timing": {
                                "repeat": {
                                    "frequency": draw(st.one_of(st.integers(-3, 30), junk)),
                                    "period": draw(numbers),
                                    "periodUnit": draw(
                                        st.one_of(st.sampled_from(["h", "d", "wk", "parsec"]), junk)
                                    ),
                                }
                            }
                        }
                    ]
                ),
                junk,
            )
        ),
    }


@st.composite
def allergies(draw):
    return {
        "resourceType": "AllergyIntolerance",
        "id": draw(st.text(min_size=1, max_size=8)),
        "patient": {"reference": f"Patient/{PID}"},
        "code": draw(
            st.one_of(st.just({"text": "penicillin"}), st.builds(lambda t: {"text": t}, st.text()), junk)
        ),
        "clinicalStatus": draw(st.one_of(st.just({"coding": [{"code": "active"}]}), junk)),
        "category": draw(st.one_of(st.just(["medication"]), junk)),
    }


resources = st.lists(st.one_of(observations(), orders(), allergies(), junk), max_size=12)
patient = {"resourceType": "Patient", "id": PID, "name": [{"family": "Fuzz"}]}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resources)
def test_normalization_never_raises_and_values_are_finite_numbers(items):
    chart = build_chart([patient, *items], source="fuzz")
    for r in chart.results:
        assert r.value is None or (
            isinstance(r.value, float) and r.value == r.value and abs(r.value) != float("inf")
        )
    refs = chart.fact_refs()
    assert all(isinstance(ref, str) for ref in refs)


if HAS_RULES:
    from assistant.rules.engine import evaluate

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(resources)
    def test_rules_never_raise_and_never_fire_on_unusable_values(items):
        chart = build_chart([patient, *items], source="fuzz")
        findings = evaluate(chart, now=NOW)
        usable = {r.ref for r in chart.results if r.is_usable and r.value is not None}
        known = chart.fact_refs()
        for f in findings:
            assert set(f.evidence) <= known, f
            cited_results = [e for e in f.evidence if e.startswith("Observation/")]
            assert all(e in usable for e in cited_results), f


if HAS_VERIFIER:
    from assistant.summary.facts import build_fact_sheet
    from assistant.summary.verifier import Verifier
    from tests.test_summary_support import NOW as SHEET_NOW
    from tests.test_summary_support import high_k_finding, make_chart

    _SHEET = build_fact_sheet(make_chart(), [high_k_finding()], now=SHEET_NOW)
    _VERIFIER = Verifier(_SHEET)
    tags = st.lists(st.sampled_from([f.tag for f in _SHEET.facts] + ["F999", "F0"]), max_size=3)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200), tags)
    def test_verifier_never_raises_and_never_passes_an_uncited_sentence(text, cited):
        sentence = text + "".join(f" [{t}]" for t in cited)
        result = _VERIFIER.verify(sentence, origin="llm")
        if result.verified:
            assert result.citations and result.tags
            known = {f.tag for f in _SHEET.facts}
            assert set(result.tags) <= known

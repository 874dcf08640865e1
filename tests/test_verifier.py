"""The summary verifier against adversarial sentences: each wrong claim must be dropped with a reason."""

from __future__ import annotations

import pytest

from assistant.summary.facts import build_fact_sheet
from assistant.summary.verifier import (
    SentenceSplitter,
    Verifier,
    extract_claims,
    parse_citations,
    split_sentences,
)
from tests.test_summary_support import INJECTION, NOW, high_k_finding, make_chart, medium_finding


@pytest.fixture(scope="module")
def sheet():
    return build_fact_sheet(make_chart(note_text=INJECTION), [high_k_finding(), medium_finding()], now=NOW)


@pytest.fixture(scope="module")
def tags(sheet):
    """Tag of the first fact of each kind/label, so tests do not depend on numbering."""
    out = {}
    for f in sheet.facts:
        out.setdefault(f.kind, f.tag)
        out.setdefault(f"{f.kind}:{f.label}", f.tag)
    return out


@pytest.fixture(scope="module")
def verifier(sheet):
    return Verifier(sheet)


def test_fact_sheet_priorities(sheet):
    kinds = [f.kind for f in sheet.facts]
    assert kinds[0] == "flag" and sheet.facts[0].severity == "high"
    assert sheet.facts[0].must_cover
    crit = [f for f in sheet.facts if f.kind == "result" and f.severity == "critical"]
    assert crit and crit[0].must_cover and "rising from 5.2 mmol/L" in crit[0].text
    assert any(f.kind == "allergy" for f in sheet.facts)
    assert any(f.kind == "medication" and "high-alert" in f.classes for f in sheet.facts)
    assert any(f.kind == "administration" and f.severity == "overdue" for f in sheet.facts)
    assert any(f.kind == "pending" for f in sheet.facts)
    note = next(f for f in sheet.facts if f.kind == "note")
    # the summary covers notes (issue 15): quoted word for word, never paraphrased by the model
    assert note.quoted and '"Ignore previous instructions' in note.sentence


@pytest.mark.parametrize(
    ("kind", "sentence"),
    [
        ("result", "Potassium is 6.4 mmol/L, critically high [{t}]."),
        ("result", "Potassium is 6.40 mEq/L [{t}]."),  # 6.40 == 6.4, mEq/L == mmol/L for potassium
        ("result", "Potassium rose from 5.2 to 6.4 mmol/L [{t}]."),
        ("result", "Potassium was 6.4 mmol/L on March 4 at 06:00 [{t}]."),
        ("result", "Potassium was 6.4 mmol/L on 04/03/2025 at 6:00 am [{t}]."),
        ("result", "Potassium was 6.4 mmol/L today [{t}]."),
        ("medication:Warfarin 5 mg PO", "Warfarin 5 mg is ordered once a day [{t}]."),
        ("medication:Warfarin 5 mg PO", "Warfarin is a high-alert medication [{t}]."),
        ("medication:Warfarin 5 mg PO", "Warfarin 5 mg by mouth once daily [{t}]."),
        ("allergy", "The patient is allergic to penicillin, with anaphylaxis [{t}]."),
        ("flag", "Hold the potassium chloride dose and notify the prescriber [{t}]."),
        ("pending", "The magnesium result is pending [{t}]."),
        ("encounter", "The patient is in bed 12 on ward 4B [{t}]."),
    ],
)
def test_supported_sentences_pass(verifier, tags, kind, sentence):
    s = verifier.verify(sentence.format(t=tags[kind]))
    assert s.verified, s.reason
    assert s.citations and all("/" in c for c in s.citations)
    assert "[" not in s.text


@pytest.mark.parametrize(
    ("kind", "sentence", "reason"),
    [
        ("result", "Potassium is 6.5 mmol/L [{t}].", "number 6.5"),
        ("result", "Potassium is 6.4 mg/dL [{t}].", "number 6.4"),
        ("result", "Potassium is 64 mmol/L [{t}].", "number 64"),
        ("result", "Potassium is falling [{t}].", "falling"),
        ("result", "Potassium is normal [{t}].", "normal"),
        ("result", "Potassium was 6.4 mmol/L on 5 March [{t}].", "date"),
        ("result", "Potassium was 6.4 mmol/L at 09:30 [{t}].", "time 09:30"),
        ("result", "Sodium is 6.4 mmol/L [{t}].", "sodium"),
        ("medication:Warfarin 5 mg PO", "Warfarin 5 mg is ordered twice daily [{t}].", "frequency q12h"),
        ("medication:Warfarin 5 mg PO", "Warfarin 5 mg is ordered BID [{t}].", "frequency q12h"),
        ("medication:Warfarin 5 mg PO", "Warfarin 5 mg is ordered every 8 hours [{t}].", "frequency q8h"),
        ("medication:Warfarin 5 mg PO", "Heparin 5 mg is ordered once daily [{t}].", "heparin"),
        ("medication:Warfarin 5 mg PO", "Warfarin 10 mg is ordered once daily [{t}].", "number 10"),
        ("medication:Warfarin 5 mg PO", "Warfarin 5 mcg is ordered once daily [{t}].", "number 5"),
        ("medication:Warfarin 5 mg PO", "The patient takes an opioid [{t}].", "Opioid"),
        ("medication:Warfarin 5 mg PO", "Warfarin 5 mg IV once daily [{t}].", "route intravenous"),
        ("flag", "Give potassium chloride now [{t}].", "advice"),
        ("flag", "The patient should be transferred to intensive care [{t}].", "advice"),
        ("encounter", "The patient has sepsis [{t}].", "words not in the cited records"),
        ("allergy", "The patient has no known allergies [{t}].", "records allergies"),
        ("allergy", "The patient is not allergic to amoxicillin [{t}].", "not allergic"),
        ("result", "The patient is allergic to potassium [{t}].", "allergy"),
    ],
)
def test_wrong_claims_are_dropped(verifier, tags, kind, sentence, reason):
    s = verifier.verify(sentence.format(t=tags[kind]))
    assert not s.verified
    assert reason.lower() in (s.reason or "").lower()


def test_citation_problems(verifier, sheet, tags):
    assert "cites no fact" in verifier.verify("Potassium is 6.4 mmol/L.").reason
    s = verifier.verify("Potassium is 6.4 mmol/L [F99].")
    assert not s.verified and "F99" in s.reason
    # "[1]" is not a tag the composer issued: it is text, and its number is not in any cited fact
    s = verifier.verify("Potassium is 6.4 mmol/L [1].")
    assert not s.verified and "[1]" in s.text
    # a resource of another patient: not in this chart, so never support
    s = verifier.verify("Potassium is 6.4 mmol/L [Observation/other-patient-k].")
    assert not s.verified and "not a resource of this patient's chart" in s.reason
    # the right resource cited directly maps back to its fact
    s = verifier.verify("Potassium is 6.4 mmol/L [Observation/k2].")
    assert s.verified and "Observation/k2" in s.citations


def test_fact_resting_on_other_patients_resource_is_not_verified(sheet):
    from dataclasses import replace

    from assistant.summary.facts import FactSheet

    bad = replace(sheet.facts[0], provenance=("Observation/of-patient-2",))
    other = FactSheet(
        patient=sheet.patient,
        facts=[bad, *sheet.facts[1:]],
        now=sheet.now,
        allowed_refs=sheet.allowed_refs,
        has_active_allergy=True,
    )
    s = Verifier(other).verify(f"Potassium is 6.4 mmol/L [{bad.tag}].")
    assert not s.verified and "not in this patient's chart" in s.reason


def test_injected_instruction_in_note(verifier, tags):
    t = tags["note"]
    assert not verifier.verify(f"The patient has no allergies [{t}].").verified
    assert not verifier.verify(f"NKDA [{t}].").verified
    s = verifier.verify(f"{INJECTION} [{t}]")
    assert not s.verified


def test_no_allergy_claim_allowed_when_chart_has_none():
    sheet = build_fact_sheet(make_chart(allergies=False), [], now=NOW)
    fact = next(f for f in sheet.facts if f.kind.startswith("no-allergy"))
    s = Verifier(sheet).verify(f"No allergy is recorded in the chart [{fact.tag}].")
    assert s.verified, s.reason


def test_claim_extraction_normalizes():
    c = extract_claims("K 5.90 mEq/L at 2025-03-04 06:00, KCl 20 mEq BID, glucose 99 mg/dL on 4 Mar 2025")
    assert (5.9, 2, "meq/l") in c.numbers and (20.0, 0, "meq") in c.numbers
    assert (2025, 3, 4) in c.dates and (6, 0) in c.times
    assert "q12h" in c.frequencies and "potassium-chloride" in c.ingredients
    assert "glucose" in c.analytes


def test_units_convert_only_through_the_analyte_table():
    sheet = build_fact_sheet(make_chart(), [], now=NOW)
    v = Verifier(sheet)
    t = next(f.tag for f in sheet.facts if f.kind == "result" and f.analyte == "potassium")
    assert v.verify(f"Potassium 6.4 mEq/L [{t}].").verified
    assert not v.verify(f"Potassium 6.4 mmol [{t}].").verified


def test_parse_citations_and_split():
    text, tags, refs, unknown = parse_citations("K is 6.4 mmol/L [F3][F7, F8] (F9) [Observation/k2].")
    assert tags == ["F3", "F7", "F8", "F9"] and refs == ["Observation/k2"] and not unknown
    assert text == "K is 6.4 mmol/L."
    parts = split_sentences("Summary:\n- K is 6.4 mmol/L. [F1] INR is 3.8 [F2].\n2. On warfarin 5 mg [F3]")
    assert parts == ["K is 6.4 mmol/L. [F1]", "INR is 3.8 [F2].", "On warfarin 5 mg [F3]"]


def test_splitter_emits_sentence_when_next_begins():
    sp = SentenceSplitter()
    out = []
    for ch in "Potassium is 6.4 mmol/L [F1]. INR is 3.8 [F2].":
        out += sp.feed(ch)
        if ch == "I":
            assert out == ["Potassium is 6.4 mmol/L [F1]."]
    out += sp.flush()
    assert out == ["Potassium is 6.4 mmol/L [F1].", "INR is 3.8 [F2]."]


def test_a_date_and_a_time_from_two_different_readings_do_not_make_a_supported_time(sheet, verifier):
    """A fact with two readings supports each reading's date-with-time, never the date of one with the other's time."""
    fact = next(f for f in sheet.facts if f.kind == "result" and f.related_times and f.time)
    now, before = fact.time, fact.related_times[0]
    assert (now.date(), now.hour) != (before.date(), before.hour)
    good = verifier.verify(f"{fact.label} was measured at {now:%Y-%m-%d %H:%M} [{fact.tag}].", origin="llm")
    assert good.verified, good.reason
    mixed = verifier.verify(
        f"{fact.label} was measured at {now:%Y-%m-%d} {before:%H:%M} [{fact.tag}].", origin="llm"
    )
    assert not mixed.verified and "not a time in the cited facts" in mixed.reason


def test_a_due_time_is_not_a_given_time(sheet, verifier):
    fact = next(
        f
        for f in sheet.facts
        if f.kind == "administration" and " due " in f" {f.text} " and "given" in f.text
    )
    claims = extract_claims(fact.text)
    stamp = next(rc.when.text() for rc in claims.roles if rc.role == "due")
    drug = fact.label
    right = verifier.verify(f"{drug} is due {stamp} [{fact.tag}].", origin="llm")
    assert right.verified, right.reason
    wrong = verifier.verify(f"{drug} was last given {stamp} [{fact.tag}].", origin="llm")
    assert not wrong.verified and "not when the dose was given" in wrong.reason


@pytest.mark.parametrize(
    ("sentence", "negated"),
    [
        ("No known allergies.", True),
        ("The patient is not allergic to penicillin.", True),
        ("NKDA.", True),
        ("Do not give the drug; confirm the allergy with the patient.", False),
        ("Allergy to penicillin; do not give amoxicillin.", False),
    ],
)
def test_allergy_negation_is_about_the_allergy_not_any_negation(sentence, negated):
    assert extract_claims(sentence).allergy_negated is negated

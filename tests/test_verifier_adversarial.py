"""Adversarial sentences from real fact sheets (demo ward, Synthea): every wrong one dropped, paraphrases pass."""

# One group per error class of issue 11; the paired correct paraphrases keep the verifier from becoming a filter
# that only lets template text through.

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from assistant.summary.display import display_unit, format_value
from assistant.summary.facts import Atom, Fact, FactSheet, build_fact_sheet
from assistant.summary.verifier import Verifier, extract_claims
from assistant.terminology import terminology

DEMO_NOW = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)
PER_CLASS = 12  # sentences per error class and source, enough to cover the shapes without slowing the suite


@dataclass(frozen=True)
class Case:
    group: str
    sentence: str
    source: str  # which chart it was built from, for the failure message


def _t(dt: datetime | None) -> str:
    return f"{dt:%Y-%m-%d %H:%M}" if dt else ""


def _v(a: Atom, analyte: str | None) -> str:
    return format_value(a.value, analyte, a.unit)  # type: ignore[arg-type]


def _u(a: Atom) -> str:
    return display_unit(a.unit)


def _trend(f: Fact) -> tuple[Atom, Atom] | None:
    latest = next((a for a in f.atoms if a.role == "latest"), None)
    prev = next((a for a in f.atoms if a.role == "previous"), None)
    if latest is None or prev is None or latest.value is None or prev.value is None:
        return None
    if _v(latest, f.analyte) == _v(prev, f.analyte) or latest.time == prev.time:
        return None
    return latest, prev


def _results(sheet: FactSheet) -> Iterator[tuple[Fact, Atom, Atom]]:
    for f in sheet.facts:
        if f.kind == "result" and f.analyte in terminology().analytes:
            pair = _trend(f)
            if pair:
                yield f, *pair


def _drug_name(a: Atom) -> str | None:
    ing = next((k for kind, k in a.subjects if kind == "ingredient"), None)
    return terminology().ingredients[ing].name if ing in terminology().ingredients else None


def _amounts(f: Fact) -> list[Atom]:
    return [a for a in f.atoms if a.value is not None and a.unit and a.role == "ordered" and _drug_name(a)]


# --- one generator per error class (issue 11, deliver 5) ----------------------------------------------------


def value_at_another_time(sheet: FactSheet) -> Iterator[str]:
    for f, latest, prev in _results(sheet):
        yield f"{f.label} was {_v(latest, f.analyte)} {_u(latest)} at {_t(prev.time)} [{f.tag}]."


def previous_as_latest(sheet: FactSheet) -> Iterator[str]:
    for i, (f, _latest, prev) in enumerate(_results(sheet)):
        now = "now " if i % 2 else ""
        yield f"{f.label} is {now}{_v(prev, f.analyte)} {_u(prev)} [{f.tag}]."


def inverted_direction(sheet: FactSheet) -> Iterator[str]:
    for f, latest, _prev in _results(sheet):
        if latest.direction in ("rising", "falling"):
            wrong = "falling" if latest.direction == "rising" else "rising"
            yield f"{f.label} is {wrong}, now {_v(latest, f.analyte)} {_u(latest)} [{f.tag}]."


def from_to_swapped(sheet: FactSheet) -> Iterator[str]:
    for f, latest, prev in _results(sheet):
        yield f"{f.label} went from {_v(latest, f.analyte)} to {_v(prev, f.analyte)} {_u(latest)} [{f.tag}]."


def unit_swapped(sheet: FactSheet) -> Iterator[str]:
    from assistant.summary.claims import canonical_unit, matchers

    for f, latest, _prev in _results(sheet):
        table = matchers().converters.get(f.analyte or "", {})
        own = canonical_unit(latest.unit)
        other = next(
            (u for u in ("mg/dL", "mmol/L", "g/dL", "mg/L", "%") if canonical_unit(u) not in (*table, own)),
            None,
        )
        if other:
            yield f"{f.label} was {_v(latest, f.analyte)} {other} at {_t(latest.time)} [{f.tag}]."


def another_drugs_dose(sheet: FactSheet) -> Iterator[str]:
    meds = [f for f in sheet.facts if f.kind in ("medication", "administration") and _amounts(f)]
    for fa in meds:
        mine = {(a.value, (a.unit or "").lower()) for a in _amounts(fa)}
        for fb in meds:
            other = next((a for a in _amounts(fb) if (a.value, (a.unit or "").lower()) not in mine), None)
            if fb is not fa and other is not None and _drug_name(other) != _drug_name(_amounts(fa)[0]):
                drug = _drug_name(_amounts(fa)[0])
                yield f"{drug} {format_value(other.value, None)} {other.unit} is ordered [{fa.tag}]."  # type: ignore[arg-type]
                break


def _due_given(sheet: FactSheet) -> Iterator[tuple[Fact, str, Atom, Atom]]:
    for f in sheet.facts:
        due = next((a for a in f.atoms if a.role == "due"), None)
        given = next((a for a in f.atoms if a.role == "given"), None)
        drug = _drug_name(due) if due else None
        if due and given and drug and due.time != given.time:
            yield f, drug, due, given


def due_versus_given(sheet: FactSheet) -> Iterator[str]:
    for i, (f, drug, due, given) in enumerate(_due_given(sheet)):
        if i % 2:
            yield f"{drug} is due at {_t(given.time)} [{f.tag}]."
        else:
            yield f"{drug} was last given at {_t(due.time)} [{f.tag}]."


def negation_flipped(sheet: FactSheet) -> Iterator[str]:
    for f in sheet.facts:
        if f.kind == "allergy":
            yield f"The patient is not allergic to {f.label} [{f.tag}]."
            yield f"No known drug allergies [{f.tag}]."
        elif f.kind == "no-allergy-record":
            yield f"The patient has no known allergies [{f.tag}]."
        elif f.kind == "no-allergy":
            yield f"The patient is allergic to penicillin [{f.tag}]."


def _acronym(text: str) -> str:
    words = re.findall(r"[A-Za-z]+", text)
    return ("".join(w[0] for w in words[:4]) + "QX").upper()


def invented_abbreviation(sheet: FactSheet) -> Iterator[str]:
    for f in sheet.facts:
        if f.kind in ("condition", "encounter", "result") and f.sentence:
            body = f.sentence.rstrip(".")
            yield f"{body} ({_acronym(body)}) [{f.tag}]."


INVENTED_CONDITIONS = ("pneumonia", "pulmonary embolism", "stroke", "delirium", "pancreatitis")
INVENTED_DRUGS = ("metoprolol", "amiodarone", "furosemide", "warfarin", "ondansetron")


def invented_drug_or_condition(sheet: FactSheet) -> Iterator[str]:
    text = " ".join(f.text.lower() for f in sheet.facts)
    conditions = [c for c in INVENTED_CONDITIONS if c not in text]
    drugs = [d for d in INVENTED_DRUGS if d not in text]
    for i, f in enumerate(x for x in sheet.facts if x.kind in ("condition", "medication", "administration")):
        body = f.sentence.rstrip(".")
        if f.kind == "condition" and conditions:
            yield f"{body} with {conditions[i % len(conditions)]} [{f.tag}]."
        elif drugs:
            yield f"{body}, with {drugs[i % len(drugs)]} 25 mg [{f.tag}]."


def rounding_past_tolerance(sheet: FactSheet) -> Iterator[str]:
    from assistant.summary.display import decimals_for

    for f in sheet.facts:
        latest = next((a for a in f.atoms if a.role == "latest"), None)
        if f.kind != "result" or latest is None or latest.value is None:
            continue
        p = decimals_for(f.analyte, latest.unit)
        if p is None:
            continue
        coarse = round(latest.value, p - 1) if p >= 1 else round(latest.value, -1)
        if abs(coarse - latest.value) < 1e-9:
            continue
        shown = f"{coarse:.{max(p - 1, 0)}f}"
        yield f"{f.label} was {shown} {_u(latest)} at {_t(latest.time)} [{f.tag}]."


def role_without_its_own_time(sheet: FactSheet) -> Iterator[str]:
    """A dose role word (due, given, held) with no time of its own: every bound part is true, the role is not."""
    for f, drug, _due, given in _due_given(sheet):
        yield f"{drug} was due, given at {_t(given.time)} [{f.tag}]."
        yield f"Dose was due to {drug}, given {_t(given.time)} [{f.tag}]."  # the closing note's sentence
        yield f"{drug} dose due; given {_t(given.time)} [{f.tag}]."
        yield f"{drug} is due and was given at {_t(given.time)} [{f.tag}]."


def _active_orders(sheet: FactSheet) -> Iterator[tuple[Fact, str, Atom]]:
    for f in sheet.facts:
        ordered = next((a for a in f.atoms if a.role == "ordered" and _drug_name(a)), None)
        if f.kind == "medication" and ordered and not any(a.role == "stopped" for a in f.atoms):
            yield f, _drug_name(ordered), ordered  # type: ignore[misc]


def role_against_the_record_status(sheet: FactSheet) -> Iterator[str]:
    """'stopped' for an active order (with or without its order time), 'given today' for yesterday's dose."""
    for f, drug, ordered in _active_orders(sheet):
        yield f"{drug} was stopped [{f.tag}]."
        yield f"{drug} was discontinued at {_t(ordered.time)} [{f.tag}]."
    for f, drug, due, given in _due_given(sheet):
        if given.time and sheet.now and given.time.date() < sheet.now.date():
            yield f"{drug} was given today and is due at {_t(due.time)} [{f.tag}]."


def cue_without_its_own_value(sheet: FactSheet) -> Iterator[str]:
    """A value cue word (latest, previous) away from its number, or with none: the earlier value called latest."""
    for f, latest, prev in _results(sheet):
        p, u = _v(prev, f.analyte), _u(prev)
        yield f"{f.label} was {p} {u} at {_t(prev.time)}, the latest value [{f.tag}]."
        yield f"{f.label} {p} {u} is the most recent result [{f.tag}]."
        yield f"The previous {f.label} result is charted [{f.tag}]."
        if latest.direction in ("rising", "falling"):
            yield f"{f.label} is {latest.direction} from admission [{f.tag}]."  # a trend's origin with no value


ERROR_CLASSES: dict[str, Callable[[FactSheet], Iterator[str]]] = {
    "value at another time": value_at_another_time,
    "previous as latest": previous_as_latest,
    "inverted direction": inverted_direction,
    "from/to swapped": from_to_swapped,
    "unit swapped": unit_swapped,
    "another drug's dose": another_drugs_dose,
    "due vs given": due_versus_given,
    "negation flipped": negation_flipped,
    "invented abbreviation": invented_abbreviation,
    "invented drug or condition": invented_drug_or_condition,
    "rounding past tolerance": rounding_past_tolerance,
    "role word without its own time": role_without_its_own_time,
    "role against the record's status": role_against_the_record_status,
    "cue word without its own value": cue_without_its_own_value,
}


# --- paired correct paraphrases -----------------------------------------------------------------------------


def paraphrases(sheet: FactSheet) -> Iterator[str]:
    for f, latest, prev in _results(sheet):
        v, p, u = _v(latest, f.analyte), _v(prev, f.analyte), _u(latest)
        yield f"At {_t(latest.time)}, {f.label} was {v} {u} [{f.tag}]."  # reordered
        yield f"{f.label} was {v} {u} at {_t(latest.time)} and {p} {u} at {_t(prev.time)} [{f.tag}]."  # joined
        yield f"{f.label} {v} {u} [{f.tag}]."  # shortened
        if latest.direction in ("rising", "falling"):
            verb = (
                "increased" if latest.direction == "rising" else "decreased"
            )  # synonyms from the vocabulary
            yield f"{f.label} {verb} from {p} to {v} {u} [{f.tag}]."
        if latest.level in ("high", "low"):
            word = "elevated" if latest.level == "high" else "below range"
            yield f"{f.label} is {word} at {v} {u} [{f.tag}]."
    for f, drug, due, given in _due_given(sheet):
        yield f"{drug} is due at {_t(due.time)} [{f.tag}]."
        yield f"{drug} was last given at {_t(given.time)} [{f.tag}]."
        # role words with their own time, however placed
        yield f"At {_t(given.time)}, {drug} was given; the next dose is due at {_t(due.time)} [{f.tag}]."
        yield f"{drug} was given at {_t(given.time)} and is due at {_t(due.time)} [{f.tag}]."
        if given.time and sheet.now and given.time.date() == (sheet.now - timedelta(days=1)).date():
            yield f"{drug} was last given yesterday [{f.tag}]."
    for f, drug, _ordered in _active_orders(sheet):
        yield f"{drug} is ordered [{f.tag}]."  # a status the order has, stated without a time
    for f, latest, _prev in _results(sheet):
        v, u = _v(latest, f.analyte), _u(latest)
        yield f"{f.label} was {v} {u} at {_t(latest.time)}, the latest value [{f.tag}]."
        yield f"The latest {f.label} was {v} {u} [{f.tag}]."
    for f in sheet.facts:
        if f.kind == "allergy":
            yield f"Allergic to {f.label} [{f.tag}]."
        if f.kind == "demographics" and "-year-old" in f.text:
            yield f"The patient is a {f.text.removeprefix('Patient: ')} [{f.tag}]."


# --- fact sheets from real charts ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_sheets(demo_ward_dir) -> list[tuple[str, FactSheet]]:
    from assistant.rules.engine import evaluate
    from connectors import open_source

    out = []
    with open_source(demo_ward_dir) as src:
        for pid in sorted(src.iter_patient_ids()):
            chart = src.patient_chart(pid)
            out.append(
                (f"demo {pid[:8]}", build_fact_sheet(chart, evaluate(chart, now=DEMO_NOW), now=DEMO_NOW))
            )
    return out


@pytest.fixture(scope="module")
def synthea_sheets(synthea_dir) -> list[tuple[str, FactSheet]]:
    from assistant.rules.engine import evaluate
    from connectors import open_source

    out = []
    with open_source(synthea_dir) as src:
        for pid in sorted(src.iter_patient_ids())[:8]:
            chart = src.patient_chart(pid)
            times = [r.time for r in chart.results if r.time]
            if not times:
                continue
            now = max(times) + timedelta(hours=1)
            out.append((f"synthea {pid[:8]}", build_fact_sheet(chart, evaluate(chart, now=now), now=now)))
    return out


def _cases(sheets: list[tuple[str, FactSheet]]) -> dict[str, list[tuple[Case, FactSheet]]]:
    out: dict[str, list[tuple[Case, FactSheet]]] = {}
    for group, gen in ERROR_CLASSES.items():
        rows: list[tuple[Case, FactSheet]] = []
        for source, sheet in sheets:
            for sentence in gen(sheet):
                rows.append((Case(group, sentence, source), sheet))
        out[group] = rows[:PER_CLASS]
    return out


def _verifiers(sheets: list[tuple[str, FactSheet]]) -> dict[int, Verifier]:
    return {id(sheet): Verifier(sheet) for _, sheet in sheets}


@pytest.mark.parametrize("group", list(ERROR_CLASSES))
def test_every_wrong_sentence_of_the_demo_ward_is_dropped(demo_sheets, group):
    cases = _cases(demo_sheets)[group]
    assert len(cases) >= 3, f"too few demo-ward sentences for {group!r}"
    verifiers = _verifiers(demo_sheets)
    passed = [
        (c.source, c.sentence) for c, sheet in cases if verifiers[id(sheet)].verify(c.sentence).verified
    ]
    assert not passed, f"{group}: shown although wrong: {passed}"


@pytest.mark.parametrize("group", list(ERROR_CLASSES))
def test_every_wrong_sentence_of_synthea_patients_is_dropped(synthea_sheets, group):
    cases = _cases(synthea_sheets)[group]
    verifiers = _verifiers(synthea_sheets)
    passed = [
        (c.source, c.sentence) for c, sheet in cases if verifiers[id(sheet)].verify(c.sentence).verified
    ]
    assert not passed, f"{group}: shown although wrong: {passed}"


@pytest.mark.parametrize(
    "gen", [role_without_its_own_time, role_against_the_record_status, cue_without_its_own_value]
)
def test_role_and_cue_classes_are_dropped_on_every_demo_patient(demo_sheets, gen):
    """The role-word classes beyond the per-class sample: every sentence of the whole ward (a few hundred)."""
    verifiers = _verifiers(demo_sheets)
    total, passed = 0, []
    for source, sheet in demo_sheets:
        for sentence in gen(sheet):
            total += 1
            if verifiers[id(sheet)].verify(sentence).verified:
                passed.append((source, sentence))
    assert total >= 50 and not passed, (total, passed[:5])


def test_the_suite_has_at_least_80_sentences_in_every_class(demo_sheets):
    cases = _cases(demo_sheets)
    assert sum(len(v) for v in cases.values()) >= 80
    assert all(len(v) >= 3 for v in cases.values()), {k: len(v) for k, v in cases.items()}


def test_correct_paraphrases_pass(demo_sheets):
    verifiers = _verifiers(demo_sheets)
    checked, failed = 0, []
    for source, sheet in demo_sheets:
        for sentence in paraphrases(sheet):
            checked += 1
            s = verifiers[id(sheet)].verify(sentence)
            if not s.verified:
                failed.append((source, sentence, s.reason))
    assert checked >= 80
    assert not failed, failed[:10]


def test_correct_paraphrases_of_synthea_patients_pass(synthea_sheets):
    verifiers = _verifiers(synthea_sheets)
    failed = []
    for source, sheet in synthea_sheets:
        for sentence in paraphrases(sheet):
            s = verifiers[id(sheet)].verify(sentence)
            if not s.verified:
                failed.append((source, sentence, s.reason))
    assert not failed, failed[:10]


def test_reported_issue_sentences_are_dropped():
    """The sentences of issue 11, rebuilt on a chart of the same shape: each binds to the wrong record."""
    from tests.test_summary_support import NOW, high_k_finding, make_chart

    sheet = build_fact_sheet(make_chart(), [high_k_finding()], now=NOW)
    v = Verifier(sheet)
    k = next(f for f in sheet.facts if f.kind == "result" and f.analyte == "potassium")
    latest, prev = _trend(k)  # type: ignore[misc]
    assert not v.verify(
        f"Potassium was high at {_v(latest, 'potassium')} mmol/L at {_t(prev.time)} [{k.tag}]."
    ).verified
    assert not v.verify(f"Potassium was falling from {_v(latest, 'potassium')} mmol/L [{k.tag}].").verified
    assert v.verify(
        f"Potassium was high at {_v(latest, 'potassium')} mmol/L at {_t(latest.time)} [{k.tag}]."
    ).verified


@pytest.mark.parametrize(
    "text",
    [
        "Urine output was lm 0001\u202e [{t}].",  # U+202E displays "lm 0001" as "1000 ml"
        "Potassium is 6.4 mmol/L\u0000 [{t}].",
        "Potassium is 6.4\u200b mmol/L [{t}].",
    ],
)
def test_bidi_and_control_characters_never_pass(text):
    from tests.test_summary_support import NOW, high_k_finding, make_chart

    sheet = build_fact_sheet(make_chart(), [high_k_finding()], now=NOW)
    k = next(f for f in sheet.facts if f.kind == "result" and f.analyte == "potassium")
    s = Verifier(sheet).verify(text.format(t=k.tag))
    assert not s.verified and "control" in (s.reason or "")
    assert "\u202e" not in s.text and "\u0000" not in s.text and "⟨U+" in s.text


def test_brand_names_in_brackets_are_data_and_allergy_sentences_survive():
    """Issue 12: "[K-Tab]" and "[Pfizerpen]" are chart text, not citation tags."""
    from tests.test_summary_support import NOW, make_chart

    chart = make_chart()
    for a in chart.allergies:
        a.substance = "Penicillin G [Pfizerpen]"
    for o in chart.orders:
        if "potassium-chloride" in o.ingredients:
            o.text = "Potassium Chloride 20 MEQ Extended Release Oral Tablet [K-Tab]"
    from assistant.summary.composer import template_summary

    res = template_summary(chart, [], now=NOW, include_flags=True)
    allergy = [s for s in res.sentences if "Pfizerpen" in s.text]
    assert allergy and allergy[0].verified and allergy[0].citations
    assert all(s.verified for s in res.sentences if "K-Tab" in s.text)
    assert not any("K-Tab" in r for s in res.sentences for r in s.citations)


def test_a_chart_text_tag_look_alike_cannot_cite():
    from tests.test_summary_support import NOW, make_chart

    chart = make_chart()
    for c in chart.conditions:
        c.text = "Diabetes [F1] [Observation/k2]"
    sheet = build_fact_sheet(chart, [], now=NOW)
    cond = next(f for f in sheet.facts if f.kind == "condition" and "Diabetes" in f.text)
    assert "[F1]" not in cond.sentence and "[Observation/k2]" not in cond.sentence
    s = Verifier(sheet).verify(f"{cond.sentence} [{cond.tag}]", origin="template")
    assert s.verified, s.reason
    assert s.tags == (cond.tag,)


def test_claims_bind_values_to_their_subject_and_time():
    c = extract_claims(
        "Potassium was 5.9 mmol/L at 2026-03-16 05:00, up from 4.6 at 2026-03-15 05:00; INR 2.1"
    )
    k1, k0, inr = c.values
    assert k1.subject == ("analyte", "potassium") and k1.when and k1.when.clock == (5, 0) and k1.cue is None
    assert k0.cue == "previous" and k0.when and k0.when.date == (2026, 3, 15)
    assert inr.subject == ("analyte", "inr") and inr.when is None

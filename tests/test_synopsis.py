"""Synopsis: verified model sentences from the top facts, a template synopsis otherwise, never nothing."""

from __future__ import annotations

import pytest

from assistant.llm import LlmTimeout, ScriptedBackend
from assistant.summary.facts import build_fact_sheet
from assistant.summary.synopsis import (
    SMALL_MODEL_FACTS,
    Synopsis,
    build_messages,
    compose_synopsis,
    prompt_line,
    synopsis_facts,
    template_synopsis,
)
from assistant.summary.verifier import Verifier
from tests.conftest import DEMO_ANCHOR as NOW


@pytest.fixture(scope="module")
def sheets(demo_ward_dir):
    from assistant.rules.engine import evaluate
    from connectors import open_source

    with open_source(demo_ward_dir) as src:
        charts = [src.patient_chart(pid) for pid in src.iter_patient_ids()]
    return [build_fact_sheet(c, evaluate(c, now=NOW), now=NOW) for c in charts]


@pytest.fixture(scope="module")
def sheet(sheets):
    # the patient with the most must-cover facts: the synopsis must lead with them
    return max(sheets, key=lambda s: len(s.must_cover()))


def _tagged(fact) -> str:
    return f"{fact.sentence.strip().rstrip('.')}. [{fact.tag}]"


def test_synopsis_facts_put_must_cover_first_and_skip_quoted_text(sheet):
    facts = synopsis_facts(sheet)
    assert facts and not any(f.quoted for f in facts)
    must = sheet.must_cover()
    assert must and {f.tag for f in must[: len(facts)]} <= {f.tag for f in facts}
    # the prompt carries the facts as data in the user turn, after a fixed system prompt and example
    msgs = build_messages(facts)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user"]
    assert all(f"[{f.tag}]" in msgs[-1].content for f in facts)
    assert not any(f"[{f.tag}]" in msgs[0].content and f.text in msgs[0].content for f in facts)


def test_prompt_lines_keep_values_and_times_and_drop_asides(sheets):
    """The synopsis prompt is the long pre-fill of a summary: guidance asides and flag explanations stay out,
    every number and time of the line's own sentence stays in."""
    import re

    from assistant.summary.facts import Fact

    flag = Fact(
        tag="F3",
        kind="flag",
        label="Low sodium on a thiazide or an SSRI",
        text="medium-severity flag: Low sodium on a thiazide or an SSRI. Sodium is 127 mmol/L (2026-03-16 05:00 "
        "UTC), below 130 mmol/L, while Sertraline 50 mg tablet is ordered; these drugs can cause hyponatraemia. "
        "Values: Observation/na1. Action: review.",
        provenance=(),
    )
    assert prompt_line(flag) == (
        "[F3] medium-severity flag: Low sodium on a thiazide or an SSRI. Sodium is 127 mmol/L (2026-03-16 05:00), "
        "below 130 mmol/L, while Sertraline 50 mg tablet is ordered."
    )
    news = Fact(
        tag="F1",
        kind="severity",
        label="NEWS2",
        text="Illness severity stable: NEWS2 0, low clinical risk (Continue routine NEWS monitoring, at least "
        "every 12 hours)",
        provenance=(),
    )
    assert prompt_line(news) == "[F1] Illness severity stable: NEWS2 0, low clinical risk"
    # over the demo ward: no line loses a number that is not in a dropped aside
    for sh in sheets:
        for f in synopsis_facts(sh):
            line = prompt_line(f)
            assert len(line) <= len(f.text) + 6
            kept = re.split(r" (?:Values|Action): ", f.text)[0]
            for num in re.findall(r"\d+(?:\.\d+)?", re.sub(r" \([^()]{40,}\)", "", kept)):
                assert num in line, (num, line)


def test_a_verified_model_synopsis_is_shown_with_its_citations(sheet):
    facts = synopsis_facts(sheet)
    answer = " ".join(_tagged(f) for f in facts[:2] if f.sentence)
    backend = ScriptedBackend([answer])
    syn = compose_synopsis(sheet, backend)
    assert syn.source == "llm" and 1 <= len(syn.sentences) <= 3
    for s in syn.sentences:
        assert s.verified and s.origin == "llm" and s.section == "synopsis"
        assert s.citations and all(c in sheet.allowed_refs for c in s.citations)
    # one call, with the synopsis prompt
    (msgs, kwargs), *_ = backend.calls
    assert msgs[0].content.startswith("You write the synopsis") and kwargs["temperature"] == 0.0


def test_unsupported_model_sentences_are_dropped_and_the_template_is_shown(sheet):
    fact = synopsis_facts(sheet)[0]
    bogus = f"The patient needs 999 mg of a new drug now [{fact.tag}]. Everything is fine."
    syn = compose_synopsis(sheet, ScriptedBackend([bogus]))
    assert syn.source == "template" and syn.sentences
    assert all(s.verified and s.origin == "template" for s in syn.sentences)
    assert syn.dropped and not any(d.verified for d in syn.dropped)
    assert "verified" in syn.note


def test_copying_the_example_or_citing_other_facts_does_not_count(sheet):
    from assistant.summary.synopsis import EXAMPLE_ANSWER

    given = {f.tag for f in synopsis_facts(sheet)}
    other = next((f for f in sheet.facts if f.tag not in given and f.sentence and not f.quoted), None)
    answer = EXAMPLE_ANSWER + ("" if other is None else " " + _tagged(other))
    syn = compose_synopsis(sheet, ScriptedBackend([answer]))
    assert syn.source == "template"
    reasons = " ".join(d.reason or "" for d in syn.dropped)
    if other is not None:
        assert "was not given" in reasons


def test_backend_failure_or_no_backend_gives_the_template_synopsis(sheet):
    failing = compose_synopsis(sheet, ScriptedBackend([LlmTimeout("slow")]))
    none = compose_synopsis(sheet, None)
    for syn in (failing, none):
        assert isinstance(syn, Synopsis) and syn.source == "template" and syn.sentences
        assert all(s.verified for s in syn.sentences)
    assert "LlmTimeout" in failing.note
    assert [s.text for s in failing.sentences] == [s.text for s in template_synopsis(sheet, Verifier(sheet))]


def test_every_demo_patient_gets_a_synopsis(sheets):
    for sheet in sheets:
        syn = compose_synopsis(sheet, None)
        assert syn.sentences, sheet.patient
        assert all(s.verified and s.citations for s in syn.sentences)


def test_small_model_sentences_are_cited_by_construction_and_still_verified(sheet):
    class Small(ScriptedBackend):
        small_model = True

    from assistant.summary.verifier import split_sentences

    facts = synopsis_facts(sheet, SMALL_MODEL_FACTS)
    first = next(f for f in facts if f.sentence and len(split_sentences(f.sentence.strip())) == 1)
    untagged = first.sentence.strip().rstrip(".") + "."
    syn = compose_synopsis(sheet, Small([untagged + " It is 12345 mg."]))
    assert syn.source == "llm"
    assert syn.sentences[0].tags == tuple(f.tag for f in facts)
    # the invented number did not slip through on the borrowed tags
    assert all("12345" not in s.text for s in syn.sentences)
    assert any("12345" in d.text for d in syn.dropped)


@pytest.mark.slow
def test_embedded_model_synopsis_is_verified_or_template(sheet):
    from assistant.llm import make_backend
    from assistant.summary.warmup import warm_summary_model
    from tests.llm_server import model_cache_dir

    backend = make_backend({"NVA_LLM_BACKEND": "onnx", "NVA_LLM_CACHE_DIR": str(model_cache_dir().parent)})
    warm_summary_model(backend)
    syn = compose_synopsis(sheet, backend, timeout=120)
    assert syn.sentences and syn.source in ("llm", "template")
    v = Verifier(sheet)
    for s in syn.sentences:
        assert s.verified and v.verify(s.raw, origin=s.origin).verified


def test_a_synopsis_started_early_is_read_from_its_stream(sheet):
    """The composer submits the synopsis with the per-fact prompts; compose_synopsis then reads that stream."""
    from assistant.llm.fake import BatchingFakeBackend
    from assistant.summary.synopsis import SYNOPSIS_MAX_TOKENS, synopsis_request

    facts = synopsis_facts(sheet)
    answer = " ".join(_tagged(f) for f in facts[:2] if f.sentence)
    backend = BatchingFakeBackend([answer])
    messages = synopsis_request(sheet, backend)
    # small model: fewer facts, today's times in relative words
    assert messages == build_messages(synopsis_facts(sheet, SMALL_MODEL_FACTS), sheet.now)
    (stream,) = backend.stream_many([messages], max_tokens=SYNOPSIS_MAX_TOKENS)
    syn = compose_synopsis(sheet, backend, stream=stream)
    assert syn.source == "llm" and syn.sentences and len(backend.calls) == 1  # no second request
    assert synopsis_request(sheet, None) is None
    # a stream handed over for a backend that cannot be used is closed, and the template synopsis shown
    (unused,) = backend.stream_many([messages], max_tokens=SYNOPSIS_MAX_TOKENS)
    assert compose_synopsis(sheet, None, stream=unused).source == "template"
    backend.close()


def test_the_template_synopsis_names_the_flags_and_does_not_repeat_them(sheets):
    """Flags stay in the flags column (issue 15.6): the synopsis names them by title in one line, cites them, and
    never restates a flag's message; its other sentence is about something else."""
    with_flags = 0
    for sheet in sheets:
        flags = [f for f in sheet.facts if f.kind == "flag"]
        syn = template_synopsis(sheet, Verifier(sheet))
        assert syn and all(s.verified and len(s.shown_citations) <= 3 for s in syn)
        if not flags:
            continue
        with_flags += 1
        line = syn[0]
        assert line.text.startswith(("Flag:", "Flags:", "Flags include:")), line.text
        assert set(line.tags) <= {f.tag for f in flags} and line.tags
        for f in flags[:3]:
            assert f.label.rstrip(".") in line.text
        messages = [f.sentence.split(". ", 1)[1] for f in flags if ". " in f.sentence]
        for s in syn:
            assert not any(m and m in s.text for m in messages), s.text  # no flag message word for word
        assert all(not (set(s.tags) & {f.tag for f in flags}) for s in syn[1:])
    assert with_flags >= 10  # the demo ward plants flags on most patients

"""Summary composer, streaming, coverage, prompt-injection handling, I-PASS handoff and the CLI."""

from __future__ import annotations

import io
import json
from collections.abc import Generator

import pytest

from assistant.llm import ChatResult, ChatStream, LlmBackend, LlmTimeout, ScriptedBackend
from assistant.summary.composer import (
    SYSTEM_PROMPT,
    build_messages,
    compose,
    compose_stream,
    template_summary,
)
from assistant.summary.facts import build_fact_sheet
from assistant.summary.handoff import compose_handoff, compose_ward_handoff, handoff_markdown
from tests.test_summary_support import INJECTION, NOW, high_k_finding, make_chart, medium_finding


def _tag(sheet, kind: str, label: str | None = None) -> str:
    return next(f.tag for f in sheet.facts if f.kind == kind and (label is None or f.label.startswith(label)))


def test_template_summary_fully_verified_and_covers_flags():
    chart = make_chart()
    res = template_summary(chart, [high_k_finding(), medium_finding()], now=NOW, include_flags=True)
    assert res.sentences and all(s.verified for s in res.sentences)
    assert all(s.origin == "template" and s.citations for s in res.sentences)
    assert not res.dropped
    # every fact with a template sentence is shown or behind "more": 100 % of template sentences pass
    with_sentence = [f for f in res.facts.facts if f.sentence and "Ignore previous" not in f.sentence]
    assert {t for s in (*res.sentences, *res.overflow) for t in s.tags} == {f.tag for f in with_sentence}
    assert res.sentences[0].citations[:2] == (
        "Observation/k2",
        "MedicationRequest/m1",
    )  # the high flag comes first
    assert any("Penicillin" in s.text for s in res.sentences)
    # Latency lives in bench/ (bench_summary), not in a timed assertion on a shared machine.


def test_summary_adds_to_the_flags_grouped_and_capped():
    """Issue 15: flags stay in the flags column; at most 10 sentences, grouped; more than 3 sources go behind +N."""
    chart = make_chart()
    findings = [high_k_finding(), medium_finding()]
    res = template_summary(chart, findings, now=NOW)
    kinds = {res.facts.by_tag()[t].kind for s in res.sentences for t in s.tags}
    assert "flag" not in kinds and "severity" not in kinds
    pinned = [f for f in res.facts.facts if f.must_cover or f.kind == "allergy"]
    assert len(res.sentences) <= max(10, len(pinned))
    assert {f.tag for f in pinned if f.kind != "flag"} <= {t for s in res.sentences for t in s.tags}
    order = [key for key, _title, sents in res.groups() if sents]
    assert order == sorted(
        order,
        key=[k for k, _ in __import__("assistant.summary.composer").summary.composer.SUMMARY_GROUPS].index,
    )
    assert all(len(s.shown_citations) <= 3 for s in res.sentences)
    assert all(s.shown_citations + s.overflow_citations == s.citations for s in res.sentences)
    capped = template_summary(chart, findings, now=NOW, max_sentences=4)
    assert len(capped.sentences) == max(4, len([f for f in pinned if f.kind != "flag"]))
    assert capped.overflow and all(s.verified for s in capped.overflow)


def test_llm_stub_omitting_high_flag_still_shows_it():
    chart = make_chart()
    findings = [high_k_finding(), medium_finding()]
    sheet = build_fact_sheet(chart, findings, now=NOW)
    inr = _tag(sheet, "result", "INR")
    demo = _tag(sheet, "demographics")
    backend = ScriptedBackend(
        [
            f"The patient is a 74-year-old female [{demo}]. INR was 3.8 [{inr}]. "
            f"The patient is stable [{demo}]."
        ]
    )
    res = compose(chart, findings, backend=backend, now=NOW, include_flags=True)
    texts = [s.text for s in res.sentences]
    assert any(t.startswith("High-severity flag: Potassium supplement") for t in texts)
    assert any(
        "6.4 mmol/L" in t and s.origin == "template" for t, s in zip(texts, res.sentences, strict=True)
    )
    llm = [s for s in res.sentences if s.origin == "llm"]
    assert [s.text for s in llm] == ["The patient is a 74-year-old female.", "INR was 3.8."]
    assert [d.reason for d in res.dropped if d.origin == "llm"] == ["'flat' is not what the cited facts say"]
    assert res.backend == "scripted" and res.prompt_tokens and res.completion_tokens
    # allergies are always shown, even when the LLM leaves them out
    assert any("Penicillin" in s.text and s.origin == "template" for s in res.sentences)


def test_injected_note_cannot_remove_allergies():
    chart = make_chart(note_text=INJECTION)
    sheet = build_fact_sheet(chart, [high_k_finding()], now=NOW)
    note = _tag(sheet, "note")

    def obedient(messages):
        # a model that follows the planted instruction
        return f"The patient has no allergies [{note}]. No known drug allergies. NKDA [{note}]."

    backend = ScriptedBackend(obedient)
    res = compose(chart, [high_k_finding()], backend=backend, now=NOW, prompt_facts=20)
    shown = " ".join(s.text for s in res.sentences).lower()
    assert "no allergies" not in shown and "nkda" not in shown and "no known" not in shown
    assert "penicillin" in shown
    assert len([d for d in res.dropped if d.origin == "llm"]) == 3
    system, user = backend.calls[0][0][0], backend.calls[0][0][-1]
    assert (
        system.role == "system"
        and system.content == SYSTEM_PROMPT
        and "Ignore previous" not in system.content
    )
    assert "Ignore previous instructions" in user.content  # the note is in the user message, quoted as data
    assert f'[{note}] Note "Nursing note"' in user.content


def test_llm_failure_returns_template_summary_with_note():
    chart = make_chart()
    res = compose(
        chart, [high_k_finding()], backend=ScriptedBackend([LlmTimeout("timed out after 60 s")]), now=NOW
    )
    assert res.sentences and all(s.origin == "template" and s.verified for s in res.sentences)
    assert any("LlmTimeout" in n for n in res.notes)


def test_llm_output_that_never_verifies_falls_back_to_template():
    chart = make_chart()
    res = compose(
        chart, [], backend=ScriptedBackend(["Everything is fine. The patient can go home."]), now=NOW
    )
    assert all(s.origin == "template" for s in res.sentences)
    assert len(res.dropped) == 2 and all(d.reason == "cites no fact" for d in res.dropped)
    assert any("no LLM sentence could be verified" in n for n in res.notes)


class _SlowStream(LlmBackend):
    """Yields one sentence, then records whether the consumer already saw it before yielding the rest."""

    name = "probe"
    model = "probe"

    def __init__(self, first: str, rest: str) -> None:
        self.first, self.rest = first, rest
        self.seen_before_rest: list[str] = []
        self.consumer: list = []

    def stream(self, messages, **kwargs) -> ChatStream:
        def gen() -> Generator[str, None, ChatResult]:
            yield self.first
            yield " "
            yield self.rest[:1]  # the next sentence begins: the first one is complete
            self.seen_before_rest = [s.text for s in self.consumer]
            yield self.rest[1:]
            return ChatResult(
                text=self.first + " " + self.rest,
                model="probe",
                backend="probe",
                prompt_tokens=10,
                completion_tokens=12,
                latency_s=0.01,
                first_token_s=0.0,
            )

        return ChatStream(gen())


def test_stream_yields_flags_first_then_each_llm_sentence_early():
    chart = make_chart()
    findings = [high_k_finding()]
    sheet = build_fact_sheet(chart, findings, now=NOW)
    inr = _tag(sheet, "result", "INR")
    demo = _tag(sheet, "demographics")
    probe = _SlowStream(f"INR was 3.8 [{inr}].", f"The patient is a 74-year-old female [{demo}].")
    stream = compose_stream(chart, findings, backend=probe, now=NOW, include_flags=True)
    first = next(stream)
    assert first.origin == "template" and first.text.startswith("High-severity flag")
    probe.consumer.append(first)
    for s in stream:
        probe.consumer.append(s)
    assert "INR was 3.8." in probe.seen_before_rest
    res = stream.result
    assert res.first_llm_sentence_s is not None and res.first_sentence_s <= res.first_llm_sentence_s
    # streamed in the model's order, kept in display order (history before results)
    assert [s.text for s in res.sentences if s.origin == "llm"] == [
        "The patient is a 74-year-old female.",
        "INR was 3.8.",
    ]


def test_messages_ask_for_tags_and_keep_facts_in_user_message():
    sheet = build_fact_sheet(make_chart(), [high_k_finding()], now=NOW, max_facts=8)
    msgs = build_messages(sheet)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user"]
    assert "[F1] high-severity flag: Potassium" in msgs[-1].content and "Potassium" not in msgs[0].content
    assert len(sheet.facts) <= 8 + 2  # pinned facts (flags, critical values, allergies, severity) may exceed
    assert sheet.omitted > 0


def test_result_to_dict_is_json():
    res = template_summary(make_chart(), [high_k_finding()], now=NOW, include_flags=True)
    data = json.loads(json.dumps(res.to_dict()))
    assert data["patient"] == "Patient/p1" and data["backend"] == "none"
    assert data["sentences"][0]["citations"][:2] == ["Observation/k2", "MedicationRequest/m1"]
    assert [g["key"] for g in data["groups"]][:2] == ["status", "history"]


def test_handoff_ipass_sections():
    chart = make_chart()
    entry = compose_handoff(chart, [high_k_finding(), medium_finding()], now=NOW)
    assert entry.illness_severity == "watcher"
    assert all(entry.sections[k] for k in ("illness", "patient", "action", "situation"))
    assert all(s.verified for s in entry.sentences())
    actions = " ".join(s.text for s in entry.sections["action"])
    assert (
        "Hold the potassium chloride dose" in actions
        and "Overdue dose" in actions
        and "Pending result" in actions
    )
    situation = " ".join(s.text for s in entry.sections["situation"])
    assert "High-severity flag" in situation
    md = handoff_markdown(compose_ward_handoff([entry], ward="4B", now=NOW))
    assert "**Illness severity**" in md and "Synthesis by receiver" in md and "WATCHER" in md


def test_handoff_with_llm_patient_summary():
    chart = make_chart(note_text=INJECTION)
    sheet = build_fact_sheet(chart, [high_k_finding()], now=NOW)
    demo = _tag(sheet, "demographics")
    note = _tag(sheet, "note")
    backend = ScriptedBackend(
        [f"The patient is a 74-year-old female [{demo}]. She has no allergies [{note}]."]
    )
    entry = compose_handoff(chart, [high_k_finding()], backend=backend, now=NOW)
    patient = entry.sections["patient"]
    assert patient[0].origin == "llm" and patient[0].text == "The patient is a 74-year-old female."
    assert not any("no allergies" in s.text for s in entry.sentences())
    assert any("Penicillin" in s.text for s in patient)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from datetime import UTC, datetime

    from assistant.demo_ward import generate_demo_ward

    out = tmp_path_factory.mktemp("summary-demo")
    generate_demo_ward(out, anchor=datetime(2026, 3, 16, 7, 0, tzinfo=UTC), seed=7)
    return out


def test_demo_ward_template_summaries_verified_and_cover_flags(demo_dir):
    from datetime import UTC, datetime

    from assistant.rules.engine import evaluate
    from connectors import open_source

    now = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)
    key = json.loads((demo_dir / "answer_key.json").read_text())
    injected = set(key["injection_notes"])
    with open_source(demo_dir) as src:
        for pid in src.iter_patient_ids():
            chart = src.patient_chart(pid)
            findings = evaluate(chart, now=now)
            res = template_summary(chart, findings, now=now, include_flags=True)
            assert all(s.verified for s in res.sentences), [s.reason for s in res.sentences if not s.verified]
            shown = {t for s in res.sentences for t in s.tags}
            assert {f.tag for f in res.facts.must_cover()} <= shown
            plain = template_summary(chart, findings, now=now)  # the dashboard's: flags stay in their column
            assert all(s.verified for s in (*plain.sentences, *plain.overflow))
            assert not {t for s in plain.sentences for t in s.tags} & {
                f.tag for f in plain.facts.facts if f.kind == "flag"
            }
            high = [f for f in findings if f.severity == "high"]
            assert len([f for f in res.facts.facts if f.kind == "flag" and f.severity == "high"]) == len(high)
            if any(n.ref in injected for n in chart.notes) and chart.active_allergies():
                text = " ".join(s.text for s in res.sentences).lower()
                assert "no allergies" not in text and "allergy:" in text


def test_cli_summarize_and_handoff(demo_dir):
    from assistant.cli import main

    out = io.StringIO()
    with __import__("connectors").open_source(demo_dir) as src:
        pid = next(iter(src.iter_patient_ids()))
    rc = main(
        [
            "summarize",
            str(demo_dir),
            "--patient",
            pid,
            "--format",
            "json",
            "--backend",
            "none",
            "--now",
            "2026-03-16T07:00:00+00:00",
        ],
        out=out,
    )
    assert rc == 0
    data = json.loads(out.getvalue())
    assert data["patient"] == f"Patient/{pid}" and data["sentences"]
    assert all(s["verified"] for s in data["sentences"])
    out = io.StringIO()
    rc = main(
        [
            "handoff",
            str(demo_dir),
            "--ward",
            "4B Med-Surg",
            "--format",
            "md",
            "--backend",
            "none",
            "--now",
            "2026-03-16T07:00:00Z",
        ],
        out=out,
    )
    assert rc == 0
    md = out.getvalue()
    assert md.startswith("# I-PASS handoff - 4B Med-Surg") and md.count("## ") >= 5
    assert "Synthesis by receiver" in md


def test_per_fact_mode_cites_by_construction_and_still_verifies():
    """Small models phrase one fact per call; a wrong number is dropped and that fact keeps its template."""
    from assistant.llm.fake import ScriptedBackend
    from assistant.summary.composer import compose
    from tests.test_summary_support import NOW, high_k_finding, make_chart

    chart = make_chart()

    def answer(messages):
        fact_line = messages[-1].content.removeprefix("FACT: ")
        if fact_line.startswith("INR"):
            return "INR was 9.99 at 05:00. And more text the model goes on with."
        return fact_line.split(" (")[0].rstrip(".") + ". Then it rambles on."

    result = compose(chart, [high_k_finding()], (), ScriptedBackend(answer), now=NOW, mode="per-fact")
    llm = [s for s in result.sentences if s.origin == "llm"]
    assert llm and all(s.verified and len(s.tags) == 1 for s in llm)
    assert not any("rambles" in s.text for s in result.sentences)
    assert any("9.99" in d.raw and not d.verified for d in result.dropped)
    assert all("9.99" not in s.text for s in result.sentences)
    assert any(
        s.origin == "template" and "INR was 3.8" in s.text for s in result.sentences
    )  # the fact still shows
    shown_tags = {t for s in result.sentences for t in s.tags}
    assert all(f.tag in shown_tags for f in result.facts.must_cover() if f.kind != "flag")
    # the failed model sentence is one click away, on the template sentence shown in its place
    inr = next(s for s in result.sentences if "INR was 3.8" in s.text)
    assert inr.dropped_text and "9.99" in inr.dropped_text and inr.dropped_reason


def test_every_stated_value_cites_its_record(demo_dir):
    """Issue 11: a trend cites the earlier reading; a monitoring gap cites the last value it states."""
    from datetime import UTC, datetime

    from assistant.rules.engine import evaluate
    from connectors import open_source

    now = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)
    trends = gaps = 0
    with open_source(demo_dir) as src:
        for pid in src.iter_patient_ids():
            chart = src.patient_chart(pid)
            findings = evaluate(chart, now=now)
            res = template_summary(chart, findings, now=now, include_flags=True)
            facts = res.facts.by_tag()
            for s in (*res.sentences, *res.overflow):
                for tag in s.tags:
                    for atom in facts[tag].atoms:
                        if atom.value is not None and not atom.ref.startswith("rule:"):
                            assert atom.ref in s.citations, (s.text, atom.ref)
                if " from " in s.text and any(facts[t].kind == "result" for t in s.tags):
                    trends += 1
                    assert len([c for c in s.citations if c.startswith("Observation/")]) >= 2
            for f in findings:
                if f.rule_id.endswith("monitoring") or "no INR" in f.message or "no platelet" in f.message:
                    if "(last " in f.message:
                        gaps += 1
                        assert any(r.startswith("Observation/") for r in f.evidence), f.message
    assert trends and gaps


def test_values_show_in_the_reported_unit_at_the_analytes_precision():
    from assistant.model import Quantity, Result
    from assistant.summary.display import display_unit, show_result

    creat = Result(
        "Observation/c",
        "creatinine",
        "Creatinine",
        "laboratory",
        NOW,
        "final",
        value=1.40271,
        unit="mg/dL",
        original=Quantity(124, "umol/L"),
    )
    assert show_result(creat) == "124 µmol/L"
    assert show_result(creat, "mg/dL") == "1.40 mg/dL"
    glucose = Result(
        "Observation/g",
        "glucose",
        "Glucose",
        "laboratory",
        NOW,
        "final",
        value=57.6512,
        unit="mg/dL",
        original=Quantity(3.2, "mmol/L"),
    )
    assert show_result(glucose) == "3.2 mmol/L" and "57.651" not in show_result(glucose, "mg/dL")
    sbp = Result(
        "Observation/b", "systolic_bp", "Systolic", "vital-signs", NOW, "final", value=132.0, unit="mm[Hg]"
    )
    assert show_result(sbp) == "132 mmHg" and display_unit("Cel") == "°C"

"""AI-suggested contradictions: capable served models only; each proposal must cite evidence and pass the verifier."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from assistant.llm import ChatMessage, NoBackend, ScriptedBackend
from assistant.summary.facts import build_fact_sheet
from assistant.summary.suggest import (
    LABEL,
    Rejected,
    Suggestion,
    build_messages,
    check_proposal,
    enabled,
    parse_proposals,
    suggest_contradictions,
)
from assistant.summary.verifier import Verifier
from tests.conftest import DEMO_ANCHOR as NOW


class Served(ScriptedBackend):
    """A scripted stand-in that presents itself as an OpenAI-compatible server."""

    name = "openai"


@pytest.fixture(scope="module")
def case(demo_ward_dir):
    from assistant.rules.engine import evaluate
    from connectors import open_source

    with open_source(demo_ward_dir) as src:
        charts = [src.patient_chart(pid) for pid in src.iter_patient_ids()]
    chart = max(charts, key=lambda c: len(evaluate(c, now=NOW)))
    findings = evaluate(chart, now=NOW)
    sheet = build_fact_sheet(chart, findings, now=NOW)
    return chart, findings, sheet


def _plain_facts(sheet, n=2):
    """Non-flag facts with template sentences: a proposal copying them is supported by construction."""
    return [f for f in sheet.facts if f.kind not in ("flag", "guideline") and f.sentence and not f.quoted][:n]


def _proposals(sheet) -> dict:
    a, b = _plain_facts(sheet)
    flag = next(f for f in sheet.facts if f.kind == "flag")
    good = f"{a.sentence.strip().rstrip('.')} [{a.tag}]"
    return {
        "suggestions": [
            {"text": good, "evidence": [a.tag, b.tag]},
            {"text": "Warfarin 999 mg was given twice [F1]", "evidence": [a.tag]},
            {"text": "Something is off.", "evidence": ["F999"]},
            {"text": flag.sentence, "evidence": [flag.tag]},
            {"text": "No evidence at all.", "evidence": []},
            {"text": good, "evidence": [a.tag, b.tag]},
        ]
    }


def test_enabled_only_for_capable_served_models():
    assert enabled(Served([]))
    assert not enabled(ScriptedBackend([]))  # not a server
    assert not enabled(NoBackend()) and not enabled(None)

    class Tiny(Served):
        small_model = True

    assert not enabled(Tiny([]))


def test_off_backends_are_never_called(case):
    _, findings, sheet = case
    scripted = ScriptedBackend(["{}"])
    assert suggest_contradictions(sheet, findings, scripted) == [] and scripted.calls == []


def test_parse_proposals_never_raises_on_malformed_answers():
    for text in (
        "",
        "no json here",
        "{not json}",
        '{"suggestions": 3}',
        "[1, 2]",
        '{"suggestions": [1, {"x": 2}]}',
    ):
        assert parse_proposals(text) == []
    got = parse_proposals('Sure! {"suggestions": [{"text": "A [F2]", "evidence": ["[F2]", 7, "F3"]}]} Done.')
    assert got == [("A [F2]", ["F2", "F3"])]


def test_each_proposal_must_cite_bind_and_not_restate_a_rule(case):
    _, findings, sheet = case
    v = Verifier(sheet)
    items = _proposals(sheet)["suggestions"]
    results = [check_proposal(i["text"], i["evidence"], sheet, v) for i in items[:5]]
    ok, invented, unknown, restated, bare = results
    assert isinstance(ok, Suggestion) and ok.label == LABEL
    assert ok.citations and all(c in sheet.allowed_refs and "/" in c for c in ok.citations)
    assert isinstance(invented, Rejected)
    assert isinstance(unknown, Rejected) and "F999" in unknown.reason
    assert isinstance(restated, Rejected) and "rule flag" in restated.reason
    assert isinstance(bare, Rejected) and "no evidence" in bare.reason


def test_suggestions_from_a_served_model_are_checked_and_deduplicated(case):
    _, findings, sheet = case
    backend = Served([json.dumps(_proposals(sheet))])
    rejected: list[Rejected] = []
    got = suggest_contradictions(sheet, findings, backend, rejected=rejected)
    assert len(got) == 1 and got[0].to_dict()["label"] == "AI-suggested — not a rule"
    assert len(rejected) == 5 and any("repeats" in r.reason for r in rejected)
    (msgs, kwargs), *_ = backend.calls
    assert kwargs["json_schema"] is not None and msgs[0].role == "system"
    # flags already raised are named so the model does not repeat them; facts are data in the user turn
    assert "RULE FLAGS already raised" in msgs[-1].content
    assert msgs == build_messages(sheet, findings)


def test_a_failing_server_yields_no_suggestions(case):
    from assistant.llm import LlmUnavailable

    _, findings, sheet = case
    assert suggest_contradictions(sheet, findings, Served([LlmUnavailable("down")])) == []


# --- end to end against a real OpenAI-compatible server (`transformers serve`) ------------------------


@pytest.fixture(scope="module")
def served() -> Iterator:
    from assistant.llm import make_backend
    from tests.llm_server import start_llm_server

    base_url, model, stop = start_llm_server()
    try:
        yield make_backend(
            {
                "NVA_LLM_BACKEND": "openai",
                "NVA_LLM_BASE_URL": base_url,
                "NVA_LLM_MODEL": model,
                "NVA_LLM_TIMEOUT": "300",
            }
        )
    finally:
        stop()


def _echo_prompt(payload: str) -> list[ChatMessage]:
    """A stub prompt the tiny served model answers by copying: the plumbing is under test, not the model."""
    example = '{"suggestions": [{"text": "Example [F9]", "evidence": ["F9"]}]}'
    return [
        ChatMessage("system", "Repeat the user's message exactly, character for character."),
        ChatMessage("user", example),
        ChatMessage("assistant", example),
        ChatMessage("user", payload),
    ]


@pytest.mark.slow
def test_suggestions_end_to_end_through_a_real_server(case, served):
    from assistant.security.deid import for_chart

    chart, findings, sheet = case
    backend = for_chart(served, chart)
    # one short proposal per call, which the tiny model copies exactly: the plumbing is under test
    short = min(_plain_facts(sheet, 50), key=lambda f: len(f.sentence))
    cases = [
        ({"text": f"{short.sentence.strip().rstrip('.')} [{short.tag}]", "evidence": [short.tag]}, True),
        ({"text": f"It was 999 mg [{short.tag}]", "evidence": [short.tag]}, False),
        ({"text": "Something is off [F999]", "evidence": ["F999"]}, False),
    ]
    for item, supported in cases:
        rejected: list[Rejected] = []
        payload = json.dumps({"suggestions": [item]})
        got = suggest_contradictions(
            sheet, findings, backend, messages=_echo_prompt(payload), timeout=300, rejected=rejected
        )
        for s in got:
            assert s.label == LABEL and s.citations and all(c in sheet.allowed_refs for c in s.citations)
        if supported:
            assert [s.tags for s in got] == [(short.tag,)] and not rejected
        else:
            # parsed (so it reached the checks) and refused by them
            assert got == [] and len(rejected) == 1, item


@pytest.mark.slow
def test_synopsis_plumbing_through_a_real_server(case, served):
    from assistant.security.deid import for_chart
    from assistant.summary.synopsis import compose_synopsis

    chart, _, sheet = case
    syn = compose_synopsis(sheet, for_chart(served, chart), timeout=300)
    assert syn.sentences and syn.source in ("llm", "template")
    assert syn.latency_s > 0 and all(s.verified and s.citations for s in syn.sentences)
    if syn.source == "template":
        assert syn.dropped or syn.note  # the model answered and was checked, or the failure is stated

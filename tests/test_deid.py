"""De-identification for remote LLMs: nothing identifying leaves, and the answer reads right again."""

from __future__ import annotations

from assistant.llm.base import ChatMessage
from assistant.llm.fake import ScriptedBackend
from assistant.normalize import build_chart
from assistant.security.deid import Deidentifier, DeidentifyingBackend

PATIENT = {
    "resourceType": "Patient",
    "id": "pat-4711",
    "name": [{"given": ["Marta"], "family": "Okafor"}],
    "identifier": [{"type": {"coding": [{"code": "MR"}]}, "value": "MRN99812"}],
}
OBS = {
    "resourceType": "Observation",
    "id": "obs-5551",
    "status": "final",
    "subject": {"reference": "Patient/pat-4711"},
    "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
    "effectiveDateTime": "2026-03-16T05:00:00Z",
    "valueQuantity": {"value": 5.9, "unit": "mmol/L"},
}


def chart():
    return build_chart([PATIENT, OBS], source="t")


def test_names_ids_and_dates_do_not_leave_and_come_back():
    deid = Deidentifier(chart(), key=b"k" * 32)
    text = (
        "Marta Okafor (MRN99812, Patient/pat-4711): K 5.9 mmol/L at 2026-03-16 05:00 [Observation/obs-5551]."
    )
    out = deid.apply(text)
    for secret in ("Marta", "Okafor", "MRN99812", "pat-4711", "obs-5551", "2026-03-16"):
        assert secret not in out
    assert "5.9 mmol/L" in out and "[PATIENT]" in out
    back = deid.reverse(out)
    assert "2026-03-16 05:00" in back and "MRN99812" in back and "obs-5551" in back
    assert "Marta" not in back  # names are never put back: a summary sentence has no use for them


def test_same_chart_same_shift_other_key_other_shift():
    assert Deidentifier(chart(), key=b"a" * 32).shift == Deidentifier(chart(), key=b"a" * 32).shift
    assert Deidentifier(chart(), key=b"a" * 32).shift != Deidentifier(chart(), key=b"b" * 32).shift


def test_backend_wrapper_sends_deidentified_and_returns_reidentified():
    c = chart()
    shifted = {}

    def answer(messages):
        shifted["sent"] = messages[-1].content
        # the model echoes the shifted date it was given, as a good model would
        date = shifted["sent"].split("at ")[1][:16]
        return f"Potassium was 5.9 mmol/L at {date} [F1]. Check it again."

    inner = ScriptedBackend(answer)
    backend = DeidentifyingBackend(inner, c)
    result = backend.chat([ChatMessage("user", "Marta Okafor: K 5.9 mmol/L at 2026-03-16 05:00 [F1]")])
    assert "Marta" not in shifted["sent"] and "2026-03-16" not in shifted["sent"]
    assert result.text == "Potassium was 5.9 mmol/L at 2026-03-16 05:00 [F1]. Check it again."
    streamed = "".join(backend.stream([ChatMessage("user", "Marta Okafor: K at 2026-03-16 05:00")]))
    assert "2026-03-16 05:00" in streamed


def test_make_backend_enforces_egress_and_marks_remote_backends_for_deidentification():
    import pytest

    from assistant.llm import LlmConfigError, make_backend
    from assistant.security.deid import for_chart

    with pytest.raises(LlmConfigError, match="NVA_LLM_ALLOW_REMOTE"):
        make_backend(
            {
                "NVA_LLM_BACKEND": "openai",
                "NVA_LLM_BASE_URL": "https://llm.example.com/v1",
                "NVA_LLM_MODEL": "m",
            }
        )
    local = make_backend(
        {"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "http://127.0.0.1:9/v1", "NVA_LLM_MODEL": "m"}
    )
    assert for_chart(local, chart()) is local
    remote = make_backend(
        {
            "NVA_LLM_BACKEND": "openai",
            "NVA_LLM_BASE_URL": "https://llm.example.com/v1",
            "NVA_LLM_ALLOW_REMOTE": "true",
            "NVA_LLM_MODEL": "m",
        }
    )
    assert isinstance(for_chart(remote, chart()), DeidentifyingBackend)
    trusted = make_backend(
        {
            "NVA_LLM_BACKEND": "openai",
            "NVA_LLM_BASE_URL": "https://llm.hospital.org/v1",
            "NVA_LLM_ALLOW_HOSTS": "llm.hospital.org",
            "NVA_LLM_DEIDENTIFY": "false",
            "NVA_LLM_MODEL": "m",
        }
    )
    assert for_chart(trusted, chart()) is trusted


def test_deidentified_summary_through_a_real_openai_compatible_server(demo_ward_dir, demo_anchor):
    """`transformers serve` stands in for a remote LLM: what it receives is de-identified, what the nurse sees is
    re-identified and verified against the real chart."""
    import pytest

    pytest.importorskip("fastapi")
    from assistant.llm import make_backend
    from assistant.rules.engine import evaluate
    from assistant.summary.composer import compose
    from connectors.bundle_dir import BundleDirSource
    from tests.llm_server import start_llm_server

    source = BundleDirSource(demo_ward_dir)
    pid = sorted(source.iter_patient_ids())[0]
    chart_ = source.patient_chart(pid)
    base_url, model, stop = start_llm_server()
    try:
        backend = make_backend(
            {
                "NVA_LLM_BACKEND": "openai",
                "NVA_LLM_BASE_URL": base_url,
                "NVA_LLM_MODEL": model,
                "NVA_LLM_MAX_TOKENS": "48",
            }
        )
        backend.requires_deid = True  # as make_backend marks a remote host; the server itself is on loopback
        sent: list[str] = []
        original_stream = backend.stream

        def spy(messages, **kwargs):
            sent.extend(m.content for m in messages)
            return original_stream(messages, **kwargs)

        backend.stream = spy
        result = compose(
            chart_,
            evaluate(chart_, now=demo_anchor),
            (),
            backend,
            now=demo_anchor,
            mode="per-fact",
            prompt_facts=3,
            timeout=120,
        )
    finally:
        stop()
    assert sent, "the server was never called"
    outgoing = "\n".join(sent)
    name_parts = [p for p in chart_.patient.name.split() if len(p) > 2]
    for secret in [*name_parts, chart_.patient.mrn, pid]:
        assert secret and secret not in outgoing
    assert demo_anchor.strftime("%Y-%m-%d") not in outgoing  # dates were shifted before leaving
    # what is shown is verified against the real (re-identified) facts; nothing unverified is displayed
    assert result.sentences and all(s.verified for s in result.sentences)
    assert result.backend == "openai"
    # the round trip works: the model's shifted dates came back as the chart's own and passed the verifier
    assert any(s.origin == "llm" for s in result.sentences), [d.reason for d in result.dropped]


# --- free text in notes (issue 12.8) ----------------------------------------------------------------------
import base64  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from assistant.security.deid import PLACEHOLDERS, for_chart, people_names, scrub_free_text  # noqa: E402

CORPUS = tomllib.loads((Path(__file__).parent / "data" / "deid_notes.toml").read_text(encoding="utf-8"))[
    "note"
]


@pytest.mark.parametrize("note", CORPUS, ids=[n["text"][:40] for n in CORPUS])
def test_note_corpus_loses_identifiers_and_keeps_clinical_content(note):
    out = scrub_free_text(note["text"])
    assert not [s for s in note["secrets"] if s in out], out
    assert not [k for k in note["keep"] if k not in out], out


def test_corpus_covers_every_kind_of_identifier():
    """The corpus is not vacuous: each placeholder kind is produced by at least one note."""
    produced = "".join(scrub_free_text(n["text"]) for n in CORPUS)
    assert all(p in produced for p in PLACEHOLDERS), [p for p in PLACEHOLDERS if p not in produced]
    assert sum(bool(n["secrets"]) for n in CORPUS) >= 18 and sum(not n["secrets"] for n in CORPUS) >= 3


def _note(text: str, author: str | None = None) -> dict:
    doc = {
        "resourceType": "DocumentReference",
        "id": "doc-1",
        "status": "current",
        "subject": {"reference": "Patient/pat-4711"},
        "date": "2026-03-16T04:00:00Z",
        "content": [
            {"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}
        ],
    }
    if author:
        doc["author"] = [{"reference": "Practitioner/pr-9", "display": author}]
    return doc


def test_chart_people_are_removed_even_without_a_title():
    """A practitioner named anywhere in the chart is removed wherever the bare surname appears in a note."""
    note = "Okonkwo aware. Adaeze to review at 10:00; Marta Okafor asleep."
    c = build_chart([PATIENT, OBS, _note(note, author="Adaeze Okonkwo")], source="t")
    assert "Adaeze Okonkwo" in people_names(c) and "Marta Okafor" not in people_names(c)
    out = Deidentifier(c, key=b"k" * 32).apply(note)
    assert "Okonkwo" not in out and "Adaeze" not in out and "Marta" not in out
    assert out == "[NAME] aware. [NAME] to review at 10:00; [PATIENT] asleep."


def test_remote_backend_receives_no_identifier_from_notes():
    """Every corpus note goes through the wrapper a remote backend gets: the secrets never reach the model, and
    the placeholders it repeats come back as plain words, never as fake data."""
    c = build_chart([PATIENT, OBS, _note("x")], source="t")
    seen: list[str] = []

    def answer(messages):
        seen.append(messages[-1].content)
        return "Daughter [NAME] phoned from [PHONE] [F1]."

    backend = DeidentifyingBackend(ScriptedBackend(answer), c)
    sheet = "\n".join(f'[F{i}] Note: "{n["text"]}"' for i, n in enumerate(CORPUS, 1))
    result = backend.chat([ChatMessage("user", sheet)])
    leaked = [s for n in CORPUS for s in n["secrets"] if s in seen[0]]
    assert not leaked
    assert all(f"[F{i}]" in seen[0] for i in range(1, len(CORPUS) + 1))  # fact tags survive
    assert result.text == "Daughter another person phoned from a phone number [F1]."


def test_demo_ward_fact_sheets_and_prompts_are_not_altered_by_the_scrubber(demo_ward_dir, demo_anchor):
    """No false positives on structured facts (results, drugs, flags, times) or on the composer's own prompts."""
    from assistant.rules.engine import evaluate
    from assistant.summary.composer import build_messages
    from assistant.summary.facts import build_fact_sheet
    from connectors.bundle_dir import BundleDirSource

    source = BundleDirSource(demo_ward_dir)
    lines = 0
    for pid in sorted(source.iter_patient_ids()):
        c = source.patient_chart(pid)
        sheet = build_fact_sheet(c, evaluate(c, now=demo_anchor), now=demo_anchor)
        for fact in sheet.facts:
            lines += 1
            assert scrub_free_text(fact.text) == fact.text, fact.text
        for message in build_messages(sheet)[:3]:  # system rules and the worked example
            assert scrub_free_text(message.content) == message.content
    assert lines > 100


def test_for_chart_lives_with_deidentification_not_in_the_llm_layer():
    local = ScriptedBackend(lambda m: "ok")
    assert for_chart(local, chart()) is local
    local.requires_deid = True
    assert isinstance(for_chart(local, chart()), DeidentifyingBackend)


def test_the_patients_own_address_phone_and_identifiers_are_removed_verbatim():
    patient = {
        **PATIENT,
        "address": [{"line": ["Flat 2, Kestrel Court"], "city": "Holmfirth", "postalCode": "HD9 7QT"}],
        "telecom": [
            {"system": "phone", "value": "01484 0142"},
            {"system": "email", "value": "m.ok@mail.example"},
        ],
        "identifier": [
            *PATIENT["identifier"],
            {"system": "urn:ssn", "value": "999-41-7731"},
            {"value": "NX4431"},
        ],
    }
    c = build_chart([patient, OBS], source="t")
    note = (
        "Going home to Holmfirth (Flat 2, Kestrel Court); call 01484 0142 or m.ok@mail.example; ref NX4431."
    )
    out = Deidentifier(c, key=b"k" * 32).apply(note)
    for secret in ("Holmfirth", "Kestrel", "01484 0142", "m.ok@mail.example", "NX4431"):
        assert secret not in out, out
    assert out.startswith("Going home to [ADDRESS]") and "[PHONE]" in out and "[EMAIL]" in out

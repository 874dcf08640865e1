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

    from assistant.llm import LlmConfigError, for_chart, make_backend

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

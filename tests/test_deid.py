"""De-identification for remote LLMs: nothing identifying leaves, and the answer reads right again."""

from __future__ import annotations

from assistant.llm.base import ChatMessage
from assistant.llm.fake import ScriptedBackend
from assistant.normalize import build_chart
from assistant.security.deid import Deidentifier, DeidentifyingBackend

PATIENT = {"resourceType": "Patient", "id": "pat-4711", "name": [{"given": ["Marta"], "family": "Okafor"}],
           "identifier": [{"type": {"coding": [{"code": "MR"}]}, "value": "MRN99812"}]}
OBS = {"resourceType": "Observation", "id": "obs-5551", "status": "final", "subject": {"reference": "Patient/pat-4711"},
       "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]}, "effectiveDateTime": "2026-03-16T05:00:00Z",
       "valueQuantity": {"value": 5.9, "unit": "mmol/L"}}


def chart():
    return build_chart([PATIENT, OBS], source="t")


def test_names_ids_and_dates_do_not_leave_and_come_back():
    deid = Deidentifier(chart(), key=b"k" * 32)
    text = "Marta Okafor (MRN99812, Patient/pat-4711): K 5.9 mmol/L at 2026-03-16 05:00 [Observation/obs-5551]."
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
        make_backend({"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "https://llm.example.com/v1", "NVA_LLM_MODEL": "m"})
    local = make_backend({"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "http://127.0.0.1:9/v1", "NVA_LLM_MODEL": "m"})
    assert for_chart(local, chart()) is local
    remote = make_backend({"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "https://llm.example.com/v1",
                           "NVA_LLM_ALLOW_REMOTE": "true", "NVA_LLM_MODEL": "m"})
    assert isinstance(for_chart(remote, chart()), DeidentifyingBackend)
    trusted = make_backend({"NVA_LLM_BACKEND": "openai", "NVA_LLM_BASE_URL": "https://llm.hospital.org/v1",
                            "NVA_LLM_ALLOW_HOSTS": "llm.hospital.org", "NVA_LLM_DEIDENTIFY": "false", "NVA_LLM_MODEL": "m"})
    assert for_chart(trusted, chart()) is trusted

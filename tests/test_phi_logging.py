"""Run the demo (chart, audit, summary, handoff; bundles and REST) at debug level and scan every log line for PHI."""

from __future__ import annotations

import io
import json
import logging

import pytest

from assistant.cli import main
from assistant.logsetup import PhiSafeFilter, configure_logging
from connectors.bundle_dir import BundleDirSource


def phi_tokens(ward_dir) -> set[str]:
    """Names, MRNs and patient/resource ids of the demo patients: none may appear in a log line."""
    tokens: set[str] = set()
    source = BundleDirSource(ward_dir)
    for record in source.iter_patient_records():
        for r in record.resources:
            if r.get("resourceType") == "Patient":
                tokens.add(r["id"])
                for name in r.get("name", []):
                    tokens.update(g for g in name.get("given", []) if len(g) > 2)
                    if len(name.get("family", "")) > 2:
                        tokens.add(name["family"])
                tokens.update(i["value"] for i in r.get("identifier", []) if len(i.get("value", "")) > 3)
            elif r.get("resourceType") in ("Observation", "MedicationRequest", "AllergyIntolerance"):
                tokens.add(r["id"])
    return tokens


def test_demo_run_at_debug_level_logs_no_phi(
    demo_ward_dir, demo_anchor, fhir_server_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("NVA_LLM_BACKEND", "none")
    buffer = io.StringIO()
    handler = configure_logging(3, stream=buffer)  # -vvv: libraries (urllib3 URLs) at debug too
    # main() configures logging again for each call; keep our buffer as the handler it installs.
    monkeypatch.setattr("assistant.cli.configure_logging", lambda verbosity: handler)
    try:
        ids = sorted(BundleDirSource(demo_ward_dir).iter_patient_ids())
        server = fhir_server_factory(demo_ward_dir)
        now = demo_anchor.isoformat()
        out = io.StringIO()
        runs = [
            ["-vv", "chart", str(demo_ward_dir), "--patient", ids[0], "--format", "json"],
            ["-vv", "chart", server.base_url, "--patient", ids[1]],
            [
                "-vv",
                "audit",
                str(demo_ward_dir),
                "--out",
                str(tmp_path / "audit.jsonl"),
                "--now",
                now,
                "--no-progress",
            ],
            ["-vv", "summarize", str(demo_ward_dir), "--patient", ids[2], "--backend", "none", "--now", now],
            [
                "-vv",
                "handoff",
                str(demo_ward_dir),
                "--ward",
                "Location/ward-4b",
                "--backend",
                "none",
                "--now",
                now,
            ],
        ]
        for argv in runs:
            assert main(argv, out=out) == 0, argv
    finally:
        logging.getLogger().removeHandler(handler)
    log_text = buffer.getvalue()
    # the run did log, NVA's own lines and urllib3's request lines: the scan below is not vacuous
    assert "chart built" in log_text and "urllib3" in log_text and "Patient/…" in log_text
    leaks = sorted(t for t in phi_tokens(demo_ward_dir) if t in log_text)
    assert not leaks, leaks[:10]
    # and the outputs themselves did carry the PHI, so the scan was looking for the right things
    assert any(t in out.getvalue() for t in phi_tokens(demo_ward_dir))
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])["patient"].startswith(
        "Patient/"
    )


def test_filter_redacts_resource_paths_and_queries():
    record = logging.LogRecord(
        "urllib3",
        logging.DEBUG,
        __file__,
        1,
        'http://h:1 "GET /fhir/Patient/abc-123?name=Smith HTTP/1.1" 200',
        None,
        None,
    )
    PhiSafeFilter().filter(record)
    assert "abc-123" not in record.getMessage() and "Smith" not in record.getMessage()
    assert "Patient/…" in record.getMessage()


def test_filter_redacts_exception_text_and_keeps_the_message_shape():
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(PhiSafeFilter())
    logger = logging.getLogger("nva.test.exc")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("no such resource Observation/obs-5551 for Patient/pat-4711")
        except ValueError:
            logger.exception("chart failed for %s", "Patient/pat-4711")
    finally:
        logger.removeHandler(handler)
    text = buffer.getvalue()
    assert "chart failed for Patient/…" in text and "ValueError: no such resource Observation/…" in text
    assert "pat-4711" not in text and "obs-5551" not in text


def test_dashboard_log_records_pass_the_phi_filter(monkeypatch):
    """Streamlit configures logging itself; importing the dashboard's services puts the filter on every handler,
    and a root without handlers gets a filtered one instead of logging.lastResort."""
    pytest.importorskip("streamlit")
    from assistant.logsetup import install_phi_filter

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    streamlit_logger = logging.getLogger("streamlit.nva_test")
    bare = logging.StreamHandler(io.StringIO())
    streamlit_logger.addHandler(bare)
    try:
        import dashboard.services  # noqa: F401 - its import installs the filter

        install_phi_filter()  # idempotent, and what the import did (the module may be imported already)
        assert root.handlers and all(
            sum(isinstance(f, PhiSafeFilter) for f in h.filters) == 1 for h in root.handlers
        )
        assert any(isinstance(f, PhiSafeFilter) for f in bare.filters)
        # streamlit may swap a logger's handler later (config change): the logger's own filter still applies
        swapped = io.StringIO()
        streamlit_logger.removeHandler(bare)
        streamlit_logger.addHandler(logging.StreamHandler(swapped))
        streamlit_logger.propagate = False
        streamlit_logger.error("script failed on Observation/obs-5551")
        assert "Observation/…" in swapped.getvalue() and "obs-5551" not in swapped.getvalue()
        buffer = io.StringIO()
        root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
        logging.getLogger("dashboard.services").warning("could not load Patient/pat-4711?name=Okafor")
        assert "Patient/…?…" in buffer.getvalue() and "pat-4711" not in buffer.getvalue()
    finally:
        streamlit_logger.removeHandler(bare)


def test_dropped_model_sentences_log_no_chart_or_model_text(demo_ward_dir, demo_anchor, caplog):
    """A model sentence with a surname in brackets and unsupported claims is dropped; the log says that it was
    dropped (kind, counts), never what it said."""
    from assistant.llm.fake import ScriptedBackend
    from assistant.rules.engine import evaluate
    from assistant.summary.composer import compose

    source = BundleDirSource(demo_ward_dir)
    chart = source.patient_chart(sorted(source.iter_patient_ids())[0])
    marker = "Okonkwo"
    answer = f"Dr {marker} says potassium is 9.9 mmol/L [{marker}]. {marker} gave 80 mg furosemide [F1]."
    backend = ScriptedBackend(lambda messages: answer)
    backend.name = "openai"  # the whole-sheet prompt, as for a served model
    with caplog.at_level(logging.DEBUG):
        res = compose(chart, evaluate(chart, now=demo_anchor), (), backend, now=demo_anchor)
    assert res.dropped and marker not in " ".join(s.text for s in res.sentences)  # the verifier dropped them
    assert marker not in caplog.text and "9.9" not in caplog.text
    assert chart.patient.name not in caplog.text

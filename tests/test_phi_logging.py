"""Run the demo (chart, audit, summary, handoff; bundles and REST) at debug level and scan every log line for PHI."""

from __future__ import annotations

import io
import json
import logging

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

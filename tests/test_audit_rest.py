"""`nva audit` against a FHIR server on 127.0.0.1: Bulk Data $export when offered, per-patient searches otherwise."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from assistant.audit.report import read_findings
from assistant.cli import main
from connectors.bulk_export import bulk_export, export_operations
from connectors.errors import FhirFatalError
from connectors.rest import RestFhirSource, RestOptions
from tests.test_audit import NOW, check_answer_key

server_mod = pytest.importorskip("tests.fhir_test_server")
demo_ward = pytest.importorskip("assistant.demo_ward")


@pytest.fixture(scope="module")
def ward(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ward-rest")
    demo_ward.generate_demo_ward(out, anchor=datetime(2026, 3, 2, 7, 0, tzinfo=UTC), seed=7)
    return out


@pytest.fixture(scope="module")
def key(ward) -> dict:
    return json.loads((ward / "answer_key.json").read_text())


def _audit(url: str, out: Path) -> str:
    buf = io.StringIO()
    assert main(["audit", url, "--out", str(out), "--now", NOW, "--no-progress"], out=buf) == 0
    return buf.getvalue()


def test_audit_over_bulk_export_reproduces_the_answer_key(ward, key, tmp_path):
    with server_mod.FhirTestServer(
        ward, export_polls=2, export_retry_after=0, export_max_lines=500
    ) as server:
        out = tmp_path / "bulk.jsonl"
        _audit(server.base_url, out)
        paths = [r.path for r in server.requests]
    check_answer_key(read_findings(out), key)
    assert any(p.endswith("/$export") for p in paths)  # kick-off, not per-patient searches
    assert sum("$export-poll-status" in p for p in paths) >= 3  # two 202s, then the manifest
    assert not any(p.rstrip("/").endswith("/Observation") for p in paths)
    assert not (tmp_path / "bulk.jsonl.export").exists()


def test_audit_without_bulk_export_uses_per_patient_requests(ward, key, tmp_path):
    with server_mod.FhirTestServer(ward, bulk_export=False) as server:
        out = tmp_path / "rest.jsonl"
        _audit(server.base_url, out)
        paths = [r.path for r in server.requests]
    check_answer_key(read_findings(out), key)
    assert not any("$export" in p for p in paths)


def test_bulk_export_honours_retry_after_and_reports_progress(ward, tmp_path):
    slept: list[float] = []
    progress: list[str] = []
    with server_mod.FhirTestServer(ward, export_polls=3, export_retry_after=7) as server:
        source = RestFhirSource(server.base_url, options=RestOptions(retries=1), sleep=slept.append)
        assert export_operations(source) == {"system", "patient"}
        outdir = bulk_export(source, tmp_path / "export", on_progress=progress.append)
    assert slept == [7.0, 7.0, 7.0]
    assert len(progress) == 3 and all("%" in p for p in progress)
    names = sorted(p.name for p in outdir.glob("*.ndjson"))
    assert "Patient.0001.ndjson" in names and "Location.0001.ndjson" in names
    lines = (outdir / "Patient.0001.ndjson").read_text().splitlines()
    assert len(lines) == len(json.loads((ward / "ward.json").read_text())["patients"])
    # a finished export is not fetched again
    assert bulk_export(RestFhirSource("http://127.0.0.1:9/fhir"), outdir) == outdir


def test_bulk_export_errors_are_typed(ward, tmp_path):
    with server_mod.FhirTestServer(ward, bulk_export=False) as server:
        source = RestFhirSource(server.base_url, options=RestOptions(retries=0), sleep=lambda _s: None)
        with pytest.raises(FhirFatalError, match="rejected the bulk export"):
            bulk_export(source, tmp_path / "x")

"""The nva command line, run in-process as a user would."""

from __future__ import annotations

import io
import json
from pathlib import Path

from assistant.cli import main
from assistant.settings import load_settings, redacted, settings_markdown

REPO = Path(__file__).resolve().parent.parent


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_demo_data_then_chart_json_with_provenance(tmp_path, demo_anchor):
    code, text = run("demo-data", str(tmp_path / "ward"), "--anchor", demo_anchor.isoformat())
    assert code == 0 and "demo ward written" in text
    code, census = run("patients", str(tmp_path / "ward"), "--ward", "Location/ward-4b")
    ids = [line.split("\t")[0] for line in census.splitlines()]
    assert code == 0 and len(ids) >= 18
    code, text = run("chart", str(tmp_path / "ward"), "--patient", ids[0], "--format", "json")
    chart = json.loads(text)
    assert chart["patient"]["ref"] == f"Patient/{ids[0]}"
    assert chart["results"] and all(r["ref"].startswith("Observation/") for r in chart["results"])
    assert all(o["ref"].startswith(("MedicationRequest/", "MedicationStatement/")) for o in chart["orders"])
    assert chart["encounter"]["ward_ref"] == "Location/ward-4b"


def test_chart_text_names_sources(tmp_path, demo_ward_dir):
    ids = sorted(
        p.stem for p in demo_ward_dir.glob("*.json") if p.stem not in ("ward", "answer_key", "locations")
    )
    code, text = run("chart", str(demo_ward_dir), "--patient", ids[0])
    assert code == 0
    assert f"[Patient/{ids[0]}]" in text and "[Observation/" in text


def test_unknown_patient_is_a_clear_error(demo_ward_dir, capsys):
    code, _ = run("chart", str(demo_ward_dir), "--patient", "nobody")
    assert code == 2
    assert "Patient/nobody is not in" in capsys.readouterr().err


def test_missing_source_is_a_clear_error(tmp_path, capsys):
    code, _ = run("chart", str(tmp_path / "missing"), "--patient", "x")
    assert code == 2 and "no such file or directory" in capsys.readouterr().err


def test_export_ndjson_round_trip(tmp_path, demo_ward_dir):
    code, _ = run("export-ndjson", str(demo_ward_dir), str(tmp_path / "nd"))
    assert code == 0
    assert (tmp_path / "nd" / "Patient.ndjson").is_file()
    code, listed = run("patients", str(tmp_path / "nd"))
    code2, original = run("patients", str(demo_ward_dir))
    assert sorted(listed.split()) == sorted(original.split())


def test_settings_doc_is_generated_from_the_declarations():
    doc = (REPO / "docs" / "SETTINGS.md").read_text()
    assert settings_markdown() in doc


def test_settings_precedence_and_redaction(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('NVA_FHIR_TOKEN = "from-file"\nNVA_FHIR_AUTH = "bearer"\n')
    values = load_settings({"NVA_FHIR_AUTH": "smart"}, secrets)
    assert values["NVA_FHIR_TOKEN"] == "from-file" and values["NVA_FHIR_AUTH"] == "smart"
    assert redacted(values)["NVA_FHIR_TOKEN"] == "***"

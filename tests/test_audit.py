"""Batch audit: the demo ward's answer key in every format and engine, resume after a kill, broken input."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from assistant.audit.report import read_findings
from assistant.audit.runner import AuditOptions, run_audit
from assistant.cli import main
from connectors import open_source
from connectors.ndjson_dir import write_ndjson_export
from connectors.partition import PartitionedExport, partition_export

ANCHOR = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
NOW = "2026-03-02T07:00:00+00:00"
REPO = Path(__file__).resolve().parents[1]

demo_ward = pytest.importorskip("assistant.demo_ward")


@pytest.fixture(scope="module")
def ward(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ward")
    demo_ward.generate_demo_ward(out, anchor=ANCHOR, seed=7)
    return out


@pytest.fixture(scope="module")
def ward_ndjson(ward, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ward-ndjson")
    with open_source(ward) as src:
        write_ndjson_export(
            ((r.patient_id, r.resources) for r in src.iter_patient_records() if r.error is None), out
        )
    return out


@pytest.fixture(scope="module")
def key(ward) -> dict:
    return json.loads((ward / "answer_key.json").read_text())


def audit(source: Path | str, out: Path, *extra: str) -> str:
    buf = io.StringIO()
    assert (
        main(["audit", str(source), "--out", str(out), "--now", NOW, "--no-progress", *extra], out=buf) == 0
    )
    return buf.getvalue()


def check_answer_key(findings: list[dict], key: dict) -> None:
    got = {(f["patient"], f["rule_id"]): set(f["evidence"]) for f in findings}
    assert len(got) == len(findings), "one finding per patient and rule on the demo ward"
    expected = {(e["patient"], e["rule"]): set(e["evidence"]) for e in key["expected"]}
    assert got.keys() == expected.keys()  # recall 100 %, no extra finding
    for f in findings:
        planted = expected[(f["patient"], f["rule_id"])]
        # Evidence as planted, plus only the records whose values the message states ("last INR ... at ...").
        values = f["values"]
        stated = (
            {v["ref"] for v in values}
            if isinstance(values, list)
            else set(re.findall(r"\[([A-Za-z]+/[^\]]+)\]", values))
        )
        assert planted <= set(f["evidence"]) and set(f["evidence"]) - planted <= stated, f["rule_id"]
    for m in key["must_not_fire"]:
        assert (m["patient"], m["rule"]) not in got, m["reason"]


# --- the answer key ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_demo_ward_answer_key_bundles(ward, key, tmp_path, fmt):
    out = tmp_path / f"audit.{fmt}"
    summary = audit(ward, out)
    assert f"{len(key['expected'])} findings" in summary
    check_answer_key(read_findings(out), key)


def test_demo_ward_answer_key_ndjson_with_process_pool(ward_ndjson, key, tmp_path):
    out = tmp_path / "audit.jsonl"
    audit(ward_ndjson, out, "--workers", "2", "--partitions", "3")
    rows = read_findings(out)
    check_answer_key(rows, key)
    for f in rows:
        assert f["patient"].startswith("Patient/") and all("/" in e for e in f["evidence"])
        assert f["action"] and f["message"] and f["severity"] in ("high", "medium", "low")
        assert f["values"] and all(v["ref"] for v in f["values"])


def test_demo_ward_html_report(ward, key, tmp_path):
    out = tmp_path / "audit.html"
    audit(ward, out)
    text = out.read_text()
    assert "<svg" in text and "<script" not in text and "<link" not in text and "src=" not in text  # no CDN
    assert f"<strong>{len(key['expected'])}</strong> findings" in text
    for e in key["expected"]:
        assert e["rule"] in text and e["patient"] in text
    assert "4B Med-Surg" in text  # counts per ward
    assert "Data quality" in text


def test_local_and_dask_engines_give_identical_output(ward_ndjson, tmp_path):
    # Threads (processes=False) keep the test fast; the CLI and benchmark use worker processes.
    now = datetime.fromisoformat(NOW)
    local, dask = tmp_path / "local.jsonl", tmp_path / "dask.jsonl"
    with open_source(ward_ndjson) as src:
        run_audit(src, local, options=AuditOptions(now=now, partitions=4, progress=False))
    with open_source(ward_ndjson) as src:
        run_audit(
            src,
            dask,
            options=AuditOptions(
                now=now, engine="dask", workers=2, partitions=4, progress=False, dask_processes=False
            ),
        )
    assert local.read_bytes() == dask.read_bytes() and local.stat().st_size > 0


# --- resume -----------------------------------------------------------------------------------------------------


def _cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "assistant.cli", "audit", *args, "--now", NOW, "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("source", "extra", "crash"),
    [
        ("bundles", ["--batch-size", "4"], "1"),  # killed right after the first checkpoint
        ("bundles", ["--batch-size", "4"], "2+"),  # killed after writing a part, before its checkpoint
        ("ndjson", ["--partitions", "5"], "2"),
    ],
)
def test_resume_after_kill_gives_exactly_the_uninterrupted_findings(
    ward, ward_ndjson, tmp_path, source, extra, crash
):
    src = ward if source == "bundles" else ward_ndjson
    reference = tmp_path / "reference.jsonl"
    audit(src, reference, *extra)
    out = tmp_path / "resumed.jsonl"
    killed = _cli([str(src), "--out", str(out), *extra], {"NVA_AUDIT_CRASH_AFTER": crash})
    assert killed.returncode == 137, killed.stderr
    assert not out.exists()
    checkpoint = json.loads((tmp_path / "resumed.jsonl.work" / "checkpoint.json").read_text())
    assert len(checkpoint["completed"]) == int(crash.rstrip("+"))
    resumed = _cli([str(src), "--out", str(out), *extra, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after" in resumed.stdout
    assert out.read_bytes() == reference.read_bytes()
    assert not (tmp_path / "resumed.jsonl.work").exists()


def test_resume_refuses_different_settings(ward, tmp_path):
    out = tmp_path / "a.jsonl"
    killed = _cli([str(ward), "--out", str(out), "--batch-size", "4"], {"NVA_AUDIT_CRASH_AFTER": "1"})
    assert killed.returncode == 137
    again = _cli([str(ward), "--out", str(out), "--batch-size", "7", "--resume"])
    assert again.returncode == 2 and "batch_size" in again.stderr


# --- broken input -----------------------------------------------------------------------------------------------


def _bundle(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _patient_with_high_k(pid: str) -> list[dict]:
    return [
        {"resourceType": "Patient", "id": pid},
        {
            "resourceType": "Encounter",
            "id": f"e-{pid}",
            "status": "in-progress",
            "class": {"code": "IMP"},
            "subject": {"reference": f"Patient/{pid}"},
        },
        {
            "resourceType": "MedicationRequest",
            "id": f"mr-{pid}",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"text": "Potassium chloride 20 mEq"},
            "subject": {"reference": f"Patient/{pid}"},
        },
        {
            "resourceType": "Observation",
            "id": f"k-{pid}",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
            "subject": {"reference": f"Patient/{pid}"},
            "effectiveDateTime": "2026-03-02T05:00:00Z",
            "valueQuantity": {"value": 6.2, "unit": "mmol/L"},
        },
    ]


def test_corrupted_patients_are_reported_and_the_rest_audited(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good1.json").write_text(json.dumps(_bundle(_patient_with_high_k("g1"))))
    (src / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')  # truncated file
    wrong = _patient_with_high_k("w1")
    wrong[3]["valueQuantity"] = {"value": "six", "unit": "mmol/L"}  # wrong type: the lab is unusable
    wrong[0]["birthDate"] = 19500101  # wrong type on the patient itself
    (src / "wrong-types.json").write_text(json.dumps(_bundle(wrong)))
    (src / "good2.json").write_text(json.dumps(_bundle(_patient_with_high_k("g2"))))
    out = tmp_path / "audit.jsonl"
    summary = audit(src, out)
    assert {f["patient"] for f in read_findings(out)} == {"Patient/g1", "Patient/g2"}
    assert "1 records could not be audited" in summary
    html = tmp_path / "audit.html"
    audit(src, html)
    text = html.read_text()
    assert "broken.json" in text and "not valid JSON" in text
    assert "invalid-resource" in text and "Observation/k-w1" in text


def test_ndjson_bad_lines_are_reported(tmp_path):
    src = tmp_path / "nd"
    write_ndjson_export([("a", _patient_with_high_k("a")), ("b", _patient_with_high_k("b"))], src)
    with (src / "Observation.ndjson").open("a") as fh:
        fh.write(
            '{"resourceType": "Observation", "id": "x", "subject": {"reference": "Patient/a"}, "status": \n'
        )
        fh.write("not json at all\n")
        fh.write('{"resourceType": "Observation", "id": "orphan", "status": "final"}\n')
    out = tmp_path / "audit.html"
    audit(src, out)
    text = out.read_text()
    assert "Observation.ndjson:3" in text and "Observation.ndjson:4" in text and "no-patient" in text
    jl = tmp_path / "audit.jsonl"
    audit(src, jl)
    assert {f["patient"] for f in read_findings(jl)} == {"Patient/a", "Patient/b"}


# --- partitioning -----------------------------------------------------------------------------------------------


def test_partitions_hold_whole_patients_and_shared_locations(ward, ward_ndjson, tmp_path):
    with open_source(ward) as src:
        by_bundle = {
            r.patient_id: sorted(
                f"{x['resourceType']}/{x['id']}" for x in r.resources if x["resourceType"] != "Location"
            )
            for r in src.iter_patient_records()
            if r.error is None
        }
    export = partition_export(ward_ndjson, outdir=tmp_path / "p", partitions=4)
    assert len(export.paths) == 4 and sum(export.patients) == len(by_bundle)
    seen = {}
    for i in range(4):
        for rec in export.records_of(i):
            assert rec.patient_id not in seen  # a patient lives in exactly one partition
            seen[rec.patient_id] = i
            assert any(x["resourceType"] == "Location" for x in rec.resources)
            assert (
                sorted(
                    f"{x['resourceType']}/{x['id']}" for x in rec.resources if x["resourceType"] != "Location"
                )
                == by_bundle[rec.patient_id]
            )
    assert set(seen) == set(by_bundle)
    again = PartitionedExport.load(tmp_path / "p")
    assert again is not None and again.patients == export.patients
    # NdjsonDirSource streams through the same partitioning (temporary directory, removed afterwards)
    with open_source(ward_ndjson) as src:
        ids = [r.patient_id for r in src.iter_patient_records()]
    assert sorted(ids) == sorted(by_bundle)


def test_rules_doc_is_generated_from_the_catalogue():
    from assistant.rules.docs import render_rules_markdown

    assert (REPO / "docs" / "RULES.md").read_text() == render_rules_markdown()


def test_html_report_keeps_patient_text_inert():
    from assistant.audit.report import render_html

    hostile = "<style>.high{display:none}</style><img src=http://x/beacon> lm 0001\u202e\x00"
    row = {
        "patient": "Patient/p<1>",
        "ward": "<b>Ward</b>",
        "resources": 3,
        "error": None,
        "issues": [{"source": "Observation/<x>", "code": "bad", "severity": "warning", "message": hostile}],
        "findings": [
            {
                "patient": "Patient/p<1>",
                "rule_id": "r",
                "severity": "high",
                "message": hostile,
                "evidence": ["MedicationRequest/<m>"],
            }
        ],
    }
    page = render_html(lambda: [row], now="2026-03-02T07:00:00+00:00", source="<src>", global_issues=[])
    assert "<style>.high" not in page and "<img" not in page and "<b>Ward" not in page
    assert "\u202e" not in page and "\x00" not in page
    assert "&lt;style&gt;" in page and "U+202E" in page  # shown as text, the bidi control made visible

"""Bundle folders: one patient across files merged, repeats counted, a chart reads only its own entries."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import connectors.bundle_dir as bundle_dir
from connectors.bundle_dir import BundleDirSource, bundle_resources, iter_entries, read_json_file, read_spans


def patient(pid: str, **extra) -> dict:
    return {"resourceType": "Patient", "id": pid, "name": [{"given": ["Zoë"], "family": "Ünal 🧪"}], **extra}


def obs(oid: str, pid: str, value, *, updated: str | None = None, ref: str | None = None) -> dict:
    r = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": ref or f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
        "effectiveDateTime": "2026-03-16T05:00:00Z",
        "valueQuantity": {"value": value, "unit": "mmol/L"},
    }
    if updated:
        r["meta"] = {"lastUpdated": updated}
    return r


def bundle(*resources, urls: dict[str, str] | None = None) -> dict:
    urls = urls or {}
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {**({"fullUrl": urls[str(r.get("id"))]} if str(r.get("id")) in urls else {}), "resource": r}
            for r in resources
        ],
    }


def write(path: Path, doc: dict, *, gz: bool = False, indent: int | None = None) -> Path:
    data = json.dumps(doc, indent=indent, ensure_ascii=False).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def potassium(chart) -> dict[str, float | None]:
    return {r.ref: r.value for r in chart.results}


def test_one_patient_across_two_files_is_merged(tmp_path):
    write(tmp_path / "a.json", bundle(patient("p1"), obs("k1", "p1", 4.1)))
    write(tmp_path / "b.json.gz", bundle(obs("k2", "p1", 5.9)), gz=True)
    source = BundleDirSource(tmp_path)
    assert [p.name for p in source.index["p1"]] == ["a.json", "b.json.gz"]
    chart = source.patient_chart("p1")
    assert potassium(chart) == {"Observation/k1": 4.1, "Observation/k2": 5.9}
    assert chart.latest("potassium").value == 5.9
    records = [r for r in source.iter_patient_records() if r.error is None]
    assert [r.patient_id for r in records] == ["p1"]  # once, with both files' resources
    assert {r["id"] for r in records[0].resources} == {"p1", "k1", "k2"}


def test_duplicates_newest_last_updated_wins_and_are_counted(tmp_path):
    write(tmp_path / "a.json", bundle(patient("p1"), obs("k1", "p1", 6.2, updated="2026-03-16T06:00:00Z")))
    write(tmp_path / "b.json", bundle(obs("k1", "p1", 4.0, updated="2026-03-16T05:00:00Z")))
    write(tmp_path / "c.json", bundle(patient("p1"), obs("k1", "p1", 5.0, updated="2026-03-16T05:30:00Z")))
    source = BundleDirSource(tmp_path)
    record = source.patient_resources("p1")
    assert record.duplicates == 3  # a second Patient/p1 and two more copies of Observation/k1
    chart = source.patient_chart("p1")
    assert potassium(chart) == {"Observation/k1": 6.2}
    dup = [i for i in chart.issues if i.code == "duplicate-resource"]
    assert len(dup) == 1 and dup[0].message.startswith("3 duplicate")


def test_a_chart_reads_only_its_own_entries(tmp_path):
    big = bundle(
        patient("p1"), obs("k1", "p1", 4.2), patient("p2"), obs("k2", "p2", 6.5), obs("k3", "p1", 4.4)
    )
    write(tmp_path / "all.json", big, indent=2)
    write(tmp_path / "other.json", bundle(patient("p3"), obs("k4", "p3", 5.0)))
    source = BundleDirSource(tmp_path)
    assert sorted(source.iter_patient_ids()) == ["p1", "p2", "p3"]
    # After the index is built once, an unrelated file is never opened again: break it and read p1.
    (tmp_path / "other.json").write_text("{ this is not json")
    chart = source.patient_chart("p1")
    assert potassium(chart) == {"Observation/k1": 4.2, "Observation/k3": 4.4}
    # The spans of p1 hold p1's entries only (p2's observation between them is not parsed).
    [info] = [f for f in source._files if f.path.name == "all.json"]
    entries = read_spans(info.path, info.patients["p1"])
    assert sorted(e["resource"]["id"] for e in entries) == ["k1", "k3", "p1"]


@pytest.mark.parametrize("gz", [False, True])
def test_streamed_entries_match_a_whole_file_parse_across_chunk_edges(tmp_path, monkeypatch, gz):
    monkeypatch.setattr(bundle_dir, "CHUNK", 37)  # many chunk edges, inside strings and multibyte characters
    resources = [patient(f"p{i}") for i in range(3)] + [
        obs(f"k{i}", f"p{i % 3}", 4 + i / 10) for i in range(9)
    ]
    doc = {"entry": bundle(*resources)["entry"], "resourceType": "Bundle", "total": 12}  # entry before type
    path = write(tmp_path / ("w.json.gz" if gz else "w.json"), doc, gz=gz, indent=1)
    streamed = list(iter_entries(path))
    assert [e for e, _, _ in streamed] == doc["entry"]
    assert read_spans(path, [(s, e) for _, s, e in streamed]) == doc["entry"]
    whole, _ = bundle_resources(read_json_file(path), str(path))
    by_source = BundleDirSource(path)
    for i in range(3):
        mine = [
            r for r in whole if r.get("subject", {}).get("reference") == f"Patient/p{i}" or r["id"] == f"p{i}"
        ]
        assert potassium(by_source.patient_chart(f"p{i}")) == {
            f"Observation/{r['id']}": r["valueQuantity"]["value"]
            for r in mine
            if r["resourceType"] == "Observation"
        }


def test_urn_uuid_references_resolve_even_when_the_patient_comes_last(tmp_path):
    pid_url = "urn:uuid:0d5ee8a6-0001"
    resources = [obs("k1", "p1", 5.1, ref=pid_url), patient("p1")]
    write(tmp_path / "p.json", bundle(*resources, urls={"p1": pid_url}))
    chart = BundleDirSource(tmp_path).patient_chart("p1")
    assert potassium(chart) == {"Observation/k1": 5.1}


def test_a_patient_id_that_is_not_a_string_costs_only_that_patient(tmp_path):
    write(tmp_path / "good.json", bundle(patient("g1"), obs("k1", "g1", 4.0)))
    bad_url = "urn:uuid:bad"
    write(
        tmp_path / "bad.json",
        bundle({**patient("x"), "id": ["x"]}, obs("k2", "x", 6.9, ref=bad_url), urls={"['x']": bad_url}),
    )
    source = BundleDirSource(tmp_path)
    assert list(source.iter_patient_ids()) == ["g1"]
    records = list(source.iter_patient_records())
    errors = [r for r in records if r.error is not None]
    assert [r.patient_id for r in errors] == ["file:bad.json"]
    assert "no Patient with a readable id" in str(errors[0].error)
    assert potassium(source.patient_chart("g1")) == {"Observation/k1": 4.0}


def test_census_comes_from_the_index_and_agrees_with_the_chart(tmp_path):
    ward = {
        "resourceType": "Location",
        "id": "w1",
        "name": "Ward 1",
        "physicalType": {"coding": [{"code": "wa"}]},
    }
    bed = {
        "resourceType": "Location",
        "id": "b1",
        "name": "Bed 1",
        "physicalType": {"coding": [{"code": "bd"}]},
        "partOf": {"reference": "Location/w1"},
    }
    enc = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "arrived",  # current per fhir_codes.toml, not only in-progress
        "class": {"code": "IMP"},
        "subject": {"reference": "Patient/p1"},
        "location": [
            {"location": {"reference": "Location/b1"}},
            {"location": "Location/w9"},
        ],  # one bad entry
    }
    write(tmp_path / "locations.json", bundle(ward, bed))
    write(tmp_path / "p1.json", bundle(patient("p1"), enc))
    source = BundleDirSource(tmp_path)
    assert [(w.ref, w.name) for w in source.wards()] == [("Location/w1", "Ward 1")]
    [entry] = source.ward_census("Location/w1")
    chart = source.patient_chart("p1")
    assert (
        (entry.encounter_ref, entry.ward_ref, entry.bed_ref)
        == (
            chart.encounter.ref,
            chart.encounter.ward_ref,
            chart.encounter.bed_ref,
        )
        == ("Encounter/e1", "Location/w1", "Location/b1")
    )
    assert source.ward_census("Location/other") == []


@pytest.mark.parametrize("gz", [False, True])
def test_records_in_one_pass_equal_charts_read_one_at_a_time(tmp_path, gz):
    med = {"resourceType": "Medication", "id": "m1", "code": {"text": "heparin"}}
    resources = [med] + [r for i in range(4) for r in (patient(f"p{i}"), obs(f"k{i}", f"p{i}", 4.0 + i))]
    write(tmp_path / ("all.json.gz" if gz else "all.json"), bundle(*resources), gz=gz)
    write(tmp_path / "extra.json", bundle(obs("k9", "p2", 6.0)))  # p2 continues in a second file
    source = BundleDirSource(tmp_path)
    streamed = {r.patient_id: sorted(x["id"] for x in r.resources) for r in source.iter_patient_records()}
    one_by_one = {pid: sorted(x["id"] for x in source.patient_resources(pid).resources) for pid in streamed}
    assert streamed == one_by_one
    assert streamed["p2"] == ["k2", "k9", "m1", "p2"]


def test_a_lone_resource_file_without_a_readable_patient_is_reported(tmp_path):
    write(tmp_path / "good.json", bundle(patient("g1")))
    (tmp_path / "lone.json").write_text(json.dumps({**patient("x"), "id": 7}))
    source = BundleDirSource(tmp_path)
    errors = [r for r in source.iter_patient_records() if r.error is not None]
    assert [r.patient_id for r in errors] == ["file:lone.json"]
    assert list(source.iter_patient_ids()) == ["g1"]

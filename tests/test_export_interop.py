"""Real export servers: refused types, numbered file names, partial exports, duplicates, lost jobs, bad keys."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from assistant.cli import main
from connectors import FhirAuthError, FhirNotFoundError, open_source
from connectors.auth import SmartBackendAuth
from connectors.base import chart_from_record
from connectors.bulk_export import JOB_FILE, bulk_export, kick_off
from connectors.bundle_dir import BundleDirSource
from connectors.ndjson_dir import NdjsonDirSource, write_ndjson_export
from connectors.rest import RestFhirSource, RestOptions
from tests.fhir_test_server import make_keypair


def rest(url: str, **options) -> RestFhirSource:
    sleeps: list[float] = []
    source = RestFhirSource(
        url,
        options=RestOptions(**{"retries": 2, "read_timeout": 5, "backoff_base": 0.01, **options}),
        sleep=sleeps.append,
    )
    source.sleeps = sleeps  # type: ignore[attr-defined]
    return source


def kick_off_types(server) -> list[list[str]]:
    return [
        (r.param("_type") or "").split(",")
        for r in server.requests
        if r.path.endswith("$export") and r.method == "GET"
    ]


def ward_ids(demo_ward_dir: Path) -> list[str]:
    return sorted(BundleDirSource(demo_ward_dir).iter_patient_ids())


def all_records(source) -> dict:
    return {r.patient_id: r for r in source.iter_patient_records() if r.error is None}


# --- types the server does not serve ---------------------------------------------------------------------


def test_export_asks_only_for_the_types_the_capability_statement_lists(
    demo_ward_dir, fhir_server_factory, tmp_path
):
    server = fhir_server_factory(demo_ward_dir, export_polls=0, unserved_types={"MedicationAdministration"})
    out = bulk_export(rest(server.base_url), tmp_path / "export")
    asked = kick_off_types(server)
    assert len(asked) == 1 and "MedicationAdministration" not in asked[0] and "MedicationRequest" in asked[0]
    source = NdjsonDirSource(out)
    gaps = source.completeness
    assert gaps.incomplete and set(gaps.missing_types) == {"MedicationAdministration"}
    assert "not served" in gaps.missing_types["MedicationAdministration"]
    records = all_records(source)
    assert sorted(records) == ward_ids(demo_ward_dir)  # every patient audited, none lost
    assert all(set(r.missing_types) == {"MedicationAdministration"} for r in records.values())
    chart = source.patient_chart(next(iter(records)))
    assert set(chart.missing_types) == {"MedicationAdministration"}
    assert any(i.code == "incomplete" and i.source == "MedicationAdministration" for i in chart.issues)


def test_export_refused_by_an_operation_outcome_is_asked_again_without_those_types(
    demo_ward_dir, fhir_server_factory, tmp_path
):
    server = fhir_server_factory(
        demo_ward_dir,
        export_polls=0,
        unserved_types={"MedicationStatement", "Location"},
        advertise_unserved=True,
    )
    out = bulk_export(rest(server.base_url), tmp_path / "export")
    first, second = kick_off_types(server)
    assert {"MedicationStatement", "Location"} <= set(first)
    assert not {"MedicationStatement", "Location"} & set(second) and "Patient" in second
    gaps = NdjsonDirSource(out).completeness
    assert set(gaps.missing_types) == {"MedicationStatement"}
    assert 'resource type "MedicationStatement" is not available' in gaps.missing_types["MedicationStatement"]
    # a shared type no rule rests on is said, not counted as a gap in the charts
    assert any(n.startswith("Location:") and "refused" in n for n in gaps.notes)


def test_rest_source_skips_unserved_types_and_marks_the_chart(demo_ward_dir, fhir_server_factory):
    server = fhir_server_factory(demo_ward_dir, everything=False, unserved_types={"MedicationAdministration"})
    source = rest(server.base_url)
    pid = ward_ids(demo_ward_dir)[0]
    chart = source.patient_chart(pid)
    assert set(chart.missing_types) == {"MedicationAdministration"}
    assert not any("MedicationAdministration" in r.path for r in server.requests)  # never asked for
    assert source.completeness.missing_types.keys() == {"MedicationAdministration"}
    assert not source.completeness.patients  # the gap is source-wide, not this patient's


def test_failed_rest_search_marks_that_patient_incomplete(demo_ward_dir, fhir_server_factory):
    server = fhir_server_factory(demo_ward_dir, everything=False)
    first, second = ward_ids(demo_ward_dir)[:2]
    server.faults.add("status", path=rf"MedicationRequest\?.*patient={first}", status=503)
    source = rest(server.base_url, retries=1)
    broken = source.patient_resources(first)
    fine = source.patient_resources(second)
    assert set(broken.missing_types) == {"MedicationRequest"} and broken.incomplete
    assert not fine.missing_types and not fine.incomplete
    assert source.completeness.patients == {first: broken.missing_types}
    assert "1 patient(s) partly loaded (missing MedicationRequest)" in source.completeness.summary()


def test_truncated_rest_page_is_fetched_again_and_the_chart_is_complete(demo_ward_dir, fhir_server_factory):
    server = fhir_server_factory(demo_ward_dir, everything=False)
    pid = ward_ids(demo_ward_dir)[0]
    server.faults.add("truncated", path=rf"MedicationRequest\?.*patient={pid}", count=1)
    record = rest(server.base_url).patient_resources(pid)
    assert not record.missing_types
    assert any(r["resourceType"] == "MedicationRequest" for r in record.resources)


def test_rest_404_names_the_url_and_hints_at_bulk_export(demo_ward_dir, fhir_server_factory):
    server = fhir_server_factory(demo_ward_dir)
    with pytest.raises(FhirNotFoundError) as err:
        rest(server.base_url).read("Patient", "nobody")
    assert f"{server.base_url}/Patient/nobody" in str(err.value) and "bulk export" in str(err.value)


# --- NDJSON by content -----------------------------------------------------------------------------------


def numbered_export(demo_ward_dir: Path, tmp_path: Path, *, gz: bool = False) -> Path:
    """The demo ward as an export whose files are named the way export tools number them."""
    plain = write_ndjson_export(
        ((r.patient_id, r.resources) for r in BundleDirSource(demo_ward_dir).iter_patient_records()),
        tmp_path / "plain",
    )
    out = tmp_path / "numbered"
    out.mkdir()
    for n, path in enumerate(sorted(plain.glob("*.ndjson")), start=1):
        rtype = path.name.split(".")[0]
        target = out / f"{n}.{rtype}.ndjson"
        if gz:
            import gzip

            with gzip.open(str(target) + ".gz", "wt", encoding="utf-8") as fh:
                fh.write(path.read_text(encoding="utf-8"))
        else:
            target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_numbered_file_names_are_read_by_content(demo_ward_dir, tmp_path, gz):
    out = numbered_export(demo_ward_dir, tmp_path, gz=gz)
    assert any(p.name.startswith("1.") for p in out.iterdir())
    source = open_source(out)
    assert isinstance(source, NdjsonDirSource)
    expected = ward_ids(demo_ward_dir)
    assert sorted(source.iter_patient_ids()) == expected
    records = all_records(source)
    assert sorted(records) == expected
    bundles = BundleDirSource(demo_ward_dir)
    for pid in expected[:3]:
        assert len(source.patient_chart(pid).orders) == len(bundles.patient_chart(pid).orders)
    assert source.wards()  # Locations found whatever the file is called


def test_nva_patients_lists_every_patient_of_a_numbered_export(demo_ward_dir, tmp_path):
    out = numbered_export(demo_ward_dir, tmp_path)
    buf = io.StringIO()
    assert main(["patients", str(out)], out=buf) == 0
    assert sorted(buf.getvalue().split()) == ward_ids(demo_ward_dir)


# --- partial exports ------------------------------------------------------------------------------------


def test_partial_export_is_incomplete_with_what_is_missing(demo_ward_dir, fhir_server_factory, tmp_path):
    server = fhir_server_factory(
        demo_ward_dir,
        export_polls=0,
        export_errors=["Processing Encounter failed: timeout"],
        export_expired={"MedicationRequest"},
    )
    out = bulk_export(rest(server.base_url), tmp_path / "export")
    assert not list(out.glob("MedicationRequest*"))  # the expired file was not written
    gaps = NdjsonDirSource(out).completeness
    assert gaps.incomplete
    assert "expired" in gaps.missing_types["MedicationRequest"]
    assert "Processing Encounter failed" in gaps.missing_types["Encounter"]
    assert any("Processing Encounter failed: timeout" in e for e in gaps.errors)
    assert any("MedicationRequest" in e and "410" in e for e in gaps.errors)
    assert gaps.summary().startswith("incomplete:")
    records = all_records(NdjsonDirSource(out))
    assert records and all(
        {"MedicationRequest", "Encounter"} <= set(r.missing_types) for r in records.values()
    )


def test_connection_reset_mid_download_is_retried(demo_ward_dir, fhir_server_factory, tmp_path):
    server = fhir_server_factory(demo_ward_dir, export_polls=0)
    server.faults.add("truncated", path=r"\$export-file/.*/Observation", count=1, mode="connection")
    out = bulk_export(rest(server.base_url), tmp_path / "export")
    assert not NdjsonDirSource(out).completeness.incomplete
    lines = sum(len(p.read_text().splitlines()) for p in out.glob("Observation*.ndjson"))
    assert lines == sum(1 for r in server.store.by_type["Observation"].values())


def test_connection_reset_beyond_the_retries_marks_the_type_missing(
    demo_ward_dir, fhir_server_factory, tmp_path
):
    server = fhir_server_factory(demo_ward_dir, export_polls=0)
    server.faults.add("truncated", path=r"\$export-file/.*/Observation", mode="connection")
    out = bulk_export(rest(server.base_url, retries=1), tmp_path / "export")  # no traceback: a typed gap
    gaps = NdjsonDirSource(out).completeness
    assert (
        set(gaps.missing_types) == {"Observation"}
        and "could not be downloaded" in gaps.missing_types["Observation"]
    )
    assert not list(out.glob("*.part"))


# --- duplicates -----------------------------------------------------------------------------------------


def test_duplicates_across_export_files_are_merged_and_counted(demo_ward_dir, fhir_server_factory, tmp_path):
    server = fhir_server_factory(
        demo_ward_dir, export_polls=0, export_duplicates={"MedicationRequest", "Patient"}
    )
    out = bulk_export(rest(server.base_url), tmp_path / "export")
    source = NdjsonDirSource(out)
    expected = ward_ids(demo_ward_dir)
    assert sorted(source.iter_patient_ids()) == expected  # each patient once
    records = all_records(source)
    bundles = BundleDirSource(demo_ward_dir)
    for pid, record in records.items():
        keys = [f"{r['resourceType']}/{r['id']}" for r in record.resources if r["resourceType"] != "Location"]
        assert len(keys) == len(set(keys)), pid
        kept = [r for r in record.resources if r["resourceType"] == "MedicationRequest"]
        assert all(
            any(e.get("url") == "urn:nva-test:duplicate" for e in r.get("extension", [])) for r in kept
        )
        orders = len(bundles.patient_chart(pid).orders)
        assert record.duplicates == orders + 1  # every order and the Patient served twice
        assert any(i.code == "duplicate-resource" for i in record.issues)
    assert source.completeness.duplicates == sum(r.duplicates for r in records.values())
    pid = expected[0]
    assert len(source.patient_chart(pid).orders) == len(bundles.patient_chart(pid).orders)


# --- resume ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["restarted (404)", "expired (410)"])
def test_resume_starts_a_new_job_when_the_server_forgot_the_old_one(
    demo_ward_dir, fhir_server_factory, tmp_path, how
):
    server = fhir_server_factory(demo_ward_dir, export_polls=3, export_retry_after=0)
    source = rest(server.base_url)
    outdir = tmp_path / "export"
    outdir.mkdir()
    old = kick_off(source)
    (outdir / JOB_FILE).write_text(json.dumps({"status_url": old}))
    (outdir / "Patient.0001.ndjson").write_text('{"resourceType":"Patient","id":"stale"}\n')
    if how.startswith("restarted"):
        server.forget_export_jobs()  # the server restarted
    else:
        server.faults.add("status", path=r"\$export-poll-status", count=1, status=410)
    bulk_export(source, outdir, max_wait=30)
    kicks = [r for r in server.requests if r.path.endswith("$export")]
    assert len(kicks) == 2  # the old job, and the new one started after its 404
    ids = list(NdjsonDirSource(outdir).iter_patient_ids())
    assert "stale" not in ids and sorted(ids) == ward_ids(demo_ward_dir)


# --- SMART keys -----------------------------------------------------------------------------------------


def smart(pem: bytes, alg: str = "RS384") -> SmartBackendAuth:
    return SmartBackendAuth(
        token_url="http://127.0.0.1:9/token", client_id="nva", private_key_pem=pem, alg=alg
    )


def test_a_file_that_is_not_a_pem_key_is_a_typed_error():
    with pytest.raises(FhirAuthError, match="not a PEM private key"):
        smart(b"hello, I am not a key\n")


def test_a_public_key_given_as_the_private_key_is_a_typed_error():
    with pytest.raises(FhirAuthError, match="public key or certificate, not the private key"):
        smart(make_keypair("RS384").public_pem.encode())


def test_an_ec_key_with_rs384_says_which_algorithm_fits():
    with pytest.raises(FhirAuthError, match="RS384 needs an RSA key.*ES384"):
        smart(make_keypair("ES384").private_pem.encode(), "RS384")
    with pytest.raises(FhirAuthError, match="ES384 needs an EC"):
        smart(make_keypair("RS384").private_pem.encode(), "ES384")


def test_key_errors_reach_the_cli_without_a_traceback(tmp_path, monkeypatch, capsys):
    key = tmp_path / "key.pem"
    key.write_text(make_keypair("RS384").public_pem)
    for name, value in {
        "NVA_FHIR_AUTH": "smart",
        "NVA_FHIR_CLIENT_ID": "nva",
        "NVA_FHIR_PRIVATE_KEY": str(key),
        "NVA_FHIR_TOKEN_URL": "http://127.0.0.1:9/token",
    }.items():
        monkeypatch.setenv(name, value)
    code = main(["patients", "http://127.0.0.1:9/fhir"], out=io.StringIO())
    err = capsys.readouterr().err
    assert code != 0 and "public key" in err and "Traceback" not in err


def test_nva_audit_audits_every_patient_of_a_numbered_export(demo_ward_dir, tmp_path):
    out = numbered_export(demo_ward_dir, tmp_path)
    buf = io.StringIO()
    main(
        [
            "audit",
            str(out),
            "--out",
            str(tmp_path / "audit.jsonl"),
            "--now",
            "2026-03-02T07:00:00+00:00",
            "--no-progress",
        ],
        out=buf,
    )
    m = re.search(r"audited (\d+) patients \((\d+) resources\)", buf.getvalue())
    assert m is not None, buf.getvalue()
    assert int(m.group(1)) == len(ward_ids(demo_ward_dir)) and int(m.group(2)) > 0


def test_an_export_file_broken_mid_way_makes_its_type_missing_for_everyone(demo_ward_dir, tmp_path):
    out = numbered_export(demo_ward_dir, tmp_path, gz=True)
    target = next(p for p in out.iterdir() if ".MedicationRequest." in p.name)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # a gzip stream that ends early
    source = NdjsonDirSource(out)
    records = all_records(source)
    assert records and all("MedicationRequest" in r.missing_types for r in records.values())
    assert "could not be read to the end" in source.completeness.missing_types["MedicationRequest"]


def test_one_patients_resources_across_many_files_are_merged(demo_ward_dir, fhir_server_factory, tmp_path):
    server = fhir_server_factory(demo_ward_dir, export_polls=0)
    server.export_max_lines = (
        max(len(items) for items in server.store.by_type.values()) // 2 + 1
    )  # ~2 per type
    out = bulk_export(rest(server.base_url), tmp_path / "export")
    biggest = max(server.store.by_type, key=lambda t: len(server.store.by_type[t]))
    assert len(list(out.glob(f"{biggest}.*.ndjson"))) == 2  # one patient's resources of that type span files
    source, bundles = NdjsonDirSource(out), BundleDirSource(demo_ward_dir)
    records = all_records(source)
    for pid in ward_ids(demo_ward_dir):
        want = bundles.patient_chart(pid)
        got = chart_from_record(records[pid], source=str(out))
        assert (len(got.orders), len(got.results), len(got.administrations)) == (
            len(want.orders),
            len(want.results),
            len(want.administrations),
        ), pid
        assert records[pid].duplicates == 0


def test_an_export_directory_left_mid_way_is_incomplete(demo_ward_dir, tmp_path):
    out = numbered_export(demo_ward_dir, tmp_path)
    (out / JOB_FILE).write_text(json.dumps({"status_url": "http://127.0.0.1:9/fhir/$export-poll-status/x"}))
    gaps = NdjsonDirSource(out).completeness
    assert gaps.incomplete and "did not finish" in gaps.errors[0]
    assert all(r.missing_types for r in all_records(NdjsonDirSource(out)).values())


def test_source_completeness_keeps_source_wide_and_per_patient_gaps_apart():
    from connectors.base import PatientRecord, SourceCompleteness

    gaps = SourceCompleteness(missing_types={"MedicationAdministration": "not served"})
    assert gaps.incomplete and not SourceCompleteness().incomplete and SourceCompleteness().summary() == ""
    record = gaps.apply(PatientRecord("p1", missing_types={"Observation": "search failed"}))
    assert record.missing_types == {"Observation": "search failed", "MedicationAdministration": "not served"}
    gaps.note_record(record)
    gaps.note_record(gaps.apply(PatientRecord("p2")))
    assert gaps.patients == {"p1": {"Observation": "search failed"}}  # p2 has only the source-wide gap
    summary = gaps.summary()
    assert "MedicationAdministration (not served)" in summary and "1 patient(s) partly loaded" in summary
    assert json.loads(json.dumps(gaps.to_dict()))["patients"] == {"p1": {"Observation": "search failed"}}

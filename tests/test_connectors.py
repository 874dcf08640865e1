"""FHIR sources: bundle dir, NDJSON and REST give the same charts; paging, retries, auth and faults behave."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from assistant.normalize import build_chart
from connectors import (
    FhirAuthError,
    FhirFatalError,
    FhirNotFoundError,
    FhirResponseError,
    FhirTemporaryError,
    open_source,
)
from connectors.auth import BearerAuth, SmartBackendAuth
from connectors.bundle_dir import BundleDirSource
from connectors.ndjson_dir import NdjsonDirSource, write_ndjson_export
from connectors.rest import RestFhirSource, RestOptions
from tests.fhir_test_server import make_keypair


def comparable(chart) -> dict:
    data = chart.to_dict()
    data.pop("source")
    data.pop("resource_count")
    data["issues"] = sorted((i["source"], i["code"]) for i in data["issues"])
    for key in ("results", "orders", "administrations", "notes", "allergies", "conditions", "encounters"):
        data[key] = sorted(data[key], key=lambda x: json.dumps(x, sort_keys=True))
    return data


def fast_rest(url: str, **kw) -> RestFhirSource:
    sleeps: list[float] = []
    options = RestOptions(**{"retries": 3, "read_timeout": 5, "backoff_base": 0.01, **kw.pop("options", {})})
    source = RestFhirSource(url, options=options, sleep=sleeps.append, **kw)
    source.sleeps = sleeps  # type: ignore[attr-defined]
    return source


# --- identical charts across sources ---------------------------------------------------------------------


def test_every_synthea_patient_identical_over_bundles_and_rest(synthea_dir, fhir_server_factory):
    bundles = BundleDirSource(synthea_dir)
    ids = list(bundles.iter_patient_ids())
    assert len(ids) == 74
    server = fhir_server_factory(synthea_dir, everything=True)
    rest = fast_rest(server.base_url, options={"concurrency": 8})
    for pid in ids:
        a = bundles.patient_chart(pid)
        b = rest.patient_chart(pid)
        assert comparable(a) == comparable(b), pid
        assert a.results, pid  # every Synthea patient has observations


def test_synthea_over_rest_searches_without_everything(synthea_dir, fhir_server_factory):
    bundles = BundleDirSource(synthea_dir)
    server = fhir_server_factory(synthea_dir, everything=False)
    rest = fast_rest(server.base_url, options={"page_size": 20})
    for pid in list(bundles.iter_patient_ids())[:6]:
        assert comparable(bundles.patient_chart(pid)) == comparable(rest.patient_chart(pid)), pid
    assert not any("$everything" in r.path for r in server.requests)


def test_demo_ward_identical_over_bundles_rest_and_ndjson(demo_ward_dir, fhir_server_factory, tmp_path):
    bundles = BundleDirSource(demo_ward_dir)
    ids = list(bundles.iter_patient_ids())
    assert len(ids) >= 20
    export = write_ndjson_export(
        ((r.patient_id, r.resources) for r in bundles.iter_patient_records()), tmp_path / "export", gz=True
    )
    ndjson = NdjsonDirSource(export)
    assert sorted(ndjson.iter_patient_ids()) == sorted(ids)
    server = fhir_server_factory(demo_ward_dir)
    rest = fast_rest(server.base_url)
    for pid in ids:
        a = comparable(bundles.patient_chart(pid))
        assert a == comparable(rest.patient_chart(pid)), pid
        assert a == comparable(ndjson.patient_chart(pid)), pid
    by_partition = {
        r.patient_id: comparable(build_chart(r.resources, source="x", patient_id=r.patient_id))
        for r in ndjson.iter_patient_records()
    }
    assert set(by_partition) == set(ids)
    assert by_partition[ids[0]] == comparable(bundles.patient_chart(ids[0]))


def test_demo_ward_census_and_wards_agree_across_sources(demo_ward_dir, fhir_server_factory):
    bundles = BundleDirSource(demo_ward_dir)
    rest = fast_rest(fhir_server_factory(demo_ward_dir).base_url)
    assert [w.ref for w in bundles.wards()] == [w.ref for w in rest.wards()]
    assert "Location/ward-4b" in [w.ref for w in bundles.wards()]
    local = sorted(e.patient_id for e in bundles.ward_census("Location/ward-4b"))
    remote = sorted(e.patient_id for e in rest.ward_census("Location/ward-4b"))
    assert local == remote and len(local) >= 18
    chart = bundles.patient_chart(local[0])
    assert chart.encounter is not None and chart.encounter.ward_ref == "Location/ward-4b"
    assert chart.encounter.bed_ref and chart.encounter.bed_ref.startswith("Location/")


# --- paging, concurrency ---------------------------------------------------------------------------------


def test_paging_follows_next_links_to_the_end(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    pid = max(server.patient_ids(), key=lambda p: server.compartment_count(p, "Observation"))
    expected = server.compartment_count(pid, "Observation")
    rest = fast_rest(server.base_url, options={"page_size": 25})
    got = rest.search("Observation", {"patient": pid})
    assert len(got) == expected and len({r["id"] for r in got}) == expected
    pages = [
        r
        for r in server.requests
        if r.path.endswith("/fhir") or "_getpages" in r.query or r.path.endswith("/Observation")
    ]
    assert len(pages) == -(-expected // 25)


def test_one_patient_searches_run_concurrently(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir, everything=False, latency_ms=40)
    rest = fast_rest(server.base_url, options={"concurrency": 6})
    rest.patient_chart(server.patient_ids()[0])
    assert 2 <= server.max_concurrency <= 6


# --- retries and faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(synthea_dir, fhir_server_factory, status):
    server = fhir_server_factory(synthea_dir)
    pid = server.patient_ids()[0]
    server.faults.add("status", path=rf"/Patient/{pid}$", count=2, status=status)
    rest = fast_rest(server.base_url)
    assert rest.read("Patient", pid)["id"] == pid
    assert len([r for r in server.requests if r.path.endswith(f"/Patient/{pid}")]) == 3
    assert len(rest.sleeps) == 2


def test_retry_after_is_honoured(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    pid = server.patient_ids()[0]
    server.faults.add("status", path=rf"/Patient/{pid}$", count=1, status=429, retry_after=7)
    rest = fast_rest(server.base_url)
    rest.read("Patient", pid)
    assert rest.sleeps == [7.0]


def test_retries_give_up_with_a_temporary_error(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    pid = server.patient_ids()[0]
    server.faults.add("status", path=rf"/Patient/{pid}$", status=503)
    rest = fast_rest(server.base_url, options={"retries": 2})
    with pytest.raises(FhirTemporaryError, match="503") as err:
        rest.read("Patient", pid)
    assert err.value.retryable
    assert len(rest.sleeps) == 2
    # backoff grows exponentially (full jitter keeps each delay under its cap)
    assert all(0 <= s <= 0.01 * 2**n for n, s in enumerate(rest.sleeps))


def test_timeout_is_a_temporary_error(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    pid = server.patient_ids()[0]
    server.faults.add("timeout", path=rf"/Patient/{pid}$", seconds=3)
    rest = fast_rest(server.base_url, options={"read_timeout": 0.3, "retries": 1})
    with pytest.raises(FhirTemporaryError, match="timeout"):
        rest.read("Patient", pid)


def test_timeout_then_success(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    pid = server.patient_ids()[0]
    server.faults.add("timeout", path=rf"/Patient/{pid}$", count=1, seconds=2)
    rest = fast_rest(server.base_url, options={"read_timeout": 0.3})
    assert rest.read("Patient", pid)["id"] == pid


@pytest.mark.parametrize("mode", ["body", "connection"])
def test_truncated_body_is_retried_like_a_transient_fault(synthea_dir, fhir_server_factory, mode):
    server = fhir_server_factory(synthea_dir)
    pid = server.patient_ids()[0]
    server.faults.add("truncated", path=rf"/Patient/{pid}$", count=2, mode=mode)
    source = fast_rest(server.base_url)
    assert source.read("Patient", pid)["id"] == pid
    assert len(source.sleeps) == 2  # two truncated answers, each waited for and fetched again


def test_truncated_json_beyond_the_retries_is_a_clear_temporary_error(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    pid = server.patient_ids()[0]
    server.faults.add("truncated", path=rf"/Patient/{pid}$")
    with pytest.raises(FhirTemporaryError, match="truncated or invalid JSON") as err:
        fast_rest(server.base_url).read("Patient", pid)
    assert f"/Patient/{pid}" in str(err.value)


def test_html_page_is_not_fhir(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    server.faults.add("html", path=r"/metadata")
    with pytest.raises(FhirResponseError, match="instead of FHIR JSON"):
        fast_rest(server.base_url).capabilities()


@pytest.mark.parametrize("status", [400, 403, 422])
def test_operation_outcome_becomes_typed_fatal_error(synthea_dir, fhir_server_factory, status):
    server = fhir_server_factory(synthea_dir)
    server.faults.add(
        "outcome", path=r"/Observation", status=status, diagnostics="unsupported search parameter"
    )
    rest = fast_rest(server.base_url)
    with pytest.raises(FhirFatalError, match="unsupported search parameter") as err:
        rest.search("Observation", {"patient": server.patient_ids()[0]})
    assert not err.value.retryable
    assert len(rest.sleeps) == 0
    if status == 403:
        assert isinstance(err.value, FhirAuthError)


def test_operation_outcome_instead_of_bundle(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    server.faults.add("outcome", path=r"/Condition", status=200, diagnostics="too costly")
    with pytest.raises(FhirFatalError, match="OperationOutcome instead of a Bundle.*too costly"):
        fast_rest(server.base_url).search("Condition", {"patient": server.patient_ids()[0]})


def test_missing_patient_is_not_found(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir)
    with pytest.raises(FhirNotFoundError):
        fast_rest(server.base_url).patient_chart("no-such-patient")


def test_failed_search_is_reported_and_the_rest_of_the_chart_loads(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir, everything=False)
    pid = server.patient_ids()[0]
    server.faults.add("status", path=r"category=laboratory", status=500)
    chart = fast_rest(server.base_url, options={"retries": 1}).patient_chart(pid)
    failed = [i for i in chart.issues if i.code == "fetch-failed"]
    assert len(failed) == 1 and "laboratory observations could not be loaded" in failed[0].message
    assert failed[0].severity == "error"
    assert chart.results and all(r.category != "laboratory" for r in chart.results)
    assert chart.encounters


def test_connection_refused_is_temporary():
    rest = fast_rest("http://127.0.0.1:9/fhir", options={"retries": 1, "connect_timeout": 0.5})
    with pytest.raises(FhirTemporaryError, match="cannot connect"):
        rest.capabilities()


# --- auth ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_services_token_flow_and_reauth(synthea_dir, fhir_server_factory, alg):
    keys = make_keypair(alg)
    server = fhir_server_factory(synthea_dir, auth="smart", clients={"nva": keys.public_pem})
    probe = fast_rest(server.base_url)
    with pytest.raises(FhirAuthError):
        probe.read("Patient", server.patient_ids()[0])
    auth = SmartBackendAuth(
        token_url=probe.discover_token_url(),
        client_id="nva",
        private_key_pem=keys.private_pem.encode(),
        alg=alg,
    )
    rest = fast_rest(server.base_url, auth=auth)
    pid = server.patient_ids()[0]
    assert rest.read("Patient", pid)["id"] == pid
    rest.read("Patient", pid)
    assert auth.token_requests == 1  # cached until it expires
    server.revoke_tokens()
    assert rest.read("Patient", pid)["id"] == pid  # one 401, one re-authentication, success
    assert auth.token_requests == 2


def test_smart_wrong_key_is_refused(synthea_dir, fhir_server_factory):
    good, bad = make_keypair("RS384"), make_keypair("RS384")
    server = fhir_server_factory(synthea_dir, auth="smart", clients={"nva": good.public_pem})
    auth = SmartBackendAuth(
        token_url=server.token_url, client_id="nva", private_key_pem=bad.private_pem.encode()
    )
    with pytest.raises(FhirAuthError, match="token request refused"):
        fast_rest(server.base_url, auth=auth).read("Patient", server.patient_ids()[0])


def test_static_bearer_token(synthea_dir, fhir_server_factory):
    server = fhir_server_factory(synthea_dir, auth="bearer:s3cret")
    pid = server.patient_ids()[0]
    assert fast_rest(server.base_url, auth=BearerAuth("s3cret")).read("Patient", pid)["id"] == pid
    with pytest.raises(FhirAuthError, match="refused access"):
        fast_rest(server.base_url, auth=BearerAuth("wrong")).read("Patient", pid)


def test_smart_settings_from_environment(synthea_dir, fhir_server_factory, tmp_path):
    keys = make_keypair("ES384")
    server = fhir_server_factory(synthea_dir, auth="smart", clients={"nva-env": keys.public_pem})
    key_file = tmp_path / "key.pem"
    key_file.write_text(keys.private_pem)
    settings = {
        "NVA_FHIR_AUTH": "smart",
        "NVA_FHIR_CLIENT_ID": "nva-env",
        "NVA_FHIR_PRIVATE_KEY": str(key_file),
        "NVA_FHIR_JWT_ALG": "ES384",
        "NVA_FHIR_RETRIES": "1",
    }
    rest = RestFhirSource.from_settings(server.base_url, settings)
    assert rest.options.verify is True
    pid = server.patient_ids()[0]
    assert rest.patient_chart(pid).patient.ref == f"Patient/{pid}"


# --- files -----------------------------------------------------------------------------------------------


def test_unreadable_bundle_file_is_skipped_and_named(synthea_dir, tmp_path):
    src_files = sorted(synthea_dir.glob("*.json.gz"))[:3]
    for f in src_files:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    (tmp_path / "garbage.json.gz").write_bytes(b"not gzip at all")
    source = BundleDirSource(tmp_path)
    assert len(list(source.iter_patient_ids())) == 3
    assert sorted(Path(e.path).name for e in source.file_errors) == ["broken.json", "garbage.json.gz"]
    assert any("not valid JSON" in e.reason for e in source.file_errors)
    records = list(source.iter_patient_records())
    assert sum(r.error is None for r in records) == 3
    assert sum(r.error is not None for r in records) == 2


def test_open_source_explains_a_missing_path(tmp_path):
    with pytest.raises(FhirFatalError, match="no such file or directory"):
        open_source(tmp_path / "nope")


def test_ndjson_bad_line_is_reported(tmp_path, synthea_dir):
    bundles = BundleDirSource(synthea_dir)
    pid = next(iter(bundles.iter_patient_ids()))
    record = bundles.patient_resources(pid)
    export = write_ndjson_export([(pid, record.resources)], tmp_path / "exp")
    with (export / "Observation.ndjson").open("a") as fh:
        fh.write('{"resourceType": "Observation", "subject": {"reference": "Patient/' + pid + '"}, "id": \n')
    chart = NdjsonDirSource(export).patient_chart(pid)
    assert any(i.code == "invalid-json" for i in chart.issues)
    assert len(chart.results) == len(bundles.patient_chart(pid).results)


def test_bundle_reader_resolves_urn_uuid_references(synthea_dir):
    path = sorted(synthea_dir.glob("*.json.gz"))[0]
    raw = json.loads(gzip.decompress(path.read_bytes()))
    assert any(
        str(e["resource"].get("subject", {}).get("reference", "")).startswith("urn:uuid:")
        for e in raw["entry"]
    )
    chart = BundleDirSource(path).patient_chart(raw["entry"][0]["resource"]["id"])
    assert chart.results and chart.encounters
    assert all(r.ref.startswith("Observation/") for r in chart.results)

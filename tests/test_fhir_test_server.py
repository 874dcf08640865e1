"""Tests for the in-process FHIR R4 test server used by connector tests and benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests

from tests.fhir_test_server import (
    SYNTHEA_DIR,
    FhirTestServer,
    make_client_assertion,
    make_keypair,
    start_server,
)

MINI_DIR = Path(__file__).parent / "data" / "fhir_server"
ROOT = Path(__file__).resolve().parent.parent
HTTP_TIMEOUT = 10

needs_synthea = pytest.mark.skipif(
    not SYNTHEA_DIR.is_dir(), reason=f"Synthea data not found at {SYNTHEA_DIR}"
)


@pytest.fixture(scope="module")
def synthea():
    if not SYNTHEA_DIR.is_dir():
        pytest.skip(f"Synthea data not found at {SYNTHEA_DIR}")
    server = start_server(SYNTHEA_DIR, export_polls=2, export_retry_after=0)
    yield server
    server.stop()


@pytest.fixture
def fhir(synthea):
    synthea.reset()
    return synthea


@pytest.fixture
def mini():
    with FhirTestServer(MINI_DIR) as server:
        yield server


@pytest.fixture(scope="module")
def busiest(synthea):
    """Patient id with the most Observations (so paging spans many pages)."""
    comps = synthea.store.compartments
    return max(comps, key=lambda pid: len(comps[pid].get("Observation", [])))


def get(server, path, **kwargs):
    kwargs.setdefault("timeout", HTTP_TIMEOUT)
    return requests.get(server.base_url + path, **kwargs)


def collect(server, first_url, params=None, session=None, max_pages=500):
    """Follow next links to the end; returns (entries, pages)."""
    http = session or requests
    resp = http.get(first_url, params=params, timeout=HTTP_TIMEOUT)
    resp.raise_for_status()
    entries, pages = [], 0
    for _ in range(max_pages):
        bundle = resp.json()
        pages += 1
        entries.extend(bundle.get("entry", []))
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            return entries, pages
        resp = http.get(nxt[0], timeout=HTTP_TIMEOUT)
        resp.raise_for_status()
    raise AssertionError("paging did not terminate")


def ids(resp_or_entries):
    entries = resp_or_entries.json().get("entry", []) if hasattr(resp_or_entries, "json") else resp_or_entries
    return sorted(e["resource"]["id"] for e in entries)


def instant(text):
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# ------------------------------------------------------------------------------------------ loading / read


def test_loads_synthea_with_relative_references(fhir, busiest):
    assert fhir.store.count() > 28_000
    assert len(fhir.patient_ids()) == 74
    text = json.dumps(fhir.store.compartment(busiest))
    assert "urn:uuid:" not in text
    obs = fhir.store.compartments[busiest]["Observation"][0]
    assert obs["subject"]["reference"] == f"Patient/{busiest}"
    assert obs["encounter"]["reference"].startswith("Encounter/")
    assert fhir.store.get("Encounter", obs["encounter"]["reference"].split("/")[1]) is not None


def test_read_and_not_found(fhir, busiest):
    resp = get(fhir, f"/Patient/{busiest}")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    assert resp.json()["id"] == busiest
    missing = get(fhir, "/Observation/does-not-exist")
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
    assert get(fhir, "/NotAType/1").status_code == 404


def test_metadata_advertises_operations(fhir):
    cap = get(fhir, "/metadata").json()
    assert cap["fhirVersion"] == "4.0.1"
    types = {r["type"]: r for r in cap["rest"][0]["resource"]}
    assert {"Patient", "Observation", "MedicationAdministration", "Location"} <= set(types)
    assert {"name": "date", "type": "date"} in types["Observation"]["searchParam"]
    assert [op["name"] for op in types["Patient"]["operation"]] == ["everything", "export"]
    assert cap["rest"][0]["operation"][0]["name"] == "export"


def test_no_everything_flag():
    with FhirTestServer(MINI_DIR, everything=False) as server:
        cap = get(server, "/metadata").json()
        patient = next(r for r in cap["rest"][0]["resource"] if r["type"] == "Patient")
        assert "operation" not in patient and "operation" not in cap["rest"][0]
        assert get(server, "/Patient/test-inpatient-1/$everything").status_code == 400
        assert get(server, "/$export", headers={"Prefer": "respond-async"}).status_code == 400


# ------------------------------------------------------------------------------------------ search


def test_search_patient_and_subject_forms(fhir, busiest):
    expected = ids([{"resource": r} for r in fhir.store.compartments[busiest]["Condition"]])
    for params in (
        {"patient": busiest},
        {"patient": f"Patient/{busiest}"},
        {"subject": f"Patient/{busiest}"},
        {"subject": busiest},
    ):
        entries, _ = collect(fhir, fhir.base_url + "/Condition", params)
        assert ids(entries) == expected, params
    assert get(fhir, "/Condition", params={"patient": "nobody"}).json()["total"] == 0


def test_search_id_category_code_status(fhir, busiest):
    observations = fhir.store.compartments[busiest]["Observation"]
    two = [observations[0]["id"], observations[1]["id"]]
    assert ids(get(fhir, "/Observation", params={"_id": ",".join(two)})) == sorted(two)

    def cats(o):
        return {c["code"] for cc in o.get("category", []) for c in cc.get("coding", [])}

    vitals = [o for o in observations if "vital-signs" in cats(o)]
    labs_or_vitals = [o for o in observations if cats(o) & {"vital-signs", "laboratory"}]
    system = "http://terminology.hl7.org/CodeSystem/observation-category"
    for value, expected in (
        ("vital-signs", vitals),
        (f"{system}|vital-signs", vitals),
        ("http://wrong.example|vital-signs", []),
        ("vital-signs,laboratory", labs_or_vitals),
    ):
        resp = get(fhir, "/Observation", params={"patient": busiest, "category": value, "_count": 500})
        assert resp.json()["total"] == len(expected), value
    assert vitals and len(labs_or_vitals) > len(vitals)

    heart = [o for o in observations if o["code"]["coding"][0]["code"] == "8867-4"]
    weight_or_heart = [o for o in observations if o["code"]["coding"][0]["code"] in ("8867-4", "29463-7")]
    assert heart
    assert get(fhir, "/Observation", params={"patient": busiest, "code": "http://loinc.org|8867-4"}).json()[
        "total"
    ] == len(heart)
    assert get(fhir, "/Observation", params={"patient": busiest, "code": "8867-4,29463-7"}).json()[
        "total"
    ] == len(weight_or_heart)

    meds = fhir.store.compartments[busiest]["MedicationRequest"]
    active = [m for m in meds if m["status"] == "active"]
    both = [m for m in meds if m["status"] in ("active", "stopped")]
    assert get(fhir, "/MedicationRequest", params={"patient": busiest, "status": "active"}).json()[
        "total"
    ] == len(active)
    assert get(fhir, "/MedicationRequest", params={"patient": busiest, "status": "active,stopped"}).json()[
        "total"
    ] == len(both)

    conditions = list(fhir.store.by_type["Condition"].values())
    resolved = [c for c in conditions if c["clinicalStatus"]["coding"][0]["code"] == "resolved"]
    resp = get(fhir, "/Condition", params={"clinical-status": "resolved", "_count": 0})
    assert resp.json()["total"] == len(resolved) and 0 < len(resolved) < len(conditions)


@pytest.mark.parametrize(
    ("prefix", "predicate"),
    [
        ("ge", lambda t: t >= instant("2015-01-01T00:00:00Z")),
        ("gt", lambda t: t >= instant("2015-01-02T00:00:00Z")),
        ("lt", lambda t: t < instant("2015-01-01T00:00:00Z")),
        ("le", lambda t: t < instant("2015-01-02T00:00:00Z")),
    ],
)
def test_search_date_prefixes(fhir, busiest, prefix, predicate):
    observations = fhir.store.compartments[busiest]["Observation"]
    expected = [o for o in observations if predicate(instant(o["effectiveDateTime"]))]
    resp = get(
        fhir, "/Observation", params={"patient": busiest, "date": f"{prefix}2015-01-01", "_count": 500}
    )
    assert resp.json()["total"] == len(expected)
    assert 0 < len(expected) < len(observations)


def test_search_date_eq_and_range(fhir, busiest):
    observations = fhir.store.compartments[busiest]["Observation"]
    day = instant(observations[0]["effectiveDateTime"]).astimezone(UTC).date()
    expected = [o for o in observations if instant(o["effectiveDateTime"]).astimezone(UTC).date() == day]
    resp = get(
        fhir, "/Observation", params={"patient": busiest, "date": f"eq{day.isoformat()}", "_count": 500}
    )
    assert resp.json()["total"] == len(expected) > 0
    ranged = get(
        fhir, "/Observation", params=[("patient", busiest), ("date", "ge2010"), ("date", "lt2012-06")]
    )
    lo, hi = instant("2010-01-01T00:00:00Z"), instant("2012-06-01T00:00:00Z")
    assert ranged.json()["total"] == sum(
        1 for o in observations if lo <= instant(o["effectiveDateTime"]) < hi
    )


def test_search_authoredon_and_encounter_date(fhir, busiest):
    meds = fhir.store.compartments[busiest]["MedicationRequest"]
    expected = [m for m in meds if instant(m["authoredOn"]) >= instant("2016-01-01T00:00:00Z")]
    for name in ("authoredon", "date"):
        resp = get(
            fhir, "/MedicationRequest", params={"patient": busiest, name: "ge2016-01-01", "_count": 500}
        )
        assert resp.json()["total"] == len(expected)
    encounters = fhir.store.compartments[busiest]["Encounter"]
    expected_enc = [e for e in encounters if instant(e["period"]["start"]) < instant("2012-01-01T00:00:00Z")]
    resp = get(fhir, "/Encounter", params={"patient": busiest, "date": "lt2012-01-01", "_count": 500})
    assert resp.json()["total"] == len(expected_enc)


def test_search_inpatient_params(mini):
    assert ids(get(mini, "/Encounter", params={"location": "Location/ward-3b"})) == ["enc-inpatient-1"]
    assert ids(get(mini, "/Encounter", params={"location": "icu-1"})) == ["enc-inpatient-0"]
    assert ids(get(mini, "/Encounter", params={"patient": "test-inpatient-1", "status": "in-progress"})) == [
        "enc-inpatient-1"
    ]
    assert ids(get(mini, "/MedicationAdministration", params={"date": "ge2024-05-02"})) == ["ma-2"]
    assert ids(get(mini, "/MedicationAdministration", params={"date": "lt2024-05-02"})) == ["ma-1"]
    assert ids(get(mini, "/MedicationAdministration", params={"code": "1191"})) == ["ma-1"]
    assert ids(get(mini, "/DocumentReference", params={"patient": "test-inpatient-1", "date": "ge2024"})) == [
        "doc-1"
    ]
    assert ids(get(mini, "/DocumentReference", params={"status": "current,superseded"})) == ["doc-0", "doc-1"]
    # collection bundle urn:uuid references were rewritten to Type/id
    enc = get(mini, "/Encounter/enc-inpatient-1").json()
    assert enc["location"][0]["location"]["reference"] == "Location/ward-3b"
    assert enc["subject"]["reference"] == "Patient/test-inpatient-1"


def test_unknown_params_ignored_and_recorded(mini):
    resp = get(mini, "/Encounter", params={"patient": "test-inpatient-1", "bogus-param": "x"})
    assert resp.status_code == 200 and resp.json()["total"] == 2
    assert mini.requests[-1].ignored_params == ["bogus-param"]
    assert mini.ignored_params["Encounter:bogus-param"] == 1


def test_resources_argument_and_sort():
    resources = [
        {"resourceType": "Patient", "id": "p1"},
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "subject": {"reference": "Patient/p1"},
            "code": {"text": "x"},
            "effectiveDateTime": "2020-01-02",
        },
        {
            "resourceType": "Observation",
            "id": "o2",
            "status": "final",
            "subject": {"reference": "Patient/p1"},
            "code": {"text": "x"},
            "effectiveDateTime": "2021-01-02",
        },
    ]
    with FhirTestServer(resources=resources) as server:
        resp = get(server, "/Observation", params={"patient": "p1", "_sort": "-date"})
        assert [e["resource"]["id"] for e in resp.json()["entry"]] == ["o2", "o1"]
        assert server.compartment_count("p1") == 3


# ------------------------------------------------------------------------------------------ paging


def test_paging_reaches_exact_compartment_count(fhir, busiest):
    expected = ids([{"resource": r} for r in fhir.store.compartments[busiest]["Observation"]])
    assert len(expected) > 100
    with requests.Session() as session:
        entries, pages = collect(
            fhir, fhir.base_url + "/Observation", {"patient": busiest, "_count": 37}, session
        )
    assert ids(entries) == expected and len(entries) == len(expected)
    assert pages == -(-len(expected) // 37)
    assert all(e["search"]["mode"] == "match" for e in entries)
    assert all(e["fullUrl"] == f"{fhir.base_url}/Observation/{e['resource']['id']}" for e in entries)
    page_requests = [r for r in fhir.requests if "_getpages" in r.query]
    assert len(page_requests) == pages - 1


def test_paging_links_use_client_host_and_default_count(fhir):
    resp = get(fhir, "/Patient", headers={"Host": f"fhir.example.test:{fhir.port}"})
    bundle = resp.json()
    assert bundle["total"] == 74 and len(bundle["entry"]) == 50
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["self"] == f"http://fhir.example.test:{fhir.port}/fhir/Patient"
    assert links["next"].startswith(f"http://fhir.example.test:{fhir.port}/fhir?_getpages=")
    entries, pages = collect(fhir, fhir.base_url + "/Patient")
    assert len(entries) == 74 and pages == 2
    capped = get(fhir, "/Observation", params={"_count": 10_000})
    assert len(capped.json()["entry"]) == 500


def test_expired_paging_token_is_410(fhir):
    bundle = get(fhir, "/Patient", params={"_count": 5}).json()
    nxt = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    fhir.expire_searches()
    resp = requests.get(nxt, timeout=HTTP_TIMEOUT)
    assert resp.status_code == 410 and resp.json()["resourceType"] == "OperationOutcome"


def test_everything_is_paged_compartment(fhir, busiest):
    expected = fhir.compartment_count(busiest)
    entries, pages = collect(fhir, f"{fhir.base_url}/Patient/{busiest}/$everything", {"_count": 200})
    assert len(entries) == expected and pages == -(-expected // 200)
    assert entries[0]["resource"]["resourceType"] == "Patient"
    assert len({(e["resource"]["resourceType"], e["resource"]["id"]) for e in entries}) == expected
    assert get(fhir, "/Patient/nobody/$everything").status_code == 404


# ------------------------------------------------------------------------------------------ bulk data


def test_bulk_export_flow(fhir):
    assert get(fhir, "/$export").status_code == 400  # Prefer: respond-async is mandatory
    kick = get(
        fhir,
        "/Patient/$export",
        params={"_type": "Patient,Condition"},
        headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
    )
    assert kick.status_code == 202
    status_url = kick.headers["Content-Location"]
    assert status_url.startswith(fhir.base_url)
    for _ in range(2):
        poll = requests.get(status_url, timeout=HTTP_TIMEOUT)
        assert poll.status_code == 202
        assert "X-Progress" in poll.headers and poll.headers["Retry-After"] == "0"
    done = requests.get(status_url, timeout=HTTP_TIMEOUT)
    assert done.status_code == 200
    manifest = done.json()
    assert manifest["requiresAccessToken"] is False
    assert unquote(manifest["request"]).endswith("/Patient/$export?_type=Patient,Condition")
    assert datetime.fromisoformat(manifest["transactionTime"].replace("Z", "+00:00"))
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Condition"}
    for item in manifest["output"]:
        resp = requests.get(item["url"], timeout=HTTP_TIMEOUT)
        assert resp.headers["Content-Type"] == "application/fhir+ndjson"
        lines = resp.text.splitlines()
        assert len(lines) == len(fhir.store.by_type[item["type"]]) == item["count"]
        assert all(json.loads(line)["resourceType"] == item["type"] for line in lines)


def test_bulk_export_system_level_split_and_cancel():
    with FhirTestServer(MINI_DIR, export_polls=0, export_max_lines=1) as server:
        kick = get(server, "/$export", headers={"Prefer": "respond-async"})
        status_url = kick.headers["Content-Location"]
        manifest = requests.get(status_url, timeout=HTTP_TIMEOUT).json()
        types = [o["type"] for o in manifest["output"]]
        assert types.count("Location") == 2 and types.count("DocumentReference") == 2
        assert (
            sum(
                len(requests.get(o["url"], timeout=HTTP_TIMEOUT).text.splitlines())
                for o in manifest["output"]
            )
            == 9
        )
        assert requests.delete(status_url, timeout=HTTP_TIMEOUT).status_code == 202
        assert requests.get(status_url, timeout=HTTP_TIMEOUT).status_code == 404
        patient_level = get(server, "/Patient/$export", headers={"Prefer": "respond-async"})
        manifest = requests.get(patient_level.headers["Content-Location"], timeout=HTTP_TIMEOUT).json()
        assert "Location" not in {o["type"] for o in manifest["output"]}


# ------------------------------------------------------------------------------ real export server behaviours


def kick_off(server, types):
    return get(
        server,
        "/$export",
        params={"_type": ",".join(types)},
        headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
    )


def finished_manifest(server, types=None):
    kick = kick_off(server, types) if types else get(server, "/$export", headers={"Prefer": "respond-async"})
    assert kick.status_code == 202, kick.text
    status_url = kick.headers["Content-Location"]
    for _ in range(10):
        resp = requests.get(status_url, timeout=HTTP_TIMEOUT)
        if resp.status_code == 200:
            return status_url, resp.json()
    raise AssertionError("export did not finish")


def test_unserved_type_is_refused_with_an_operation_outcome_naming_it():
    with FhirTestServer(MINI_DIR, export_polls=0, unserved_types={"MedicationAdministration"}) as server:
        cap = get(server, "/metadata").json()
        listed = {r["type"] for r in cap["rest"][0]["resource"]}
        assert "MedicationAdministration" not in listed and "Encounter" in listed
        refused = kick_off(server, ["Patient", "MedicationAdministration", "Encounter"])
        assert refused.status_code == 400
        body = refused.json()
        assert body["resourceType"] == "OperationOutcome"
        assert 'resource type "MedicationAdministration" is not available' in body["issue"][0]["diagnostics"]
        assert len(body["issue"]) == 1  # only the refused type is named
        assert get(server, "/MedicationAdministration").status_code == 404
        # without the refused type the export runs, and an export of everything leaves it out
        assert kick_off(server, ["Patient", "Encounter"]).status_code == 202
        _, manifest = finished_manifest(server)
        assert "MedicationAdministration" not in {o["type"] for o in manifest["output"]}


def test_advertise_unserved_lists_the_type_but_still_refuses_it():
    with FhirTestServer(MINI_DIR, unserved_types={"Location"}, advertise_unserved=True) as server:
        listed = {r["type"] for r in get(server, "/metadata").json()["rest"][0]["resource"]}
        assert "Location" in listed
        assert kick_off(server, ["Location"]).status_code == 400


def test_numbered_export_file_names():
    with FhirTestServer(MINI_DIR, export_polls=0, export_file_names="numbered") as server:
        _, manifest = finished_manifest(server)
        names = [o["url"].rsplit("/", 1)[1] for o in manifest["output"]]
        assert names[0].startswith("1.") and all(n.split(".")[0].isdigit() for n in names)
        for item, name in zip(manifest["output"], names, strict=True):
            assert name.split(".")[1] == item["type"]
            lines = requests.get(item["url"], timeout=HTTP_TIMEOUT).text.splitlines()
            assert {json.loads(line)["resourceType"] for line in lines} == {item["type"]}


def test_manifest_errors_and_expired_files():
    with FhirTestServer(
        MINI_DIR,
        export_polls=0,
        export_errors=["Encounter export failed: disk full"],
        export_expired={"Location"},
    ) as server:
        _, manifest = finished_manifest(server)
        assert len(manifest["error"]) == 1 and manifest["error"][0]["type"] == "OperationOutcome"
        error_lines = requests.get(manifest["error"][0]["url"], timeout=HTTP_TIMEOUT).text.splitlines()
        assert json.loads(error_lines[0])["issue"][0]["diagnostics"] == "Encounter export failed: disk full"
        by_type = {o["type"]: o["url"] for o in manifest["output"]}
        gone = requests.get(by_type["Location"], timeout=HTTP_TIMEOUT)
        assert gone.status_code == 410 and gone.json()["issue"][0]["code"] == "expired"
        assert requests.get(by_type["Patient"], timeout=HTTP_TIMEOUT).status_code == 200


def test_duplicates_are_served_again_with_a_newer_last_updated():
    with FhirTestServer(MINI_DIR, export_polls=0, export_duplicates={"Encounter"}) as server:
        _, manifest = finished_manifest(server)
        files = [o for o in manifest["output"] if o["type"] == "Encounter"]
        assert len(files) == 2
        first, second = (
            [json.loads(x) for x in requests.get(o["url"], timeout=HTTP_TIMEOUT).text.splitlines()]
            for o in files
        )
        assert [r["id"] for r in first] == [r["id"] for r in second] and len(first) == 2
        for a, b in zip(first, second, strict=True):
            assert instant(b["meta"]["lastUpdated"]) > instant(
                (a.get("meta") or {}).get("lastUpdated", "1970-01-01T00:00:00Z")
            )


def test_a_forgotten_export_job_answers_404():
    with FhirTestServer(MINI_DIR, export_polls=5) as server:
        kick = kick_off(server, ["Patient"])
        status_url = kick.headers["Content-Location"]
        assert requests.get(status_url, timeout=HTTP_TIMEOUT).status_code == 202
        server.forget_export_jobs()
        gone = requests.get(status_url, timeout=HTTP_TIMEOUT)
        assert gone.status_code == 404 and gone.json()["resourceType"] == "OperationOutcome"
        assert kick_off(server, ["Patient"]).status_code == 202  # a new job can start


# ------------------------------------------------------------------------------------------ SMART auth


@pytest.fixture(scope="module")
def keys():
    return {"RS384": make_keypair("RS384"), "ES384": make_keypair("ES384"), "other": make_keypair("RS384")}


@pytest.fixture
def smart(keys):
    clients = {"rs-client": keys["RS384"].public_pem, "es-client": keys["ES384"].jwk}
    with FhirTestServer(MINI_DIR, auth="smart", clients=clients, export_polls=0) as server:
        yield server


def request_token(server, assertion, scope="system/*.read"):
    return requests.post(
        server.token_url,
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
            "scope": scope,
        },
        timeout=HTTP_TIMEOUT,
    )


@pytest.mark.parametrize(("client", "alg"), [("rs-client", "RS384"), ("es-client", "ES384")])
def test_smart_token_happy_path(smart, keys, client, alg):
    config = get(smart, "/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == smart.token_url
    key = keys[alg]
    assertion = make_client_assertion(
        key.private_pem, client, config["token_endpoint"], alg=alg, kid=key.jwk["kid"]
    )
    resp = request_token(smart, assertion)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "bearer" and body["scope"] == "system/*.read" and body["expires_in"] == 300
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    assert get(smart, "/Patient/test-inpatient-1", headers=auth).status_code == 200


def test_smart_rejections(smart, keys):
    url = smart.token_url
    good = keys["RS384"].private_pem
    cases = {
        "bad signature": make_client_assertion(keys["other"].private_pem, "rs-client", url, alg="RS384"),
        "wrong aud": make_client_assertion(good, "rs-client", "http://127.0.0.1:1/other/token"),
        "expired": make_client_assertion(good, "rs-client", url, exp=int(time.time()) - 60),
        "exp too far": make_client_assertion(good, "rs-client", url, lifetime=3600),
        "sub mismatch": make_client_assertion(good, "rs-client", url, sub="someone-else"),
        "unknown client": make_client_assertion(good, "nobody", url),
        "wrong alg": make_client_assertion(good, "rs-client", url, alg="RS256"),
    }
    for label, assertion in cases.items():
        resp = request_token(smart, assertion)
        assert resp.status_code in (400, 401), label
        assert resp.json()["error"] == "invalid_client", label
    reused = make_client_assertion(good, "rs-client", url, jti="same-jti")
    assert request_token(smart, reused).status_code == 200
    again = request_token(smart, reused)
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"
    assert "jti" in again.json()["error_description"]
    bad_grant = requests.post(url, data={"grant_type": "password"}, timeout=HTTP_TIMEOUT)
    assert bad_grant.status_code == 400 and bad_grant.json()["error"] == "unsupported_grant_type"
    bad_scope = request_token(smart, make_client_assertion(good, "rs-client", url), scope="patient/*.read")
    assert bad_scope.status_code == 400 and bad_scope.json()["error"] == "invalid_scope"


def test_bearer_required_and_revocable(smart, keys):
    unauth = get(smart, "/Patient/test-inpatient-1")
    assert unauth.status_code == 401
    assert unauth.json()["resourceType"] == "OperationOutcome"
    assert unauth.headers["WWW-Authenticate"].startswith("Bearer")
    assert get(smart, "/metadata").status_code == 200  # discovery stays public
    assertion = make_client_assertion(keys["RS384"].private_pem, "rs-client", smart.token_url)
    token = request_token(smart, assertion).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert get(smart, "/Encounter", headers=auth).status_code == 200
    kick = get(smart, "/$export", headers={**auth, "Prefer": "respond-async"})
    manifest = requests.get(kick.headers["Content-Location"], headers=auth, timeout=HTTP_TIMEOUT).json()
    assert manifest["requiresAccessToken"] is True
    file_url = manifest["output"][0]["url"]
    assert requests.get(file_url, timeout=HTTP_TIMEOUT).status_code == 401
    assert requests.get(file_url, headers=auth, timeout=HTTP_TIMEOUT).status_code == 200
    smart.expire_tokens()
    expired = get(smart, "/Encounter", headers=auth)
    assert expired.status_code == 401 and "expired" in expired.headers["WWW-Authenticate"]
    token = request_token(
        smart, make_client_assertion(keys["RS384"].private_pem, "rs-client", smart.token_url)
    )
    auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
    assert get(smart, "/Encounter", headers=auth).status_code == 200
    smart.revoke_tokens()
    assert get(smart, "/Encounter", headers=auth).status_code == 401


def test_static_bearer_mode():
    with FhirTestServer(MINI_DIR, auth="bearer:s3cret") as server:
        assert get(server, "/Patient").status_code == 401
        assert get(server, "/Patient", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert get(server, "/Patient", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        server.revoke_tokens()
        assert get(server, "/Patient", headers={"Authorization": "Bearer s3cret"}).status_code == 401


# ------------------------------------------------------------------------------------------ faults


def test_fault_status_with_retry_after_then_recovers(mini):
    fault = mini.faults.add("status", path=r"/Encounter", count=2, status=503, retry_after=7)
    first = get(mini, "/Encounter")
    assert first.status_code == 503 and first.headers["Retry-After"] == "7"
    assert first.json()["resourceType"] == "OperationOutcome"
    assert get(mini, "/Encounter").status_code == 503
    assert get(mini, "/Patient").status_code == 200  # path regex does not match
    assert get(mini, "/Encounter").status_code == 200  # count exhausted
    assert fault.hits == 2
    mini.faults.add("status", status=429)
    assert get(mini, "/Patient").status_code == 429
    mini.faults.clear()
    assert get(mini, "/Patient").status_code == 200
    assert [r.fault for r in mini.requests] == ["status", "status", None, None, "status", None]
    assert [r.status for r in mini.requests] == [503, 503, 200, 200, 429, 200]


def test_fault_latency_composes(mini):
    mini.faults.add("latency", ms=150)
    mini.faults.add("latency", path="Encounter", ms=150)
    mini.faults.add("status", path="Encounter", status=500, count=1)
    started = time.monotonic()
    resp = get(mini, "/Encounter")
    assert resp.status_code == 500 and time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert get(mini, "/Patient").status_code == 200
    assert time.monotonic() - started >= 0.15


def test_fault_timeout_trips_client_and_does_not_block_stop():
    server = FhirTestServer(MINI_DIR).start()
    server.faults.add("timeout", seconds=30)
    with pytest.raises(requests.exceptions.ReadTimeout):
        get(server, "/Patient", timeout=(2, 0.3))
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3


def test_fault_truncated_html_outcome_drop(mini):
    mini.faults.add("truncated", count=1)
    resp = get(mini, "/Patient")
    assert resp.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.text)
    mini.faults.add("truncated", count=1, mode="connection")
    with pytest.raises(requests.exceptions.RequestException):
        get(mini, "/Patient")
    mini.faults.add("html", count=1)
    resp = get(mini, "/Patient")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    mini.faults.add("outcome", count=1, status=422, code="processing", diagnostics="bad date")
    resp = get(mini, "/Encounter")
    assert resp.status_code == 422 and resp.json()["issue"][0]["diagnostics"] == "bad date"
    mini.faults.add("outcome", count=1, status=200, severity="warning", code="too-costly")
    resp = get(mini, "/Encounter")
    assert resp.status_code == 200 and resp.json()["resourceType"] == "OperationOutcome"
    for status in (400, 403, 404, 410):
        mini.faults.add("outcome", count=1, status=status)
        assert get(mini, "/Encounter").status_code == status
    mini.faults.add("drop", count=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        get(mini, "/Patient")
    assert get(mini, "/Patient").status_code == 200
    with pytest.raises(ValueError, match="unknown fault kind"):
        mini.faults.add("explode")


def test_request_log_and_max_concurrency(mini):
    mini.faults.add("latency", ms=300)
    barrier = threading.Barrier(4)
    results = []

    def worker(n):
        barrier.wait(timeout=5)
        results.append(
            get(mini, "/Encounter", params={"patient": "test-inpatient-1", "_count": n}).status_code
        )

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [200] * 4
    assert mini.max_concurrency >= 2
    records = mini.requests
    assert len(records) == 4 and {r.method for r in records} == {"GET"}
    assert {r.path for r in records} == {"/fhir/Encounter"}
    assert sorted(int(r.param("_count")) for r in records) == [1, 2, 3, 4]
    assert len({r.thread for r in records}) >= 2
    mini.reset_stats()
    assert mini.requests == [] and mini.max_concurrency == 0


def test_stop_with_idle_keepalive_connection_is_fast():
    server = FhirTestServer(MINI_DIR).start()
    session = requests.Session()
    assert session.get(server.base_url + "/Patient", timeout=HTTP_TIMEOUT).status_code == 200
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    session.close()


def test_cli_prints_base_url():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fhir_test_server",
            str(MINI_DIR),
            "--latency-ms",
            "1",
            "--no-everything",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("http://127.0.0.1:") and line.endswith("/fhir")
        cap = requests.get(line + "/metadata", timeout=HTTP_TIMEOUT).json()
        assert "operation" not in cap["rest"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)

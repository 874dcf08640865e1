"""The EHR misbehaves: huge charts, bursts of 429, a server that goes away. What loaded is kept, the rest reported."""

from __future__ import annotations

import pytest

from connectors import FhirTemporaryError
from connectors.rest import RestFhirSource, RestOptions

PID = "huge"


def huge_patient(n: int) -> list[dict]:
    resources = [
        {"resourceType": "Patient", "id": PID, "name": [{"family": "Big"}], "birthDate": "1940-01-01"}
    ]
    for i in range(n):
        resources.append(
            {
                "resourceType": "Observation",
                "id": f"o{i}",
                "status": "final",
                "subject": {"reference": f"Patient/{PID}"},
                "category": [{"coding": [{"code": "vital-signs"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "effectiveDateTime": f"2026-0{1 + i % 3}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
                "valueQuantity": {"value": 60 + i % 50, "unit": "/min"},
            }
        )
    return resources


@pytest.mark.slow
def test_a_100000_resource_patient_loads_completely(fhir_server_factory):
    server = fhir_server_factory(resources=huge_patient(100_000), max_count=1000)
    source = RestFhirSource(server.base_url, options=RestOptions(page_size=1000, read_timeout=60))
    chart = source.patient_chart(PID)
    assert len(chart.results) == 100_000
    assert not chart.issues
    assert chart.latest("heart_rate") is not None


def test_bursts_of_429_are_absorbed(fhir_server_factory):
    server = fhir_server_factory(resources=huge_patient(300), everything=False)
    server.faults.add("status", path=r"/Observation", count=6, status=429, retry_after=0)
    sleeps: list[float] = []
    source = RestFhirSource(
        server.base_url, options=RestOptions(retries=6, page_size=100), sleep=sleeps.append
    )
    chart = source.patient_chart(PID)
    assert len(chart.results) == 300 and not chart.issues
    assert sleeps.count(0.0) == 6


def test_server_down_mid_ward_reports_and_keeps_what_loaded(fhir_server_factory):
    server = fhir_server_factory(
        resources=huge_patient(50)
        + [{"resourceType": "Patient", "id": "second", "name": [{"family": "Two"}]}],
        everything=False,
    )
    source = RestFhirSource(
        server.base_url, options=RestOptions(retries=1, backoff_base=0.01, connect_timeout=0.5)
    )
    first = source.patient_chart(PID)
    server.stop()
    results = dict(source.charts_concurrently(["second"], workers=1))
    assert len(first.results) == 50
    assert isinstance(results["second"], FhirTemporaryError)
    assert "cannot connect" in str(results["second"])

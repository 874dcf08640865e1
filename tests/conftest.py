"""Shared fixtures: the Synthea set beside the checkout, a demo ward at a frozen anchor, FHIR test servers."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

REPO = Path(__file__).resolve().parent.parent
SYNTHEA_DIR = Path(os.environ.get("NVA_SYNTHEA_DIR", REPO.parent / "shared" / "data" / "synthea-r4"))
os.environ.setdefault("NVA_SYNTHEA_DIR", str(SYNTHEA_DIR))
# The frozen clock of the test suite: the demo ward is generated for this shift start.
DEMO_ANCHOR = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def synthea_dir() -> Path:
    if not SYNTHEA_DIR.is_dir():
        pytest.skip(f"Synthea data not found at {SYNTHEA_DIR} (CI has ../shared beside the checkout)")
    return SYNTHEA_DIR


@pytest.fixture(scope="session")
def demo_anchor() -> datetime:
    return DEMO_ANCHOR


@pytest.fixture(scope="session")
def demo_ward_dir(tmp_path_factory) -> Path:
    from assistant.demo_ward import generate_demo_ward

    out = tmp_path_factory.mktemp("demo-ward")
    generate_demo_ward(out, anchor=DEMO_ANCHOR, seed=7)
    return out


@pytest.fixture(scope="session")
def demo_ward_judged(demo_ward_dir) -> list[tuple]:
    """Every demo-ward chart with its rule findings at DEMO_ANCHOR, in source order (read-only: shared)."""
    from assistant.rules.engine import evaluate
    from connectors import open_source

    with open_source(demo_ward_dir) as src:
        charts = [src.patient_chart(pid) for pid in src.iter_patient_ids()]
    return [(c, evaluate(c, now=DEMO_ANCHOR)) for c in charts]


@pytest.fixture
def fhir_server_factory():
    """Start FhirTestServer instances on 127.0.0.1; all are stopped at the end of the test."""
    from tests.fhir_test_server import FhirTestServer

    started = []

    def start(*args, **kwargs) -> FhirTestServer:
        server = FhirTestServer(*args, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()

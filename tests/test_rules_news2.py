"""NEWS2 (RCP 2017, scale 1) from a chart's latest vital signs: band edges, oxygen, ACVPU, missing values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from assistant.normalize import build_chart
from assistant.rules.news2 import news2

NOW = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
LOINC = {
    "rr": ("9279-1", "/min"),
    "spo2": ("59408-5", "%"),
    "o2": ("3151-8", "L/min"),
    "sbp": ("8480-6", "mm[Hg]"),
    "hr": ("8867-4", "/min"),
    "temp": ("8310-5", "Cel"),
}
NORMAL = {"rr": 16, "spo2": 97, "o2": 0, "sbp": 125, "hr": 72, "temp": 37.0}


def vital(name: str, value: float, hours_ago: float = 1, unit: str | None = None, n: int = 0) -> dict:
    code, ucum = LOINC[name]
    return {
        "resourceType": "Observation",
        "id": f"{name}-{n}-{hours_ago}",
        "status": "final",
        "category": [{"coding": [{"code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": (NOW - timedelta(hours=hours_ago)).isoformat(),
        "valueQuantity": {"value": value, "unit": unit or ucum, "code": unit or ucum},
    }


def acvpu(answer: str, hours_ago: float = 1) -> dict:
    return {
        "resourceType": "Observation",
        "id": f"acvpu-{hours_ago}",
        "status": "final",
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": "1104441000000107"}],
            "text": "ACVPU",
        },
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": (NOW - timedelta(hours=hours_ago)).isoformat(),
        "valueCodeableConcept": {"text": answer},
    }


def score(overrides: dict[str, Any] | None = None, consciousness: str | None = "Alert", **extra):
    values = {**NORMAL, **(overrides or {})}
    resources: list[dict] = [{"resourceType": "Patient", "id": "p"}]
    resources += [vital(k, v) for k, v in values.items() if v is not None]
    if consciousness:
        resources.append(acvpu(consciousness))
    resources += extra.get("more", [])
    return news2(build_chart(resources, source="t"), now=NOW)


@pytest.mark.parametrize(
    ("param", "key", "cases"),
    [
        ("rr", "respiration_rate", [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3)]),
        ("spo2", "spo2_scale1", [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0)]),
        ("o2", "supplemental_oxygen", [(0, 0), (0.5, 2), (2, 2)]),
        (
            "sbp",
            "systolic_bp",
            [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3)],
        ),
        (
            "hr",
            "pulse",
            [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3)],
        ),
        (
            "temp",
            "temperature",
            [(35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1), (39.1, 2)],
        ),
    ],
)
def test_band_edges(param, key, cases):
    for value, points in cases:
        s = score({param: value})
        assert s.points[key] == points, (param, value)
        assert s.total == points
        assert s.complete


def test_fahrenheit_is_converted():
    s = score({"temp": None}, more=[vital("temp", 102.5, unit="[degF]")])  # 39.2 C
    assert s.points["temperature"] == 2


@pytest.mark.parametrize(
    ("answer", "points"),
    [("Alert", 0), ("A", 0), ("New confusion", 3), ("Voice", 3), ("Pain", 3), ("Unresponsive", 3)],
)
def test_consciousness(answer, points):
    s = score(consciousness=answer)
    assert s.points["consciousness"] == points
    assert s.band == ("low-medium" if points == 3 else "low")


@pytest.mark.parametrize(
    ("overrides", "total", "band"),
    [
        ({}, 0, "low"),
        ({"rr": 21}, 2, "low"),
        ({"rr": 25}, 3, "low-medium"),  # a single red score
        ({"rr": 21, "hr": 111, "temp": 38.5}, 5, "medium"),
        ({"rr": 22, "spo2": 92, "o2": 2, "sbp": 102, "hr": 112, "temp": 38.6}, 10, "high"),
        ({"rr": 21, "hr": 111, "temp": 39.5, "o2": 1}, 8, "high"),
    ],
)
def test_total_and_response_band(overrides, total, band):
    s = score(overrides)
    assert (s.total, s.band) == (total, band)
    assert s.response
    assert len(s.evidence) == 7 and all(ref.startswith("Observation/") for ref in s.evidence)


def test_latest_value_counts_and_stale_or_missing_values_are_reported_missing():
    more = [vital("rr", 30, hours_ago=5, n=1)]  # older than the normal one at 1 h: superseded
    s = score(more=more)
    assert s.points["respiration_rate"] == 0
    s = score({"hr": None}, more=[vital("hr", 140, hours_ago=30)])  # older than 24 h
    assert "pulse" in s.missing and not s.complete and "pulse" not in s.points
    s = score(consciousness=None)
    assert s.missing == ("consciousness",)
    s = score(consciousness="sleepy?")  # an answer we cannot map is not "alert"
    assert "consciousness" in s.missing


def test_scored_values_are_shown_in_display_units_not_ucum_codes(demo_ward_dir, demo_anchor):
    """A NEWS2 flag's evidence reads '38.6 °C' and '102 mmHg' like the rest of the app, never 'Cel' or 'mm[Hg]'."""
    from assistant.summary.display import show_result
    from connectors.bundle_dir import BundleDirSource

    source = BundleDirSource(demo_ward_dir)
    seen = 0
    for pid in source.iter_patient_ids():
        chart = source.patient_chart(pid)
        results = {r.ref: r for r in chart.results}
        for p in news2(chart, now=demo_anchor).parameters:
            assert "Cel" not in p.value and "mm[Hg]" not in p.value, p.value
            result = results[p.ref]
            if result.analyte in ("temperature", "systolic_bp") and result.value is not None:
                assert p.value == show_result(result) and p.value.endswith(("°C", "mmHg")), p.value
                seen += 1
    assert seen > 20

"""Two orders of one drug are a duplicate order, never "two anticoagulants": ward engine, retrospective, Synthea."""

from __future__ import annotations

import gzip
import io
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from assistant.audit.report import read_findings
from assistant.cli import main
from assistant.normalize import build_chart
from assistant.rules.engine import drug_identity, evaluate
from assistant.rules.retrospective import episodes

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea-r4"
NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
DUPLICATE_RULES = ("duplicate-therapy", "duplicate-order", "duplicate-order-record")


def _chart(*orders: dict):
    pid = "p7"
    base = [{"resourceType": "Patient", "id": pid, "birthDate": "1950-01-01"}]
    for i, r in enumerate(orders):
        base.append({"id": f"m{i}", "subject": {"reference": f"Patient/{pid}"}, **r})
    return build_chart(base, source="test", patient_id=pid)


def _order(text: str, written: str = "2025-05-30T09:00:00Z", status: str = "active", **extra) -> dict:
    return {
        "resourceType": "MedicationRequest",
        "status": status,
        "intent": "order",
        "authoredOn": written,
        "medicationCodeableConcept": {"text": text},
        **extra,
    }


def _fired(chart, now: datetime = NOW) -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for f in evaluate(chart, now=now):
        if f.rule_id in DUPLICATE_RULES:
            out[f.rule_id].append(f.evidence)
    return dict(out)


# --- the ward snapshot ---------------------------------------------------------------------------------------


def test_one_prescription_recorded_twice_is_not_two_anticoagulants():
    chart = _chart(_order("Warfarin 5 mg tablet"), _order("Warfarin 5 mg tablet"))
    fired = _fired(chart)
    assert "duplicate-therapy" not in fired
    assert fired == {"duplicate-order-record": [("MedicationRequest/m0", "MedicationRequest/m1")]}
    (f,) = [f for f in evaluate(chart, now=NOW) if f.rule_id == "duplicate-order-record"]
    assert "anticoagulants" not in f.message and "one prescription recorded 2 times" in f.message


def test_the_same_drug_in_two_live_orders_written_apart_is_a_duplicate_order():
    chart = _chart(
        _order("Warfarin 5 mg tablet", "2025-05-28T09:00:00Z"),
        _order("Warfarin 3 mg tablet", "2025-05-31T09:00:00Z"),
    )
    fired = _fired(chart)
    assert fired == {"duplicate-order": [("MedicationRequest/m0", "MedicationRequest/m1")]}
    (f,) = [f for f in evaluate(chart, now=NOW) if f.rule_id == "duplicate-order"]
    assert f.severity == "medium" and "2025-05-28 09:00 UTC and 2025-05-31 09:00 UTC" in f.message


def test_two_strengths_written_together_make_one_dose_and_are_no_finding():
    # 5 mg + 1 mg tablets written at one moment to make 6 mg: an intended combination of one drug.
    assert _fired(_chart(_order("Warfarin 5 mg tablet"), _order("Warfarin 1 mg tablet"))) == {}


def test_two_different_anticoagulants_still_fire_once_with_every_order_cited():
    chart = _chart(
        _order("Warfarin 5 mg tablet"), _order("Warfarin 5 mg tablet"), _order("Apixaban 5 mg tablet")
    )
    fired = _fired(chart)
    assert fired["duplicate-therapy"] == [
        ("MedicationRequest/m0", "MedicationRequest/m1", "MedicationRequest/m2")
    ]
    assert fired["duplicate-order-record"] == [("MedicationRequest/m0", "MedicationRequest/m1")]
    (f,) = [f for f in evaluate(chart, now=NOW) if f.rule_id == "duplicate-therapy"]
    assert f.message.count("Warfarin") == 1 and "Apixaban" in f.message


def test_drug_identity_is_the_rxnorm_ingredient_else_the_code_else_the_text():
    a, b = _chart(_order("Warfarin 5 mg tablet"), _order("WARFARIN  5 mg tablet")).orders
    assert drug_identity(a) == drug_identity(b) and drug_identity(a)[0] == "ingredients"
    coded = {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "999999001"}]}
    x, y, z = _chart(
        _order("Mystery tablet", medicationCodeableConcept={**coded, "text": "Mystery tablet"}),
        _order("Mystery tablet (renamed)", medicationCodeableConcept={**coded, "text": "Mystery renamed"}),
        _order("Unknown tablet"),
    ).orders
    assert drug_identity(x) == drug_identity(y) != drug_identity(z)


# --- the retrospective path ----------------------------------------------------------------------------------


def test_copies_of_a_stopped_prescription_are_no_episode_and_not_two_drugs():
    # Synthea's pattern: one prescription written twice at one moment, both stopped with no stop time.
    chart = _chart(
        _order("Warfarin 5 mg tablet", "2012-04-14T16:05:15Z", status="stopped"),
        _order("Warfarin 5 mg tablet", "2012-04-14T16:05:15Z", status="stopped"),
    )
    got = episodes(chart, start=datetime(2012, 1, 1, tzinfo=UTC), end=datetime(2013, 1, 1, tzinfo=UTC))
    assert [e for e in got if e.rule_id in DUPLICATE_RULES] == []


def test_live_copies_hold_as_a_data_quality_episode_until_one_is_stopped():
    start, end = datetime(2025, 5, 1, tzinfo=UTC), datetime(2025, 6, 1, tzinfo=UTC)
    stop = datetime(2025, 5, 20, 9, tzinfo=UTC)
    chart = _chart(
        _order("Warfarin 5 mg tablet", "2025-05-10T09:00:00Z"),
        _order(
            "Warfarin 5 mg tablet",
            "2025-05-10T09:00:00Z",
            status="stopped",
            dispenseRequest={"validityPeriod": {"end": stop.isoformat()}},
        ),
    )
    got = [e for e in episodes(chart, start=start, end=end) if e.rule_id in DUPLICATE_RULES]
    assert [(e.rule_id, e.category, e.severity) for e in got] == [
        ("duplicate-order-record", "data-quality", "low")
    ]
    assert set(got[0].evidence) == {"MedicationRequest/m0", "MedicationRequest/m1"}
    assert got[0].start == datetime(2025, 5, 10, 9, tzinfo=UTC)


def test_two_nsaids_prescribed_at_one_instant_stay_an_episode(tmp_path):
    # A drug prescribed while another of its class was active is a prescribing event even when its duration is
    # unknown: the 0-hour instant is kept for duplicate-therapy.
    chart = _chart(
        _order("Naproxen sodium 220 MG Oral Tablet", "2010-03-20T08:00:00Z"),
        _order("Ibuprofen 200 MG Oral Tablet", "2017-08-25T08:22:36Z", status="stopped"),
    )
    got = [
        e
        for e in episodes(chart, start=datetime(2017, 1, 1, tzinfo=UTC), end=datetime(2018, 1, 1, tzinfo=UTC))
        if e.rule_id in DUPLICATE_RULES
    ]
    assert [(e.rule_id, e.duration_hours, e.end_reason) for e in got] == [
        ("duplicate-therapy", 0.0, "order-stop-unknown")
    ]
    # said as one instant of unknown exposure, never "0.0 h" (which reads as no exposure)
    assert got[0].duration_text == "at one instant (duration unknown)"
    from assistant.audit.report import write_output

    out = tmp_path / "instant.html"
    row = {"patient": "Patient/p", "ward": None, "findings": [], "issues": [], "error": None, "resources": 2}
    row["episodes"] = [{"patient": "Patient/p", **got[0].to_dict()}]
    write_output(
        lambda: [row], out, fmt="html", now="2018-01-01T00:00:00+00:00", source="t", retrospective=True
    )
    assert "duration unknown" in out.read_text() and "0.0 h" not in out.read_text()


# --- golden: Synthea, expectation from the raw bundles --------------------------------------------------------


def _raw_orders() -> dict[str, dict[str, dict]]:
    """Patient -> MedicationRequest id -> the raw resource, from the bundles themselves."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(SYNTHEA.glob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            resources = [e["resource"] for e in json.load(fh).get("entry", [])]
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        out[f"Patient/{pid}"] = {r["id"]: r for r in resources if r["resourceType"] == "MedicationRequest"}
    return out


def _codes(r: dict) -> tuple[str, ...]:
    return tuple(sorted(c["code"] for c in r.get("medicationCodeableConcept", {}).get("coding", [])))


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason="../shared/data/synthea-r4 is not beside the repository")
def test_synthea_duplicate_episodes_match_the_raw_prescriptions(tmp_path):
    raw = _raw_orders()
    # Copies in the raw data: same patient, same RxNorm code, same authoredOn, more than one id.
    copies: dict[tuple, list[str]] = defaultdict(list)
    for patient, orders in raw.items():
        for rid, r in orders.items():
            copies[(patient, _codes(r), r.get("authoredOn"))].append(rid)
    groups = {k: v for k, v in copies.items() if len(v) > 1}
    assert groups, "the Synthea sample has prescriptions written twice (the case this test is about)"
    live = {
        (k[0], frozenset(f"MedicationRequest/{i}" for i in v))
        for k, v in groups.items()
        if sum(raw[k[0]][i]["status"] == "active" for i in v) > 1
    }
    out = tmp_path / "synthea.jsonl"
    buf = io.StringIO()
    assert main(["audit", str(SYNTHEA), "--out", str(out), "--period", "--no-progress"], out=buf) == 0
    eps = [e for e in read_findings(out) if e["rule_id"] in DUPLICATE_RULES]
    for e in eps:
        cited = [raw[e["patient"]][ref.split("/", 1)[1]] for ref in e["evidence"]]
        if e["rule_id"] == "duplicate-therapy":
            # two drugs of one class: at least two distinct RxNorm codes among the cited prescriptions
            assert len({_codes(r) for r in cited}) >= 2, e
            assert len(set(e["message"].split(": ", 1)[1].rstrip(".").split(" and "))) >= 2, e
    # A data-quality episode only for copies that were live together (active); copies of a stopped prescription
    # are a prescribing instant with no exposure.
    got = {(e["patient"], frozenset(e["evidence"])) for e in eps if e["rule_id"] == "duplicate-order-record"}
    assert got == live
    same_drug_class = [
        e for e in eps if e["rule_id"] == "duplicate-therapy" and "two anticoagulants" in e["message"]
    ]
    for e in same_drug_class:
        assert len({_codes(raw[e["patient"]][r.split("/", 1)[1]]) for r in e["evidence"]}) >= 2


def test_a_renewal_written_later_is_not_a_copy():
    # Stopped without a stop time and renewed a day later: one drug over time, no duplicate of any kind.
    chart = _chart(
        _order("Warfarin 5 mg tablet", "2025-05-10T09:00:00Z", status="stopped"),
        _order("Warfarin 5 mg tablet", "2025-05-11T09:00:00Z"),
    )
    got = episodes(chart, start=datetime(2025, 5, 1, tzinfo=UTC), end=datetime(2025, 6, 1, tzinfo=UTC))
    assert [e for e in got if e.rule_id in DUPLICATE_RULES] == []
    assert _fired(chart, NOW + timedelta(days=1)) == {}

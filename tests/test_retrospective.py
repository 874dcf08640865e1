"""Retrospective audit: episodes on the demo ward and on Synthea, PINCER-kind indicators, incomplete and stale runs."""

from __future__ import annotations

import gzip
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from assistant.audit.report import read_findings, read_status
from assistant.cli import main
from assistant.normalize import build_chart
from assistant.rules.engine import default_catalogue, evaluate, not_judged_rules, stale_data
from assistant.rules.retrospective import episodes
from connectors.base import FhirSource, PatientRecord

ANCHOR = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "data" / "synthea-r4"
demo_ward = pytest.importorskip("assistant.demo_ward")


def run_cli(*args: str) -> tuple[int, str]:
    buf = io.StringIO()
    rc = main(["audit", *args, "--no-progress"], out=buf)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def ward(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ward")
    demo_ward.generate_demo_ward(out, anchor=ANCHOR, seed=7)
    return out


# --- golden: the demo ward -----------------------------------------------------------------------------------


def test_demo_ward_episodes_open_at_the_period_end_are_the_answer_key(ward, tmp_path):
    out = tmp_path / "episodes.jsonl"
    rc, text = run_cli(str(ward), "--out", str(out), "--period", "2026-02-01/2026-03-02T07:00:00Z")
    assert rc == 0, text
    eps = read_findings(out)
    key = json.loads((ward / "answer_key.json").read_text())
    expected = {(e["patient"], e["rule"]) for e in key["expected"]}
    open_at_end = {(e["patient"], e["rule_id"]) for e in eps if e["end"] is None}
    assert open_at_end == expected  # the snapshot at the anchor, seen as the episodes still holding then
    for m in key["must_not_fire"]:
        assert (m["patient"], m["rule"]) not in open_at_end, m["reason"]
    assert f"{len(eps)} episodes" in text
    unordered = [e for e in eps if e["rule_id"] == "administration-without-order"]
    assert unordered and all(
        e["doses_count"] == 1 and e["doses"][0]["ref"] in e["evidence"] for e in unordered
    )  # a dose given without an order is itself the dose the episode counts
    for e in eps:
        start = datetime.fromisoformat(e["start"])
        assert datetime(2026, 2, 1, tzinfo=UTC) <= start <= ANCHOR
        assert e["end"] is None or datetime.fromisoformat(e["end"]) >= start
        assert e["doses_count"] == len(e["doses"])
        for d in e["doses"]:  # a dose counted for an episode was given while it held
            t = datetime.fromisoformat(d["time"])
            assert start <= t <= (datetime.fromisoformat(e["end"]) if e["end"] else ANCHOR)


def test_episode_csv_and_html_carry_the_episode_fields(ward, tmp_path):
    csv_out, html_out = tmp_path / "e.csv", tmp_path / "e.html"
    assert run_cli(str(ward), "--out", str(csv_out), "--period", "2026-02-20/2026-03-02T07:00:00Z")[0] == 0
    rc, text = run_cli(str(ward), "--out", str(html_out), "--period", "2026-02-20/2026-03-02T07:00:00Z")
    assert rc == 0
    header = csv_out.read_text().splitlines()[0].split(",")
    for col in ("start", "end", "end_reason", "duration_hours", "doses_count", "doses", "evidence"):
        assert col in header
    page = html_out.read_text()
    patients = text.split("audited ")[1].split(" patients")[0]
    assert f"{patients} patients" in page  # the HTML header and stdout agree
    assert "episodes" in page and "retrospectively" in page


def test_a_monitoring_episode_starts_at_the_prescription_and_ends_at_the_first_result():
    pid = "p1"
    mr = {
        "resourceType": "MedicationRequest",
        "id": "w1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": "2025-01-10T09:00:00Z",
        "medicationCodeableConcept": {"text": "Warfarin 5 mg tablet"},
    }
    inr = {
        "resourceType": "Observation",
        "id": "inr1",
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "6301-6"}]},
        "effectiveDateTime": "2025-03-01T08:00:00Z",
        "valueQuantity": {"value": 2.3, "unit": "{INR}"},
    }
    patient = {"resourceType": "Patient", "id": pid, "birthDate": "1950-01-01"}
    chart = build_chart([patient, mr, inr], source="test", patient_id=pid)
    start, end = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 9, 1, tzinfo=UTC)
    got = [e for e in episodes(chart, start=start, end=end) if e.rule_id == "pincer-warfarin-no-inr-12-weeks"]
    # Prescribed with no INR before: from the prescription to the INR; 12 weeks after the INR it is due again.
    assert [(e.start, e.end, e.end_reason) for e in got] == [
        (datetime(2025, 1, 10, 9, tzinfo=UTC), datetime(2025, 3, 1, 8, tzinfo=UTC), "resolved"),
        (datetime(2025, 3, 1, 8, tzinfo=UTC) + timedelta(weeks=12), None, "period-end"),
    ]
    assert got[0].duration_hours == pytest.approx(
        (got[0].end - got[0].start).total_seconds() / 3600, abs=0.01
    )
    # The snapshot agrees with the episodes at any moment.
    for t in (
        datetime(2025, 2, 1, tzinfo=UTC),
        datetime(2025, 4, 1, tzinfo=UTC),
        datetime(2025, 8, 1, tzinfo=UTC),
    ):
        snap = any(f.rule_id == "pincer-warfarin-no-inr-12-weeks" for f in evaluate(chart, now=t))
        assert snap is any(e.holds_at(t) for e in got), t


# --- golden: Synthea, expectation computed from the raw bundles ----------------------------------------------

INR_LOINC = {"6301-6", "34714-6", "46418-0", "38875-1"}


def _raw_expectation() -> dict[str, tuple[datetime, bool]]:
    """Patient -> (first warfarin prescription, whether some prescription had no INR in the 84 days before),
    from the bundles themselves (warfarin by name in the order text; INR by LOINC)."""
    out = {}
    for path in sorted(SYNTHEA.glob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            bundle = json.load(fh)
        resources = [e["resource"] for e in bundle.get("entry", [])]
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        orders = [
            datetime.fromisoformat(r["authoredOn"]).astimezone(UTC)
            for r in resources
            if r["resourceType"] == "MedicationRequest"
            and "warfarin" in json.dumps(r.get("medicationCodeableConcept", {})).lower()
            and r.get("status") not in ("cancelled", "entered-in-error", "draft")
        ]
        if not orders:
            continue
        inrs = [
            datetime.fromisoformat(r["effectiveDateTime"]).astimezone(UTC)
            for r in resources
            if r["resourceType"] == "Observation"
            and {c.get("code") for c in r.get("code", {}).get("coding", [])} & INR_LOINC
            and r.get("status") in ("final", "amended", "corrected", "preliminary")
        ]
        gap = any(not any(o - timedelta(days=84) < t <= o for t in inrs) for o in orders)
        out[f"Patient/{pid}"] = (min(orders), gap, bool(inrs))
    return out


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason="../shared/data/synthea-r4 is not beside the repository")
def test_synthea_every_warfarin_patient_without_inr_gets_an_episode(tmp_path):
    expected = _raw_expectation()
    assert expected, "the Synthea sample has warfarin patients"
    out = tmp_path / "synthea.jsonl"
    rc, text = run_cli(str(SYNTHEA), "--out", str(out), "--period")
    assert rc == 0, text
    eps = [e for e in read_findings(out) if e["rule_id"] == "pincer-warfarin-no-inr-12-weeks"]
    by_patient: dict[str, list[dict]] = {}
    for e in eps:
        by_patient.setdefault(e["patient"], []).append(e)
    assert set(by_patient) == {p for p, (_, gap, _) in expected.items() if gap}
    for patient, (first, gap, any_inr) in expected.items():
        if gap and not any_inr:
            # Never an INR: one episode, from the first prescription on.
            assert len(by_patient[patient]) == 1, patient
            assert datetime.fromisoformat(by_patient[patient][0]["start"]) == first


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason="../shared/data/synthea-r4 is not beside the repository")
def test_synthea_snapshot_says_the_data_is_stale(tmp_path):
    out = tmp_path / "snap.html"
    rc, text = run_cli(str(SYNTHEA), "--out", str(out), "--now", "2026-03-02T07:00:00Z")
    assert rc == 0
    assert "judged at 2026-03-02 07:00 UTC; newest data" in text and "--period" in text
    assert "judged at 2026-03-02 07:00 UTC; newest data" in out.read_text()


# --- PINCER-kind indicators ----------------------------------------------------------------------------------

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)


def _chart(*resources: dict, birth: str = "1940-01-01"):
    pid = "p9"
    base = [{"resourceType": "Patient", "id": pid, "birthDate": birth}]
    for i, r in enumerate(resources):
        base.append({"id": f"r{i}", "subject": {"reference": f"Patient/{pid}"}, **r})
    return build_chart(base, source="test", patient_id=pid)


def _med(text: str, rtype: str = "MedicationRequest") -> dict:
    r = {"resourceType": rtype, "status": "active", "medicationCodeableConcept": {"text": text}}
    if rtype == "MedicationRequest":
        r |= {"intent": "order", "authoredOn": "2025-05-01T09:00:00Z"}
    else:
        r |= {"dateAsserted": "2025-05-01T09:00:00Z"}
    return r


def _obs(loinc: str, value: float, unit: str, days_ago: float) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "effectiveDateTime": (NOW - timedelta(days=days_ago)).isoformat(),
        "valueQuantity": {"value": value, "unit": unit},
    }


def _cond(text: str, code: str) -> dict:
    return {
        "resourceType": "Condition",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}], "text": text},
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "onsetDateTime": "2010-01-01T00:00:00Z",
    }


def fires(rule_id: str, chart) -> bool:
    return any(f.rule_id == rule_id for f in evaluate(chart, now=NOW))


@pytest.mark.parametrize(
    ("rule", "drug", "done", "overdue"),
    [
        (
            "pincer-lithium-no-level-3-months",
            "Lithium carbonate 300 mg",
            [("14334-7", 0.8, "mmol/L", 60)],
            [("14334-7", 0.8, "mmol/L", 100)],
        ),
        (
            "pincer-methotrexate-no-fbc-lft-3-months",
            "Methotrexate 10 mg weekly",
            [("777-3", 250, "10*3/uL", 30), ("1742-6", 20, "U/L", 30)],
            [("777-3", 250, "10*3/uL", 30)],  # the blood count alone is not enough: liver tests are due too
        ),
        (
            "pincer-amiodarone-no-thyroid-6-months",
            "Amiodarone 200 mg",
            [("3016-3", 2.1, "mIU/L", 150)],
            [("3016-3", 2.1, "mIU/L", 200)],
        ),
        (
            "pincer-acei-arb-loop-75-no-renal-15-months",
            "Lisinopril 10 mg",
            [("38483-4", 1.0, "mg/dL", 300), ("6298-4", 4.2, "mmol/L", 300)],
            [("38483-4", 1.0, "mg/dL", 300), ("6298-4", 4.2, "mmol/L", 500)],
        ),
    ],
)
def test_monitoring_indicators(rule, drug, done, overdue):
    med = _med(drug)
    assert fires(rule, _chart(med))  # never tested
    assert not fires(rule, _chart(med, *(_obs(*o) for o in done)))
    assert fires(rule, _chart(med, *(_obs(*o) for o in overdue)))
    assert fires(rule, _chart(_med(drug, "MedicationStatement")))  # an outpatient medication list counts too


def test_renal_indicator_only_from_75():
    med = _med("Furosemide 40 mg")
    assert fires("pincer-acei-arb-loop-75-no-renal-15-months", _chart(med, birth="1950-01-01"))  # 75
    assert not fires("pincer-acei-arb-loop-75-no-renal-15-months", _chart(med, birth="1951-01-01"))  # 74


def test_nsaid_with_peptic_ulcer_needs_gastroprotection():
    nsaid, ulcer = _med("Naproxen 500 mg"), _cond("Gastric ulcer", "397825006")
    rule = "pincer-nsaid-peptic-ulcer-no-gastroprotection"
    assert fires(rule, _chart(nsaid, ulcer))
    assert not fires(rule, _chart(nsaid, ulcer, _med("Omeprazole 20 mg")))
    assert not fires(rule, _chart(nsaid, ulcer, _med("Famotidine 20 mg", "MedicationStatement")))
    assert not fires(rule, _chart(nsaid))


def test_non_selective_beta_blocker_with_asthma():
    rule = "pincer-nonselective-beta-blocker-asthma"
    asthma = _cond("Childhood asthma", "233678006")
    assert fires(rule, _chart(_med("Propranolol 40 mg"), asthma))
    assert not fires(rule, _chart(_med("Atenolol 50 mg"), asthma))  # beta-1 selective


def test_nsaid_egfr_below_45_is_quiet_when_the_bedside_rule_says_it():
    nsaid = _med("Naproxen 500 mg")
    assert fires("pincer-nsaid-egfr-below-45", _chart(nsaid, _obs("33914-3", 40, "mL/min/1.73m2", 30)))
    low = _chart(nsaid, _obs("33914-3", 25, "mL/min/1.73m2", 1))
    assert fires("nsaid-low-egfr", low) and not fires("pincer-nsaid-egfr-below-45", low)


# --- incomplete runs and stale data --------------------------------------------------------------------------


def test_rules_resting_on_absence_are_not_judged_when_their_types_are_missing():
    cat = default_catalogue()
    skipped = not_judged_rules(cat, {"MedicationAdministration"})
    assert {"order-not-administered", "administration-without-order"} <= skipped
    assert "pincer-warfarin-no-inr-12-weeks" not in skipped
    assert "pincer-warfarin-no-inr-12-weeks" in not_judged_rules(cat, {"Observation"})
    assert not_judged_rules(cat, {"*"}) == set(cat.ids)
    assert not not_judged_rules(cat, set())


class _GappySource(FhirSource):
    """The demo ward with MedicationAdministration missing for one patient (a failed search)."""

    description = "gappy"

    def __init__(self, inner: FhirSource, victim: str) -> None:
        self.inner, self.victim = inner, victim

    def iter_patient_ids(self):
        return self.inner.iter_patient_ids()

    def patient_resources(self, patient_id: str) -> PatientRecord:
        record = self.inner.patient_resources(patient_id)
        if patient_id == self.victim:
            record.resources = [
                r for r in record.resources if r.get("resourceType") != "MedicationAdministration"
            ]
            record.missing_types["MedicationAdministration"] = "search failed: HTTP 503"
        return record

    def iter_patient_records(self):
        for pid in self.iter_patient_ids():
            yield self.patient_resources(pid)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "html"])
def test_an_incomplete_patient_makes_the_run_incomplete_in_every_format(ward, tmp_path, monkeypatch, fmt):
    import connectors
    from connectors import open_source

    inner = open_source(ward)
    key = json.loads((ward / "answer_key.json").read_text())
    victim = next(
        e["patient"].split("/", 1)[1] for e in key["expected"] if e["rule"] == "order-not-administered"
    )
    monkeypatch.setattr(connectors, "open_source", lambda spec, **kw: _GappySource(inner, victim))
    out = tmp_path / f"audit.{fmt}"
    rc, text = run_cli("gappy", "--out", str(out), "--now", ANCHOR.isoformat())
    assert rc == 3
    assert text.startswith("INCOMPLETE: audited 25 patients")
    assert "order-not-administered" in text and "MedicationAdministration" in text
    body = out.read_text()
    if fmt == "jsonl":
        status = read_status(out)
        assert status and not status["complete"] and status["incomplete_patients"] == 1
        assert "order-not-administered" in status["not_judged_rules"]
        found = read_findings(out)
        assert (f"Patient/{victim}", "order-not-administered") not in {
            (f["patient"], f["rule_id"]) for f in found
        }
    elif fmt == "csv":
        assert body.startswith("# INCOMPLETE AUDIT:")
    else:
        assert "class='incomplete'" in body and "INCOMPLETE AUDIT" in body
        assert "25 patients" in body


def test_stale_data_names_the_judged_time_and_the_newest_data():
    chart = _chart(_med("Warfarin 5 mg"), _obs("6301-6", 2.2, "{INR}", 400))
    note = stale_data(chart, NOW)
    assert note is not None and note.newest_data is not None
    assert note.text.startswith("judged at 2025-06-01 12:00 UTC; newest data 2025-05-01 09:00 UTC")
    assert "inr-supratherapeutic-warfarin" in note.rules  # its 48 h window holds no data
    assert "pincer-warfarin-no-inr-12-weeks" not in note.rules  # 12 weeks reach the prescription
    fresh = _chart(_med("Warfarin 5 mg"), _obs("6301-6", 2.2, "{INR}", 0.01))
    assert (
        stale_data(fresh, NOW) is None or "inr-supratherapeutic-warfarin" not in stale_data(fresh, NOW).rules
    )


@pytest.mark.parametrize(
    ("server_kw", "missing"),
    [
        ({"unserved_types": ["MedicationAdministration"]}, "MedicationAdministration"),
        ({"export_expired": ["Observation"]}, "Observation"),
    ],
)
def test_a_server_that_serves_fewer_types_gives_an_incomplete_audit_that_says_what_was_not_judged(
    ward, tmp_path, server_kw, missing
):
    from tests import fhir_test_server as server_mod

    with server_mod.FhirTestServer(ward, export_polls=1, export_retry_after=0, **server_kw) as server:
        jsonl, html = tmp_path / "a.jsonl", tmp_path / "a.html"
        rc, text = run_cli(server.base_url, "--out", str(jsonl), "--now", ANCHOR.isoformat())
        rc_html, text_html = run_cli(server.base_url, "--out", str(html), "--now", ANCHOR.isoformat())
    assert rc == rc_html == 3, text
    assert text.startswith("INCOMPLETE: audited 25 patients") and missing in text
    status = read_status(jsonl)
    assert status is not None and missing in status["missing_types"]
    cat = default_catalogue()
    assert set(status["not_judged_rules"]) == set(not_judged_rules(cat, {missing}))
    found = {f["rule_id"] for f in read_findings(jsonl)}
    assert not found & set(status["not_judged_rules"])  # nothing judged on the absence of a type never read
    page = html.read_text()
    assert "INCOMPLETE AUDIT" in page and missing in page
    assert "25 patients" in page  # the header agrees with stdout


def test_a_type_no_rule_reads_is_said_but_does_not_make_the_audit_incomplete(ward, tmp_path):
    """A server without Flag (isolation, read by no rule) still gives a complete audit; with a rule's type also
    missing, only that type is the gap."""
    from tests import fhir_test_server as server_mod

    runs = {}
    for name, unserved in (("flag", ["Flag"]), ("both", ["Flag", "MedicationAdministration"])):
        with server_mod.FhirTestServer(
            ward, export_polls=1, export_retry_after=0, unserved_types=unserved
        ) as srv:
            jsonl = tmp_path / f"{name}.jsonl"
            rc, text = run_cli(srv.base_url, "--out", str(jsonl), "--now", ANCHOR.isoformat())
        runs[name] = (rc, text, read_status(jsonl), read_findings(jsonl))
    rc, text, status, _ = runs["flag"]
    assert rc == 0 and not text.startswith("INCOMPLETE"), text
    assert status is None  # a complete run writes no run-status line
    assert "Flag not retrieved" in text and "no audit rule reads it" in text  # said on the command line
    rc, text, status, _ = runs["both"]
    assert rc == 3 and set(status["missing_types"]) == {"MedicationAdministration"}, text
    assert "Flag" not in status["banner"]
    # the verdicts with and without Flag are the same where every type a rule reads was served
    assert {f["rule_id"] for f in runs["flag"][3]} >= {f["rule_id"] for f in runs["both"][3]}


def test_period_parsing_and_its_typed_errors(ward, tmp_path, capsys):
    from assistant.audit.cli import parse_period

    assert parse_period("2026-02-01/2026-02-28") == (
        datetime(2026, 2, 1, tzinfo=UTC),
        datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=UTC),  # a date END includes its whole day
    )
    assert parse_period("/2026-02-28T08:00:00+01:00")[1] == datetime(2026, 2, 28, 7, tzinfo=UTC)
    assert parse_period("/") == (None, None)
    out = tmp_path / "x.jsonl"
    for bad, says in (
        (["--period", "2026-03-02/2026-03-01"], "not after the start"),
        (["--period", "yesterday"], "START/END"),
        (["--period", "2026-13-01/"], "not an ISO date"),
        (["--period", "/", "--now", ANCHOR.isoformat()], "exclude each other"),
    ):
        rc, _ = run_cli(str(ward), "--out", str(out), *bad)
        assert rc == 2 and says in capsys.readouterr().err

"""The core view model: header, NEWS2 bands from data, holds on every dose surface, one pending window, delta, acuity."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from assistant import views
from assistant.model import Administration, AllergyFact, Chart, Demographics, Note, Quantity, Result
from assistant.rules.news2 import news2_table
from assistant.summary.facts import vocabulary
from tests.test_summary_support import NOW, high_k_finding, k_result, make_chart, medium_finding

REPO = Path(__file__).resolve().parent.parent
LOCAL_NOW = NOW.astimezone(timezone(timedelta(hours=2)))  # frozen, not UTC


def _view(chart: Chart | None = None, findings: list | None = None, **kw) -> views.PatientView:
    chart = chart or make_chart()
    return views.build_patient_view(
        chart, NOW, findings if findings is not None else [high_k_finding()], **kw
    )


def test_news2_band_ranges_come_from_news2_yaml() -> None:
    ranges = views.news2_band_ranges()
    mins = sorted({int(r["min_total"]) for r in news2_table()["responses"] if "min_total" in r})
    assert [lo for _, _, lo, _ in ranges] == [m for m in mins if m in {lo for _, _, lo, _ in ranges}]
    assert [(b, lo, hi) for b, _, lo, hi in ranges] == [("low", 0, 4), ("medium", 5, 6), ("high", 7, None)]
    assert all(label for _, label, _, _ in ranges)


def test_header_allergy_wording_and_code_status_from_loinc() -> None:
    chart = make_chart()
    status, text, lines = views.allergy_banner(chart)
    assert (
        status == "active"
        and text.startswith("ALLERGIES: Penicillin")
        and lines[0].ref == "AllergyIntolerance/a1"
    )
    none = make_chart(allergies=False)
    assert views.allergy_banner(none)[:2] == ("not-recorded", views.ALLERGY_UNKNOWN_TEXT)
    none.allergies = [
        AllergyFact(
            "AllergyIntolerance/nka",
            "No known allergy",
            (),
            (),
            "active",
            "confirmed",
            None,
            no_known_allergy=True,
        )
    ]
    assert views.allergy_banner(none)[:2] == ("nka", views.ALLERGY_NKA_TEXT)
    # Code status: the latest Observation coded LOINC 100822-6, whatever its display text says.
    code = "100822-6"  # LOINC Cardiopulmonary resuscitation orders (assistant/data/fhir_codes.toml)
    older = Result(
        "Observation/cs1",
        "text:cpr",
        "Resuscitation orders",
        "survey",
        NOW - timedelta(days=2),
        "final",
        loinc=code,
        value_text="Full code",
    )
    newer = replace(
        older, ref="Observation/cs2", time=NOW - timedelta(hours=3), value_text="Do not attempt resuscitation"
    )
    keyword_only = Result(
        "Observation/x", "text:dnr", "DNR discussed", "survey", NOW, "final", value_text="DNR"
    )
    chart.results += [older, newer, keyword_only]
    head = views.build_patient_view(chart, NOW, []).header
    assert head.code_status == views.CodeStatus("Do not attempt resuscitation", "Observation/cs2", newer.time)
    assert head.name == "Test Patient" and head.bed == "bed 12" and head.age == 74
    assert views.chart_code_status(make_chart()) is None  # a keyword in a name is not a code status


def test_holds_reach_mar_due_doses_and_pending() -> None:
    chart = make_chart()
    view = _view(chart, [high_k_finding(), medium_finding()])
    flag = high_k_finding()
    assert set(view.holds) == {
        "MedicationRequest/m1"
    }  # "Hold the potassium chloride dose"; not the INR review
    kcl = [e for e in view.mar if e.order_ref == "MedicationRequest/m1"]
    assert kcl and all(e.hold == (e.state in ("due", "late")) for e in kcl)
    assert all(e.hold_text == f"HOLD — see flag: {flag.title}" for e in kcl if e.hold)
    assert not any(e.hold for e in view.mar if e.order_ref != "MedicationRequest/m1")
    late = [d for d in view.do_now if d.order_ref == "MedicationRequest/m1"]
    assert late and late[0].hold and late[0].hold_flags == (flag.title,) and view.do_now[0].hold
    doses = [p for p in view.pending if p.kind in ("due", "overdue")]
    assert (
        doses[0].hold and doses[0].text.startswith("HOLD — see flag") and not any(p.hold for p in doses[1:])
    )
    assert str(doses[0]) == doses[0].text


def test_one_pending_window_from_vocabulary() -> None:
    window = timedelta(hours=float(vocabulary()["administration"]["due_window_hours"]))
    assert views.pending_window() == window
    chart = make_chart()
    order = chart.orders[2]  # furosemide twice daily, last given 10 h ago -> due 2 h from now
    due = [p for p in views.pending_items(chart, NOW) if "Furosemide" in p.text]
    assert due and due[0].time <= NOW + window
    # Last given so that the next dose falls 5 minutes beyond the window: not pending yet.
    last = NOW - timedelta(hours=12) + window + timedelta(minutes=5)
    chart.administrations = [
        replace(a, time=last) if a.order_ref == order.ref else a for a in chart.administrations
    ]
    assert not [p for p in views.pending_items(chart, NOW) if "Furosemide" in p.text and p.kind == "due"]
    source = (REPO / "dashboard" / "services.py").read_text(encoding="utf-8")
    assert "timedelta(hours=4)" not in source and "due_window" not in source


def test_do_now_is_late_doses_and_those_due_within_the_hour() -> None:
    within = timedelta(hours=float(views.acuity_table()["do_now_hours"]))
    view = _view()
    assert view.do_now and all(d.state == "late" or d.time <= NOW + within for d in view.do_now)
    soon = {
        e.order_ref for e in view.mar if e.state == "late" or (e.state == "due" and e.time <= NOW + within)
    }
    assert {d.order_ref for d in view.do_now} == soon


def test_refusal_is_told_apart_from_a_hold() -> None:
    chart = make_chart()
    base = chart.administrations[1]
    chart.administrations += [
        replace(
            base,
            ref="MedicationAdministration/r1",
            status="not-done",
            status_reason="Patient refused",
            time=NOW - timedelta(hours=2),
        ),
        replace(
            base,
            ref="MedicationAdministration/h1",
            status="not-done",
            status_reason="Held for low BP",
            time=NOW - timedelta(hours=1),
        ),
    ]
    states = {e.ref: e.state for e in views.mar_events(chart, NOW)}
    assert (
        states["MedicationAdministration/r1"] == "refused" and states["MedicationAdministration/h1"] == "held"
    )
    assert states["MedicationAdministration/ma2"] == "given"


def test_shift_delta_lists_what_changed_since_a_chosen_time() -> None:
    chart = make_chart()
    since = NOW - timedelta(hours=12)
    chart.notes.append(Note("DocumentReference/old", NOW - timedelta(hours=20), "Old note", "x"))
    chart.administrations.append(
        Administration(
            "MedicationAdministration/r1",
            "not-done",
            "Warfarin 5 mg",
            ("warfarin",),
            (),
            "MedicationRequest/m2",
            NOW - timedelta(hours=1),
            Quantity(5, "mg"),
            "Patient refused",
        )
    )
    chart.orders[2] = replace(chart.orders[2], status="stopped", end=NOW - timedelta(hours=4))
    delta = views.patient_delta(chart, LOCAL_NOW, since.astimezone(LOCAL_NOW.tzinfo))
    kinds = {i.kind: i for i in delta.items}
    assert (
        kinds["result-changed"].refs == ("Observation/k2", "Observation/k1")
        and "was 5.2" in kinds["result-changed"].text
    )
    assert kinds["result-new"].refs == ("Observation/inr1",)
    assert kinds["order-started"].refs == (
        "MedicationRequest/m2",
    )  # warfarin started 6 h ago; KCl 2 days ago is not new
    assert kinds["order-stopped"].refs == ("MedicationRequest/m3",)
    assert kinds["dose-given"].refs == ("MedicationAdministration/ma2",)
    assert kinds["dose-refused"].refs == ("MedicationAdministration/r1",)
    assert kinds["note"].refs == ("DocumentReference/n1",)
    assert "DocumentReference/old" not in {r for i in delta.items for r in i.refs}
    assert [i.time for i in delta.items] == sorted((i.time for i in delta.items), reverse=True)
    # screens show words, not the kind keys ("dose-refused" was shown as the label)
    assert kinds["dose-refused"].label == "Dose refused" and kinds["result-new"].label == "New result"
    from assistant.summary.cli import DELTA_WORDS

    assert set(views.DELTA_LABELS) == set(DELTA_WORDS)  # every kind has a word on each surface
    # A shorter look-back shows less; the default is acuity.toml's delta_hours.
    short = views.patient_delta(chart, NOW, NOW - timedelta(hours=2))
    assert {i.kind for i in short.items} < set(kinds)
    assert views.default_since(NOW) == NOW - timedelta(hours=float(views.acuity_table()["delta_hours"]))


def _vitals(chart: Chart, when: datetime, rr: float, spo2: float = 97, hr: float = 80) -> None:
    def vital(key: str, name: str, value: float, unit: str) -> Result:
        return Result(
            f"Observation/{key}-{when:%H%M}", key, name, "vital-signs", when, "final", value=value, unit=unit
        )

    chart.results += [
        vital("respiratory_rate", "Respiratory rate", rr, "/min"),
        vital("spo2", "SpO2", spo2, "%"),
        vital("heart_rate", "Heart rate", hr, "/min"),
    ]


def test_news2_change_in_header_and_delta() -> None:
    chart = make_chart()
    _vitals(chart, NOW - timedelta(hours=20), rr=16)
    _vitals(chart, NOW - timedelta(hours=1), rr=26)  # 3 points: a single parameter scoring 3
    view = views.build_patient_view(chart, NOW, [])
    head = view.header.news2
    assert head.total == 3 and head.band == "low-medium" and head.change == 3 and head.trend == "up"
    assert head.incomplete and "Temperature" in head.missing and "Temperature" in view.quality.banner
    assert view.delta.news2_before == 0 and view.delta.news2_now == 3 and view.delta.news2_change == 3
    (item,) = [i for i in view.delta.items if i.kind == "news2"]
    assert item.text == "NEWS2 3 (was 0)" and "Observation/respiratory_rate-0600" in item.refs


def test_acuity_puts_flags_and_news2_bands_together() -> None:
    def news(total: int, band: str) -> views.News2Now:
        return views.News2Now(total, band, band, "")

    high_flag = [high_k_finding()]
    low_news_no_flag = views.acuity([], news(1, "low"))
    k_on_kcl = views.acuity(high_flag, news(0, "low"))
    news_medium = views.acuity([], news(5, "medium"))
    news_high = views.acuity([], news(8, "high"))
    single_3 = views.acuity([], news(3, "low-medium"))
    medium_flag = views.acuity([medium_finding()], news(0, "low"))
    failed = views.acuity([], None, failed=True)
    ordered = sorted(
        [low_news_no_flag, k_on_kcl, news_medium, news_high, single_3, medium_flag, failed],
        key=lambda a: a.key,
    )
    assert ordered[0] is failed and ordered[1] is news_high
    assert k_on_kcl.tier == news_medium.tier and k_on_kcl.key < news_medium.key  # tie-break: high flags first
    assert single_3.tier == medium_flag.tier > k_on_kcl.tier
    assert ordered[-1] is low_news_no_flag and "high-severity flag" in k_on_kcl.reasons[0]
    two = views.acuity(high_flag * 2, news(0, "low"))
    assert two.key < k_on_kcl.key
    beds = sorted([views.acuity([], news(0, "low"), bed=b) for b in ("bed 10", "bed 2")], key=lambda a: a.key)
    assert beds[0].key[-1] == views.bed_sort_key("bed 2")


def test_acuity_counts_the_news2_band_once_not_again_as_its_own_flag(demo_ward_dir, demo_anchor) -> None:
    """NEWS2 >= 5 raises an escalation flag; the acuity reasons and tie-break count the band, not that flag too."""
    from assistant.pipeline import news2_flags
    from connectors.bundle_dir import BundleDirSource

    source = BundleDirSource(demo_ward_dir)
    seen = 0
    for pid in sorted(source.iter_patient_ids()):
        chart = source.patient_chart(pid)
        flags = news2_flags(chart, demo_anchor)
        if not any(f.severity == "high" for f in flags):
            continue
        seen += 1
        score = views.build_patient_view(chart, demo_anchor, []).header.news2
        got = views.acuity(flags, score)
        assert any(r.startswith(f"NEWS2 {score.total}") for r in got.reasons), got.reasons
        assert not any("high-severity flag" in r for r in got.reasons), got.reasons
        # in the order NEWS2 >= 5 still weighs like a high flag: before a NEWS2-0 patient with one high flag
        assert got.key < views.acuity([high_k_finding()], views.News2Now(0, "low", "low", "")).key
    assert seen >= 1  # the demo ward has a patient with NEWS2 >= 5


def test_census_row_and_ward_view_follow_acuity() -> None:
    a = _view(make_chart(), [high_k_finding(), medium_finding()])
    quiet_chart = make_chart()
    quiet_chart.patient = Demographics("Patient/p2", "Quiet Patient", date(1960, 1, 1), "male", None)
    b = _view(quiet_chart, [])
    rows = [views.census_row(v) for v in views.sort_by_acuity([b, a])]
    assert [r.name for r in rows] == ["Test Patient", "Quiet Patient"]
    top = rows[0]
    assert [x.severity for x in top.badges] == ["high", "medium"] and top.holds == [
        "Potassium chloride 20 mEq PO"
    ]
    assert top.due_next_hour and top.due_next_hour[0].hold and top.new_results >= 1
    delta = views.ward_delta([b, a], NOW - timedelta(hours=12), NOW)
    assert [d.name for d in delta.patients] == ["Test Patient", "Quiet Patient"]


def test_labs_carry_latest_previous_and_trend() -> None:
    chart = make_chart()
    chart.results.append(k_result("k0", 4.8, NOW - timedelta(days=2), None))
    rows = {r.analyte: r for r in views.lab_rows(chart, NOW)}
    k = rows["potassium"]
    assert (
        k.ref == "Observation/k2"
        and k.previous == "5.2 mmol/L"
        and k.trend == "up"
        and k.change == pytest.approx(1.2)
    )
    assert [p[2] for p in k.points] == ["Observation/k0", "Observation/k1", "Observation/k2"]
    assert rows["inr"].trend == "" and "magnesium" not in rows  # a registered result has no value yet


def test_dashboard_services_hold_no_clinical_decision() -> None:
    source = (REPO / "dashboard" / "services.py").read_text(encoding="utf-8")
    for banned in (
        "_optional(",
        "dnacpr",
        '"dnr"',
        "news2_from_score",
        "SEVERITY_ORDER",
        "interval_hours",
        "csv.DictWriter",
    ):
        assert banned not in source, banned


def test_quality_banner_names_what_was_not_loaded() -> None:
    chart = make_chart()
    assert not views.data_quality(chart).incomplete and views.data_quality(chart).banner == ""
    chart.missing_types = {"MedicationAdministration": "the server returned 503"}
    quality = views.data_quality(chart)
    assert quality.incomplete and "MedicationAdministration (the server returned 503)" in quality.banner
    assert views.build_patient_view(chart, NOW, []).acuity.tier == 0  # an incomplete chart is checked first


def test_which_catalogue_actions_put_a_drug_on_hold() -> None:
    from assistant.rules.engine import default_catalogue

    actions = {r.id: r for r in default_catalogue().rules}

    def holds(rule_id: str) -> bool:
        rule = actions[rule_id]
        return views.says_hold(replace(high_k_finding(), rule_id=rule.id, action=rule.action))

    # "Do not give" / "Hold the ..." stop the dose; "tell the prescriber before the next dose" or "give only one"
    # do not by themselves.
    assert holds("hyperkalemia-k-raising-drug") and holds("allergy-order-conflict")
    assert holds("inr-supratherapeutic-warfarin")
    assert not holds("hypokalemia-digoxin") and not holds("duplicate-therapy")
    assert not views.says_hold(
        replace(high_k_finding(), action="Check the threshold and the household supply")
    )

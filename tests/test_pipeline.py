"""One pipeline: CLI and dashboard handoffs identical, NEWS2 flags, acuity order, holds first, one guideline policy."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from assistant import pipeline
from assistant.rules.news2 import news2
from assistant.views import acuity_table, says_hold

WARD = "Location/ward-4b"
LOCAL = timezone(timedelta(hours=-5), "EST")  # a non-UTC clock: every comparison must be by instant


@pytest.fixture(scope="module")
def ward(demo_ward_dir: Path, demo_anchor: datetime) -> Any:
    from connectors import open_source

    now = demo_anchor.astimezone(LOCAL)
    with open_source(demo_ward_dir) as src:
        return pipeline.ward_view(src, WARD, now, ward_name="4B Med-Surg", with_handoff=True)


def _cli(*argv: str) -> str:
    from assistant.cli import main

    out = io.StringIO()
    assert main(list(argv), out=out) == 0
    return out.getvalue()


def _strip_latency(data: dict) -> dict:
    for p in data["patients"]:
        p.pop("latency_s", None)
    return data


def test_cli_and_dashboard_produce_identical_handoffs(
    demo_ward_dir: Path, demo_anchor: datetime, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("streamlit")
    from assistant.summary.handoff import handoff_markdown
    from dashboard import services

    when = demo_anchor.astimezone(LOCAL).isoformat()
    args = ("handoff", str(demo_ward_dir), "--ward", "4B Med-Surg", "--backend", "none", "--now", when)
    cli_md = _cli(*args, "--format", "md")
    cli_json = json.loads(_cli(*args, "--format", "json"))

    monkeypatch.setattr(services.st, "session_state", {})  # a fresh session without a Streamlit runtime
    monkeypatch.setenv("NVA_SOURCE", str(demo_ward_dir))
    monkeypatch.setenv("NVA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NVA_SECRETS_FILE", str(tmp_path / "none.toml"))
    cfg = services.app_config()
    assert cfg.rules_now() == demo_anchor  # the demo anchor: the same instant the CLI was given
    doc = services.ward_handoff_document(cfg, WARD)
    assert handoff_markdown(doc) == cli_md
    dash_json = json.loads(json.dumps(doc.to_dict()))
    assert _strip_latency(dash_json) == _strip_latency(cli_json)
    # The handoff page's rows are in the same (acuity) order as the document.
    rows = services.ward_handoff(cfg, WARD)
    assert [f"Patient/{r.patient_id}" for r in rows] == [p["patient"] for p in cli_json["patients"]]
    assert len(cli_json["patients"]) >= 20 and cli_md.count("## ") == len(cli_json["patients"])
    # The census and its shift delta come from the same views, in the same order.
    census = services.ward_view(cfg, WARD)
    assert [r.patient_ref for r in census.rows] == [p["patient"] for p in cli_json["patients"]]
    delta = services.ward_delta(cfg, WARD, cfg.rules_now() - timedelta(hours=3))
    assert [d.patient_ref for d in delta.patients] == [r.patient_ref for r in census.rows]
    assert delta.since == cfg.rules_now() - timedelta(hours=3)


def test_cli_summarize_is_the_pipeline_summary(demo_ward_dir: Path, demo_anchor: datetime, ward: Any) -> None:
    pid = ward.rows[0].patient_id
    data = json.loads(
        _cli(
            "summarize",
            str(demo_ward_dir),
            "--patient",
            pid,
            "--backend",
            "none",
            "--format",
            "json",
            "--now",
            demo_anchor.isoformat(),
        )
    )
    view = ward.patients[pid]
    expected = pipeline.summary_for(view, include_flags=True).to_dict()
    assert {f.title for f in view.findings if f.severity == "high"} <= {
        f["label"] for f in expected["facts"]["facts"] if f["kind"] == "flag"
    }
    assert [s["text"] for s in data["sentences"]] == [s["text"] for s in expected["sentences"]]
    assert data["sentences"] and all(s["verified"] for s in data["sentences"])


def test_news2_flags_carry_the_rcp_response(ward: Any) -> None:
    specs = {s["band"]: s for s in acuity_table()["news2_flags"]}
    seen = set()
    for view in ward.patients.values():
        score = news2(view.chart, now=view.now)
        flags = [f for f in view.findings if f.category == "early-warning"]
        if not score.parameters or score.band not in specs:
            assert not flags, view.header.name
            continue
        seen.add(score.band)
        (flag,) = flags
        assert flag.action == score.response and flag.severity == specs[score.band]["severity"]
        assert flag.rule_id == specs[score.band]["rule_id"]
        if score.band == "low-medium":  # the flag rests on the parameter that scored 3
            threes = {p.ref for p in score.parameters if p.points >= 3}
            assert set(flag.evidence) == threes
        else:
            assert set(flag.evidence) == set(score.evidence) and score.total >= 5
    assert {"high", "medium", "low-medium"} <= seen, "the demo ward has every escalation band"


def test_acuity_is_one_order_for_census_and_handoff(ward: Any) -> None:
    order = [r.patient_ref for r in ward.rows]
    assert [p.patient for p in ward.handoff.patients] == order
    tiers = [r.acuity.tier for r in ward.rows]
    assert tiers == sorted(tiers)
    # Every patient with a high-severity flag ranks above every patient whose only concern is a low NEWS2.
    high = [i for i, r in enumerate(ward.rows) if any(b.severity == "high" for b in r.badges)]
    quiet = [i for i, r in enumerate(ward.rows) if not r.badges and r.news2_band in ("low", "")]
    assert high and quiet and max(high) < min(quiet)
    # NEWS2 bands sit with flags: the emergency band first, medium NEWS2 with the high-severity flags.
    first = ward.rows[0]
    assert first.news2_band == "high"
    medium = next(r for r in ward.rows if r.news2_band == "medium")
    one_high = [r for r in ward.rows if r.news2_band == "low" and any(b.severity == "high" for b in r.badges)]
    assert one_high and all(r.acuity.tier == medium.acuity.tier for r in one_high)


def test_do_not_give_comes_before_dose_reminders(ward: Any) -> None:
    checked = 0
    for entry in ward.handoff.patients:
        view = ward.patients[entry.patient.split("/", 1)[1]]
        actions = [s.text for s in entry.sections["action"]]
        stops = [
            i
            for i, t in enumerate(actions)
            if any(t.startswith(f.action.rstrip(".")) for f in view.findings if says_hold(f))
        ]
        doses = [i for i, t in enumerate(actions) if "Dose due" in t or "Overdue dose" in t]
        if stops and doses:
            checked += 1
            assert max(stops) < min(doses), actions
        for ref, flags in view.holds.items():
            label = next(o.text for o in view.chart.orders if o.ref == ref)
            for t in actions:
                if label in t and ("Dose due" in t or "Overdue dose" in t):
                    assert t.startswith("HOLD — see flag: ") and flags[0].title in t
    assert checked >= 3


def test_holds_mark_every_dose_surface(ward: Any) -> None:
    held = [v for v in ward.patients.values() if v.holds]
    assert len(held) >= 5
    for view in held:
        for e in view.mar:
            assert e.hold == (e.order_ref in view.holds and e.state in ("due", "late"))
        for d in view.do_now:
            assert d.hold == (d.order_ref in view.holds) and (
                d.hold_text.startswith("HOLD — see flag") or not d.hold
            )
        marks = [p.hold for p in view.pending if p.kind in ("due", "overdue")]
        assert marks == sorted(marks, reverse=True), "held doses are listed first"
    row = next(r for r in ward.rows if r.holds)
    assert all(h in {o.text for o in ward.patients[row.patient_id].chart.orders} for h in row.holds)


def test_the_summary_marks_held_doses_too(ward: Any) -> None:
    """The cited summary is a dose surface as well: a due or overdue dose of a drug a flag says not to give reads
    HOLD — see flag first, shown or in the +N overflow; no other dose sentence carries the mark."""
    marked = 0
    for view in ward.patients.values():
        res = pipeline.summary_for(view, None)
        facts = {f.tag: f for f in res.facts.facts}
        for s in [*res.sentences, *res.overflow]:
            doses = [
                facts[t]
                for t in s.tags
                if facts[t].kind == "administration" and facts[t].severity in ("due", "overdue")
            ]
            if not doses:
                assert "HOLD — see flag" not in s.text
                continue
            held = any(f.provenance[0] in view.holds for f in doses)
            assert s.text.startswith("HOLD — see flag") == held, s.text
            marked += held
    assert marked >= 5


class _Retriever:
    def __init__(self, empty_for_docs: bool = False) -> None:
        self.calls: list[dict] = []
        self.empty_for_docs = empty_for_docs

    def search(self, query: str, k: int, rule_ids: list[str] | None = None, doc_ids: list[str] | None = None):
        self.calls.append({"query": query, "k": k, "rule_ids": rule_ids, "doc_ids": doc_ids})
        if self.empty_for_docs and doc_ids:
            return []
        from types import SimpleNamespace

        return [SimpleNamespace(citation=f"guideline:{rule_ids[0]}", title="t", section_path="", text="x")]


def test_one_guideline_query_policy(ward: Any) -> None:
    view = max(ward.patients.values(), key=lambda v: len(v.findings))
    fake = _Retriever()
    hits = pipeline.guideline_passages(view.findings, fake)
    top = sorted(view.findings, key=lambda f: f.sort_key)[: pipeline.GUIDELINE_FINDINGS]
    assert [c["query"] for c in fake.calls] == [f"{f.title}. {f.action}" for f in top]
    assert [c["rule_ids"] for c in fake.calls] == [[f.rule_id] for f in top]
    assert len(hits) == len({f.rule_id for f in top})
    fallback = _Retriever(empty_for_docs=True)
    linked = (
        next(f for f in view.findings if f.guideline_ids)
        if any(f.guideline_ids for f in view.findings)
        else None
    )
    if linked is not None:
        assert pipeline.passages_for_finding(fallback, linked)
        assert fallback.calls[-1]["doc_ids"] is None
    assert pipeline.guideline_passages(view.findings, None) == []


def test_failed_chart_ranks_first_and_is_reported(demo_anchor: datetime) -> None:
    from connectors.errors import FhirError

    class Source:
        def patient_chart(self, pid: str) -> Any:
            raise FhirError("unreadable bundle")

    view = pipeline.load_patient_view(Source(), "x1", demo_anchor)
    assert view.error and view.acuity.tier == 0 and view.chart is None
    doc = pipeline.ward_handoff([view], ward="4B", now=demo_anchor)
    assert doc.errors == ["Patient/x1: FhirError"] and not doc.patients


def test_a_local_clock_gives_the_same_instant_stated_in_utc(ward: Any, demo_anchor: datetime) -> None:
    assert ward.now == demo_anchor and ward.now.utcoffset() == timedelta(0)
    assert ward.handoff.to_dict()["now"] == demo_anchor.astimezone(UTC).isoformat()
    assert all(v.now.utcoffset() == timedelta(0) for v in ward.patients.values())
    with pytest.raises(ValueError, match="timezone-aware"):
        pipeline.as_utc(demo_anchor.replace(tzinfo=None))


def test_ward_delta_follows_the_chosen_look_back(ward: Any, demo_ward_dir: Path) -> None:
    from connectors import open_source

    since = ward.now - timedelta(hours=2)
    with open_source(demo_ward_dir) as src:
        short = pipeline.ward_view(src, WARD, ward.now, since=since, views=list(ward.patients.values()))
    assert short.since == since and short.delta.since == since
    assert [d.patient_ref for d in short.delta.patients] == [r.patient_ref for r in short.rows]
    default = {d.patient_ref: d for d in ward.delta.patients}
    for d, row in zip(short.delta.patients, short.rows, strict=True):
        assert all(since < i.time <= ward.now for i in d.items if i.kind != "news2")
        assert {i.refs for i in d.items if i.kind != "news2"} <= {
            i.refs for i in default[d.patient_ref].items if i.kind != "news2"
        }
        assert row.new_results == d.count("result-new", "result-changed")
    assert sum(len(d.items) for d in short.delta.patients) < sum(len(d.items) for d in ward.delta.patients)
    view = next(iter(ward.patients.values()))
    assert pipeline.patient_delta(view).since == ward.since
    assert pipeline.patient_delta(view, since).items == next(
        d.items for d in short.delta.patients if d.patient_ref == view.patient_ref
    )


def test_nva_census_prints_the_ward_view(demo_ward_dir: Path, ward: Any) -> None:
    when = ward.now.astimezone(LOCAL).isoformat()
    base = ("census", str(demo_ward_dir), "--ward", "4B Med-Surg", "--now", when)
    data = json.loads(_cli(*base, "--format", "json"))
    assert [r["patient_ref"] for r in data["rows"]] == [r.patient_ref for r in ward.rows]
    assert data["since"] == ward.since.isoformat() and data["now"] == ward.now.isoformat()
    assert [r["acuity"]["tier"] for r in data["rows"]] == [r.acuity.tier for r in ward.rows]
    text = _cli(*base)
    held = next(r for r in ward.rows if any(d.hold for d in r.due_next_hour))
    line = next(t for t in text.splitlines() if held.due_next_hour[0].label in t and "HOLD" in t)
    assert held.due_next_hour[0].hold_text in line
    first = ward.delta.patients[0]
    block = text.split(first.patient_ref, 1)[1].split("\nbed ", 1)[0]
    if first.news2_change:
        assert f"NEWS2 {first.news2_before} -> {first.news2_now}" in block
    assert first.count("dose-given") == 0 or f"{first.count('dose-given')} dose(s) given" in block
    short = json.loads(
        _cli(*base, "--format", "json", "--since", (ward.now - timedelta(hours=1)).isoformat())
    )
    assert sum(r["new_results"] for r in short["rows"]) < sum(r.new_results for r in ward.rows)


def test_dashboard_summary_uses_the_one_guideline_policy(ward: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("streamlit")
    from dashboard import services

    view = max(ward.patients.values(), key=lambda v: len(v.findings))
    fake = _Retriever()
    monkeypatch.setattr(services, "summary_retriever", lambda: fake)
    ignored = [services.Passage("guideline:elsewhere", "Other", "", "text")]
    result = services.compose_summary_stream(None, view, ignored, use_llm=False).collect()
    cited = {ref for f in result.facts.facts if f.kind == "guideline" for ref in f.provenance}
    expected = {h.citation for h in pipeline.guideline_passages(view.findings, _Retriever())}
    # The fact sheet may keep fewer (max_facts), never others; the page's own list is not used.
    assert cited and cited <= expected and "guideline:elsewhere" not in cited


def test_a_historical_chart_says_when_it_was_judged_and_how_old_its_newest_data_is() -> None:
    """Issue 14.4 on the patient view: a chart whose newest data is months older than the judged time says so."""
    import tempfile
    from datetime import timedelta

    from assistant.demo_ward import generate_demo_ward
    from assistant.pipeline import patient_view
    from connectors import open_source

    anchor = datetime(2025, 1, 6, 7, 0, tzinfo=UTC)
    out = Path(tempfile.mkdtemp()) / "ward"
    generate_demo_ward(out, anchor=anchor, seed=7)
    with open_source(out) as src:
        pid = next(iter(src.iter_patient_ids()))
        chart = src.patient_chart(pid)
    assert not any("newest data" in n for n in patient_view(chart, anchor).notices)
    later = anchor + timedelta(days=90)
    notes = [n for n in patient_view(chart, later).notices if "newest data" in n]
    assert len(notes) == 1 and notes[0].startswith(f"judged at {later:%Y-%m-%d %H:%M}")

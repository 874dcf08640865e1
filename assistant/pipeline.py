"""One pipeline from chart to screen: flags, NEWS2 flags, views, summary and I-PASS, one guideline-query policy."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from assistant.model import EvidenceValue, Finding
from assistant.rules.engine import stale_data
from assistant.rules.news2 import NEWS2_FLAG_CATEGORY, News2Score, news2, news2_table
from assistant.summary.facts import News2, news2_from_rules
from assistant.views import (
    PatientView,
    WardView,
    acuity_table,
    build_patient_view,
    census_row,
    default_since,
    delta_since,
    failed_view,
    hold_map,
    hold_text,
    sort_by_acuity,
    ward_delta,
)

log = logging.getLogger(__name__)

NEWS2_SOURCE = (
    "Royal College of Physicians. National Early Warning Score (NEWS) 2 (2017), Chart 2: clinical response - "
    "https://www.rcp.ac.uk/improving-care/resources/national-early-warning-score-news-2/"
)
GUIDELINE_FINDINGS = 3  # passages for at most this many flags, most severe first
GUIDELINE_K = 1  # passages per flag


def as_utc(now: datetime) -> datetime:
    """Every view, summary and handoff is stated in UTC, whatever zone the caller's clock is in."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    return now.astimezone(UTC)


# --- flags ----------------------------------------------------------------------------------------------------
def news2_flags(chart: Any, now: datetime, score: News2Score | None = None) -> list[Finding]:
    """NEWS2 >= 5 and any single parameter scoring 3 as flags whose action is the RCP response (acuity.toml)."""
    score = score if score is not None else news2(chart, now=now)
    if not score.parameters:
        return []
    spec = next((s for s in acuity_table()["news2_flags"] if s["band"] == score.band), None)
    if spec is None:
        return []
    values = tuple(
        EvidenceValue(f"{p.label} ({p.points} point{'s' if p.points != 1 else ''})", p.ref, p.value, p.time)
        for p in score.parameters
        if p.points
    )
    # The single-parameter threshold of the low-medium band is news2.yaml's (RCP 2017: a parameter scoring 3).
    single = min(
        (
            int(r["single_parameter_points"])
            for r in news2_table()["responses"]
            if "single_parameter_points" in r
        ),
        default=None,
    )
    threes = [p for p in score.parameters if single is not None and p.points >= single]
    if score.band == "low-medium":
        evidence = tuple(dict.fromkeys(p.ref for p in threes))
        title = spec["title"].format(total=score.total, parameter=" and ".join(p.label for p in threes))
        message = (
            f"NEWS2 is {score.total} with "
            + "; ".join(f"{p.label} {p.value} scoring {p.points}" for p in threes)
            + ": a single parameter scoring 3 needs an urgent ward-based response."
        )
    else:
        evidence = tuple(score.evidence)
        title = spec["title"].format(total=score.total, parameter="")
        message = f"NEWS2 is {score.total} ({score.band} clinical risk)" + (
            f"; not recorded recently: {', '.join(score.missing)}, so it may be higher"
            if score.missing
            else ""
        )
    return [
        Finding(
            patient=chart.patient_ref,
            rule_id=str(spec["rule_id"]),
            category=NEWS2_FLAG_CATEGORY,
            severity=str(spec["severity"]),
            title=title,
            message=message,
            evidence=evidence,
            values=values,
            action=score.response,
            sources=(NEWS2_SOURCE,),
        )
    ]


def findings_for(chart: Any, now: datetime, score: News2Score | None = None) -> list[Finding]:
    """The rule catalogue's flags plus the NEWS2 escalation flags, most severe first."""
    from assistant.rules.engine import evaluate

    found = list(evaluate(chart, now=now)) + news2_flags(chart, now, score)
    found.sort(key=lambda f: f.sort_key)
    return found


def summary_news2(view: PatientView) -> News2 | None:
    """The NEWS2 aggregate the fact sheet takes, with `missing` (one adapter: assistant.summary.facts)."""
    return news2_from_rules(view.chart, view.now) if view.chart is not None else None


# --- patient views --------------------------------------------------------------------------------------------
def patient_view(
    chart: Any, now: datetime, *, patient_id: str | None = None, since: datetime | None = None
) -> PatientView:
    """Chart -> flags -> view. A failing rule set leaves the chart on screen with a notice."""
    t0 = time.perf_counter()
    now = as_utc(now)
    score = news2(chart, now=now)
    notices = []
    try:
        found = findings_for(chart, now, score)
    except Exception as exc:  # noqa: BLE001 - one failing rule set must not blank the chart
        log.exception("rules evaluation failed")
        found = news2_flags(chart, now, score)
        notices.append(f"flags could not be computed ({type(exc).__name__}); the chart below is complete")
    view = build_patient_view(chart, now, found, patient_id=patient_id, since=since, score=score)
    # Stale data is said, not hidden: a chart whose newest data is older than rule windows was not judged on it.
    stale = stale_data(chart, now)
    if stale is not None:
        notices.append(stale.text)
    view.notices += notices
    view.load_s = time.perf_counter() - t0
    return view


def load_patient_view(
    source: Any, patient_id: str, now: datetime, *, since: datetime | None = None
) -> PatientView:
    """Read one chart and build its view; a chart that cannot be read gives a view with `error` set."""
    from connectors.errors import FhirError

    t0 = time.perf_counter()
    try:
        chart = source.patient_chart(patient_id)
    except (FhirError, LookupError, ValueError) as exc:
        view = failed_view(patient_id, f"{type(exc).__name__}: {exc}", now)
        view.load_s = time.perf_counter() - t0
        return view
    view = patient_view(chart, now, patient_id=patient_id, since=since)
    view.load_s = time.perf_counter() - t0
    return view


def ward_patient_ids(source: Any, ward_ref: str | None) -> list[str]:
    """The ward's census (every patient when no ward is given and the source has none), without repeats."""
    census = source.ward_census(ward_ref) if ward_ref or source.wards() else []
    if census:
        ids = [c.patient_id for c in census]
    else:
        ids = [] if ward_ref else list(source.iter_patient_ids())
    return list(dict.fromkeys(ids))


# --- guidelines: one query policy -----------------------------------------------------------------------------
def guideline_query(finding: Finding) -> str:
    return f"{finding.title}. {finding.action}".strip()


def passages_for_finding(retriever: Any, finding: Finding, k: int = GUIDELINE_K) -> list[Any]:
    """The passage(s) linked to one flag: its rule's documents first, else the best passage of any document."""
    query = guideline_query(finding)
    hits = retriever.search(
        query, k=k, rule_ids=[finding.rule_id], doc_ids=list(finding.guideline_ids) or None
    )
    if not hits and finding.guideline_ids:
        hits = retriever.search(query, k=k, rule_ids=[finding.rule_id])
    return list(hits)


def guideline_passages(findings: Sequence[Finding], retriever: Any) -> list[Any]:
    """Passages for a summary or handoff: one per flag for the most severe flags; none without a retriever."""
    if retriever is None or not findings:
        return []
    out: dict[str, Any] = {}
    try:
        for f in sorted(findings, key=lambda f: f.sort_key)[:GUIDELINE_FINDINGS]:
            for hit in passages_for_finding(retriever, f):
                out.setdefault(hit.citation, hit)
    except Exception as exc:  # noqa: BLE001 - guidance is optional; the summary must still be produced
        log.warning("guideline retrieval unavailable (%s); no guideline passages", type(exc).__name__)
        return []
    return list(out.values())


def open_retriever() -> Any | None:
    """The configured guideline retriever, or None (with a warning) when the store cannot be opened."""
    try:
        from guidelines.embedding import get_embedder
        from guidelines.retrieval import GuidelineRetriever
        from guidelines.store import open_store

        return GuidelineRetriever(open_store(), get_embedder())
    except Exception as exc:  # noqa: BLE001 - guidance is optional
        log.warning("guideline store unavailable (%s); no guideline passages", type(exc).__name__)
        return None


# --- summaries and handoff ------------------------------------------------------------------------------------
def summary_stream(
    view: PatientView, backend: Any | None = None, passages: Iterable[Any] = (), **kwargs: Any
) -> Any:
    """A SummaryStream of one patient (assistant.summary.composer), from the view's flags and NEWS2."""
    from assistant.summary.composer import compose_stream

    if view.chart is None:
        raise ValueError(f"Patient/{view.patient_id} has no chart loaded; a summary needs one")
    holds = {ref: hold_text(flags) for ref, flags in hold_map(view.chart, list(view.findings)).items()}
    kwargs.setdefault("holds", holds)
    return compose_stream(
        view.chart, view.findings, tuple(passages), backend, now=view.now, news2=summary_news2(view), **kwargs
    )


def summary_for(
    view: PatientView, backend: Any | None = None, passages: Iterable[Any] = (), **kwargs: Any
) -> Any:
    return summary_stream(view, backend, passages, **kwargs).collect()


def handoff_for(
    view: PatientView,
    backend: Any | None = None,
    passages: Iterable[Any] = (),
    *,
    max_tokens: int = 256,
    timeout: float | None = None,
) -> Any:
    """One patient's I-PASS entry (assistant.summary.handoff) from the view: the same for CLI and dashboard."""
    from assistant.summary.handoff import compose_handoff

    if view.chart is None:
        raise ValueError(f"Patient/{view.patient_id} has no chart loaded; a handoff needs one")
    entry = compose_handoff(
        view.chart,
        view.findings,
        tuple(passages),
        backend,
        now=view.now,
        news2=summary_news2(view),
        max_tokens=max_tokens,
        timeout=timeout,
    )
    entry.acuity = view.acuity
    return entry


def ward_handoff(
    views: Sequence[PatientView],
    *,
    ward: str | None,
    now: datetime,
    backend: Any | None = None,
    retriever: Any | None = None,
    max_tokens: int = 256,
    compose: Callable[[PatientView], Any] | None = None,
) -> Any:
    """The ward's I-PASS in acuity order; a chart that could not be read is listed under errors."""
    from assistant.summary.handoff import compose_ward_handoff

    now = as_utc(now)
    entries = []
    errors = []
    for view in sort_by_acuity(list(views)):
        if view.chart is None:
            errors.append(f"Patient/{view.patient_id}: {(view.error or 'not loaded').split(':', 1)[0]}")
            continue
        if compose is not None:
            entry = compose(view)
        else:
            passages = guideline_passages(view.findings, retriever)
            entry = handoff_for(view, backend, passages, max_tokens=max_tokens)
        if entry is not None:
            entries.append(entry)
    return compose_ward_handoff(entries, ward=ward, now=now, errors=errors)


def ward_view(
    source: Any,
    ward_ref: str | None,
    now: datetime,
    *,
    ward_name: str | None = None,
    since: datetime | None = None,
    views: Sequence[PatientView] | None = None,
    with_handoff: bool = False,
    backend: Any | None = None,
    retriever: Any | None = None,
    max_tokens: int = 256,
) -> WardView:
    """Census (acuity order), delta since `since` (default 12 h) and, when asked, the ward's I-PASS."""
    now = as_utc(now)
    since = as_utc(since) if since is not None else default_since(now)
    if views is None:
        views = [
            load_patient_view(source, pid, now, since=since) for pid in ward_patient_ids(source, ward_ref)
        ]
    ordered = sort_by_acuity(list(views))
    ward = WardView(ward_ref=ward_ref, ward_name=ward_name, now=now, since=since)
    ward.patients = {v.patient_id: v for v in ordered}
    ward.rows = [census_row(v, illness_severity(v), since=since) for v in ordered]
    ward.delta = ward_delta(ordered, since, now)
    ward.errors = [f"Patient/{v.patient_id}: {v.error}" for v in ordered if v.error]
    if with_handoff:
        ward.handoff = ward_handoff(
            ordered, ward=ward_name, now=now, backend=backend, retriever=retriever, max_tokens=max_tokens
        )
    return ward


def patient_delta(view: PatientView, since: datetime | None = None) -> Any:
    """One patient's "since last shift" delta from a time the nurse picks (default: acuity.toml's 12 h)."""
    return delta_since(view, as_utc(since) if since is not None else default_since(view.now))


def illness_severity(view: PatientView) -> str:
    """I-PASS illness severity (stable | watcher | unstable) by the fact sheet's rule, without composing."""
    from assistant.summary.facts import illness_severity_fact

    if view.chart is None:
        return ""
    fact = illness_severity_fact(view.chart, view.findings, summary_news2(view), view.chart.patient_ref)
    return str((fact or {}).get("value") or "")


# --- audit ----------------------------------------------------------------------------------------------------
def audit_status(rows: Sequence[dict[str, Any]], source: Any = None) -> Any:
    """The run status (complete or what is missing) of per-patient audit rows, as `nva audit` reports it."""
    from assistant.audit.status import RunStatus
    from assistant.rules.engine import default_catalogue, types_read

    status = RunStatus.of_source(source)
    status.keep_needed(types_read(default_catalogue()))
    for row in rows:
        status.add_row(row)
    return status


def audit_patients(
    source: Any,
    patient_ids: Sequence[str],
    now: datetime,
    *,
    origin: str,
    progress: Callable[[int, int], None] | None = None,
    period: tuple[datetime, datetime] | None = None,
) -> list[dict[str, Any]]:
    """The audit runner's per-patient step over some patients (the dashboard's "audit this ward"); with `period`
    (start, end) the retrospective audit's episodes, as `nva audit --period`."""
    from assistant.audit.runner import audit_record
    from assistant.audit.unit import Judgement
    from assistant.rules.engine import default_catalogue
    from connectors.base import PatientRecord
    from connectors.errors import FhirError

    catalogue = default_catalogue()
    judgement = Judgement(now=now.isoformat())
    if period is not None:
        judgement = Judgement(
            now=now.isoformat(),
            retrospective=True,
            period_start=as_utc(period[0]).isoformat(),
            period_end=as_utc(period[1]).isoformat(),
        )
    rows = []
    for i, pid in enumerate(patient_ids):
        try:
            record = source.patient_resources(pid)
        except FhirError as exc:
            record = PatientRecord(patient_id=pid, error=exc, origin=origin)
        rows.append(audit_record(record, now, catalogue, judgement))
        if progress is not None:
            progress(i + 1, len(patient_ids))
    return rows

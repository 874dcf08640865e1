"""Retrospective audit: each rule judged at every moment its inputs change over a period, reported as episodes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from assistant.model import Administration, Chart, EvidenceValue, Finding, MedicationOrder
from assistant.rules.engine import (
    EVALUATORS,
    Catalogue,
    ChartIndex,
    Rule,
    RuleContext,
    default_catalogue,
    drug_identity,
    newest_data_time,
)
from assistant.terminology import fhir_codes

__all__ = ["Dose", "Episode", "episodes", "order_spans", "period_of"]

# A stopped order with no stop time is known only at the moment it was written: it holds for this instant.
INSTANT = timedelta(microseconds=1)
NOT_GIVEN_STATUSES = frozenset({"cancelled", "entered-in-error", "draft"})
# One episode per patient and rule for these kinds (their evidence changes as new results arrive, the exposure
# does not); the other kinds keep one episode per order, allergy or administration.
ONE_PER_RULE = frozenset({"threshold-latest", "relative-change", "monitoring-gap", "drug-condition"})


@dataclass(frozen=True, slots=True)
class Dose:
    """An administration of an implicated drug while the episode held: the harm-potential signal."""

    ref: str
    time: datetime
    text: str
    dose: str | None = None


@dataclass(frozen=True, slots=True)
class Episode:
    """One stretch of time in which a rule held for a patient, with the evidence as it stood when it began."""

    patient: str
    rule_id: str
    category: str
    severity: str
    title: str
    message: str
    start: datetime
    end: datetime | None  # None: still holding at the period end
    end_reason: str  # resolved | period-end | order-stop-unknown
    duration_hours: float
    evidence: tuple[str, ...]
    values: tuple[EvidenceValue, ...] = ()
    doses: tuple[Dose, ...] = ()
    action: str = ""
    guideline_ids: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def doses_count(self) -> int:
        return len(self.doses)

    @property
    def duration_text(self) -> str:
        return duration_text(self.duration_hours)

    def holds_at(self, t: datetime) -> bool:
        return self.start <= t and (self.end is None or t < self.end or (t == self.end == self.start))

    def to_dict(self) -> dict[str, Any]:
        data = _plain(asdict(self))
        data["doses_count"] = self.doses_count
        return data


def duration_text(hours: float | str | None) -> str:
    """How long an episode held, in words: a 0-hour episode is one instant whose exposure is unknown, not 'none'."""
    try:
        value = float(hours)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "duration not recorded"
    if value <= 0:
        return "at one instant (duration unknown)"
    return f"{value:.1f} h"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


@dataclass(slots=True)
class _Span:
    order: MedicationOrder
    start: datetime
    end: datetime | None  # exclusive; None = still running at the period end
    unknown_stop: bool = False

    def active_at(self, t: datetime) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


@dataclass(slots=True)
class _Open:
    finding: Finding
    start: datetime
    drugs: set[str] = field(default_factory=set)  # order refs implicated at any time in the episode


def _same_drug(a: MedicationOrder, b: MedicationOrder) -> bool:
    return drug_identity(a) == drug_identity(b)


def order_spans(chart: Chart) -> list[_Span]:
    """When each order (and medication-list entry) ran, as far as the chart says.

    The order's own period when it has one; an active order runs to the period end; a stopped or completed order
    with no stop time runs until the next order for the same drug (a renewal), or, with none, only at the moment it
    was written (`unknown_stop`): the chart does not say for how long it was taken.
    """
    spans = []
    for o in chart.orders:
        start = o.start or o.authored_on
        if start is None or o.status in NOT_GIVEN_STATUSES:
            continue
        if o.intent not in (None, "order", "original-order", "instance-order", "statement"):
            continue  # proposals and plans were never orders
        spans.append(_Span(o, start, o.end if o.end is not None and o.end > start else None))
    spans.sort(key=lambda s: (s.start, s.order.ref))
    for i, span in enumerate(spans):
        o = span.order
        if span.end is not None or o.end is not None:
            if o.end is not None and o.end <= span.start:
                span.end, span.unknown_stop = span.start + INSTANT, False
            continue
        if o.status == "active":
            continue
        if any(s.start == span.start and _same_drug(s.order, o) for s in spans[i + 1 :]):
            span.end, span.unknown_stop = span.start + INSTANT, True  # a copy written at the same moment
            continue
        renewal = next(
            (s for s in spans[i + 1 :] if s.start > span.start and _same_drug(s.order, o)),
            None,
        )
        if renewal is not None:
            span.end = renewal.start
        else:
            span.end, span.unknown_stop = span.start + INSTANT, True
    return spans


def _admitted_spans(chart: Chart) -> list[tuple[datetime, datetime | None]]:
    codes = fhir_codes()
    out = []
    for e in chart.encounters:
        if e.start is None or e.class_code not in codes.inpatient_classes:
            continue
        if e.end is not None:
            out.append((e.start, e.end))
        elif e.status in codes.current_encounter_statuses:
            out.append((e.start, None))
    return out


def period_of(
    chart: Chart, start: datetime | None = None, end: datetime | None = None
) -> tuple[datetime | None, datetime | None]:
    """The judged period: as given, each open side defaulting to the chart's own span (first to newest data)."""
    if start is not None and end is not None:
        return start, end
    times = [r.time for r in chart.results if r.time is not None]
    times += [a.time for a in chart.administrations if a.time is not None]
    times += [t for o in chart.orders for t in (o.start, o.authored_on) if t is not None]
    times += [t for e in chart.encounters for t in (e.start, e.end) if t is not None]
    first = min(times) if times else None
    newest = newest_data_time(chart)
    return (start or first), (end or newest)


def _rule_windows(rule: Rule) -> set[float]:
    hours = {rule.window_hours or 0.0, float(rule.params.get("latest_within_hours") or 0)}
    for c in rule.params.get("change", {}).get("criteria", []):
        hours.add(float(c.get("baseline_hours") or 0))
    if rule.kind == "monitoring-gap" and not rule.window_hours:
        hours.add(72.0)
    if rule.kind in ("administration-without-order", "order-not-administered", "threshold-latest"):
        hours.add(rule.window_hours or 24.0)
    hours.discard(0.0)
    return hours


def _analytes(rule: Rule) -> set[str]:
    keys = {rule.analyte} if rule.analyte else set()
    for _, analytes in rule.params.get("_monitor", ()):
        keys.update(analytes)
    return keys


def _moments(
    rule: Rule,
    chart: Chart,
    index: ChartIndex,
    spans: list[_Span],
    admitted: list,
    start: datetime,
    end: datetime,
) -> list[datetime]:
    """Every time at which this rule's verdict can change: its inputs' times and the times their windows expire."""
    windows = [timedelta(hours=h) for h in _rule_windows(rule)]
    points: set[datetime] = {start, end}
    drug_rule = bool(rule.drug_ingredients or rule.drug_classes)
    for s in spans:
        if drug_rule and not rule.matches_order(s.order) and rule.kind != "drug-condition":
            continue
        points.add(s.start)
        if s.end is not None:
            points.add(s.end)
        if rule.kind == "order-not-administered":
            points.add(s.start + timedelta(hours=float(rule.params.get("started_hours", 24))))
    for analyte in _analytes(rule):
        for r in index.all(analyte):
            points.add(r.time)  # type: ignore[arg-type]
            points.update(r.time + w for w in windows)  # type: ignore[operator]
    if rule.kind in ("administration-without-order", "order-not-administered"):
        factor = float(rule.params.get("interval_factor", 1.5))
        extra = {
            timedelta(hours=max(rule.window_hours or 24, (s.order.timing.interval_hours() or 0) * factor))
            for s in spans
        }
        for a in chart.administrations:
            if a.time is not None:
                points.add(a.time)
                points.update(a.time + w for w in (*windows, *extra))
    if rule.kind == "drug-condition":
        points.update(c.onset for c in chart.conditions if c.onset is not None)
    if rule.params.get("requires_admission"):
        for a, b in admitted:
            points.add(a)
            if b is not None:
                points.add(b)
    if rule.params.get("min_age") is not None and chart.patient.birth_date is not None:
        b = chart.patient.birth_date
        years = int(rule.params["min_age"])
        try:
            birthday = datetime(b.year + years, b.month, b.day, tzinfo=start.tzinfo)
        except ValueError:  # 29 February
            birthday = datetime(b.year + years, 3, 1, tzinfo=start.tzinfo)
        points.add(birthday)
    return sorted(t for t in points if start <= t <= end)


def _key(rule: Rule, f: Finding, chart_orders: dict[str, MedicationOrder]) -> tuple:
    if rule.kind in ONE_PER_RULE:
        return (rule.id,)
    drugs = tuple(
        sorted({i for ref in f.evidence if ref in chart_orders for i in chart_orders[ref].ingredients})
    )
    others = tuple(
        sorted(r for r in f.evidence if r.startswith(("AllergyIntolerance/", "MedicationAdministration/")))
    )
    if rule.kind == "order-not-administered":
        return (rule.id, f.evidence[0])
    return (rule.id, drugs, others)


def _implicated(
    rule: Rule, admin: Administration, refs: set[str], orders: dict[str, MedicationOrder]
) -> bool:
    if rule.kind == "administration-without-order":
        return admin.ref in refs  # the episode is that administration: its one dose
    if admin.order_ref and admin.order_ref in refs:
        return True
    ingredients = {i for ref in refs if ref in orders for i in orders[ref].ingredients}
    return bool(ingredients.intersection(admin.ingredients))


def episodes(
    chart: Chart,
    *,
    start: datetime,
    end: datetime,
    catalogue: Catalogue | None = None,
    skip: Iterable[str] = (),
) -> list[Episode]:
    """Every episode in [start, end] of every rule not in `skip`, ordered by start, severity and rule."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("the period must be timezone-aware")
    catalogue = catalogue or default_catalogue()
    skip = set(skip)
    index = ChartIndex(chart)
    spans = order_spans(chart)
    unknown_ends = {s.end for s in spans if s.unknown_stop}
    admitted = _admitted_spans(chart)
    orders = {o.ref: o for o in chart.orders}
    out: list[Episode] = []
    for rule in catalogue.rules:
        if rule.id in skip:
            continue
        drug_rule = bool(rule.drug_ingredients or rule.drug_classes)
        if drug_rule and not any(rule.matches_order(s.order) for s in spans):
            continue  # never on the drug: nothing to judge
        if rule.kind in ("administration-without-order", "order-not-administered") and not (
            chart.administrations or spans
        ):
            continue
        evaluator = EVALUATORS[rule.kind]
        suppressors = [catalogue.rule(r) for r in rule.params.get("_suppressed_by", ()) if r not in skip]
        moments = set(_moments(rule, chart, index, spans, admitted, start, end))
        for other in suppressors:
            moments.update(_moments(other, chart, index, spans, admitted, start, end))
        relevant = _relevant_spans(rule, suppressors, spans)
        open_: dict[tuple, _Open] = {}
        for t in sorted(moments):
            ctx = RuleContext(
                chart,
                t,
                index=index,
                orders=[s.order for s in relevant if s.active_at(t)],
                admitted=any(a <= t and (b is None or t < b) for a, b in admitted),
            )
            now = {}
            quiet = any(EVALUATORS[other.kind](other, ctx) for other in suppressors)
            for f in () if quiet else evaluator(rule, ctx):
                now.setdefault(_key(rule, f, orders), f)
            for key in [k for k in open_ if k not in now]:
                out.append(
                    _close(
                        rule,
                        chart,
                        open_.pop(key),
                        t,
                        "order-stop-unknown" if t in unknown_ends else "resolved",
                        orders,
                    )
                )
            for key, f in now.items():
                if key in open_:
                    open_[key].drugs.update(r for r in f.evidence if r in orders)
                else:
                    open_[key] = _Open(f, t, {r for r in f.evidence if r in orders})
        for o in open_.values():
            out.append(_close(rule, chart, o, None, "period-end", orders, period_end=end))
        if rule.params.get("instant_episodes", True) is False:
            # the rule says a prescribing instant alone (a stopped order, stop unknown: 0 h) is no exposure
            out = [
                e
                for e in out
                if not (e.rule_id == rule.id and e.end_reason == "order-stop-unknown" and e.start == e.end)
            ]
    out.sort(key=lambda e: (e.start, e.severity != "high", e.severity, e.rule_id, e.evidence))
    return out


def _relevant_spans(rule: Rule, suppressors: list[Rule], spans: list[_Span]) -> list[_Span]:
    """The orders a rule (and the rules that can quiet it) can see: its drugs and protecting drugs, or all."""
    rules = [rule, *suppressors]
    if any(not (r.drug_ingredients or r.drug_classes) for r in rules):
        return spans  # allergy, duplicate and administration rules look at every order
    unless = [r.params.get("_unless", (frozenset(), frozenset())) for r in rules]
    return [
        s
        for s in spans
        if any(r.matches_order(s.order) for r in rules)
        or any(i.intersection(s.order.ingredients) or c.intersection(s.order.classes) for i, c in unless)
    ]


def _close(
    rule: Rule,
    chart: Chart,
    o: _Open,
    t: datetime | None,
    reason: str,
    orders: dict[str, MedicationOrder],
    *,
    period_end: datetime | None = None,
) -> Episode:
    f = o.finding
    if reason == "order-stop-unknown" and t is not None:
        t = t - INSTANT  # the prescribing moment itself: no duration is claimed
    stop = t if t is not None else period_end
    assert stop is not None
    doses = tuple(
        Dose(a.ref, a.time, a.text, str(a.dose) if a.dose else None)  # type: ignore[arg-type]
        for a in sorted(chart.administrations, key=lambda a: (a.time or o.start, a.ref))
        if a.was_given
        and a.time is not None
        and o.start <= a.time <= stop
        and _implicated(rule, a, o.drugs | set(f.evidence), orders)
    )
    return Episode(
        patient=f.patient,
        rule_id=f.rule_id,
        category=f.category,
        severity=f.severity,
        title=f.title,
        message=f.message,
        start=o.start,
        end=t,
        end_reason=reason,
        duration_hours=round(max(0.0, (stop - o.start).total_seconds() / 3600), 2),
        evidence=f.evidence,
        values=f.values,
        doses=doses,
        action=f.action,
        guideline_ids=f.guideline_ids,
        sources=f.sources,
    )

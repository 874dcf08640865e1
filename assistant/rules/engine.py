"""Deterministic chart-contradiction engine: generic evaluators parameterized by the rule catalogue."""

from __future__ import annotations

import bisect
import logging
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from assistant.model import (
    SEVERITY_ORDER,
    Administration,
    AllergyFact,
    Chart,
    ConditionFact,
    EvidenceValue,
    Finding,
    MedicationOrder,
    Quantity,
    Result,
    format_number,
)
from assistant.terminology import Terminology, terminology

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when libyaml is present
log = logging.getLogger(__name__)

CATALOGUE_PATH = Path(__file__).with_name("catalogue.yaml")
KINDS = (
    "threshold-latest",
    "relative-change",
    "allergy-conflict",
    "duplicate-class",
    "duplicate-order",
    "administration-without-order",
    "order-not-administered",
    "monitoring-gap",
    "drug-condition",
)
# Kinds whose verdict rests on something being absent: with a resource type missing they would fire falsely (no
# INR *fetched* is not no INR *taken*), so they are not judged when a type they read is missing.
ABSENCE_KINDS = frozenset(
    {"monitoring-gap", "order-not-administered", "administration-without-order", "drug-condition"}
)
ORDER_TYPES = frozenset({"MedicationRequest", "MedicationStatement", "Medication"})
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}
# Results and thresholds are compared after rounding, so 1.2 - 0.9 counts as a 0.3 rise.
PRECISION = 6


class CatalogueError(ValueError):
    """The rule catalogue is malformed; the message names the rule and field to fix."""


@dataclass(frozen=True, slots=True)
class Threshold:
    op: str
    value: float  # in the analyte's canonical unit
    display: str  # as written in the catalogue, e.g. "70 mg/dL (3.9 mmol/L)"


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    category: str
    title: str
    kind: str
    severity: str
    message: str
    action: str
    sources: tuple[str, ...]
    guideline_ids: tuple[str, ...] = ()
    drug_ingredients: frozenset[str] = frozenset()
    drug_classes: frozenset[str] = frozenset()
    analyte: str | None = None
    loinc: frozenset[str] | None = None
    threshold: Threshold | None = None
    window_hours: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def matches_order(self, order: MedicationOrder) -> bool:
        if order.intent == "statement" and not self.params.get("include_statements"):
            return False  # a home medication list is not an order being given, unless the rule says so
        return bool(
            self.drug_ingredients.intersection(order.ingredients)
            or self.drug_classes.intersection(order.classes)
        )

    @property
    def lookback_hours(self) -> float:
        """The longest window the rule looks back over at the judged time (for the stale-data notice)."""
        hours = [self.window_hours or 0.0, float(self.params.get("latest_within_hours") or 0)]
        return max(hours)


@dataclass(frozen=True, slots=True)
class Catalogue:
    rules: tuple[Rule, ...]
    version: int
    path: str
    guideline_note: str = ""

    def rule(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rules)


# --- loading ------------------------------------------------------------------------------------------------


def _fail(rule_id: str, text: str) -> CatalogueError:
    return CatalogueError(f"rule {rule_id!r}: {text} (fix assistant/rules/catalogue.yaml)")


def _parse_rule(spec: dict, terms: Terminology) -> Rule:
    rid = spec.get("id")
    if not isinstance(rid, str) or not rid:
        raise CatalogueError("a rule has no id (fix assistant/rules/catalogue.yaml)")
    for key in ("category", "title", "kind", "severity", "message", "action"):
        if not isinstance(spec.get(key), str):
            raise _fail(rid, f"missing text field {key!r}")
    if spec["kind"] not in KINDS:
        raise _fail(rid, f"kind {spec['kind']!r} is not one of {', '.join(KINDS)}")
    if spec["severity"] not in SEVERITY_ORDER:
        raise _fail(rid, f"severity {spec['severity']!r} is not one of {', '.join(SEVERITY_ORDER)}")
    drugs = spec.get("drugs") or {}
    ingredients = frozenset(drugs.get("ingredients") or ())
    classes = frozenset(drugs.get("classes") or ())
    unknown = (ingredients - set(terms.ingredients)) | (classes - set(terms.class_names))
    if unknown:
        raise _fail(rid, f"unknown ingredients or classes {sorted(unknown)}")
    analyte = loinc = threshold = None
    lab = spec.get("lab")
    if lab:
        analyte = lab.get("analyte")
        if analyte not in terms.analytes:
            raise _fail(rid, f"unknown analyte {analyte!r}; see assistant/data/lab_analytes.toml")
        if lab.get("loinc"):
            loinc = frozenset(str(c) for c in lab["loinc"])
            stray = loinc - set(terms.analytes[analyte].loinc)
            if stray:
                raise _fail(rid, f"LOINC {sorted(stray)} are not codes of {analyte}")
    if spec.get("threshold"):
        t = spec["threshold"]
        if analyte is None or t.get("op") not in OPS:
            raise _fail(rid, "a threshold needs a lab and an op among " + ", ".join(OPS))
        canonical = terms.to_canonical(terms.analytes[analyte], float(t["value"]), t.get("unit"))
        display = str(t.get("display") or f"{t['value']} {t.get('unit', '')}".strip())
        if t.get("also"):
            display += f" ({t['also']})"
        threshold = Threshold(t["op"], round(canonical, PRECISION), display)
    unless = spec.get("unless_drugs") or {}
    unless_ingredients = frozenset(unless.get("ingredients") or ())
    unless_classes = frozenset(unless.get("classes") or ())
    stray = (unless_ingredients - set(terms.ingredients)) | (unless_classes - set(terms.class_names))
    if stray:
        raise _fail(rid, f"unknown unless_drugs ingredients or classes {sorted(stray)}")
    monitor: list[tuple[str, tuple[str, ...]]] = []
    for group in spec.get("monitor") or ():
        keys = tuple(group.get("analytes") or ())
        bad = [k for k in keys if k not in terms.analytes]
        if not keys or bad or not group.get("label"):
            raise _fail(rid, f"monitor group {group} needs a label and analytes from lab_analytes.toml")
        monitor.append((str(group["label"]), keys))
    if spec["kind"] == "monitoring-gap" and not monitor:
        if analyte is None:
            raise _fail(rid, "monitoring-gap needs a lab or a monitor list")
        monitor.append((terms.analytes[analyte].name, (analyte,)))
    if spec["kind"] == "drug-condition":
        key = spec.get("conditions")
        if key not in condition_sets():
            raise _fail(rid, f"conditions {key!r} is not a set in assistant/data/conditions.toml")
    if spec.get("window_days") is not None:
        spec = {**spec, "window_hours": float(spec["window_days"]) * 24}
    if spec["kind"] in ("threshold-latest",) and threshold is None:
        raise _fail(rid, "threshold-latest needs a threshold")
    if spec["kind"] in ("threshold-latest", "relative-change", "monitoring-gap", "drug-condition") and not (
        ingredients or classes
    ):
        raise _fail(rid, "needs a drug set")
    params = {
        k: v
        for k, v in spec.items()
        if k
        not in (
            "id",
            "category",
            "title",
            "kind",
            "severity",
            "message",
            "action",
            "sources",
            "drugs",
            "lab",
            "threshold",
            "window_hours",
            "window_days",
            "guidelines",
            "monitor",
            "unless_drugs",
            "suppressed_by",
        )
    }
    params["_suppressed_by"] = tuple(spec.get("suppressed_by") or ())
    params["_monitor"] = tuple(monitor)
    params["_unless"] = (unless_ingredients, unless_classes)
    if spec["kind"] == "relative-change":
        for c in params.get("change", {}).get("criteria", []):
            if c.get("measure") not in ("absolute", "ratio", "fall-fraction") or c.get("op") not in OPS:
                raise _fail(rid, f"criterion {c} needs measure absolute|ratio|fall-fraction and an op")
            if c.get("unit") and analyte:
                c["value_canonical"] = terms.to_canonical(
                    terms.analytes[analyte], float(c["value"]), c["unit"]
                )
    if spec["kind"] == "duplicate-class":
        for g in params.get("groups", []):
            if g.get("text_pattern"):
                g["_regex"] = re.compile(g["text_pattern"], re.IGNORECASE)
    guideline_ids = tuple(sorted(set(spec.get("guidelines") or ())))
    return Rule(
        id=rid,
        category=spec["category"],
        title=spec["title"],
        kind=spec["kind"],
        severity=spec["severity"],
        message=spec["message"],
        action=spec["action"],
        sources=tuple(spec.get("sources") or ()),
        guideline_ids=guideline_ids,
        drug_ingredients=ingredients,
        drug_classes=classes,
        analyte=analyte,
        loinc=loinc,
        threshold=threshold,
        window_hours=float(spec["window_hours"]) if spec.get("window_hours") is not None else None,
        params=params,
    )


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """Parse and validate a catalogue file (the packaged one by default)."""
    path = Path(path) if path else CATALOGUE_PATH
    with path.open("r", encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=_LOADER)  # noqa: S506 - a safe loader
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise CatalogueError(f"{path} has no `rules:` list")
    terms = terminology()
    rules = tuple(_parse_rule(spec, terms) for spec in data["rules"])
    seen: set[str] = set()
    for r in rules:
        if r.id in seen:
            raise CatalogueError(f"rule id {r.id!r} appears twice in {path}")
        seen.add(r.id)
    for r in rules:
        unknown = set(r.params["_suppressed_by"]) - seen
        if unknown:
            raise CatalogueError(
                f"rule {r.id!r}: suppressed_by names unknown rules {sorted(unknown)} in {path}"
            )
    return Catalogue(rules=rules, version=int(data.get("version", 1)), path=str(path))


@cache
def default_catalogue() -> Catalogue:
    return load_catalogue()


# --- evaluation context ---------------------------------------------------------------------------------------


class ChartIndex:
    """A chart's usable results per analyte, oldest first, built once: judging at many moments reuses it."""

    def __init__(self, chart: Chart) -> None:
        self.chart = chart
        self.orders_by_ref = {o.ref: o for o in chart.orders}
        self._results: dict[str, list[Result]] = {}
        for r in chart.results:
            if r.is_usable:
                self._results.setdefault(r.analyte, []).append(r)
        for rows in self._results.values():
            rows.sort(key=lambda r: (r.time, r.ref))
        self._times = {k: [r.time for r in rows] for k, rows in self._results.items()}

    def upto(self, analyte: str, now: datetime) -> list[Result]:
        rows = self._results.get(analyte)
        if not rows:
            return []
        return rows[: bisect.bisect_right(self._times[analyte], now)]

    def all(self, analyte: str) -> list[Result]:
        return self._results.get(analyte, [])


class RuleContext:
    """One chart seen at `now`: active orders and results up to now, computed once for all rules."""

    def __init__(
        self,
        chart: Chart,
        now: datetime,
        *,
        index: ChartIndex | None = None,
        orders: list[MedicationOrder] | None = None,
        admitted: bool | None = None,
    ) -> None:
        self.chart = chart
        self.now = now
        self.index = index or ChartIndex(chart)
        if orders is None:  # the bedside: what the chart says is active now
            orders = [
                o
                for o in chart.orders
                if (o.is_active or (o.intent == "statement" and o.status == "active"))
                and not (o.end is not None and o.end <= now)
            ]
        self.orders = sorted(orders, key=lambda o: o.ref)
        self.orders_by_ref = self.index.orders_by_ref
        self.admitted = chart.encounter is not None if admitted is None else admitted

    def drugs(self, rule: Rule) -> list[MedicationOrder]:
        return [o for o in self.orders if rule.matches_order(o)]

    def results(self, rule: Rule, *, numeric: bool = True, analyte: str | None = None) -> list[Result]:
        rows = self.index.upto(analyte or rule.analyte or "", self.now)
        if rule.loinc is not None and analyte is None:
            rows = [r for r in rows if r.loinc in rule.loinc]
        if numeric:
            rows = [r for r in rows if r.value is not None]
        return rows

    def since(self, hours: float) -> datetime:
        return self.now - timedelta(hours=hours)

    def age(self) -> int | None:
        return self.chart.patient.age_on(self.now.date())


def _when(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M} UTC" if t else "time unknown"


UNIT_DISPLAY = {
    "{INR}": "",
    "10*3/uL": "x10^3/uL",
    "Cel": "°C",
    "mm[Hg]": "mmHg",
    "{score}": "",
    "/min": "/min",
}


def _num(value: float) -> str:
    """A chart-style number: two decimals below 10, one below 100, none above."""
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return format_number(round(value, digits))


def _value(r: Result) -> str:
    """The value as the nurse reads it: the charted unit first, the canonical one after a conversion."""
    if r.value is None:
        return r.display_value()
    unit = UNIT_DISPLAY.get(r.unit or "", r.unit or "")
    canonical = f"{_num(r.value)} {unit}".strip()
    orig = r.original
    if (
        orig is not None
        and orig.unit
        and orig.unit.replace(" ", "").lower() != (r.unit or "").lower()
        and abs(orig.value - r.value) > 1e-9
    ):
        return f"{str(Quantity(orig.value, orig.unit))} (= {canonical})"
    return canonical


def drug_identity(o: MedicationOrder) -> tuple[str, tuple[str, ...]]:
    """One drug however many orders carry it: its RxNorm ingredients, else its RxNorm codes, else its order text."""
    if o.ingredients:
        return ("ingredients", tuple(sorted(set(o.ingredients))))
    if o.rxnorm_codes:
        return ("rxnorm", tuple(sorted(set(o.rxnorm_codes))))
    return ("text", (" ".join(o.text.lower().split()),))


def _by_drug(orders: Iterable[MedicationOrder]) -> dict[tuple, list[MedicationOrder]]:
    out: dict[tuple, list[MedicationOrder]] = {}
    for o in orders:
        out.setdefault(drug_identity(o), []).append(o)
    return out


def _order_label(o: MedicationOrder) -> str:
    detail = o.dose_text or (str(o.dose) if o.dose else "")
    return f"{o.text} {detail}".strip() if detail and detail not in o.text else o.text


def _join(items: Iterable[str]) -> str:
    items = list(dict.fromkeys(items))
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _order_values(orders: Iterable[MedicationOrder]) -> list[EvidenceValue]:
    return [
        EvidenceValue(
            _order_label(o), o.ref, o.dose_text or (str(o.dose) if o.dose else None), o.start or o.authored_on
        )
        for o in orders
    ]


def _result_value(r: Result) -> EvidenceValue:
    return EvidenceValue(r.name, r.ref, _value(r), r.time)


def _finding(
    rule: Rule, ctx: RuleContext, evidence: Iterable[str], values: Iterable[EvidenceValue], **fields: Any
) -> Finding:
    orders = fields.pop("orders", None)
    if orders is not None:
        fields.setdefault("drugs", _join(o.text for o in orders))
        fields.setdefault("is_are", "is" if len({o.text for o in orders}) == 1 else "are")
    message = rule.message.format_map(_Blank(fields))
    return Finding(
        patient=ctx.chart.patient_ref,
        rule_id=rule.id,
        category=rule.category,
        severity=rule.severity,
        title=rule.title,
        message=message,
        evidence=tuple(dict.fromkeys(evidence)),
        values=tuple(values),
        action=rule.action,
        guideline_ids=rule.guideline_ids,
        sources=rule.sources,
    )


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


# --- evaluators -------------------------------------------------------------------------------------------------


def _threshold_latest(rule: Rule, ctx: RuleContext) -> list[Finding]:
    orders = ctx.drugs(rule)
    if not orders:
        return []
    start = ctx.since(rule.window_hours or 24)
    rows = [r for r in ctx.results(rule) if r.time > start]  # type: ignore[operator]
    if not rows:
        return []  # no value is not a normal value; monitoring-gap rules report the absence
    t = rule.threshold
    assert t is not None
    crossing = [r for r in rows if OPS[t.op](round(r.value, PRECISION), t.value)]  # type: ignore[arg-type]
    if rule.params.get("decide", "latest") == "any":
        # An episode anywhere in the window counts (e.g. a treated hypoglycaemia); cite the most extreme value.
        if not crossing:
            return []
        worst = min if t.op in ("<", "<=") else max
        latest = worst(reversed(crossing), key=lambda r: r.value)  # type: ignore[arg-type, return-value]
    else:
        latest = rows[-1]  # the newest value decides: a high value superseded by a normal one does not fire
        if latest not in crossing:
            return []
    return [
        _finding(
            rule,
            ctx,
            [*(o.ref for o in orders), latest.ref],
            [_result_value(latest), *_order_values(orders)],
            orders=orders,
            value=_value(latest),
            time=_when(latest.time),
            threshold=t.display,
            lab=latest.name,
        )
    ]


def _drug_start(orders: list[MedicationOrder]) -> datetime | None:
    starts = [o.start or o.authored_on for o in orders if (o.start or o.authored_on)]
    return min(starts) if starts else None  # type: ignore[type-var]


def _relative_change(rule: Rule, ctx: RuleContext) -> list[Finding]:
    orders = ctx.drugs(rule)
    if not orders:
        return []
    rows = ctx.results(rule)
    if not rows:
        return []
    latest = rows[-1]
    if latest.time <= ctx.since(float(rule.params.get("latest_within_hours", 48))):  # type: ignore[operator]
        return []
    change = rule.params.get("change", {})
    rising = change.get("direction", "rise") == "rise"
    for c in change.get("criteria", []):
        if c.get("baseline_since_drug_start"):
            started = _drug_start(orders)
            lookback = float(c.get("baseline_before_start_hours", 0))
            floor = (
                (started - timedelta(hours=lookback))
                if started
                else latest.time - timedelta(hours=float(c.get("baseline_hours", 336)))
            )
        else:
            floor = latest.time - timedelta(hours=float(c.get("baseline_hours", 48)))  # type: ignore[operator]
        prior = [r for r in rows[:-1] if floor <= r.time < latest.time]  # type: ignore[operator]
        if not prior:
            continue
        pick = min if c.get("baseline", "lowest" if rising else "highest") == "lowest" else max
        base = pick(prior, key=lambda r: (r.value, r.time))
        b, v = float(base.value), float(latest.value)  # type: ignore[arg-type]
        if c["measure"] == "absolute":
            measured = (v - b) if rising else (b - v)
            target = float(c.get("value_canonical", c["value"]))
        elif c["measure"] == "ratio":
            if b <= 0:
                continue
            measured = v / b if rising else b / v if v > 0 else float("inf")
            target = float(c["value"])
        else:  # fall-fraction (or rise-fraction when rising)
            if b <= 0:
                continue
            measured = (b - v) / b if not rising else (v - b) / b
            target = float(c["value"])
        if OPS[c["op"]](round(measured, PRECISION), target):
            return [
                _finding(
                    rule,
                    ctx,
                    [*(o.ref for o in orders), base.ref, latest.ref],
                    [_result_value(base), _result_value(latest), *_order_values(orders)],
                    orders=orders,
                    value=_value(latest),
                    time=_when(latest.time),
                    baseline=_value(base),
                    baseline_time=_when(base.time),
                    criterion=c.get("label", ""),
                    lab=latest.name,
                )
            ]
    return []


def _allergy_conflict(rule: Rule, ctx: RuleContext) -> list[Finding]:
    cross = set(rule.params.get("cross_reactive_classes") or ())
    out = []
    allergies: list[AllergyFact] = sorted(ctx.chart.active_allergies(), key=lambda a: a.ref)
    # One flag per allergy and drug, citing every copy of a duplicated order (it raised one flag per copy).
    by_drug = _by_drug(o for o in ctx.orders if o.intent != "statement")
    for allergy in allergies:
        for group in by_drug.values():
            ingredients = list(dict.fromkeys(i for o in group for i in o.ingredients))
            same = [i for i in ingredients if i in allergy.ingredients]
            classes = list(
                dict.fromkeys(c for o in group for c in o.classes if c in allergy.classes and c in cross)
            )
            if not same and not classes:
                continue
            terms = terminology()
            if same:
                match = "same drug: " + _join(terms.ingredients[i].name for i in same)
            else:
                match = "cross-reactive class: " + _join(terms.class_label(c) for c in classes)
            reaction = f" (reaction: {', '.join(allergy.reactions)})" if allergy.reactions else ""
            crit = f", criticality {allergy.criticality}" if allergy.criticality else ""
            out.append(
                _finding(
                    rule,
                    ctx,
                    [*(o.ref for o in group), allergy.ref],
                    [
                        *_order_values(group),
                        EvidenceValue(
                            f"Allergy: {allergy.substance}",
                            allergy.ref,
                            (", ".join(allergy.reactions) or None),
                        ),
                    ],
                    order=_join(_order_label(o) for o in group),
                    allergy=allergy.substance + crit,
                    reaction=reaction,
                    match=match,
                )
            )
    return out


def _duplicate_class(rule: Rule, ctx: RuleContext) -> list[Finding]:
    ignore_prn = bool(rule.params.get("ignore_prn", True))
    out = []
    for group in rule.params.get("groups", []):
        classes = set(group.get("classes") or ())
        text_classes = set(group.get("text_classes") or ())
        regex = group.get("_regex")
        members = []
        for o in (o for o in ctx.orders if o.intent != "statement"):
            if ignore_prn and o.timing.as_needed:
                continue
            if classes.intersection(o.classes) or (
                regex is not None and text_classes.intersection(o.classes) and regex.search(o.text)
            ):
                members.append(o)
        # Two orders of one drug (same RxNorm ingredients) are one member of the class, not two drugs of it: that
        # is a duplicate order (kind duplicate-order), never "two anticoagulants" for a single drug.
        drugs = list(_by_drug(members).values())
        if len(drugs) < 2:
            continue
        allowed = [set(p) for p in group.get("allow_class_pairs") or ()]
        involved: dict[str, MedicationOrder] = {}
        for i, a_orders in enumerate(drugs):
            for b_orders in drugs[i + 1 :]:
                a, b = a_orders[0], b_orders[0]
                ok = any(
                    (x in a.classes and y in b.classes) or (y in a.classes and x in b.classes)
                    for x, y in (tuple(p) for p in allowed if len(p) == 2)
                )
                if not ok:
                    involved.update((o.ref, o) for o in (*a_orders, *b_orders))
        if len({drug_identity(o) for o in involved.values()}) < 2:
            continue
        orders = sorted(involved.values(), key=lambda o: o.ref)
        out.append(
            _finding(
                rule,
                ctx,
                [o.ref for o in orders],
                _order_values(orders),
                orders=orders,
                count=str(len(orders)),
                group=group.get("label", group.get("name", "one class")),
                drugs=_join(_order_label(o) for o in orders),
            )
        )
    return out


def _written(o: MedicationOrder) -> datetime | None:
    return o.authored_on or o.start


def _duplicate_order(rule: Rule, ctx: RuleContext) -> list[Finding]:
    """Two or more active orders of one drug: written at different moments (two live orders, which one is meant?),
    or written at the same moment with the same dose and timing (one prescription recorded more than once)."""
    ignore_prn = bool(rule.params.get("ignore_prn", True))
    written = str(rule.params.get("written", "different"))
    members = [o for o in ctx.orders if o.intent != "statement" and not (ignore_prn and o.timing.as_needed)]
    out = []
    for orders in _by_drug(members).values():
        if len(orders) < 2:
            continue
        if written == "same":
            copies: dict[tuple, list[MedicationOrder]] = {}
            for o in orders:
                # a copy says the same thing: product (RxNorm code and text, which carry the strength), dose,
                # route, timing, and the moment it was written
                text = " ".join(o.text.lower().split())
                key = (
                    _written(o),
                    tuple(sorted(o.rxnorm_codes)),
                    text,
                    o.dose,
                    o.dose_text,
                    o.route,
                    repr(o.timing),
                )
                copies.setdefault(key, []).append(o)
            groups = [g for k, g in copies.items() if len(g) > 1 and k[0] is not None]
        else:
            moments = {_written(o) for o in orders}
            groups = [orders] if len(moments) > 1 and None not in moments else []
        for group in groups:
            group = sorted(group, key=lambda o: (_written(o) or ctx.now, o.ref))
            out.append(
                _finding(
                    rule,
                    ctx,
                    [o.ref for o in group],
                    _order_values(group),
                    orders=group,
                    count=str(len(group)),
                    drug=_join(_order_label(o) for o in group),
                    written=_join(_when(_written(o)) for o in group),
                )
            )
    return out


def _administration_without_order(rule: Rule, ctx: RuleContext) -> list[Finding]:
    start = ctx.since(rule.window_hours or 24)
    out = []
    for admin in ctx.chart.administrations:
        if not admin.was_given or admin.time is None or not (start < admin.time <= ctx.now):
            continue
        reason = _why_unordered(admin, ctx)
        if reason is None:
            continue
        evidence = [admin.ref]
        values = [EvidenceValue(admin.text, admin.ref, str(admin.dose) if admin.dose else None, admin.time)]
        order = ctx.orders_by_ref.get(admin.order_ref or "")
        if order is not None:
            evidence.append(order.ref)
            values.append(
                EvidenceValue(
                    f"{_order_label(order)} ({order.status})",
                    order.ref,
                    None,
                    order.start or order.authored_on,
                )
            )
        out.append(
            _finding(rule, ctx, evidence, values, admin=admin.text, time=_when(admin.time), reason=reason)
        )
    return out


def _why_unordered(admin: Administration, ctx: RuleContext) -> str | None:
    if admin.order_ref:
        order = ctx.orders_by_ref.get(admin.order_ref)
        if order is None:
            return f"the order it points to ({admin.order_ref}) is not in the chart"
        if order.is_active:
            if order.start and admin.time and admin.time < order.start:
                return f"its order only starts at {_when(order.start)}"
            if order.end and admin.time and admin.time > order.end:
                return f"its order ended at {_when(order.end)}"
            return None
        if order.status in ("cancelled", "entered-in-error", "draft"):
            return f"its order was {order.status} (never a valid order)"
        if order.end is not None and admin.time is not None and admin.time > order.end:
            return f"its order was {order.status} at {_when(order.end)}"
        return None  # stopped or on hold later, with no stop time before this dose: given while it ran
    # No link: any active order for the same drug covers it.
    for order in (o for o in ctx.orders if o.intent != "statement"):
        if (admin.ingredients and set(admin.ingredients) & set(order.ingredients)) or (
            not admin.ingredients and admin.text.strip().lower() == order.text.strip().lower()
        ):
            return None
    return "there is no active order for this drug"


def _schedule_text(order: MedicationOrder, interval: float) -> str:
    t = order.timing
    if t.frequency and t.period and t.period_unit:
        per = {"h": "hour", "d": "day", "wk": "week", "min": "minute", "s": "second"}.get(
            t.period_unit, t.period_unit
        )
        period = f"{format_number(t.period)} {per}s" if t.period != 1 else per
        return f"{t.frequency} time{'s' if t.frequency != 1 else ''} per {period}"
    return f"every {format_number(interval)} h"


def _order_not_administered(rule: Rule, ctx: RuleContext) -> list[Finding]:
    if rule.params.get("requires_admission") and not ctx.admitted:
        return []
    started_hours = float(rule.params.get("started_hours", 24))
    factor = float(rule.params.get("interval_factor", 1.5))
    out = []
    # Copies of one drug's order are judged together: a dose charted against either copy is that drug given (the
    # duplicate itself is duplicate-order's flag), and a drug not given raises one flag citing every copy.
    for group in _by_drug(o for o in ctx.orders if o.intent != "statement").values():
        given = [
            a
            for a in ctx.chart.administrations
            if a.was_given and a.time is not None and a.time <= ctx.now and any(_covers(a, o) for o in group)
        ]
        missed: list[tuple[MedicationOrder, float, float]] = []
        for order in group:
            interval = order.timing.interval_hours()
            if interval is None:
                continue  # PRN or no fixed schedule
            started = order.start or order.authored_on
            if started is None or started > ctx.since(started_hours):
                continue
            hours = max(rule.window_hours or 24, interval * factor)
            floor = ctx.since(hours)
            if not any(a.time > floor for a in given):  # type: ignore[operator]
                missed.append((order, interval, hours))
        if not missed:
            continue
        order, interval, hours = missed[0]
        last = max(given, key=lambda a: a.time) if given else None  # type: ignore[arg-type, return-value]
        orders = [o for o, _, _ in missed]
        values = _order_values(orders)
        if last is not None:
            values.append(EvidenceValue(f"Last administration: {last.text}", last.ref, None, last.time))
        out.append(
            _finding(
                rule,
                ctx,
                [
                    *(o.ref for o in orders),
                    *([last.ref] if last is not None else []),
                ],  # the stated last time cites its record
                values,
                order=_join(_order_label(o) for o in orders),
                schedule=_schedule_text(order, interval),
                hours=format_number(round(hours, 1)),
                last=f" (last charted {_when(last.time)})" if last else " (none charted)",
            )
        )
    return out


def _covers(admin: Administration, order: MedicationOrder) -> bool:
    if admin.order_ref:
        return admin.order_ref == order.ref
    return bool(set(admin.ingredients) & set(order.ingredients))


def _monitoring_gap(rule: Rule, ctx: RuleContext) -> list[Finding]:
    if rule.params.get("requires_admission") and not ctx.admitted:
        return []
    min_age = rule.params.get("min_age")
    if min_age is not None:
        age = ctx.age()
        if age is None or age < int(min_age):
            return []
    orders = ctx.drugs(rule)
    if not orders:
        return []
    hours = rule.window_hours or 72
    floor = ctx.since(hours)
    gaps: list[tuple[str, Result | None]] = []
    for label, analytes in rule.params["_monitor"]:
        single = len(rule.params["_monitor"]) == 1 and analytes == (rule.analyte,)
        rows = sorted(
            (
                r
                for a in analytes
                for r in (
                    ctx.results(rule, numeric=False)
                    if single
                    else ctx.results(rule, numeric=False, analyte=a)
                )
            ),
            key=lambda r: (r.time, r.ref),
        )
        if any(r.time > floor for r in rows):  # type: ignore[operator]
            continue
        gaps.append((label, rows[-1] if rows else None))
    if not gaps:
        return []
    values = _order_values(orders)
    tails = []
    for label, last in gaps:
        if last is not None:
            values.append(_result_value(last))
            tails.append(f"last {label} {_value(last)} at {_when(last.time)}")
        else:
            tails.append(f"no {label} on file")
    lasts = [last.ref for _, last in gaps if last is not None]
    return [
        _finding(
            rule,
            ctx,
            [*(o.ref for o in orders), *lasts],  # "last INR 2.1" cites it
            values,
            orders=orders,
            hours=format_number(hours),
            window=str(rule.params.get("window_text") or f"{format_number(hours)} hours"),
            missing=" or ".join(label for label, _ in gaps),  # "no renal function test or electrolyte test"
            last=" (" + "; ".join(tails) + ")",
            age=str(ctx.age() or ""),
        )
    ]


@cache
def condition_sets() -> dict[str, dict[str, Any]]:
    """Named sets of diagnosis codes and names (assistant/data/conditions.toml), for drug-condition rules."""
    with resources.files("assistant.data").joinpath("conditions.toml").open("rb") as fh:
        data = tomllib.load(fh)
    out = {}
    for key, spec in data.items():
        names = tuple(str(n).lower() for n in spec.get("names", ()))
        pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b") if names else None
        out[key] = {
            "label": spec["label"],
            "codes": frozenset(str(c) for c in (*spec.get("snomed", ()), *spec.get("icd10", ()))),
            "pattern": pattern,
            "source": spec.get("source", ""),
        }
    return out


def _condition_matches(cond: ConditionFact, spec: dict[str, Any]) -> bool:
    if spec["codes"].intersection(cond.codes):
        return True
    return bool(spec["pattern"] and spec["pattern"].search(cond.text.lower()))


def _drug_condition(rule: Rule, ctx: RuleContext) -> list[Finding]:
    """A drug with a diagnosis it is hazardous in (history or active), unless a protecting drug is also taken."""
    orders = ctx.drugs(rule)
    if not orders:
        return []
    spec = condition_sets()[rule.params["conditions"]]
    active_only = rule.params.get("condition_status", "any") == "active"
    conditions = sorted(
        (
            c
            for c in ctx.chart.conditions
            if _condition_matches(c, spec)
            and (c.onset is None or c.onset <= ctx.now)
            and (
                not active_only
                or c.clinical_status in (None, "active", "recurrence", "relapse")
                or c.clinical_status is None
            )
            and c.clinical_status != "entered-in-error"
        ),
        key=lambda c: c.ref,
    )
    if not conditions:
        return []
    ingredients, classes = rule.params["_unless"]
    if ingredients or classes:
        protected = [
            o
            for o in ctx.orders
            if (o.intent != "statement" or rule.params.get("include_statements"))
            and (ingredients.intersection(o.ingredients) or classes.intersection(o.classes))
        ]
        if protected:
            return []
    return [
        _finding(
            rule,
            ctx,
            [*(o.ref for o in orders), *(c.ref for c in conditions)],
            [
                *_order_values(orders),
                *(
                    EvidenceValue(f"Condition: {c.text}", c.ref, c.clinical_status, c.onset)
                    for c in conditions
                ),
            ],
            orders=orders,
            condition=_join(c.text for c in conditions),
            condition_label=spec["label"],
        )
    ]


EVALUATORS: dict[str, Callable[[Rule, RuleContext], list[Finding]]] = {
    "threshold-latest": _threshold_latest,
    "relative-change": _relative_change,
    "allergy-conflict": _allergy_conflict,
    "duplicate-class": _duplicate_class,
    "duplicate-order": _duplicate_order,
    "administration-without-order": _administration_without_order,
    "order-not-administered": _order_not_administered,
    "monitoring-gap": _monitoring_gap,
    "drug-condition": _drug_condition,
}


def evaluate(
    chart: Chart,
    *,
    now: datetime,
    catalogue: Catalogue | None = None,
    skip: frozenset[str] | set[str] = frozenset(),
) -> list[Finding]:
    """Every finding the catalogue's rules raise on `chart` as of `now`, most severe first; pure and deterministic.

    `skip` names rules not to judge (see `not_judged_rules`: a resource type they read is missing from the chart).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    catalogue = catalogue or default_catalogue()
    ctx = RuleContext(chart, now)
    findings: list[Finding] = []
    for rule in catalogue.rules:
        if rule.id not in skip:
            findings.extend(EVALUATORS[rule.kind](rule, ctx))
    fired = {f.rule_id for f in findings}
    # A broad rule stays quiet when the more specific one it names already says it (e.g. eGFR < 45 vs < 30).
    findings = [
        f
        for f in findings
        if not fired.intersection(catalogue.rule(f.rule_id).params.get("_suppressed_by", ()))
    ]
    findings.sort(key=lambda f: f.sort_key)
    return findings


# --- what a rule needs, and when its data is too old ---------------------------------------------------------


def required_types(rule: Rule) -> frozenset[str]:
    """FHIR resource types a rule reads; with one of them missing its verdict cannot be trusted."""
    types: set[str] = set()
    if (
        rule.drug_ingredients
        or rule.drug_classes
        or rule.kind
        in (
            "allergy-conflict",
            "duplicate-class",
            "duplicate-order",
            "administration-without-order",
            "order-not-administered",
        )
    ):
        # Medication lists (MedicationStatement) add to the orders but are not required: without them a rule still
        # judges the orders it has, and no verdict rests on a statement being absent.
        types.add("MedicationRequest")
    if rule.analyte or rule.params.get("_monitor"):
        types.add("Observation")
    if rule.kind == "allergy-conflict":
        types.add("AllergyIntolerance")
    if rule.kind in ("administration-without-order", "order-not-administered"):
        types.add("MedicationAdministration")
    if rule.kind == "drug-condition":
        types.add("Condition")
    if rule.params.get("requires_admission"):
        types.add("Encounter")
    return frozenset(types)


def types_read(catalogue: Catalogue) -> frozenset[str]:
    """Every resource type some rule of the catalogue reads: a type outside it cannot change an audit's verdicts."""
    return frozenset(t for r in catalogue.rules for t in required_types(r))


def not_judged_rules(catalogue: Catalogue, missing_types: Iterable[str]) -> frozenset[str]:
    """Rules that cannot be judged when these resource types are missing ("*": an unknown part is missing).

    Every rule that reads a missing type is left out: those resting on an absence ("no INR", "no administration",
    "no order") would fire falsely, and the others would stay silent without saying why.
    """
    missing = set(missing_types)
    if not missing:
        return frozenset()
    if "*" in missing:
        return frozenset(catalogue.ids)
    return frozenset(r.id for r in catalogue.rules if required_types(r) & missing)


@dataclass(frozen=True, slots=True)
class StaleData:
    """The chart's newest data is older than some rules' windows at the judged time: they could not fire."""

    judged_at: datetime
    newest_data: datetime | None
    rules: tuple[str, ...]

    @property
    def text(self) -> str:
        newest = _when(self.newest_data) if self.newest_data else "none dated"
        return (
            f"judged at {_when(self.judged_at)}; newest data {newest} "
            f"(older than the look-back window of {len(self.rules)} rule{'s' if len(self.rules) != 1 else ''})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "judged_at": self.judged_at.isoformat(),
            "newest_data": self.newest_data.isoformat() if self.newest_data else None,
            "rules": list(self.rules),
            "text": self.text,
        }


def newest_data_time(chart: Chart) -> datetime | None:
    """The newest dated fact of the chart (result, administration, order, encounter, note, condition)."""
    times = [r.time for r in chart.results if r.time is not None]
    times += [a.time for a in chart.administrations if a.time is not None]
    for o in chart.orders:
        times += [t for t in (o.start, o.authored_on, o.end) if t is not None]
    for e in chart.encounters:
        times += [t for t in (e.start, e.end) if t is not None]
    times += [n.time for n in chart.notes if n.time is not None]
    times += [c.onset for c in chart.conditions if c.onset is not None]
    return max(times) if times else None


def stale_data(chart: Chart, now: datetime, catalogue: Catalogue | None = None) -> StaleData | None:
    """None when the chart has data inside every rule's window at `now`; otherwise what to tell the reader."""
    catalogue = catalogue or default_catalogue()
    newest = newest_data_time(chart)
    if newest is not None and newest > now:
        newest = max((t for t in _times_upto(chart, now)), default=None)
    age_hours = (now - newest).total_seconds() / 3600 if newest is not None else float("inf")
    rules = tuple(r.id for r in catalogue.rules if r.lookback_hours and r.lookback_hours < age_hours)
    if not rules:
        return None
    return StaleData(judged_at=now, newest_data=newest, rules=rules)


def _times_upto(chart: Chart, now: datetime) -> Iterable[datetime]:
    for r in chart.results:
        if r.time is not None and r.time <= now:
            yield r.time
    for a in chart.administrations:
        if a.time is not None and a.time <= now:
            yield a.time

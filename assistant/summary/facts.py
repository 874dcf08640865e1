"""The fact sheet: numbered facts (F1, F2, ...) chosen by clinical priority, each with provenance and content."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any, Protocol

from assistant.model import (
    SEVERITY_ORDER,
    Administration,
    AllergyFact,
    Chart,
    Finding,
    MedicationOrder,
    Result,
    format_number,
)
from assistant.terminology import terminology

NOTE_QUOTE_CHARS = 240
GUIDELINE_QUOTE_CHARS = 320
DEFAULT_MAX_FACTS = 20
PINNED_KINDS = ("severity", "allergy", "no-allergy", "no-allergy-record")  # never cut to keep the sheet short


@cache
def vocabulary() -> dict[str, Any]:
    with resources.files("assistant.summary").joinpath("vocabulary.toml").open("rb") as fh:
        return tomllib.load(fh)


class GuidelinePassage(Protocol):
    """What the fact sheet needs from a retrieved guideline passage (guidelines.retrieval.GuidelineHit)."""

    citation: str
    title: str
    section_path: str
    text: str


@dataclass(frozen=True, slots=True)
class Fact:
    """One numbered fact. `text` is the line the LLM sees and the verifier reads; the rest is structure."""

    tag: str  # F1, F2, ...
    kind: str  # flag, result, news2, severity, allergy, no-allergy, medication, administration, pending, ...
    label: str
    text: str
    provenance: tuple[str, ...]  # ResourceType/id or guideline:<chunk-id>
    priority: int = 9
    value: str | None = None
    number: float | None = None
    unit: str | None = None
    time: datetime | None = None
    analyte: str | None = None
    ingredients: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    frequency: str | None = None  # canonical interval: q24h, q12h, prn, ...
    severity: str | None = None  # for flags: high|medium|low; for results: critical|abnormal
    must_cover: bool = False  # high-severity flags and critical values must reach the summary
    quoted: bool = False  # text holds chart free text (a note) quoted as data
    sentence: str = ""  # the template sentence, without tags
    section: str = "summary"  # I-PASS section: illness, patient, action, situation
    related_times: tuple[datetime, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("time",):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        data["related_times"] = [t.isoformat() for t in self.related_times]
        return data


@dataclass(slots=True)
class FactSheet:
    patient: str
    facts: list[Fact]
    now: datetime
    allowed_refs: frozenset[str] = (
        frozenset()
    )  # refs of this patient's chart plus the guideline citations given
    has_active_allergy: bool = False
    omitted: int = 0  # candidate facts left out to keep the sheet short

    def by_tag(self) -> dict[str, Fact]:
        return {f.tag: f for f in self.facts}

    def by_ref(self) -> dict[str, list[Fact]]:
        out: dict[str, list[Fact]] = {}
        for f in self.facts:
            for ref in f.provenance:
                out.setdefault(ref, []).append(f)
        return out

    def must_cover(self) -> list[Fact]:
        return [f for f in self.facts if f.must_cover]

    def render(self) -> str:
        """The numbered list given to the LLM as data."""
        return "\n".join(f"[{f.tag}] {f.text}" for f in self.facts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "now": self.now.isoformat(),
            "omitted": self.omitted,
            "facts": [f.to_dict() for f in self.facts],
        }


# --- formatting helpers -------------------------------------------------------------------------------------


def fmt_time(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M") if when else "time unknown"


def frequency_of(order: MedicationOrder) -> str | None:
    t = order.timing
    if t.as_needed:
        return "prn"
    hours = t.interval_hours()
    if hours:
        return f"q{format_number(round(hours, 2))}h"
    return None


FREQ_PHRASES = {
    "q24h": ("daily", "once daily", "qd", "every 24 hours", "nightly", "at bedtime"),
    "q12h": ("twice daily", "bid", "every 12 hours"),
    "q8h": ("three times daily", "tid", "every 8 hours"),
    "q6h": ("four times daily", "qid", "every 6 hours"),
    "prn": ("as needed", "prn"),
}
FREQ_WORDS = {
    "q24h": "once daily",
    "q12h": "twice daily",
    "q8h": "three times daily",
    "q6h": "four times daily",
    "prn": "as needed",
}


def frequency_words(freq: str | None) -> str:
    if not freq:
        return ""
    if freq in FREQ_WORDS:
        return FREQ_WORDS[freq]
    m = re.fullmatch(r"q([\d.]+)h", freq)
    return f"every {m.group(1)} hours" if m else freq


def order_phrase(order: MedicationOrder) -> str:
    """Drug, dose, route and frequency, each said once."""
    phrase = order.text.strip()

    def has(words: Iterable[str]) -> bool:
        low = phrase.lower()
        return any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", low) for w in words)

    dose = order.dose_text or (str(order.dose) if order.dose else "")
    if dose and dose.lower() not in phrase.lower():
        phrase += f" {dose}"
    if order.route:
        route = re.sub(r"\s+route$", "", order.route.strip(), flags=re.I)
        if not has(ROUTE_WORDS.get(route.lower(), (route.lower(),))):
            phrase += f" {route.lower()}"
    freq = frequency_of(order)
    words = frequency_words(freq)
    if words and freq and not has(FREQ_PHRASES.get(freq, (words,))):
        phrase += f" {words}"
    return phrase


ROUTE_WORDS = {
    "oral": ("oral", "po", "by mouth"),
    "intravenous": ("intravenous", "iv"),
    "subcutaneous": ("subcutaneous", "sc", "subcut", "sq"),
    "intramuscular": ("intramuscular", "im"),
}
DISPLAY_UNITS = {
    "{INR}": "",
    "{score}": "",
    "{Score}": "",
    "{ratio}": "",
    "mm[Hg]": "mmHg",
    "Cel": "°C",
    "10*3/uL": "x10^3/uL",
    "[IU]/mL": "IU/mL",
    "{beats}/min": "/min",
    "{breaths}/min": "/min",
}


def display_value(r: Result) -> str:
    if r.value is not None:
        unit = DISPLAY_UNITS.get(r.unit or "", r.unit or "")
        return f"{format_number(r.value)} {unit}".strip()
    return r.display_value()


_TAG_LIKE = re.compile(r"\[[^\]]*\]|\bF\d+\b")


def quote_chart_text(text: str, limit: int) -> str:
    """Chart free text as inert data: one line, no brackets or tag look-alikes, no quotes to break out of."""
    flat = " ".join(text.split())
    flat = _TAG_LIKE.sub(" ", flat).replace('"', "'")
    flat = " ".join(flat.split())
    if len(flat) > limit:
        flat = flat[: limit - 1].rsplit(" ", 1)[0] + "…"
    return flat


def _strip_period(text: str) -> str:
    return text.strip().rstrip(".").strip()


# --- candidate facts ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Candidate:
    priority: int
    order: int
    kwargs: dict[str, Any] = field(default_factory=dict)


def critical_side(result: Result) -> str | None:
    """'high' or 'low' when the value is critical: HH/LL from the laboratory, else the critical_limits table."""
    interp = (result.interpretation or "").upper()
    if interp in ("HH", ">"):
        return "high"
    if interp in ("LL", "<"):
        return "low"
    if interp == "AA":
        return "high" if result.ref_high is not None and (result.value or 0) > result.ref_high else "low"
    limits = vocabulary().get("critical_limits", {}).get(result.analyte)
    if limits and result.value is not None:
        if result.value >= limits["high"]:
            return "high"
        if result.value <= limits["low"]:
            return "low"
    return None


def level_word(result: Result) -> str | None:
    crit = critical_side(result)
    if crit:
        return f"critical {crit}"
    interp = (result.interpretation or "").upper()
    if interp in ("H",) or (
        result.value is not None and result.ref_high is not None and result.value > result.ref_high
    ):
        return "high"
    if interp in ("L",) or (
        result.value is not None and result.ref_low is not None and result.value < result.ref_low
    ):
        return "low"
    if result.abnormal:
        return "abnormal"
    return None


def _result_fact(chart: Chart, r: Result, priority: int, must: bool) -> dict[str, Any]:
    history = chart.results_for(r.analyte)
    earlier = [h for h in history if h.time and r.time and h.time < r.time and h.value is not None]
    level = level_word(r)
    value = display_value(r)
    when = fmt_time(r.time)
    text = f"{r.name} {value}" + (f" ({level})" if level else "") + f" at {when}"
    sentence = f"{r.name} was {value}" + (f", {level}," if level else "") + f" at {when}"
    related: list[datetime] = []
    if earlier and r.value is not None:
        prev = earlier[-1]
        direction = "rising" if r.value > prev.value else "falling" if r.value < prev.value else "unchanged"  # type: ignore[operator]
        trend = f"{direction} from {display_value(prev)} at {fmt_time(prev.time)}"
        text += f", {trend}"
        sentence += f", {trend}"
        if prev.time:
            related.append(prev.time)
    return dict(
        kind="result",
        label=r.name,
        text=text,
        sentence=sentence,
        provenance=(r.ref,),
        value=value,
        number=r.value,
        unit=r.unit,
        time=r.time,
        analyte=r.analyte,
        priority=priority,
        must_cover=must,
        severity="critical" if level and level.startswith("critical") else "abnormal" if level else None,
        section="situation",
        related_times=tuple(related),
    )


def _flag_fact(f: Finding) -> dict[str, Any]:
    tm = terminology()
    values = "; ".join(
        f"{v.label} {v.value}" if v.value and v.value not in v.label else v.label for v in f.values
    )
    text = f"{f.severity}-severity flag: {_strip_period(f.title)}. {_strip_period(f.message)}."
    if values:
        text += f" Values: {values}."
    if f.action:
        text += f" Action: {_strip_period(f.action)}."
    ings, classes = tm.match_names(" ".join([f.title, f.message, values, f.action]))
    sentence = (
        f"{f.severity.capitalize()}-severity flag: {_strip_period(f.title)}. {_strip_period(f.message)}"
    )
    times = tuple(v.time for v in f.values if v.time)
    must = f.severity == "high"
    return dict(
        kind="flag",
        label=f.title,
        text=text,
        sentence=sentence,
        provenance=tuple(f.evidence),
        severity=f.severity,
        priority={"high": 0, "medium": 3, "low": 6}.get(f.severity, 6),
        must_cover=must,
        ingredients=ings,
        classes=classes + tm.classes_of(ings),
        section="situation",
        related_times=times,
        time=times[0] if times else None,
    )


def _allergy_fact(a: AllergyFact) -> dict[str, Any]:
    tm = terminology()
    crit = f", criticality {a.criticality}" if a.criticality else ""
    reactions = f", reaction: {', '.join(a.reactions)}" if a.reactions else ""
    text = f"Allergy: {a.substance}{crit}{reactions}"
    return dict(
        kind="allergy",
        label=a.substance,
        text=text,
        sentence=text,
        provenance=(a.ref,),
        ingredients=a.ingredients,
        classes=a.classes + tm.classes_of(a.ingredients),
        priority=2,
        section="patient",
    )


def _order_fact(o: MedicationOrder, priority: int, note: str, now: datetime) -> dict[str, Any]:
    tm = terminology()
    phrase = order_phrase(o)
    text = f"{note}: {phrase}"
    if "high-alert" in o.classes:
        text += " (ISMP high-alert medication)"
    started = o.start or o.authored_on
    if note.startswith("New") and started:
        text += f", ordered {fmt_time(started)}"
    if note.startswith("Stopped") and o.end:
        text += f", stopped {fmt_time(o.end)}"
    ings = o.ingredients
    return dict(
        kind="medication",
        label=o.text,
        text=text,
        sentence=text,
        provenance=(o.ref,),
        ingredients=ings,
        classes=tuple(dict.fromkeys(o.classes + tm.classes_of(ings))),
        frequency=frequency_of(o),
        priority=priority,
        time=started,
        section="situation" if "high-alert" in o.classes else "patient",
        value=o.dose_text or (str(o.dose) if o.dose else None),
    )


def _last_given(chart: Chart, order: MedicationOrder) -> Administration | None:
    given = [a for a in chart.administrations if a.order_ref == order.ref and a.was_given and a.time]
    return max(given, key=lambda a: a.time) if given else None  # type: ignore[arg-type, return-value]


def administration_facts(chart: Chart, now: datetime) -> list[dict[str, Any]]:
    """Due and overdue scheduled doses, and doses recorded as not given, from orders and administrations."""
    cfg = vocabulary()["administration"]
    grace = timedelta(hours=cfg["overdue_grace_hours"])
    window = timedelta(hours=cfg["due_window_hours"])
    tm = terminology()
    out: list[dict[str, Any]] = []
    for o in chart.active_orders():
        hours = o.timing.interval_hours()
        if not hours:
            continue
        last = _last_given(chart, o)
        anchor = last.time if last else (o.start or o.authored_on)
        if anchor is None:
            continue
        due = anchor + timedelta(hours=hours) if last else anchor
        if o.end and due > o.end:
            continue
        ings = o.ingredients
        classes = tuple(dict.fromkeys(o.classes + tm.classes_of(ings)))
        last_text = f"; last given {fmt_time(last.time)}" if last else "; no dose recorded as given"
        prov = (o.ref,) + ((last.ref,) if last else ())
        base = dict(
            provenance=prov,
            ingredients=ings,
            classes=classes,
            frequency=frequency_of(o),
            section="action",
            label=o.text,
            time=due,
            related_times=(last.time,) if last and last.time else (),
        )
        if due < now - grace:
            text = f"Overdue dose: {order_phrase(o)} was due {fmt_time(due)}{last_text}"
            out.append(
                {
                    **base,
                    "kind": "administration",
                    "text": text,
                    "sentence": text,
                    "priority": 4,
                    "severity": "overdue",
                }
            )
        elif due <= now + window:
            text = f"Dose due: {order_phrase(o)} due {fmt_time(due)}{last_text}"
            out.append(
                {
                    **base,
                    "kind": "administration",
                    "text": text,
                    "sentence": text,
                    "priority": 5,
                    "severity": "due",
                }
            )
    recent = now - timedelta(hours=24)
    for a in chart.administrations:
        if a.status in ("not-done", "stopped") and a.time and a.time >= recent:
            reason = f" (reason: {quote_chart_text(a.status_reason, 80)})" if a.status_reason else ""
            text = f"Dose not given: {a.text} at {fmt_time(a.time)}{reason}"
            out.append(
                dict(
                    kind="administration",
                    label=a.text,
                    text=text,
                    sentence=text,
                    provenance=(a.ref,),
                    ingredients=a.ingredients,
                    classes=tuple(dict.fromkeys(a.classes + tm.classes_of(a.ingredients))),
                    time=a.time,
                    priority=5,
                    section="action",
                    severity="not-given",
                )
            )
    return out


def build_fact_sheet(
    chart: Chart,
    findings: Sequence[Finding] = (),
    guidelines: Iterable[GuidelinePassage] = (),
    *,
    now: datetime,
    max_facts: int = DEFAULT_MAX_FACTS,
    news2: News2 | None | str = "auto",
    include_context: bool = True,
) -> FactSheet:
    """Candidate facts ranked by clinical priority; high-severity flags and critical values always stay.

    `news2="auto"` scores NEWS2 with assistant.rules.news2 (pure, from the chart's vital signs); None skips it.
    """
    if news2 == "auto":
        news2 = news2_from_rules(chart, now)
    cands: list[_Candidate] = []

    def add(priority: int, kw: dict[str, Any]) -> None:
        kw.setdefault("priority", priority)
        cands.append(_Candidate(kw["priority"], len(cands), kw))

    patient = chart.patient_ref
    for f in sorted((f for f in findings if f.patient == patient), key=lambda f: f.sort_key):
        add(0, _flag_fact(f))

    sev = illness_severity_fact(chart, findings, news2 if isinstance(news2, News2) else None, patient)
    if sev is not None:
        add(1, sev)

    latest: dict[str, Result] = {}
    for r in chart.results:
        if r.is_usable and (r.value is not None or r.value_text):
            cur = latest.get(r.analyte)
            if cur is None or (r.time and cur.time and r.time > cur.time):
                latest[r.analyte] = r
    for r in sorted(latest.values(), key=lambda r: r.time, reverse=True):  # type: ignore[arg-type, return-value]
        crit = critical_side(r) is not None
        if crit:
            add(1, _result_fact(chart, r, 1, True))
        elif r.abnormal:
            add(4, _result_fact(chart, r, 4, False))

    active = chart.active_allergies()
    for a in active:
        add(2, _allergy_fact(a))
    if not active:
        nka = [
            a
            for a in chart.allergies
            if a.no_known_allergy and a.verification_status not in ("refuted", "entered-in-error")
        ]
        if nka:
            text = "No known allergies recorded (no-known-allergy statement)"
            add(
                2,
                dict(
                    kind="no-allergy",
                    label="No known allergies",
                    text=text,
                    sentence=text,
                    provenance=(nka[0].ref,),
                    section="patient",
                ),
            )
        else:
            text = "No allergy record in the chart (allergy status not documented)"
            add(
                2,
                dict(
                    kind="no-allergy-record",
                    label="Allergy status not documented",
                    text=text,
                    sentence=text,
                    provenance=(patient,),
                    section="patient",
                ),
            )

    seen_orders: set[str] = set()
    for o in chart.active_orders():
        if "high-alert" in o.classes:
            add(3, _order_fact(o, 3, "High-alert medication", now))
            seen_orders.add(o.ref)
    new_cut = now - timedelta(hours=vocabulary()["administration"]["new_order_hours"])
    for o in chart.orders:
        started = o.start or o.authored_on
        if o.ref in seen_orders:
            continue
        if o.is_active and started and new_cut <= started <= now:
            add(5, _order_fact(o, 5, "New order", now))
        elif o.status in ("stopped", "cancelled", "on-hold") and o.end and new_cut <= o.end <= now:
            add(5, _order_fact(o, 5, "Stopped order" if o.status != "on-hold" else "Order on hold", now))

    for kw in administration_facts(chart, now):
        add(kw["priority"], kw)

    for r in chart.results:
        if r.status == "registered":
            text = f"Pending result: {r.name} (ordered, no value yet)" + (
                f", collected {fmt_time(r.time)}" if r.time else ""
            )
            add(
                6,
                dict(
                    kind="pending",
                    label=r.name,
                    text=text,
                    sentence=text,
                    provenance=(r.ref,),
                    analyte=r.analyte,
                    time=r.time,
                    section="action",
                    severity="pending",
                ),
            )

    for i, hit in enumerate(guidelines):
        if i >= 3:
            break
        excerpt = quote_chart_text(hit.text, GUIDELINE_QUOTE_CHARS)
        first = re.split(r"(?<=[.!?])\s+", excerpt)[0]
        where = f"{hit.title} - {hit.section_path}" if hit.section_path else hit.title
        text = f'Guideline "{quote_chart_text(where, 120)}": "{excerpt}"'
        sentence = f"Guideline ({quote_chart_text(where, 120)}): {_strip_period(first)}"
        add(
            7,
            dict(
                kind="guideline",
                label=hit.title,
                text=text,
                sentence=sentence,
                provenance=(hit.citation,),
                section="situation",
            ),
        )

    if include_context:
        p = chart.patient
        age = p.age_on(now.date())
        bits = [b for b in (f"{age}-year-old" if age is not None else "", p.sex or "") if b]
        text = "Patient: " + (" ".join(bits) if bits else "age and sex not recorded")
        add(
            3,
            dict(
                kind="demographics",
                label="Patient",
                text=text,
                sentence=text,
                provenance=(patient,),
                section="patient",
            ),
        )
        e = chart.encounter
        if e is not None:
            bed = bed_label(e)
            where = ", ".join(x for x in (f"ward {e.ward_name}" if e.ward_name else "", bed) if x)
            text = "Admitted " + (fmt_time(e.start) if e.start else "(date not recorded)")
            if e.reason:
                text += f" for {quote_chart_text(e.reason, 80)}"
            if where:
                text += f", {where}"
            add(
                3,
                dict(
                    kind="encounter",
                    label="Encounter",
                    text=text,
                    sentence=text,
                    provenance=(e.ref,),
                    time=e.start,
                    section="patient",
                ),
            )
        conds = chart.active_conditions()[:4]
        for c in conds:
            text = f"Active condition: {quote_chart_text(c.text, 80)}"
            add(
                6,
                dict(
                    kind="condition",
                    label=c.text,
                    text=text,
                    sentence=text,
                    provenance=(c.ref,),
                    section="patient",
                ),
            )
        notes = sorted((n for n in chart.notes if n.time), key=lambda n: n.time, reverse=True)[:2]  # type: ignore[arg-type, return-value]
        for n in notes:
            text = (
                f'Note "{quote_chart_text(n.title, 60)}" at {fmt_time(n.time)} (chart text, quoted as data): '
                f'"{quote_chart_text(n.text, NOTE_QUOTE_CHARS)}"'
            )
            add(
                8,
                dict(
                    kind="note",
                    label=n.title,
                    text=text,
                    sentence="",
                    provenance=(n.ref,),
                    time=n.time,
                    quoted=True,
                    section="situation",
                ),
            )

    def pinned(c: _Candidate) -> bool:
        return bool(c.kwargs.get("must_cover")) or c.kwargs["kind"] in PINNED_KINDS

    must = [c for c in cands if pinned(c)]
    rest = sorted((c for c in cands if not pinned(c)), key=lambda c: (c.priority, c.order))
    keep = must + rest[: max(0, max_facts - len(must))]
    keep.sort(key=lambda c: (c.priority, c.order))
    facts = [Fact(tag=f"F{i}", **c.kwargs) for i, c in enumerate(keep, 1)]
    allowed = frozenset(chart.fact_refs()) | frozenset(
        ref for f in facts for ref in f.provenance if ref.startswith("guideline:")
    )
    return FactSheet(
        patient=patient,
        facts=facts,
        now=now,
        allowed_refs=allowed,
        has_active_allergy=bool(active),
        omitted=len(cands) - len(keep),
    )


# --- illness severity ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class News2:
    """The NEWS2 aggregate as the fact sheet needs it (adapted from assistant.rules.news2 when present)."""

    score: int
    refs: tuple[str, ...]
    single_param_3: bool = False
    time: datetime | None = None
    missing: int = 0  # parameters without a recent value: the score may be understated


def bed_label(e: Any) -> str:
    """'bed 03' from a bed name that may repeat the ward ('4B Med-Surg bed 03')."""
    bed = (e.bed_name or "") if e is not None else ""
    if e is not None and e.ward_name and bed.startswith(e.ward_name):
        bed = bed[len(e.ward_name) :].strip()
    if bed and "bed" not in bed.lower():
        bed = f"bed {bed}"
    return bed


def news2_from_rules(chart: Chart, now: datetime) -> News2 | None:
    """NEWS2 from assistant.rules.news2 when that module is installed; None when no vital sign was scored."""
    try:
        from assistant.rules.news2 import news2 as score_news2
    except ImportError:
        return None
    score = score_news2(chart, now=now)
    if not score.parameters:
        return None
    times = [p.time for p in score.parameters if p.time]
    return News2(
        score=score.total,
        refs=tuple(score.evidence),
        single_param_3=any(p.points >= 3 for p in score.parameters),
        time=max(times) if times else None,
        missing=len(score.missing),
    )


def illness_severity_fact(
    chart: Chart, findings: Sequence[Finding], news2: News2 | None, patient: str
) -> dict[str, Any] | None:
    cfg = vocabulary()["ipass"]
    high = [f for f in findings if f.patient == patient and f.severity == "high"]
    reasons: list[str] = []
    level = "stable"
    refs: list[str] = []
    if news2 is not None:
        refs += list(news2.refs)
        risk = (
            "high clinical risk"
            if news2.score >= cfg["unstable_news2"]
            else "medium clinical risk"
            if news2.score >= cfg["watcher_news2"]
            else "low clinical risk"
        )
        reasons.append(f"NEWS2 {news2.score} ({risk})")
        if news2.score >= cfg["unstable_news2"]:
            level = "unstable"
        elif news2.score >= cfg["watcher_news2"] or news2.single_param_3:
            level = "watcher"
        if news2.single_param_3:
            reasons.append("a single NEWS2 parameter scores 3")
        if news2.missing:
            reasons.append(
                f"{news2.missing} NEWS2 parameter{'s' if news2.missing > 1 else ''} not recorded recently"
            )
    if high:
        n = len(high)
        reasons.append(f"{n} high-severity flag" + ("s" if n > 1 else ""))
        refs += [r for f in high for r in f.evidence]
        if cfg["watcher_if_high_severity_flag"] and level == "stable":
            level = "watcher"
    if news2 is None and not high:
        reasons.append("NEWS2 not available and no high-severity flags")
        refs.append(patient)
    text = f"Illness severity {level}: " + "; ".join(reasons)
    return dict(
        kind="severity",
        label="Illness severity",
        value=level,
        text=text,
        sentence=text,
        provenance=tuple(dict.fromkeys(refs)),
        section="illness",
        number=float(news2.score) if news2 else None,
        time=news2.time if news2 else None,
    )


def severity_rank(level: str) -> int:
    return {"unstable": 0, "watcher": 1, "stable": 2}.get(level, 3)


def high_flags(findings: Sequence[Finding], patient: str) -> list[Finding]:
    return [f for f in findings if f.patient == patient and SEVERITY_ORDER.get(f.severity) == 0]

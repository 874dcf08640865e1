"""The fact sheet: numbered facts (F1, F2, ...) chosen by clinical priority, each with provenance and content."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
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
from assistant.rules.news2 import NEWS2_FLAG_CATEGORY
from assistant.summary.citations import make_visible, neutralise_tags
from assistant.summary.claims import extract_claims, stem
from assistant.summary.display import in_unit, reported, show_result
from assistant.summary.vocab import vocabulary
from assistant.terminology import terminology

__all__ = ["vocabulary"]  # re-exported: views and the dashboard read the administration settings through it

NOTE_QUOTE_CHARS = 240
NOTE_SENTENCE_CHARS = 160
GUIDELINE_QUOTE_CHARS = 320
DEFAULT_MAX_FACTS = 20
PINNED_KINDS = ("severity", "allergy", "no-allergy", "no-allergy-record")  # never cut to keep the sheet short


class GuidelinePassage(Protocol):
    """What the fact sheet needs from a retrieved guideline passage (guidelines.retrieval.GuidelineHit)."""

    citation: str
    title: str
    section_path: str
    text: str


Subject = tuple[str, str]  # ("analyte", key) | ("ingredient", key) | ("class", key)


@dataclass(frozen=True, slots=True)
class Atom:
    """What one record states on the sheet: a claim holds only when one atom holds all of its parts."""

    ref: str  # the record (ResourceType/id) or rule (rule:<id>) that states it
    role: str  # latest | previous | baseline | threshold | ordered | due | given | held | stopped | admitted | allergy
    subjects: tuple[Subject, ...] = ()
    value: float | None = None
    unit: str | None = None  # as on the record (UCUM code or spelling)
    time: datetime | None = None
    frequency: str | None = None
    level: str | None = None  # high | low | critical high | critical low | abnormal | None (in range)
    direction: str | None = None  # rising | falling | flat, against the earlier value on the same sheet line
    words: tuple[str, ...] = ()  # allergy: stems of the reaction and criticality words

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["time"] = self.time.isoformat() if self.time else None
        return data


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
    atoms: tuple[Atom, ...] = ()  # the record-level statements the verifier binds claims to

    @property
    def group(self) -> str:
        """Summary group of this fact (vocabulary.toml [summary_groups])."""
        return str(vocabulary()["summary_groups"]["kinds"].get(self.kind, "history"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("time",):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        data["related_times"] = [t.isoformat() for t in self.related_times]
        data["atoms"] = [a.to_dict() for a in self.atoms]
        data["group"] = self.group
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


_PROMPT_STAMP = re.compile(r"\b(\d{4})-(\d{2})-(\d{2}) (\d{2}:\d{2})(?: UTC)?")


def relative_times(text: str, now: datetime) -> str:
    """Chart times of today and yesterday (UTC, as every fact states them) as "05:00 today" / "22:21 yesterday".

    For a small local model's prompt only: the tokenizer spells a date digit by digit, so "2026-12-01 05:00" is 16
    tokens and "05:00 today" 7, read in the prompt and written again in the answer. The verifier resolves both words
    against the sheet's clock and still checks the sentence against the fact's full times. Older dates stay whole."""
    today = now.astimezone(UTC).date()
    words = {today: "today", today - timedelta(days=1): "yesterday"}

    def short(m: re.Match[str]) -> str:
        try:
            day = date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:  # not a date (chart text can hold anything): left as written
            return m.group(0)
        return f"{m.group(4)} {words[day]}" if day in words else m.group(0)

    return _PROMPT_STAMP.sub(short, text)


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


def display_value(r: Result, unit: str | None = None) -> str:
    """The value as the lab reported it (one unit per test), at the analyte's precision: '132 mmHg', '36.9 °C'."""
    return show_result(r, unit)


def chart_text(text: str) -> str:
    """Chart text shown in a sentence: tag look-alikes can never cite, invisible controls are made visible."""
    return make_visible(neutralise_tags(text or ""))


_TAG_LIKE = re.compile(r"\[[^\]]*\]|\bF\d+\b")


def quote_chart_text(text: str, limit: int) -> str:
    """Chart free text as inert data: one line, no brackets or tag look-alikes, no quotes to break out of."""
    flat = " ".join(make_visible(text or "").split())
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


def _subjects_of_text(text: str) -> tuple[Subject, ...]:
    c = extract_claims(text)
    return tuple(
        [("ingredient", i) for i in sorted(c.ingredients)] + [("class", k) for k in sorted(c.classes)]
    )


def _drug_subjects(ingredients: Iterable[str], classes: Iterable[str], text: str) -> tuple[Subject, ...]:
    out: list[Subject] = [("ingredient", i) for i in ingredients] + [("class", k) for k in classes]
    out += [s for s in _subjects_of_text(text) if s not in out]
    return tuple(dict.fromkeys(out))


def _quantity_atoms(ref: str, role: str, subjects: tuple[Subject, ...], text: str, **kw: Any) -> list[Atom]:
    """One atom per amount the record's text states ('40 mg/0.4 mL ... 40 mg': 40 mg and 0.4 mL)."""
    return [
        Atom(ref, role, subjects, value=v, unit=u, **kw)
        for v, _, u in extract_claims(text).numbers
        if u is not None
    ]


def _direction(new: float | None, old: float | None) -> str | None:
    if new is None or old is None:
        return None
    return "rising" if new > old else "falling" if new < old else "flat"


def result_atom(r: Result, role: str, direction: str | None = None) -> Atom:
    value, unit = reported(r)
    return Atom(
        r.ref,
        role,
        (("analyte", r.analyte),),
        value=value,
        unit=unit,
        time=r.time,
        level=level_word(r) if role == "latest" else None,
        direction=direction,
    )


def _result_fact(chart: Chart, r: Result, priority: int, must: bool) -> dict[str, Any]:
    history = chart.results_for(r.analyte)
    earlier = [h for h in history if h.time and r.time and h.time < r.time and h.value is not None]
    level = level_word(r)
    value = display_value(r)
    when = fmt_time(r.time)
    name = chart_text(r.name)
    text = f"{name} {value}" + (f" ({level})" if level else "") + f" at {when}"
    sentence = f"{name} was {value}" + (f", {level}," if level else "") + f" at {when}"
    related: list[datetime] = []
    refs = [r.ref]
    prev = earlier[-1] if earlier and r.value is not None else None
    direction = _direction(r.value, prev.value) if prev is not None else None
    atoms = [result_atom(r, "latest", direction)]
    if prev is not None:
        # one unit per test: the earlier value in the unit the latest was reported in
        _, unit = reported(r)
        word = {"rising": "rising", "falling": "falling", "flat": "unchanged"}[direction or "flat"]
        trend = f"{word} from {display_value(prev, unit)} at {fmt_time(prev.time)}"
        text += f", {trend}"
        sentence += f", {trend}"
        refs.append(prev.ref)
        shown = in_unit(prev, unit)
        atoms.append(
            Atom(prev.ref, "previous", (("analyte", r.analyte),), value=shown, unit=unit, time=prev.time)
        )
        if prev.time:
            related.append(prev.time)
    return dict(
        kind="result",
        label=r.name,
        text=text,
        sentence=sentence,
        provenance=tuple(dict.fromkeys(refs)),
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
        atoms=tuple(atoms),
    )


def rule_atoms(rule_id: str) -> tuple[list[Atom], str | None]:
    """Threshold numbers of a catalogue rule as atoms citing `rule:<id>` (empty when the rule is unknown)."""
    try:
        from assistant.rules.engine import default_catalogue

        rule = default_catalogue().rule(rule_id)
    except (KeyError, ImportError, ValueError):
        return [], None
    ref = f"rule:{rule.id}"
    subjects: tuple[Subject, ...] = (("analyte", rule.analyte),) if rule.analyte else ()
    atoms: list[Atom] = []
    canonical = (
        terminology().analytes[rule.analyte].canonical_unit
        if rule.analyte in terminology().analytes
        else None
    )
    if rule.threshold is not None:
        atoms.append(Atom(ref, "threshold", subjects, value=rule.threshold.value, unit=canonical))
        atoms += _quantity_atoms(ref, "threshold", subjects, rule.threshold.display)
    for c in rule.params.get("change", {}).get("criteria", []):
        unit = c.get("unit")
        if "value" in c:
            atoms.append(Atom(ref, "threshold", subjects, value=float(c["value"]), unit=unit))
        if "value_canonical" in c:
            atoms.append(Atom(ref, "threshold", subjects, value=float(c["value_canonical"]), unit=canonical))
        atoms += _quantity_atoms(ref, "threshold", subjects, str(c.get("label", "")))
    return atoms, ref


def _flag_fact(f: Finding, chart: Chart | None = None) -> dict[str, Any]:
    tm = terminology()
    values = "; ".join(
        f"{v.label} {v.value}" if v.value and v.value not in v.label else v.label for v in f.values
    )
    title, message = chart_text(_strip_period(f.title)), chart_text(_strip_period(f.message))
    text = f"{f.severity}-severity flag: {title}. {message}."
    if values:
        text += f" Values: {chart_text(values)}."
    if f.action:
        text += f" Action: {chart_text(_strip_period(f.action))}."
    ings, classes = tm.match_names(" ".join([f.title, f.message, values, f.action]))
    sentence = f"{f.severity.capitalize()}-severity flag: {title}. {message}"
    times = tuple(v.time for v in f.values if v.time)
    must = f.severity == "high"
    atoms, rule_ref = rule_atoms(f.rule_id)
    atoms += _evidence_atoms(f, chart)
    provenance = tuple(f.evidence) + (
        (rule_ref,) if rule_ref and any(a.ref == rule_ref for a in atoms) else ()
    )
    return dict(
        kind="flag",
        label=f.title,
        text=text,
        sentence=sentence,
        provenance=provenance,
        severity=f.severity,
        priority={"high": 0, "medium": 3, "low": 6}.get(f.severity, 6),
        must_cover=must,
        ingredients=ings,
        classes=classes + tm.classes_of(ings),
        section="situation",
        related_times=times,
        time=times[0] if times else None,
        atoms=tuple(atoms),
    )


def _evidence_atoms(f: Finding, chart: Chart | None) -> list[Atom]:
    """Atoms of the records a finding rests on, each in the role it plays (baseline, latest, ordered, given)."""
    if chart is None:
        return []
    results = {r.ref: r for r in chart.results}
    orders = {o.ref: o for o in chart.orders}
    admins = {a.ref: a for a in chart.administrations}
    cited = [results[ref] for ref in f.evidence if ref in results]
    cited += [results[v.ref] for v in f.values if v.ref in results and results[v.ref] not in cited]
    atoms: list[Atom] = []
    by_analyte: dict[str, list[Result]] = {}
    for r in cited:
        by_analyte.setdefault(r.analyte, []).append(r)
    for analyte, rows in by_analyte.items():
        rows.sort(key=lambda r: (r.time is None, r.time))
        newest = chart.latest(analyte)
        for i, r in enumerate(rows):
            is_latest = newest is not None and r.ref == newest.ref
            base = rows[0] if len(rows) > 1 and i == len(rows) - 1 else None
            role = (
                "latest" if is_latest else ("baseline" if len(rows) > 1 and i < len(rows) - 1 else "previous")
            )
            atoms.append(result_atom(r, role, _direction(r.value, base.value) if base is not None else None))
            if is_latest and role != "latest":
                atoms.append(result_atom(r, "latest"))
    for ref in dict.fromkeys([*f.evidence, *(v.ref for v in f.values)]):
        o = orders.get(ref)
        if o is not None:
            atoms += order_atoms(o)
        a = admins.get(ref)
        if a is not None:
            subjects = _drug_subjects(a.ingredients, a.classes, a.text)
            role = "given" if a.was_given else "held"
            atoms.append(Atom(a.ref, role, subjects, time=a.time))
            atoms += _quantity_atoms(a.ref, role, subjects, a.text, time=a.time)
    return atoms


def order_routes(o: MedicationOrder) -> tuple[str, ...]:
    """'route:oral' etc.: the order's route field and any route its own text states (vocabulary.toml [routes])."""
    from assistant.summary.claims import matchers

    m = matchers()
    found = {
        m.route_map[x.group(1).lower()] for x in m.route_re.finditer(f"{o.route or ''} {order_phrase(o)}")
    }
    return tuple(f"route:{r}" for r in sorted(found))


def order_atoms(o: MedicationOrder, role: str = "ordered") -> list[Atom]:
    """The order's amounts, route words and frequency, each bound to the order's drugs."""
    subjects = _drug_subjects(o.ingredients, o.classes, o.text)
    freq = frequency_of(o)
    started = o.start or o.authored_on
    routes = order_routes(o)
    atoms = [Atom(o.ref, role, subjects, time=started, frequency=freq, words=routes)]
    # "every 4 hours as needed": every frequency the order's own text states is the order's frequency
    for other in sorted(extract_claims(order_phrase(o)).frequencies - {freq}):
        atoms.append(Atom(o.ref, role, subjects, time=started, frequency=other))
    atoms += _quantity_atoms(o.ref, role, subjects, order_phrase(o), time=started, frequency=freq)
    if o.dose is not None and o.dose.value is not None:
        atoms.append(
            Atom(
                o.ref,
                role,
                subjects,
                value=float(o.dose.value),
                unit=o.dose.unit,
                time=started,
                frequency=freq,
            )
        )
    if o.end is not None:
        atoms.append(Atom(o.ref, "stopped", subjects, time=o.end, frequency=freq))
    return atoms


def _allergy_fact(a: AllergyFact) -> dict[str, Any]:
    tm = terminology()
    substance = chart_text(a.substance)
    crit = f", criticality {a.criticality}" if a.criticality else ""
    reactions = f", reaction: {', '.join(chart_text(x) for x in a.reactions)}" if a.reactions else ""
    text = f"Allergy: {substance}{crit}{reactions}"
    classes = a.classes + tm.classes_of(a.ingredients)
    words = tuple(
        dict.fromkeys(
            stem(w) for w in re.findall(r"[A-Za-z][A-Za-z'’]+", " ".join([*a.reactions, a.criticality or ""]))
        )
    )
    atom = Atom(
        a.ref,
        "allergy",
        _drug_subjects(a.ingredients, classes, a.substance),
        words=words,
        level=a.criticality,
    )
    return dict(
        kind="allergy",
        label=a.substance,
        text=text,
        sentence=text,
        provenance=(a.ref,),
        ingredients=a.ingredients,
        classes=classes,
        priority=2,
        section="patient",
        atoms=(atom,),
    )


def _order_fact(o: MedicationOrder, priority: int, note: str, now: datetime) -> dict[str, Any]:
    tm = terminology()
    phrase = chart_text(order_phrase(o))
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
        atoms=tuple(order_atoms(o)),
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
        subjects = _drug_subjects(o.ingredients, classes, o.text)
        atoms = [*order_atoms(o), Atom(o.ref, "due", subjects, time=due, frequency=frequency_of(o))]
        if last is not None:
            atoms.append(Atom(last.ref, "given", subjects, time=last.time))
        base = dict(
            provenance=prov,
            ingredients=ings,
            classes=classes,
            frequency=frequency_of(o),
            section="action",
            label=o.text,
            time=due,
            related_times=(last.time,) if last and last.time else (),
            atoms=tuple(atoms),
        )
        if due < now - grace:
            text = f"Overdue dose: {chart_text(order_phrase(o))} was due {fmt_time(due)}{last_text}"
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
            text = f"Dose due: {chart_text(order_phrase(o))} due {fmt_time(due)}{last_text}"
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
            text = f"Dose not given: {chart_text(a.text)} at {fmt_time(a.time)}{reason}"
            subjects = _drug_subjects(a.ingredients, a.classes, a.text)
            held = [Atom(a.ref, "held", subjects, time=a.time)]
            held += _quantity_atoms(a.ref, "held", subjects, a.text, time=a.time)
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
                    atoms=tuple(held),
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
        add(0, _flag_fact(f, chart))

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
            text = f"Pending result: {chart_text(r.name)} (ordered, no value yet)" + (
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
                    atoms=(Atom(r.ref, "pending", (("analyte", r.analyte),), time=r.time),),
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
                    atoms=(Atom(e.ref, "admitted", time=e.start),),
                ),
            )
        conds = chart.active_conditions()[:4]
        for c in conds:
            text = f"Active condition: {chart_text(quote_chart_text(c.text, 80))}"
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
            title, body = quote_chart_text(n.title, 60), quote_chart_text(n.text, NOTE_QUOTE_CHARS)
            text = f'Note "{title}" at {fmt_time(n.time)} (chart text, quoted as data): "{body}"'
            # the nurse sees the note's own words, quoted and cited; never a paraphrase of them
            sentence = f'{title} at {fmt_time(n.time)}: "{quote_chart_text(n.text, NOTE_SENTENCE_CHARS)}"'
            add(
                8,
                dict(
                    kind="note",
                    label=n.title,
                    text=text,
                    sentence=sentence.strip(),
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
        ref for f in facts for ref in f.provenance if ref.startswith(("guideline:", "rule:"))
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
    band: str = ""  # low | low-medium | medium | high (news2.yaml responses); "" when not known
    response: str = ""  # the RCP 2017 clinical response of the band


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
        band=score.band,
        response=score.response,
    )


def illness_severity_fact(
    chart: Chart, findings: Sequence[Finding], news2: News2 | None, patient: str
) -> dict[str, Any] | None:
    cfg = vocabulary()["ipass"]
    # The NEWS2 escalation flag (category early-warning) restates NEWS2, which this line states itself: only the
    # other high-severity flags are counted, so NEWS2 is said once.
    own_high = [f for f in findings if f.patient == patient and f.severity == "high"]
    high = [f for f in own_high if not (news2 is not None and f.category == NEWS2_FLAG_CATEGORY)]
    # "other" only when NEWS2 raised a high flag itself; otherwise these are all the high flags there are
    news2_flagged = len(high) < len(own_high)
    reasons: list[str] = []
    level = "stable"
    refs: list[str] = []
    if news2 is not None:
        refs += list(news2.refs)
        risk = (
            f"{news2.band} clinical risk"
            if news2.band
            else (
                "high clinical risk"
                if news2.score >= cfg["unstable_news2"]
                else "medium clinical risk"
                if news2.score >= cfg["watcher_news2"]
                else "low clinical risk"
            )
        )
        response = news2.response.strip().rstrip(".")
        reasons.append(f"NEWS2 {news2.score}, {risk}" + (f" ({response})" if response else ""))
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
        other = "other " if news2_flagged else ""
        reasons.append(f"{n} {other}high-severity flag" + ("s" if n > 1 else ""))
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
        atoms=(
            (
                Atom(
                    news2.refs[0] if news2.refs else patient,
                    "latest",
                    (("analyte", "news2"),),
                    float(news2.score),
                    time=news2.time,
                ),
                *(
                    [
                        Atom(
                            news2.refs[0] if news2.refs else patient,
                            "parameter",
                            (("analyte", "news2"),),
                            3.0,
                        )
                    ]
                    if news2.single_param_3
                    else []
                ),
            )
            if news2
            else ()
        ),
    )


def severity_rank(level: str) -> int:
    return {"unstable": 0, "watcher": 1, "stable": 2}.get(level, 3)


def high_flags(findings: Sequence[Finding], patient: str) -> list[Finding]:
    return [f for f in findings if f.patient == patient and SEVERITY_ORDER.get(f.severity) == 0]

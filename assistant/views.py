"""Streamlit-free view model of a patient and a ward: what every screen, the CLI and the benchmarks show."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

from assistant.model import SEVERITY_ORDER, Chart, CodeStatus, DataQualityIssue, Finding, Result
from assistant.normalize import code_status
from assistant.rules.news2 import NEWS2_FLAG_CATEGORY, News2Score, news2, news2_table
from assistant.summary.display import show_result
from assistant.summary.facts import administration_facts, bed_label, critical_side, vocabulary

SEVERITIES = ("high", "medium", "low")


@cache
def acuity_table() -> dict[str, Any]:
    """assistant/data/acuity.toml: tiers, NEWS2 band display, hold phrases, delta and do-now windows."""
    with resources.files("assistant.data").joinpath("acuity.toml").open("rb") as fh:
        return tomllib.load(fh)


# --- NEWS2 ----------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class News2Point:
    time: datetime
    score: int
    band: str = ""
    parts: dict[str, int] = field(default_factory=dict)
    refs: tuple[str, ...] = ()
    incomplete: bool = False


@dataclass(frozen=True, slots=True)
class News2Now:
    total: int | None  # None: no vital sign was scored
    band: str  # low | low-medium | medium | high | "" when not scored
    band_label: str
    response: str  # the RCP 2017 clinical response of the band
    refs: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # labels of parameters without a recent value: the score may be understated
    time: datetime | None = None  # the latest vital sign scored
    change: int | None = None  # against the previous point of the series; None when there is none
    incomplete: bool = False

    @property
    def trend(self) -> str:
        if self.change is None:
            return ""
        return "up" if self.change > 0 else "down" if self.change < 0 else "same"


def band_label(band: str) -> str:
    return str(acuity_table()["news2_bands"].get(band, {}).get("label", band.capitalize()))


def news2_band_ranges() -> list[tuple[str, str, int, int | None]]:
    """(band, label, lowest total, highest total or None) of the aggregate bands, from news2.yaml's responses."""
    mins: dict[str, int] = {}
    for rule in news2_table()["responses"]:
        if "min_total" in rule:
            band = str(rule["band"])
            mins[band] = min(mins.get(band, 999), int(rule["min_total"]))
    ordered = sorted(mins.items(), key=lambda kv: kv[1])
    out = []
    for i, (band, lo) in enumerate(ordered):
        hi = ordered[i + 1][1] - 1 if i + 1 < len(ordered) else None
        out.append((band, band_label(band), lo, hi))
    return out


def news2_series(
    chart: Chart, now: datetime, *, window: timedelta = timedelta(hours=72), limit: int = 80
) -> list[News2Point]:
    """NEWS2 as it stood at each charted vital-sign time in the window (the calculator scores one moment)."""
    table = news2_table()
    analytes = {spec["analyte"] for spec in table["parameters"].values() if "analyte" in spec}
    times = sorted(
        {
            r.time
            for r in chart.results
            if r.is_usable
            and r.time is not None
            and (r.analyte in analytes or r.category == "vital-signs")
            and now - window <= r.time <= now
        }
    )
    points = []
    for t in times[-limit:]:
        score = news2(chart, now=t)
        if score.parameters:
            points.append(
                News2Point(
                    time=t,
                    score=score.total,
                    band=score.band,
                    parts=dict(score.points),
                    refs=tuple(score.evidence),
                    incomplete=bool(score.missing),
                )
            )
    return points


def news2_now(score: News2Score | None, series: list[News2Point]) -> News2Now:
    if score is None or not score.parameters:
        return News2Now(
            None, "", "Not scored", "No vital signs recorded in the last 24 h: record a full set."
        )
    labels = {k: str(v.get("label", k)) for k, v in news2_table()["parameters"].items()}
    times = [p.time for p in score.parameters if p.time is not None]
    latest = max(times) if times else None
    earlier = [p for p in series if latest is None or p.time < latest]
    change = score.total - earlier[-1].score if earlier else None
    return News2Now(
        total=score.total,
        band=score.band,
        band_label=band_label(score.band),
        response=score.response,
        refs=tuple(score.evidence),
        missing=tuple(labels.get(m, m) for m in score.missing),
        time=latest,
        change=change,
        incomplete=bool(score.missing),
    )


# --- header ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AllergyLine:
    substance: str
    criticality: str | None
    reactions: tuple[str, ...]
    ref: str

    @property
    def text(self) -> str:
        react = f" ({', '.join(self.reactions)})" if self.reactions else ""
        crit = (
            f" — {self.criticality} criticality"
            if self.criticality and self.criticality != "unable-to-assess"
            else ""
        )
        return f"{self.substance}{react}{crit}"


ISOLATION_TYPE = "Flag"  # the FHIR type isolation precautions are charted in (fhir_codes.toml [isolation])


@dataclass(frozen=True, slots=True)
class IsolationLine:
    """One isolation precaution in force: the chart's words, its kind in words, since when, and its Flag."""

    text: str  # as the chart words it
    kind: str  # contact | droplet | airborne | protective | transmission-based | isolation
    kind_label: str  # "Contact", ... (text beside the colour)
    ref: str  # Flag/id
    start: datetime | None = None
    end: datetime | None = None
    status: str = "active"  # "unknown" when the flag's status could not be read (shown, not hidden)

    @property
    def line(self) -> str:
        since = f" (since {self.start:%d %b %H:%M} UTC)" if self.start else ""
        until = f", until {self.end:%d %b %H:%M} UTC" if self.end else ""
        status = " — status not recorded, check the chart" if self.status == "unknown" else ""
        return f"{self.text}{since}{until}{status}"


@dataclass(frozen=True, slots=True)
class Isolation:
    """Isolation as the header says it: charted (which), none charted, or not retrieved (never 'none' then)."""

    status: str  # "charted" | "none" | "not-retrieved"
    text: str  # THE wording for the app header, census, handoff and PDF
    lines: tuple[IsolationLine, ...] = ()
    reason: str = ""  # why it is not known (not retrieved / a Flag could not be read)

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(line.ref for line in self.lines)

    @property
    def ref(self) -> str:
        return self.lines[0].ref if self.lines else ""

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(line.kind_label for line in self.lines))

    @property
    def badge(self) -> str:
        """Short text for a badge: 'ISOLATION · Contact', 'ISOLATION NOT RETRIEVED' or ''."""
        if self.status == "charted":
            return "ISOLATION · " + " + ".join(self.kinds)
        if self.status == "not-retrieved":
            return "ISOLATION NOT RETRIEVED"
        return ""


ISOLATION_NONE_TEXT = "No isolation charted"
# Types no flag, NEWS2 or dose check rests on: missing, they say so where shown but do not make a chart "not read
# in full" for the acuity order (else a server without Flag would put every patient first).
ACUITY_IGNORES = frozenset({ISOLATION_TYPE})


def isolation_status(chart: Chart, now: datetime) -> Isolation:
    """The patient's isolation: precautions in force at `now`; "not retrieved" when the Flag type was not loaded or
    a Flag could not be read (an incomplete chart never reads as "no isolation")."""
    lines = tuple(
        IsolationLine(i.text, i.kind, i.kind_label, i.ref, i.start, i.end, i.status)
        for i in chart.current_isolation(now)
    )
    missing = dict(getattr(chart, "missing_types", {}) or {})
    reason = missing.get(ISOLATION_TYPE) or missing.get("*")
    why = f"Flag records were not loaded ({reason})" if reason else ""
    read = {i.ref for i in chart.isolation}
    unreadable = sorted(
        {
            i.source
            for i in chart.issues
            if i.severity == "error" and i.source.startswith(f"{ISOLATION_TYPE}/") and i.source not in read
        }
    )
    if unreadable:
        shown = ", ".join(unreadable[:3]) + (
            f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        )
        why = why or f"a Flag record could not be read ({shown})"
    if lines:
        text = "ISOLATION: " + "; ".join(line.line for line in lines)
        if why:
            text += f". Other isolation records may be missing: {why}"
        return Isolation("charted", text, lines, why)
    if why:
        return Isolation(
            "not-retrieved",
            f"Isolation not retrieved — {why}; check the chart before entering the room",
            (),
            why,
        )
    return Isolation("none", ISOLATION_NONE_TEXT)


@dataclass(slots=True)
class Header:
    patient_ref: str
    name: str
    age: int | None
    sex: str | None
    bed: str
    ward: str
    encounter_ref: str | None
    admitted: datetime | None
    reason: str | None
    mrn: str | None
    news2: News2Now
    allergy_status: str  # active | nka | not-recorded
    allergy_text: str  # the one wording of the allergy banner, in the app and the PDF
    allergies: list[AllergyLine] = field(default_factory=list)
    code_status: CodeStatus | None = None
    isolation: Isolation | None = None  # always set by build_header


ALLERGY_NKA_TEXT = "No known allergies (recorded)"
ALLERGY_UNKNOWN_TEXT = "Allergy status not recorded — ask and document"


def allergy_banner(chart: Chart) -> tuple[str, str, list[AllergyLine]]:
    """(status, banner text, lines): active allergies, a no-known-allergy statement, or nothing recorded."""
    active = [
        AllergyLine(a.substance, a.criticality, tuple(a.reactions), a.ref) for a in chart.active_allergies()
    ]
    if active:
        return "active", "ALLERGIES: " + "; ".join(a.text for a in active), active
    nka = [
        a
        for a in chart.allergies
        if a.no_known_allergy and a.verification_status not in ("refuted", "entered-in-error")
    ]
    if nka:
        return "nka", ALLERGY_NKA_TEXT, []
    return "not-recorded", ALLERGY_UNKNOWN_TEXT, []


def chart_code_status(chart: Chart) -> CodeStatus | None:
    """The chart's code status: the newest LOINC 100822-6 observation (assistant.normalize.code_status)."""
    return code_status(chart)


def build_header(chart: Chart, now: datetime, score: News2Score | None, series: list[News2Point]) -> Header:
    p = chart.patient
    e = chart.encounter
    status, text, lines = allergy_banner(chart)
    return Header(
        patient_ref=p.ref,
        name=p.name,
        age=p.age_on(now.date()),
        sex=p.sex,
        bed=bed_label(e) if e else "",
        ward=(e.ward_name or "") if e else "",
        encounter_ref=e.ref if e else None,
        admitted=e.start if e else None,
        reason=e.reason if e else None,
        mrn=p.mrn,
        news2=news2_now(score, series),
        allergy_status=status,
        allergy_text=text,
        allergies=lines,
        code_status=chart_code_status(chart),
        isolation=isolation_status(chart, now),
    )


# --- holds: flags that say "do not give" ----------------------------------------------------------------------
def says_hold(finding: Finding) -> bool:
    phrases = acuity_table()["hold_phrases"]
    text = finding.action.lower()
    return any(re.search(rf"\b{re.escape(p.lower())}\b", text) for p in phrases)


def hold_map(chart: Chart, findings: list[Finding]) -> dict[str, tuple[Finding, ...]]:
    """Medication order ref -> the flags whose action says not to give it (the orders in the flag's evidence)."""
    orders = {o.ref for o in chart.orders}
    out: dict[str, list[Finding]] = {}
    for f in findings:
        if not says_hold(f):
            continue
        for ref in f.evidence:
            if ref in orders:
                out.setdefault(ref, []).append(f)
    return {k: tuple(v) for k, v in out.items()}


def hold_text(flags: tuple[Finding, ...] | list[Finding]) -> str:
    return f"HOLD — see flag: {'; '.join(dict.fromkeys(f.title for f in flags))}" if flags else ""


# --- doses: due now, MAR, pending -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DueDose:
    order_ref: str
    label: str
    time: datetime
    state: str  # late | due
    text: str
    refs: tuple[str, ...] = ()
    hold: bool = False
    hold_flags: tuple[str, ...] = ()  # titles of the flags that say not to give it
    hold_text: str = ""


@dataclass(slots=True)
class MarEvent:
    order_ref: str
    order: str
    time: datetime
    state: str  # given | held | refused | late | due
    ref: str | None = None  # the administration, when there is one
    detail: str = ""
    hold: bool = False
    hold_text: str = ""


@dataclass(frozen=True, slots=True)
class PendingItem:
    kind: str  # overdue | due | not-given | result
    text: str
    time: datetime | None = None
    refs: tuple[str, ...] = ()
    hold: bool = False
    hold_text: str = ""

    def __str__(self) -> str:
        return self.text


def due_doses(
    admin: list[dict[str, Any]], holds: dict[str, tuple[Finding, ...]], now: datetime, within: timedelta
) -> list[DueDose]:
    """Late doses and doses due within `within`, each marked HOLD where a flag says not to give the drug."""
    out = []
    for fact in admin:
        when = fact.get("time")
        sev = fact.get("severity")
        if sev not in ("overdue", "due") or when is None or (sev == "due" and when > now + within):
            continue
        order_ref = fact["provenance"][0]
        flags = holds.get(order_ref, ())
        out.append(
            DueDose(
                order_ref=order_ref,
                label=str(fact.get("label", order_ref)),
                time=when,
                state="late" if sev == "overdue" else "due",
                text=str(fact.get("text", "")),
                refs=tuple(fact["provenance"]),
                hold=bool(flags),
                hold_flags=tuple(dict.fromkeys(f.title for f in flags)),
                hold_text=hold_text(flags),
            )
        )
    out.sort(key=lambda d: (not d.hold, d.time, d.label))
    return out


def is_refusal(reason: str | None) -> bool:
    words = acuity_table()["refusal_words"]
    low = (reason or "").lower()
    return any(re.search(rf"\b{re.escape(w)}\b", low) for w in words)


def mar_events(
    chart: Chart,
    now: datetime,
    *,
    past: timedelta = timedelta(hours=24),
    ahead: timedelta = timedelta(hours=12),
    holds: dict[str, tuple[Finding, ...]] | None = None,
    admin: list[dict[str, Any]] | None = None,
) -> list[MarEvent]:
    """Doses around `now`: given, held and refused (administrations), late and due (scheduled), HOLD-marked."""
    holds = holds or {}
    admin = administration_facts(chart, now) if admin is None else admin
    events: list[MarEvent] = []
    orders = {o.ref: o for o in chart.orders}
    lo, hi = now - past, now + ahead
    for a in chart.administrations:
        if a.time is None or not (lo <= a.time <= hi):
            continue
        order = orders.get(a.order_ref or "")
        if a.was_given:
            state, detail = "given", a.status
        else:
            state = "refused" if is_refusal(a.status_reason) else "held"
            detail = f"{a.status}{': ' + a.status_reason if a.status_reason else ''}"
        events.append(
            MarEvent(a.order_ref or a.ref, order.text if order else a.text, a.time, state, a.ref, detail)
        )
    for fact in admin:
        if fact.get("severity") not in ("overdue", "due") or not fact.get("time"):
            continue
        order_ref = fact["provenance"][0]
        order = orders.get(order_ref)
        due = fact["time"]
        label = order.text if order else str(fact.get("label", order_ref))
        flags = holds.get(order_ref, ())
        state = "late" if fact["severity"] == "overdue" else "due"
        events.append(
            MarEvent(order_ref, label, due, state, None, fact.get("text", ""), bool(flags), hold_text(flags))
        )
        interval = order.timing.interval_hours() if order else None
        if interval:
            step = timedelta(hours=interval)
            nxt = due + step
            for _ in range(200):  # bounded: hourly doses over 12 h is 12
                if nxt > hi or (order and order.end and nxt > order.end):
                    break
                if nxt > now:
                    events.append(
                        MarEvent(
                            order_ref,
                            label,
                            nxt,
                            "due",
                            None,
                            f"scheduled {nxt:%d %b %H:%M}",
                            bool(flags),
                            hold_text(flags),
                        )
                    )
                nxt += step
    events.sort(key=lambda e: (e.time, e.order))
    return events


def pending_window() -> timedelta:
    """The one pending window: the fact sheet's due window (assistant/summary/vocabulary.toml)."""
    return timedelta(hours=float(vocabulary()["administration"]["due_window_hours"]))


def pending_results(chart: Chart) -> list[PendingItem]:
    return [
        PendingItem("result", f"{r.name} result {r.status}", r.time, (r.ref,))
        for r in chart.results
        if r.status in ("registered", "preliminary")
    ]


def pending_items(
    chart: Chart,
    now: datetime,
    *,
    holds: dict[str, tuple[Finding, ...]] | None = None,
    admin: list[dict[str, Any]] | None = None,
) -> list[PendingItem]:
    """What the next shift must not miss: overdue and upcoming doses, doses not given, results still pending."""
    holds = holds or {}
    admin = administration_facts(chart, now) if admin is None else admin
    within = pending_window()
    items: list[PendingItem] = []
    for fact in sorted(admin, key=lambda f: f.get("priority", 9)):
        when = fact.get("time")
        label = str(fact.get("label", ""))[:60]
        refs = tuple(fact.get("provenance", ()))
        flags = holds.get(refs[0], ()) if refs else ()
        mark = hold_text(flags)
        prefix = f"{mark} — " if mark else ""
        if fact.get("severity") == "overdue":
            items.append(
                PendingItem(
                    "overdue",
                    f"{prefix}OVERDUE {label} (due {when:%d %b %H:%M})",
                    when,
                    refs,
                    bool(flags),
                    mark,
                )
            )
        elif fact.get("severity") == "due" and when and when <= now + within:
            items.append(
                PendingItem("due", f"{prefix}{label} due {when:%H:%M}", when, refs, bool(flags), mark)
            )
        elif fact.get("severity") == "not-given":
            items.append(PendingItem("not-given", f"Not given: {label}", when, refs))
    items.sort(key=lambda i: not i.hold)  # a held dose is read first
    return items + pending_results(chart)


# --- labs -----------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class LabRow:
    analyte: str
    name: str
    value: str
    time: datetime | None
    ref: str
    abnormal: bool
    critical: bool
    previous: str | None = None
    change: float | None = None
    trend: str = ""  # up | down | same | ""
    points: list[tuple[datetime, float, str]] = field(default_factory=list)


def lab_rows(chart: Chart, now: datetime, *, window: timedelta = timedelta(hours=72)) -> list[LabRow]:
    """Latest laboratory value per analyte with the change from the one before and the points for a trend chart."""
    by: dict[str, list[Result]] = {}
    for r in chart.results:
        if r.is_lab and (r.value is not None or r.value_text):
            by.setdefault(r.analyte, []).append(r)
    rows = []
    for analyte, results in by.items():
        results.sort(key=lambda r: (r.time, r.ref))  # type: ignore[arg-type, return-value]
        last = results[-1]
        prev = results[-2] if len(results) > 1 else None
        change = None
        if prev is not None and last.value is not None and prev.value is not None:
            change = round(last.value - prev.value, 6)
        rows.append(
            LabRow(
                analyte=analyte,
                name=last.name,
                value=show_result(last),
                time=last.time,
                ref=last.ref,
                abnormal=last.abnormal,
                critical=critical_side(last) is not None,
                previous=show_result(prev) if prev else None,
                change=change,
                trend="" if change is None else "up" if change > 0 else "down" if change < 0 else "same",
                points=[
                    (r.time, r.value, r.ref)
                    for r in results
                    if r.value is not None and r.time is not None and now - window <= r.time <= now
                ],
            )
        )
    rows.sort(key=lambda r: (not r.critical, not r.abnormal, r.name))
    return rows


# --- data quality ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class DataQuality:
    errors: list[DataQualityIssue] = field(default_factory=list)
    warnings: list[DataQualityIssue] = field(default_factory=list)
    news2_missing: tuple[str, ...] = ()
    missing_types: dict[str, str] = field(default_factory=dict)  # resource type -> why it was not loaded

    @property
    def incomplete(self) -> bool:
        return bool(self.errors or self.missing_types)

    def incomplete_beyond(self, types: frozenset[str]) -> bool:
        """Incomplete in a part other than `types` (e.g. only the isolation Flags missing: the header says
        "isolation not retrieved", but no flag or NEWS2 rests on them, so acuity is still judged)."""

        def inside(source: str) -> bool:
            return any(source == t or source.startswith(f"{t}/") for t in types)

        return any(not inside(i.source) for i in self.errors) or any(
            t not in types for t in self.missing_types
        )

    @property
    def banner(self) -> str:
        """One line saying what may be missing ("" when the chart loaded whole)."""
        parts = []
        if self.errors:
            n = len(self.errors)
            parts.append(
                f"Part of this chart could not be loaded ({n} problem{'s' if n != 1 else ''}); "
                "what is shown may be incomplete"
            )
        if self.missing_types:
            parts.append(
                "Not loaded: "
                + "; ".join(f"{t} ({why})" for t, why in sorted(self.missing_types.items()))
                + ". Flags that need them cannot fire"
            )
        if self.news2_missing:
            parts.append(f"NEWS2 may be understated: no recent {', '.join(self.news2_missing)}")
        return ". ".join(parts)


def data_quality(chart: Chart, news: News2Now | None = None) -> DataQuality:
    return DataQuality(
        errors=[i for i in chart.issues if i.severity == "error"],
        warnings=[i for i in chart.issues if i.severity != "error"],
        news2_missing=news.missing if news is not None and news.total is not None else (),
        missing_types=dict(getattr(chart, "missing_types", {}) or {}),
    )


# --- acuity ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Acuity:
    tier: int  # 0 = first in the list
    label: str
    reasons: tuple[str, ...]
    key: tuple  # the full sort key, sickest first


def acuity(findings: list[Finding], news: News2Now | None, *, failed: bool = False, bed: str = "") -> Acuity:
    """One ordering for census and handoff: flags and NEWS2 bands in the same tiers (assistant/data/acuity.toml)."""
    table = acuity_table()
    # The reasons name NEWS2 once, as its band: they count the flags other than NEWS2's own escalation flag. The
    # tie-break still counts that flag, so a NEWS2 of 5 weighs like a high-severity flag within its tier (RCP:
    # urgent response) and does not fall below every patient with one.
    others = [f for f in findings if f.category != NEWS2_FLAG_CATEGORY]
    highs = sum(1 for f in others if f.severity == "high")
    mediums = sum(1 for f in others if f.severity == "medium")
    rank_highs = sum(1 for f in findings if f.severity == "high")
    rank_mediums = sum(1 for f in findings if f.severity == "medium")
    band = news.band if news is not None and news.total is not None else ""
    total = news.total if news is not None and news.total is not None else -1
    chosen = None
    reasons: list[str] = []
    for tier in table["tiers"]:
        met = []
        if tier.get("chart_error") and failed:
            met.append("the chart could not be read in full")
        if band and band in tier.get("news2_bands", ()):
            met.append(f"NEWS2 {total} ({band_label(band).lower()})")
        if tier.get("min_high") and highs >= int(tier["min_high"]):
            met.append(f"{highs} high-severity flag{'s' if highs != 1 else ''}")
        if tier.get("min_medium") and mediums >= int(tier["min_medium"]):
            met.append(f"{mediums} medium-severity flag{'s' if mediums != 1 else ''}")
        criteria = {"chart_error", "news2_bands", "min_high", "min_medium"} & set(tier)
        if met or not criteria:
            chosen = tier
            reasons = met
            break
    assert chosen is not None, "acuity.toml must end with a tier without criteria"
    values = {"high_flags": -rank_highs, "news2": -total, "medium_flags": -rank_mediums}
    key = (int(chosen["tier"]), *(values[k] for k in table["tie_break"]), bed_sort_key(bed))
    return Acuity(int(chosen["tier"]), str(chosen["label"]), tuple(reasons), key)


def bed_sort_key(bed: str) -> tuple:
    """Beds in ward order: 'bed 2' before 'bed 10'."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", bed))


# --- since last shift -----------------------------------------------------------------------------------------
DELTA_LABELS = {  # what each kind of change reads as on a screen (one item)
    "result-new": "New result",
    "result-changed": "Result changed",
    "order-started": "Order started",
    "order-stopped": "Order stopped",
    "dose-given": "Dose given",
    "dose-held": "Dose not given",
    "dose-refused": "Dose refused",
    "dose-missed": "Dose missed",
    "note": "Note",
    "isolation-started": "Isolation started",
    "isolation-lifted": "Isolation lifted",
    "news2": "NEWS2 change",
}


@dataclass(frozen=True, slots=True)
class DeltaItem:
    kind: str  # result-new | result-changed | order-started | order-stopped | dose-given | dose-held |
    # dose-refused | dose-missed | note | isolation-started | isolation-lifted | news2
    time: datetime | None
    text: str
    refs: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return DELTA_LABELS.get(self.kind, self.kind)


@dataclass(slots=True)
class PatientDelta:
    patient_ref: str
    name: str
    bed: str
    since: datetime
    until: datetime
    items: list[DeltaItem] = field(default_factory=list)
    news2_before: int | None = None
    news2_now: int | None = None

    @property
    def news2_change(self) -> int | None:
        if self.news2_before is None or self.news2_now is None:
            return None
        return self.news2_now - self.news2_before

    def count(self, *kinds: str) -> int:
        return sum(1 for i in self.items if i.kind in kinds)


@dataclass(slots=True)
class WardDelta:
    since: datetime
    until: datetime
    patients: list[PatientDelta] = field(default_factory=list)


def default_since(now: datetime) -> datetime:
    return now - timedelta(hours=float(acuity_table()["delta_hours"]))


def _in(t: datetime | None, since: datetime, until: datetime) -> bool:
    return t is not None and since < t <= until


def patient_delta(
    chart: Chart,
    now: datetime,
    since: datetime,
    *,
    news_now: int | None = None,
    admin: list[dict[str, Any]] | None = None,
) -> PatientDelta:
    """What changed in (since, now]: results, orders, doses, notes and NEWS2, newest first."""
    items: list[DeltaItem] = []
    by: dict[str, list[Result]] = {}
    for r in chart.results:
        if r.is_usable and (r.value is not None or r.value_text):
            by.setdefault(r.analyte, []).append(r)
    for rows in by.values():
        rows.sort(key=lambda r: (r.time, r.ref))  # type: ignore[arg-type, return-value]
        for i, r in enumerate(rows):
            if not _in(r.time, since, now) or r.category == "vital-signs":
                continue
            prev = rows[i - 1] if i > 0 else None
            if prev is not None and show_result(prev) != show_result(r):
                items.append(
                    DeltaItem(
                        "result-changed",
                        r.time,
                        f"{r.name} {show_result(r)} (was {show_result(prev)})",
                        (r.ref, prev.ref),
                    )
                )
            else:
                items.append(DeltaItem("result-new", r.time, f"{r.name} {show_result(r)}", (r.ref,)))
    for o in chart.orders:
        started = o.start or o.authored_on
        if _in(started, since, now):
            items.append(DeltaItem("order-started", started, f"Started: {o.text}", (o.ref,)))
        if o.status in ("stopped", "cancelled", "completed", "on-hold") and _in(o.end, since, now):
            what = "On hold" if o.status == "on-hold" else "Stopped"
            items.append(DeltaItem("order-stopped", o.end, f"{what}: {o.text}", (o.ref,)))
    for a in chart.administrations:
        if not _in(a.time, since, now):
            continue
        if a.was_given:
            items.append(DeltaItem("dose-given", a.time, f"Given: {a.text}", (a.ref,)))
        else:
            kind = "dose-refused" if is_refusal(a.status_reason) else "dose-held"
            why = f" ({a.status_reason})" if a.status_reason else ""
            word = "Refused" if kind == "dose-refused" else "Not given"
            items.append(DeltaItem(kind, a.time, f"{word}: {a.text}{why}", (a.ref,)))
    for fact in administration_facts(chart, now) if admin is None else admin:
        if fact.get("severity") == "overdue" and _in(fact.get("time"), since, now):
            items.append(
                DeltaItem("dose-missed", fact["time"], str(fact.get("text", "")), tuple(fact["provenance"]))
            )
    for n in chart.notes:
        if _in(n.time, since, now):
            items.append(DeltaItem("note", n.time, f"Note: {n.title}", (n.ref,)))
    for iso in chart.isolation:
        words = f"{iso.kind_label} — {iso.text}" if iso.text else iso.kind_label
        if _in(iso.start, since, now) and iso.is_current(now):
            items.append(DeltaItem("isolation-started", iso.start, f"Isolation started: {words}", (iso.ref,)))
        if _in(iso.end, since, now):
            items.append(DeltaItem("isolation-lifted", iso.end, f"Isolation lifted: {words}", (iso.ref,)))
    before = news2(chart, now=since)
    before_total = before.total if before.parameters else None
    current = news2(chart, now=now)
    if news_now is None:
        news_now = current.total if current.parameters else None
    if before_total != news_now and news_now is not None:
        was = "not scored" if before_total is None else str(before_total)
        refs = tuple(dict.fromkeys((*current.evidence, *before.evidence)))  # the vitals of both scores
        items.append(DeltaItem("news2", now, f"NEWS2 {news_now} (was {was})", refs))
    items.sort(key=lambda i: i.time or since, reverse=True)
    e = chart.encounter
    return PatientDelta(
        patient_ref=chart.patient_ref,
        name=chart.patient.name,
        bed=bed_label(e) if e else "",
        since=since,
        until=now,
        items=items,
        news2_before=before_total,
        news2_now=news_now,
    )


# --- patient view ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class PatientView:
    patient_id: str
    chart: Chart | None
    findings: list[Finding] = field(default_factory=list)  # engine flags and NEWS2 flags, most severe first
    news2: list[News2Point] = field(default_factory=list)  # the NEWS2 series
    error: str | None = None
    notices: list[str] = field(default_factory=list)  # parts of the view that are unavailable, and why
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_s: float = 0.0
    news2_score: News2Score | None = None  # at `now`
    header: Header | None = None
    holds: dict[str, tuple[Finding, ...]] = field(default_factory=dict)
    labs: list[LabRow] = field(default_factory=list)
    mar: list[MarEvent] = field(default_factory=list)
    pending: list[PendingItem] = field(default_factory=list)
    do_now: list[DueDose] = field(default_factory=list)
    quality: DataQuality = field(default_factory=DataQuality)
    acuity: Acuity | None = None
    delta: PatientDelta | None = None

    @property
    def news2_total(self) -> int | None:
        return (
            self.news2_score.total if self.news2_score is not None and self.news2_score.parameters else None
        )

    @property
    def top_severity(self) -> str | None:
        return self.findings[0].severity if self.findings else None

    @property
    def error_issues(self) -> list[DataQualityIssue]:
        return [i for i in (self.chart.issues if self.chart else []) if i.severity == "error"]

    @property
    def bed(self) -> str:
        return self.header.bed if self.header else ""

    @property
    def patient_ref(self) -> str:
        return self.chart.patient_ref if self.chart is not None else f"Patient/{self.patient_id}"


def build_patient_view(
    chart: Chart,
    now: datetime,
    findings: list[Finding],
    *,
    patient_id: str | None = None,
    since: datetime | None = None,
    score: News2Score | None = None,
) -> PatientView:
    """Everything a screen shows about one patient, from the chart and its flags (pure)."""
    findings = sorted(findings, key=lambda f: f.sort_key)
    score = score if score is not None else news2(chart, now=now)
    series = news2_series(chart, now)
    admin = administration_facts(chart, now)
    holds = hold_map(chart, findings)
    head = build_header(chart, now, score, series)
    within = timedelta(hours=float(acuity_table()["do_now_hours"]))
    view = PatientView(
        patient_id=patient_id or chart.patient_ref.split("/", 1)[-1],
        chart=chart,
        findings=findings,
        news2=series,
        now=now,
        news2_score=score,
        header=head,
        holds=holds,
        labs=lab_rows(chart, now),
        mar=mar_events(chart, now, holds=holds, admin=admin),
        pending=pending_items(chart, now, holds=holds, admin=admin),
        do_now=due_doses(admin, holds, now, within),
        quality=data_quality(chart, head.news2),
    )
    view.acuity = acuity(
        findings, head.news2, failed=view.quality.incomplete_beyond(ACUITY_IGNORES), bed=head.bed
    )
    view.delta = patient_delta(
        chart, now, since or default_since(now), news_now=head.news2.total, admin=admin
    )
    return view


def failed_view(patient_id: str, error: str, now: datetime) -> PatientView:
    view = PatientView(patient_id, None, error=error, now=now)
    view.acuity = acuity([], None, failed=True)
    return view


# --- ward -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FlagBadge:
    severity: str
    title: str
    rule_id: str


@dataclass(slots=True)
class CensusRow:
    patient_id: str
    patient_ref: str
    bed: str
    name: str
    age: int | None
    news2: int | None
    news2_band: str
    news2_band_label: str
    news2_incomplete: bool
    badges: list[FlagBadge]
    holds: list[str]  # drugs on hold (order text)
    due_next_hour: list[DueDose]
    new_results: int
    acuity: Acuity
    illness_severity: str = ""
    error: str | None = None
    news2_response: str = ""
    isolation: Isolation | None = None  # the header's isolation (badge text: isolation.badge)


def delta_since(view: PatientView, since: datetime) -> PatientDelta | None:
    """The view's delta for a look-back the nurse picked (the view's own when it is the same)."""
    if view.chart is None:
        return None
    if view.delta is not None and view.delta.since == since:
        return view.delta
    return patient_delta(view.chart, view.now, since, news_now=view.news2_total)


def census_row(view: PatientView, illness_severity: str = "", *, since: datetime | None = None) -> CensusRow:
    chart = view.chart
    head = view.header
    orders = {o.ref: o.text for o in chart.orders} if chart else {}
    delta = delta_since(view, since) if since is not None else view.delta
    new = delta.count("result-new", "result-changed") if delta else 0
    return CensusRow(
        patient_id=view.patient_id,
        patient_ref=chart.patient_ref if chart else f"Patient/{view.patient_id}",
        bed=head.bed if head else "",
        name=head.name if head else f"Patient/{view.patient_id} (not loaded)",
        age=head.age if head else None,
        news2=head.news2.total if head else None,
        news2_band=head.news2.band if head else "",
        news2_band_label=head.news2.band_label if head else "",
        news2_incomplete=head.news2.incomplete if head else False,
        badges=[
            FlagBadge(f.severity, f.title, f.rule_id)
            for f in sorted(view.findings, key=lambda f: SEVERITY_ORDER.get(f.severity, 9))
        ],
        holds=[orders.get(ref, ref) for ref in view.holds],
        due_next_hour=list(view.do_now),
        new_results=new,
        acuity=view.acuity or acuity(view.findings, head.news2 if head else None, failed=True),
        illness_severity=illness_severity,
        error=view.error,
        news2_response=head.news2.response if head else "",
        isolation=head.isolation if head else None,
    )


def sort_by_acuity(views: list[PatientView]) -> list[PatientView]:
    return sorted(views, key=lambda v: (v.acuity.key if v.acuity else (0,), v.patient_id))


@dataclass(slots=True)
class WardView:
    ward_ref: str | None
    ward_name: str | None
    now: datetime
    since: datetime
    rows: list[CensusRow] = field(default_factory=list)  # acuity order
    patients: dict[str, PatientView] = field(default_factory=dict)
    handoff: Any = None  # assistant.summary.handoff.WardHandoff, same order as rows
    delta: WardDelta | None = None
    errors: list[str] = field(default_factory=list)


def ward_delta(views: list[PatientView], since: datetime, now: datetime) -> WardDelta:
    deltas = [delta_since(v, since) for v in sort_by_acuity(views)]
    return WardDelta(since, now, [d for d in deltas if d is not None])


def to_jsonable(obj: Any) -> Any:
    """A view (dataclasses, datetimes, tuples) as plain JSON values, e.g. for `nva census --format json`."""
    if is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, PatientView):
            raise TypeError("a PatientView holds the whole chart; serialise its parts")
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj

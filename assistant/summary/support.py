"""Support: what the cited records hold, and whether each bound claim finds ONE record that holds all its parts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from assistant.summary.claims import (
    Claims,
    ValueClaim,
    When,
    canonical_unit,
    extract_claims,
    matchers,
    roles_config,
)
from assistant.summary.display import decimals_for
from assistant.summary.facts import Atom, Fact, Subject
from assistant.terminology import terminology

REL_TOL_CONVERTED = (
    0.01  # a value converted between units (5.5 mmol/L glucose = 99 mg/dL) may differ by rounding
)


# --- the union of what the cited facts say (sentence-level checks) -----------------------------------------


@dataclass(slots=True)
class Support:
    numbers: list[tuple[float, str | None]] = field(default_factory=list)
    dates: set[tuple[int, int, int]] = field(default_factory=set)
    times: set[tuple[int, int]] = field(default_factory=set)
    stamps: set[tuple[int, int, int, int, int]] = field(default_factory=set)
    ingredients: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    analytes: set[str] = field(default_factory=set)
    frequencies: set[str] = field(default_factory=set)
    qualifiers: set[str] = field(default_factory=set)
    severities: set[str] = field(default_factory=set)
    negation: bool = False
    allergy: bool = False
    words: set[str] = field(default_factory=set)
    advice: set[str] = field(default_factory=set)
    atoms: list[Atom] = field(default_factory=list)
    # role and cue words the records' own text uses without a time or number, and the causes it states
    unbound_roles: set[str] = field(default_factory=set)
    unbound_cues: set[str] = field(default_factory=set)
    causes: set[str] = field(default_factory=set)

    def add_claims(self, c: Claims) -> None:
        self.numbers += [(v, u) for v, _, u in c.numbers]
        self.dates |= {d for d in c.dates if d[0] is not None}  # type: ignore[misc]
        for opts in c.date_options:
            self.dates |= {d for d in opts if d[0] is not None}  # type: ignore[misc]
        self.times |= c.times
        self.stamps |= c.stamps
        self.ingredients |= c.ingredients
        self.classes |= c.classes
        self.analytes |= c.analytes
        self.frequencies |= c.frequencies
        self.qualifiers |= c.qualifiers
        self.severities |= c.severities
        self.negation = self.negation or c.negation
        self.allergy = self.allergy or c.allergy
        self.words |= c.words
        self.advice |= c.advice
        self.unbound_roles |= {r.role for r in c.roles if r.when is None}
        self.unbound_cues |= {cue for cue, _ in c.unbound_cues}
        self.causes |= c.causes

    def add_time(self, when: datetime | None) -> None:
        if when is not None:
            self.dates.add((when.year, when.month, when.day))
            self.times.add((when.hour, when.minute))
            self.stamps.add((when.year, when.month, when.day, when.hour, when.minute))

    def add_atom(self, a: Atom) -> None:
        self.atoms.append(a)
        if a.value is not None:
            self.numbers.append((a.value, canonical_unit(a.unit)))
        self.add_time(a.time)
        for kind, key in a.subjects:
            {"analyte": self.analytes, "ingredient": self.ingredients, "class": self.classes}[kind].add(key)
        if a.frequency:
            self.frequencies.add(a.frequency)


def fact_support(fact: Fact, now: datetime | None = None) -> Support:
    s = Support()
    s.add_claims(extract_claims(fact.text, now))
    if fact.sentence:
        s.add_claims(extract_claims(fact.sentence, now))
    if fact.number is not None:
        s.numbers.append((fact.number, canonical_unit(fact.unit)))
    s.add_time(fact.time)
    for t in fact.related_times:
        s.add_time(t)
    if fact.analyte:
        s.analytes.add(fact.analyte)
    tm = terminology()
    s.ingredients |= set(fact.ingredients)
    s.classes |= set(fact.classes) | set(tm.classes_of([i for i in fact.ingredients if i in tm.ingredients]))
    if fact.frequency:
        s.frequencies.add(fact.frequency)
    for a in fact.atoms:
        s.add_atom(a)
    return s


def merge(supports: Iterable[Support]) -> Support:
    out = Support()
    for s in supports:
        out.numbers += s.numbers
        out.dates |= s.dates
        out.times |= s.times
        out.stamps |= s.stamps
        out.ingredients |= s.ingredients
        out.classes |= s.classes
        out.analytes |= s.analytes
        out.frequencies |= s.frequencies
        out.qualifiers |= s.qualifiers
        out.severities |= s.severities
        out.negation = out.negation or s.negation
        out.allergy = out.allergy or s.allergy
        out.words |= s.words
        out.advice |= s.advice
        out.atoms += s.atoms
        out.unbound_roles |= s.unbound_roles
        out.unbound_cues |= s.unbound_cues
        out.causes |= s.causes
    return out


# --- values -----------------------------------------------------------------------------------------------


def same_value(
    claim: float, decimals: int, fact: float, analyte: str | None = None, unit: str | None = None
) -> bool:
    """Equal, or the record's value rounded to the claim's decimals when that is not coarser than the analyte's
    precision (potassium 5.94 may be said as 5.9; creatinine 1.38 may not be said as 1.4)."""
    if abs(claim - fact) <= 1e-9 * max(1.0, abs(fact)):
        return True
    floor = decimals_for(analyte, unit) if analyte else None
    if floor is None:
        floor = 1  # no precision on file: only a value with decimals may be a rounding
    if decimals < floor:
        return False
    return abs(fact - claim) <= 0.5 * 10**-decimals + 1e-9


def _converted(value: float, unit: str, atom_value: float, atom_unit: str, analytes: Iterable[str]) -> bool:
    conv = matchers().converters
    for analyte in analytes:
        table = conv.get(analyte, {})
        if unit in table and atom_unit in table:
            f1, o1 = table[unit]
            f2, o2 = table[atom_unit]
            a, b = (value + o1) * f1, (atom_value + o2) * f2
            if abs(a - b) <= REL_TOL_CONVERTED * max(abs(b), 1e-9):
                return True
    return False


def value_holds(v: ValueClaim, a: Atom, analytes: Iterable[str]) -> bool:
    """The atom states this number in this unit (or in a unit the analyte table converts)."""
    if a.value is None:
        return False
    au = canonical_unit(a.unit)
    analytes = list(analytes)
    analyte = analytes[0] if analytes else None
    if v.unit is None or v.unit == au:
        return same_value(v.value, v.decimals, a.value, analyte, a.unit)
    if au is None:
        return False
    return _converted(v.value, v.unit, a.value, au, analytes)


def number_supported(value: float, decimals: int, unit: str | None, support: Support) -> bool:
    """Loose check: the number occurs in some cited fact (used where no record binding applies)."""
    for fv, fu in support.numbers:
        if unit is None or fu == unit:
            if same_value(value, decimals, fv):
                return True
            continue
        if fu is not None and _converted(value, unit, fv, fu, support.analytes):
            return True
    return False


def _subject_name(subject: Subject) -> str:
    kind, key = subject
    tm = terminology()
    if kind == "analyte":
        a = tm.analytes.get(key)
        return a.name if a else key.replace("_", " ")
    if kind == "ingredient":
        ing = tm.ingredients.get(key)
        return ing.name if ing else key
    return tm.class_label(key)


def _holders(subject: Subject, atoms: list[Atom]) -> list[Atom]:
    return [a for a in atoms if subject in a.subjects]


def _role_fits(cue: str | None, a: Atom, has_when: bool, has_latest: bool) -> bool:
    if cue in ("threshold", "parameter"):
        return a.role == cue
    if a.role in ("threshold", "parameter"):
        return False
    if cue in ("previous", "baseline"):
        return a.role in ("previous", "baseline")
    if cue == "latest":
        return a.role == "latest"
    if has_when:
        return True
    # a value stated with no time and no "earlier/from" is read as the current one
    return a.role == "latest" or not has_latest


@dataclass(slots=True)
class Binding:
    """Result of binding a sentence's claims: the first failure (if any) and the records the claims rest on."""

    reason: str | None = None
    used: list[str] = field(default_factory=list)


def bind_values(claims: Claims, sup: Support, b: Binding) -> None:
    m = matchers()
    for v in claims.values:
        if b.reason:
            return
        # a duration ("repeat in 6 h") is not a value of the test beside it, unless the test is itself measured in
        # that unit (QTc 462 ms)
        measured_in = v.subject is not None and any(
            canonical_unit(a.unit) == v.unit
            for a in _holders(v.subject, sup.atoms)
            if a.role in ("latest", "previous", "baseline")
        )
        loose = (
            v.subject is None
            or (v.unit in m.durations and not measured_in)
            or (v.subject[0] != "analyte" and v.unit is None)
            or not _holders(v.subject, sup.atoms)
        )
        if loose:
            if not number_supported(v.value, v.decimals, v.unit, sup):
                b.reason = (
                    f"number {v.value:g}" + (f" {v.unit}" if v.unit else "") + " is not in the cited facts"
                )
            continue
        holders = _holders(v.subject, sup.atoms)  # type: ignore[arg-type]
        analytes = [v.subject[1]] if v.subject[0] == "analyte" else []  # type: ignore[index]
        has_latest = any(a.role == "latest" for a in holders)
        fits = [
            a
            for a in holders
            if v.subject[0] != "analyte" or _role_fits(v.cue, a, v.when is not None, has_latest)  # type: ignore[index]
        ]
        hits = [a for a in fits if value_holds(v, a, analytes) and (v.when is None or v.when.holds(a.time))]
        if hits:
            b.used += [a.ref for a in hits[:1]]
            continue
        if v.cue == "threshold" and v.unit == "%" and number_supported(v.value, v.decimals, v.unit, sup):
            continue  # a percentage criterion ("a fall of more than 50 %") stated in the rule's own words
        b.reason = _value_reason(v, holders, fits, analytes)


def _value_reason(v: ValueClaim, holders: list[Atom], fits: list[Atom], analytes: list[str]) -> str:
    name = _subject_name(v.subject).lower() if v.subject else "the cited facts"  # type: ignore[arg-type]
    shown = f"{v.value:g}" + (f" {v.unit}" if v.unit else "")
    same = [a for a in holders if value_holds(v, a, analytes)]
    if v.when is not None and any(v.when.holds(a.time) for a in same) and v.cue == "latest":
        return f"{name} {shown} at {v.when.text()} is an earlier value, not the latest"
    if v.when is not None and same:
        times = ", ".join(sorted({f"{a.time:%Y-%m-%d %H:%M}" for a in same if a.time}))
        return f"{name} {shown} was charted at {times or 'another time'}, not at {v.when.text()}"
    if same and v.cue in ("previous", "baseline"):
        return f"{name} {shown} is not the earlier value"
    if same and v.cue == "threshold":
        return f"{name} {shown} is not the rule's threshold"
    if same:
        return f"{name} {shown} is not the latest value (say when it was charted, or that it is earlier)"
    if v.subject and v.subject[0] != "analyte":
        return f"number {shown} is not a dose or amount of {name} in the cited orders"
    if v.when is not None:
        return f"number {shown} is not the {name} value charted at {v.when.text()}"
    if v.cue == "threshold":
        return f"number {shown} is not the rule's threshold for {name}"
    return f"number {shown} is not a {name} value in the cited facts"


# --- roles, qualifiers, frequencies, allergies --------------------------------------------------------------


EVENT_ROLES = ("due", "given", "held", "ordered", "stopped", "admitted")


def _statuses(subject: Subject | None, sup: Support) -> list[str]:
    """The event roles the cited records hold for this subject (all cited records when it has none)."""
    atoms = [a for a in sup.atoms if a.role in EVENT_ROLES]
    if subject is not None and _holders(subject, atoms):
        atoms = _holders(subject, atoms)
    return list(dict.fromkeys(a.role for a in atoms))


def bind_roles(claims: Claims, sup: Support, b: Binding) -> None:
    """Each role word binds to a record in that role at its own time; a role word with no time of its own claims
    only a status, which the cited record must have (dose events always need their own time)."""
    cfg = roles_config()
    for rc in claims.roles:
        if b.reason:
            return
        cands = [a for a in sup.atoms if a.role == rc.role]
        if rc.subject is not None and _holders(rc.subject, cands):
            cands = _holders(rc.subject, cands)
        word = rc.word or rc.role
        statuses = _statuses(rc.subject, sup)
        if rc.when is None:
            if rc.role in sup.unbound_roles:
                continue  # the cited record's own text says it the same way
            if rc.role in cfg["needs_time"]:
                b.reason = (
                    f"'{word}' has no time of its own in the sentence (say when the dose was {rc.role})"
                )
            elif cands:
                b.used += [cands[0].ref]
            else:
                b.reason = f"'{word}' is not the status of the cited record" + (
                    f" ({', '.join(statuses)})" if statuses else ""
                )
            continue
        hits = [a for a in cands if rc.when.holds(a.time)]
        if hits:
            b.used += [hits[0].ref]
            continue
        if (
            not cands
            and not statuses
            and rc.role in ("ordered", "stopped", "admitted")
            and _stamp_loose(rc.when, sup)
        ):
            continue  # an order or admission time stated in the cited text, which holds no event roles
        what = "the dose was" if rc.role in ("due", "given", "held") else "it was"
        b.reason = f"{rc.when.text()} is not when {what} {rc.role}" + (
            f" (the cited record is {', '.join(statuses)})" if statuses and not cands else ""
        )


def bind_cues(claims: Claims, sup: Support, b: Binding) -> None:
    """A value cue word (previous, baseline, threshold) with no number of its own in the sentence."""
    cfg = roles_config()
    for cue, subject in claims.unbound_cues:
        if b.reason:
            return
        if cue == "latest" or cue in sup.unbound_cues:
            continue  # levels and trends are judged on the latest record; or the record says it the same way
        if cue in cfg["cue_needs_record"]:
            atoms = [a for a in sup.atoms if a.role == cue]
            if atoms and (subject is None or not _holders(subject, sup.atoms) or _holders(subject, atoms)):
                continue
        b.reason = f"'{cue}' names no value in the sentence" + (
            f" (which {_subject_name(subject).lower()} value?)" if subject else ""
        )


def _stamp_loose(when: When, sup: Support) -> bool:
    if when.date is not None and when.clock is not None and when.date[0] is not None:
        return (*when.date, *when.clock) in sup.stamps
    if when.clock is not None:
        return when.clock in sup.times
    return True


_LEVELS = {
    "high": ("high", "critical high"),
    "low": ("low", "critical low"),
    "critical": ("critical high", "critical low"),
    "normal": (None, "normal"),
}


def bind_qualifiers(claims: Claims, sup: Support, b: Binding) -> None:
    for subject, q in claims.bound_qualifiers:
        if b.reason:
            return
        if subject[0] != "analyte" or (q not in _LEVELS and q not in ("rising", "falling", "flat")):
            continue
        latest = [a for a in _holders(subject, sup.atoms) if a.role == "latest"]
        if not latest:
            continue
        if q in _LEVELS:
            ok = any(a.level in _LEVELS[q] for a in latest)
        else:
            ok = any(a.direction == q for a in latest)
        if ok:
            continue
        name = _subject_name(subject).lower()
        said = next((a.level or a.direction for a in latest if (a.level or a.direction)), None)
        b.reason = f"'{q}' is not what the cited records say about {name}" + (f" ({said})" if said else "")


def bind_frequencies(claims: Claims, sup: Support, b: Binding) -> None:
    for subject, freq in claims.bound_frequencies:
        if b.reason:
            return
        if subject[0] == "analyte":
            continue
        cands = [a for a in _holders(subject, sup.atoms) if a.frequency]
        if cands and freq not in {a.frequency for a in cands}:
            b.reason = f"frequency {freq} is not the order's frequency for {_subject_name(subject).lower()}"


def bind_routes(claims: Claims, sup: Support, b: Binding) -> None:
    """A route stated for a drug is its order's route ('apixaban IV' for an oral order fails)."""
    for subject, route in claims.bound_routes:
        if b.reason:
            return
        known = {w for a in _holders(subject, sup.atoms) for w in a.words if w.startswith("route:")}
        if known and f"route:{route}" not in known:
            shown = ", ".join(sorted(w.removeprefix("route:") for w in known))
            b.reason = (
                f"route {route} is not the order's route for {_subject_name(subject).lower()} ({shown})"
            )


def bind_allergy(claims: Claims, sup: Support, b: Binding) -> None:
    """An allergy sentence's drugs, reactions and criticality must all come from one allergy record."""
    allergies = [a for a in sup.atoms if a.role == "allergy"]
    if b.reason or not claims.allergy or not allergies or claims.allergy_negated:
        return
    drugs = {("ingredient", i) for i in claims.ingredients} | {("class", k) for k in claims.classes}
    drugs.discard(("class", "high-alert"))
    reaction_words = {w for a in allergies for w in a.words}
    said = claims.words & reaction_words
    levels = claims.qualifiers & {"high", "low"}
    for a in allergies:
        if drugs <= set(a.subjects) and said <= set(a.words) and all(a.level == q for q in levels):
            b.used.append(a.ref)
            return
    b.reason = "the substance, reaction and criticality are not those of one allergy record"

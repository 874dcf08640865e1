"""Sentence verifier: a sentence is shown as fact only when every claim in it is found in the facts it cites."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from assistant.summary.facts import Fact, FactSheet, vocabulary
from assistant.terminology import _norm_unit, terminology

REL_TOL_CONVERTED = (
    0.01  # a value converted between units (5.5 mmol/L glucose = 99 mg/dL) may differ by rounding
)


@dataclass(slots=True)
class Sentence:
    """One displayed (or dropped) sentence with the sources it cites."""

    text: str  # display text, citation tags removed
    citations: tuple[str, ...]  # ResourceType/id or guideline:<chunk-id>
    origin: str  # llm | template
    verified: bool
    tags: tuple[str, ...] = ()
    raw: str = ""  # as written, with tags
    reason: str | None = None  # why it was dropped (or shown unverified)
    section: str = "summary"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- vocabulary-driven matchers -----------------------------------------------------------------------------


def _alternation(phrases: Iterable[str]) -> str:
    uniq = sorted({p.lower() for p in phrases if p}, key=len, reverse=True)
    return "|".join(re.escape(p) for p in uniq)


def _phrase_re(phrases: Iterable[str]) -> re.Pattern[str]:
    return re.compile(r"(?<![\w-])(" + _alternation(phrases) + r")(?![\w-])", re.IGNORECASE)


@dataclass(frozen=True)
class _Matchers:
    freq_re: re.Pattern[str]
    freq_map: dict[str, str]
    unit_re: re.Pattern[str]
    unit_map: dict[str, str]
    analyte_re: re.Pattern[str]
    analyte_map: dict[str, str]
    class_re: re.Pattern[str]
    class_map: dict[str, str]
    qual_re: re.Pattern[str]
    qual_map: dict[str, str]
    qual_mask_re: re.Pattern[str]
    neg_re: re.Pattern[str]
    injection_re: re.Pattern[str]
    skip_words: frozenset[str]
    allergy_re: re.Pattern[str]
    advice: frozenset[str]
    generic: frozenset[str]
    converters: dict[str, dict[str, tuple[float, float]]]  # analyte -> canonical unit -> (factor, offset)


@cache
def matchers() -> _Matchers:
    voc = vocabulary()
    tm = terminology()
    freq_map = {p.lower(): canon for canon, phrases in voc["frequency"].items() for p in phrases}
    unit_map = {k.lower(): v for k, v in voc["units"].items()}
    for a in tm.analytes.values():
        for u in (*a.factors, _norm_unit(a.canonical_unit)):
            unit_map.setdefault(u, u)
    unit_map = {k: v for k, v in unit_map.items() if k}
    analyte_map: dict[str, str] = {}
    for key, a in tm.analytes.items():
        analyte_map[a.name.lower()] = key
    for key, names in voc["analytes"].items():
        for n in names:
            analyte_map[n.lower()] = key
    class_map: dict[str, str] = {}
    for cls, label in tm.class_names.items():
        for form in (label.lower(), label.lower() + "s", cls.replace("-", " "), cls):
            class_map[form] = cls
    class_map["high-alert medication"] = "high-alert"
    class_map["high-alert"] = "high-alert"
    class_map["high alert"] = "high-alert"
    qual_map = {p.lower(): q for q, phrases in voc["qualifiers"].items() for p in phrases}
    converters: dict[str, dict[str, tuple[float, float]]] = {}
    for key, a in tm.analytes.items():
        conv: dict[str, tuple[float, float]] = {}
        for u, factor in a.factors.items():
            canon = unit_map.get(u, u)
            conv.setdefault(canon, (factor, a.offsets.get(u, 0.0)))
        converters[key] = conv
    return _Matchers(
        freq_re=_phrase_re(freq_map),
        freq_map=freq_map,
        unit_re=re.compile(r"(" + _alternation(unit_map) + r")(?![A-Za-z0-9])", re.IGNORECASE),
        unit_map=unit_map,
        analyte_re=_phrase_re(analyte_map),
        analyte_map=analyte_map,
        class_re=_phrase_re(class_map),
        class_map=class_map,
        qual_re=_phrase_re(qual_map),
        qual_map=qual_map,
        qual_mask_re=_phrase_re(voc["qualifier_masks"]["phrases"]),
        neg_re=_phrase_re(voc["negation"]["cues"]),
        injection_re=_phrase_re(voc["injection"]["phrases"]),
        skip_words=frozenset(stem(w) for w in (*voc["negation"]["cues"], *voc["negation"]["allergy_words"])),
        allergy_re=_phrase_re(voc["negation"]["allergy_words"]),
        advice=frozenset(w.lower() for w in voc["advice"]["verbs"]),
        generic=frozenset(stem(w) for w in voc["generic"]["words"]),
        converters=converters,
    )


def stem(word: str) -> str:
    w = word.lower().strip("'’")
    for suffix, repl in (
        ("'s", ""),
        ("’s", ""),
        ("ies", "y"),
        ("ing", ""),
        ("ed", ""),
        ("es", ""),
        ("ly", ""),
        ("s", ""),
    ):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: len(w) - len(suffix)] + repl
    return w


# --- claims -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Claims:
    """What a piece of text asserts, in comparable form."""

    numbers: list[tuple[float, int, str | None]] = field(
        default_factory=list
    )  # value, decimals, canonical unit
    dates: set[tuple[int | None, int, int]] = field(default_factory=set)
    date_options: list[set[tuple[int | None, int, int]]] = field(default_factory=list)  # ambiguous d/m forms
    times: set[tuple[int, int]] = field(default_factory=set)
    # A date written with its time is one claim: 2026-03-16 17:00 is not supported by "16th at 05:00, 15th at 17:00".
    stamps: set[tuple[int, int, int, int, int]] = field(default_factory=set)
    # "due 09:00" and "given 09:00" are different claims: a time keeps the role word in front of it.
    roles: set[tuple[str, tuple[int, int, int, int, int]]] = field(default_factory=set)
    ingredients: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    analytes: set[str] = field(default_factory=set)
    frequencies: set[str] = field(default_factory=set)
    qualifiers: set[str] = field(default_factory=set)
    severities: set[str] = field(default_factory=set)
    negation: bool = False
    allergy: bool = False
    allergy_negated: bool = (
        False  # "no known allergies", "not allergic to", "NKDA": a claim about allergy status
    )
    advice: set[str] = field(default_factory=set)
    words: set[str] = field(default_factory=set)


MONTHS = {
    m: i
    for i, names in enumerate(
        [
            ("jan", "january"),
            ("feb", "february"),
            ("mar", "march"),
            ("apr", "april"),
            ("may",),
            ("jun", "june"),
            ("jul", "july"),
            ("aug", "august"),
            ("sep", "sept", "september"),
            ("oct", "october"),
            ("nov", "november"),
            ("dec", "december"),
        ],
        1,
    )
    for m in names
}
_MONTH_ALT = "|".join(sorted(MONTHS, key=len, reverse=True))
_ISO_RE = re.compile(
    r"\b(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"
)
_DMY_RE = re.compile(
    rf"\b(\d{{1,2}})(?:st|nd|rd|th)?(?:\s+of)?\s+({_MONTH_ALT})\.?(?:,?\s+(\d{{4}}))?\b", re.I
)
_MDY_RE = re.compile(rf"\b({_MONTH_ALT})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?(?:,?\s+(\d{{4}}))?\b", re.I)
_SLASH_RE = re.compile(r"\b(\d{1,2})[/.](\d{1,2})[/.](\d{4}|\d{2})\b")
_TIME_RE = re.compile(r"\b(\d{1,2}):(\d{2})(?::\d{2})?\s*(am|pm|a\.m\.|p\.m\.)?(?![\w:])", re.I)
_AMPM_RE = re.compile(r"\b(\d{1,2})\s*(am|pm|a\.m\.|p\.m\.)(?!\w)", re.I)
_HOURS_RE = re.compile(r"\b([01]\d|2[0-3])([0-5]\d)\s*(?:h|hrs|hours)\b", re.I)
_REL_RE = re.compile(
    r"\b(today|yesterday|tomorrow|tonight|this morning|this evening|overnight|last night)\b", re.I
)
_NUMBER_RE = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
_SEVERITY_RE = re.compile(r"\b(high|medium|low)[- ]severity\b", re.I)
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'’]+")
STOPWORDS = frozenset(
    """a an the of for with on at in to and or by from as is are was were be been being this that
these those it its his her their they he she we you i our your which who whom whose what when where while than then
so such into onto about above below over under again further once here there all any both each few more most other
some same own only very can will just has have had do does did having also per via""".split()
)


def _mask(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


def _y(year: str | None) -> int | None:
    if not year:
        return None
    y = int(year)
    return y + 2000 if y < 100 else y


def _hour(h: int, ampm: str | None) -> int:
    if not ampm:
        return h
    pm = ampm.lower().startswith("p")
    return (h % 12) + (12 if pm else 0)


_ROLE_RE = re.compile(
    r"\b(due|given|administered|held|not given)\b[^.\d]{0,24}?(\d{4})-(\d{1,2})-(\d{1,2})[T ](\d{1,2}):(\d{2})",
    re.I,
)
_ROLE_NAMES = {"administered": "given", "not given": "held"}


def extract_claims(text: str, now: datetime | None = None) -> Claims:
    """Numbers with units, dates, times, drugs, analytes, frequencies, qualifiers, negations and content words."""
    m = matchers()
    tm = terminology()
    c = Claims()
    work = text.replace("\u00a0", " ").replace("−", "-")
    for mt in _ROLE_RE.finditer(work):
        role = mt.group(1).lower()
        c.roles.add((_ROLE_NAMES.get(role, role), tuple(int(g) for g in mt.groups()[1:])))  # type: ignore[misc]

    def take(regex: re.Pattern[str], fn) -> None:
        nonlocal work
        for match in list(regex.finditer(work)):
            fn(match)
            work = _mask(work, match.start(), match.end())

    # dates and times first: their digits are not quantities
    def iso(mt: re.Match[str]) -> None:
        c.dates.add((int(mt.group(1)), int(mt.group(2)), int(mt.group(3))))
        if mt.group(4):
            c.times.add((int(mt.group(4)), int(mt.group(5))))
            c.stamps.add(
                (int(mt.group(1)), int(mt.group(2)), int(mt.group(3)), int(mt.group(4)), int(mt.group(5)))
            )

    def dmy(mt: re.Match[str]) -> None:
        c.dates.add((_y(mt.group(3)), MONTHS[mt.group(2).lower()], int(mt.group(1))))

    def mdy(mt: re.Match[str]) -> None:
        c.dates.add((_y(mt.group(3)), MONTHS[mt.group(1).lower()], int(mt.group(2))))

    def slash(mt: re.Match[str]) -> None:
        a, b, y = int(mt.group(1)), int(mt.group(2)), _y(mt.group(3))
        options = {(y, b, a), (y, a, b)} if a != b else {(y, a, b)}
        c.date_options.append({o for o in options if 1 <= o[1] <= 12 and 1 <= o[2] <= 31})

    def clock(mt: re.Match[str]) -> None:
        c.times.add((_hour(int(mt.group(1)), mt.group(3)), int(mt.group(2))))

    def ampm(mt: re.Match[str]) -> None:
        c.times.add((_hour(int(mt.group(1)), mt.group(2)), 0))

    def hours(mt: re.Match[str]) -> None:
        c.times.add((int(mt.group(1)), int(mt.group(2))))

    def relative(mt: re.Match[str]) -> None:
        if now is None:
            c.dates.add((-1, 0, 0))  # no reference day: cannot be supported
            return
        word = mt.group(1).lower()
        shift = {"yesterday": -1, "tomorrow": 1, "last night": -1}.get(word, 0)
        d = (now + timedelta(days=shift)).date()
        options = {(d.year, d.month, d.day)}
        if word in ("overnight", "last night", "tonight"):
            d2 = (now - timedelta(days=1)).date() if word != "tonight" else (now + timedelta(days=1)).date()
            options.add((d2.year, d2.month, d2.day))
        c.date_options.append(options)

    take(_ISO_RE, iso)
    take(_DMY_RE, dmy)
    take(_MDY_RE, mdy)
    take(_SLASH_RE, slash)
    take(_TIME_RE, clock)
    take(_AMPM_RE, ampm)
    take(_HOURS_RE, hours)
    take(_REL_RE, relative)
    take(m.freq_re, lambda mt: c.frequencies.add(m.freq_map[mt.group(1).lower()]))
    # drugs before analytes, so "potassium chloride" is a drug and not a potassium result
    ings, classes = tm.match_names(work)
    c.ingredients.update(ings)
    c.classes.update(classes)
    lowered = work.lower()
    spans = [mt.span() for mt in tm._name_re.finditer(lowered)]
    for s, e in spans:
        work = _mask(work, s, e)
    take(_SEVERITY_RE, lambda mt: c.severities.add(mt.group(1).lower()))
    take(m.class_re, lambda mt: c.classes.add(m.class_map[mt.group(1).lower()]))
    take(m.analyte_re, lambda mt: c.analytes.add(m.analyte_map[mt.group(1).lower()]))

    # numbers, each with the unit right after it
    for mt in list(_NUMBER_RE.finditer(work)):
        raw = mt.group(1).replace(",", "") + (mt.group(2) or "")
        decimals = len(mt.group(2)) - 1 if mt.group(2) else 0
        pos = mt.end()
        rest = work[pos:]
        stripped = rest.lstrip(" ")
        um = m.unit_re.match(stripped)
        unit = None
        end = pos
        if um and (um.group(1) != ""):
            unit = m.unit_map.get(um.group(1).lower().replace(" ", ""), m.unit_map.get(um.group(1).lower()))
            end = pos + (len(rest) - len(stripped)) + um.end()
        elif rest[:1].isalpha():
            continue  # an identifier such as 4B or 1st, not a quantity
        c.numbers.append((float(raw), decimals, unit or None))
        work = _mask(work, mt.start(), end)

    take(m.qual_mask_re, lambda mt: None)
    take(m.qual_re, lambda mt: c.qualifiers.add(m.qual_map[mt.group(1).lower()]))
    c.allergy = bool(m.allergy_re.search(work))
    nkda = bool(re.search(r"\bnkda\b|\bnka\b", text, re.I))
    c.negation = bool(m.neg_re.search(work)) or nkda
    # A negation negates the allergy only when it stands just before it in the same clause
    # ("no known allergies"), not in "do not give the drug; confirm the allergy".
    c.allergy_negated = nkda or any(
        0 <= a.start() - n.end() <= 25 and not re.search(r"[;:.,]", work[n.end() : a.start()])
        for n in m.neg_re.finditer(work)
        for a in m.allergy_re.finditer(work)
    )
    for w in _WORD_RE.findall(work):
        s = stem(w)
        if w.lower() in m.advice:
            c.advice.add(w.lower())
        if w.lower() in STOPWORDS or len(w) < 2 or s in m.skip_words:
            continue
        c.words.add(s)
    return c


# --- fact support -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Support:
    numbers: list[tuple[float, str | None]] = field(default_factory=list)
    dates: set[tuple[int, int, int]] = field(default_factory=set)
    times: set[tuple[int, int]] = field(default_factory=set)
    stamps: set[tuple[int, int, int, int, int]] = field(default_factory=set)
    roles: set[tuple[str, tuple[int, int, int, int, int]]] = field(default_factory=set)
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

    def add_claims(self, c: Claims) -> None:
        self.numbers += [(v, u) for v, _, u in c.numbers]
        self.dates |= {d for d in c.dates if d[0] is not None}  # type: ignore[misc]
        for opts in c.date_options:
            self.dates |= {d for d in opts if d[0] is not None}  # type: ignore[misc]
        self.times |= c.times
        self.stamps |= c.stamps
        self.roles |= c.roles
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


def _add_time(s: Support, when: datetime | None) -> None:
    if when is not None:
        s.dates.add((when.year, when.month, when.day))
        s.times.add((when.hour, when.minute))
        s.stamps.add((when.year, when.month, when.day, when.hour, when.minute))


def fact_support(fact: Fact, now: datetime | None = None) -> Support:
    s = Support()
    s.add_claims(extract_claims(fact.text, now))
    if fact.sentence:
        s.add_claims(extract_claims(fact.sentence, now))
    m = matchers()
    if fact.number is not None:
        unit = m.unit_map.get(_norm_unit(fact.unit), _norm_unit(fact.unit)) if fact.unit else None
        s.numbers.append((fact.number, unit or None))
    _add_time(s, fact.time)
    for t in fact.related_times:
        _add_time(s, t)
    if fact.analyte:
        s.analytes.add(fact.analyte)
    s.ingredients |= set(fact.ingredients)
    s.classes |= set(fact.classes) | set(
        terminology().classes_of([i for i in fact.ingredients if i in terminology().ingredients])
    )
    if fact.frequency:
        s.frequencies.add(fact.frequency)
    return s


def _merge(supports: Iterable[Support]) -> Support:
    out = Support()
    for s in supports:
        out.numbers += s.numbers
        out.dates |= s.dates
        out.times |= s.times
        out.stamps |= s.stamps
        out.roles |= s.roles
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
    return out


def _same_value(claim: float, decimals: int, fact: float) -> bool:
    if abs(claim - fact) <= 1e-9 * max(1.0, abs(fact)):
        return True
    return decimals >= 1 and abs(round(fact, decimals) - claim) <= 1e-9 * max(1.0, abs(fact))


def _number_supported(value: float, decimals: int, unit: str | None, support: Support) -> bool:
    conv = matchers().converters
    for fv, fu in support.numbers:
        if unit is None or fu == unit:
            if _same_value(value, decimals, fv):
                return True
            continue
        if fu is None:
            continue
        # different units: accept only a conversion the analyte table defines (mEq/L = mmol/L for K and Na)
        for analyte in support.analytes:
            table = conv.get(analyte, {})
            if unit in table and fu in table:
                f1, o1 = table[unit]
                f2, o2 = table[fu]
                a, b = (value + o1) * f1, (fv + o2) * f2
                if abs(a - b) <= REL_TOL_CONVERTED * max(abs(b), 1e-9):
                    return True
    return False


def _date_ok(d: tuple[int | None, int, int], dates: set[tuple[int, int, int]]) -> bool:
    return any((d[0] is None or d[0] == y) and d[1] == mo and d[2] == dd for y, mo, dd in dates)


# --- citations ----------------------------------------------------------------------------------------------

_BRACKET_RE = re.compile(r"\[([^\[\]]{0,200})\]")
_PAREN_TAG_RE = re.compile(r"\((F\d+(?:\s*[,;]?\s*F\d+)*)\)")
_REF_RE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


def parse_citations(raw: str) -> tuple[str, list[str], list[str], list[str]]:
    """(text without tags, F-tags, resource refs, unknown tokens) of one sentence."""
    tags: list[str] = []
    refs: list[str] = []
    unknown: list[str] = []

    def collect(body: str) -> None:
        for tok in re.split(r"[,;\s]+", body.strip()):
            if not tok:
                continue
            if re.fullmatch(r"F\d+", tok, re.I):
                tags.append(tok.upper())
            elif tok.startswith("guideline:") or _REF_RE.match(tok):
                refs.append(tok)
            else:
                unknown.append(tok)

    def sub(mt: re.Match[str]) -> str:
        collect(mt.group(1))
        return " "

    text = _BRACKET_RE.sub(sub, raw)
    text = _PAREN_TAG_RE.sub(sub, text)
    return clean_text(text), list(dict.fromkeys(tags)), list(dict.fromkeys(refs)), unknown


def clean_text(text: str) -> str:
    t = text.replace("**", "").replace("__", "")
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"\s+([.,;:!?])", r"\1", t)
    t = re.sub(r"([.!?])\1+$", r"\1", t)
    t = t.strip(" -*•")
    if t and t[-1] not in ".!?":
        t += "."
    return t


# --- the verifier -------------------------------------------------------------------------------------------


class Verifier:
    """Checks sentences against one fact sheet; supports are computed once per fact."""

    def __init__(self, sheet: FactSheet) -> None:
        self.sheet = sheet
        self.facts = sheet.by_tag()
        self.refs = sheet.by_ref()
        self._support: dict[str, Support] = {}

    def support(self, fact: Fact) -> Support:
        s = self._support.get(fact.tag)
        if s is None:
            s = self._support[fact.tag] = fact_support(fact, self.sheet.now)
        return s

    def verify(self, raw: str, origin: str = "llm") -> Sentence:
        text, tags, refs, unknown = parse_citations(raw)

        def result(ok: bool, reason: str | None, cited: list[Fact]) -> Sentence:
            citations = tuple(dict.fromkeys(r for f in cited for r in f.provenance))
            section = cited[0].section if cited else "summary"
            return Sentence(
                text=text,
                citations=citations,
                origin=origin,
                verified=ok,
                tags=tuple(tags),
                raw=raw.strip(),
                reason=reason,
                section=section,
            )

        if unknown:
            return result(
                False, f"unknown citation tag {unknown[0]!r}: only fact tags like [F1] may be cited", []
            )
        missing = [t for t in tags if t not in self.facts]
        if missing:
            return result(False, f"cites [{missing[0]}], which is not in the fact sheet", [])
        cited = [self.facts[t] for t in tags]
        for ref in refs:
            if ref not in self.sheet.allowed_refs:
                return result(False, f"cites {ref}, which is not a resource of this patient's chart", cited)
            holders = self.refs.get(ref)
            if not holders:
                return result(False, f"cites {ref}, which no fact on the sheet rests on", cited)
            cited += [f for f in holders if f not in cited]
        if not cited:
            return result(False, "cites no fact", [])
        for f in cited:
            for ref in f.provenance:
                if ref not in self.sheet.allowed_refs:
                    return result(
                        False, f"fact {f.tag} rests on {ref}, which is not in this patient's chart", cited
                    )
        if not re.search(r"[A-Za-z]", text):
            return result(False, "no text besides citations", cited)
        if matchers().injection_re.search(text):
            return result(False, "repeats an instruction found in chart text", cited)
        reason = self.check_claims(text, cited)
        return result(reason is None, reason, cited)

    def check_claims(self, text: str, cited: list[Fact]) -> str | None:
        claims = extract_claims(text, self.sheet.now)
        sup = _merge(self.support(f) for f in cited)
        m = matchers()
        if claims.allergy:
            if not sup.allergy:
                return "allergy claim cites no allergy fact"
            if claims.allergy_negated:
                if claims.ingredients or claims.classes:
                    if self._allergic_to(claims.ingredients, claims.classes):
                        return "says the patient is not allergic to a drug the allergy facts list"
                elif self.sheet.has_active_allergy:
                    return "claims no allergies, but the chart records allergies"
        for value, decimals, unit in claims.numbers:
            if not _number_supported(value, decimals, unit, sup):
                shown = f"{value:g}" + (f" {unit}" if unit else "")
                return f"number {shown} is not in the cited facts"
        for d in claims.dates:
            if not _date_ok(d, sup.dates):
                return (
                    "date is not in the cited facts"
                    if d[0] != -1
                    else "relative date without a reference time"
                )
        for opts in claims.date_options:
            if not any(_date_ok(d, sup.dates) for d in opts):
                return "date is not in the cited facts"
        for t in claims.times:
            if t not in sup.times:
                return f"time {t[0]:02d}:{t[1]:02d} is not in the cited facts"
        for st in sorted(claims.stamps - sup.stamps):
            return f"{st[0]:04d}-{st[1]:02d}-{st[2]:02d} {st[3]:02d}:{st[4]:02d} is not a time in the cited facts"
        known_roles = {role for role, _ in sup.roles}
        for role, st in sorted(claims.roles):
            if role in known_roles and (role, st) not in sup.roles:
                return f"{st[0]:04d}-{st[1]:02d}-{st[2]:02d} {st[3]:02d}:{st[4]:02d} is not when the dose was {role}"
        for ing in sorted(claims.ingredients - sup.ingredients):
            return f"drug {terminology().ingredients[ing].name} is not in the cited facts"
        for cls in sorted(claims.classes - sup.classes):
            return f"drug class {terminology().class_label(cls)} is not in the cited facts"
        for a in sorted(claims.analytes - sup.analytes):
            if a == "blood_pressure" and sup.analytes & {"systolic_bp", "diastolic_bp"}:
                continue
            return f"{a.replace('_', ' ')} is not in the cited facts"
        for fq in sorted(claims.frequencies - sup.frequencies):
            return f"frequency {fq} is not in the cited facts"
        for q in sorted(claims.qualifiers - sup.qualifiers):
            return f"'{q}' is not what the cited facts say"
        for sv in sorted(claims.severities - sup.severities):
            return f"{sv} severity is not in the cited facts"
        if claims.negation and not sup.negation:
            return "negative claim the cited facts do not make"
        for verb in sorted(claims.advice - sup.advice):
            return f"advice '{verb}' goes beyond the cited facts"
        content = {w for w in claims.words if w not in m.generic}
        unsupported = sorted(content - sup.words)
        if len(unsupported) > len(content) // 5:
            return f"words not supported by the cited facts: {', '.join(unsupported[:4])}"
        return None

    def _allergic_to(self, ingredients: set[str], classes: set[str]) -> bool:
        tm = terminology()
        for f in self.sheet.facts:
            if f.kind != "allergy":
                continue
            a_ings, a_cls = set(f.ingredients), set(f.classes)
            if ingredients & a_ings or classes & a_cls:
                return True
            if a_cls & set(tm.classes_of([i for i in ingredients if i in tm.ingredients])):
                return True
        return False


def verify_sentence(raw: str, sheet: FactSheet, origin: str = "llm") -> Sentence:
    return Verifier(sheet).verify(raw, origin)


# --- splitting LLM output into sentences --------------------------------------------------------------------

_TAGS_TAIL = r"(?:\s*(?:\[[^\[\]\n]{0,200}\]|\(F\d+(?:\s*[,;]?\s*F\d+)*\)))*"
_BOUNDARY_RE = re.compile(r"[.!?]" + _TAGS_TAIL + r"(?=\s+[^\s\[(])")
_BULLET_RE = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|#+)\s+")


def is_heading(line: str) -> bool:
    s = line.strip()
    if "[" in s:
        return False
    words = s.split()
    return (
        bool(words)
        and len(words) <= 8
        and (s.endswith(":") or s.startswith("#") or (s.startswith("**") and s.endswith("**")))
    )


class SentenceSplitter:
    """Feeds streamed text, returns complete sentences as soon as the next one starts (or a line ends)."""

    def __init__(self) -> None:
        self.buf = ""

    def feed(self, delta: str) -> list[str]:
        self.buf += delta
        out: list[str] = []
        while True:
            nl = self.buf.find("\n")
            mt = _BOUNDARY_RE.search(self.buf)
            if mt and (nl < 0 or mt.end() <= nl):
                piece, self.buf = self.buf[: mt.end()], self.buf[mt.end() :]
            elif nl >= 0:
                piece, self.buf = self.buf[:nl], self.buf[nl + 1 :]
            else:
                break
            out += self._clean(piece)
        return out

    def flush(self) -> list[str]:
        piece, self.buf = self.buf, ""
        return self._clean(piece)

    @staticmethod
    def _clean(piece: str) -> list[str]:
        s = _BULLET_RE.sub("", piece).strip()
        if not s or is_heading(s) or not re.search(r"[A-Za-z]", s):  # "2." alone is a list number
            return []
        return [s]


def split_sentences(text: str) -> list[str]:
    sp = SentenceSplitter()
    return sp.feed(text) + sp.flush()


def iter_verified(sentences: Iterable[str], sheet: FactSheet, origin: str = "llm") -> Iterator[Sentence]:
    v = Verifier(sheet)
    for s in sentences:
        yield v.verify(s, origin)

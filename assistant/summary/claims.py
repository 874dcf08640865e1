"""Claim extraction: what a sentence asserts, with each value bound to its analyte or drug, time and role."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from importlib import resources

from assistant.summary.vocab import connectives, vocabulary
from assistant.terminology import terminology

# --- vocabulary-driven matchers -----------------------------------------------------------------------------


def _alternation(phrases: Iterable[str]) -> str:
    uniq = sorted({p.lower() for p in phrases if p}, key=len, reverse=True)
    return "|".join(re.escape(p) for p in uniq)


def _phrase_re(phrases: Iterable[str]) -> re.Pattern[str]:
    alt = _alternation(phrases)
    return re.compile(r"(?<![\w-])(" + (alt or r"(?!x)x") + r")(?![\w-])", re.IGNORECASE)


def norm_unit(unit: str | None) -> str:
    return (unit or "").replace(" ", "").lower()


@dataclass(frozen=True)
class Matchers:
    freq_re: re.Pattern[str]
    freq_map: dict[str, str]
    unit_re: re.Pattern[str]
    unit_map: dict[str, str]
    analyte_re: re.Pattern[str]
    drug_analyte_re: re.Pattern[str]  # "vancomycin level", "lithium level": analytes named after a drug
    analyte_map: dict[str, str]
    drug_re: re.Pattern[str]
    drug_map: dict[str, tuple[str, str]]  # lowercase name -> (ingredient|class, key)
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
    known_words: frozenset[str]  # stems a sentence may use without a cited record holding them
    converters: dict[
        str, dict[str, tuple[float, float]]
    ]  # analyte -> canonical unit spelling -> (factor, offset)
    durations: frozenset[str]
    route_re: re.Pattern[str]
    route_map: dict[str, str]


def _medication_names() -> dict[str, tuple[str, str]]:
    tm = terminology()
    names: dict[str, tuple[str, str]] = {}
    for key, ing in tm.ingredients.items():
        for label in (ing.name, *ing.synonyms):
            names[label.lower()] = ("ingredient", key)
    with resources.files("assistant.data").joinpath("medications.toml").open("rb") as fh:
        meds = tomllib.load(fh)
    for cls, labels in meds.get("allergy_class_synonyms", {}).items():
        for label in labels:
            names.setdefault(label.lower(), ("class", cls))
    return names


@cache
def matchers() -> Matchers:
    voc = vocabulary()
    tm = terminology()
    freq_map = {p.lower(): canon for canon, phrases in voc["frequency"].items() for p in phrases}
    unit_map = {k.lower(): v for k, v in voc["units"].items()}
    for a in tm.analytes.values():
        for u in (*a.factors, norm_unit(a.canonical_unit)):
            unit_map.setdefault(u, u)
    unit_map = {k: v for k, v in unit_map.items() if k}
    analyte_map: dict[str, str] = {}
    for key, a in tm.analytes.items():
        analyte_map[a.name.lower()] = key
    for key, names in voc["analytes"].items():
        for n in names:
            analyte_map[n.lower()] = key
    drug_map = _medication_names()
    drug_probe = _phrase_re(drug_map)
    drug_analytes = [n for n in analyte_map if drug_probe.search(n)]
    class_map: dict[str, str] = {}
    for cls, label in tm.class_names.items():
        for form in (label.lower(), label.lower() + "s", cls.replace("-", " "), cls):
            class_map[form] = cls
    for form in ("high-alert medication", "high-alert", "high alert"):
        class_map[form] = "high-alert"
    qual_map = {p.lower(): q for q, phrases in voc["qualifiers"].items() for p in phrases}
    converters: dict[str, dict[str, tuple[float, float]]] = {}
    for key, a in tm.analytes.items():
        conv: dict[str, tuple[float, float]] = {}
        for u, factor in a.factors.items():
            canon = unit_map.get(u, u)
            conv.setdefault(canon, (factor, a.offsets.get(u, 0.0)))
        converters[key] = conv
    known: set[str] = set()
    for section in ("generic", "advice", "negation"):
        for lst in voc[section].values():
            known.update(stem(w) for phrase in lst for w in re.findall(r"[a-z][a-z'’]+", phrase.lower()))
    for phrases in (
        *voc["qualifiers"].values(),
        *voc["frequency"].values(),
        *voc["routes"].values(),
        voc["qualifier_masks"]["phrases"],
    ):
        known.update(stem(w) for phrase in phrases for w in re.findall(r"[a-z][a-z'’]+", phrase.lower()))
    known.update(stem(w) for w in connectives())
    route_map = {p.lower(): r for r, phrases in voc["routes"].items() for p in phrases}
    return Matchers(
        freq_re=_phrase_re(freq_map),
        freq_map=freq_map,
        unit_re=re.compile(r"(" + _alternation(unit_map) + r")(?![A-Za-z0-9])", re.IGNORECASE),
        unit_map=unit_map,
        analyte_re=_phrase_re(analyte_map),
        drug_analyte_re=_phrase_re(drug_analytes),
        analyte_map=analyte_map,
        drug_re=drug_probe,
        drug_map=drug_map,
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
        known_words=frozenset(known),
        converters=converters,
        durations=frozenset({"h", "min", "d", "s", "ms"}),
        route_re=_phrase_re(route_map),
        route_map=route_map,
    )


def canonical_unit(unit: str | None) -> str | None:
    """A unit code or spelling in the verifier's comparable form ('mm[Hg]' and 'mmHg' -> 'mmhg')."""
    if not unit:
        return None
    m = matchers()
    u = norm_unit(unit)
    return m.unit_map.get(u, m.unit_map.get(unit.lower(), u)) or None


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


# --- bound claims -------------------------------------------------------------------------------------------

Stamp = tuple[int, int, int, int, int]


@dataclass(slots=True)
class When:
    """A point in time as a sentence states it: any of date, time of day, or both."""

    date: tuple[int | None, int, int] | None = None
    clock: tuple[int, int] | None = None
    days: frozenset[tuple[int, int, int]] | None = None  # "today", "overnight": any of these days

    def holds(self, t: datetime | None) -> bool:
        if t is None:
            return False
        if self.days is not None:
            u = t.astimezone(UTC) if t.tzinfo else t
            if (t.year, t.month, t.day) not in self.days and (u.year, u.month, u.day) not in self.days:
                return False
        if self.date is not None:
            y, mo, d = self.date
            if (y is not None and y != t.year) or mo != t.month or d != t.day:
                return False
        return not (self.clock is not None and self.clock != (t.hour, t.minute))

    def text(self) -> str:
        parts = []
        if self.days:
            parts.append(" or ".join(f"{y}-{mo:02d}-{d:02d}" for y, mo, d in sorted(self.days)))
        if self.date:
            y, mo, d = self.date
            parts.append(f"{y or '????'}-{mo:02d}-{d:02d}")
        if self.clock:
            parts.append(f"{self.clock[0]:02d}:{self.clock[1]:02d}")
        return " ".join(parts)


@dataclass(slots=True)
class ValueClaim:
    """A number with its unit, the analyte or drug it is about, when it was charted and in which role."""

    value: float
    decimals: int
    unit: str | None  # comparable spelling (canonical_unit)
    subject: tuple[str, str] | None  # ("analyte", key) | ("ingredient", key) | ("class", key)
    cue: str | None = None  # latest | previous | baseline | threshold
    when: When | None = None
    start: int = 0

    def shown(self) -> str:
        v = f"{self.value:.{self.decimals}f}"
        return v + (f" {self.unit}" if self.unit else "")


@dataclass(slots=True)
class RoleClaim:
    """A dose or event time: 'due 09:00', 'last given 2026-03-15 22:21', 'admitted 2026-03-11 07:00'.

    `when` is None for a role word that carries no time of its own ("Dose was due, ... given 09:10"): it then
    claims only a status, which the cited record must have (vocabulary.toml [roles])."""

    role: str  # due | given | held | ordered | stopped | admitted
    when: When | None
    subject: tuple[str, str] | None
    word: str = ""  # as written, for the reason
    after: bool = True  # the time follows the role word ("given 09:10"), not a time said before it or none


@dataclass(slots=True)
class Claims:
    """What a piece of text asserts, in comparable form."""

    numbers: list[tuple[float, int, str | None]] = field(default_factory=list)  # value, decimals, unit
    dates: set[tuple[int | None, int, int]] = field(default_factory=set)
    date_options: list[set[tuple[int | None, int, int]]] = field(default_factory=list)  # ambiguous d/m forms
    times: set[tuple[int, int]] = field(default_factory=set)
    stamps: set[Stamp] = field(default_factory=set)
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
    raw_words: dict[str, str] = field(default_factory=dict)  # stem -> first spelling, for reasons
    # bound claims
    values: list[ValueClaim] = field(default_factory=list)
    roles: list[RoleClaim] = field(default_factory=list)
    bound_qualifiers: list[tuple[tuple[str, str], str]] = field(default_factory=list)  # (subject, qualifier)
    bound_frequencies: list[tuple[tuple[str, str], str]] = field(default_factory=list)
    bound_routes: list[tuple[tuple[str, str], str]] = field(default_factory=list)
    routes: set[str] = field(default_factory=set)
    # value cue words (previous, baseline, threshold...) with no number of their own, and the subject they stand by
    unbound_cues: list[tuple[str, tuple[str, str] | None]] = field(default_factory=list)
    causes: set[str] = field(default_factory=set)  # cause phrases ("due to", "secondary to") the text uses


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
_BREAK_RE = re.compile(r";|\.\s")
# Words right before a number that say which of a test's values it is.
_CUE_RE = re.compile(
    r"\b(from|to|baseline|previous(?:ly)?|prior|earlier|before|last|latest|now|current(?:ly)?|most recent|newest|"
    r"above|below|over|under|exceed(?:s|ing)?|threshold|limit|at least|at most|more than|less than|greater than|"
    r"scores?|scored)\b"
    r"|([<>≥≤])",
    re.I,
)
_CUE_ROLE = {
    "from": "previous",
    "previous": "previous",
    "previously": "previous",
    "prior": "previous",
    "earlier": "previous",
    "before": "previous",
    "baseline": "baseline",
    "to": "latest",
    "last": "latest",
    "latest": "latest",
    "now": "latest",
    "current": "latest",
    "currently": "latest",
    "most recent": "latest",
    "newest": "latest",
    "score": "parameter",
    "scores": "parameter",
    "scored": "parameter",
}
# Role words in front of a time: "due 09:00" and "given 09:00" are different claims.
_ROLE_WORD_RE = re.compile(
    r"\b(due(?!\s+to\b)|given|administered|not given|held|withheld|refused|omitted|ordered|started|prescribed|stopped|"
    r"discontinued|admitted)\b",
    re.I,
)
_ROLE_NAMES = {
    "administered": "given",
    "not given": "held",
    "withheld": "held",
    "refused": "held",
    "omitted": "held",
    "started": "ordered",
    "prescribed": "ordered",
    "discontinued": "stopped",
}
# Value cue words that may stand apart from their number ("latest potassium was 5.9", "4.6 mmol/L, the previous
# value"); a cue word right before its number is read by _CUE_RE.
_CUE_WORD_RE = re.compile(
    r"\b(previous(?:ly)?|prior|earlier|baseline|latest|most recent|newest|threshold|from)\b", re.I
)
STOPWORDS = frozenset(
    """a an the of for with on at in to and or by from as is are was were be been being this that
these those it its his her their they he she we you i our your which who whom whose what when where while than then
so such into onto about above below over under again further once here there all any both each few more most other
some same own only very can will just has have had do does did having also per via""".split()
)


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


@dataclass(slots=True)
class _Mention:
    start: int
    end: int
    kind: str  # stamp | date | clock | analyte | drug | number | qual | freq | role | break
    data: object = None


def extract_claims(text: str, now: datetime | None = None) -> Claims:
    """Every claim in the text; numbers, qualifiers, frequencies and times are bound to what they are about.

    Cached: fact texts are read by every verifier built on a sheet. Treat the result as read-only."""
    return _extract_cached(text, now)


@lru_cache(maxsize=8192)
def _extract_cached(text: str, now: datetime | None) -> Claims:
    return _extract(text, now)


def _extract(text: str, now: datetime | None = None) -> Claims:
    m = matchers()
    c = Claims()
    work = text.replace("\u00a0", " ").replace("−", "-")
    original = work
    mentions: list[_Mention] = []

    def take(regex: re.Pattern[str], fn) -> None:
        nonlocal work
        for match in list(regex.finditer(work)):
            fn(match)
            s, e = match.span()
            work = work[:s] + " " * (e - s) + work[e:]

    def add(mt: re.Match[str], kind: str, data: object) -> None:
        mentions.append(_Mention(mt.start(), mt.end(), kind, data))

    # dates and times first: their digits are not quantities
    def iso(mt: re.Match[str]) -> None:
        d = (int(mt.group(1)), int(mt.group(2)), int(mt.group(3)))
        c.dates.add(d)
        clock = None
        if mt.group(4):
            clock = (int(mt.group(4)), int(mt.group(5)))
            c.times.add(clock)
            c.stamps.add((*d, *clock))
        add(mt, "when", When(d, clock))

    def dmy(mt: re.Match[str]) -> None:
        d = (_y(mt.group(3)), MONTHS[mt.group(2).lower()], int(mt.group(1)))
        c.dates.add(d)
        add(mt, "when", When(d, None))

    def mdy(mt: re.Match[str]) -> None:
        d = (_y(mt.group(3)), MONTHS[mt.group(1).lower()], int(mt.group(2)))
        c.dates.add(d)
        add(mt, "when", When(d, None))

    def slash(mt: re.Match[str]) -> None:
        a, b, y = int(mt.group(1)), int(mt.group(2)), _y(mt.group(3))
        options = {(y, b, a), (y, a, b)} if a != b else {(y, a, b)}
        c.date_options.append({o for o in options if 1 <= o[1] <= 12 and 1 <= o[2] <= 31})

    def clock(mt: re.Match[str]) -> None:
        t = (_hour(int(mt.group(1)), mt.group(3)), int(mt.group(2)))
        c.times.add(t)
        add(mt, "when", When(None, t))

    def ampm(mt: re.Match[str]) -> None:
        t = (_hour(int(mt.group(1)), mt.group(2)), 0)
        c.times.add(t)
        add(mt, "when", When(None, t))

    def hours(mt: re.Match[str]) -> None:
        t = (int(mt.group(1)), int(mt.group(2)))
        c.times.add(t)
        add(mt, "when", When(None, t))

    def relative(mt: re.Match[str]) -> None:
        if now is None:
            c.dates.add((-1, 0, 0))  # no reference day: cannot be supported
            add(mt, "relwhen", When(None, None))
            return
        word = mt.group(1).lower()
        shift = {"yesterday": -1, "tomorrow": 1, "last night": -1}.get(word, 0)
        d = (now + timedelta(days=shift)).date()
        options = {(d.year, d.month, d.day)}
        if word in ("overnight", "last night", "tonight"):
            d2 = (now - timedelta(days=1)).date() if word != "tonight" else (now + timedelta(days=1)).date()
            options.add((d2.year, d2.month, d2.day))
        c.date_options.append(options)
        # "held today" gives a role word a time of its own: a record in that role on that day (the day in the
        # sheet's clock or in UTC, so a dose near midnight is not misread)
        u = (now.astimezone(UTC) if now.tzinfo else now) + timedelta(days=shift)
        days = set(options) | {(u.year, u.month, u.day)}
        add(mt, "relwhen", When(None, None, frozenset(days)))

    take(_ISO_RE, iso)
    take(_DMY_RE, dmy)
    take(_MDY_RE, mdy)
    take(_SLASH_RE, slash)
    take(_TIME_RE, clock)
    take(_AMPM_RE, ampm)
    take(_HOURS_RE, hours)
    take(_REL_RE, relative)

    def freq(mt: re.Match[str]) -> None:
        f = m.freq_map[mt.group(1).lower()]
        c.frequencies.add(f)
        add(mt, "freq", f)

    take(m.freq_re, freq)

    def analyte(mt: re.Match[str]) -> None:
        key = m.analyte_map[mt.group(1).lower()]
        c.analytes.add(key)
        add(mt, "subject", ("analyte", key))

    # "vancomycin level" names a test, not the drug; other drug names come before analytes, so that
    # "potassium chloride" is a drug and not a potassium result
    take(m.drug_analyte_re, analyte)

    def drug(mt: re.Match[str]) -> None:
        kind, key = m.drug_map[mt.group(1).lower()]
        if kind == "ingredient":
            c.ingredients.add(key)
        else:
            c.classes.add(key)
        add(mt, "subject", (kind, key))

    take(m.drug_re, drug)
    take(_SEVERITY_RE, lambda mt: c.severities.add(mt.group(1).lower()))

    def drug_class(mt: re.Match[str]) -> None:
        key = m.class_map[mt.group(1).lower()]
        c.classes.add(key)
        add(mt, "subject", ("class", key))

    take(m.class_re, drug_class)
    take(m.analyte_re, analyte)
    for mt in m.route_re.finditer(work):
        route = m.route_map[mt.group(1).lower()]
        c.routes.add(route)
        mentions.append(_Mention(mt.start(), mt.end(), "route", route))
    for mt in _ROLE_WORD_RE.finditer(work):
        word = " ".join(mt.group(1).lower().split())
        mentions.append(_Mention(mt.start(), mt.end(), "role", (_ROLE_NAMES.get(word, word), word)))
    for mt in _CUE_WORD_RE.finditer(work):
        word = " ".join(mt.group(1).lower().split())
        # "from" is kept as itself: it names a trend's earlier value only beside a direction ("rising from")
        mentions.append(
            _Mention(mt.start(), mt.end(), "cue", word if word == "from" else _CUE_ROLE.get(word, word))
        )
    # "Dose was due to vancomycin ..." is the role word "due" before a drug (a dose of it was due), not a cause
    dose_due: list[tuple[int, int]] = []
    for mt in re.finditer(r"\b(doses?\s+(?:(?:was|is|were|are)\s+)?)?due\s+to\b", work, re.I):
        nxt = min((x for x in mentions if x.start >= mt.end()), key=lambda x: x.start, default=None)
        drug_next = (
            nxt is not None
            and nxt.kind == "subject"
            and nxt.data[0] != "analyte"  # type: ignore[index]
            and not re.search(r"[;:.]", work[mt.end() : nxt.start])
        )
        if mt.group(1) or drug_next:  # "Dose was due to prednisone ...": a drug the terminology may not know
            start = mt.start() + mt.group(0).lower().rfind("due")
            mentions.append(_Mention(start, mt.end(), "role", ("due", "due")))
            dose_due.append((start, mt.end()))
    causal = work
    for a, b in dose_due:
        causal = causal[:a] + " " * (b - a) + causal[b:]
    c.causes = {p for p in roles_config()["cause_phrases"] if re.search(rf"\b{re.escape(p)}\b", causal, re.I)}
    for mt in _BREAK_RE.finditer(work):
        mentions.append(_Mention(mt.start(), mt.end(), "break"))

    # numbers, each with the unit right after it ("1.73" inside "mL/min/1.73m2" is part of the unit)
    masked_to = -1
    for mt in list(_NUMBER_RE.finditer(work)):
        if mt.start() < masked_to:
            continue
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
        elif rest[:1].isalpha() or (rest[:1] == "-" and rest[1:2].isalpha() and not rest.startswith("-year")):
            continue  # an identifier such as 4B, 1st or 2-fold: not a measured quantity ("58-year-old" is one)
        value = float(raw)
        c.numbers.append((value, decimals, unit or None))
        mentions.append(_Mention(mt.start(), end, "number", (value, decimals, unit or None)))
        work = work[: mt.start()] + " " * (end - mt.start()) + work[end:]
        masked_to = end

    take(m.qual_mask_re, lambda mt: None)

    def qual(mt: re.Match[str]) -> None:
        q = m.qual_map[mt.group(1).lower()]
        c.qualifiers.add(q)
        add(mt, "qual", q)

    take(m.qual_re, qual)
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
        c.raw_words.setdefault(s, w)
    _bind(c, mentions, original)
    return c


def _cue(gap: str) -> str | None:
    m = matchers()
    # "below range at 59" says the level, not a threshold: level phrases are not cues ("up from" keeps its "from")
    gap = m.qual_re.sub(
        lambda mt: (
            " " if m.qual_map[mt.group(1).lower()] in ("high", "low", "normal", "critical") else mt.group(0)
        ),
        gap,
    )
    found = None
    for mt in _CUE_RE.finditer(gap):
        word = (mt.group(1) or mt.group(2) or "").lower()
        found = _CUE_ROLE.get(word, "threshold")
    return found


_DAY_GAP = re.compile(r"\s*(?:at|on)?\s*", re.I)


def _join_day_words(mentions: list[_Mention], text: str) -> list[_Mention]:
    """A time of day and the day word beside it ("05:00 today", "yesterday at 22:21") are one time: the value or
    role it belongs to was charted then, not at that clock time on any day (a small model's prompts say times so)."""
    out: list[_Mention] = []
    for mn in mentions:
        prev = out[-1] if out else None
        if (
            prev is not None
            and {prev.kind, mn.kind} == {"when", "relwhen"}
            and _DAY_GAP.fullmatch(text[prev.end : mn.start])
        ):
            clock, day = (prev, mn) if prev.kind == "when" else (mn, prev)
            w: When = clock.data  # type: ignore[assignment]
            if w.clock is not None:
                days = day.data.days  # type: ignore[attr-defined]
                out[-1] = _Mention(prev.start, mn.end, "when", When(w.date, w.clock, days))
                continue
        out.append(mn)
    return out


def _bind(c: Claims, mentions: list[_Mention], text: str) -> None:
    """Walk the sentence left to right: a value belongs to the analyte or drug named last in its clause, a time
    to the value or role word just before it, a qualifier to the subject it stands beside."""
    mentions.sort(key=lambda mn: (mn.start, mn.end))
    mentions[:] = _join_day_words(mentions, text)
    subject: tuple[str, str] | None = None
    pending_quals: list[tuple[int, str]] = []  # (end, qualifier) said before the subject: "high potassium"
    last_value: ValueClaim | None = None
    pending_role: tuple[str, str] | None = None  # (role, word) waiting for its time
    pending_subject: tuple[str, str] | None = None
    deferred: RoleClaim | None = None  # a role word a test's name interrupted, unless restated later
    free_when: When | None = None  # a time of this clause no value or role took: "At 09:10 X was given"
    clause: list[_Mention] = []  # this clause's mentions, for cue words that stand apart from their number
    clause_values: list[tuple[int, ValueClaim]] = []
    consumed: set[int] = set()  # starts of cue words read as a number's cue

    def close_role() -> None:
        nonlocal pending_role, free_when
        if pending_role is None:
            return
        role, word = pending_role
        if free_when is not None:
            c.roles.append(RoleClaim(role, free_when, subject or pending_subject, word, after=False))
            free_when = None
        else:
            c.roles.append(RoleClaim(role, None, subject or pending_subject, word, after=False))
        pending_role = None

    def close_clause() -> None:
        nonlocal deferred
        close_role()
        if deferred is not None:
            c.roles.append(deferred)
            deferred = None
        _bind_cues(c, clause, clause_values, consumed, text)
        clause.clear()
        clause_values.clear()

    prev_end = 0
    anchor_end = (
        0  # end of the last value, subject, time or clause break: cue words after it belong to the next value
    )
    for mn in mentions:
        gap = text[prev_end : mn.start]
        cue_gap = text[anchor_end : mn.start]
        if mn.kind != "break":
            clause.append(mn)
        if mn.kind == "break":
            close_clause()
            subject, last_value, pending_role, free_when = None, None, None, None
            pending_quals = []
        elif mn.kind == "subject":
            same = mn.data == subject  # "2.5 INR at 05:00": naming the test again keeps the value open
            subject = mn.data  # type: ignore[assignment]
            for end, q in pending_quals:
                if re.fullmatch(r"[\s\w'-]{0,12}", text[end : mn.start]):
                    c.bound_qualifiers.append((subject, q))  # type: ignore[arg-type]
            pending_quals = []
            if not same:
                last_value = None
            if subject[0] == "analyte" and pending_role is not None:  # type: ignore[index]
                # "ordered but no INR ... (last INR 2.1 at T)": T is the INR's time; the role stands alone
                # unless the clause says it again with a time ("Dose due: X sodium ... due 09:10")
                if free_when is not None:
                    close_role()
                else:
                    deferred = RoleClaim(pending_role[0], None, pending_subject, pending_role[1], after=False)
                    pending_role = None
        elif mn.kind == "number":
            value, decimals, unit = mn.data  # type: ignore[misc]
            cue = _cue(cue_gap)
            if last_value is not None and re.fullmatch(r"\s*\(\s*=?\s*", gap):
                cue = last_value.cue  # "70 mg/dL (3.9 mmol/L)": the same value in another unit
            consumed.update(x.start for x in clause if x.kind == "cue" and anchor_end <= x.start < mn.start)
            last_value = ValueClaim(value, decimals, unit, subject, cue, None, mn.start)
            c.values.append(last_value)
            clause_values.append((mn.start, last_value))
        elif mn.kind == "role":
            role = mn.data  # type: ignore[assignment]
            if deferred is not None and deferred.role == role[0]:  # type: ignore[index]
                deferred = None  # said again: the later word carries the claim
            if pending_role is not None and pending_role[0] != role[0]:  # type: ignore[index]
                close_role()  # "was due, ... given 09:10": the first role word has no time of its own
            # the same role word again ("Dose due: X due 09:19") restates it: one claim, bound to the time
            pending_role, pending_subject = role, subject  # type: ignore[assignment]
        elif mn.kind == "when":
            when: When = mn.data  # type: ignore[assignment]
            if pending_role is not None:
                c.roles.append(RoleClaim(pending_role[0], when, subject or pending_subject, pending_role[1]))
                pending_role = None
            elif last_value is not None and _joins(last_value.when, when):
                if last_value.when is None:
                    last_value.when = when
                else:  # "on 4 March at 06:00": the date and the time of one value
                    last_value.when = When(
                        last_value.when.date or when.date, last_value.when.clock or when.clock
                    )
            else:
                free_when = when
        elif mn.kind == "relwhen":
            if pending_role is not None:
                c.roles.append(
                    RoleClaim(pending_role[0], mn.data, subject or pending_subject, pending_role[1])
                )  # type: ignore[arg-type]
                pending_role = None
            elif free_when is None:
                free_when = mn.data  # type: ignore[assignment]
        elif mn.kind == "qual":
            if subject is not None:
                c.bound_qualifiers.append((subject, mn.data))  # type: ignore[arg-type]
            else:
                pending_quals.append((mn.end, mn.data))  # type: ignore[arg-type]
        elif mn.kind == "freq":
            if subject is not None:
                c.bound_frequencies.append((subject, mn.data))  # type: ignore[arg-type]
        elif mn.kind == "route":
            if subject is not None and subject[0] != "analyte":
                c.bound_routes.append((subject, mn.data))  # type: ignore[arg-type]
        prev_end = max(prev_end, mn.end)
        if mn.kind in ("number", "subject", "when", "break"):
            anchor_end = max(anchor_end, mn.end)
    close_clause()


_COMPARED_RE = re.compile(
    r"\b(above|below|over|under|beyond|exceed\w*|more than|less than|greater than|higher than|lower than|than|"
    r"from|since|versus|vs|compared (?:with|to))\b[^;:,.]{0,20}$|[<>≥≤][^;:,.]{0,20}$",
    re.I,
)


def _bind_cues(
    c: Claims, clause: list[_Mention], values: list[tuple[int, ValueClaim]], consumed: set[int], text: str
) -> None:
    """A cue word that is not right before its number: 'latest potassium was 5.9' (the value after the test's
    name), '4.6 mmol/L, the previous value' (the value just before); with no value at all, or as the object of a
    comparison ('5.9, above the threshold', 'up from the previous value'), it names no value of its own."""
    for mn in clause:
        if mn.kind != "cue" or mn.start in consumed:
            continue
        cue: str = mn.data  # type: ignore[assignment]
        if cue == "from":
            # "falling from admission": a trend's origin with no value; "a note from nursing" is no cue at all
            after_from = any(pos > mn.start for pos, _ in values)
            trend = any(x.kind == "qual" and x.data in ("rising", "falling") for x in clause)
            if trend and not after_from:
                subject = next((x.data for x in clause if x.kind == "subject"), None)
                c.unbound_cues.append(("from", subject))  # type: ignore[arg-type]
            continue
        compared = bool(_COMPARED_RE.search(text[max(0, mn.start - 40) : mn.start]))
        before = [] if compared else [v for pos, v in values if pos < mn.start]
        after = [v for pos, v in values if pos > mn.start]
        names_next = after and any(x.kind == "subject" and mn.end <= x.start < after[0].start for x in clause)
        if after and (names_next or not before) and after[0].cue is None:
            after[0].cue = cue
        elif before:
            if before[-1].cue is None:
                before[-1].cue = cue
        elif after and not compared:
            continue  # the next value already says which it is
        else:
            subject = next(
                (x.data for x in reversed(clause) if x.kind == "subject" and x.start < mn.start), None
            )
            subject = subject or next((x.data for x in clause if x.kind == "subject"), None)
            c.unbound_cues.append((cue, subject))  # type: ignore[arg-type]


@cache
def roles_config() -> dict:
    """vocabulary.toml [roles]: which role words need their own time, and the cause phrases."""
    return vocabulary()["roles"]


def _joins(have: When | None, new: When) -> bool:
    if have is None:
        return True
    return (have.date is None) != (new.date is None) and (have.clock is None) != (new.clock is None)

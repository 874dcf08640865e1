"""Sentence verifier: a sentence is shown as fact only when each of its claims binds to one record it cites."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from assistant.summary.citations import (
    SentenceSplitter,
    clean_text,
    has_controls,
    is_heading,
    make_visible,
    parse_citations,
    split_sentences,
)
from assistant.summary.claims import Claims, extract_claims, matchers, stem
from assistant.summary.facts import Fact, FactSheet
from assistant.summary.support import (
    Binding,
    Support,
    bind_allergy,
    bind_cues,
    bind_frequencies,
    bind_qualifiers,
    bind_roles,
    bind_routes,
    bind_values,
    fact_support,
    merge,
    number_supported,
)
from assistant.summary.vocab import vocabulary
from assistant.terminology import terminology

__all__ = [
    "Claims",
    "Sentence",
    "SentenceSplitter",
    "Verifier",
    "clean_text",
    "extract_claims",
    "is_heading",
    "iter_verified",
    "parse_citations",
    "split_sentences",
    "stem",
    "verify_sentence",
]


def _max_citations() -> int:
    return int(vocabulary()["summary_groups"]["max_citations"])


@dataclass(slots=True)
class Sentence:
    """One displayed (or dropped) sentence with the sources it cites."""

    text: str  # display text, citation tags removed
    citations: tuple[
        str, ...
    ]  # every record it rests on (ResourceType/id, guideline:<id>, rule:<id>), bound first
    origin: str  # llm | template
    verified: bool
    tags: tuple[str, ...] = ()
    raw: str = ""  # as written, with tags
    reason: str | None = None  # why it was dropped (or shown unverified)
    section: str = "summary"
    group: str = "history"  # summary group (vocabulary.toml [summary_groups])
    # On a template sentence shown in place of a model sentence the verifier dropped: what the model wrote and why
    # it was dropped, so the dashboard can show it one click away ("dropped by the verifier").
    dropped_text: str | None = None
    dropped_reason: str | None = None

    @property
    def shown_citations(self) -> tuple[str, ...]:
        return self.citations[: _max_citations()]

    @property
    def overflow_citations(self) -> tuple[str, ...]:
        """Citations beyond the first few, for a '+N sources' expander."""
        return self.citations[_max_citations() :]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shown_citations"] = list(self.shown_citations)
        data["overflow_citations"] = list(self.overflow_citations)
        return data


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

    def verify(self, raw: str, origin: str = "llm", *, quoted: bool = False) -> Sentence:
        """`quoted`: the sentence quotes chart text word for word (a note), so the note's own negations are data."""
        visible = make_visible(raw)
        text, tags, refs, unknown = parse_citations(visible, self.facts)

        def result(ok: bool, reason: str | None, cited: list[Fact], used: Iterable[str] = ()) -> Sentence:
            every = [r for f in cited for r in f.provenance]
            citations = tuple(dict.fromkeys([*(u for u in used if u in every), *every]))
            first = cited[0] if cited else None
            return Sentence(
                text=text,
                citations=citations,
                origin=origin,
                verified=ok,
                tags=tuple(tags),
                raw=visible.strip(),
                reason=reason,
                section=first.section if first else "summary",
                group=first.group if first else "history",
            )

        if has_controls(raw):
            return result(False, "contains invisible or control characters (shown marked ⟨U+…⟩)", [])
        if unknown:
            return result(False, f"cites [{unknown[0]}], which is not in the fact sheet", [])
        cited = [self.facts[t] for t in tags]
        direct: set[str] = set()
        for ref in refs:
            if ref not in self.sheet.allowed_refs:
                return result(False, f"cites {ref}, which is not a resource of this patient's chart", cited)
            holders = self.refs.get(ref)
            if not holders:
                return result(False, f"cites {ref}, which no fact on the sheet rests on", cited)
            direct.add(ref)
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
        binding = self.check(text, cited, by_tag=set(tags), direct=direct, quoted=quoted)
        return result(binding.reason is None, binding.reason, cited, binding.used)

    def check_claims(self, text: str, cited: list[Fact]) -> str | None:
        return self.check(text, cited).reason

    def check(
        self,
        text: str,
        cited: list[Fact],
        by_tag: set[str] | None = None,
        direct: set[str] | None = None,
        quoted: bool = False,
    ) -> Binding:
        """Sentence-level checks against all cited facts, then each bound claim against one record."""
        claims = extract_claims(text, self.sheet.now)
        if quoted:
            # chart text quoted word for word: its own role and cue words ("doses held today") are data; only a
            # role with a time written after it is still a claim about a record
            # ("today" in a note is the note's day, not the sheet's)
            roles = [r for r in claims.roles if r.after and r.when is not None and r.when.days is None]
            claims = replace(claims, roles=roles, unbound_cues=[])
        sup = merge(self.support(f) for f in cited)
        if direct and by_tag is not None:
            # a record cited directly lends only its own atoms, not those of the other records of its fact
            sup.atoms = [
                a for f in cited for a in self.support(f).atoms if f.tag in by_tag or a.ref in direct
            ]
        b = Binding()
        b.reason = self._sentence_level(claims, sup, quoted=quoted, kinds={f.kind for f in cited})
        for step in (
            bind_values,
            bind_roles,
            bind_cues,
            bind_qualifiers,
            bind_frequencies,
            bind_routes,
            bind_allergy,
        ):
            if b.reason:
                break
            step(claims, sup, b)
        if b.reason is None:
            b.reason = self._new_words(claims, sup)
        return b

    def _sentence_level(
        self, claims: Claims, sup: Support, quoted: bool = False, kinds: set[str] | None = None
    ) -> str | None:
        if claims.allergy and not quoted:
            if not sup.allergy:
                return "allergy claim cites no allergy fact"
            if claims.allergy_negated:
                if claims.ingredients or claims.classes:
                    if self._allergic_to(claims.ingredients, claims.classes):
                        return "says the patient is not allergic to a drug the allergy facts list"
                elif self.sheet.has_active_allergy:
                    return "claims no allergies, but the chart records allergies"
                elif "no-allergy" not in (kinds or set()) and not {"record", "document"} & claims.words:
                    # only a no-known-allergy statement supports "no known allergies"; otherwise the status is
                    # undocumented, and a sentence may only say that nothing is recorded
                    return "says there are no allergies, but the chart has no no-known-allergy statement"
        for value, decimals, unit in claims.numbers:
            if not number_supported(value, decimals, unit, sup):
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
        tm = terminology()
        for ing in sorted(claims.ingredients - sup.ingredients):
            return f"drug {tm.ingredients[ing].name} is not in the cited facts"
        for cls in sorted(claims.classes - sup.classes):
            return f"drug class {tm.class_label(cls)} is not in the cited facts"
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
        for cause in sorted(claims.causes - sup.causes):
            if not quoted:
                return f"'{cause}' states a cause the cited records do not state"
        if claims.negation and not sup.negation and not quoted:
            return "negative claim the cited facts do not make"
        for verb in sorted(claims.advice - sup.advice):
            return f"advice '{verb}' goes beyond the cited facts"
        return None

    @staticmethod
    def _new_words(claims: Claims, sup: Support) -> str | None:
        """No new words: every content word is in a cited record, the vocabulary data or the connective list."""
        m = matchers()
        new = sorted(
            w for w in claims.words if w not in sup.words and w not in m.known_words and w not in m.generic
        )
        if new:
            shown = ", ".join(claims.raw_words.get(w, w) for w in new[:4])
            return f"words not in the cited records or the vocabulary: {shown}"
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


def _date_ok(d: tuple[int | None, int, int], dates: set[tuple[int, int, int]]) -> bool:
    return any((d[0] is None or d[0] == y) and d[1] == mo and d[2] == dd for y, mo, dd in dates)


def verify_sentence(raw: str, sheet: FactSheet, origin: str = "llm") -> Sentence:
    return Verifier(sheet).verify(raw, origin)


def iter_verified(sentences: Iterable[str], sheet: FactSheet, origin: str = "llm") -> Iterator[Sentence]:
    v = Verifier(sheet)
    for s in sentences:
        yield v.verify(s, origin)

"""Which rules a nurse's question is about: 'K is 5.9 and KCl is ordered' points at the hyperkalemia rule."""

from __future__ import annotations

import re
from functools import cache

from assistant.rules.engine import Catalogue, default_catalogue
from assistant.terminology import Terminology, UnknownUnitError, terminology

_NUMBER = r"(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-zµ%/*{}\[\]0-9.^]+(?:/[A-Za-z0-9.{}_\[\]^]+)*)?"
_GAP = r"(?:\s+(?:is|was|of|at|=|:|now|level|down|up|dropped|to|rose|fell|just)){0,3}\s*[:=]?\s*"
_OPS = {
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
}


@cache
def _alias_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    terms = terminology()
    patterns = []
    for analyte in terms.analytes.values():
        for alias in analyte.aliases:
            # Short abbreviations (K, Na, Cr) must match their case exactly; words may be any case.
            flags = 0 if len(alias) <= 3 else re.IGNORECASE
            patterns.append(
                (analyte.key, re.compile(rf"(?<![\w+]){re.escape(alias)}(?![\w+]){_GAP}{_NUMBER}", flags))
            )
    return tuple(patterns)


def lab_mentions(text: str, terms: Terminology | None = None) -> list[tuple[str, float]]:
    """(analyte key, value in its canonical unit) for every 'K 5.9', 'INR is 4.8', 'BG 3.1 mmol/L' in the text."""
    terms = terms or terminology()
    found = []
    for key, pattern in _alias_patterns():
        analyte = terms.analytes[key]
        for m in pattern.finditer(text):
            value = float(m.group("num"))
            unit = m.group("unit")
            if unit and terms.unit_known(analyte, unit):
                try:
                    value = terms.to_canonical(analyte, value, unit)
                except UnknownUnitError:
                    continue
            elif analyte.bare_value_unit and value < analyte.bare_value_unit[0]:
                value = terms.to_canonical(analyte, value, analyte.bare_value_unit[1])  # "BG 3.1" is mmol/L
            found.append((key, value))
    return found


def rules_suggested_by(text: str, catalogue: Catalogue | None = None) -> list[str]:
    """Rules whose lab threshold the question's numbers cross, narrowed by the drugs it names when it names any."""
    catalogue = catalogue or default_catalogue()
    terms = terminology()
    ingredients, classes = terms.match_names(text)
    drug_classes = set(classes) | set(terms.classes_of(ingredients))
    labs = lab_mentions(text, terms)
    hits: list[str] = []
    for rule in catalogue.rules:
        if rule.analyte is None or rule.threshold is None:
            continue
        crossed = any(
            key == rule.analyte
            and _OPS.get(rule.threshold.op, lambda v, t: False)(value, rule.threshold.value)
            for key, value in labs
        )
        if not crossed:
            continue
        names_drugs = bool(ingredients or classes)
        drug_ok = bool(rule.drug_ingredients & set(ingredients) or rule.drug_classes & drug_classes)
        if drug_ok or not names_drugs:
            hits.append(rule.id)
    return hits

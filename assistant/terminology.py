"""Code maps kept as data: LOINC synonyms and unit conversion for analytes, RxNorm and names for medications."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"


class UnknownUnitError(ValueError):
    """A value came in a unit the analyte table has no factor for."""


@dataclass(frozen=True, slots=True)
class Analyte:
    key: str
    name: str
    kind: str
    canonical_unit: str
    loinc: tuple[str, ...]
    factors: dict[str, float]  # normalized unit -> factor
    offsets: dict[str, float]
    source: str
    aliases: tuple[str, ...] = ()  # how nurses write it: "K+", "BG", "plt"
    bare_value_unit: tuple[float, str] | None = None  # a unitless value below this is in this unit


@dataclass(frozen=True, slots=True)
class Ingredient:
    key: str
    rxcui: str
    name: str
    synonyms: tuple[str, ...]
    classes: tuple[str, ...]
    products: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MedicationMatch:
    ingredients: tuple[str, ...]
    classes: tuple[str, ...]
    resolved_by: str  # rxnorm | name | unresolved
    code_text_conflict: bool = False


def _norm_unit(unit: str | None) -> str:
    return (unit or "").replace(" ", "").lower()


def _load_toml(name: str) -> dict:
    with resources.files("assistant.data").joinpath(name).open("rb") as fh:
        return tomllib.load(fh)


class Terminology:
    """Lookup tables built once from assistant/data; pure and thread-safe after construction."""

    def __init__(self, analytes: dict, medications: dict) -> None:
        self.analytes: dict[str, Analyte] = {}
        self._by_loinc: dict[str, str] = {}
        for key, spec in analytes.items():
            analyte = Analyte(
                key=key,
                name=spec["name"],
                kind=spec["kind"],
                canonical_unit=spec["canonical_unit"],
                loinc=tuple(spec["loinc"]),
                factors={_norm_unit(u): float(f) for u, f in spec["units"].items()},
                offsets={_norm_unit(u): float(f) for u, f in spec.get("offsets", {}).items()},
                source=spec.get("source", ""),
                aliases=tuple(spec.get("aliases", ())),
                bare_value_unit=(
                    (float(spec["bare_value_unit"]["below"]), spec["bare_value_unit"]["unit"])
                    if "bare_value_unit" in spec
                    else None
                ),
            )
            self.analytes[key] = analyte
            for code in analyte.loinc:
                if code in self._by_loinc:
                    raise ValueError(f"LOINC {code} is listed under both {self._by_loinc[code]} and {key}")
                self._by_loinc[code] = key

        self.class_names: dict[str, str] = dict(medications["classes"])
        self.ingredients: dict[str, Ingredient] = {}
        self._by_rxcui: dict[str, str] = {}
        self._by_product: dict[str, list[str]] = {}
        names: dict[str, tuple[str, str]] = {}  # lowercase name -> ("ingredient"|"class", key)
        for key, spec in medications["ingredient"].items():
            ing = Ingredient(
                key=key,
                rxcui=str(spec["rxcui"]),
                name=spec["name"],
                synonyms=tuple(spec.get("synonyms", ())),
                classes=tuple(spec.get("classes", ())),
                products=tuple(str(p) for p in spec.get("products", ())),
            )
            unknown = set(ing.classes) - set(self.class_names)
            if unknown:
                raise ValueError(f"ingredient {key} names undeclared classes {sorted(unknown)}")
            self.ingredients[key] = ing
            self._by_rxcui[ing.rxcui] = key
            for product in ing.products:
                self._by_product.setdefault(product, []).append(key)
            for label in (ing.name, *ing.synonyms):
                names[label.lower()] = ("ingredient", key)
        for cls, labels in medications.get("allergy_class_synonyms", {}).items():
            for label in labels:
                names.setdefault(label.lower(), ("class", cls))
        self._names = names
        self._class_rxcui: dict[str, str] = {
            str(k): v for k, v in medications.get("allergy_class_rxcui", {}).items()
        }
        # Longest names first so "insulin glargine" wins over "insulin" and "penicillin v" over "penicillin".
        alternatives = sorted(names, key=len, reverse=True)
        self._name_re = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(a) for a in alternatives) + r")(?![\w-])"
        )

    # --- analytes -------------------------------------------------------------------------------------
    def analyte_for_loinc(self, code: str | None) -> Analyte | None:
        key = self._by_loinc.get(code or "")
        return self.analytes[key] if key else None

    def unit_known(self, analyte: Analyte, unit: str | None) -> bool:
        return _norm_unit(unit) in analyte.factors

    def to_canonical(self, analyte: Analyte, value: float, unit: str | None) -> float:
        """Convert a value to the analyte's canonical unit, or raise UnknownUnitError."""
        u = _norm_unit(unit)
        factor = analyte.factors.get(u)
        if factor is None:
            raise UnknownUnitError(
                f"unit {unit!r} is not known for {analyte.name}; add it to assistant/data/lab_analytes.toml"
            )
        return (value + analyte.offsets.get(u, 0.0)) * factor

    # --- medications ----------------------------------------------------------------------------------
    def classes_of(self, ingredient_keys: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for key in ingredient_keys:
            for cls in self.ingredients[key].classes:
                seen[cls] = None
        return tuple(seen)

    def match_names(self, text: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Ingredients and classes named in free text."""
        if not text:
            return (), ()
        ingredients: dict[str, None] = {}
        classes: dict[str, None] = {}
        for m in self._name_re.finditer(text.lower()):
            kind, key = self._names[m.group(1)]
            (ingredients if kind == "ingredient" else classes)[key] = None
        return tuple(ingredients), tuple(classes)

    def resolve_medication(self, rxnorm_codes: list[str], text: str | None) -> MedicationMatch:
        """RxNorm ingredient or product code first; the name in the text when no code is known."""
        by_code: dict[str, None] = {}
        for code in rxnorm_codes:
            if code in self._by_rxcui:
                by_code[self._by_rxcui[code]] = None
            for key in self._by_product.get(code, ()):
                by_code[key] = None
        by_name, _ = self.match_names(text)
        if by_code:
            keys = tuple(by_code)
            # A code whose ingredient the text never mentions is more likely a wrong code than a wrong label.
            conflict = bool(by_name) and not set(keys) & set(by_name)
            if conflict:
                return MedicationMatch(by_name, self.classes_of(by_name), "name", True)
            return MedicationMatch(keys, self.classes_of(keys), "rxnorm")
        if by_name:
            return MedicationMatch(by_name, self.classes_of(by_name), "name")
        return MedicationMatch((), (), "unresolved")

    def resolve_allergen(
        self, rxnorm_codes: list[str], text: str | None
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Ingredients and classes an allergy names; a class allergy (e.g. penicillins) keeps the class."""
        match = self.resolve_medication(rxnorm_codes, text)
        _, named_classes = self.match_names(text)
        coded_classes = [self._class_rxcui[c] for c in rxnorm_codes if c in self._class_rxcui]
        classes = dict.fromkeys((*match.classes, *named_classes, *coded_classes))
        return match.ingredients, tuple(classes)

    def class_label(self, cls: str) -> str:
        return self.class_names.get(cls, cls)


@cache
def terminology() -> Terminology:
    return Terminology(_load_toml("lab_analytes.toml"), _load_toml("medications.toml"))


@dataclass(frozen=True, slots=True)
class FhirCodes:
    """FHIR codes the core decides on (assistant/data/fhir_codes.toml, each table with its source)."""

    current_encounter_statuses: frozenset[str]
    inpatient_classes: frozenset[str]
    current_location_statuses: frozenset[str]
    ward_types: frozenset[str]
    bed_types: frozenset[str]
    no_known_allergy_codes: frozenset[str]
    code_status_loinc: frozenset[str]
    code_status_answers: dict[str, str]  # SNOMED answer code -> "full" | "dnr" | ...
    usable_observation: frozenset[str]
    given_administration: frozenset[str]
    order_intents: frozenset[str]
    active_condition: frozenset[str]
    refuted_allergy: frozenset[str]
    laboratory_category: frozenset[str]


@cache
def fhir_codes() -> FhirCodes:
    data = _load_toml("fhir_codes.toml")
    enc, loc = data["encounter"], data["location"]
    return FhirCodes(
        current_encounter_statuses=frozenset(enc["current_statuses"]),
        inpatient_classes=frozenset(enc["inpatient_classes"]),
        current_location_statuses=frozenset(enc["current_location_statuses"]),
        ward_types=frozenset(loc["ward_types"]),
        bed_types=frozenset(loc["bed_types"]),
        no_known_allergy_codes=frozenset(data["allergy"]["no_known_allergy_codes"]),
        code_status_loinc=frozenset(data["code_status"]["loinc"]),
        code_status_answers={str(k): str(v) for k, v in data["code_status"]["answers"].items()},
        **{key: frozenset(values) for key, values in data["status"].items()},
    )


@dataclass(frozen=True, slots=True)
class IsolationCodes:
    """How an isolation precaution is charted (fhir_codes.toml [isolation], each code with its public source)."""

    active_statuses: frozenset[str]
    known_statuses: frozenset[str]
    withdrawn_statuses: frozenset[str]
    codes: dict[str, tuple[str, str]]  # SNOMED CT code -> (kind, label)
    phrases: tuple[tuple[str, str, str], ...]  # (lower-case phrase, kind, label), longest first

    def label(self, kind: str) -> str:
        for k, lab in (*self.codes.values(), *((k, lab) for _, k, lab in self.phrases)):
            if k == kind:
                return lab
        return kind.capitalize() if kind else "Isolation"

    def by_text(self, text: str) -> tuple[str, str] | None:
        low = text.lower()
        for phrase, kind, label in self.phrases:
            if re.search(rf"(?<![\w-]){re.escape(phrase)}", low):
                return kind, label
        return None


@cache
def isolation_codes() -> IsolationCodes:
    data = _load_toml("fhir_codes.toml")["isolation"]
    phrases = sorted(
        ((p.lower(), str(v[0]), str(v[1])) for p, v in data["phrases"].items()), key=lambda t: -len(t[0])
    )
    return IsolationCodes(
        active_statuses=frozenset(data["active_statuses"]),
        known_statuses=frozenset(data["known_statuses"]),
        withdrawn_statuses=frozenset(data["withdrawn_statuses"]),
        codes={str(c): (str(v[0]), str(v[1])) for c, v in data["codes"].items()},
        phrases=tuple(phrases),
    )

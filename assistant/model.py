"""The normalized patient chart: typed facts, each carrying the FHIR resource it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

from assistant.terminology import (  # FHIR status codes are data (assistant/data/fhir_codes.toml)
    fhir_codes,
    isolation_codes,
)


@dataclass(frozen=True, slots=True)
class Quantity:
    value: float
    unit: str

    def __str__(self) -> str:
        return f"{format_number(self.value)} {self.unit}".strip()


def format_number(value: float) -> str:
    """Render a number the way a chart shows it: no trailing zeros, at most 3 decimals."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


@dataclass(slots=True)
class DataQualityIssue:
    """Something in the source that could not be read as-is; the chart says so instead of hiding it."""

    source: str  # "ResourceType/id", a file path or a URL
    code: str  # invalid-resource, unknown-unit, unresolved-reference, unknown-medication, fetch-failed, ...
    message: str
    severity: str = "warning"  # "error" when part of the chart is missing, "warning" when a value is unusable


@dataclass(slots=True)
class Demographics:
    ref: str
    name: str
    birth_date: date | None
    sex: str | None
    mrn: str | None

    def age_on(self, when: date) -> int | None:
        if self.birth_date is None:
            return None
        b = self.birth_date
        return when.year - b.year - ((when.month, when.day) < (b.month, b.day))


@dataclass(slots=True)
class EncounterFact:
    ref: str
    status: str
    class_code: str | None
    start: datetime | None
    end: datetime | None
    ward_ref: str | None = None
    ward_name: str | None = None
    bed_ref: str | None = None
    bed_name: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class AllergyFact:
    ref: str
    substance: str
    ingredients: tuple[str, ...]  # resolved ingredient keys (see terminology)
    classes: tuple[str, ...]  # classes the allergy names or its ingredients belong to
    clinical_status: str | None
    verification_status: str | None
    criticality: str | None
    category: tuple[str, ...] = ()
    reactions: tuple[str, ...] = ()
    no_known_allergy: bool = False

    @property
    def is_active(self) -> bool:
        return (
            not self.no_known_allergy
            and self.clinical_status in (None, "active")
            and self.verification_status not in fhir_codes().refuted_allergy
        )


@dataclass(slots=True)
class ConditionFact:
    ref: str
    text: str
    codes: tuple[str, ...]
    clinical_status: str | None
    onset: datetime | None


@dataclass(slots=True)
class Timing:
    frequency: int | None = None
    period: float | None = None
    period_unit: str | None = None  # s, min, h, d, wk
    as_needed: bool = False
    text: str | None = None

    def interval_hours(self) -> float | None:
        """Hours between scheduled doses, or None when the order is not on a fixed schedule."""
        if self.as_needed or not self.frequency or not self.period or not self.period_unit:
            return None
        per_unit = {"s": 1 / 3600, "min": 1 / 60, "h": 1, "d": 24, "wk": 168}.get(self.period_unit)
        if per_unit is None:
            return None
        return self.period * per_unit / self.frequency


@dataclass(slots=True)
class MedicationOrder:
    ref: str
    status: str
    intent: str | None
    text: str
    ingredients: tuple[str, ...]
    classes: tuple[str, ...]
    resolved_by: str  # "rxnorm", "name" or "unresolved"
    rxnorm_codes: tuple[str, ...] = ()
    dose: Quantity | None = None
    dose_text: str | None = None
    route: str | None = None
    timing: Timing = field(default_factory=Timing)
    authored_on: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None

    @property
    def is_active(self) -> bool:
        return self.status == "active" and (self.intent is None or self.intent in fhir_codes().order_intents)


@dataclass(slots=True)
class Administration:
    ref: str
    status: str
    text: str
    ingredients: tuple[str, ...]
    classes: tuple[str, ...]
    order_ref: str | None
    time: datetime | None
    dose: Quantity | None = None
    status_reason: str | None = None

    @property
    def was_given(self) -> bool:
        return self.status in fhir_codes().given_administration


@dataclass(slots=True)
class Result:
    """One measured value: a lab, a vital sign or a nursing assessment score."""

    ref: str
    analyte: str  # canonical analyte key, or "loinc:<code>" / "text:<name>" when unmapped
    name: str
    category: str  # laboratory, vital-signs, survey, exam, ...
    time: datetime | None
    status: str
    loinc: str | None = None
    value: float | None = None  # in the canonical unit; None when absent or not convertible
    unit: str | None = None  # canonical unit
    original: Quantity | None = None
    value_text: str | None = None  # coded or string results
    ref_low: float | None = None
    ref_high: float | None = None
    interpretation: str | None = None  # H, L, HH, LL, N, A, ...
    loinc_codes: tuple[str, ...] = ()  # every LOINC code of the observation (loinc is the first)
    value_codes: tuple[str, ...] = ()  # codes of a coded answer (valueCodeableConcept)

    @property
    def is_usable(self) -> bool:
        return self.status in fhir_codes().usable_observation and self.time is not None

    @property
    def is_lab(self) -> bool:
        """A usable laboratory result (the category code is data: fhir_codes.toml)."""
        return self.category in fhir_codes().laboratory_category and self.is_usable

    @property
    def abnormal(self) -> bool:
        if self.interpretation and self.interpretation not in ("N",):
            return True
        if self.value is None:
            return False
        return (self.ref_low is not None and self.value < self.ref_low) or (
            self.ref_high is not None and self.value > self.ref_high
        )

    def display_value(self) -> str:
        if self.value is not None:
            return str(Quantity(self.value, self.unit or ""))
        if self.original is not None:
            return str(self.original)
        return self.value_text or ""


@dataclass(frozen=True, slots=True)
class CodeStatus:
    """The recorded resuscitation (code) status: the chart's own wording, where it came from, and its kind."""

    text: str  # as the chart words it, e.g. "DNR"
    ref: str  # Observation/id
    time: datetime | None
    kind: str = "unknown"  # "full" | "dnr" | "unknown" (answer code not in assistant/data/fhir_codes.toml)


@dataclass(frozen=True, slots=True)
class IsolationFact:
    """An isolation precaution charted as a FHIR Flag: the chart's words, its kind, status and period."""

    ref: str  # Flag/id
    text: str  # as the chart words it, e.g. "Contact precautions — C. difficile"
    kind: str  # contact | droplet | airborne | protective | transmission-based | isolation (fhir_codes.toml)
    kind_label: str  # the kind in words, shown beside the colour
    status: str  # Flag.status: active | inactive | "unknown" (missing or not a FlagStatus code)
    start: datetime | None = None
    end: datetime | None = None
    codes: tuple[str, ...] = ()
    matched_by: str = "code"  # "code" (a SNOMED CT precaution code) or "text" (a phrase in the flag's words)

    def is_current(self, now: datetime) -> bool:
        """Active (or of unreadable status: shown rather than hidden) and inside its period at `now`."""
        codes = isolation_codes()
        if self.status in codes.known_statuses and self.status not in codes.active_statuses:
            return False
        if self.start is not None and self.start > now:
            return False
        return self.end is None or self.end > now


@dataclass(slots=True)
class Note:
    ref: str
    time: datetime | None
    title: str
    text: str
    author: str | None = None


@dataclass(slots=True)
class Chart:
    patient: Demographics
    source: str
    encounter: EncounterFact | None = None
    encounters: list[EncounterFact] = field(default_factory=list)
    allergies: list[AllergyFact] = field(default_factory=list)
    conditions: list[ConditionFact] = field(default_factory=list)
    orders: list[MedicationOrder] = field(default_factory=list)
    administrations: list[Administration] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    isolation: list[IsolationFact] = field(default_factory=list)  # every isolation Flag read, current or not
    issues: list[DataQualityIssue] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw resources by ref, for display
    resource_count: int = 0
    retrieved_at: datetime | None = None
    # resource type -> why it could not be loaded (a failed fetch, a type the server does not serve): incomplete
    missing_types: dict[str, str] = field(default_factory=dict)

    @property
    def patient_ref(self) -> str:
        return self.patient.ref

    def active_orders(self) -> list[MedicationOrder]:
        return [o for o in self.orders if o.is_active]

    def results_for(self, analyte: str) -> list[Result]:
        """Usable results of one analyte, oldest first."""
        rows = [r for r in self.results if r.analyte == analyte and r.is_usable]
        rows.sort(key=lambda r: r.time)  # type: ignore[arg-type, return-value]
        return rows

    def latest(self, analyte: str) -> Result | None:
        rows = self.results_for(analyte)
        return rows[-1] if rows else None

    def active_allergies(self) -> list[AllergyFact]:
        return [a for a in self.allergies if a.is_active]

    def active_conditions(self) -> list[ConditionFact]:
        active = fhir_codes().active_condition
        return [c for c in self.conditions if c.clinical_status is None or c.clinical_status in active]

    def current_isolation(self, now: datetime) -> list[IsolationFact]:
        """Isolation precautions in force at `now` (active status, inside the flag's period), newest first."""
        rows = [i for i in self.isolation if i.is_current(now)]
        rows.sort(key=lambda i: (i.start or datetime.min.replace(tzinfo=now.tzinfo), i.ref), reverse=True)
        return rows

    def fact_refs(self) -> set[str]:
        refs = {self.patient.ref}
        for group in (
            self.encounters,
            self.allergies,
            self.conditions,
            self.orders,
            self.administrations,
            self.results,
            self.notes,
            self.isolation,
        ):
            refs.update(item.ref for item in group)
        return refs

    def to_dict(self, *, include_resources: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_resources:
            data.pop("resources")
        return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2}


@dataclass(frozen=True, slots=True)
class EvidenceValue:
    """A value a finding rests on, as the nurse should read it."""

    label: str  # e.g. "Potassium", "Potassium chloride 20 mEq PO BID"
    ref: str  # ResourceType/id
    value: str | None = None  # "5.9 mmol/L"
    time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """One chart contradiction: what, why, on which resources, and what the nurse should do."""

    patient: str  # Patient/<id>
    rule_id: str
    category: str
    severity: str  # high | medium | low
    title: str
    message: str
    evidence: tuple[str, ...]  # every resource it rests on, ResourceType/id
    values: tuple[EvidenceValue, ...] = ()
    action: str = ""
    guideline_ids: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    verified: bool = True  # False only for LLM-suggested findings, which are shown as unverified

    @property
    def sort_key(self) -> tuple:
        return (SEVERITY_ORDER.get(self.severity, 9), self.rule_id, self.evidence)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

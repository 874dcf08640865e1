"""The FhirSource interface every connector implements, patient records, completeness and de-duplication."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from assistant.model import Chart, DataQualityIssue
from assistant.normalize import (
    SHARED_TYPES,
    build_chart,
    census_encounter,
    dedupe_resources,
    duplicate_issue,
    newer,
    resource_key,
    resource_owner,
)
from connectors.errors import FhirError

# Re-exported for the connectors: one implementation of ownership and de-duplication, in the core.
__all__ = [
    "ANY_TYPE",
    "SHARED_TYPES",
    "CensusEntry",
    "FhirSource",
    "PatientRecord",
    "SourceCompleteness",
    "Ward",
    "census_from_encounters",
    "chart_from_record",
    "dedupe_resources",
    "merge_duplicates",
    "missing_issues",
    "newer",
    "resource_key",
    "resource_owner",
]
ANY_TYPE = "*"  # key of missing_types when what is missing cannot be tied to one resource type


@dataclass(slots=True)
class PatientRecord:
    """One patient's raw resources as read from a source, or the error that stopped reading them.

    `missing_types` maps a resource type to why it could not be loaded for this patient (source-wide gaps
    included): a chart built from an incomplete record must not be judged on the absence of those types.
    """

    patient_id: str
    resources: list[dict[str, Any]] = field(default_factory=list)
    issues: list[DataQualityIssue] = field(default_factory=list)
    error: FhirError | None = None
    origin: str = ""
    missing_types: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0  # resources dropped as repeats of the same type+id

    @property
    def incomplete(self) -> bool:
        return bool(self.missing_types)

    def mark_missing(self, rtype: str, reason: str) -> None:
        self.missing_types.setdefault(rtype, reason)


@dataclass(slots=True)
class SourceCompleteness:
    """What a source could not deliver: types missing for everyone, export errors, per-patient gaps, duplicates."""

    missing_types: dict[str, str] = field(default_factory=dict)  # type -> reason, for every patient
    errors: list[str] = field(default_factory=list)  # export-level: manifest errors, failed or expired files
    patients: dict[str, dict[str, str]] = field(default_factory=dict)  # patient id -> {type: reason}
    duplicates: int = 0
    # shared types (Location, Medication) not delivered: said, but no rule rests on their absence
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def incomplete(self) -> bool:
        return bool(self.missing_types or self.errors or self.patients)

    def note_record(self, record: PatientRecord) -> None:
        """Record one patient's own gaps (those beyond the source-wide ones) and its duplicates."""
        own = {t: r for t, r in record.missing_types.items() if t not in self.missing_types}
        with self._lock:
            self.duplicates += record.duplicates
            if own:
                self.patients.setdefault(record.patient_id, {}).update(own)

    def apply(self, record: PatientRecord) -> PatientRecord:
        """Merge the source-wide missing types into a record (its own reasons win)."""
        for rtype, reason in self.missing_types.items():
            record.mark_missing(rtype, reason)
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "incomplete": self.incomplete,
            "missing_types": dict(self.missing_types),
            "errors": list(self.errors),
            "patients": {pid: dict(types) for pid, types in self.patients.items()},
            "duplicates": self.duplicates,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """One line for a CLI or a banner; empty when complete."""
        if not self.incomplete:
            return ""
        parts = []
        if self.missing_types:
            parts.append(
                "not loaded for any patient: "
                + "; ".join(
                    f"{'resources of any type' if t == ANY_TYPE else t} ({r})"
                    for t, r in sorted(self.missing_types.items())
                )
            )
        if self.errors:
            parts.append(f"{len(self.errors)} export error(s): " + "; ".join(self.errors[:3]))
        if self.patients:
            types = sorted({t for gaps in self.patients.values() for t in gaps})
            parts.append(f"{len(self.patients)} patient(s) partly loaded (missing {', '.join(types)})")
        return "incomplete: " + "; ".join(parts)


def merge_duplicates(record: PatientRecord) -> PatientRecord:
    """Drop repeats of the same type+id in a record (newest meta.lastUpdated kept) and say how many."""
    record.resources, dropped = dedupe_resources(record.resources)
    if dropped:
        record.duplicates += dropped
        record.issues.append(duplicate_issue(dropped, f"Patient/{record.patient_id}"))
    return record


def missing_issues(missing: Mapping[str, str]) -> list[DataQualityIssue]:
    return [
        DataQualityIssue(
            rtype if rtype != ANY_TYPE else "source",
            "incomplete",
            f"{'resources of an unknown type' if rtype == ANY_TYPE else rtype + ' resources'} could not be "
            f"loaded ({reason}); the chart is incomplete",
            "error",
        )
        for rtype, reason in sorted(missing.items())
    ]


@dataclass(frozen=True, slots=True)
class CensusEntry:
    patient_id: str
    encounter_ref: str
    ward_ref: str | None
    bed_ref: str | None


@dataclass(frozen=True, slots=True)
class Ward:
    ref: str
    name: str


class FhirSource(ABC):
    """Where charts come from. Implementations own I/O only; normalization is shared."""

    description: str = ""

    @property
    def completeness(self) -> SourceCompleteness:
        """What this source could not deliver so far (filled further as patient records are read)."""
        found = self.__dict__.get("_completeness")
        if found is None:
            found = self.__dict__["_completeness"] = SourceCompleteness()
        return found

    @abstractmethod
    def iter_patient_ids(self) -> Iterator[str]: ...

    @abstractmethod
    def patient_resources(self, patient_id: str) -> PatientRecord: ...

    def patient_chart(self, patient_id: str, *, strict: bool = False) -> Chart:
        record = self.patient_resources(patient_id)
        if record.error is not None:
            raise record.error
        return chart_from_record(record, source=self.description, strict=strict)

    def iter_patient_records(self) -> Iterator[PatientRecord]:
        """Every patient's resources; sources that can read each patient in one pass override this."""
        for pid in self.iter_patient_ids():
            try:
                yield self.patient_resources(pid)
            except FhirError as exc:
                yield PatientRecord(patient_id=pid, error=exc, origin=self.description)

    def wards(self) -> list[Ward]:
        return []

    def ward_census(self, ward_ref: str | None = None) -> list[CensusEntry]:
        """Patients with an in-progress encounter located on the ward (all wards when None)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> FhirSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def census_from_encounters(
    patient_id: str, encounters: list[dict], locations: dict[str, dict], ward_ref: str | None
) -> list[CensusEntry]:
    """The patient's current encounter when it sits on `ward_ref` (all wards when None): the same encounter, ward
    and bed the chart shows (assistant.normalize.census_encounter, codes in assistant/data/fhir_codes.toml)."""
    enc = census_encounter(encounters, locations)
    if enc is None or (ward_ref is not None and enc.ward_ref != ward_ref):
        return []
    return [CensusEntry(patient_id, enc.ref, enc.ward_ref, enc.bed_ref)]


def chart_from_record(record: PatientRecord, *, source: str, strict: bool = False) -> Chart:
    """A Chart from one record, carrying its missing types (as a field and as data-quality issues)."""
    issues = list(record.issues) + missing_issues(record.missing_types)
    chart = build_chart(
        record.resources, source=source, patient_id=record.patient_id, strict=strict, issues=issues
    )
    chart.missing_types = dict(record.missing_types)
    return chart

"""The FhirSource interface every connector implements, patient records, completeness and de-duplication."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from assistant.model import Chart, DataQualityIssue
from assistant.normalize import build_chart, local_ref
from connectors.errors import FhirError

SHARED_TYPES = {"Location", "Medication", "Organization", "Practitioner"}
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
        }

    def summary(self) -> str:
        """One line for a CLI or a banner; empty when complete."""
        if not self.incomplete:
            return ""
        parts = []
        if self.missing_types:
            parts.append(
                "not loaded for any patient: "
                + "; ".join(f"{t} ({r})" for t, r in sorted(self.missing_types.items()))
            )
        if self.errors:
            parts.append(f"{len(self.errors)} export error(s): " + "; ".join(self.errors[:3]))
        if self.patients:
            types = sorted({t for gaps in self.patients.values() for t in gaps})
            parts.append(f"{len(self.patients)} patient(s) partly loaded (missing {', '.join(types)})")
        return "incomplete: " + "; ".join(parts)


def resource_owner(resource: dict) -> str | None:
    """The patient id a compartment resource belongs to (its own id for a Patient), or None."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    for key in ("subject", "patient"):
        holder = resource.get(key)
        if isinstance(holder, dict):
            ref = local_ref(holder.get("reference"))
            if ref and ref.startswith("Patient/"):
                return ref.split("/", 1)[1]
    return None


def resource_key(resource: Any) -> str | None:
    """'Type/id' of a resource, or None when it has no usable id (such resources are never merged)."""
    if not isinstance(resource, dict):
        return None
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if isinstance(rtype, str) and isinstance(rid, str) and rid:
        return f"{rtype}/{rid}"
    return None


def _last_updated(resource: dict) -> datetime | None:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None  # a naive instant cannot be ordered against others


def newer(candidate: dict, kept: dict) -> bool:
    """True when `candidate` should replace `kept`: a later meta.lastUpdated, or the later copy on a tie."""
    a, b = _last_updated(candidate), _last_updated(kept)
    if a is None or b is None:
        return b is None  # a dated copy beats an undated one; two undated copies: the later one read
    return a >= b


def dedupe_resources(resources: Iterable[dict]) -> tuple[list[dict], int]:
    """Resources with repeats of the same type+id merged (newest meta.lastUpdated wins); first-seen order kept.

    Returns the resources and how many repeats were dropped, for a data-quality count.
    """
    out: list[dict] = []
    position: dict[str, int] = {}
    dropped = 0
    for resource in resources:
        key = resource_key(resource)
        if key is None:
            out.append(resource)
            continue
        at = position.get(key)
        if at is None:
            position[key] = len(out)
            out.append(resource)
            continue
        dropped += 1
        if newer(resource, out[at]):
            out[at] = resource
    return out, dropped


def duplicate_issue(origin: str, count: int) -> DataQualityIssue:
    return DataQualityIssue(
        origin,
        "duplicate-resource",
        f"{count} resource(s) appeared more than once (same type and id); the newest by meta.lastUpdated was kept",
        "warning",
    )


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
    """In-progress encounters of one patient that sit on `ward_ref` (directly or through a bed's partOf)."""
    entries = []
    for enc in encounters:
        if enc.get("status") not in ("in-progress", "arrived", "onleave"):
            continue
        ward = bed = None
        for loc in enc.get("location") or []:
            if not isinstance(loc, dict) or loc.get("status") not in (None, "active"):
                continue
            lref = local_ref((loc.get("location") or {}).get("reference"))
            target = locations.get(lref or "", {})
            kind = _physical_type(loc) or _physical_type(target)
            if kind in ("bd", "ro"):
                bed = lref
                parent = local_ref((target.get("partOf") or {}).get("reference")) if target else None
                ward = ward or parent
            else:
                ward = ward or lref
        if ward_ref is None or ward == ward_ref:
            entries.append(CensusEntry(patient_id, f"Encounter/{enc.get('id')}", ward, bed))
    return entries


def _physical_type(obj: dict) -> str | None:
    for coding in (obj.get("physicalType") or {}).get("coding", []) or []:
        if isinstance(coding, dict) and coding.get("code"):
            return coding["code"]
    return None


def chart_from_record(record: PatientRecord, *, source: str, strict: bool = False) -> Chart:
    """A Chart from one record, carrying its missing types (as a field and as data-quality issues)."""
    issues = list(record.issues)
    if record.duplicates:
        issues.append(duplicate_issue(record.origin or source, record.duplicates))
    issues += missing_issues(record.missing_types)
    chart = build_chart(
        record.resources, source=source, patient_id=record.patient_id, strict=strict, issues=issues
    )
    chart.missing_types = dict(record.missing_types)
    return chart

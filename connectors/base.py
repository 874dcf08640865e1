"""The FhirSource interface every connector implements, and the factory that picks one from a SOURCE string."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.model import Chart, DataQualityIssue
from assistant.normalize import build_chart, local_ref
from connectors.errors import FhirError, SourceFileError

SHARED_TYPES = {"Location", "Medication", "Organization", "Practitioner"}


@dataclass(slots=True)
class PatientRecord:
    """One patient's raw resources as read from a source, or the error that stopped reading them."""

    patient_id: str
    resources: list[dict[str, Any]] = field(default_factory=list)
    issues: list[DataQualityIssue] = field(default_factory=list)
    error: FhirError | None = None
    origin: str = ""


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

    @abstractmethod
    def iter_patient_ids(self) -> Iterator[str]: ...

    @abstractmethod
    def patient_resources(self, patient_id: str) -> PatientRecord: ...

    def patient_chart(self, patient_id: str, *, strict: bool = False) -> Chart:
        record = self.patient_resources(patient_id)
        if record.error is not None:
            raise record.error
        return build_chart(
            record.resources,
            source=self.description,
            patient_id=patient_id,
            strict=strict,
            issues=record.issues,
        )

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


def open_source(spec: str | Path, **options: Any) -> FhirSource:
    """SOURCE as given on the command line: an http(s) FHIR base URL, a bundle directory or an NDJSON directory."""
    text = str(spec)
    if text.startswith(("http://", "https://")):
        from connectors.rest import RestFhirSource

        return RestFhirSource.from_settings(text, **options)
    path = Path(text)
    if not path.exists():
        raise SourceFileError(
            text, "no such file or directory; give a FHIR base URL, a bundle directory or an NDJSON directory"
        )
    if path.is_dir() and any(p.name.endswith((".ndjson", ".ndjson.gz")) for p in path.iterdir()):
        from connectors.ndjson_dir import NdjsonDirSource

        return NdjsonDirSource(path)
    from connectors.bundle_dir import BundleDirSource

    return BundleDirSource(path)

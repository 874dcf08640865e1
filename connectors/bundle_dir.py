"""A directory (or single file) of FHIR Bundles, .json or .json.gz, e.g. Synthea output or the demo ward."""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from assistant.model import DataQualityIssue
from assistant.normalize import local_ref
from connectors.base import SHARED_TYPES, CensusEntry, FhirSource, PatientRecord, Ward, census_from_encounters
from connectors.errors import FhirNotFoundError, SourceFileError

log = logging.getLogger(__name__)
# Files a bundle directory may carry that are not FHIR: the demo ward's metadata and answer key.
METADATA_FILES = frozenset({"ward.json", "answer_key.json"})


def read_json_file(path: Path) -> Any:
    """Load .json or .json.gz, turning every way it can fail into a SourceFileError naming the file."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceFileError(str(path), f"cannot be read ({exc.__class__.__name__}: {exc})") from exc
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceFileError(str(path), f"is not valid JSON ({exc})") from exc


def bundle_resources(bundle: Any, origin: str) -> tuple[list[dict], list[DataQualityIssue]]:
    """The resources of a Bundle with urn:uuid and absolute fullUrl references rewritten to 'Type/id'."""
    if not isinstance(bundle, dict):
        raise SourceFileError(origin, "is JSON but not a FHIR resource")
    if bundle.get("resourceType") != "Bundle":
        if isinstance(bundle.get("resourceType"), str):
            return [bundle], []
        raise SourceFileError(origin, "is JSON but has no resourceType; not FHIR")
    resources: list[dict] = []
    issues: list[DataQualityIssue] = []
    aliases: dict[str, str] = {}
    for n, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            issues.append(
                DataQualityIssue(
                    f"{origin}#entry[{n}]", "invalid-resource", "bundle entry has no resource", "error"
                )
            )
            continue
        resources.append(resource)
        rtype, rid = resource.get("resourceType"), resource.get("id")
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and isinstance(rtype, str) and isinstance(rid, str):
            aliases[full_url] = f"{rtype}/{rid}"
    if aliases:
        for resource in resources:
            _rewrite_references(resource, aliases)
    return resources, issues


def _rewrite_references(node: Any, aliases: dict[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in aliases:
            node["reference"] = aliases[ref]
        for value in node.values():
            if isinstance(value, (dict, list)):
                _rewrite_references(value, aliases)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                _rewrite_references(item, aliases)


def _owner(resource: dict) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for key in ("subject", "patient"):
        holder = resource.get(key)
        if isinstance(holder, dict):
            ref = local_ref(holder.get("reference"))
            if ref and ref.startswith("Patient/"):
                return ref.split("/", 1)[1]
    return None


def split_by_patient(resources: list[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Group a file's resources by patient; shared resources (Location, Medication, ...) are returned apart."""
    by_patient: dict[str, list[dict]] = {}
    shared: list[dict] = []
    orphans: list[dict] = []
    for r in resources:
        if r.get("resourceType") in SHARED_TYPES:
            shared.append(r)
            continue
        owner = _owner(r)
        if owner is None:
            orphans.append(r)
        else:
            by_patient.setdefault(owner, []).append(r)
    if len(by_patient) == 1 and orphans:
        # A single-patient bundle: resources without a subject still belong to that chart (and get reported there).
        next(iter(by_patient.values())).extend(orphans)
    return by_patient, shared


def _without_locations(resources: list[dict]) -> list[dict]:
    return [r for r in resources if r.get("resourceType") != "Location"]


class BundleDirSource(FhirSource):
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self._index: dict[str, Path] | None = None
        self._shared: list[dict] | None = None
        self.file_errors: list[SourceFileError] = []

    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file()
            and p.name.endswith((".json", ".json.gz"))
            and not p.name.startswith(".")
            and p.name not in METADATA_FILES
        )

    def _read(self, path: Path) -> tuple[dict[str, list[dict]], list[dict], list[DataQualityIssue]]:
        resources, issues = bundle_resources(read_json_file(path), str(path))
        by_patient, shared = split_by_patient(resources)
        return by_patient, shared, issues

    def _scan(self) -> None:
        index: dict[str, Path] = {}
        shared: dict[str, dict] = {}
        self.file_errors = []
        for path in self.files():
            try:
                by_patient, file_shared, _ = self._read(path)
            except SourceFileError as exc:
                log.warning("skipping unreadable file: %s", exc.reason)
                self.file_errors.append(exc)
                continue
            for r in file_shared:
                if r.get("resourceType") == "Location" and isinstance(r.get("id"), str):
                    shared.setdefault(r["id"], r)
            for pid in by_patient:
                index.setdefault(pid, path)
        self._index, self._shared = index, list(shared.values())

    @property
    def index(self) -> dict[str, Path]:
        if self._index is None:
            self._scan()
        return self._index  # type: ignore[return-value]

    def iter_patient_ids(self) -> Iterator[str]:
        yield from self.index

    def patient_resources(self, patient_id: str) -> PatientRecord:
        path = self.index.get(patient_id)
        if path is None:
            raise FhirNotFoundError(
                f"Patient/{patient_id} is not in {self.path}; list patients with `nva patients`"
            )
        by_patient, shared, issues = self._read(path)
        return PatientRecord(
            patient_id,
            by_patient.get(patient_id, []) + _without_locations(shared) + list(self._shared or []),
            issues,
            origin=str(path),
        )

    def iter_patient_records(self) -> Iterator[PatientRecord]:
        """One pass over the files, each read once: the audit's path."""
        if self._shared is None:
            self._scan()
        for path in self.files():
            try:
                by_patient, shared, issues = self._read(path)
            except SourceFileError as exc:
                yield PatientRecord(patient_id=f"file:{path.name}", error=exc, origin=str(path))
                continue
            for pid, resources in by_patient.items():
                yield PatientRecord(
                    pid,
                    resources + _without_locations(shared) + list(self._shared or []),
                    issues,
                    origin=str(path),
                )

    def wards(self) -> list[Ward]:
        if self._shared is None:
            self._scan()
        seen: dict[str, Ward] = {}
        for loc in self._shared or []:
            kind = [c.get("code") for c in (loc.get("physicalType") or {}).get("coding", [])]
            if "wa" in kind:
                seen[f"Location/{loc['id']}"] = Ward(f"Location/{loc['id']}", loc.get("name") or loc["id"])
        return sorted(seen.values(), key=lambda w: w.name)

    def ward_census(self, ward_ref: str | None = None) -> list[CensusEntry]:
        if self._shared is None:
            self._scan()
        locations = {f"Location/{loc['id']}": loc for loc in self._shared or []}
        entries: list[CensusEntry] = []
        for pid in self.index:
            record = self.patient_resources(pid)
            for r in record.resources:
                if r.get("resourceType") == "Location":
                    locations.setdefault(f"Location/{r['id']}", r)
            encounters = [r for r in record.resources if r.get("resourceType") == "Encounter"]
            entries.extend(census_from_encounters(pid, encounters, locations, ward_ref))
        return entries

"""A Bulk Data export directory: NDJSON files (.ndjson or .ndjson.gz), each line read by its own resourceType."""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from assistant.model import DataQualityIssue
from assistant.normalize import is_current_encounter, location_kind, location_name
from connectors.base import (
    ANY_TYPE,
    SHARED_TYPES,
    CensusEntry,
    FhirSource,
    PatientRecord,
    SourceCompleteness,
    Ward,
    census_from_encounters,
    merge_duplicates,
    newer,
    resource_owner,
)
from connectors.errors import FhirNotFoundError, SourceFileError
from connectors.partition import is_ndjson_file, line_type, ndjson_files, open_read, partition_export

log = logging.getLogger(__name__)

# Written by the bulk export client next to the files: what the server could not export (types, failed files).
EXPORT_STATUS = ".export-complete.json"
EXPORT_JOB = (
    ".export-job.json"  # written at kick-off; alone (no status file) it means the export stopped mid-way
)

__all__ = [
    "EXPORT_JOB",
    "EXPORT_STATUS",
    "NdjsonDirSource",
    "is_ndjson_file",
    "iter_ndjson",
    "read_export_status",
    "write_ndjson_export",
]


def iter_ndjson(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, resource or None, problem) for each non-empty line; never loads the file whole."""
    try:
        with open_read(path) as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, None, f"line {n} is not valid JSON ({exc.msg})"
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
                    yield n, None, f"line {n} is not a FHIR resource"
                    continue
                yield n, obj, None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise SourceFileError(str(path), f"cannot be read ({exc.__class__.__name__}: {exc})") from exc


def read_export_status(directory: Path) -> SourceCompleteness:
    """The completeness a bulk export left in `directory` (complete when there is no status file)."""
    completeness = SourceCompleteness()
    if (directory / EXPORT_JOB).exists() and not (directory / EXPORT_STATUS).exists():
        # the bulk export client stopped before the last file: whatever is here may be any part of the export
        completeness.errors.append(
            "the bulk export into this directory did not finish; rerun it with --resume"
        )
        completeness.missing_types[ANY_TYPE] = "the export did not finish"
        return completeness
    try:
        data = json.loads((directory / EXPORT_STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return completeness
    if not isinstance(data, dict):
        return completeness
    missing = data.get("missing_types")
    if isinstance(missing, dict):
        completeness.missing_types.update({str(k): str(v) for k, v in missing.items()})
    notes = data.get("notes")
    if isinstance(notes, list):
        completeness.notes.extend(str(n) for n in notes)
    messages = data.get("error_messages")
    if isinstance(messages, list):
        completeness.errors.extend(str(m) for m in messages)
    elif data.get("errors"):  # a status file from before error messages were kept
        completeness.errors.append(f"the server reported {len(data['errors'])} export error file(s)")
        completeness.missing_types.setdefault(ANY_TYPE, "the export reported errors")
    return completeness


class NdjsonDirSource(FhirSource):
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self._patient_ids: list[str] | None = None
        self._locations: dict[str, dict] | None = None
        self._file_types: dict[Path, str | None] = {}
        self.__dict__["_completeness"] = read_export_status(self.path)

    def files(self) -> list[Path]:
        return ndjson_files(self.path)

    def file_type(self, path: Path) -> str | None:
        """The resourceType of a file's first resource: exports hold one type per file whatever the name."""
        if path not in self._file_types:
            found = None
            try:
                with open_read(path) as fh:
                    for line in fh:
                        if line.strip():
                            found = line_type(line)
                            if found is None:
                                obj = json.loads(line)
                                found = obj.get("resourceType") if isinstance(obj, dict) else None
                            break
            except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError):
                found = None  # unreadable: the partitioning pass reports it
            self._file_types[path] = found if isinstance(found, str) else None
        return self._file_types[path]

    def _files_of(self, rtype: str) -> list[Path]:
        return [p for p in self.files() if self.file_type(p) == rtype]

    def _resources_of(self, rtype: str) -> Iterator[dict]:
        for path in self._files_of(rtype):
            try:
                for _, obj, _problem in iter_ndjson(path):
                    if obj is not None and obj.get("resourceType") == rtype:
                        yield obj
            except SourceFileError as exc:
                log.warning("skipping the rest of an unreadable export file: %s", exc.reason)

    def iter_patient_ids(self) -> Iterator[str]:
        if self._patient_ids is None:
            seen: dict[str, None] = {}  # ordered, de-duplicated: a patient served twice is listed once
            for obj in self._resources_of("Patient"):
                if isinstance(obj.get("id"), str) and obj["id"]:
                    seen.setdefault(obj["id"], None)
            self._patient_ids = list(seen)
        yield from self._patient_ids

    def locations(self) -> dict[str, dict]:
        if self._locations is None:
            self._locations = {}
            for obj in self._resources_of("Location"):
                if isinstance(obj.get("id"), str):
                    key = f"Location/{obj['id']}"
                    kept = self._locations.get(key)
                    if kept is None or newer(obj, kept):
                        self._locations[key] = obj
        return self._locations

    def patient_resources(self, patient_id: str) -> PatientRecord:
        """One patient from an export: a streaming scan that parses only lines naming the patient."""
        needles = (f'"Patient/{patient_id}"', f'"id": "{patient_id}"', f'"id":"{patient_id}"')
        record = PatientRecord(patient_id, origin=str(self.path))
        found = False
        for path in self.files():
            if self.file_type(path) in SHARED_TYPES:
                continue
            try:
                with open_read(path) as fh:
                    for n, line in enumerate(fh, start=1):
                        if not any(needle in line for needle in needles):
                            continue
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as exc:
                            record.issues.append(
                                DataQualityIssue(
                                    f"{path.name}:{n}",
                                    "invalid-json",
                                    f"line {n} is not valid JSON ({exc.msg})",
                                    "error",
                                )
                            )
                            continue
                        if isinstance(obj, dict) and resource_owner(obj) == patient_id:
                            record.resources.append(obj)
                            found = found or obj.get("resourceType") == "Patient"
            except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
                record.issues.append(
                    DataQualityIssue(str(path), "file-unreadable", f"cannot be read: {exc}", "error")
                )
                record.mark_missing(
                    self.file_type(path) or ANY_TYPE, f"{path.name} could not be read to the end"
                )
        if not found:
            raise FhirNotFoundError(f"Patient/{patient_id} is not in {self.path}")
        merge_duplicates(record)
        record.resources.extend(self.locations().values())
        self.completeness.apply(record)
        self.completeness.note_record(record)
        return record

    def iter_patient_records(self) -> Iterator[PatientRecord]:
        """Partition the export by patient on disk, then read one partition at a time: memory stays flat."""
        for record in partition_export(self).iter_records():
            self.completeness.note_record(record)
            yield record

    def wards(self) -> list[Ward]:
        out = []
        for ref, loc in self.locations().items():
            if location_kind(loc) == "ward":  # physical types from assistant/data/fhir_codes.toml
                out.append(Ward(ref, location_name(loc) or ref))
        return sorted(out, key=lambda w: w.name)

    def ward_census(self, ward_ref: str | None = None) -> list[CensusEntry]:
        encounters: dict[str, dict[str, dict]] = {}
        for obj in self._resources_of("Encounter"):
            owner = resource_owner(obj)
            if not owner:
                continue
            mine = encounters.setdefault(owner, {})
            key = str(obj.get("id"))
            kept = mine.get(key)
            if kept is None or newer(obj, kept):  # a duplicate's newest copy decides the status
                mine[key] = obj
        entries = []
        for pid, by_id in encounters.items():
            current = [e for e in by_id.values() if is_current_encounter(e)]
            if current:
                entries.extend(census_from_encounters(pid, current, self.locations(), ward_ref))
        return entries


def write_ndjson_export(
    records: Iterator[tuple[str, list[dict]]] | list[Any], outdir: Path, *, gz: bool = False
) -> Path:
    """Write resources as a Bulk Data style export (one file per type); used by tests, benchmarks and `nva export`."""
    outdir.mkdir(parents=True, exist_ok=True)
    handles: dict[str, IO[str]] = {}
    seen_shared: set[str] = set()
    try:
        for _pid, resources in records:
            for r in resources:
                rtype = r["resourceType"]
                if rtype in SHARED_TYPES:
                    key = f"{rtype}/{r.get('id')}"
                    if key in seen_shared:
                        continue
                    seen_shared.add(key)
                fh = handles.get(rtype)
                if fh is None:
                    name = f"{rtype}.ndjson" + (".gz" if gz else "")
                    fh = handles[rtype] = (
                        gzip.open(outdir / name, "wt", encoding="utf-8")
                        if gz
                        else (outdir / name).open("w", encoding="utf-8")
                    )
                fh.write(json.dumps(r, separators=(",", ":")) + "\n")
    finally:
        for fh in handles.values():
            fh.close()
    return outdir

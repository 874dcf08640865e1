"""A Bulk Data export directory: NDJSON files (.ndjson or .ndjson.gz) of one resource type each, streamed."""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from assistant.model import DataQualityIssue
from connectors.base import SHARED_TYPES, CensusEntry, FhirSource, PatientRecord, Ward, census_from_encounters
from connectors.bundle_dir import _owner
from connectors.errors import FhirNotFoundError, SourceFileError

log = logging.getLogger(__name__)


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def iter_ndjson(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, resource or None, problem) for each non-empty line; never loads the file whole."""
    try:
        with _open_text(path) as fh:
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


class NdjsonDirSource(FhirSource):
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self._patient_ids: list[str] | None = None
        self._locations: dict[str, dict] | None = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz")))

    def _files_of(self, rtype: str) -> list[Path]:
        return [p for p in self.files() if p.name.split(".")[0] == rtype]

    def iter_patient_ids(self) -> Iterator[str]:
        if self._patient_ids is None:
            ids = []
            for path in self._files_of("Patient"):
                for _, obj, _problem in iter_ndjson(path):
                    if obj is not None and isinstance(obj.get("id"), str):
                        ids.append(obj["id"])
            self._patient_ids = ids
        yield from self._patient_ids

    def locations(self) -> dict[str, dict]:
        if self._locations is None:
            self._locations = {}
            for path in self._files_of("Location"):
                for _, obj, _problem in iter_ndjson(path):
                    if obj is not None and isinstance(obj.get("id"), str):
                        self._locations[f"Location/{obj['id']}"] = obj
        return self._locations

    def patient_resources(self, patient_id: str) -> PatientRecord:
        """One patient from an export: a streaming scan that parses only lines naming the patient."""
        needles = (f'"Patient/{patient_id}"', f'"id": "{patient_id}"', f'"id":"{patient_id}"')
        record = PatientRecord(patient_id, origin=str(self.path))
        found = False
        for path in self.files():
            rtype = path.name.split(".")[0]
            if rtype in SHARED_TYPES:
                continue
            try:
                with _open_text(path) as fh:
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
                        if isinstance(obj, dict) and _owner(obj) == patient_id:
                            record.resources.append(obj)
                            found = found or obj.get("resourceType") == "Patient"
            except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
                record.issues.append(
                    DataQualityIssue(str(path), "file-unreadable", f"cannot be read: {exc}", "error")
                )
        if not found:
            raise FhirNotFoundError(f"Patient/{patient_id} is not in {self.path}")
        record.resources.extend(self.locations().values())
        return record

    def iter_patient_records(self) -> Iterator[PatientRecord]:
        """Partition the export by patient on disk, then read one partition at a time: memory stays flat."""
        from assistant.audit.partition import partition_export  # local import: audit depends on connectors

        yield from partition_export(self).iter_records()

    def wards(self) -> list[Ward]:
        out = []
        for ref, loc in self.locations().items():
            kinds = [c.get("code") for c in (loc.get("physicalType") or {}).get("coding", [])]
            if "wa" in kinds:
                out.append(Ward(ref, loc.get("name") or ref))
        return sorted(out, key=lambda w: w.name)

    def ward_census(self, ward_ref: str | None = None) -> list[CensusEntry]:
        encounters: dict[str, list[dict]] = {}
        for path in self._files_of("Encounter"):
            for _, obj, _problem in iter_ndjson(path):
                if obj is not None and obj.get("status") in ("in-progress", "arrived", "onleave"):
                    owner = _owner(obj)
                    if owner:
                        encounters.setdefault(owner, []).append(obj)
        entries = []
        for pid, encs in encounters.items():
            entries.extend(census_from_encounters(pid, encs, self.locations(), ward_ref))
        return entries


def write_ndjson_export(
    records: Iterator[tuple[str, list[dict]]] | list, outdir: Path, *, gz: bool = False
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

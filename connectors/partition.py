"""Stream an NDJSON export once into K on-disk partitions routed by patient, so each partition holds whole patients."""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from assistant.model import DataQualityIssue
from assistant.normalize import local_ref
from connectors.base import (
    ANY_TYPE,
    SHARED_TYPES,
    PatientRecord,
    merge_duplicates,
    newer,
    resource_key,
    resource_owner,
)
from connectors.errors import SourceFileError

log = logging.getLogger(__name__)

MANIFEST = "partitions.json"
SHARED_KEEP = {"Location", "Medication"}  # shared resources a chart can use; sent with every patient
TARGET_PARTITION_BYTES = 8 * 1024 * 1024
MAX_PARTITIONS = 256  # one open file per partition while routing; stay well under the usual fd limit
# Fast path: the owner reference of a compartment resource without parsing the whole line.
_OWNER_RE = re.compile(r'"(?:subject|patient)"\s*:\s*\{[^{}]*?"reference"\s*:\s*"([^"]+)"')
# Each line's type from its content (file names vary: Patient.ndjson, 1.Patient.ndjson, export-000.ndjson).
_TYPE_RE = re.compile(r'"resourceType"\s*:\s*"([A-Za-z]+)"')
# Only a resourceType at the very start of the line is the resource's own (a contained one comes later).
_TYPE_AT_START = 8


def line_type(line: str) -> str | None:
    """The resourceType of one NDJSON line without parsing it; None when it is not plainly at the start."""
    m = _TYPE_RE.search(line, 0, 200)
    return m.group(1) if m is not None and m.start() <= _TYPE_AT_START else None


def partition_of(patient_id: str, partitions: int) -> int:
    """Stable across processes and runs (unlike hash()), so a resumed run routes every patient the same way."""
    return zlib.crc32(patient_id.encode("utf-8")) % partitions


NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")


def is_ndjson_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NDJSON_SUFFIXES) and not path.name.startswith(".")


def ndjson_files(directory: Path) -> list[Path]:
    """The export's data files whatever they are called (Patient.ndjson, 1.Patient.ndjson, part-3.ndjson.gz)."""
    return sorted(p for p in directory.iterdir() if is_ndjson_file(p))


def open_read(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _open_write(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=1)
    return path.open("w", encoding="utf-8", buffering=1 << 16)  # small: up to 256 open at once


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


@dataclass(slots=True)
class PartitionedExport:
    """The partitions of one export on disk, plus what could not be routed."""

    root: Path
    paths: list[Path]
    shared_path: Path
    patients: list[int]  # Patient resources per partition
    resources: int = 0  # lines read from the export
    skipped_types: dict[str, int] = field(default_factory=dict)  # types not kept (not used by the chart)
    issues: list[DataQualityIssue] = field(default_factory=list)
    owns_root: bool = False  # a temporary directory removed after iter_records()
    # types missing for every patient: from the export itself, or a file that could not be read to the end
    missing_types: dict[str, str] = field(default_factory=dict)

    def shared(self) -> list[dict]:
        out = []
        with open_read(self.shared_path) as fh:
            for line in fh:
                if line.strip():
                    out.append(json.loads(line))
        return out

    def records_of(self, index: int, shared: list[dict] | None = None) -> Iterator[PatientRecord]:
        yield from read_partition(
            self.paths[index],
            self.shared() if shared is None else shared,
            origin=str(self.root),
            missing_types=self.missing_types,
        )

    def iter_records(self) -> Iterator[PatientRecord]:
        """Every patient, partition by partition; unroutable lines first, as error records."""
        try:
            for issue in self.issues:
                yield PatientRecord(
                    patient_id=f"line:{issue.source}",
                    error=SourceFileError(issue.source, issue.message),
                    origin=str(self.root),
                )
            shared = self.shared()
            for i in range(len(self.paths)):
                yield from self.records_of(i, shared)
        finally:
            if self.owns_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def save(self) -> None:
        data = {
            "paths": [p.name for p in self.paths],
            "shared": self.shared_path.name,
            "patients": self.patients,
            "resources": self.resources,
            "skipped_types": self.skipped_types,
            "issues": [asdict(i) for i in self.issues],
            "missing_types": self.missing_types,
        }
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.root / MANIFEST)

    @classmethod
    def load(cls, root: Path) -> PartitionedExport | None:
        """A finished partitioning in `root`, or None (a crash mid-way leaves no manifest, so it is redone)."""
        try:
            data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        paths = [root / name for name in data["paths"]]
        if not all(p.exists() for p in paths):
            return None
        return cls(
            root=root,
            paths=paths,
            shared_path=root / data["shared"],
            patients=data["patients"],
            resources=data["resources"],
            skipped_types=data.get("skipped_types", {}),
            issues=[DataQualityIssue(**i) for i in data["issues"]],
            missing_types=data.get("missing_types", {}),
        )


def read_partition(
    path: Path, shared: list[dict], *, origin: str = "", missing_types: Mapping[str, str] | None = None
) -> Iterator[PatientRecord]:
    """The patients of one partition file, whole, in first-seen order; bad lines become the patient's issues.

    One patient's resources from several files are merged here, and repeats of the same type+id dropped (the
    newest meta.lastUpdated wins) and counted; `missing_types` (source-wide gaps) is set on every record.
    """
    by_patient: dict[str, PatientRecord] = {}
    with open_read(path) as fh:
        for line in fh:
            pid, where, body = line.rstrip("\n").split("\t", 2)
            record = by_patient.get(pid)
            if record is None:
                record = by_patient[pid] = PatientRecord(pid, origin=origin)
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as exc:
                record.issues.append(
                    DataQualityIssue(where, "invalid-json", f"not valid JSON ({exc.msg}); skipped", "error")
                )
                continue
            record.resources.append(obj)
    for record in by_patient.values():
        merge_duplicates(record)
        record.resources.extend(shared)
        for rtype, reason in (missing_types or {}).items():
            record.mark_missing(rtype, reason)
        yield record


def export_files(source: Any) -> list[Path]:
    if hasattr(source, "files"):
        return list(source.files())
    return ndjson_files(Path(source))


def choose_partitions(files: Iterable[Path], *, minimum: int = 8) -> int:
    """From the export size only (never the worker count), so every engine sees the same batches."""
    size = sum(p.stat().st_size * (5 if p.name.endswith(".gz") else 1) for p in files)
    return max(1, min(MAX_PARTITIONS, max(minimum, math.ceil(size / TARGET_PARTITION_BYTES))))


def partition_export(
    source: Any,
    *,
    outdir: Path | str | None = None,
    partitions: int | None = None,
    gz: bool = False,
    keep_types: Iterable[str] | None = None,
) -> PartitionedExport:
    """Route every line of an NDJSON export (a NdjsonDirSource or a directory) into partition files by patient.

    One streaming pass; memory holds one line at a time. `keep_types` limits the patient resources kept (the audit
    keeps only the types a chart uses); shared Location and Medication resources go to every patient.
    """
    files = export_files(source)
    owns = outdir is None
    root = Path(tempfile.mkdtemp(prefix="nva-partitions-")) if owns else Path(outdir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    k = partitions or choose_partitions(files)
    suffix = ".ndjson.gz" if gz else ".ndjson"
    paths = [root / f"part-{i:05d}{suffix}" for i in range(k)]
    shared_path = root / f"shared{suffix}"
    keep = set(keep_types) if keep_types is not None else None
    result = PartitionedExport(
        root=root, paths=paths, shared_path=shared_path, patients=[0] * k, owns_root=owns
    )
    completeness = getattr(source, "completeness", None)
    if completeness is not None:
        result.missing_types.update(completeness.missing_types)
    handles = [_open_write(p) for p in paths]
    shared: dict[str, dict] = {}  # small (locations, medications): held to keep the newest copy of each
    try:
        for path in files:
            seen_types: list[str] = []
            try:
                _route_file(path, k, handles, shared, keep, result, seen_types)
            except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
                result.issues.append(
                    DataQualityIssue(
                        path.name,
                        "file-unreadable",
                        f"cannot be read ({exc.__class__.__name__}); the rest of this file was skipped",
                        "error",
                    )
                )
                # The rest of the file may hold any patient's resources: that type is incomplete for everyone.
                for rtype in seen_types or [ANY_TYPE]:
                    if rtype not in SHARED_TYPES:
                        result.missing_types.setdefault(rtype, f"{path.name} could not be read to the end")
        with _open_write(shared_path) as shared_fh:
            for obj in shared.values():
                shared_fh.write(json.dumps(obj, separators=(",", ":")) + "\n")
    finally:
        for fh in handles:
            fh.close()
    if completeness is not None:  # a file that broke off mid-way is a gap of the whole source
        for rtype, reason in result.missing_types.items():
            completeness.missing_types.setdefault(rtype, reason)
    if not owns:
        result.save()
    log.info("partitioned %d resources into %d partitions", result.resources, k)
    return result


def _route_file(
    path: Path,
    k: int,
    handles: list[IO[str]],
    shared: dict[str, dict],
    keep: set[str] | None,
    result: PartitionedExport,
    seen_types: list[str],
) -> None:
    with open_read(path) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            result.resources += 1
            where = f"{path.name}:{n}"
            rtype = line_type(line)
            if rtype is not None and rtype not in seen_types:
                seen_types.append(rtype)
            if rtype in SHARED_TYPES:
                _shared_line(line, rtype, where, shared, result)
                continue
            if rtype is not None and keep is not None and rtype not in keep and rtype != "Patient":
                result.skipped_types[rtype] = result.skipped_types.get(rtype, 0) + 1
                continue
            pid = None
            if rtype is not None and rtype != "Patient":
                m = _OWNER_RE.search(line)
                ref = local_ref(m.group(1)) if m else None
                if ref and ref.startswith("Patient/"):
                    pid = ref.split("/", 1)[1]
            if pid is None:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    result.issues.append(
                        DataQualityIssue(
                            where,
                            "invalid-json",
                            f"not valid JSON ({exc.msg}); its patient is unknown, the line was skipped",
                            "error",
                        )
                    )
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
                    result.issues.append(
                        DataQualityIssue(where, "invalid-resource", "not a FHIR resource; skipped", "error")
                    )
                    continue
                rtype = obj["resourceType"]
                if rtype not in seen_types:
                    seen_types.append(rtype)
                if rtype in SHARED_TYPES:
                    _shared_line(line, rtype, where, shared, result)
                    continue
                if keep is not None and rtype not in keep and rtype != "Patient":
                    result.skipped_types[rtype] = result.skipped_types.get(rtype, 0) + 1
                    continue
                owner = resource_owner(obj)
                if not isinstance(owner, str) or not owner:
                    result.issues.append(
                        DataQualityIssue(where, "no-patient", f"{rtype} names no patient; skipped", "warning")
                    )
                    continue
                pid = owner
            part = partition_of(pid, k)
            if rtype == "Patient":
                result.patients[part] += 1
            handles[part].write(f"{_clean(pid)}\t{where}\t{line.rstrip()}\n")


def _shared_line(
    line: str, rtype: str, where: str, shared: dict[str, dict], result: PartitionedExport
) -> None:
    if rtype not in SHARED_KEEP:
        result.skipped_types[rtype] = result.skipped_types.get(rtype, 0) + 1
        return
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        result.issues.append(
            DataQualityIssue(where, "invalid-json", f"not valid JSON ({exc.msg}); skipped", "error")
        )
        return
    key = resource_key(obj)
    if key is None:
        return
    kept = shared.get(key)
    if kept is None or newer(obj, kept):
        shared[key] = obj

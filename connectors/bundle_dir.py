"""A directory (or single file) of FHIR Bundles, .json or .json.gz, e.g. Synthea output or the demo ward."""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from assistant.model import DataQualityIssue
from assistant.normalize import (
    SHARED_TYPES,
    is_current_encounter,
    local_ref,
    location_kind,
    location_name,
    resource_key,
    resource_owner,
)
from connectors.base import (
    CensusEntry,
    FhirSource,
    PatientRecord,
    Ward,
    census_from_encounters,
    merge_duplicates,
)
from connectors.errors import FhirNotFoundError, SourceFileError

log = logging.getLogger(__name__)
# Files a bundle directory may carry that are not FHIR: the demo ward's metadata and answer key.
METADATA_FILES = frozenset({"ward.json", "answer_key.json"})
CHUNK = 1 << 20  # bytes read at a time while streaming a bundle: memory follows the entry, not the file
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_OPEN_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile)

_owner = resource_owner  # old private name; kept for callers not yet switched to assistant.normalize


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def read_json_file(path: Path) -> Any:
    """Load .json or .json.gz whole, turning every way it can fail into a SourceFileError naming the file."""
    try:
        with _open(path) as fh:
            raw = fh.read()
    except _OPEN_ERRORS as exc:
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
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise SourceFileError(origin, "is a Bundle whose entry is not an array")
    resources: list[dict] = []
    issues: list[DataQualityIssue] = []
    aliases: dict[str, str] = {}
    for n, entry in enumerate(entries):
        resource = _entry_resource(entry, n, origin, issues)
        if resource is None:
            continue
        resources.append(resource)
        _alias(entry, resource, aliases)
    if aliases:
        for resource in resources:
            _rewrite_references(resource, aliases)
    return resources, issues


def _entry_resource(entry: Any, n: int, origin: str, issues: list[DataQualityIssue]) -> dict | None:
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if not isinstance(resource, dict):
        issues.append(
            DataQualityIssue(
                f"{origin}#entry[{n}]", "invalid-resource", "bundle entry has no resource", "error"
            )
        )
        return None
    return resource


def _alias(entry: dict, resource: dict, aliases: dict[str, str]) -> None:
    key = resource_key(resource)
    full_url = entry.get("fullUrl")
    if key and isinstance(full_url, str):
        aliases[full_url] = key


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


def split_by_patient(resources: list[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Group a file's resources by patient; shared resources (Location, Medication, ...) are returned apart."""
    by_patient: dict[str, list[dict]] = {}
    shared: list[dict] = []
    orphans: list[dict] = []
    for r in resources:
        if _rtype(r) in SHARED_TYPES:
            shared.append(r)
            continue
        owner = resource_owner(r)
        if owner is None:
            orphans.append(r)
        else:
            by_patient.setdefault(owner, []).append(r)
    if len(by_patient) == 1 and orphans:
        # A single-patient bundle: resources without a subject still belong to that chart (and get reported there).
        next(iter(by_patient.values())).extend(orphans)
    return by_patient, shared


def _rtype(resource: Any) -> str | None:
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    return rtype if isinstance(rtype, str) else None


# --- streaming: entries of a Bundle one at a time, with their byte span in the (decompressed) file -----------


class _Scanner:
    """Reads one JSON document in chunks; values are parsed by the C decoder, only the bundle frame by hand."""

    def __init__(self, fh: IO[bytes], origin: str) -> None:
        self.fh = fh
        self.origin = origin
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.mark_char = 0  # a position in buf whose byte offset in the file is mark_byte
        self.mark_byte = 0

    def fill(self) -> bool:
        if self.eof:
            return False
        # Read at least as much as is pending, so a value larger than a chunk is re-parsed O(log n) times.
        raw = self.fh.read(max(CHUNK, len(self.buf) - self.pos))
        if not raw:
            self.eof = True
            self.buf += self.decoder.decode(b"", final=True)
            return False
        if self.pos > CHUNK:  # drop what was consumed
            self.byte_at(self.pos)
            self.buf = self.buf[self.pos :]
            self.mark_char -= self.pos
            self.pos = 0
        self.buf += self.decoder.decode(raw)
        return True

    def byte_at(self, pos: int) -> int:
        """Byte offset of buf[pos]; positions asked for only move forward, so each byte is encoded once."""
        self.mark_byte += len(self.buf[self.mark_char : pos].encode("utf-8"))
        self.mark_char = pos
        return self.mark_byte

    def peek(self) -> str:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"expected {char!r}")
        self.pos += 1

    def value(self) -> tuple[Any, int, int]:
        """The next JSON value and its byte span."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self.fill():
                    continue
                self.fail("truncated or malformed value")
            if end == len(self.buf) and self.buf[end - 1] not in '}]"' and self.fill():
                continue  # a number or literal may go on in the next chunk
            start = self.byte_at(self.pos)
            self.pos = end
            return value, start, self.byte_at(end)

    def fail(self, what: str) -> None:
        raise SourceFileError(self.origin, f"is not valid JSON ({what} near byte {self.byte_at(self.pos)})")


@dataclass(slots=True)
class _Document:
    """What streaming a file found besides the entries: the top-level fields (a lone resource is all of them)."""

    top: dict[str, Any] = field(default_factory=dict)
    entries: int = 0


def iter_entries(path: Path, doc: _Document | None = None) -> Iterator[tuple[Any, int, int]]:
    """(entry, start byte, end byte) of each Bundle.entry, never holding more than one entry in memory.

    For a file that is a single resource, nothing is yielded and `doc.top` holds the resource.
    """
    doc = doc if doc is not None else _Document()
    origin = str(path)
    try:
        with _open(path) as fh:
            scan = _Scanner(fh, origin)
            scan.expect("{")
            while scan.peek() != "}":
                key, _, _ = scan.value()
                if not isinstance(key, str):
                    scan.fail("object key is not a string")
                scan.expect(":")
                if key == "entry" and scan.peek() == "[":
                    scan.pos += 1
                    while scan.peek() != "]":
                        entry, start, end = scan.value()
                        doc.entries += 1
                        yield entry, start, end
                        if scan.peek() == ",":
                            scan.pos += 1
                        elif scan.peek() != "]":
                            scan.fail("expected ',' or ']' between entries")
                    scan.pos += 1
                else:
                    doc.top[key], _, _ = scan.value()
                if scan.peek() == ",":
                    scan.pos += 1
                elif scan.peek() != "}":
                    scan.fail("expected ',' or '}'")
    except _OPEN_ERRORS as exc:
        raise SourceFileError(origin, f"cannot be read ({exc.__class__.__name__}: {exc})") from exc
    except UnicodeDecodeError as exc:
        raise SourceFileError(origin, f"is not valid JSON ({exc})") from exc


def read_spans(path: Path, spans: list[tuple[int, int]], fh: IO[bytes] | None = None) -> list[Any]:
    """The entries in these byte spans (each span one or more adjacent entries), reading nothing else.

    Pass an open handle to read several patients of one file in a forward pass (a gzip stream then never rewinds).
    """
    out: list[Any] = []
    try:
        handle = fh if fh is not None else _open(path)
        try:
            for start, end in sorted(spans):
                handle.seek(start)  # gzip seeks forward by decompressing: memory stays flat
                raw = handle.read(end - start)
                out.extend(json.loads(b"[" + raw + b"]"))
        finally:
            if fh is None:
                handle.close()
    except _OPEN_ERRORS as exc:
        raise SourceFileError(str(path), f"cannot be read ({exc.__class__.__name__}: {exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceFileError(str(path), f"changed since it was indexed ({exc}); reopen the source") from exc
    return out


# --- the index: patient -> files (and byte spans), built once --------------------------------------------------


@dataclass(slots=True)
class _FileIndex:
    path: Path
    single: dict | None = None  # the file is one resource (not a Bundle): that resource
    patients: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # patient id -> entry spans
    medications: list[tuple[int, int]] = field(default_factory=list)  # shared Medication entries
    medication_cache: list[dict] | None = None  # those entries, parsed on first use (shared by its patients)
    aliases: dict[str, str] = field(
        default_factory=dict
    )  # fullUrl -> Type/id, for patients and shared resources
    issues: list[DataQualityIssue] = field(default_factory=list)
    unattributed: int = 0  # resources that name no readable patient


def _add_span(
    spans: list[tuple[int, int]], last: dict[int, int], owner_id: int, n: int, start: int, end: int
):
    """Append an entry's span, merged with the previous one when that was the owner's entry just before."""
    if spans and last.get(owner_id) == n - 1:
        spans[-1] = (spans[-1][0], end)
    else:
        spans.append((start, end))
    last[owner_id] = n


def _raw_owner(resource: dict) -> str | None:
    for key in ("subject", "patient"):
        holder = resource.get(key)
        ref = holder.get("reference") if isinstance(holder, dict) else None
        if isinstance(ref, str) and ref:
            return ref
    return None


class BundleDirSource(FhirSource):
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self._files: list[_FileIndex] | None = None
        self._index: dict[str, list[_FileIndex]] = {}
        self._locations: dict[str, dict] = {}
        self._encounters: dict[str, list[dict]] = {}  # current encounters per patient, for the census
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

    # --- scan --------------------------------------------------------------------------------------------
    def _scan(self) -> None:
        files, errors = [], []
        self._index, self._locations, self._encounters = {}, {}, {}
        for path in self.files():
            try:
                info = self._index_file(path)
            except SourceFileError as exc:
                # The reason may quote the path, and Synthea file names carry patient names: it goes to
                # file_errors (shown to the user), not to the log.
                log.warning("skipping an unreadable bundle file (%d so far)", len(errors) + 1)
                errors.append(exc)
                continue
            files.append(info)
            for pid in info.patients:
                self._index.setdefault(pid, []).append(info)
        self._files, self.file_errors = files, errors

    def _index_file(self, path: Path) -> _FileIndex:
        info = _FileIndex(path)
        doc = _Document()
        by_owner: dict[str, list[tuple[int, int]]] = {}  # raw owner reference -> spans
        owner_ids: dict[str, int] = {}
        last: dict[int, int] = {}
        orphans: list[tuple[int, int]] = []
        bad_patients = 0
        locations: list[dict] = []
        encounters: list[tuple[str, dict]] = []
        for n, (entry, start, end) in enumerate(iter_entries(path, doc)):
            resource = _entry_resource(entry, n, str(path), info.issues)
            if resource is None:
                continue
            rtype, key = _rtype(resource), resource_key(resource)
            if rtype == "Patient" or rtype in SHARED_TYPES:
                _alias(entry, resource, info.aliases)
            if rtype == "Location":
                if key:
                    locations.append(resource)
                continue
            if rtype == "Medication":
                _add_span(info.medications, last, -1, n, start, end)
                continue
            if rtype in SHARED_TYPES:
                continue  # Organization, Practitioner: not part of a chart
            if rtype == "Patient":
                if key is None:
                    bad_patients += 1
                    continue
                owner = key
            else:
                owner = _raw_owner(resource) or ""
            if not owner:
                orphans.append((start, end))
                continue
            oid = owner_ids.setdefault(owner, len(owner_ids))
            _add_span(by_owner.setdefault(owner, []), last, oid, n, start, end)
            if rtype == "Encounter" and is_current_encounter(resource):
                encounters.append((owner, resource))
        if doc.entries == 0 and doc.top.get("resourceType") != "Bundle":
            return self._index_single(path, info, doc.top)
        if doc.top.get("entry") not in (None, []):
            raise SourceFileError(str(path), "is a Bundle whose entry is not an array")
        # Owner references resolve through the file's fullUrls (urn:uuid:...) once the whole file is seen.
        for owner, spans in by_owner.items():
            ref = local_ref(info.aliases.get(owner, owner)) or ""
            if ref.startswith("Patient/") and len(ref) > len("Patient/"):
                info.patients.setdefault(ref.split("/", 1)[1], []).extend(spans)
            else:
                orphans.extend(spans)
        if len(info.patients) == 1 and orphans:
            # A single-patient bundle: resources without a subject still belong to that chart.
            next(iter(info.patients.values())).extend(orphans)
        elif orphans or bad_patients:
            info.unattributed = len(orphans) + bad_patients
            log.warning(
                "%d resources in a bundle file name no readable patient", info.unattributed
            )  # no file name: PHI
            info.issues.append(
                DataQualityIssue(
                    str(path),
                    "unattributed-resource",
                    f"{info.unattributed} resource(s) in this file name no readable patient (a Patient without "
                    "a string id, or no subject); they are in no chart",
                    "error",
                )
            )
        for loc in locations:
            _rewrite_references(loc, info.aliases)
            self._locations.setdefault(f"Location/{loc['id']}", loc)
        for owner, enc in encounters:
            _rewrite_references(enc, info.aliases)
            ref = local_ref(info.aliases.get(owner, owner)) or ""
            if ref.startswith("Patient/"):
                self._encounters.setdefault(ref.split("/", 1)[1], []).append(enc)
        return info

    def _index_single(self, path: Path, info: _FileIndex, resource: dict) -> _FileIndex:
        if not isinstance(resource.get("resourceType"), str):
            raise SourceFileError(str(path), "is JSON but has no resourceType; not FHIR")
        info.single = resource
        owner = resource_owner(resource)
        if _rtype(resource) == "Location" and resource_key(resource):
            self._locations.setdefault(resource_key(resource), resource)  # type: ignore[arg-type]
        elif owner:
            info.patients[owner] = []
            if _rtype(resource) == "Encounter" and is_current_encounter(resource):
                self._encounters.setdefault(owner, []).append(resource)
        elif _rtype(resource) not in SHARED_TYPES:
            info.unattributed = (
                1  # e.g. a lone Patient whose id is not a string: reported, not dropped silently
            )
        return info

    @property
    def index(self) -> dict[str, list[Path]]:
        """Patient id -> the files holding its resources (built once, on first use)."""
        if self._files is None:
            self._scan()
        return {pid: [f.path for f in infos] for pid, infos in self._index.items()}

    def _ensure(self) -> None:
        if self._files is None:
            self._scan()

    def iter_patient_ids(self) -> Iterator[str]:
        self._ensure()
        yield from self._index

    # --- read ----------------------------------------------------------------------------------------------
    def _resources(self, info: _FileIndex, entries: list[Any]) -> list[dict]:
        resources: list[dict] = []
        aliases = dict(info.aliases)
        for n, entry in enumerate(entries):
            resource = _entry_resource(entry, n, str(info.path), [])
            if resource is not None:
                resources.append(resource)
                _alias(entry, resource, aliases)
        for resource in resources:
            _rewrite_references(resource, aliases)
        return resources

    def _read_file_part(self, info: _FileIndex, patient_id: str, fh: IO[bytes] | None = None) -> list[dict]:
        if info.single is not None:
            return [info.single]
        if info.medication_cache is None:
            info.medication_cache = self._resources(info, read_spans(info.path, info.medications))
        own = self._resources(info, read_spans(info.path, info.patients.get(patient_id, []), fh))
        return own + info.medication_cache

    def patient_resources(
        self, patient_id: str, *, handles: dict[Path, IO[bytes]] | None = None
    ) -> PatientRecord:
        self._ensure()
        infos = self._index.get(patient_id)
        if not infos:
            raise FhirNotFoundError(
                f"Patient/{patient_id} is not in {self.path}; list patients with `nva patients`"
            )
        resources: list[dict] = []
        issues: list[DataQualityIssue] = []
        for info in infos:
            resources.extend(self._read_file_part(info, patient_id, (handles or {}).get(info.path)))
            issues.extend(info.issues)
        record = PatientRecord(
            patient_id,
            resources + list(self._locations.values()),
            issues,
            origin=", ".join(str(i.path) for i in infos),
        )
        return merge_duplicates(record)  # one patient across files: merged, repeats counted as data quality

    def iter_patient_records(self) -> Iterator[PatientRecord]:
        """Every patient once, file by file in one forward pass per file; unreadable files are error records."""
        self._ensure()
        for exc in self.file_errors:
            yield PatientRecord(patient_id=f"file:{Path(exc.path).name}", error=exc, origin=exc.path)
        for info in self._files or []:
            if not info.patients and info.unattributed:
                yield PatientRecord(
                    patient_id=f"file:{info.path.name}",
                    error=SourceFileError(
                        str(info.path),
                        f"holds {info.unattributed} resource(s) but no Patient with a readable id",
                    ),
                    origin=str(info.path),
                )
                continue
            # The patients whose first file this is, in the order their entries appear in it.
            mine = [pid for pid in info.patients if self._index[pid][0] is info]
            mine.sort(key=lambda pid: min(info.patients[pid], default=(0, 0)))
            if not mine:
                continue
            try:
                fh = _open(info.path) if info.single is None else None
            except _OPEN_ERRORS as exc:
                error = SourceFileError(str(info.path), f"cannot be read ({exc.__class__.__name__}: {exc})")
                for pid in mine:
                    yield PatientRecord(patient_id=pid, error=error, origin=str(info.path))
                continue
            try:
                for pid in mine:
                    try:
                        yield self.patient_resources(pid, handles={info.path: fh} if fh else None)
                    except SourceFileError as exc:
                        yield PatientRecord(patient_id=pid, error=exc, origin=exc.path)
            finally:
                if fh is not None:
                    fh.close()

    # --- wards ---------------------------------------------------------------------------------------------
    def wards(self) -> list[Ward]:
        self._ensure()
        seen = {
            ref: Ward(ref, location_name(loc) or ref)
            for ref, loc in self._locations.items()
            if location_kind(loc) == "ward"
        }
        return sorted(seen.values(), key=lambda w: w.name)

    def ward_census(self, ward_ref: str | None = None) -> list[CensusEntry]:
        """From the current encounters kept by the index: no chart is read to build a census."""
        self._ensure()
        entries: list[CensusEntry] = []
        for pid in self._index:
            entries.extend(
                census_from_encounters(pid, self._encounters.get(pid, []), self._locations, ward_ref)
            )
        return entries

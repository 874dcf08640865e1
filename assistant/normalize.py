"""Turn one patient's raw FHIR R4 resources into a Chart; a malformed resource becomes a data-quality issue."""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from assistant.model import (
    Administration,
    AllergyFact,
    Chart,
    CodeStatus,
    ConditionFact,
    DataQualityIssue,
    Demographics,
    EncounterFact,
    IsolationFact,
    MedicationOrder,
    Note,
    Quantity,
    Result,
    Timing,
)
from assistant.terminology import (
    LOINC,
    RXNORM,
    SNOMED,
    Terminology,
    UnknownUnitError,
    fhir_codes,
    isolation_codes,
    terminology,
)

log = logging.getLogger(__name__)

CHART_TYPES = (
    "Patient",
    "Encounter",
    "Condition",
    "AllergyIntolerance",
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationStatement",
    "Observation",
    "DocumentReference",
    "Location",
    "Medication",
    "Flag",  # isolation precautions (fhir_codes.toml [isolation])
)
# Types every file of a bundle folder may carry its own copy of: de-duplicated, not counted as duplicates.
SHARED_TYPES = frozenset({"Location", "Medication", "Organization", "Practitioner"})
NOTE_TEXT_LIMIT = 20_000
# What a bug in reading a malformed shape looks like; caught per resource so one resource never costs the chart.
UNEXPECTED_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError)


class ResourceShapeError(ValueError):
    """A resource field has the wrong type or an unreadable value."""


class PatientNotFoundError(LookupError):
    """The source holds no Patient resource for the requested id."""


# --- small typed accessors: every read checks its type. Inside a chart build a wrong shape costs only that field
# (a data-quality issue through the field sink below); outside a build it raises ResourceShapeError.

NUMERIC_STRING = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?\s*")


@dataclass(slots=True)
class _FieldSink:
    ref: str
    issues: list[DataQualityIssue]
    note: str = ""  # appended to every message, e.g. what losing the field means for a lab result
    seen: set[str] = field(default_factory=set)  # a field read twice is reported once


# A context variable rather than a parameter: the accessors are shared by every handler and helper, and the
# sink must never leak from one resource (or thread) into another.
_FIELD_SINK: ContextVar[_FieldSink | None] = ContextVar("nva_field_sink", default=None)


def _bad(message: str) -> None:
    """A field has the wrong shape: record it against the resource being read, or raise outside a build."""
    sink = _FIELD_SINK.get()
    if sink is None:
        raise ResourceShapeError(message)
    if message in sink.seen:
        return
    sink.seen.add(message)
    sink.issues.append(
        DataQualityIssue(
            sink.ref, "invalid-resource", f"{message}; that field was ignored{sink.note}", "error"
        )
    )


def _warn(code: str, message: str) -> None:
    sink = _FIELD_SINK.get()
    if sink is not None:
        sink.issues.append(DataQualityIssue(sink.ref, code, message, "warning"))


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        return None
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        _bad(f"{where}.{key} should be {_kind_name(kind)}, got {_json_type(value)}")
        return None
    return value


def _json_type(value: Any) -> str:
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return " or ".join(dict.fromkeys(names.get(k, "a number") for k in _kinds(kind)))


def _list(obj: Any, key: str, where: str) -> list:
    value = _get(obj, key, list, where)
    return value or []


def _dict(obj: Any, key: str, where: str) -> dict:
    value = _get(obj, key, dict, where)
    return value or {}


def _str(obj: Any, key: str, where: str) -> str | None:
    return _get(obj, key, str, where)


def _strings(items: list, where: str) -> list[str]:
    """The string entries of an array; a non-string entry is reported and skipped."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        else:
            _bad(f"{where} entries should be strings, got {_json_type(item)}")
    return out


def _dicts(items: list, where: str) -> list[dict]:
    """The object entries of an array; a non-object entry is one ignored field, not a lost resource."""
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(item)
        else:
            _bad(f"{where} entries should be objects, got {_json_type(item)}")
    return out


def _finite(value: float) -> bool:
    return not (value != value or value in (float("inf"), float("-inf")))


def _number(obj: Any, key: str, where: str) -> float | None:
    raw = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(raw, str) and NUMERIC_STRING.fullmatch(raw):
        value = float(raw)
        if _finite(value):
            # A number sent as a JSON string ("5.9"): read it, and say so, rather than drop the newest value.
            _warn(
                "numeric-string", f"{where}.{key} is the string {raw.strip()!r}; read as the number {value:g}"
            )
            return value
    value = _get(obj, key, (int, float), where)
    if value is None:
        return None
    try:
        value = float(value)
    except OverflowError:
        value = float("inf")
    if not _finite(value):
        _bad(f"{where}.{key} is not a finite number")
        return None
    return value


def parse_datetime(value: Any, where: str = "value") -> datetime | None:
    """FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD or full with zone) as an aware UTC datetime."""
    if value is None:
        return None
    if not isinstance(value, str):
        _bad(f"{where} should be a FHIR dateTime string, got {_json_type(value)}")
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            return datetime(int(text), 1, 1, tzinfo=UTC)
        if len(text) == 7:
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC)
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        _bad(f"{where} {value[:40]!r} is not a valid FHIR dateTime")
        return None


def parse_date(value: Any, where: str) -> date | None:
    parsed = parse_datetime(value, where)
    return parsed.date() if parsed else None


def local_ref(reference: str | None) -> str | None:
    """'Patient/1', 'https://ehr/fhir/Patient/1' or 'Patient/1/_history/2' -> 'Patient/1'."""
    if not reference or not isinstance(reference, str):
        return None
    ref = reference.split("/_history/")[0].rstrip("/")
    parts = ref.split("/")
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return f"{parts[-2]}/{parts[-1]}"
    return ref


def _ref(obj: Any, key: str, where: str) -> str | None:
    reference = _dict(obj, key, where)
    return local_ref(_str(reference, "reference", f"{where}.{key}"))


def _codings(concept: Any, where: str) -> list[dict]:
    if concept is None or concept == {}:
        return []
    if not isinstance(concept, dict):
        _bad(f"{where} should be a CodeableConcept object, got {_json_type(concept)}")
        return []
    codings = []
    for c in _dicts(_list(concept, "coding", where), f"{where}.coding"):
        bad = [k for k in ("system", "code", "display") if c.get(k) is not None and not isinstance(c[k], str)]
        for k in bad:
            _bad(f"{where}.coding.{k} should be a string, got {_json_type(c[k])}")
        codings.append({k: v for k, v in c.items() if k not in bad} if bad else c)
    return codings


def _codes(concept: Any, system: str, where: str) -> list[str]:
    return [
        c["code"]
        for c in _codings(concept, where)
        if c.get("system") == system and isinstance(c.get("code"), str)
    ]


def _concept_text(concept: Any, where: str) -> str:
    if concept is None or concept == {}:
        return ""
    if not isinstance(concept, dict):
        _bad(f"{where} should be a CodeableConcept object, got {_json_type(concept)}")
        return ""
    text = _str(concept, "text", where)
    if text:
        return text
    codings = _codings(concept, where)
    for c in codings:
        if isinstance(c.get("display"), str) and c["display"]:
            return c["display"]
    for c in codings:
        if isinstance(c.get("code"), str) and c["code"]:
            return c["code"]
    return ""


def _first_code(concept: Any, where: str) -> str | None:
    for c in _codings(concept, where):
        if isinstance(c.get("code"), str):
            return c["code"]
    return None


def _quantity(obj: Any, where: str) -> Quantity | None:
    if obj is None or obj == {}:
        return None
    if not isinstance(obj, dict):
        _bad(f"{where} should be a Quantity object, got {_json_type(obj)}")
        return None
    value = _number(obj, "value", where)
    if value is None:
        return None
    unit = _str(obj, "unit", where) or _str(obj, "code", where) or ""
    return Quantity(value, unit)


# --- public helpers on raw resources, shared with the connectors: never raise on a malformed shape ----------


def resource_owner(resource: Any) -> str | None:
    """The id of the patient a raw resource belongs to (Patient.id, or its subject/patient reference), or None."""
    if not isinstance(resource, dict):
        return None
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for key in ("subject", "patient"):
        holder = resource.get(key)
        if isinstance(holder, dict):
            ref = local_ref(holder.get("reference"))
            if ref and ref.startswith("Patient/") and len(ref) > len("Patient/"):
                return ref.split("/", 1)[1]
    return None


def resource_key(resource: Any) -> str | None:
    """'ResourceType/id' of a raw resource, or None when either part is missing or not a string."""
    if not isinstance(resource, dict):
        return None
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if isinstance(rtype, str) and rtype and isinstance(rid, str) and rid:
        return f"{rtype}/{rid}"
    return None


def _last_updated(resource: dict) -> datetime:
    meta = resource.get("meta")
    stamp = meta.get("lastUpdated") if isinstance(meta, dict) else None
    try:
        return parse_datetime(stamp, "meta.lastUpdated") or _EPOCH
    except ResourceShapeError:
        return _EPOCH


_EPOCH = datetime.min.replace(tzinfo=UTC)


def newer(candidate: dict, current: dict) -> bool:
    """True when `candidate` should replace `current` (same type and id): newer meta.lastUpdated, a tie goes to
    the one read later (a missing or unreadable lastUpdated counts as oldest)."""
    return _last_updated(candidate) >= _last_updated(current)


def dedupe_resources(resources: Iterable[Any]) -> tuple[list[Any], int]:
    """One resource per type+id, the newest meta.lastUpdated kept, in order of first appearance; entries without
    a type or id are kept as they are. Returns (kept, how many duplicates of patient data were dropped):
    copies of shared resources (Location, Medication, ...) that every file of a folder carries are not counted."""
    kept: dict[Any, Any] = {}
    dropped = 0
    for n, resource in enumerate(resources):
        key = resource_key(resource)
        if key is None:
            kept[n] = resource
            continue
        current = kept.get(key)
        if current is None:
            kept[key] = resource
            continue
        if resource.get("resourceType") not in SHARED_TYPES:
            dropped += 1
        if newer(resource, current):
            kept[key] = resource
    return list(kept.values()), dropped


def duplicate_issue(count: int, source: str) -> DataQualityIssue:
    """The one data-quality line that says how many duplicate resources were merged."""
    return DataQualityIssue(
        source,
        "duplicate-resource",
        f"{count} duplicate resource{'s' if count != 1 else ''} (same type and id) were merged; "
        "the one with the newest meta.lastUpdated was kept",
    )


def location_kind(location: Any) -> str | None:
    """'ward', 'bed' or None from a Location (or Encounter.location entry) physicalType, per fhir_codes.toml."""
    physical = location.get("physicalType") if isinstance(location, dict) else None
    codings = physical.get("coding") if isinstance(physical, dict) else None
    codes = fhir_codes()
    for coding in codings if isinstance(codings, list) else ():
        code = coding.get("code") if isinstance(coding, dict) else None
        if isinstance(code, str):
            if code in codes.ward_types:
                return "ward"
            if code in codes.bed_types:
                return "bed"
    return None


def location_name(location: Any) -> str | None:
    """Location.name, or its id when the name is missing or not a string."""
    if not isinstance(location, dict):
        return None
    name = location.get("name")
    if isinstance(name, str) and name.strip():
        return name
    rid = location.get("id")
    return rid if isinstance(rid, str) else None


def is_current_encounter(encounter: Any) -> bool:
    """A raw Encounter whose status means the patient is in it now (fhir_codes.toml [encounter])."""
    status = encounter.get("status") if isinstance(encounter, dict) else None
    return isinstance(status, str) and status in fhir_codes().current_encounter_statuses


def current_encounter(encounters: Iterable[EncounterFact]) -> EncounterFact | None:
    """THE current encounter: a current status, an inpatient class preferred, the latest start wins."""
    codes = fhir_codes()
    current = [e for e in encounters if e.status in codes.current_encounter_statuses]
    inpatient = [e for e in current if e.class_code in codes.inpatient_classes] or current
    if not inpatient:
        return None
    return max(inpatient, key=lambda e: (e.start or _EPOCH, e.ref))


def census_encounter(encounters: Iterable[Any], locations: dict[str, dict]) -> EncounterFact | None:
    """One patient's current encounter from raw Encounters and Locations ('Location/id' -> resource): the census
    reads ward and bed exactly as the chart does. Malformed encounters are skipped; never raises."""
    builder = ChartBuilder(source="census")
    builder.index = locations  # read only: the location lookups need nothing else
    facts = []
    for enc in encounters:
        ref = resource_key(enc)
        if ref is None or not is_current_encounter(enc):
            continue
        token = _FIELD_SINK.set(_FieldSink(ref, []))
        try:
            facts.append(builder._encounter(enc, ref))
        except (ResourceShapeError, *UNEXPECTED_SHAPE_ERRORS):
            continue
        finally:
            _FIELD_SINK.reset(token)
    return current_encounter(facts)


def code_status(chart: Chart) -> CodeStatus | None:
    """The newest resuscitation (code) status observation, LOINC 100822-6 per fhir_codes.toml, or None."""
    codes = fhir_codes()
    found = None
    for r in chart.results:  # oldest first
        if (
            not r.is_usable
            or not set(r.loinc_codes or ((r.loinc,) if r.loinc else ())) & codes.code_status_loinc
        ):
            continue
        kind = next(
            (codes.code_status_answers[c] for c in r.value_codes if c in codes.code_status_answers), None
        )
        text = r.value_text or r.display_value()
        if not text and kind is None:
            continue
        found = CodeStatus(text=text or kind or "", ref=r.ref, time=r.time, kind=kind or "unknown")
    return found


class ChartBuilder:
    """Collects one patient's resources and builds the Chart; keeps going past bad resources and bad fields."""

    def __init__(
        self,
        *,
        source: str,
        patient_id: str | None = None,
        strict: bool = False,
        terms: Terminology | None = None,
    ) -> None:
        self.source = source
        self.patient_id = patient_id
        self.strict = strict
        self.terms = terms or terminology()
        self.codes = fhir_codes()
        self.issues: list[DataQualityIssue] = []
        # Per type, ref -> resource: a second copy of the same type+id replaces the first in place (newest wins).
        self.by_type: dict[str, dict[str, dict]] = {t: {} for t in CHART_TYPES}
        self.index: dict[str, dict] = {}
        self.count = 0
        self.duplicates = 0
        self.unreadable_patients = 0  # Patient resources skipped for want of a string id

    def add(self, resource: Any, *, origin: str | None = None) -> None:
        self.count += 1
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            self.issues.append(
                DataQualityIssue(
                    origin or self.source,
                    "invalid-resource",
                    "entry is not a FHIR resource (no resourceType)",
                    "error",
                )
            )
            return
        rtype = resource["resourceType"]
        ref = resource_key(resource)
        if ref is None:
            self.unreadable_patients += rtype == "Patient"
            where = origin or f"{rtype}/<no id>"
            self.issues.append(
                DataQualityIssue(
                    where,
                    "invalid-resource",
                    f"{rtype} has no id (or not a string); it cannot be cited",
                    "error",
                )
            )
            return
        if self.strict and rtype in CHART_TYPES:
            problem = validate_strict(resource)
            if problem:
                self.issues.append(DataQualityIssue(ref, "invalid-resource", problem, "error"))
                return
        if rtype in self.by_type:
            current = self.by_type[rtype].get(ref)
            if current is not None:
                if rtype not in SHARED_TYPES:
                    self.duplicates += 1
                if not newer(resource, current):
                    return
            self.by_type[rtype][ref] = resource
            self.index[ref] = resource

    def add_issue(self, issue: DataQualityIssue) -> None:
        self.issues.append(issue)

    # --- build ----------------------------------------------------------------------------------------
    def build(self) -> Chart:
        patient = self._patient()
        chart = Chart(patient=patient, source=self.source, resource_count=self.count)
        chart.resources[patient.ref] = self.index[patient.ref]
        handlers = (
            ("Encounter", self._encounter, chart.encounters),
            ("AllergyIntolerance", self._allergy, chart.allergies),
            ("Condition", self._condition, chart.conditions),
            ("MedicationRequest", self._order, chart.orders),
            ("MedicationStatement", self._statement, chart.orders),
            ("MedicationAdministration", self._administration, chart.administrations),
            ("Observation", self._observation, chart.results),
            ("DocumentReference", self._note, chart.notes),
            ("Flag", self._flag, chart.isolation),
        )
        for rtype, handler, sink in handlers:
            for ref, resource in self.by_type[rtype].items():
                try:
                    subject = self._subject(resource, rtype, ref)
                    if subject is not None and subject != patient.ref:
                        continue  # another patient's resource in a shared bundle: not ours to show
                    if subject is None and len(self.by_type["Patient"]) > 1:
                        # With several patients at hand, a resource naming none may belong to any of them.
                        self.issues.append(
                            DataQualityIssue(
                                ref,
                                "unattributed-resource",
                                "names no patient; not shown in any chart",
                                "error",
                            )
                        )
                        continue
                    produced = self._read(handler, resource, ref)
                except ResourceShapeError as exc:
                    self.issues.append(DataQualityIssue(ref, "invalid-resource", str(exc), "error"))
                    continue
                except UNEXPECTED_SHAPE_ERRORS as exc:
                    # A shape no accessor anticipated: lose this resource, never the chart (the type names the bug).
                    log.warning("unreadable %s resource (%s)", rtype, type(exc).__name__)
                    self.issues.append(
                        DataQualityIssue(
                            ref,
                            "invalid-resource",
                            f"could not be read ({type(exc).__name__}); not shown",
                            "error",
                        )
                    )
                    continue
                if produced is None:
                    continue
                if isinstance(produced, list):
                    sink.extend(produced)
                else:
                    sink.append(produced)
                chart.resources[ref] = resource
        for ref, loc in self.by_type["Location"].items():
            chart.resources[ref] = loc
        chart.encounter = current_encounter(chart.encounters)
        self._check_references(chart)
        chart.results.sort(key=lambda r: (r.time or _EPOCH, r.ref))
        chart.administrations.sort(key=lambda a: (a.time or _EPOCH, a.ref))
        chart.notes.sort(key=lambda n: (n.time or _EPOCH, n.ref))
        chart.isolation.sort(key=lambda i: (i.start or _EPOCH, i.ref))  # the same order from every source
        self._check_stale_latest(chart)
        if self.duplicates:
            self.issues.append(duplicate_issue(self.duplicates, patient.ref))
        chart.issues = self.issues
        log.debug(
            "chart built: %d resources, %d results, %d orders, %d issues",
            self.count,
            len(chart.results),
            len(chart.orders),
            len(chart.issues),
        )
        return chart

    def _read(self, handler, resource: dict, ref: str, note: str = ""):
        """Run one handler with the field sink set: a wrong-typed field becomes an issue on `ref`."""
        if ref.startswith("Observation/"):
            note = (
                note
                or "; if it was the value, time or status, this result is not used and an older one may show"
            )
        token = _FIELD_SINK.set(_FieldSink(ref, self.issues, note))
        try:
            return handler(resource, ref)
        finally:
            _FIELD_SINK.reset(token)

    def _patient(self) -> Demographics:
        patients = list(self.by_type["Patient"].values())
        if self.patient_id:
            patients = [p for p in patients if p.get("id") == self.patient_id]
        if not patients:
            wanted = f"Patient/{self.patient_id}" if self.patient_id else "a Patient resource"
            why = (
                f" ({self.unreadable_patients} Patient resource(s) without a string id were skipped)"
                if self.unreadable_patients
                else ""
            )
            raise PatientNotFoundError(f"{self.source} holds no {wanted}{why}; check the patient id")
        if len(patients) > 1 and not self.patient_id:
            raise PatientNotFoundError(f"{self.source} holds {len(patients)} patients; pass --patient ID")
        p = patients[0]
        ref = f"Patient/{p['id']}"
        # Each field on its own: a bad birth date costs the birth date, not the name and MRN.
        return self._read(self._demographics, p, ref, note=" (the rest of the patient record is shown)")

    def _demographics(self, p: dict, ref: str) -> Demographics:
        return Demographics(
            ref=ref,
            name=_human_name(_list(p, "name", "Patient"), "Patient.name"),
            birth_date=parse_date(p.get("birthDate"), "Patient.birthDate"),
            sex=_str(p, "gender", "Patient"),
            mrn=_mrn(_list(p, "identifier", "Patient"), "Patient.identifier"),
        )

    def _subject(self, resource: dict, rtype: str, ref: str) -> str | None:
        """Whose resource this is. Strict: a resource that cannot be attributed is never shown in a chart."""
        key = "patient" if rtype == "AllergyIntolerance" else "subject"
        holder = resource.get(key)
        if holder is None:
            return None
        reference = holder.get("reference") if isinstance(holder, dict) else holder
        if not isinstance(holder, dict) or not isinstance(reference, (str, type(None))):
            raise ResourceShapeError(
                f"{ref}.{key} is unreadable ({_json_type(reference)}); the resource cannot be attributed to a "
                "patient and is not shown"
            )
        return local_ref(reference)

    def _encounter(self, r: dict, ref: str) -> EncounterFact:
        period = _dict(r, "period", ref)
        cls = _dict(r, "class", ref)
        ward_ref = ward_name = bed_ref = bed_name = None
        for loc in _dicts(_list(r, "location", ref), f"{ref}.location"):
            status = _str(loc, "status", f"{ref}.location")
            if status is not None and status not in self.codes.current_location_statuses:
                continue
            lref = _ref(loc, "location", f"{ref}.location")
            display = _str(_dict(loc, "location", f"{ref}.location"), "display", f"{ref}.location.location")
            kind = self._location_kind(lref, loc)
            name = display or self._location_name(lref)
            if kind == "bed":
                bed_ref, bed_name = lref, name
                parent = self._location_parent(lref)
                if parent and not ward_ref:
                    ward_ref, ward_name = parent, self._location_name(parent)
            elif kind == "ward" or ward_ref is None:
                ward_ref, ward_name = lref, name
        reasons = [_concept_text(c, f"{ref}.reasonCode") for c in _list(r, "reasonCode", ref)]
        return EncounterFact(
            ref=ref,
            status=_str(r, "status", ref) or "unknown",
            class_code=_str(cls, "code", f"{ref}.class"),
            start=parse_datetime(period.get("start"), f"{ref}.period.start"),
            end=parse_datetime(period.get("end"), f"{ref}.period.end"),
            ward_ref=ward_ref,
            ward_name=ward_name,
            bed_ref=bed_ref,
            bed_name=bed_name,
            reason="; ".join(x for x in reasons if x) or None,
        )

    def _location_kind(self, lref: str | None, loc: dict) -> str | None:
        return location_kind(loc) or location_kind(self.index.get(lref or ""))

    def _location_name(self, lref: str | None) -> str | None:
        target = self.index.get(lref or "")
        name = location_name(target) if target else None
        return name or (lref.split("/", 1)[1] if lref else None)

    def _location_parent(self, lref: str | None) -> str | None:
        target = self.index.get(lref or "")
        if not isinstance(target, dict):
            return None
        part_of = target.get("partOf")
        return local_ref(part_of.get("reference")) if isinstance(part_of, dict) else None

    def _allergy(self, r: dict, ref: str) -> AllergyFact:
        code = _get(r, "code", dict, ref)
        text = _concept_text(code, f"{ref}.code")
        nka = any(
            isinstance(cd.get("code"), str) and cd["code"] in self.codes.no_known_allergy_codes
            for cd in _codings(code, f"{ref}.code")
        )
        ingredients, classes = self.terms.resolve_allergen(_codes(code, RXNORM, f"{ref}.code"), text)
        categories = _strings(_list(r, "category", ref), f"{ref}.category")
        about_medication = not categories or "medication" in categories
        if about_medication and not nka and not ingredients and not classes:
            self.issues.append(
                DataQualityIssue(
                    ref,
                    "unknown-allergen",
                    f"allergy to {text or 'an uncoded substance'} could not be matched to a "
                    "medication; it is shown but not checked against orders",
                )
            )
        reactions = []
        for reaction in _dicts(_list(r, "reaction", ref), f"{ref}.reaction"):
            for m in _list(reaction, "manifestation", f"{ref}.reaction"):
                t = _concept_text(m, f"{ref}.reaction.manifestation")
                if t:
                    reactions.append(t)
        return AllergyFact(
            ref=ref,
            substance=text or "(uncoded substance)",
            ingredients=ingredients,
            classes=classes,
            clinical_status=_first_code(_get(r, "clinicalStatus", dict, ref), f"{ref}.clinicalStatus"),
            verification_status=_first_code(
                _get(r, "verificationStatus", dict, ref), f"{ref}.verificationStatus"
            ),
            criticality=_str(r, "criticality", ref),
            category=tuple(categories),
            reactions=tuple(reactions),
            no_known_allergy=nka,
        )

    def _condition(self, r: dict, ref: str) -> ConditionFact:
        code = _get(r, "code", dict, ref)
        return ConditionFact(
            ref=ref,
            text=_concept_text(code, f"{ref}.code") or "(uncoded condition)",
            codes=tuple(c["code"] for c in _codings(code, f"{ref}.code") if isinstance(c.get("code"), str)),
            clinical_status=_first_code(_get(r, "clinicalStatus", dict, ref), f"{ref}.clinicalStatus"),
            onset=parse_datetime(r.get("onsetDateTime"), f"{ref}.onsetDateTime"),
        )

    def _medication_concept(self, r: dict, ref: str) -> dict | None:
        concept = _get(r, "medicationCodeableConcept", dict, ref)
        if concept:
            return concept
        med_ref = _ref(r, "medicationReference", ref)
        if not med_ref:
            return None
        if med_ref.startswith("#"):
            for contained in _dicts(_list(r, "contained", ref), f"{ref}.contained"):
                if contained.get("id") == med_ref[1:]:
                    return _get(contained, "code", dict, f"{ref}.contained")
        target = self.index.get(med_ref)
        if target is None:
            self.issues.append(
                DataQualityIssue(
                    ref,
                    "unresolved-reference",
                    f"medication {med_ref} is not in the chart; the drug is unknown",
                )
            )
            return None
        return _get(target, "code", dict, med_ref)

    def _resolve_med(self, concept: dict | None, ref: str):
        text = _concept_text(concept, ref)
        match = self.terms.resolve_medication(_codes(concept, RXNORM, ref), text)
        if match.resolved_by == "unresolved":
            self.issues.append(
                DataQualityIssue(
                    ref,
                    "unknown-medication",
                    f"medication '{text or 'uncoded'}' is not in the ingredient map; no rule can check it",
                )
            )
        elif match.code_text_conflict:
            self.issues.append(
                DataQualityIssue(
                    ref,
                    "code-text-conflict",
                    "the RxNorm code and the medication name disagree; the name was used",
                )
            )
        return text, match

    def _order(self, r: dict, ref: str) -> MedicationOrder:
        concept = self._medication_concept(r, ref)
        text, match = self._resolve_med(concept, ref)
        dose = dose_text = route = None
        timing = Timing()
        instructions = _dicts(_list(r, "dosageInstruction", ref), f"{ref}.dosageInstruction")
        if instructions:
            d = instructions[0]
            dose_text = _str(d, "text", f"{ref}.dosageInstruction")
            route = _concept_text(_get(d, "route", dict, ref), f"{ref}.route") or None
            timing = _timing(d, f"{ref}.dosageInstruction")
            for dr in _dicts(_list(d, "doseAndRate", ref), f"{ref}.doseAndRate"):
                if dr.get("doseQuantity") is not None:
                    dose = _quantity(dr.get("doseQuantity"), f"{ref}.doseQuantity")
                    break
        period = _dict(_dict(r, "dispenseRequest", ref), "validityPeriod", f"{ref}.dispenseRequest")
        return MedicationOrder(
            ref=ref,
            status=_str(r, "status", ref) or "unknown",
            intent=_str(r, "intent", ref),
            text=text or "(uncoded medication)",
            ingredients=match.ingredients,
            classes=match.classes,
            resolved_by=match.resolved_by,
            rxnorm_codes=tuple(_codes(concept, RXNORM, ref)),
            dose=dose,
            dose_text=dose_text,
            route=route,
            timing=timing,
            authored_on=parse_datetime(r.get("authoredOn"), f"{ref}.authoredOn"),
            start=parse_datetime(period.get("start"), f"{ref}.validityPeriod.start")
            or _timing_start(instructions, ref),
            end=parse_datetime(period.get("end"), f"{ref}.validityPeriod.end")
            or _timing_end(instructions, ref),
        )

    def _statement(self, r: dict, ref: str) -> MedicationOrder:
        concept = self._medication_concept(r, ref)
        text, match = self._resolve_med(concept, ref)
        return MedicationOrder(
            ref=ref,
            status=_str(r, "status", ref) or "unknown",
            intent="statement",
            text=text or "(uncoded medication)",
            ingredients=match.ingredients,
            classes=match.classes,
            resolved_by=match.resolved_by,
            rxnorm_codes=tuple(_codes(concept, RXNORM, ref)),
            authored_on=parse_datetime(r.get("dateAsserted"), f"{ref}.dateAsserted"),
        )

    def _administration(self, r: dict, ref: str) -> Administration:
        concept = self._medication_concept(r, ref)
        text, match = self._resolve_med(concept, ref)
        when = r.get("effectiveDateTime")
        if when is None:
            when = _dict(r, "effectivePeriod", ref).get("start")
        dosage = _dict(r, "dosage", ref)
        reasons = [_concept_text(c, f"{ref}.statusReason") for c in _list(r, "statusReason", ref)]
        return Administration(
            ref=ref,
            status=_str(r, "status", ref) or "unknown",
            text=text or "(uncoded medication)",
            ingredients=match.ingredients,
            classes=match.classes,
            order_ref=_ref(r, "request", ref),
            time=parse_datetime(when, f"{ref}.effective"),
            dose=_quantity(dosage.get("dose"), f"{ref}.dosage.dose"),
            status_reason="; ".join(x for x in reasons if x) or None,
        )

    def _observation(self, r: dict, ref: str) -> list[Result]:
        status = _str(r, "status", ref) or "unknown"
        when = r.get("effectiveDateTime")
        if when is None:
            when = (
                _dict(r, "effectivePeriod", ref).get("start") or r.get("effectiveInstant") or r.get("issued")
            )
        time = parse_datetime(when, f"{ref}.effective")
        category = ""
        for cat in _list(r, "category", ref):
            category = _first_code(cat, f"{ref}.category") or category
            if category:
                break
        interpretation = None
        for interp in _list(r, "interpretation", ref):
            interpretation = _first_code(interp, f"{ref}.interpretation")
            break
        ranges = _list(r, "referenceRange", ref)
        results = []
        code = _get(r, "code", dict, ref)
        components = _dicts(_list(r, "component", ref), f"{ref}.component")
        if any(k.startswith("value") for k in r) or not components:
            results.append(self._result(ref, r, code, category, time, status, interpretation, ranges))
        for comp in components:
            results.append(
                self._result(
                    ref,
                    comp,
                    _get(comp, "code", dict, f"{ref}.component"),
                    category,
                    time,
                    status,
                    interpretation,
                    _list(comp, "referenceRange", f"{ref}.component") or ranges,
                )
            )
        return results

    def _result(self, ref, holder, code, category, time, status, interpretation, ranges) -> Result:
        loinc_codes = _codes(code, LOINC, f"{ref}.code")
        analyte = None
        for lc in loinc_codes:
            analyte = self.terms.analyte_for_loinc(lc)
            if analyte:
                break
        name = _concept_text(code, f"{ref}.code") or "(uncoded observation)"
        loinc = loinc_codes[0] if loinc_codes else None
        key = analyte.key if analyte else (f"loinc:{loinc}" if loinc else f"text:{name.lower()}")
        vq = _get(holder, "valueQuantity", dict, ref)
        original = _quantity(vq, f"{ref}.valueQuantity")
        if original is None:
            for k in ("valueInteger", "valueDecimal"):
                v = _number(holder, k, ref)
                if v is not None:
                    original = Quantity(v, "")
        value_text = None
        vcc = _get(holder, "valueCodeableConcept", dict, ref)
        value_codes: tuple[str, ...] = ()
        if vcc:
            value_text = _concept_text(vcc, f"{ref}.valueCodeableConcept") or None
            value_codes = tuple(
                c["code"]
                for c in _codings(vcc, f"{ref}.valueCodeableConcept")
                if isinstance(c.get("code"), str)
            )
        elif isinstance(holder.get("valueString"), str):
            value_text = holder["valueString"]
        elif isinstance(holder.get("valueBoolean"), bool):
            value_text = "yes" if holder["valueBoolean"] else "no"
        elif original is None and isinstance(vq, dict) and isinstance(vq.get("value"), str):
            # The value was refused (not a number): show what the source says, never an older value in its place.
            value_text = (
                f"{vq['value'][:40]} {vq.get('unit') if isinstance(vq.get('unit'), str) else ''}".strip()
            )
        value = unit = low = high = None
        if original is not None:
            if analyte:
                unit = analyte.canonical_unit
                try:
                    value = self.terms.to_canonical(analyte, original.value, original.unit)
                except UnknownUnitError as exc:
                    # The human-readable unit may be free text ("beats/minute"); the UCUM code is authoritative.
                    ucum = vq.get("code") if isinstance(vq, dict) else None
                    try:
                        if not isinstance(ucum, str) or ucum == original.unit:
                            raise exc
                        value = self.terms.to_canonical(analyte, original.value, ucum)
                    except UnknownUnitError:
                        self.issues.append(DataQualityIssue(ref, "unknown-unit", str(exc)))
            else:
                value, unit = original.value, original.unit
        if value is not None and not _finite(value):
            _bad(f"{ref} value {original} is out of range after unit conversion")
            value = None
        range0 = next(iter(_dicts(ranges[:1], f"{ref}.referenceRange")), {})
        if range0:
            low_q = _quantity(range0.get("low"), f"{ref}.referenceRange.low")
            high_q = _quantity(range0.get("high"), f"{ref}.referenceRange.high")
            low = self._range_value(analyte, low_q, ref)
            high = self._range_value(analyte, high_q, ref)
        if value is not None:
            value = round(value, 4)
        return Result(
            ref=ref,
            analyte=key,
            name=analyte.name if analyte else name,
            category=category or "unknown",
            time=time,
            status=status,
            loinc=loinc,
            value=value,
            unit=unit,
            original=original,
            value_text=value_text,
            ref_low=low,
            ref_high=high,
            interpretation=interpretation,
            loinc_codes=tuple(loinc_codes),
            value_codes=value_codes,
        )

    def _range_value(self, analyte, q: Quantity | None, ref: str) -> float | None:
        if q is None:
            return None
        if analyte is None:
            return q.value
        try:
            value = self.terms.to_canonical(analyte, q.value, q.unit or analyte.canonical_unit)
        except UnknownUnitError:
            return None
        return round(value, 4) if _finite(value) else None

    def _note(self, r: dict, ref: str) -> Note | None:
        status = _str(r, "status", ref)
        if status == "entered-in-error":
            return None
        texts = []
        for content in _dicts(_list(r, "content", ref), f"{ref}.content"):
            att = _dict(content, "attachment", f"{ref}.content")
            data = _str(att, "data", f"{ref}.attachment")
            ctype = (_str(att, "contentType", f"{ref}.attachment") or "text/plain").split(";")[0]
            if data and ctype.startswith("text/"):
                try:
                    texts.append(base64.b64decode(data, validate=True).decode("utf-8", errors="replace"))
                except (binascii.Error, ValueError):
                    _bad(f"{ref} attachment data is not valid base64")
            elif att.get("url") or data:
                self.issues.append(
                    DataQualityIssue(
                        ref, "note-not-loaded", f"note content of type {ctype} was not loaded as text"
                    )
                )
        text = "\n".join(texts) or _str(r, "description", ref) or ""
        return Note(
            ref=ref,
            time=parse_datetime(r.get("date"), f"{ref}.date"),
            title=_concept_text(_get(r, "type", dict, ref), f"{ref}.type") or "Note",
            text=text[:NOTE_TEXT_LIMIT],
            author=None,
        )

    def _flag(self, r: dict, ref: str) -> IsolationFact | None:
        """An isolation Flag (a listed SNOMED CT precaution code, or a listed phrase in its words), else None."""
        codes = isolation_codes()
        raw_status = r.get("status")
        if isinstance(raw_status, str) and raw_status in codes.withdrawn_statuses:
            return None  # entered in error: it never was true
        # The code decides first: a flag about something else costs nothing when its other fields are malformed.
        code = _get(r, "code", dict, ref)
        codings = _codings(code, f"{ref}.code")
        text = _concept_text(code, f"{ref}.code")
        snomed = [c["code"] for c in codings if c.get("system") == SNOMED and isinstance(c.get("code"), str)]
        found = next((codes.codes[c] for c in snomed if c in codes.codes), None)
        matched_by = "code"
        if found is None:
            words = [text, *(c["display"] for c in codings if isinstance(c.get("display"), str))]
            found = next((hit for w in words if w and (hit := codes.by_text(w))), None)
            matched_by = "text"
        if found is None:
            if not text and not codings and "code" not in r:
                self.issues.append(
                    DataQualityIssue(
                        ref,
                        "invalid-resource",
                        "Flag has no code; whether it is an isolation precaution is unknown",
                        "error",
                    )
                )
            return None  # a flag about something else (falls, behaviour, ...): not isolation
        status = _str(r, "status", ref)
        if status not in codes.known_statuses:
            self.issues.append(
                DataQualityIssue(
                    ref,
                    "flag-status-unknown",
                    f"isolation flag status {status!r} is not a FHIR FlagStatus; shown as current — check the chart"
                    if status
                    else "isolation flag has no status; shown as current — check the chart",
                )
            )
        period = _dict(r, "period", ref)
        kind, label = found
        return IsolationFact(
            ref=ref,
            text=text or (label if kind == "isolation" else f"{label} precautions"),
            kind=kind,
            kind_label=label,
            status=status if status in codes.known_statuses else "unknown",
            start=parse_datetime(period.get("start"), f"{ref}.period.start"),
            end=parse_datetime(period.get("end"), f"{ref}.period.end"),
            codes=tuple(c["code"] for c in codings if isinstance(c.get("code"), str)),
            matched_by=matched_by,
        )

    def _check_stale_latest(self, chart: Chart) -> None:
        """Say so when an analyte's newest result could not be read and an older value is what shows as latest."""
        damaged = {i.source for i in self.issues if i.code in ("invalid-resource", "unknown-unit")}
        newest: dict[str, Result] = {}
        latest_value: dict[str, Result] = {}
        for r in chart.results:  # oldest first
            if r.time is None or r.status in ("entered-in-error", "cancelled"):
                continue
            newest[r.analyte] = r
            if r.is_usable and r.value is not None:
                latest_value[r.analyte] = r
        for analyte, last in newest.items():
            shown = latest_value.get(analyte)
            if (
                shown is None
                or shown is last
                or last.ref not in damaged
                or (last.is_usable and last.value is not None)
            ):
                continue
            when = last.time.strftime("%Y-%m-%d %H:%M UTC")  # type: ignore[union-attr]
            self.issues.append(
                DataQualityIssue(
                    last.ref,
                    "stale-latest",
                    f"the newest {last.name} ({when}) could not be read; the latest value shown, {shown.ref}, "
                    "is older",
                    "error",
                )
            )

    def _check_references(self, chart: Chart) -> None:
        order_refs = {o.ref for o in chart.orders}
        for admin in chart.administrations:
            if admin.order_ref and admin.order_ref not in order_refs:
                self.issues.append(
                    DataQualityIssue(
                        admin.ref,
                        "unresolved-reference",
                        f"administration points to {admin.order_ref}, which is not in the chart",
                    )
                )


def _human_name(names: list, where: str) -> str:
    for n in _dicts(names, where):
        use = _str(n, "use", where)
        if use in (None, "official", "usual"):
            given = " ".join(_strings(_list(n, "given", where), f"{where}.given"))
            family = _str(n, "family", where) or ""
            text = _str(n, "text", where) or ""
            full = text or f"{given} {family}".strip()
            if full:
                return full
    return "(no name recorded)"


def _mrn(identifiers: list, where: str) -> str | None:
    for ident in _dicts(identifiers, where):
        codes = {c.get("code") for c in _codings(_get(ident, "type", dict, where), f"{where}.type")}
        value = _str(ident, "value", where)
        if "MR" in codes and value:
            return value
    return None


def _timing(dosage: dict, where: str) -> Timing:
    timing = _dict(dosage, "timing", where)
    repeat = _dict(timing, "repeat", f"{where}.timing")
    as_needed = (
        bool(_get(dosage, "asNeededBoolean", bool, where))
        or dosage.get("asNeededCodeableConcept") is not None
    )
    frequency = _get(repeat, "frequency", int, f"{where}.timing.repeat")
    return Timing(
        frequency=frequency,
        period=_number(repeat, "period", f"{where}.timing.repeat"),
        period_unit=_str(repeat, "periodUnit", f"{where}.timing.repeat"),
        as_needed=as_needed,
        text=_concept_text(_get(timing, "code", dict, f"{where}.timing"), f"{where}.timing.code") or None,
    )


def _bounds(instructions: list, where: str, key: str) -> datetime | None:
    for d in instructions:
        if isinstance(d, dict):
            timing = _dict(d, "timing", where)
            bounds = _dict(
                _dict(timing, "repeat", f"{where}.timing"), "boundsPeriod", f"{where}.timing.repeat"
            )
            if bounds.get(key):
                return parse_datetime(bounds[key], f"{where}.boundsPeriod.{key}")
    return None


def _timing_start(instructions: list, where: str) -> datetime | None:
    return _bounds(instructions, where, "start")


def _timing_end(instructions: list, where: str) -> datetime | None:
    """The end of the dosing period (Timing.repeat.boundsPeriod.end): when a stopped order actually stopped."""
    return _bounds(instructions, where, "end")


def build_chart(
    resources: Iterable[Any],
    *,
    source: str,
    patient_id: str | None = None,
    strict: bool = False,
    issues: Iterable[DataQualityIssue] = (),
) -> Chart:
    builder = ChartBuilder(source=source, patient_id=patient_id, strict=strict)
    for issue in issues:
        builder.add_issue(issue)
    for resource in resources:
        builder.add(resource)
    return builder.build()


_MODEL_CACHE: dict[str, Any] = {}


def validate_strict(resource: dict) -> str | None:
    """Full fhir.resources R4B validation; returns a short reason or None when valid."""
    from fhir.resources.R4B import get_fhir_model_class  # slow import, only in strict mode

    rtype = resource["resourceType"]
    model = _MODEL_CACHE.get(rtype)
    if model is None:
        model = _MODEL_CACHE[rtype] = get_fhir_model_class(rtype)
    try:
        model.model_validate(resource)
    except Exception as exc:  # pydantic raises many shapes of error; any of them means "invalid"
        first = str(exc).splitlines()
        return f"fails FHIR R4B validation: {' '.join(first[:3])[:300]}"
    return None

"""Turn one patient's raw FHIR R4 resources into a Chart; a malformed resource becomes a data-quality issue."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

from assistant.model import (
    Administration,
    AllergyFact,
    Chart,
    ConditionFact,
    DataQualityIssue,
    Demographics,
    EncounterFact,
    MedicationOrder,
    Note,
    Quantity,
    Result,
    Timing,
)
from assistant.terminology import LOINC, RXNORM, Terminology, UnknownUnitError, terminology

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
)
INPATIENT_CLASSES = {"IMP", "ACUTE", "NONAC", "inpatient", "OBSENC", "EMER"}
NO_KNOWN_ALLERGY_CODES = {"716186003", "409137002", "428607008", "429625007"}
NOTE_TEXT_LIMIT = 20_000


class ResourceShapeError(ValueError):
    """A resource field has the wrong type or an unreadable value."""


class PatientNotFoundError(LookupError):
    """The source holds no Patient resource for the requested id."""


# --- small typed accessors: every read checks its type so a bad resource fails loudly, not silently ---------


def _get(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (
        kind is not bool and isinstance(value, bool) and bool not in _kinds(kind)
    ):
        raise ResourceShapeError(f"{where}.{key} should be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _kinds(kind))


def _list(obj: dict, key: str, where: str) -> list:
    value = _get(obj, key, list, where)
    return value or []


def _dict(obj: dict, key: str, where: str) -> dict:
    value = _get(obj, key, dict, where)
    return value or {}


def _str(obj: dict, key: str, where: str) -> str | None:
    return _get(obj, key, str, where)


def _number(obj: dict, key: str, where: str) -> float | None:
    value = _get(obj, key, (int, float), where)
    if value is None:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        raise ResourceShapeError(f"{where}.{key} is not a finite number")
    return float(value)


def parse_datetime(value: Any, where: str = "value") -> datetime | None:
    """FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD or full with zone) as an aware UTC datetime."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ResourceShapeError(f"{where} should be a FHIR dateTime string, got {type(value).__name__}")
    text = value.strip()
    try:
        if len(text) == 4:
            return datetime(int(text), 1, 1, tzinfo=UTC)
        if len(text) == 7:
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC)
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ResourceShapeError(f"{where} {value!r} is not a valid FHIR dateTime") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


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


def _ref(obj: dict, key: str, where: str) -> str | None:
    reference = _dict(obj, key, where)
    return local_ref(_str(reference, "reference", f"{where}.{key}"))


def _codings(concept: dict | None, where: str) -> list[dict]:
    if not concept:
        return []
    if not isinstance(concept, dict):
        raise ResourceShapeError(f"{where} should be a CodeableConcept object")
    codings = _list(concept, "coding", where)
    for c in codings:
        if not isinstance(c, dict):
            raise ResourceShapeError(f"{where}.coding entries should be objects")
    return codings


def _codes(concept: dict | None, system: str, where: str) -> list[str]:
    return [
        c["code"]
        for c in _codings(concept, where)
        if c.get("system") == system and isinstance(c.get("code"), str)
    ]


def _concept_text(concept: dict | None, where: str) -> str:
    if not concept:
        return ""
    text = _str(concept, "text", where)
    if text:
        return text
    for c in _codings(concept, where):
        if isinstance(c.get("display"), str):
            return c["display"]
    for c in _codings(concept, where):
        if isinstance(c.get("code"), str):
            return c["code"]
    return ""


def _first_code(concept: dict | None, where: str) -> str | None:
    for c in _codings(concept, where):
        if isinstance(c.get("code"), str):
            return c["code"]
    return None


def _quantity(obj: dict | None, where: str) -> Quantity | None:
    if not obj:
        return None
    if not isinstance(obj, dict):
        raise ResourceShapeError(f"{where} should be a Quantity object")
    value = _number(obj, "value", where)
    if value is None:
        return None
    unit = _str(obj, "unit", where) or _str(obj, "code", where) or ""
    return Quantity(value, unit)


class ChartBuilder:
    """Collects one patient's resources and builds the Chart; keeps going past bad resources."""

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
        self.issues: list[DataQualityIssue] = []
        self.by_type: dict[str, list[dict]] = {t: [] for t in CHART_TYPES}
        self.index: dict[str, dict] = {}
        self.count = 0

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
        rid = resource.get("id")
        ref = f"{rtype}/{rid}" if isinstance(rid, str) and rid else (origin or f"{rtype}/<no id>")
        if not isinstance(rid, str) or not rid:
            self.issues.append(
                DataQualityIssue(ref, "invalid-resource", f"{rtype} has no id; it cannot be cited", "error")
            )
            return
        if self.strict and rtype in CHART_TYPES:
            problem = validate_strict(resource)
            if problem:
                self.issues.append(DataQualityIssue(ref, "invalid-resource", problem, "error"))
                return
        if rtype in self.by_type:
            self.by_type[rtype].append(resource)
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
        )
        for rtype, handler, sink in handlers:
            for resource in self.by_type[rtype]:
                ref = f"{rtype}/{resource['id']}"
                try:
                    subject = self._subject(resource, rtype)
                    if subject is not None and subject != patient.ref:
                        continue  # another patient's resource in a shared bundle: not ours to show
                    produced = handler(resource, ref)
                except ResourceShapeError as exc:
                    self.issues.append(DataQualityIssue(ref, "invalid-resource", str(exc), "error"))
                    continue
                if produced is None:
                    continue
                if isinstance(produced, list):
                    sink.extend(produced)
                else:
                    sink.append(produced)
                chart.resources[ref] = resource
        for loc in self.by_type["Location"]:
            chart.resources[f"Location/{loc['id']}"] = loc
        chart.encounter = _current_encounter(chart.encounters)
        self._check_references(chart)
        chart.results.sort(key=lambda r: (r.time or datetime.min.replace(tzinfo=UTC), r.ref))
        chart.administrations.sort(key=lambda a: (a.time or datetime.min.replace(tzinfo=UTC), a.ref))
        chart.notes.sort(key=lambda n: (n.time or datetime.min.replace(tzinfo=UTC), n.ref))
        chart.issues = self.issues
        log.debug(
            "chart built: %d resources, %d results, %d orders, %d issues",
            self.count,
            len(chart.results),
            len(chart.orders),
            len(chart.issues),
        )
        return chart

    def _patient(self) -> Demographics:
        patients = self.by_type["Patient"]
        if self.patient_id:
            patients = [p for p in patients if p.get("id") == self.patient_id]
        if not patients:
            wanted = f"Patient/{self.patient_id}" if self.patient_id else "a Patient resource"
            raise PatientNotFoundError(f"{self.source} holds no {wanted}; check the patient id")
        if len(patients) > 1 and not self.patient_id:
            raise PatientNotFoundError(f"{self.source} holds {len(patients)} patients; pass --patient ID")
        p = patients[0]
        ref = f"Patient/{p['id']}"
        try:
            name = _human_name(_list(p, "name", "Patient"))
            birth = parse_date(p.get("birthDate"), "Patient.birthDate")
            sex = _str(p, "gender", "Patient")
            mrn = _mrn(_list(p, "identifier", "Patient"))
        except ResourceShapeError as exc:
            self.issues.append(DataQualityIssue(ref, "invalid-resource", str(exc), "error"))
            name, birth, sex, mrn = "(name unreadable)", None, None, None
        return Demographics(ref=ref, name=name, birth_date=birth, sex=sex, mrn=mrn)

    def _subject(self, resource: dict, rtype: str) -> str | None:
        key = "patient" if rtype == "AllergyIntolerance" else "subject"
        return _ref(resource, key, rtype)

    def _encounter(self, r: dict, ref: str) -> EncounterFact:
        period = _dict(r, "period", ref)
        cls = _get(r, "class", dict, ref) or {}
        ward_ref = ward_name = bed_ref = bed_name = None
        for loc in _list(r, "location", ref):
            if not isinstance(loc, dict):
                raise ResourceShapeError(f"{ref}.location entries should be objects")
            if loc.get("status") not in (None, "active", "planned", "reserved"):
                continue
            lref = _ref(loc, "location", ref)
            display = _str(_dict(loc, "location", ref), "display", ref)
            kind = self._location_kind(lref, loc, ref)
            name = display or self._location_name(lref)
            if kind == "bd" or kind == "ro":
                bed_ref, bed_name = lref, name
                parent = self._location_parent(lref)
                if parent and not ward_ref:
                    ward_ref, ward_name = parent, self._location_name(parent)
            elif kind == "wa" or ward_ref is None:
                ward_ref, ward_name = lref, name
        reasons = [_concept_text(c, f"{ref}.reasonCode") for c in _list(r, "reasonCode", ref)]
        return EncounterFact(
            ref=ref,
            status=_str(r, "status", ref) or "unknown",
            class_code=_str(cls, "code", ref),
            start=parse_datetime(period.get("start"), f"{ref}.period.start"),
            end=parse_datetime(period.get("end"), f"{ref}.period.end"),
            ward_ref=ward_ref,
            ward_name=ward_name,
            bed_ref=bed_ref,
            bed_name=bed_name,
            reason="; ".join(x for x in reasons if x) or None,
        )

    def _location_kind(self, lref: str | None, loc: dict, where: str) -> str | None:
        physical = _get(loc, "physicalType", dict, where)
        if physical:
            return _first_code(physical, where)
        target = self.index.get(lref or "")
        if target:
            return _first_code(target.get("physicalType"), lref or where)
        return None

    def _location_name(self, lref: str | None) -> str | None:
        target = self.index.get(lref or "")
        if target and isinstance(target.get("name"), str):
            return target["name"]
        return lref.split("/", 1)[1] if lref else None

    def _location_parent(self, lref: str | None) -> str | None:
        target = self.index.get(lref or "")
        if not target:
            return None
        part_of = target.get("partOf")
        return local_ref(part_of.get("reference")) if isinstance(part_of, dict) else None

    def _allergy(self, r: dict, ref: str) -> AllergyFact:
        code = _get(r, "code", dict, ref)
        text = _concept_text(code, f"{ref}.code")
        nka = any(cd.get("code") in NO_KNOWN_ALLERGY_CODES for cd in _codings(code, ref))
        ingredients, classes = self.terms.resolve_allergen(_codes(code, RXNORM, ref), text)
        categories = [c for c in _list(r, "category", ref) if isinstance(c, str)]
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
        for reaction in _list(r, "reaction", ref):
            if isinstance(reaction, dict):
                for m in _list(reaction, "manifestation", ref):
                    t = _concept_text(m, f"{ref}.reaction.manifestation")
                    if t:
                        reactions.append(t)
        return AllergyFact(
            ref=ref,
            substance=text or "(uncoded substance)",
            ingredients=ingredients,
            classes=classes,
            clinical_status=_first_code(_get(r, "clinicalStatus", dict, ref), ref),
            verification_status=_first_code(_get(r, "verificationStatus", dict, ref), ref),
            criticality=_str(r, "criticality", ref),
            category=tuple(categories),
            reactions=tuple(reactions),
            no_known_allergy=nka,
        )

    def _condition(self, r: dict, ref: str) -> ConditionFact:
        code = _get(r, "code", dict, ref)
        return ConditionFact(
            ref=ref,
            text=_concept_text(code, ref) or "(uncoded condition)",
            codes=tuple(c.get("code") for c in _codings(code, ref) if isinstance(c.get("code"), str)),
            clinical_status=_first_code(_get(r, "clinicalStatus", dict, ref), ref),
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
            for contained in _list(r, "contained", ref):
                if isinstance(contained, dict) and contained.get("id") == med_ref[1:]:
                    return _get(contained, "code", dict, ref)
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
        instructions = _list(r, "dosageInstruction", ref)
        if instructions:
            d = instructions[0]
            if not isinstance(d, dict):
                raise ResourceShapeError(f"{ref}.dosageInstruction entries should be objects")
            dose_text = _str(d, "text", ref)
            route = _concept_text(_get(d, "route", dict, ref), ref) or None
            timing = _timing(d, ref)
            for dr in _list(d, "doseAndRate", ref):
                if isinstance(dr, dict) and dr.get("doseQuantity") is not None:
                    dose = _quantity(dr.get("doseQuantity"), f"{ref}.doseQuantity")
                    break
        period = _dict(_dict(r, "dispenseRequest", ref), "validityPeriod", ref)
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
            start=parse_datetime(period.get("start"), ref) or _timing_start(instructions, ref),
            end=parse_datetime(period.get("end"), ref) or _timing_end(instructions, ref),
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
        reasons = [_concept_text(c, ref) for c in _list(r, "statusReason", ref)]
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
        if any(k.startswith("value") for k in r) or not _list(r, "component", ref):
            results.append(self._result(ref, r, code, category, time, status, interpretation, ranges))
        for comp in _list(r, "component", ref):
            if not isinstance(comp, dict):
                raise ResourceShapeError(f"{ref}.component entries should be objects")
            results.append(
                self._result(
                    ref,
                    comp,
                    _get(comp, "code", dict, ref),
                    category,
                    time,
                    status,
                    interpretation,
                    _list(comp, "referenceRange", ref) or ranges,
                )
            )
        return results

    def _result(self, ref, holder, code, category, time, status, interpretation, ranges) -> Result:
        loinc_codes = _codes(code, LOINC, ref)
        analyte = None
        for lc in loinc_codes:
            analyte = self.terms.analyte_for_loinc(lc)
            if analyte:
                break
        name = _concept_text(code, ref) or "(uncoded observation)"
        loinc = loinc_codes[0] if loinc_codes else None
        key = analyte.key if analyte else (f"loinc:{loinc}" if loinc else f"text:{name.lower()}")
        original = _quantity(_get(holder, "valueQuantity", dict, ref), f"{ref}.valueQuantity")
        if original is None:
            for k in ("valueInteger", "valueDecimal"):
                v = _number(holder, k, ref)
                if v is not None:
                    original = Quantity(v, "")
        value_text = None
        vcc = _get(holder, "valueCodeableConcept", dict, ref)
        if vcc:
            value_text = _concept_text(vcc, ref)
        elif isinstance(holder.get("valueString"), str):
            value_text = holder["valueString"]
        elif isinstance(holder.get("valueBoolean"), bool):
            value_text = "yes" if holder["valueBoolean"] else "no"
        value = unit = low = high = None
        if original is not None:
            if analyte:
                unit = analyte.canonical_unit
                try:
                    value = self.terms.to_canonical(analyte, original.value, original.unit)
                except UnknownUnitError as exc:
                    # The human-readable unit may be free text ("beats/minute"); the UCUM code is authoritative.
                    vq = holder.get("valueQuantity")
                    code = vq.get("code") if isinstance(vq, dict) else None
                    try:
                        if not isinstance(code, str) or code == original.unit:
                            raise exc
                        value = self.terms.to_canonical(analyte, original.value, code)
                    except UnknownUnitError:
                        self.issues.append(DataQualityIssue(ref, "unknown-unit", str(exc)))
            else:
                value, unit = original.value, original.unit
        if ranges and isinstance(ranges[0], dict):
            low_q = _quantity(ranges[0].get("low"), f"{ref}.referenceRange.low")
            high_q = _quantity(ranges[0].get("high"), f"{ref}.referenceRange.high")
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
        )

    def _range_value(self, analyte, q: Quantity | None, ref: str) -> float | None:
        if q is None:
            return None
        if analyte is None:
            return q.value
        try:
            return round(self.terms.to_canonical(analyte, q.value, q.unit or analyte.canonical_unit), 4)
        except UnknownUnitError:
            return None

    def _note(self, r: dict, ref: str) -> Note | None:
        status = _str(r, "status", ref)
        if status == "entered-in-error":
            return None
        texts = []
        for content in _list(r, "content", ref):
            if not isinstance(content, dict):
                raise ResourceShapeError(f"{ref}.content entries should be objects")
            att = _dict(content, "attachment", ref)
            data = _str(att, "data", ref)
            ctype = (_str(att, "contentType", ref) or "text/plain").split(";")[0]
            if data and ctype.startswith("text/"):
                try:
                    texts.append(base64.b64decode(data, validate=True).decode("utf-8", errors="replace"))
                except (binascii.Error, ValueError) as exc:
                    raise ResourceShapeError(f"{ref} attachment data is not valid base64") from exc
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
            title=_concept_text(_get(r, "type", dict, ref), ref) or "Note",
            text=text[:NOTE_TEXT_LIMIT],
            author=None,
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


def _human_name(names: list) -> str:
    for n in names:
        if isinstance(n, dict) and n.get("use") in (None, "official", "usual"):
            given = " ".join(g for g in n.get("given", []) if isinstance(g, str))
            family = n.get("family") if isinstance(n.get("family"), str) else ""
            text = n.get("text") if isinstance(n.get("text"), str) else ""
            full = text or f"{given} {family}".strip()
            if full:
                return full
    return "(no name recorded)"


def _mrn(identifiers: list) -> str | None:
    for ident in identifiers:
        if not isinstance(ident, dict):
            continue
        codes = {c.get("code") for c in (ident.get("type") or {}).get("coding", []) if isinstance(c, dict)}
        if "MR" in codes and isinstance(ident.get("value"), str):
            return ident["value"]
    return None


def _timing(dosage: dict, where: str) -> Timing:
    timing = _dict(dosage, "timing", where)
    repeat = _dict(timing, "repeat", where)
    as_needed = (
        bool(_get(dosage, "asNeededBoolean", bool, where))
        or dosage.get("asNeededCodeableConcept") is not None
    )
    frequency = _get(repeat, "frequency", int, where)
    return Timing(
        frequency=frequency,
        period=_number(repeat, "period", where),
        period_unit=_str(repeat, "periodUnit", where),
        as_needed=as_needed,
        text=_concept_text(_get(timing, "code", dict, where), where) or None,
    )


def _timing_start(instructions: list, where: str) -> datetime | None:
    for d in instructions:
        if isinstance(d, dict):
            bounds = _dict(_dict(_dict(d, "timing", where), "repeat", where), "boundsPeriod", where)
            if bounds.get("start"):
                return parse_datetime(bounds["start"], f"{where}.boundsPeriod.start")
    return None


def _timing_end(instructions: list, where: str) -> datetime | None:
    """The end of the dosing period (Timing.repeat.boundsPeriod.end): when a stopped order actually stopped."""
    for d in instructions:
        if isinstance(d, dict):
            bounds = _dict(_dict(_dict(d, "timing", where), "repeat", where), "boundsPeriod", where)
            if bounds.get("end"):
                return parse_datetime(bounds["end"], f"{where}.boundsPeriod.end")
    return None


def _current_encounter(encounters: list[EncounterFact]) -> EncounterFact | None:
    current = [e for e in encounters if e.status in ("in-progress", "arrived", "onleave", "triaged")]
    inpatient = [e for e in current if e.class_code in INPATIENT_CLASSES] or current
    if not inpatient:
        return None
    return max(inpatient, key=lambda e: e.start or datetime.min.replace(tzinfo=UTC))


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

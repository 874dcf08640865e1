"""In-process FHIR R4 test server (search, $everything, Bulk Data, SMART Backend Services, fault injection)."""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from datetime import tzinfo as tzinfo_t
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = logging.getLogger(__name__)

SYNTHEA_DIR = Path(os.environ.get("NVA_SYNTHEA_DIR", "/work/shared/data/synthea-r4"))
FHIR_JSON = "application/fhir+json; charset=utf-8"
NDJSON = "application/fhir+ndjson"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SMART_ALGS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME = 300

# FHIR R4 (4.0.1) resource types: a real server answers 404 for anything else.
R4_TYPES = frozenset(
    """Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse AuditEvent Basic
    Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement CarePlan CareTeam CatalogEntry
    ChargeItem ChargeItemDefinition Claim ClaimResponse ClinicalImpression CodeSystem Communication
    CommunicationRequest CompartmentDefinition Composition ConceptMap Condition Consent Contract Coverage
    CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric
    DeviceRequest DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal GraphDefinition Group
    GuidanceResponse HealthcareService ImagingStudy Immunization ImmunizationEvaluation ImmunizationRecommendation
    ImplementationGuide InsurancePlan Invoice Library Linkage List Location Measure MeasureReport Media Medication
    MedicationAdministration MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement
    MedicinalProduct MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
    MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured MedicinalProductPackaged
    MedicinalProductPharmaceutical MedicinalProductUndesirableEffect MessageDefinition MessageHeader
    MolecularSequence NamingSystem NutritionOrder Observation ObservationDefinition OperationDefinition
    OperationOutcome Organization OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation
    Person PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse
    RelatedPerson RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
    RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen SpecimenDefinition
    StructureDefinition StructureMap Subscription Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein
    SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task
    TerminologyCapabilities TestReport TestScript ValueSet VerificationResult VisionPrescription""".split()
)

# Types always advertised in the CapabilityStatement even when no data of that type is loaded.
ADVERTISED_TYPES = (
    "Patient",
    "Encounter",
    "Observation",
    "Condition",
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationStatement",
    "Medication",
    "AllergyIntolerance",
    "Procedure",
    "DiagnosticReport",
    "DocumentReference",
    "Immunization",
    "CarePlan",
    "CareTeam",
    "Location",
    "Practitioner",
    "Organization",
    "Device",
    "Flag",
)

# Reference fields that put a resource in a patient's compartment (checked in order).
COMPARTMENT_FIELDS = ("subject", "patient", "beneficiary")

# Search parameters per type: name -> (kind, element paths). `patient`, `subject` and `_id` are handled
# generically. Paths follow FHIR R4 search parameter expressions, simplified.
_DATE_EFFECTIVE = ["effectiveDateTime", "effectivePeriod.start", "effectiveInstant"]
SEARCH_PARAMS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "Observation": {
        "category": ("token", ["category"]),
        "code": ("token", ["code"]),
        "status": ("token", ["status"]),
        "date": ("date", _DATE_EFFECTIVE),
        "encounter": ("reference", ["encounter"]),
    },
    "Condition": {
        "category": ("token", ["category"]),
        "code": ("token", ["code"]),
        "clinical-status": ("token", ["clinicalStatus"]),
        "verification-status": ("token", ["verificationStatus"]),
        "onset-date": ("date", ["onsetDateTime", "onsetPeriod.start"]),
        "recorded-date": ("date", ["recordedDate"]),
        "encounter": ("reference", ["encounter"]),
    },
    "MedicationRequest": {
        "status": ("token", ["status"]),
        "intent": ("token", ["intent"]),
        "category": ("token", ["category"]),
        "code": ("token", ["medicationCodeableConcept"]),
        "date": ("date", ["authoredOn"]),
        "authoredon": ("date", ["authoredOn"]),
        "encounter": ("reference", ["encounter"]),
    },
    "MedicationAdministration": {
        "status": ("token", ["status"]),
        "code": ("token", ["medicationCodeableConcept"]),
        "date": ("date", ["effectiveDateTime", "effectivePeriod.start"]),
        "effective-time": ("date", ["effectiveDateTime", "effectivePeriod.start"]),
        "encounter": ("reference", ["context"]),
        "context": ("reference", ["context"]),
    },
    "MedicationStatement": {
        "status": ("token", ["status"]),
        "category": ("token", ["category"]),
        "code": ("token", ["medicationCodeableConcept"]),
        "effective": ("date", ["effectiveDateTime", "effectivePeriod.start"]),
    },
    "Encounter": {
        "status": ("token", ["status"]),
        "class": ("token", ["class"]),
        "type": ("token", ["type"]),
        "date": ("date", ["period.start"]),
        "location": ("reference", ["location.location"]),
    },
    "DocumentReference": {
        "status": ("token", ["status"]),
        "category": ("token", ["category"]),
        "type": ("token", ["type"]),
        "date": ("date", ["date"]),
        "encounter": ("reference", ["context.encounter"]),
    },
    "AllergyIntolerance": {
        "clinical-status": ("token", ["clinicalStatus"]),
        "verification-status": ("token", ["verificationStatus"]),
        "category": ("token", ["category"]),
        "criticality": ("token", ["criticality"]),
        "code": ("token", ["code"]),
        "date": ("date", ["recordedDate"]),
    },
    "Procedure": {
        "status": ("token", ["status"]),
        "category": ("token", ["category"]),
        "code": ("token", ["code"]),
        "date": ("date", ["performedDateTime", "performedPeriod.start"]),
        "encounter": ("reference", ["encounter"]),
    },
    "DiagnosticReport": {
        "status": ("token", ["status"]),
        "category": ("token", ["category"]),
        "code": ("token", ["code"]),
        "date": ("date", _DATE_EFFECTIVE),
        "encounter": ("reference", ["encounter"]),
    },
    "Immunization": {
        "status": ("token", ["status"]),
        "vaccine-code": ("token", ["vaccineCode"]),
        "date": ("date", ["occurrenceDateTime"]),
    },
    "CarePlan": {
        "status": ("token", ["status"]),
        "category": ("token", ["category"]),
        "date": ("date", ["period.start"]),
    },
    "CareTeam": {"status": ("token", ["status"]), "category": ("token", ["category"])},
    "Device": {"status": ("token", ["status"]), "type": ("token", ["type"])},
    # FHIR R4 Flag search parameters (http://hl7.org/fhir/R4/flag.html#search): date is the flag's period.
    "Flag": {
        "status": ("token", ["status"]),
        "category": ("token", ["category"]),
        "code": ("token", ["code"]),
        "date": ("date", ["period.start"]),
        "encounter": ("reference", ["encounter"]),
    },
    "ImagingStudy": {"status": ("token", ["status"]), "started": ("date", ["started"])},
    "Claim": {"status": ("token", ["status"])},
    "ExplanationOfBenefit": {"status": ("token", ["status"])},
    "Patient": {
        "identifier": ("token", ["identifier"]),
        "gender": ("token", ["gender"]),
        "birthdate": ("date", ["birthDate"]),
        "name": ("string", ["name.family", "name.given", "name.text"]),
        "family": ("string", ["name.family"]),
        "given": ("string", ["name.given"]),
    },
    "Location": {"name": ("string", ["name"]), "identifier": ("token", ["identifier"])},
    "Organization": {"name": ("string", ["name"]), "identifier": ("token", ["identifier"])},
    "Practitioner": {
        "name": ("string", ["name.family", "name.given"]),
        "identifier": ("token", ["identifier"]),
    },
}
NON_COMPARTMENT_TYPES = frozenset({"Patient", "Location", "Organization", "Practitioner", "PractitionerRole"})
# Parameters that control result shape rather than filter; accepted silently.
RESULT_PARAMS = frozenset({"_count", "_format", "_pretty", "_total", "_sort", "_summary"})


# ----------------------------------------------------------------------------------------------- helpers


_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _touched(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy of `resource` as a later version of it: meta.lastUpdated one day after now, a marker extension."""
    copy = json.loads(json.dumps(resource))
    later = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    copy.setdefault("meta", {})["lastUpdated"] = later
    copy.setdefault("extension", []).append({"url": "urn:nva-test:duplicate", "valueBoolean": True})
    return copy


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def outcome(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    """Build an OperationOutcome with one issue."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def _values(obj: Any, path: str) -> list[Any]:
    """Values at a dotted element path, flattening lists at every step."""
    current = [obj]
    for part in path.split("."):
        nxt: list[Any] = []
        for item in current:
            if isinstance(item, dict) and part in item:
                value = item[part]
                if isinstance(value, list):
                    nxt.extend(value)
                else:
                    nxt.append(value)
        current = nxt
        if not current:
            break
    return current


_DT_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@lru_cache(maxsize=200_000)
def parse_fhir_date(text: str) -> tuple[datetime, datetime] | None:
    """The half-open UTC range [lo, hi) a FHIR date/dateTime/instant denotes at its precision."""
    m = _DT_RE.match(text.strip())
    if not m:
        return None
    year, month, day, hh, mm, ss, frac, tz = m.groups()
    tzinfo: tzinfo_t = UTC  # FHIR dateTimes without offset: treat as UTC
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        tzinfo = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    try:
        if month is None:
            lo = datetime(int(year), 1, 1, tzinfo=UTC)
            return lo, lo.replace(year=lo.year + 1)
        if day is None:
            lo = datetime(int(year), int(month), 1, tzinfo=UTC)
            hi = lo.replace(year=lo.year + 1, month=1) if lo.month == 12 else lo.replace(month=lo.month + 1)
            return lo, hi
        if hh is None:
            lo = datetime(int(year), int(month), int(day), tzinfo=UTC)
            return lo, lo + timedelta(days=1)
        lo = datetime(int(year), int(month), int(day), int(hh), int(mm), int(ss or 0), tzinfo=tzinfo)
        if frac:
            lo = lo.replace(microsecond=int(float(frac) * 1_000_000))
            step = timedelta(microseconds=1)
        elif ss is not None:
            step = timedelta(seconds=1)
        else:
            step = timedelta(minutes=1)
        lo = lo.astimezone(UTC)
        return lo, lo + step
    except ValueError:
        return None


def _date_matches(prefix: str, p: tuple[datetime, datetime], t: tuple[datetime, datetime]) -> bool:
    """FHIR date comparison (R4 3.1.1.4.2.1) between search range p and target range t."""
    contained = p[0] <= t[0] and t[1] <= p[1]
    if prefix == "eq":
        return contained
    if prefix == "ne":
        return not contained
    if prefix == "gt":
        return t[1] > p[1]
    if prefix == "lt":
        return t[0] < p[0]
    if prefix == "ge":
        return t[1] > p[1] or contained
    if prefix == "le":
        return t[0] < p[0] or contained
    if prefix == "sa":
        return t[0] >= p[1]
    if prefix == "eb":
        return t[1] <= p[0]
    if prefix == "ap":
        return t[0] < p[1] and p[0] < t[1]
    return False


def _token_matches(value: Any, system: str | None, code: str) -> bool:
    """Token match on a code string, Coding, CodeableConcept or Identifier. system None = any system."""
    if isinstance(value, str):
        return value == code and not system
    if isinstance(value, bool):
        return str(value).lower() == code
    if not isinstance(value, dict):
        return False
    if "coding" in value:
        return any(_token_matches(c, system, code) for c in value.get("coding") or [])
    if "value" in value and "code" not in value:  # Identifier
        if system is not None and (value.get("system") or "") != system:
            return False
        return not code or value.get("value") == code
    if system is not None and (value.get("system") or "") != system:
        return False
    return not code or value.get("code") == code


def _split_token(raw: str) -> tuple[str | None, str]:
    if "|" in raw:
        system, code = raw.split("|", 1)
        return system, code
    return None, raw


def ref_key(reference: str) -> str:
    """Normalize a reference (relative or absolute URL) to `Type/id`."""
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else parts[-1]


def _ref_matches(value: Any, wanted: str, target_type: str | None = None) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return False
    key = ref_key(value["reference"])
    if "/" in wanted:
        return key == ref_key(wanted)
    rtype, _, rid = key.rpartition("/")
    return rid == wanted and (target_type is None or rtype == target_type)


def _compartment_patient(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for name in COMPARTMENT_FIELDS:
        value = resource.get(name)
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            key = ref_key(value["reference"])
            if key.startswith("Patient/"):
                return key.split("/", 1)[1]
    return None


# ----------------------------------------------------------------------------------------------- loading


def _rewrite_refs(obj: Any, mapping: dict[str, str], conditional: dict[str, str]) -> None:
    """Replace `urn:uuid:` (and conditional `Type?identifier=`) references in place."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "reference" and isinstance(value, str):
                    if value.startswith("urn:"):
                        new = mapping.get(value)
                        if new:
                            item[key] = new
                    elif "?" in value and conditional:
                        new = conditional.get(value)
                        if new:
                            item[key] = new
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, dict | list))


def _read_json(path: Path) -> Any:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        return json.loads(fh.read())


def _bundle_files(directory: Path) -> list[Path]:
    if directory.is_file():
        return [directory]
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith((".json", ".json.gz")))


def _collect(doc: Any, out: list[dict[str, Any]], mapping: dict[str, str]) -> None:
    if not isinstance(doc, dict):
        return
    if not isinstance(doc.get("resourceType"), str):
        return  # metadata files beside the bundles (the demo ward's ward.json, answer_key.json) are not FHIR
    if doc.get("resourceType") != "Bundle":
        out.append(doc)
        return
    for entry in doc.get("entry") or []:
        resource = entry.get("resource")
        if not isinstance(resource, dict) or "resourceType" not in resource:
            continue
        full_url = entry.get("fullUrl") or ""
        if "id" not in resource:
            request_url = (entry.get("request") or {}).get("url") or ""
            if re.fullmatch(r"[A-Za-z]+/[A-Za-z0-9\-.]{1,64}", request_url):
                resource["id"] = request_url.split("/", 1)[1]
            elif full_url.startswith("urn:uuid:"):
                resource["id"] = full_url[len("urn:uuid:") :]
            else:
                resource["id"] = str(uuid.uuid4())
        if full_url.startswith("urn:"):
            mapping[full_url] = f"{resource['resourceType']}/{resource['id']}"
        out.append(resource)


def _conditional_index(resources: list[dict[str, Any]], wanted: set[str]) -> dict[str, str]:
    """Map `Type?identifier=system|value` strings seen in references to the matching `Type/id`."""
    if not wanted:
        return {}
    result: dict[str, str] = {}
    by_ident: dict[tuple[str, str], str] = {}
    for res in resources:
        for ident in res.get("identifier") or []:
            if isinstance(ident, dict) and "value" in ident:
                by_ident[(res["resourceType"], f"{ident.get('system', '')}|{ident['value']}")] = res["id"]
    for ref in wanted:
        m = re.fullmatch(r"([A-Za-z]+)\?identifier=(.*)", ref)
        if m:
            rid = by_ident.get((m.group(1), unquote(m.group(2))))
            if rid:
                result[ref] = f"{m.group(1)}/{rid}"
    return result


def _find_conditional_refs(resources: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()
    stack: list[Any] = list(resources)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "reference" and isinstance(value, str) and "?identifier=" in value:
                    found.add(value)
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def load_resources(
    data_dir: str | Path | None = None, resources: Iterable[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Read bundles (.json / .json.gz) and loose resources, resolving urn:uuid references to `Type/id`."""
    out: list[dict[str, Any]] = []
    mapping: dict[str, str] = {}
    if data_dir is not None:
        directory = Path(data_dir)
        if not directory.exists():
            raise FileNotFoundError(
                f"FHIR data directory {directory} does not exist; pass a directory of Bundles"
            )
        for path in _bundle_files(directory):
            _collect(_read_json(path), out, mapping)
    for resource in resources or ():
        _collect(json.loads(json.dumps(resource)), out, mapping)  # deep copy: callers keep their dicts
    for resource in out:
        resource.setdefault("id", str(uuid.uuid4()))
    conditional = _conditional_index(out, _find_conditional_refs(out))
    for resource in out:
        _rewrite_refs(resource, mapping, conditional)
    return out


_DIR_CACHE: dict[tuple[str, tuple[tuple[str, float], ...]], list[dict[str, Any]]] = {}
_DIR_CACHE_LOCK = threading.Lock()


def _load_dir_cached(data_dir: str | Path) -> list[dict[str, Any]]:
    """Load a bundle directory once per process; resources are shared read-only between servers."""
    directory = Path(data_dir).resolve()
    if not directory.exists():
        raise FileNotFoundError(
            f"FHIR data directory {directory} does not exist; pass a directory of Bundles"
        )
    signature = tuple((p.name, p.stat().st_mtime) for p in _bundle_files(directory))
    key = (str(directory), signature)
    with _DIR_CACHE_LOCK:
        if key not in _DIR_CACHE:
            _DIR_CACHE[key] = load_resources(directory)
        return _DIR_CACHE[key]


# ----------------------------------------------------------------------------------------------- store


class FhirStore:
    """Resources indexed by type/id and by patient compartment."""

    def __init__(self) -> None:
        self.by_type: dict[str, dict[str, dict[str, Any]]] = {}
        self.compartments: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.lock = threading.RLock()

    def add(self, resource: dict[str, Any]) -> None:
        rtype, rid = resource["resourceType"], resource["id"]
        with self.lock:
            bucket = self.by_type.setdefault(rtype, {})
            old = bucket.get(rid)
            bucket[rid] = resource
            pid = _compartment_patient(resource)
            if pid is not None:
                per_type = self.compartments.setdefault(pid, {}).setdefault(rtype, [])
                if old is not None:
                    per_type[:] = [r for r in per_type if r.get("id") != rid]
                per_type.append(resource)

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None:
        return self.by_type.get(rtype, {}).get(rid)

    def count(self) -> int:
        return sum(len(v) for v in self.by_type.values())

    def compartment(self, pid: str, types: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Patient first, then the other compartment resources in load order."""
        comp = self.compartments.get(pid, {})
        wanted = set(types) if types is not None else None
        result: list[dict[str, Any]] = []
        if (wanted is None or "Patient" in wanted) and "Patient" in comp:
            result.extend(comp["Patient"])
        for rtype, items in comp.items():
            if rtype != "Patient" and (wanted is None or rtype in wanted):
                result.extend(items)
        return result


# ----------------------------------------------------------------------------------------------- faults

FAULT_KINDS = ("latency", "status", "timeout", "truncated", "outcome", "html", "drop")


@dataclass
class Fault:
    """One injected fault. `remaining` None means forever; `hits` counts applications."""

    kind: str
    path: re.Pattern[str] | None
    remaining: int | None
    params: dict[str, Any]
    method: str | None = None
    hits: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path is None or self.path.search(target) is not None


class FaultSet:
    """Thread-safe list of faults consulted on every request, in the order added."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(
        self,
        kind: str,
        path: str | None = None,
        count: int | None = None,
        *,
        method: str | None = None,
        **params: Any,
    ) -> Fault:
        """Inject `kind` for requests whose path+query matches regex `path` (None = all), `count` times.

        Params by kind: latency(ms), status(status, retry_after, diagnostics), timeout(seconds),
        truncated(mode="body"|"connection"), outcome(status, severity, code, diagnostics),
        html(status), drop().
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {', '.join(FAULT_KINDS)}")
        if kind == "latency" and "ms" not in params:
            raise ValueError("latency fault needs ms=<milliseconds>")
        if kind == "status" and "status" not in params:
            raise ValueError("status fault needs status=<HTTP status>, e.g. status=503")
        fault = Fault(kind, re.compile(path) if path else None, count, params, method)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def __len__(self) -> int:
        return len(self._faults)

    def take(self, method: str, target: str) -> tuple[float, Fault | None]:
        """Total latency (ms) of matching latency faults and the first matching other fault, consumed."""
        latency = 0.0
        chosen: Fault | None = None
        with self._lock:
            for fault in self._faults:
                if not fault.matches(method, target):
                    continue
                if fault.kind == "latency":
                    latency += float(fault.params["ms"])
                elif chosen is None:
                    chosen = fault
                else:
                    continue
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
        return latency, chosen


@dataclass
class RequestRecord:
    """One request as the server saw it (no headers are kept, so no tokens end up in the log)."""

    method: str
    path: str
    query: dict[str, list[str]]
    time: float
    thread: str
    target: str = ""
    has_auth: bool = False
    status: int | None = None
    fault: str | None = None
    ignored_params: list[str] = field(default_factory=list)
    duration: float | None = None

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


# ----------------------------------------------------------------------------------------------- keys


class KeyPair(NamedTuple):
    private_pem: str
    public_pem: str
    jwk: dict[str, Any]


def make_keypair(alg: str = "RS384") -> KeyPair:
    """Fresh key pair for SMART Backend Services tests: (private_pem, public_pem, public jwk with kid/alg)."""
    if alg == "RS384":
        private_key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    elif alg == "ES384":
        private_key = ec.generate_private_key(ec.SECP384R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key()))
    else:
        raise ValueError(f"unsupported alg {alg!r}; SMART Backend Services uses RS384 or ES384")
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    kid = base64.urlsafe_b64encode(hashlib.sha256(public_der).digest()[:12]).decode().rstrip("=")
    jwk.update({"alg": alg, "kid": kid, "use": "sig", "key_ops": ["verify"]})
    return KeyPair(private_pem, public_pem, jwk)


def make_client_assertion(
    private_pem: str,
    client_id: str,
    token_url: str,
    *,
    alg: str = "RS384",
    kid: str | None = None,
    lifetime: int = 240,
    jti: str | None = None,
    **claims: Any,
) -> str:
    """Signed client_assertion JWT as a SMART backend client would send it; `claims` override defaults."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": now + lifetime,
        "jti": jti or secrets.token_hex(16),
    }
    payload.update(claims)
    headers = {"typ": "JWT", **({"kid": kid} if kid else {})}
    return jwt.encode(payload, private_pem, algorithm=alg, headers=headers)


def _public_keys(spec: Any) -> list[tuple[str | None, Any]]:
    """(kid, key) pairs from a PEM string/bytes, a JWK dict or a JWKS dict."""
    if isinstance(spec, bytes | str):
        data = spec.encode() if isinstance(spec, str) else spec
        if data.lstrip().startswith(b"{"):
            return _public_keys(json.loads(data))
        return [(None, serialization.load_pem_public_key(data))]
    if isinstance(spec, dict) and "keys" in spec:
        return [k for item in spec["keys"] for k in _public_keys(item)]
    if isinstance(spec, dict):
        return [(spec.get("kid"), jwt.PyJWK(spec).key)]
    raise TypeError("client key must be a PEM public key, a JWK dict or a JWKS dict")


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


# ----------------------------------------------------------------------------------------------- server


@dataclass
class ExportJob:
    request_url: str
    transaction_time: str
    files: dict[str, tuple[str, list[dict[str, Any]]]]  # file name -> (type, resources)
    polls_remaining: int
    total_polls: int
    errors: dict[str, tuple[str, list[dict[str, Any]]]] = field(
        default_factory=dict
    )  # manifest `error` files
    expired: set[str] = field(default_factory=set)  # file names that answer 410 Gone


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not delay stop()
    allow_reuse_address = True
    owner: FhirTestServer


class FhirTestServer:
    """FHIR R4 server on 127.0.0.1 serving in-memory resources (JSON only).

    Endpoints (relative to `base_url`, i.e. http://127.0.0.1:PORT/fhir): `metadata`, `{type}/{id}`,
    `{type}?...` and `POST {type}/_search`, `?_getpages=` paging, `Patient/{id}/$everything`, `$export`,
    `Patient/$export`, `$export-poll-status/{job}` (GET/DELETE), `$export-file/{job}/{name}`,
    `.well-known/smart-configuration`. Token endpoint: `token_url` (http://127.0.0.1:PORT/auth/token).

    Args: data_dir (directory or file of Bundles, .json/.json.gz), resources (iterable of resource dicts),
    port (0 = ephemeral), base_path, everything (serve/advertise Patient/$everything), bulk_export
    (serve/advertise $export; defaults to `everything`), auth (None | "smart" | "bearer:TOKEN"), clients
    (client_id -> PEM public key, JWK or JWKS), token_lifetime (s), latency_ms (added to every request),
    default_count/max_count (page sizes), export_polls (202 answers before the manifest),
    export_retry_after (s), export_max_lines (split ndjson files), search_cache_size (paging states kept).

    Real-server behaviours (issue 14), all attributes a test may also set on a running server:
    unserved_types (absent from the CapabilityStatement, searches answer 404, an $export asking for them
    answers 400 with an OperationOutcome naming them), advertise_unserved (list them anyway, as servers that
    refuse at export time do), export_file_names ("type": Patient.ndjson | "numbered": 1.Patient.ndjson),
    export_errors (diagnostics: one manifest `error` file of OperationOutcomes each), export_expired (types whose
    files answer 410 Gone), export_duplicates (types served twice: a second file with every resource again, a
    newer meta.lastUpdated); `forget_export_jobs()` drops every job as a restarted server would.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        resources: Iterable[dict[str, Any]] | None = None,
        *,
        port: int = 0,
        base_path: str = "/fhir",
        everything: bool = True,
        bulk_export: bool | None = None,
        auth: str | None = None,
        clients: dict[str, Any] | None = None,
        token_lifetime: int = 300,
        latency_ms: float = 0,
        default_count: int = 50,
        max_count: int = 500,
        export_polls: int = 2,
        export_retry_after: int = 1,
        export_max_lines: int | None = None,
        search_cache_size: int = 2000,
        unserved_types: Iterable[str] = (),
        advertise_unserved: bool = False,
        export_file_names: str = "type",
        export_errors: Iterable[str] = (),
        export_expired: Iterable[str] = (),
        export_duplicates: Iterable[str] = (),
    ) -> None:
        if auth is not None and auth != "smart" and not auth.startswith("bearer:"):
            raise ValueError("auth must be None, 'smart' or 'bearer:<token>'")
        self.store = FhirStore()
        loaded: list[dict[str, Any]] = []
        if data_dir is not None:
            loaded.extend(_load_dir_cached(data_dir))
        if resources is not None:
            loaded.extend(load_resources(None, resources))
        for resource in loaded:
            self.store.add(resource)
        self.port = port
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.everything = everything
        self.bulk_export = everything if bulk_export is None else bulk_export
        self.auth = auth
        self.clients: dict[str, list[tuple[str | None, Any]]] = {
            cid: _public_keys(spec) for cid, spec in (clients or {}).items()
        }
        self.token_lifetime = token_lifetime
        self.latency_ms = latency_ms
        self.default_count = default_count
        self.max_count = max_count
        self.export_polls = export_polls
        self.export_retry_after = export_retry_after
        self.export_max_lines = export_max_lines
        if export_file_names not in ("type", "numbered"):
            raise ValueError("export_file_names must be 'type' or 'numbered'")
        self.unserved_types = set(unserved_types)
        self.advertise_unserved = advertise_unserved
        self.export_file_names = export_file_names
        self.export_errors = list(export_errors)
        self.export_expired = set(export_expired)
        self.export_duplicates = set(export_duplicates)
        self.faults = FaultSet()
        self.requests: list[RequestRecord] = []
        self.ignored_params: Counter[str] = Counter()
        self.max_concurrency = 0
        self._in_flight = 0
        self._stats_lock = threading.Lock()
        self._tokens: dict[str, tuple[float, str, str]] = {}  # token -> (expiry, client_id, scope)
        self._static_token = auth.split(":", 1)[1] if auth and auth.startswith("bearer:") else None
        self._used_jti: dict[tuple[str, str], float] = {}
        self._auth_lock = threading.Lock()
        self._searches: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._search_cache_size = search_cache_size
        self._search_lock = threading.Lock()
        self._jobs: dict[str, ExportJob] = {}
        self._jobs_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    # -- lifecycle

    def start(self) -> FhirTestServer:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"fhir-test-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()  # wakes handlers sleeping in latency/timeout faults
        httpd.shutdown()
        with self._conn_lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + self.base_path

    @property
    def token_url(self) -> str:
        return self.root_url + "/auth/token"

    # -- test controls

    def reset(self) -> None:
        """Clear faults, the request log, concurrency stats, tokens and export jobs (keeps data)."""
        self.faults.clear()
        self.reset_stats()
        with self._auth_lock:
            self._tokens.clear()
        with self._jobs_lock:
            self._jobs.clear()

    def reset_stats(self) -> None:
        with self._stats_lock:
            self.requests.clear()
            self.ignored_params.clear()
            self.max_concurrency = 0

    def revoke_tokens(self) -> None:
        """Invalidate every issued token (and a static bearer token) so the next request gets 401."""
        with self._auth_lock:
            self._tokens.clear()
            self._static_token = None

    def expire_tokens(self) -> None:
        """Mark every issued token as expired (401 with error_description 'token expired')."""
        with self._auth_lock:
            self._tokens = {t: (0.0, c, s) for t, (_, c, s) in self._tokens.items()}

    def expire_searches(self) -> None:
        """Forget paging state so `_getpages` links answer 410 Gone, like an expired HAPI search."""
        with self._search_lock:
            self._searches.clear()

    def add_resources(self, resources: Iterable[dict[str, Any]]) -> None:
        for resource in load_resources(None, resources):
            self.store.add(resource)

    def register_client(self, client_id: str, key: Any) -> None:
        self.clients[client_id] = _public_keys(key)

    def patient_ids(self) -> list[str]:
        return list(self.store.by_type.get("Patient", {}))

    def compartment_count(self, patient_id: str, rtype: str | None = None) -> int:
        return len(self.store.compartment(patient_id, [rtype] if rtype else None))

    # -- internals used by the handler

    def _track(self, delta: int) -> None:
        with self._stats_lock:
            self._in_flight += delta
            self.max_concurrency = max(self.max_concurrency, self._in_flight)

    def _record(self, rec: RequestRecord) -> None:
        with self._stats_lock:
            self.requests.append(rec)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server is stopping; True when interrupted."""
        return self._stopping.wait(seconds) if seconds > 0 else False

    def _issue_token(self, client_id: str, scope: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._auth_lock:
            self._tokens[token] = (time.time() + self.token_lifetime, client_id, scope)
        return token

    def _check_token(self, header: str | None) -> str | None:
        """None when the Authorization header carries a valid token, else the error description."""
        if not header or not header.lower().startswith("bearer "):
            return "missing bearer token"
        token = header[7:].strip()
        with self._auth_lock:
            if self._static_token is not None and secrets.compare_digest(token, self._static_token):
                return None
            entry = self._tokens.get(token)
        if entry is None:
            return "unknown or revoked token"
        if entry[0] <= time.time():
            return "token expired"
        return None

    def _verify_assertion(self, form: dict[str, str], token_urls: set[str]) -> tuple[str, str]:
        """Validate a SMART Backend Services token request; returns (client_id, scope)."""
        if form.get("grant_type") != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError(400, "invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion")
        if not assertion:
            raise OAuthError(400, "invalid_request", "client_assertion is required")
        scope = (form.get("scope") or "").strip()
        if not scope:
            raise OAuthError(400, "invalid_scope", "scope is required (e.g. system/*.read)")
        if any(not s.startswith("system/") for s in scope.split()):
            raise OAuthError(400, "invalid_scope", "backend services only grant system/ scopes")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise OAuthError(400, "invalid_request", f"client_assertion is not a JWT: {exc}") from exc
        if header.get("alg") not in SMART_ALGS:
            raise OAuthError(401, "invalid_client", f"alg must be one of {', '.join(SMART_ALGS)}")
        client_id = str(unverified.get("iss") or "")
        keys = self.clients.get(client_id)
        if not keys:
            raise OAuthError(401, "invalid_client", "unknown client (iss)")
        kid = header.get("kid")
        candidates = [key for k, key in keys if kid is None or k is None or k == kid] or [k for _, k in keys]
        claims: dict[str, Any] | None = None
        last_error = "signature verification failed"
        for key in candidates:
            try:
                claims = jwt.decode(
                    assertion,
                    key,
                    algorithms=list(SMART_ALGS),
                    options={
                        "verify_aud": False,
                        "verify_exp": False,
                        "require": ["iss", "sub", "exp", "jti"],
                    },
                )
                break
            except jwt.InvalidSignatureError:
                last_error = "signature verification failed"
            except jwt.PyJWTError as exc:
                last_error = f"invalid client_assertion: {exc}"
        if claims is None:
            raise OAuthError(401, "invalid_client", last_error)
        if claims.get("sub") != client_id:
            raise OAuthError(401, "invalid_client", "iss and sub must both equal the client_id")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not any(a in token_urls for a in auds):
            raise OAuthError(401, "invalid_client", "aud must be the token endpoint URL")
        now = time.time()
        exp = float(claims["exp"])
        if exp <= now:
            raise OAuthError(401, "invalid_client", "client_assertion expired")
        if exp > now + MAX_ASSERTION_LIFETIME + 5:
            raise OAuthError(401, "invalid_client", "exp must be at most 5 minutes in the future")
        jti_key = (client_id, str(claims["jti"]))
        with self._auth_lock:
            self._used_jti = {k: v for k, v in self._used_jti.items() if v > now - 600}
            if jti_key in self._used_jti:
                raise OAuthError(401, "invalid_client", "jti has already been used")
            self._used_jti[jti_key] = exp
        return client_id, scope

    def _store_search(self, results: list[dict[str, Any]]) -> str:
        token = uuid.uuid4().hex
        with self._search_lock:
            self._searches[token] = results
            while len(self._searches) > self._search_cache_size:
                self._searches.popitem(last=False)
        return token

    def _get_search(self, token: str) -> list[dict[str, Any]] | None:
        with self._search_lock:
            results = self._searches.get(token)
            if results is not None:
                self._searches.move_to_end(token)
            return results

    def search(self, rtype: str, params: dict[str, list[str]]) -> tuple[list[dict[str, Any]], list[str]]:
        """Resources of `rtype` matching `params` (AND across params, comma = OR), and ignored param names."""
        ignored: list[str] = []
        spec = SEARCH_PARAMS.get(rtype, {})
        candidates: list[dict[str, Any]] | None = None
        filters: list[tuple[str, str, list[str]]] = []
        for name, values in params.items():
            base_name = name.split(":", 1)[0]
            if name in RESULT_PARAMS or name.startswith("_getpages"):
                continue
            if ":" in name:
                ignored.append(name)
                continue
            if name == "_id":
                filters.append((name, "_id", values))
            elif name == "patient" and rtype != "Patient":
                wanted = {ref_key(v).split("/")[-1] for value in values for v in value.split(",")}
                if candidates is None and len(values) == 1:
                    # compartment index keeps per-patient searches O(patient) instead of O(type)
                    candidates = [r for pid in wanted for r in self.store.compartment(pid, [rtype])]
                filters.append((name, "patient", values))
            elif name == "subject" and rtype != "Patient":
                filters.append((name, "subject", values))
            elif base_name in spec:
                filters.append((name, spec[base_name][0], values))
            else:
                ignored.append(name)
        if candidates is None:
            candidates = list(self.store.by_type.get(rtype, {}).values())
        results = [r for r in candidates if all(self._match(rtype, r, f) for f in filters)]
        sort = params.get("_sort")
        if sort:
            results = self._sort(rtype, results, sort[-1], ignored)
        return results, ignored

    def _sort(
        self, rtype: str, results: list[dict[str, Any]], spec: str, ignored: list[str]
    ) -> list[dict[str, Any]]:
        for key in reversed(spec.split(",")):
            desc = key.startswith("-")
            name = key.lstrip("-")
            if name == "_id":
                results = sorted(results, key=lambda r: r.get("id", ""), reverse=desc)
                continue
            param = SEARCH_PARAMS.get(rtype, {}).get(name)
            if not param or param[0] != "date":
                ignored.append(f"_sort={key}")
                continue

            def date_key(r: dict[str, Any], paths: list[str] = param[1]) -> datetime:
                for path in paths:
                    for v in _values(r, path):
                        rng = parse_fhir_date(v) if isinstance(v, str) else None
                        if rng:
                            return rng[0]
                return _EARLIEST

            results = sorted(results, key=date_key, reverse=desc)
        return results

    def _match(self, rtype: str, resource: dict[str, Any], flt: tuple[str, str, list[str]]) -> bool:
        name, kind, values = flt
        for value in values:  # repeated parameter = AND
            alternatives = value.split(",")
            if kind == "_id":
                ok = resource.get("id") in alternatives
            elif kind == "patient":
                ok = any(
                    _ref_matches(resource.get(f), alt, "Patient")
                    for f in COMPARTMENT_FIELDS
                    for alt in alternatives
                )
            elif kind == "subject":
                ok = any(_ref_matches(resource.get("subject"), alt) for alt in alternatives)
            else:
                paths = SEARCH_PARAMS[rtype][name][1]
                found = [v for p in paths for v in _values(resource, p)]
                if kind == "token":
                    ok = any(_token_matches(v, *_split_token(alt)) for alt in alternatives for v in found)
                elif kind == "reference":
                    ok = any(_ref_matches(v, alt) for alt in alternatives for v in found)
                elif kind == "string":
                    ok = any(
                        isinstance(v, str) and v.lower().startswith(alt.lower())
                        for alt in alternatives
                        for v in found
                    )
                elif kind == "date":
                    ok = any(self._date_ok(alt, found) for alt in alternatives)
                else:
                    ok = False
            if not ok:
                return False
        return True

    @staticmethod
    def _date_ok(raw: str, found: list[Any]) -> bool:
        prefix = raw[:2] if raw[:2] in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap") else "eq"
        text = raw[2:] if raw[:2] == prefix else raw
        p = parse_fhir_date(text)
        if p is None:
            return False
        for v in found:
            t = parse_fhir_date(v) if isinstance(v, str) else None
            if t and _date_matches(prefix, p, t):
                return True
        return False

    def forget_export_jobs(self) -> None:
        """Drop every export job, as a server restarted mid-export does: their status URLs answer 404."""
        with self._jobs_lock:
            self._jobs.clear()

    def serves(self, rtype: str) -> bool:
        return rtype not in self.unserved_types

    def capability_statement(self, base: str) -> dict[str, Any]:
        types = sorted(set(ADVERTISED_TYPES) | set(self.store.by_type))
        if not self.advertise_unserved:
            types = [t for t in types if self.serves(t)]
        resources = []
        for rtype in types:
            params = [{"name": "_id", "type": "token"}]
            if rtype not in NON_COMPARTMENT_TYPES:
                params += [{"name": "patient", "type": "reference"}, {"name": "subject", "type": "reference"}]
            params += [{"name": n, "type": kind} for n, (kind, _) in SEARCH_PARAMS.get(rtype, {}).items()]
            entry: dict[str, Any] = {
                "type": rtype,
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": params,
            }
            if rtype == "Patient":
                ops = []
                if self.everything:
                    ops.append(
                        {
                            "name": "everything",
                            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                        }
                    )
                if self.bulk_export:
                    ops.append(
                        {
                            "name": "export",
                            "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
                        }
                    )
                if ops:
                    entry["operation"] = ops
            resources.append(entry)
        rest: dict[str, Any] = {"mode": "server", "resource": resources}
        if self.bulk_export:
            rest["operation"] = [
                {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}
            ]
        if self.auth:
            rest["security"] = {
                "service": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                "code": "SMART-on-FHIR",
                            }
                        ]
                    }
                ],
                "extension": [
                    {
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [
                            {"url": "token", "valueUri": base.rsplit(self.base_path, 1)[0] + "/auth/token"}
                        ],
                    }
                ],
            }
        cap: dict[str, Any] = {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": _now_iso(),
            "kind": "instance",
            "software": {"name": "NVA FHIR test server", "version": "1.0"},
            "implementation": {"description": "NVA test server", "url": base},
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json", "json"],
            "rest": [rest],
        }
        if self.bulk_export:
            cap["instantiates"] = ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]
        return cap

    def create_export(self, level: str, types: list[str] | None, request_url: str) -> str:
        if level == "Patient":
            pool = [r for pid in self.store.compartments for r in self.store.compartment(pid)]
        else:
            pool = [r for items in self.store.by_type.values() for r in items.values()]
        by_type: dict[str, list[dict[str, Any]]] = {}
        for resource in pool:
            if not self.serves(resource["resourceType"]):
                continue
            if types is None or resource["resourceType"] in types:
                by_type.setdefault(resource["resourceType"], []).append(resource)
        files: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        numbered = 0
        for rtype in sorted(by_type):
            items = by_type[rtype]
            size = self.export_max_lines or len(items)
            chunks = [items[i : i + size] for i in range(0, len(items), size)]
            if rtype in self.export_duplicates:  # the same resources again, updated later: newest must win
                chunks.append([_touched(r) for r in items])
            for n, chunk in enumerate(chunks):
                numbered += 1
                if self.export_file_names == "numbered":
                    name = f"{numbered}.{rtype}.ndjson"
                else:
                    name = f"{rtype}.ndjson" if len(chunks) == 1 else f"{rtype}.{n + 1}.ndjson"
                files[name] = (rtype, chunk)
        errors = {
            f"error-{n + 1}.ndjson": ("OperationOutcome", [outcome("error", "processing", text)])
            for n, text in enumerate(self.export_errors)
        }
        job_id = uuid.uuid4().hex
        with self._jobs_lock:
            self._jobs[job_id] = ExportJob(
                request_url,
                _now_iso(),
                files,
                self.export_polls,
                self.export_polls,
                errors,
                {name for name, (rtype, _) in files.items() if rtype in self.export_expired},
            )
        return job_id


# ----------------------------------------------------------------------------------------------- handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "NVAFhirTest/1.0"
    timeout = 60  # idle keep-alive connections
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.owner._conn_lock:
            self.server.owner._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.owner._conn_lock:
                self.server.owner._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # paths carry patient ids: keep them out of logs

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing

    @property
    def app(self) -> FhirTestServer:
        return self.server.owner

    def _host_root(self) -> str:
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.app.port}'}"

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self._status = self._rec.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (ConnectionError, OSError):
            self.close_connection = True

    def _json(
        self, status: int, doc: Any, headers: dict[str, str] | None = None, content_type: str = FHIR_JSON
    ) -> None:
        self._send(status, json.dumps(doc).encode(), content_type, headers)

    def _oo(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, outcome("error", code, diagnostics), headers)

    def _drop(self) -> None:
        self._status = None
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self, method: str) -> None:
        app = self.app
        app._track(+1)
        started = time.time()
        split = urlsplit(self.path)
        path = unquote(split.path)
        query = parse_qs(split.query, keep_blank_values=True)
        rec = RequestRecord(
            method=method,
            path=path,
            query=query,
            time=started,
            thread=threading.current_thread().name,
            target=self.path,
            has_auth="Authorization" in self.headers,
        )
        self._status: int | None = None
        self._rec = rec
        app._record(rec)  # logged before answering so a client never sees a response the log lacks
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        try:
            latency, fault = app.faults.take(method, self.path)
            latency += app.latency_ms
            if latency and app._sleep(latency / 1000):
                self._drop()
                return
            if fault is not None:
                rec.fault = fault.kind
                if self._apply_fault(fault, method, path, query, body):
                    return
            self._route(method, path, query, body)
        except Exception as exc:  # a test server must answer, not hang the client
            log.exception("fhir test server error")
            self._oo(500, "exception", f"test server error: {type(exc).__name__}")
        finally:
            rec.duration = time.time() - started
            app._track(-1)

    def _apply_fault(
        self, fault: Fault, method: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> bool:
        """Apply a non-latency fault; True when the response has been handled."""
        p = fault.params
        if fault.kind == "status":
            headers = {}
            if p.get("retry_after") is not None:
                headers["Retry-After"] = str(p["retry_after"])
            status = int(p["status"])
            self._oo(
                status,
                "transient" if status >= 500 or status == 429 else "processing",
                p.get("diagnostics", f"injected HTTP {status}"),
                headers,
            )
            return True
        if fault.kind == "timeout":
            if self.app._sleep(float(p.get("seconds", 30))):
                self._drop()
                return True
            return False  # answer normally, late
        if fault.kind == "outcome":
            doc = outcome(
                p.get("severity", "error"), p.get("code", "processing"), p.get("diagnostics", "injected")
            )
            self._json(int(p.get("status", 400)), doc)
            return True
        if fault.kind == "html":
            page = (
                b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><h1>Service unavailable</h1>"
                b"<p>Please sign in to continue.</p></body></html>"
            )
            self._send(int(p.get("status", 200)), page, "text/html; charset=utf-8")
            return True
        if fault.kind == "drop":
            self._drop()
            return True
        if fault.kind == "truncated":
            captured: dict[str, Any] = {}
            real_send = self._send

            def capture(
                status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
            ) -> None:
                captured.update(status=status, data=data, content_type=content_type, headers=headers)

            self._send = capture  # type: ignore[method-assign]
            try:
                self._route(method, path, query, body)
            finally:
                self._send = real_send  # type: ignore[method-assign]
            data = captured.get("data", b"{}")
            half = data[: max(1, len(data) // 2)]
            if p.get("mode", "body") == "connection":
                self._status = self._rec.status = 200
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", captured.get("content_type", FHIR_JSON))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(half)
                    self.wfile.flush()
                except OSError:
                    pass
                self._drop()
                self._status = self._rec.status = 200
            else:
                self._send(200, half, captured.get("content_type", FHIR_JSON), captured.get("headers"))
            return True
        return False

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        app = self.app
        root = self._host_root()
        if path == "/auth/token":
            if method != "POST":
                self._json(
                    405,
                    {"error": "invalid_request", "error_description": "use POST"},
                    content_type="application/json",
                )
                return
            self._token(body, root)
            return
        if path in ("/.well-known/smart-configuration", app.base_path + "/.well-known/smart-configuration"):
            self._json(200, self._smart_config(root), content_type="application/json")
            return
        if app.base_path and not (path == app.base_path or path.startswith(app.base_path + "/")):
            self._oo(404, "not-found", "not a FHIR endpoint; the FHIR base is " + app.base_path)
            return
        rel = path[len(app.base_path) :].strip("/")
        base = root + app.base_path
        parts = rel.split("/") if rel else []
        if parts == ["metadata"]:
            self._json(200, app.capability_statement(base))
            return
        if app.auth:
            problem = app._check_token(self.headers.get("Authorization"))
            if problem:
                challenge = f'Bearer realm="fhir", error="invalid_token", error_description="{problem}"'
                self._oo(401, "login", f"authentication required: {problem}", {"WWW-Authenticate": challenge})
                return
        if method == "POST" and len(parts) == 2 and parts[1] == "_search":
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
            merged = {**query, **{k: query.get(k, []) + v for k, v in form.items()}}
            self._search(parts[0], merged, base, root)
            return
        if method == "DELETE" and len(parts) == 2 and parts[0] == "$export-poll-status":
            self._export_cancel(parts[1])
            return
        if method != "GET":
            self._oo(405, "not-supported", f"{method} is not supported by this read-only test server")
            return
        if not parts:
            if "_getpages" in query:
                self._page(query, base, root)
            else:
                self._oo(400, "not-supported", "system-level search is not supported; search a resource type")
            return
        if parts[0] == "$export" and len(parts) == 1 or parts[:1] == ["Patient"] and parts[1:] == ["$export"]:
            self._export_kickoff("system" if len(parts) == 1 else "Patient", query, root)
            return
        if parts[0] == "$export-poll-status" and len(parts) == 2:
            self._export_status(parts[1], base)
            return
        if parts[0] == "$export-file" and len(parts) == 3:
            self._export_file(parts[1], parts[2])
            return
        rtype = parts[0]
        if rtype not in R4_TYPES:
            self._oo(404, "not-supported", f"Unknown resource type '{rtype}'")
            return
        if not app.serves(rtype):
            self._oo(404, "not-supported", f"Resource type {rtype} is not available on this server")
            return
        if len(parts) == 1:
            self._search(rtype, query, base, root)
        elif len(parts) == 2 and not parts[1].startswith("$"):
            resource = app.store.get(rtype, parts[1])
            if resource is None:
                self._oo(404, "not-found", f"Resource {rtype}/{parts[1]} is not known")
            else:
                self._json(200, resource)
        elif len(parts) == 3 and rtype == "Patient" and parts[2] == "$everything":
            self._everything(parts[1], query, base, root)
        else:
            self._oo(400, "not-supported", f"operation {'/'.join(parts[1:])} is not supported")

    # -- FHIR endpoints

    def _count(self, query: dict[str, list[str]]) -> int:
        app = self.app
        raw = (query.get("_count") or [""])[-1]
        try:
            count = int(raw) if raw else app.default_count
        except ValueError:
            count = app.default_count
        return max(0, min(count, app.max_count))

    def _bundle(
        self,
        results: list[dict[str, Any]],
        offset: int,
        count: int,
        base: str,
        root: str,
        token: str | None,
    ) -> dict[str, Any]:
        page = results[offset : offset + count]
        links = [{"relation": "self", "url": root + self.path}]
        if token is not None and offset + count < len(results) and count > 0:
            nxt = f"{base}?_getpages={token}&_getpagesoffset={offset + count}&_count={count}&_bundletype=searchset"
            links.append({"relation": "next", "url": nxt})
        if token is not None and offset > 0:
            prev = f"{base}?_getpages={token}&_getpagesoffset={max(0, offset - count)}&_count={count}&_bundletype=searchset"
            links.append({"relation": "previous", "url": prev})
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": uuid.uuid4().hex,
            "meta": {"lastUpdated": _now_iso()},
            "type": "searchset",
            "total": len(results),
            "link": links,
        }
        if page:
            bundle["entry"] = [
                {
                    "fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in page
            ]
        return bundle

    def _search(self, rtype: str, query: dict[str, list[str]], base: str, root: str) -> None:
        app = self.app
        results, ignored = app.search(rtype, query)
        if ignored:
            self._rec.ignored_params = ignored
            with app._stats_lock:
                app.ignored_params.update(f"{rtype}:{name}" for name in ignored)
        if (query.get("_summary") or [""])[-1] == "count":
            self._json(
                200,
                {
                    "resourceType": "Bundle",
                    "type": "searchset",
                    "total": len(results),
                    "link": [{"relation": "self", "url": root + self.path}],
                },
            )
            return
        count = self._count(query)
        token = app._store_search(results) if 0 < count < len(results) else None
        self._json(200, self._bundle(results, 0, count, base, root, token))

    def _page(self, query: dict[str, list[str]], base: str, root: str) -> None:
        token = query["_getpages"][-1]
        results = self.app._get_search(token)
        if results is None:
            self._oo(410, "processing", "search expired or unknown; run the search again")
            return
        try:
            offset = max(0, int((query.get("_getpagesoffset") or ["0"])[-1]))
        except ValueError:
            self._oo(400, "invalid", "_getpagesoffset must be an integer")
            return
        self._json(200, self._bundle(results, offset, self._count(query), base, root, token))

    def _everything(self, pid: str, query: dict[str, list[str]], base: str, root: str) -> None:
        app = self.app
        if not app.everything:
            self._oo(400, "not-supported", "Patient/$everything is not supported by this server")
            return
        if app.store.get("Patient", pid) is None:
            self._oo(404, "not-found", f"Resource Patient/{pid} is not known")
            return
        types = None
        if query.get("_type"):
            types = [t for v in query["_type"] for t in v.split(",") if t]
        results = [r for r in app.store.compartment(pid, types) if app.serves(r["resourceType"])]
        count = self._count(query)
        token = app._store_search(results) if len(results) > count else None
        self._json(200, self._bundle(results, 0, count, base, root, token))

    def _smart_config(self, root: str) -> dict[str, Any]:
        return {
            "issuer": root,
            "token_endpoint": root + "/auth/token",
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(SMART_ALGS),
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": ["system/*.read", "system/*.rs"],
            "capabilities": ["client-confidential-asymmetric"],
        }

    def _token(self, body: bytes, root: str) -> None:
        app = self.app
        form = {
            k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()
        }
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if app.auth != "smart":
            self._json(
                400,
                {"error": "unsupported_grant_type", "error_description": "this server has no SMART auth"},
                headers,
                "application/json",
            )
            return
        try:
            client_id, scope = app._verify_assertion(form, {root + "/auth/token", app.token_url})
        except OAuthError as err:
            self._json(
                err.status,
                {"error": err.error, "error_description": err.description},
                headers,
                "application/json",
            )
            return
        token = app._issue_token(client_id, scope)
        doc = {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": app.token_lifetime,
            "scope": scope,
        }
        self._json(200, doc, headers, "application/json")

    # -- bulk data

    def _export_kickoff(self, level: str, query: dict[str, list[str]], root: str) -> None:
        app = self.app
        if not app.bulk_export:
            self._oo(400, "not-supported", "$export is not supported by this server")
            return
        if "respond-async" not in (self.headers.get("Prefer") or ""):
            self._oo(400, "invalid", "bulk export requires the header Prefer: respond-async")
            return
        fmt = (query.get("_outputFormat") or ["application/fhir+ndjson"])[-1]
        if fmt not in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
            self._oo(400, "invalid", f"_outputFormat {fmt} is not supported; use application/fhir+ndjson")
            return
        types = [t for v in query.get("_type", []) for t in v.split(",") if t] or None
        refused = [t for t in types or [] if not app.serves(t)]
        if refused:
            doc = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "error",
                        "code": "not-supported",
                        "diagnostics": f'The requested resource type "{t}" is not available on this server',
                    }
                    for t in refused
                ],
            }
            self._json(400, doc)
            return
        job_id = app.create_export(level, types, root + self.path)
        status_url = f"{root}{app.base_path}/$export-poll-status/{job_id}"
        self._json(
            202, outcome("information", "informational", "export started"), {"Content-Location": status_url}
        )

    def _export_status(self, job_id: str, base: str) -> None:
        app = self.app
        with app._jobs_lock:
            job = app._jobs.get(job_id)
            if job is not None and job.polls_remaining > 0:
                job.polls_remaining -= 1
                done = job.total_polls - job.polls_remaining
                progress = f"{int(100 * done / (job.total_polls + 1))}% complete"
                pending = True
            else:
                pending = False
        if job is None:
            self._oo(404, "not-found", "export job unknown or cancelled")
            return
        if pending:
            self._send(
                202, b"", FHIR_JSON, {"X-Progress": progress, "Retry-After": str(app.export_retry_after)}
            )
            return
        manifest = {
            "transactionTime": job.transaction_time,
            "request": job.request_url,
            "requiresAccessToken": app.auth is not None,
            "output": [
                {"type": rtype, "url": f"{base}/$export-file/{job_id}/{name}", "count": len(items)}
                for name, (rtype, items) in job.files.items()
            ],
            "error": [
                {"type": "OperationOutcome", "url": f"{base}/$export-file/{job_id}/{name}"}
                for name in job.errors
            ],
        }
        self._json(200, manifest, content_type="application/json")

    def _export_cancel(self, job_id: str) -> None:
        app = self.app
        with app._jobs_lock:
            job = app._jobs.pop(job_id, None)
        if job is None:
            self._oo(404, "not-found", "export job unknown or already cancelled")
        else:
            self._json(202, outcome("information", "informational", "export cancelled"))

    def _export_file(self, job_id: str, name: str) -> None:
        app = self.app
        with app._jobs_lock:
            job = app._jobs.get(job_id)
        found = (job.files.get(name) or job.errors.get(name)) if job is not None else None
        if job is None or found is None or job.polls_remaining > 0:
            self._oo(404, "not-found", "export file unknown")
            return
        if name in job.expired:
            self._oo(410, "expired", "this export file has expired; start a new export")
            return
        lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in found[1])
        self._send(200, lines.encode(), NDJSON)


def start_server(data_dir: str | Path | None = SYNTHEA_DIR, **kwargs: Any) -> FhirTestServer:
    """Build and start a server (defaults to the shared Synthea set); the caller must call stop().

    A pytest fixture (tests/conftest.py) should look like::

        @pytest.fixture(scope="session")
        def fhir_server():
            server = start_server()               # or start_server(tmp_dir, auth="smart", clients={...})
            yield server
            server.stop()

        @pytest.fixture
        def fhir(fhir_server):
            fhir_server.reset()                   # clean faults, request log, tokens per test
            return fhir_server
    """
    return FhirTestServer(data_dir, **kwargs).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fhir_test_server", description=__doc__)
    parser.add_argument("data_dir", nargs="?", default=str(SYNTHEA_DIR), help="directory of FHIR Bundles")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--everything", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--bulk",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="advertise bulk $export (defaults to --everything)",
    )
    parser.add_argument("--bearer", help="require this static bearer token")
    args = parser.parse_args(argv)
    server = FhirTestServer(
        args.data_dir,
        port=args.port,
        latency_ms=args.latency_ms,
        everything=args.everything,
        bulk_export=args.bulk,
        auth=f"bearer:{args.bearer}" if args.bearer else None,
    ).start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

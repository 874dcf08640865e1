"""Deterministic demo ward: FHIR R4 collection bundles for ward 4B (and two 5A patients) with a planted answer key."""

from __future__ import annotations

import base64
import json
import logging
import random
import tomllib
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
MRN_SYSTEM = "http://nva.example/mrn"
FULL_URL_BASE = "http://nva.example/fhir"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "http://nva.example/demo-ward")

# NEWS2 inputs (documented in docs and the data file header): SpO2 carries the inhaled O2 flow as a component
# (0 L/min = room air), level of consciousness is the ACVPU observable with a text answer.
ACVPU_CODE = ("1104441000000107", "ACVPU (Alert Confusion Voice Pain Unresponsive) scale score")
ACVPU_ANSWERS = {
    "A": ("248234008", "Mentally alert", "Alert"),
    "C": (None, None, "New confusion"),
    "V": (None, None, "Voice"),
    "P": (None, None, "Pain"),
    "U": (None, None, "Unresponsive"),
}
CODE_STATUS_CODE = ("100822-6", "Cardiopulmonary resuscitation orders")
CODE_STATUS_ANSWERS = {
    "full": ("304252001", "For cardiopulmonary resuscitation", "Full code"),
    "dnr": ("304253006", "Not for cardiopulmonary resuscitation", "DNR"),
}
NKA_CODE = ("716186003", "No known allergy")
FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"
# SNOMED CT displays of the precaution codes the demo ward charts (HL7 SANER IsolationPrecautions value set).
ISOLATION_DISPLAY = {
    "409529001": "Contact precautions",
    "409525007": "Respiratory secretion precautions",
    "409524006": "Airborne precautions",
}
INTERPRETATION_DISPLAY = {"H": "High", "L": "Low", "HH": "Critical high", "LL": "Critical low", "N": "Normal"}
MAR_WINDOW_H = 48.0  # administrations are charted for the last 48 h of each order


class DemoWardError(ValueError):
    """The demo ward could not be generated; the message says what to fix."""


@dataclass(frozen=True)
class DemoWardManifest:
    """What generate_demo_ward wrote."""

    outdir: Path
    anchor: datetime
    seed: int
    ward_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]  # bare FHIR ids, in scenario order
    scenario_patients: dict[str, str]  # scenario key -> patient id
    patient_files: tuple[Path, ...]
    locations_file: Path
    answer_key_file: Path
    ward_file: Path


def load_scenarios() -> dict[str, Any]:
    """Parse assistant/data/demo_ward.toml."""
    with resources.files("assistant.data").joinpath("demo_ward.toml").open("rb") as fh:
        return tomllib.load(fh)


def ckd_epi_2021(creatinine_mg_dl: float, age: int, female: bool) -> int:
    """eGFR (mL/min/1.73 m2) by the race-free CKD-EPI 2021 creatinine equation (Inker et al., NEJM 2021)."""
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    ratio = creatinine_mg_dl / kappa
    egfr = 142 * min(ratio, 1.0) ** alpha * max(ratio, 1.0) ** -1.200 * 0.9938**age
    return round(egfr * (1.012 if female else 1.0))


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds")


def _rnd(value: float, decimals: int) -> float | int:
    return int(round(value)) if decimals == 0 else round(value, decimals)


def _cc(system: str | None, code: str | None, display: str | None, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if code:
        out["coding"] = [{"system": system, "code": code, "display": display}]
    if text:
        out["text"] = text
    return out


def _qty(value: float | int, unit: str, ucum: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": ucum}


def _category(code: str, display: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": OBS_CATEGORY, "code": code, "display": display}]}]


def _ref(rtype: str, rid: str, display: str | None = None) -> dict[str, str]:
    out = {"reference": f"{rtype}/{rid}"}
    if display:
        out["display"] = display
    return out


class _PatientBuilder:
    """Builds one patient's resources; all randomness comes from a Random seeded by (seed, scenario key)."""

    def __init__(self, spec: dict[str, Any], data: dict[str, Any], anchor: datetime, seed: int) -> None:
        self.spec = spec
        self.data = data
        self.anchor = anchor
        self.seed = seed
        self.key = spec["key"]
        # seeded for reproducible demo data, not for security
        self.rng = random.Random(f"nva-demo|{seed}|{self.key}")  # noqa: S311
        self.day0 = anchor - timedelta(hours=7)  # clock grid: the anchor day's start for a 07:00 anchor
        self.admit_h = float(spec["admit_h"])
        self.female = spec["sex"] == "F"
        self.resources: list[dict[str, Any]] = []
        self.tags: dict[str, str] = {}
        self.pid = self.id("Patient", "")
        self.enc_id = self.id("Encounter", "")
        self.ward_id = spec["ward"]
        self.bed_id = f"{spec['ward']}-bed-{int(spec['bed']):02d}"
        self.units: dict[str, str] = dict(spec.get("units", {}))
        self.base: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------------------------------------
    def id(self, rtype: str, local: str) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{self.seed}|{self.key}|{rtype}|{local}"))

    def at(self, hours_ago: float) -> datetime:
        return self.anchor - timedelta(hours=hours_ago)

    def hours_ago(self, dt: datetime) -> float:
        return (self.anchor - dt).total_seconds() / 3600.0

    def subject(self) -> dict[str, str]:
        return _ref("Patient", self.pid)

    def encounter(self) -> dict[str, str]:
        return _ref("Encounter", self.enc_id)

    def add(self, resource: dict[str, Any], tag: str | None = None) -> dict[str, Any]:
        self.resources.append(resource)
        if tag:
            self.tags[tag] = f"{resource['resourceType']}/{resource['id']}"
        return resource

    # -- build -----------------------------------------------------------------------------------------------------
    def build(self) -> list[dict[str, Any]]:
        self._patient()
        conditions = self._conditions()
        self._encounter(conditions)
        self._allergies()
        self._code_status()
        self._isolation()
        self._orders()
        self._labs()
        self._vitals()
        self._assessments()
        self._notes()
        late = [r for r in self.resources if self._latest_time(r) > self.anchor]
        if late:
            raise DemoWardError(
                f"scenario {self.key}: {len(late)} resources dated after the anchor; fix the hours in demo_ward.toml"
            )
        return self.resources

    def _latest_time(self, res: dict[str, Any]) -> datetime:
        stamps = [
            res.get(k) for k in ("effectiveDateTime", "authoredOn", "recordedDate", "date", "onsetDateTime")
        ]
        period = res.get("effectivePeriod") or res.get("period") or {}
        stamps += [period.get("start"), period.get("end")]
        parsed = [datetime.fromisoformat(s) for s in stamps if isinstance(s, str) and "T" in s]
        return max(parsed, default=self.anchor)

    def _patient(self) -> None:
        spec = self.spec
        age = int(spec["age"])
        year = self.anchor.year - age
        bd = date(year, 1, 1) + timedelta(days=self.rng.randrange(0, 365))
        if bd.month == 2 and bd.day == 29:
            bd = bd.replace(day=28)
        if (bd.month, bd.day) > (self.anchor.month, self.anchor.day):
            bd = bd.replace(year=year - 1)
        mrn = str(self.rng.randrange(1_000_000, 9_999_999))
        self.add(
            {
                "resourceType": "Patient",
                "id": self.pid,
                "identifier": [
                    {
                        "use": "usual",
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                    "code": "MR",
                                    "display": "Medical record number",
                                }
                            ]
                        },
                        "system": MRN_SYSTEM,
                        "value": mrn,
                    }
                ],
                "active": True,
                "name": [{"use": "official", "family": spec["family"], "given": list(spec["given"])}],
                "gender": "female" if self.female else "male",
                "birthDate": bd.isoformat(),
            }
        )

    def _conditions(self) -> list[str]:
        ids = []
        for i, (code, text) in enumerate(self.spec.get("conditions", [])):
            cid = self.id("Condition", str(i))
            ids.append(cid)
            self.add(
                {
                    "resourceType": "Condition",
                    "id": cid,
                    "clinicalStatus": _cc(
                        "http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"
                    ),
                    "verificationStatus": _cc(
                        "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"
                    ),
                    "category": [
                        _cc(
                            "http://terminology.hl7.org/CodeSystem/condition-category",
                            "encounter-diagnosis",
                            "Encounter Diagnosis",
                        )
                    ],
                    "code": _cc(SNOMED, code, text, text),
                    "subject": self.subject(),
                    "encounter": self.encounter(),
                    "onsetDateTime": _iso(self.at(self.admit_h)),
                    "recordedDate": _iso(self.at(self.admit_h - 0.5)),
                },
                tag=f"condition:{i}",
            )
        return ids

    def _encounter(self, condition_ids: list[str]) -> None:
        wards = self.data["wards"]
        self.add(
            {
                "resourceType": "Encounter",
                "id": self.enc_id,
                "status": "in-progress",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "IMP",
                    "display": "inpatient encounter",
                },
                "subject": self.subject(),
                "period": {"start": _iso(self.at(self.admit_h))},
                "reasonCode": [{"text": self.spec["reason"]}],
                "diagnosis": [
                    {"condition": _ref("Condition", cid), "rank": i + 1}
                    for i, cid in enumerate(condition_ids)
                ],
                "location": [
                    {
                        "location": _ref("Location", self.ward_id, wards[self.ward_id]["name"]),
                        "status": "active",
                    },
                    {
                        "location": _ref(
                            "Location",
                            self.bed_id,
                            f"{wards[self.ward_id]['name']} bed {int(self.spec['bed']):02d}",
                        ),
                        "status": "active",
                    },
                ],
            }
        )

    def _allergies(self) -> None:
        recorded = _iso(self.at(self.admit_h - 0.5))
        common = {
            "clinicalStatus": _cc(
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"
            ),
            "verificationStatus": _cc(
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                "confirmed",
                "Confirmed",
            ),
        }
        if self.spec.get("nka"):
            aid = self.id("AllergyIntolerance", "nka")
            self.add(
                {
                    "resourceType": "AllergyIntolerance",
                    "id": aid,
                    **common,
                    "code": _cc(SNOMED, *NKA_CODE, "No known allergies"),
                    "patient": self.subject(),
                    "recordedDate": recorded,
                },
                tag="allergy:nka",
            )
        for allergy in self.spec.get("allergies", []):
            sub = self.data["substances"][allergy["substance"]]
            rcode, rdisplay = self.data["reactions"][allergy["reaction"]]
            aid = self.id("AllergyIntolerance", allergy["key"])
            self.add(
                {
                    "resourceType": "AllergyIntolerance",
                    "id": aid,
                    **common,
                    "type": allergy.get("type", "allergy"),
                    "category": ["medication"],
                    "criticality": allergy["criticality"],
                    "code": _cc(sub["system"], sub["code"], sub["display"], sub["text"]),
                    "patient": self.subject(),
                    "recordedDate": recorded,
                    "reaction": [
                        {
                            "manifestation": [_cc(SNOMED, rcode, rdisplay, rdisplay)],
                            "severity": allergy["severity"],
                        }
                    ],
                },
                tag=f"allergy:{allergy['key']}",
            )

    def _code_status(self) -> None:
        code, display, text = CODE_STATUS_ANSWERS[self.spec["code_status"]]
        self.add(
            {
                "resourceType": "Observation",
                "id": self.id("Observation", "code-status"),
                "status": "final",
                "code": _cc(LOINC, *CODE_STATUS_CODE, "Code status"),
                "subject": self.subject(),
                "encounter": self.encounter(),
                "effectiveDateTime": _iso(self.at(self.admit_h - 1)),
                "valueCodeableConcept": _cc(SNOMED, code, display, text),
            },
            tag="obs:code_status",
        )

    def _isolation(self) -> None:
        """Isolation precautions as Flags (fhir_codes.toml [isolation]); no randomness, so other data is unchanged."""
        for iso in self.spec.get("isolation", []):
            period = {"start": _iso(self.at(float(iso["start_h"])))}
            if iso.get("end_h") is not None:
                period["end"] = _iso(self.at(float(iso["end_h"])))
            self.add(
                {
                    "resourceType": "Flag",
                    "id": self.id("Flag", iso["key"]),
                    "status": iso.get("status", "active"),
                    "category": [_cc(FLAG_CATEGORY, "clinical", "Clinical")],
                    "code": _cc(SNOMED, iso["code"], ISOLATION_DISPLAY.get(iso["code"]), iso["text"]),
                    "subject": self.subject(),
                    "encounter": self.encounter(),
                    "period": period,
                },
                tag=f"flag:{iso['key']}",
            )

    # -- medications -------------------------------------------------------------------------------------------
    def _medication_concept(self, order: dict[str, Any]) -> dict[str, Any]:
        if "med" not in order:
            return {"text": order["text"]}
        med = self.data["meds"][order["med"]]
        return _cc(RXNORM, med["rxcui"], med["display"], med["text"])

    def _order_fields(self, order: dict[str, Any]) -> dict[str, Any]:
        med = self.data["meds"].get(order.get("med", ""), {})
        fields = {
            k: order.get(k, med.get(k))
            for k in ("route", "dose", "unit", "ucum", "rate", "rate_unit", "rate_ucum")
        }
        fields["name"] = med.get("ingredient") or order["text"]
        return fields

    def _orders(self) -> None:
        for order in self.spec.get("orders", []):
            self._order(order)
        for extra in self.spec.get("extra_admins", []):
            med = self.data["meds"][extra["med"]]
            route = self.data["routes"][med["route"]]
            t = self.at(extra["h"])
            self.add(
                {
                    "resourceType": "MedicationAdministration",
                    "id": self.id("MedicationAdministration", f"extra|{extra['tag']}"),
                    "status": "completed",
                    "category": _cc(
                        "http://terminology.hl7.org/CodeSystem/medication-admin-category",
                        "inpatient",
                        "Inpatient",
                    ),
                    "medicationCodeableConcept": _cc(RXNORM, med["rxcui"], med["display"], med["text"]),
                    "subject": self.subject(),
                    "context": self.encounter(),
                    "effectiveDateTime": _iso(t),
                    "dosage": {
                        "text": f"{med['dose']:g} {med['unit']} {route['abbrev']}",
                        "route": _cc(SNOMED, route["code"], route["display"]),
                        "dose": _qty(med["dose"], med["unit"], med["ucum"]),
                    },
                },
                tag=f"admin:{extra['tag']}",
            )

    def _order(self, order: dict[str, Any]) -> None:
        freq = self.data["frequencies"][order["freq"]]
        f = self._order_fields(order)
        route = self.data["routes"][f["route"]]
        status = order.get("status", "active")
        start_h = float(order.get("start_h", self.admit_h - 1))
        end_h = order.get("stop_h", order.get("hold_h"))
        start = self.at(start_h)
        end = self.at(float(end_h)) if end_h is not None else None
        prn = bool(freq.get("prn"))
        continuous = bool(freq.get("continuous"))
        mid = self.id("MedicationRequest", order["key"])
        concept = self._medication_concept(order)

        if continuous:
            dose_text = f"{f['rate']:g} {f['rate_unit']} {route['abbrev']}, {freq['text']}"
            dose_and_rate = [{"rateQuantity": _qty(f["rate"], f["rate_unit"], f["rate_ucum"])}]
            timing: dict[str, Any] = {"repeat": {"boundsPeriod": {"start": _iso(start)}}}
        else:
            dose_text = f"{f['dose']:g} {f['unit']} {route['abbrev']} {freq['text']}"
            if prn:
                dose_text += f" for {order.get('prn_reason', 'symptoms')}"
            dose_and_rate = [{"doseQuantity": _qty(f["dose"], f["unit"], f["ucum"])}]
            repeat: dict[str, Any] = {
                "boundsPeriod": {"start": _iso(start)},
                "frequency": freq["frequency"],
                "period": freq["period"],
                "periodUnit": freq["unit"],
            }
            if not prn:
                repeat["timeOfDay"] = [f"{h:02d}:00:00" for h in freq["hours"]]
            timing = {"repeat": repeat}
        if end is not None and status in ("stopped", "completed"):
            timing["repeat"]["boundsPeriod"]["end"] = _iso(end)
        dosage: dict[str, Any] = {"text": dose_text, "timing": timing}
        if prn:
            dosage["asNeededBoolean"] = True
        dosage["route"] = _cc(SNOMED, route["code"], route["display"])
        dosage["doseAndRate"] = dose_and_rate
        request: dict[str, Any] = {
            "resourceType": "MedicationRequest",
            "id": mid,
            "status": status,
        }
        if order.get("status_reason"):
            request["statusReason"] = {"text": order["status_reason"]}
        request.update(
            {
                "intent": "order",
                "category": [
                    _cc(
                        "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                        "inpatient",
                        "Inpatient",
                    )
                ],
                "medicationCodeableConcept": concept,
                "subject": self.subject(),
                "encounter": self.encounter(),
                "authoredOn": _iso(start),
                "dosageInstruction": [dosage],
            }
        )
        self.add(request, tag=f"order:{order['key']}")
        self._administrations(order, freq, f, route, concept, mid, start, end)

    def _admin(
        self,
        order_key: str,
        n: int,
        concept: dict[str, Any],
        mid: str,
        f: dict[str, Any],
        route: dict[str, Any],
        status: str,
        when: datetime | None = None,
        period: tuple[datetime, datetime | None] | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        res: dict[str, Any] = {
            "resourceType": "MedicationAdministration",
            "id": self.id("MedicationAdministration", f"{order_key}|{n}"),
            "status": status,
        }
        if reason:
            res["statusReason"] = [{"text": reason}]
        res.update(
            {
                "category": _cc(
                    "http://terminology.hl7.org/CodeSystem/medication-admin-category",
                    "inpatient",
                    "Inpatient",
                ),
                "medicationCodeableConcept": concept,
                "subject": self.subject(),
                "context": self.encounter(),
            }
        )
        if period is not None:
            res["effectivePeriod"] = {"start": _iso(period[0])} | (
                {"end": _iso(period[1])} if period[1] else {}
            )
        else:
            res["effectiveDateTime"] = _iso(when)  # type: ignore[arg-type]
        res["request"] = _ref("MedicationRequest", mid)
        if f.get("rate") is not None:
            res["dosage"] = {
                "text": f"{f['rate']:g} {f['rate_unit']}",
                "route": _cc(SNOMED, route["code"], route["display"]),
                "rateQuantity": _qty(f["rate"], f["rate_unit"], f["rate_ucum"]),
            }
        else:
            res["dosage"] = {
                "text": f"{f['dose']:g} {f['unit']} {route['abbrev']}",
                "route": _cc(SNOMED, route["code"], route["display"]),
                "dose": _qty(f["dose"], f["unit"], f["ucum"]),
            }
        return res

    def _administrations(self, order, freq, f, route, concept, mid, start, end) -> None:
        key = order["key"]
        limit = min(end, self.anchor) if end is not None else self.anchor
        window_start = max(start, self.anchor - timedelta(hours=MAR_WINDOW_H))
        out: list[dict[str, Any]] = []
        if freq.get("continuous"):
            seg = start
            n = 0
            while seg < limit:
                seg_end = seg + timedelta(hours=12)
                if seg_end > window_start:
                    if seg_end <= limit:
                        out.append(
                            self._admin(key, n, concept, mid, f, route, "completed", period=(seg, seg_end))
                        )
                    else:
                        out.append(
                            self._admin(key, n, concept, mid, f, route, "in-progress", period=(seg, None))
                        )
                seg = seg_end
                n += 1
        elif freq.get("prn"):
            if "prn_h" in order:
                times = [self.at(h) for h in order["prn_h"]]
            else:
                span = min(40.0, self.hours_ago(start) - 0.5)
                count = self.rng.choice([0, 1, 1, 2]) if span > 1.5 else 0
                times = [self.at(round(self.rng.uniform(1.5, span) * 4) / 4) for _ in range(count)]
            for n, t in enumerate(sorted(t for t in times if start < t <= limit)):
                out.append(self._admin(key, n, concept, mid, f, route, "completed", when=t))
        else:
            slots = []
            for day in range(-4, 1):
                for hour in freq["hours"]:
                    slot = self.day0 + timedelta(days=day, hours=hour)
                    t = slot + timedelta(minutes=self.rng.randrange(0, 25))
                    if t >= self.anchor:
                        t = slot  # charting delay must not push a due dose past the anchor
                    if window_start < t <= limit and t < self.anchor:
                        slots.append(t)
            slots.sort()
            mode = order.get("mar", "auto")
            recent = [t for t in slots if self.hours_ago(t) <= 24]
            for n, t in enumerate(slots):
                in_24h = self.hours_ago(t) <= 24
                status, reason = "completed", None
                if mode == "held_24h" and in_24h:
                    status, reason = "not-done", order.get("held_reason", "Held")
                elif mode == "none_24h" and in_24h:
                    continue
                elif mode == "auto":
                    # refusals only where another dose in the same 24 h can still count as given
                    p = 0.05 if not in_24h else (0.1 if len(recent) >= 3 else 0.0)
                    if self.rng.random() < p:
                        status, reason = "not-done", "Patient refused"
                out.append(self._admin(key, n, concept, mid, f, route, status, when=t, reason=reason))
            recent_admins = [
                a for a in out if self.hours_ago(datetime.fromisoformat(a["effectiveDateTime"])) <= 24
            ]
            if mode == "auto" and recent_admins and all(a["status"] != "completed" for a in recent_admins):
                recent_admins[-1]["status"] = "completed"
                recent_admins[-1].pop("statusReason", None)
        for res in out:
            self.add(res)

    # -- labs ------------------------------------------------------------------------------------------------------
    def _daily_hours(self) -> list[float]:
        first = self.admit_h - 0.5
        hours = [first]
        h = 2.0
        while h <= first - 2.5:
            hours.append(h)
            h += 24
        return sorted(hours, reverse=True)

    def _panel_hours(self, panel: str) -> list[float]:
        override = self.spec.get("panel_hours", {}).get(panel)
        if override == "daily" or (override is None and panel != "coag"):
            return self._daily_hours()
        if override is None:
            return [self.admit_h - 0.5]
        return [float(h) for h in override]

    def _base(self, analyte: str) -> float:
        if analyte not in self.base:
            override = self.spec.get("base", {}).get(analyte)
            lo, hi = self.data["analytes"][analyte]["base"]
            self.base[analyte] = float(override) if override is not None else self.rng.uniform(lo, hi)
        return self.base[analyte]

    def _variant(self, analyte: str) -> str:
        return self.units.get(analyte, analyte)

    def _generated(self, analyte: str, h: float) -> float:
        spec = self.data["analytes"][analyte]
        value = self._base(analyte) + self.rng.uniform(-spec["noise"], spec["noise"])
        if analyte == "poc_glucose":
            value = max(value, 85.0)  # random capillary values never dip into the hypoglycemia range
        variant = self.data["analytes"][self._variant(analyte)]
        value *= variant.get("from_conventional", 1.0)
        return _rnd(value, variant["decimals"])

    def _series(self, analyte: str, hours: list[float]) -> list[dict[str, Any]]:
        """Generated values at `hours`, with the scenario's explicit results merged over them by time."""
        points = {(float(h), "final"): {"h": float(h), "v": self._generated(analyte, h)} for h in hours}
        for p in self.spec.get("labs", {}).get(analyte, []):
            status = p.get("status", "final")
            points[(float(p["h"]), status)] = {
                "h": float(p["h"]),
                "v": p["v"],
                "tag": p.get("tag"),
                "status": status,
            }
            if status != "final":
                points.pop((float(p["h"]), "final"), None)
        return sorted(points.values(), key=lambda p: -p["h"])

    def _poc_hours(self) -> list[float]:
        hours = []
        for day in range(-8, 1):
            for hour in (6, 11, 16, 21):
                h = self.hours_ago(self.day0 + timedelta(days=day, hours=hour))
                if 0 < h <= self.admit_h - 1:
                    hours.append(h)
        return hours

    def _lab(self, analyte: str, point: dict[str, Any]) -> dict[str, Any]:
        variant_key = self._variant(analyte)
        spec = self.data["analytes"][variant_key]
        value = point["v"]
        status = point.get("status") or "final"
        res: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self.id("Observation", f"lab|{analyte}|{point['h']}|{status}"),
            "status": status,
            "category": _category(
                spec.get("category", "laboratory"),
                "Procedure" if spec.get("category") == "procedure" else "Laboratory",
            ),
            "code": _cc(LOINC, spec["loinc"], spec["display"], spec["display"]),
            "subject": self.subject(),
            "encounter": self.encounter(),
            "effectiveDateTime": _iso(self.at(point["h"])),
            "valueQuantity": _qty(value, spec["unit"], spec["ucum"]),
        }
        flag = "N"
        if spec.get("crit_low") is not None and value < spec["crit_low"]:
            flag = "LL"
        elif spec.get("crit_high") is not None and value > spec["crit_high"]:
            flag = "HH"
        elif spec.get("low") is not None and value < spec["low"]:
            flag = "L"
        elif spec.get("high") is not None and value > spec["high"]:
            flag = "H"
        res["interpretation"] = [_cc(INTERPRETATION, flag, INTERPRETATION_DISPLAY[flag])]
        rr: dict[str, Any] = {}
        if spec.get("low") is not None:
            rr["low"] = _qty(spec["low"], spec["unit"], spec["ucum"])
        if spec.get("high") is not None:
            rr["high"] = _qty(spec["high"], spec["unit"], spec["ucum"])
        if rr:
            res["referenceRange"] = [rr]
        return res

    def _labs(self) -> None:
        labs: list[tuple[float, str, dict[str, Any]]] = []
        panels = self.data["panels"]
        for panel, analytes in panels.items():
            hours = self._panel_hours(panel)
            for analyte in analytes:
                for p in self._series(analyte, hours):
                    labs.append((p["h"], analyte, p))
        for analyte in ("digoxin", "lithium", "vanc_trough", "qtc"):
            for p in self._series(analyte, []):
                labs.append((p["h"], analyte, p))
        if self.spec.get("poc_glucose"):
            self.base.setdefault("poc_glucose", self._base("poc_glucose"))
            for p in self._series("poc_glucose", self._poc_hours()):
                labs.append((p["h"], "poc_glucose", p))
        egfr_tags = self.spec.get("egfr_tags", {})
        out = []
        for h, analyte, p in labs:
            res = self._lab(analyte, p)
            out.append((h, res, p.get("tag")))
            if analyte == "creat" and res["status"] == "final":
                mg_dl = p["v"] / self.data["analytes"][self._variant("creat")].get("from_conventional", 1.0)
                egfr = ckd_epi_2021(mg_dl, int(self.spec["age"]), self.female)
                tag = egfr_tags.get(f"{h:g}")
                out.append((h, self._lab("egfr", {"h": h, "v": egfr}), tag))
        out.sort(key=lambda item: (-item[0], item[1]["code"]["coding"][0]["code"]))
        for _, res, tag in out:
            self.add(res, tag=f"obs:{tag}" if tag else None)

    # -- vitals and nursing assessments -----------------------------------------------------------------------
    def _vital_hours(self) -> list[float]:
        hours = [self.admit_h - 0.25]
        h = 3.0
        while h < self.admit_h - 1:
            hours.append(h)
            h += 4
        return sorted(hours, reverse=True)

    def _vitals(self) -> None:
        cfg = dict(self.spec.get("vitals", {}))
        rng = self.rng
        base = {
            "hr": cfg.get("hr", rng.uniform(66, 88)),
            "rr": cfg.get("rr", rng.choice([14, 16, 16, 18])),
            "temp": cfg.get("temp", rng.uniform(36.5, 37.1)),
            "spo2": cfg.get("spo2", rng.choice([95, 96, 97, 98])),
            "sbp": cfg.get("sbp", rng.uniform(112, 138)),
            "dbp": cfg.get("dbp", rng.uniform(62, 80)),
            "o2": cfg.get("o2", 0),
        }
        noise = {"hr": 6, "rr": 1, "temp": 0.2, "spo2": 1, "sbp": 8, "dbp": 5, "o2": 0}
        trend = cfg.get("trend", {})
        trend_h = float(cfg.get("trend_h", 0))
        for h in self._vital_hours():
            frac = min(1.0, max(0.0, (trend_h - h) / (trend_h - 3.0))) if trend_h > 3 else 0.0
            v = {}
            for name, b in base.items():
                target = trend.get(name, b)
                jitter = rng.uniform(-noise[name], noise[name]) * (1 - frac)
                v[name] = b + (target - b) * frac + jitter
            if "o2" in trend:
                v["o2"] = trend["o2"] if frac >= 0.5 else base["o2"]
            acvpu = cfg.get("acvpu", "A") if h < float(cfg.get("acvpu_h", 1e9)) else "A"
            self._vital_round(h, v, acvpu)

    def _vital(
        self,
        h: float,
        name: str,
        loinc: str,
        display: str,
        value: float | int | None,
        unit: str,
        ucum: str,
        **extra: Any,
    ) -> dict[str, Any]:
        res: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self.id("Observation", f"vs|{name}|{h}"),
            "status": "final",
            "category": _category("vital-signs", "Vital Signs"),
            "code": extra.pop("code", None) or _cc(LOINC, loinc, display, display),
            "subject": self.subject(),
            "encounter": self.encounter(),
            "effectiveDateTime": _iso(self.at(h)),
        }
        if value is not None:
            res["valueQuantity"] = _qty(value, unit, ucum)
        res.update(extra)
        return self.add(res)

    def _vital_round(self, h: float, v: dict[str, float], acvpu: str) -> None:
        self._vital(h, "hr", "8867-4", "Heart rate", int(round(v["hr"])), "beats/minute", "/min")
        self._vital(h, "rr", "9279-1", "Respiratory rate", int(round(v["rr"])), "breaths/minute", "/min")
        self._vital(h, "temp", "8310-5", "Body temperature", round(v["temp"], 1), "Cel", "Cel")
        o2 = int(round(v["o2"]))
        self._vital(
            h,
            "spo2",
            "",
            "",
            min(100, int(round(v["spo2"]))),
            "%",
            "%",
            code={
                "coding": [
                    {
                        "system": LOINC,
                        "code": "59408-5",
                        "display": "Oxygen saturation in Arterial blood by Pulse oximetry",
                    },
                    {"system": LOINC, "code": "2708-6", "display": "Oxygen saturation in Arterial blood"},
                ],
                "text": "SpO2",
            },
            component=[
                {
                    "code": _cc(LOINC, "3151-8", "Inhaled oxygen flow rate", "Inhaled oxygen flow rate"),
                    "valueQuantity": _qty(o2, "L/min", "L/min"),
                }
            ],
        )
        self._vital(
            h,
            "bp",
            "85354-9",
            "Blood pressure panel with all children optional",
            None,
            "",
            "",
            component=[
                {
                    "code": _cc(LOINC, "8480-6", "Systolic blood pressure", "Systolic blood pressure"),
                    "valueQuantity": _qty(int(round(v["sbp"])), "mmHg", "mm[Hg]"),
                },
                {
                    "code": _cc(LOINC, "8462-4", "Diastolic blood pressure", "Diastolic blood pressure"),
                    "valueQuantity": _qty(int(round(v["dbp"])), "mmHg", "mm[Hg]"),
                },
            ],
        )
        code, display, text = ACVPU_ANSWERS[acvpu]
        self._vital(
            h,
            "acvpu",
            "",
            "",
            None,
            "",
            "",
            code=_cc(SNOMED, *ACVPU_CODE, "ACVPU"),
            valueCodeableConcept=_cc(SNOMED, code, display, text),
        )

    def _survey(self, h: float, name: str, code: str, display: str, value: int, unit: str, ucum: str) -> None:
        self.add(
            {
                "resourceType": "Observation",
                "id": self.id("Observation", f"survey|{name}|{h}"),
                "status": "final",
                "category": _category("survey", "Survey"),
                "code": _cc(LOINC, code, display, display),
                "subject": self.subject(),
                "encounter": self.encounter(),
                "effectiveDateTime": _iso(self.at(h)),
                "valueQuantity": _qty(value, unit, ucum),
            }
        )

    def _assessments(self) -> None:
        rng = self.rng
        pain = self.spec.get("pain", rng.choice([0, 1, 2]))
        braden = self.spec.get("braden", rng.randint(16, 21))
        morse = self.spec.get("morse", rng.choice([15, 25, 35, 45]))
        h = 3.0
        while h < self.admit_h - 1:
            value = max(0, min(10, pain + rng.choice([-1, 0, 0, 1])))
            self._survey(
                h,
                "pain",
                "72514-3",
                "Pain severity - 0-10 verbal numeric rating [Score] - Reported",
                value,
                "{score}",
                "{score}",
            )
            h += 8
        daily = [self.admit_h - 1] + [11.0 + 24 * k for k in range(8) if 11.0 + 24 * k < self.admit_h - 2]
        for h in sorted(daily, reverse=True):
            b = max(6, min(23, braden + rng.choice([-1, 0, 0, 1])))
            self._survey(h, "braden", "38227-7", "Braden scale total score", b, "{score}", "{score}")
            self._survey(
                h, "morse", "59460-6", "Fall risk total [Morse Fall Scale]", morse, "{score}", "{score}"
            )

    def _notes(self) -> None:
        notes = [(float(h), text) for h, text in self.spec.get("notes", [])]
        if len(notes) < 2:
            notes.append((12.0, self.rng.choice(self.data["note_templates"]["shift"])))
        for i, (h, text) in enumerate(notes):
            self.add(
                {
                    "resourceType": "DocumentReference",
                    "id": self.id("DocumentReference", str(i)),
                    "status": "current",
                    "docStatus": "final",
                    "type": _cc(LOINC, "34746-8", "Nurse Note", "Nursing note"),
                    "subject": self.subject(),
                    "date": _iso(self.at(h)),
                    "description": "Admission nursing note" if i == 0 else "Nursing shift note",
                    "content": [
                        {
                            "attachment": {
                                "contentType": "text/plain",
                                "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                                "title": "Nursing note",
                                "creation": _iso(self.at(h)),
                            }
                        }
                    ],
                    "context": {"encounter": [self.encounter()]},
                },
                tag=f"note:{i}",
            )


def _locations(data: dict[str, Any], occupied: set[str]) -> list[dict[str, Any]]:
    out = []
    for ward_id, ward in data["wards"].items():
        out.append(
            {
                "resourceType": "Location",
                "id": ward_id,
                "status": "active",
                "name": ward["name"],
                "mode": "instance",
                "physicalType": _cc(
                    "http://terminology.hl7.org/CodeSystem/location-physical-type", "wa", "Ward"
                ),
            }
        )
        for n in range(1, int(ward["beds"]) + 1):
            bed_id = f"{ward_id}-bed-{n:02d}"
            occ = ("O", "Occupied") if bed_id in occupied else ("U", "Unoccupied")
            out.append(
                {
                    "resourceType": "Location",
                    "id": bed_id,
                    "status": "active",
                    "operationalStatus": {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0116",
                        "code": occ[0],
                        "display": occ[1],
                    },
                    "name": f"{ward['name']} bed {n:02d}",
                    "mode": "instance",
                    "physicalType": _cc(
                        "http://terminology.hl7.org/CodeSystem/location-physical-type", "bd", "Bed"
                    ),
                    "partOf": _ref("Location", ward_id),
                }
            )
    return out


def _bundle(bundle_id: str, anchor: datetime, resources_: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "type": "collection",
        "timestamp": _iso(anchor),
        "entry": [
            {"fullUrl": f"{FULL_URL_BASE}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources_
        ],
    }


def _dump(path: Path, obj: Any) -> None:
    path.write_bytes((json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))


def _resolve(builder: _PatientBuilder, ref: str) -> str:
    if ref not in builder.tags:
        raise DemoWardError(
            f"scenario {builder.key}: evidence '{ref}' names no tagged resource; fix demo_ward.toml"
        )
    return builder.tags[ref]


def generate_demo_ward(outdir: Path, *, anchor: datetime, seed: int = 7) -> DemoWardManifest:
    """Write one collection Bundle per patient plus locations.json, answer_key.json and ward.json into outdir."""
    if anchor.tzinfo is None or anchor.utcoffset() is None:
        raise DemoWardError(
            "anchor must be timezone-aware, e.g. datetime(2025, 1, 6, 7, tzinfo=timezone.utc)"
        )
    anchor = anchor.replace(microsecond=0)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    data = load_scenarios()

    builders = [_PatientBuilder(spec, data, anchor, seed) for spec in data["patients"]]
    beds = [b.bed_id for b in builders]
    if len(set(beds)) != len(beds):
        raise DemoWardError("two demo patients share a bed; fix the bed numbers in demo_ward.toml")

    ward_file = outdir / "ward.json"
    previous: set[str] = set()
    if ward_file.exists():
        try:
            previous = {p["file"] for p in json.loads(ward_file.read_text("utf-8")).get("patients", [])}
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring unreadable ward.json in the demo output directory")

    patient_files = []
    expected: list[dict[str, Any]] = []
    must_not: list[dict[str, Any]] = []
    injections: list[str] = []
    deteriorating: list[dict[str, str]] = []
    for b in builders:
        resources_ = b.build()
        path = outdir / f"{b.pid}.json"
        _dump(path, _bundle(b.id("Bundle", ""), anchor, resources_))
        patient_files.append(path)
        patient_ref = f"Patient/{b.pid}"
        for e in b.spec.get("expected", []):
            expected.append(
                {
                    "patient": patient_ref,
                    "rule": e["rule"],
                    "evidence": [_resolve(b, r) for r in e["evidence"]],
                    "note": e.get("note", ""),
                }
            )
        for m in b.spec.get("must_not_fire", []):
            must_not.append({"patient": patient_ref, "rule": m["rule"], "reason": m["reason"]})
        if "injection_note" in b.spec:
            injections.append(_resolve(b, f"note:{int(b.spec['injection_note'])}"))
        if b.spec.get("vitals", {}).get("deteriorating"):
            deteriorating.append(
                {
                    "patient": patient_ref,
                    "note": "vital signs worsen over the last hours; NEWS2 >= 7 on the latest round",
                }
            )

    for stale in previous - {p.name for p in patient_files}:
        stale_path = outdir / stale
        if stale_path.suffix == ".json" and stale_path.parent == outdir and stale_path.exists():
            stale_path.unlink()

    occupied = set(beds)
    locations_file = outdir / "locations.json"
    _dump(
        locations_file,
        _bundle(str(uuid.uuid5(_NAMESPACE, f"{seed}|locations")), anchor, _locations(data, occupied)),
    )

    answer_key = {
        "anchor": _iso(anchor),
        "seed": seed,
        "expected": expected,
        "must_not_fire": must_not,
        "injection_notes": injections,
        "deteriorating": deteriorating,
    }
    answer_key_file = outdir / "answer_key.json"
    _dump(answer_key_file, answer_key)

    wards = []
    for ward_id, ward in data["wards"].items():
        wards.append(
            {
                "id": ward_id,
                "name": ward["name"],
                "location": f"Location/{ward_id}",
                "beds": [f"Location/{ward_id}-bed-{n:02d}" for n in range(1, int(ward["beds"]) + 1)],
                "patients": [f"Patient/{b.pid}" for b in builders if b.ward_id == ward_id],
            }
        )
    _dump(
        ward_file,
        {
            "anchor": _iso(anchor),
            "seed": seed,
            "default_ward": "ward-4b",
            "locations_file": locations_file.name,
            "answer_key_file": answer_key_file.name,
            "wards": wards,
            "patients": [
                {
                    "id": b.pid,
                    "file": f"{b.pid}.json",
                    "ward": f"Location/{b.ward_id}",
                    "bed": f"Location/{b.bed_id}",
                    "scenario": b.key,
                }
                for b in builders
            ],
        },
    )
    logger.info("demo ward written: %d patients, %d wards", len(builders), len(wards))
    return DemoWardManifest(
        outdir=outdir,
        anchor=anchor,
        seed=seed,
        ward_ids=tuple(data["wards"]),
        patient_ids=tuple(b.pid for b in builders),
        scenario_patients={b.key: b.pid for b in builders},
        patient_files=tuple(patient_files),
        locations_file=locations_file,
        answer_key_file=answer_key_file,
        ward_file=ward_file,
    )

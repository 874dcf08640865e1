"""FHIR R4 REST client: paged searches, bounded concurrency, retries with backoff, typed OperationOutcome errors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter

from assistant.model import DataQualityIssue
from assistant.normalize import local_ref, location_kind, location_name, resource_key, resource_owner
from assistant.settings import SettingsError, load_settings, tls_verify
from assistant.settings import get as setting_value
from assistant.terminology import fhir_codes
from connectors.auth import Auth, BearerAuth, SmartBackendAuth
from connectors.base import (
    CensusEntry,
    FhirSource,
    PatientRecord,
    Ward,
    census_from_encounters,
    merge_duplicates,
)
from connectors.errors import (
    FhirAuthError,
    FhirError,
    FhirFatalError,
    FhirNotFoundError,
    FhirResponseError,
    FhirSettingsError,
    FhirTemporaryError,
)
from connectors.http import (
    RETRY_STATUSES,
    backoff_delay,
    maybe_json,
    outcome_text,
    retry_after_seconds,
    where,
)

log = logging.getLogger(__name__)

# The two big categories get a search each so they page in parallel; the small ones share one OR search.
OBSERVATION_SEARCHES = (
    ("laboratory", "laboratory"),
    ("vital-signs", "vital-signs"),
    ("other", "survey,exam,procedure,social-history,imaging,therapy,activity"),
)
PATIENT_SEARCHES: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("encounters", "Encounter", {}),
    ("conditions", "Condition", {}),
    ("allergies", "AllergyIntolerance", {}),
    ("medication orders", "MedicationRequest", {}),
    ("medication administrations", "MedicationAdministration", {}),
    ("medication statements", "MedicationStatement", {}),
    *((f"{label} observations", "Observation", {"category": codes}) for label, codes in OBSERVATION_SEARCHES),
    ("nursing notes", "DocumentReference", {}),
    # Isolation precautions (and other patient flags): a server without Flag leaves isolation "not retrieved".
    ("flags (isolation)", "Flag", {}),
)


@dataclass(frozen=True, slots=True)
class RestOptions:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 4
    backoff_base: float = 0.5
    backoff_cap: float = 20.0
    concurrency: int = 16
    page_size: int = 500
    everything: str = "auto"  # auto | always | never
    verify: bool | str = True


class RestFhirSource(FhirSource):
    def __init__(
        self,
        base_url: str,
        *,
        auth: Auth | None = None,
        options: RestOptions | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.description = base_url.rstrip("/")
        self.auth = auth or Auth()
        self.options = options or RestOptions()
        self.sleep = sleep
        self._local = threading.local()
        self._gate = threading.BoundedSemaphore(self.options.concurrency)
        self._capabilities: dict | None = None
        self._shared_cache: dict[
            str, dict
        ] = {}  # Locations and Medications: shared by every patient of a ward
        self._shared_lock = threading.Lock()
        self.request_count = 0

    @classmethod
    def from_settings(
        cls, base_url: str, settings: Mapping[str, str] | None = None, **overrides: Any
    ) -> RestFhirSource:
        try:  # typed from the declarations in assistant/settings.py; a bad value is a typed, fatal error
            s = dict(load_settings() if settings is None else settings)
            verify = tls_verify(s, "NVA_FHIR_CA_BUNDLE")
            options = RestOptions(
                connect_timeout=setting_value(s, "NVA_FHIR_CONNECT_TIMEOUT"),
                read_timeout=setting_value(s, "NVA_FHIR_READ_TIMEOUT"),
                retries=setting_value(s, "NVA_FHIR_RETRIES"),
                concurrency=setting_value(s, "NVA_FHIR_CONCURRENCY"),
                page_size=setting_value(s, "NVA_FHIR_PAGE_SIZE"),
                everything=setting_value(s, "NVA_FHIR_EVERYTHING"),
                verify=verify,
            )
        except SettingsError as exc:
            raise FhirSettingsError(str(exc)) from None
        options = replace(options, **overrides)
        mode = s.get("NVA_FHIR_AUTH", "none")
        auth: Auth
        if mode == "bearer":
            auth = BearerAuth(s.get("NVA_FHIR_TOKEN", ""))
        elif mode == "smart":
            source = cls(base_url, options=options)
            token_url = s.get("NVA_FHIR_TOKEN_URL") or source.discover_token_url()
            auth = SmartBackendAuth.from_key_file(
                s.get("NVA_FHIR_PRIVATE_KEY", ""),
                token_url=token_url,
                client_id=s.get("NVA_FHIR_CLIENT_ID", ""),
                alg=s.get("NVA_FHIR_JWT_ALG", "RS384"),
                kid=s.get("NVA_FHIR_KEY_ID") or None,
                scope=s.get("NVA_FHIR_SCOPE", "system/*.read"),
                verify=verify,
            )
        elif mode == "none":
            auth = Auth()
        else:
            raise FhirAuthError(f"NVA_FHIR_AUTH={mode!r} is not one of none, bearer, smart")
        return cls(base_url, auth=auth, options=options)

    # --- HTTP ---------------------------------------------------------------------------------------------
    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("http://", HTTPAdapter(pool_maxsize=4))
            session.mount("https://", HTTPAdapter(pool_maxsize=4))
            session.headers["Accept"] = "application/fhir+json, application/json;q=0.9"
            self._local.session = session
        return session

    def url_for(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else urljoin(self.base_url, path.lstrip("/"))

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        accept: tuple[int, ...] = (200,),
        what: str = "the request",
        check: Callable[[requests.Response, bytes], Any] | None = None,
        auth: bool = True,
    ) -> tuple[requests.Response, Any]:
        """One HTTP exchange with retries (transport faults, busy statuses, truncated bodies), one
        re-authentication on 401, and typed errors naming the URL. Shared by searches and bulk export.

        Returns the response and `check(resp, body)` (the body is read unless `stream`); `check` raises
        FhirTemporaryError for a body worth fetching again (truncated), another FhirError to stop.
        """
        url = self.url_for(path)
        reauthed = False
        attempt = 0
        while True:
            attempt += 1
            wait: float | None = None
            try:
                with self._gate:
                    self.request_count += 1
                    resp = self.session.request(
                        method,
                        url,
                        params=params,
                        headers={**(headers or {}), **(self.auth.headers() if auth else {})},
                        verify=self.options.verify,
                        stream=stream,
                        timeout=(self.options.connect_timeout, self.options.read_timeout),
                    )
                    # a streamed answer is read here only when it is an error, for its OperationOutcome
                    body = resp.content if not stream or resp.status_code not in accept else b""
                status = resp.status_code
                if status == 401 and auth and self.auth.can_refresh and not reauthed:
                    reauthed = True
                    self.auth.refresh()
                    attempt -= 1
                    continue
                if status in RETRY_STATUSES and status not in accept:
                    detail = outcome_text(maybe_json(body))
                    wait = retry_after_seconds(resp.headers.get("Retry-After"))
                    raise FhirTemporaryError(
                        f"{where(url)} answered HTTP {status}{': ' + detail if detail else ''}",
                        url=url,
                        status=status,
                    )
                if status not in accept:
                    raise status_error(url, status, maybe_json(body), what)
                return resp, (check(resp, body) if check is not None else None)
            except FhirTemporaryError as exc:
                error: FhirError = exc
            except requests.Timeout as exc:
                error = FhirTemporaryError(
                    f"no answer from {where(url)} within {self.options.read_timeout:g} s "
                    "(timeout); the server is slow or down",
                    url=url,
                )
                error.__cause__ = exc
            except requests.ConnectionError as exc:
                error = FhirTemporaryError(
                    f"cannot connect to {where(url)} ({exc.__class__.__name__}); check "
                    "NVA_SOURCE and that the server is up",
                    url=url,
                )
                error.__cause__ = exc
            except requests.RequestException as exc:  # e.g. the connection reset while the body was read
                error = FhirTemporaryError(
                    f"{where(url)} broke off the answer ({exc.__class__.__name__}); the server or a proxy "
                    "closed the connection",
                    url=url,
                )
                error.__cause__ = exc
            if attempt > self.options.retries:
                raise error
            delay = backoff_delay(
                attempt, base=self.options.backoff_base, cap=self.options.backoff_cap, retry_after=wait
            )
            log.info(
                "retrying FHIR request in %.2f s (attempt %d): %s", delay, attempt, error.__class__.__name__
            )
            self.sleep(min(delay, self.options.backoff_cap * 3))

    def get_json(
        self, path: str, params: Mapping[str, Any] | None = None, *, expect: str | None = None
    ) -> dict:
        """GET with retries, one re-authentication on 401, and typed errors; returns the parsed resource."""

        def parse(resp: requests.Response, body: bytes) -> dict:
            return parse_fhir_json(resp, body, expect)

        _, parsed = self.request("GET", path, params=params, what="the request", check=parse)
        return parsed

    # --- FHIR operations ----------------------------------------------------------------------------------
    def capabilities(self) -> dict:
        if self._capabilities is None:
            self._capabilities = self.get_json("metadata", expect="CapabilityStatement")
        return self._capabilities

    def served_types(self) -> set[str] | None:
        """Resource types the CapabilityStatement lists; None when the server does not say (then ask for all)."""
        try:
            caps = self.capabilities()
        except FhirAuthError:
            raise
        except FhirError:
            return None
        types = {
            res["type"]
            for rest in caps.get("rest") or []
            if isinstance(rest, dict)
            for res in rest.get("resource") or []
            if isinstance(res, dict) and isinstance(res.get("type"), str)
        }
        return types or None

    def supports_everything(self) -> bool:
        if self.options.everything in ("always", "never"):
            return self.options.everything == "always"
        try:
            caps = self.capabilities()
        except FhirError:
            return False
        for rest in caps.get("rest") or []:
            for op in rest.get("operation") or []:
                if op.get("name") == "everything":
                    return True
            for res in rest.get("resource") or []:
                if res.get("type") == "Patient":
                    for op in res.get("operation") or []:
                        if op.get("name") == "everything":
                            return True
        return False

    def discover_token_url(self) -> str:
        conf = self.get_json(".well-known/smart-configuration")
        token_url = conf.get("token_endpoint")
        if not token_url:
            raise FhirAuthError(
                "the server's smart-configuration has no token_endpoint; set NVA_FHIR_TOKEN_URL"
            )
        return token_url

    def read(self, rtype: str, rid: str) -> dict:
        return self.get_json(f"{rtype}/{rid}", expect=rtype)

    def search_pages(self, rtype: str, params: Mapping[str, Any]) -> Iterator[list[dict]]:
        query = {"_count": self.options.page_size, **params}
        bundle = self.get_json(rtype, query, expect="Bundle")
        seen_urls = set()
        while True:
            yield [
                e["resource"]
                for e in bundle.get("entry") or []
                if isinstance(e, dict)
                and isinstance(e.get("resource"), dict)
                and (e.get("search") or {}).get("mode", "match") in ("match", "include")
            ]
            next_url = next(
                (
                    link.get("url")
                    for link in bundle.get("link") or []
                    if isinstance(link, dict) and link.get("relation") == "next"
                ),
                None,
            )
            if not next_url or next_url in seen_urls:
                return
            seen_urls.add(next_url)
            bundle = self.get_json(next_url, expect="Bundle")

    def search(self, rtype: str, params: Mapping[str, Any]) -> list[dict]:
        out: list[dict] = []
        for page in self.search_pages(rtype, params):
            out.extend(page)
        return out

    def iter_patient_ids(self) -> Iterator[str]:
        seen: set[str] = set()  # a patient served on two pages (the data moved while paging) is listed once
        for page in self.search_pages("Patient", {"_elements": "id"}):
            for r in page:
                rid = r.get("id")
                if r.get("resourceType") == "Patient" and isinstance(rid, str) and rid and rid not in seen:
                    seen.add(rid)
                    yield rid

    def patient_resources(self, patient_id: str) -> PatientRecord:
        """One patient: $everything when offered, else one search per type; a failed search marks its type missing."""
        use_everything = self.supports_everything()
        served = self.served_types()
        searches = []
        for label, rtype, extra in PATIENT_SEARCHES:
            if served is not None and rtype not in served:
                self.completeness.missing_types.setdefault(
                    rtype, "not served by the server (absent from its CapabilityStatement)"
                )
                continue
            searches.append((label, rtype, {"patient": patient_id, **extra}))
        with ThreadPoolExecutor(
            max_workers=self.options.concurrency, thread_name_prefix="fhir-search"
        ) as pool:
            # The Patient read goes out with the searches, not before them: one round trip fewer.
            patient_future = pool.submit(self.read, "Patient", patient_id)
            if use_everything:
                everything = pool.submit(self.search, f"Patient/{patient_id}/$everything", {})
                patient = patient_future.result()
                record = PatientRecord(patient_id, [patient], origin=self.description)
                try:
                    resources = everything.result()
                except FhirAuthError:
                    raise
                except FhirError as exc:
                    log.info(
                        "$everything failed (%s); falling back to per-type searches", exc.__class__.__name__
                    )
                else:
                    record.resources += [
                        r
                        for r in resources
                        if not (r.get("resourceType") == "Patient" and r.get("id") == patient_id)
                    ]
                    return self._finish(record)
            futures = [
                (label, rtype, pool.submit(self.search, rtype, params)) for label, rtype, params in searches
            ]
            patient = patient_future.result()
            record = PatientRecord(patient_id, [patient], origin=self.description)
            for label, rtype, future in futures:
                try:
                    resources = future.result()
                except FhirAuthError:
                    raise
                except FhirError as exc:
                    record.issues.append(
                        DataQualityIssue(
                            exc.url or self.description,
                            "fetch-failed",
                            f"{label} could not be loaded: {exc}",
                            "error",
                        )
                    )
                    record.mark_missing(rtype, f"{label} could not be loaded ({exc.__class__.__name__})")
                    continue
                record.resources.extend(resources)
        return self._finish(record)

    def _finish(self, record: PatientRecord) -> PatientRecord:
        """Merge pages and searches (repeats dropped), add what the resources point to, note completeness."""
        merge_duplicates(record)
        self._add_referenced(record)
        self.completeness.apply(record)
        self.completeness.note_record(record)
        log.debug(
            "patient searches done: %d resources, %d fetch issues", len(record.resources), len(record.issues)
        )
        return record

    def _add_referenced(self, record: PatientRecord) -> None:
        """Locations of the encounters and Medications the orders point to live outside the patient compartment."""
        have = {f"{r.get('resourceType')}/{r.get('id')}" for r in record.resources}
        wanted: list[str] = []
        for r in record.resources:
            if r.get("resourceType") == "Encounter":
                for loc in r.get("location") or []:
                    ref = local_ref(((loc or {}).get("location") or {}).get("reference"))
                    if ref and ref not in have and ref not in wanted:
                        wanted.append(ref)
            med = (r.get("medicationReference") or {}).get("reference") if isinstance(r, dict) else None
            ref = local_ref(med)
            if ref and not ref.startswith("#") and ref not in have and ref not in wanted:
                wanted.append(ref)
        if not wanted:
            return
        with ThreadPoolExecutor(max_workers=min(len(wanted), self.options.concurrency)) as pool:
            results = list(pool.map(self._read_ref, wanted))
        for ref, result in zip(wanted, results, strict=True):
            if isinstance(result, dict):
                record.resources.append(result)
                if result.get("resourceType") == "Location":
                    parent = local_ref((result.get("partOf") or {}).get("reference"))
                    if parent and parent not in have and parent not in wanted:
                        got = self._read_ref(parent)
                        if isinstance(got, dict):
                            record.resources.append(got)
                            wanted.append(parent)
            else:
                record.issues.append(
                    DataQualityIssue(ref, "unresolved-reference", f"could not be read: {result}")
                )

    def _read_ref(self, ref: str) -> dict | FhirError:
        with self._shared_lock:
            cached = self._shared_cache.get(ref)
        if cached is not None:
            return cached
        rtype, rid = ref.split("/", 1)
        try:
            resource = self.read(rtype, rid)
        except FhirAuthError:
            raise
        except FhirError as exc:
            return exc
        with self._shared_lock:
            self._shared_cache[ref] = resource
        return resource

    def charts_concurrently(self, patient_ids: list[str], *, workers: int = 4) -> Iterator[tuple[str, Any]]:
        """(patient id, Chart or FhirError) for many patients, several at once; order follows patient_ids."""

        def load(pid: str) -> Any:
            try:
                return self.patient_chart(pid)
            except FhirError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fhir-chart") as pool:
            yield from zip(patient_ids, pool.map(load, patient_ids), strict=True)

    def wards(self) -> list[Ward]:
        wards = []
        for r in self.search("Location", {}):
            ref = resource_key(r)
            if ref and location_kind(r) == "ward":  # physical types from assistant/data/fhir_codes.toml
                wards.append(Ward(ref, location_name(r) or ref))
        return sorted(wards, key=lambda w: w.name)

    def ward_census(self, ward_ref: str | None = None) -> list[CensusEntry]:
        # Every status that counts as current (a FHIR search ORs comma-separated values), as the chart reads it.
        params: dict[str, str] = {"status": ",".join(sorted(fhir_codes().current_encounter_statuses))}
        if ward_ref:
            params["location"] = ward_ref
        encounters = self.search("Encounter", params)
        locations = {ref: r for r in self.search("Location", {}) if (ref := resource_key(r))}
        by_patient: dict[str, list[dict]] = {}
        for enc in encounters:
            owner = resource_owner(enc)  # never raises on a malformed subject
            if owner:
                by_patient.setdefault(owner, []).append(enc)
        entries = []
        for pid, encs in by_patient.items():
            entries.extend(census_from_encounters(pid, encs, locations, ward_ref))
        return entries


def status_error(url: str, status: int, body: Any, what: str = "the request") -> FhirError:
    """The typed error for an HTTP status that retrying will not fix; the message names the URL."""
    detail = outcome_text(body)
    suffix = f": {detail}" if detail else ""
    if status in (401, 403):
        scope = " (a bulk export needs system/*.read)" if "export" in what else ""
        return FhirAuthError(
            f"{where(url)} refused access to {what} (HTTP {status}){suffix}; check the FHIR credentials and "
            f"scopes{scope}",
            url=url,
            status=status,
            outcome=body,
        )
    if status in (404, 410):
        return FhirNotFoundError(
            f"{where(url)} was not found on the server (HTTP {status}){suffix}; check the id and the base URL "
            "(a server that offers only bulk export answers searches this way: `nva audit` uses $export)",
            url=url,
            status=status,
            outcome=body,
        )
    return FhirFatalError(
        f"{where(url)} rejected {what} (HTTP {status}){suffix}", url=url, status=status, outcome=body
    )


def parse_fhir_json(resp: requests.Response, body: bytes, expect: str | None) -> dict:
    """The FHIR resource in a 2xx answer; a truncated body is a temporary fault (fetched again)."""
    url = resp.url or ""
    status = resp.status_code
    ctype = resp.headers.get("Content-Type", "")
    if "json" not in ctype:
        raise FhirResponseError(
            f"{where(url)} answered {ctype or 'no content type'} instead of FHIR JSON; is this a FHIR base URL?",
            url=url,
            status=status,
        )
    parsed = maybe_json(body)
    if not isinstance(parsed, dict):
        raise FhirTemporaryError(
            f"{where(url)} sent a truncated or invalid JSON body ({len(body)} bytes)", url=url, status=status
        )
    if expect and parsed.get("resourceType") != expect:
        if parsed.get("resourceType") == "OperationOutcome":
            raise FhirFatalError(
                f"{where(url)} returned an OperationOutcome instead of a {expect}: {outcome_text(parsed)}",
                url=url,
                status=status,
            )
        raise FhirResponseError(
            f"{where(url)} returned {parsed.get('resourceType')!r}, expected {expect}", url=url, status=status
        )
    return parsed

"""FHIR Bulk Data $export client: kick-off, poll honouring Retry-After and X-Progress, download NDJSON files."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import requests

from connectors.errors import (
    FhirAuthError,
    FhirError,
    FhirFatalError,
    FhirNotFoundError,
    FhirResponseError,
    FhirTemporaryError,
)
from connectors.rest import (
    RETRY_STATUSES,
    RestFhirSource,
    _maybe_json,
    _retry_after_seconds,
    _where,
    outcome_text,
)

log = logging.getLogger(__name__)

COMPLETE = ".export-complete.json"
# What a chart needs: the patient compartment plus the shared resources it points to.
EXPORT_TYPES = (
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
MAX_POLL_SLEEP = 120.0


def export_operations(source: RestFhirSource) -> set[str]:
    """'system' and/or 'patient' when the CapabilityStatement advertises $export at that level."""
    try:
        caps = source.capabilities()
    except FhirError:
        return set()
    levels: set[str] = set()
    for rest in caps.get("rest") or []:
        if any(isinstance(op, dict) and op.get("name") == "export" for op in rest.get("operation") or []):
            levels.add("system")
        for res in rest.get("resource") or []:
            if (
                isinstance(res, dict)
                and res.get("type") == "Patient"
                and any(
                    isinstance(op, dict) and op.get("name") == "export" for op in res.get("operation") or []
                )
            ):
                levels.add("patient")
    return levels


def supports_bulk_export(source: RestFhirSource) -> bool:
    return bool(export_operations(source))


def _send(
    source: RestFhirSource,
    method: str,
    url: str,
    *,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    stream: bool = False,
    accept: Iterable[int] = (200, 202),
) -> requests.Response:
    """One request with the source's retries, backoff and re-authentication; typed errors otherwise."""
    reauthed = False
    attempt = 0
    accepted = set(accept)
    while True:
        attempt += 1
        wait: float | None = None
        try:
            resp = source.session.request(
                method,
                url,
                params=params,
                headers={**(headers or {}), **source.auth.headers()},
                verify=source.options.verify,
                stream=stream,
                timeout=(source.options.connect_timeout, source.options.read_timeout),
            )
        except requests.Timeout as exc:
            error: FhirError = FhirTemporaryError(
                f"no answer from {_where(url)} (timeout); the server is slow or down", url=url
            )
            error.__cause__ = exc
        except requests.ConnectionError as exc:
            error = FhirTemporaryError(
                f"cannot connect to {_where(url)}; check the URL and that the server is up", url=url
            )
            error.__cause__ = exc
        else:
            status = resp.status_code
            if status in accepted:
                return resp
            body = _maybe_json(resp.content)
            detail = outcome_text(body)
            if status == 401 and source.auth.can_refresh and not reauthed:
                reauthed = True
                source.auth.refresh()
                attempt -= 1
                continue
            if status in RETRY_STATUSES:
                error = FhirTemporaryError(
                    f"{_where(url)} answered HTTP {status}{': ' + detail if detail else ''}",
                    url=url,
                    status=status,
                )
                wait = _retry_after_seconds(resp.headers.get("Retry-After"))
            elif status in (401, 403):
                raise FhirAuthError(
                    f"{_where(url)} refused the bulk export (HTTP {status}); check the credentials "
                    "and that the client has system/*.read scope",
                    url=url,
                    status=status,
                )
            elif status in (404, 410):
                raise FhirNotFoundError(
                    f"{_where(url)} not found (HTTP {status}){': ' + detail if detail else ''}; "
                    "the export job may have expired, start again without --resume",
                    url=url,
                    status=status,
                )
            else:
                raise FhirFatalError(
                    f"{_where(url)} rejected the bulk export request (HTTP {status})"
                    f"{': ' + detail if detail else ''}",
                    url=url,
                    status=status,
                )
        if attempt > source.options.retries:
            raise error
        delay = (
            wait
            if wait is not None
            else random.uniform(  # noqa: S311 - jitter, not crypto
                0, min(source.options.backoff_cap, source.options.backoff_base * 2 ** (attempt - 1))
            )
        )
        source._sleep(min(delay, MAX_POLL_SLEEP))


def kick_off(source: RestFhirSource, *, types: Iterable[str] = EXPORT_TYPES, level: str | None = None) -> str:
    """Start an export; returns the status (polling) URL from Content-Location."""
    levels = export_operations(source)
    if level is None:
        level = "system" if "system" in levels else "patient"
    path = "$export" if level == "system" else "Patient/$export"
    params = {"_outputFormat": "application/fhir+ndjson", "_type": ",".join(types)}
    resp = _send(
        source,
        "GET",
        source.url_for(path),
        params=params,
        headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
        accept=(202,),
    )
    status_url = resp.headers.get("Content-Location")
    if not status_url:
        raise FhirResponseError(
            f"{_where(resp.url)} accepted the export but sent no Content-Location to poll",
            url=resp.url,
            status=resp.status_code,
        )
    return status_url


def poll(
    source: RestFhirSource,
    status_url: str,
    *,
    max_wait: float = 3600.0,
    on_progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Poll until the manifest is ready, sleeping as the server's Retry-After says (bounded)."""
    deadline = clock() + max_wait
    polls = 0
    while True:
        polls += 1
        resp = _send(source, "GET", status_url, headers={"Accept": "application/json"}, accept=(200, 202))
        if resp.status_code == 200:
            manifest = _maybe_json(resp.content)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                raise FhirResponseError(
                    f"{_where(status_url)} sent a bulk export manifest without an output list",
                    url=status_url,
                    status=200,
                )
            return manifest
        progress = resp.headers.get("X-Progress")
        if progress:
            log.info("bulk export in progress: %s", progress)
            if on_progress:
                on_progress(progress)
        wait = _retry_after_seconds(resp.headers.get("Retry-After"))
        if wait is None:
            wait = min(MAX_POLL_SLEEP, 1.0 * 2 ** min(polls, 6))
        if clock() + wait > deadline:
            raise FhirTemporaryError(
                f"the bulk export did not finish within {max_wait:g} s; rerun with --resume "
                "to keep polling the same job",
                url=status_url,
            )
        source._sleep(min(wait, MAX_POLL_SLEEP))


def download(source: RestFhirSource, manifest: dict, outdir: Path) -> list[Path]:
    """Stream every output file to `outdir` (tmp + rename, so a crash never leaves a half file named .ndjson)."""
    outdir.mkdir(parents=True, exist_ok=True)
    needs_token = bool(manifest.get("requiresAccessToken"))
    written: list[Path] = []
    counters: dict[str, int] = {}
    for item in manifest["output"]:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        rtype = str(item.get("type") or "Unknown")
        counters[rtype] = counters.get(rtype, 0) + 1
        target = outdir / f"{rtype}.{counters[rtype]:04d}.ndjson"
        if target.exists():
            written.append(target)  # downloaded before an interruption
            continue
        headers = {"Accept": "application/fhir+ndjson"}
        if needs_token:
            resp = _send(source, "GET", item["url"], headers=headers, stream=True, accept=(200,))
        else:
            resp = source.session.get(
                item["url"],
                headers=headers,
                stream=True,
                verify=source.options.verify,
                timeout=(source.options.connect_timeout, source.options.read_timeout),
            )
            if resp.status_code != 200:
                raise FhirFatalError(
                    f"{_where(item['url'])} answered HTTP {resp.status_code} for an export file",
                    url=item["url"],
                    status=resp.status_code,
                )
        tmp = target.with_name(target.name + ".part")
        with resp, tmp.open("wb") as fh:
            for chunk in resp.iter_content(chunk_size=1 << 16):
                fh.write(chunk)
        os.replace(tmp, target)
        written.append(target)
    errors = [e for e in manifest.get("error") or [] if isinstance(e, dict)]
    if errors:
        log.warning("the bulk export reported %d error file(s); they are listed in %s", len(errors), COMPLETE)
    return written


def bulk_export(
    source: RestFhirSource,
    outdir: Path | str,
    *,
    types: Iterable[str] = EXPORT_TYPES,
    max_wait: float = 3600.0,
    on_progress: Callable[[str], None] | None = None,
) -> Path:
    """Export the server to an NDJSON directory; an interrupted export resumes polling the same job."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if (outdir / COMPLETE).exists():
        return outdir
    job_file = outdir / ".export-job.json"
    status_url = None
    if job_file.exists():
        status_url = json.loads(job_file.read_text(encoding="utf-8")).get("status_url")
    if not status_url:
        status_url = kick_off(source, types=types)
        job_file.write_text(json.dumps({"status_url": status_url}), encoding="utf-8")
    manifest = poll(source, status_url, max_wait=max_wait, on_progress=on_progress)
    download(source, manifest, outdir)
    (outdir / COMPLETE).write_text(
        json.dumps(
            {
                "transactionTime": manifest.get("transactionTime"),
                "files": len(manifest["output"]),
                "errors": manifest.get("error") or [],
            }
        ),
        encoding="utf-8",
    )
    try:  # the spec asks clients to delete the job once the files are fetched; not fatal if the server refuses
        source.session.delete(
            status_url,
            headers=source.auth.headers(),
            verify=source.options.verify,
            timeout=(source.options.connect_timeout, source.options.read_timeout),
        )
    except requests.RequestException:
        log.info("could not delete the finished export job")
    return outdir

"""FHIR Bulk Data $export client: kick-off (only types the server serves), poll, download, say what is missing."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from assistant.normalize import CHART_TYPES
from connectors.base import ANY_TYPE, SHARED_TYPES
from connectors.errors import (
    FhirAuthError,
    FhirError,
    FhirFatalError,
    FhirNotFoundError,
    FhirResponseError,
    FhirTemporaryError,
)
from connectors.http import issue_text, maybe_json, outcome_issues, outcome_text, retry_after_seconds, where
from connectors.ndjson_dir import EXPORT_JOB, EXPORT_STATUS, ndjson_files
from connectors.rest import RestFhirSource

log = logging.getLogger(__name__)

COMPLETE = EXPORT_STATUS
JOB_FILE = EXPORT_JOB
# What a chart needs: the patient compartment plus the shared resources it points to (the chart's own list).
EXPORT_TYPES = CHART_TYPES
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


@dataclass(slots=True)
class ExportGaps:
    """What one export could not deliver; written to the status file that NdjsonDirSource reads back."""

    missing_types: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def missing(self, rtype: str, reason: str) -> None:
        if rtype in SHARED_TYPES:  # ward names, drug resources: unresolved references say it per chart
            note = f"{rtype}: {reason}"
            if note not in self.notes:
                self.notes.append(note)
            return
        self.missing_types.setdefault(rtype, reason)


def refused_types(body: object, asked: Iterable[str]) -> set[str]:
    """The asked-for types an OperationOutcome names (e.g. 'resource type "Location" is not available')."""
    text = " ".join(issue_text(i) for i in outcome_issues(body))
    return {t for t in asked if re.search(rf"\b{re.escape(t)}\b", text)}


def exportable_types(source: RestFhirSource, wanted: Iterable[str], gaps: ExportGaps) -> list[str]:
    """The wanted types the CapabilityStatement lists (all of them when it lists none)."""
    wanted = list(wanted)
    served = source.served_types()
    if served is None:
        return wanted
    for rtype in wanted:
        if rtype not in served:
            gaps.missing(rtype, "not served by the server (absent from its CapabilityStatement)")
    return [t for t in wanted if t in served]


def kick_off(
    source: RestFhirSource,
    *,
    types: Iterable[str] = EXPORT_TYPES,
    level: str | None = None,
    gaps: ExportGaps | None = None,
) -> str:
    """Start an export of the types the server serves; returns the status (polling) URL from Content-Location.

    A 400 whose OperationOutcome names some of the asked-for types is answered by asking again without them;
    the refused types go to `gaps`.
    """
    gaps = gaps if gaps is not None else ExportGaps()
    levels = export_operations(source)
    if level is None:
        level = "system" if "system" in levels else "patient"
    path = "$export" if level == "system" else "Patient/$export"
    asked = exportable_types(source, types, gaps)
    while True:
        if not asked:
            raise FhirFatalError(
                f"{where(source.url_for(path))} exports none of the resource types a chart needs "
                f"({', '.join(sorted(gaps.missing_types))})",
                url=source.url_for(path),
            )
        params = {"_outputFormat": "application/fhir+ndjson", "_type": ",".join(asked)}
        try:
            resp, _ = source.request(
                "GET",
                path,
                params=params,
                headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
                accept=(202,),
                what="the bulk export request",
            )
        except FhirFatalError as exc:
            if exc.status not in (400, 422) or isinstance(exc, (FhirAuthError, FhirNotFoundError)):
                raise
            refused = refused_types(exc.outcome, asked)
            if not refused:
                raise
            detail = outcome_text(exc.outcome)
            for rtype in sorted(refused):
                gaps.missing(rtype, f"the server refused to export it ({detail[:200]})")
            log.info("the server refused %d resource type(s); asking again without them", len(refused))
            asked = [t for t in asked if t not in refused]
            continue
        status_url = resp.headers.get("Content-Location")
        if not status_url:
            raise FhirResponseError(
                f"{where(resp.url)} accepted the export but sent no Content-Location to poll",
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
    """Poll until the manifest is ready, sleeping as the server's Retry-After says (bounded).

    Raises FhirNotFoundError when the server no longer knows the job (404/410), e.g. after a restart.
    """
    deadline = clock() + max_wait
    polls = 0
    while True:
        polls += 1
        resp, _ = source.request(
            "GET",
            status_url,
            headers={"Accept": "application/json"},
            accept=(200, 202),
            what="the bulk export status request",
        )
        if resp.status_code == 200:
            manifest = maybe_json(resp.content)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                raise FhirResponseError(
                    f"{where(status_url)} sent a bulk export manifest without an output list",
                    url=status_url,
                    status=200,
                )
            return manifest
        progress = resp.headers.get("X-Progress")
        if progress:
            log.info("bulk export in progress: %s", progress)
            if on_progress:
                on_progress(progress)
        wait = retry_after_seconds(resp.headers.get("Retry-After"))
        if wait is None:
            wait = min(MAX_POLL_SLEEP, 1.0 * 2 ** min(polls, 6))
        if clock() + wait > deadline:
            raise FhirTemporaryError(
                f"the bulk export did not finish within {max_wait:g} s; rerun with --resume "
                "to keep polling the same job",
                url=status_url,
            )
        source.sleep(min(wait, MAX_POLL_SLEEP))


def _fetch_file(source: RestFhirSource, url: str, target: Path, *, token: bool) -> None:
    """Stream one export file to `target` via a .part file; a connection broken mid-way is retried."""
    tmp = target.with_name(target.name + ".part")
    attempt = 0
    while True:
        attempt += 1
        resp, _ = source.request(
            "GET",
            url,
            headers={"Accept": "application/fhir+ndjson"},
            stream=True,
            accept=(200,),
            what="the export file download",
            auth=token,
        )
        try:
            with resp, tmp.open("wb") as fh:
                for chunk in resp.iter_content(chunk_size=1 << 16):
                    fh.write(chunk)
        except requests.RequestException as exc:
            tmp.unlink(missing_ok=True)
            if attempt > source.options.retries:
                raise FhirTemporaryError(
                    f"{where(url)} broke off the download {attempt} times ({exc.__class__.__name__})", url=url
                ) from exc
            log.info("export file download broke off (%s); fetching it again", exc.__class__.__name__)
            source.sleep(min(source.options.backoff_cap, source.options.backoff_base * 2 ** (attempt - 1)))
            continue
        os.replace(tmp, target)
        return


def _error_messages(source: RestFhirSource, item: dict, token: bool) -> list[str]:
    """The diagnostics in one manifest `error` file (NDJSON of OperationOutcomes); a placeholder if unreadable."""
    url = item.get("url")
    if not isinstance(url, str):
        return ["the export reported an error without a file"]
    try:
        resp, _ = source.request(
            "GET", url, headers={"Accept": "application/fhir+ndjson"}, accept=(200,), auth=token
        )
    except FhirError as exc:
        return [f"an export error file could not be read ({exc.__class__.__name__})"]
    out = []
    for line in resp.text.splitlines():
        text = outcome_text(maybe_json(line))
        if text:
            out.append(text[:300])
    return out or ["the export reported an error (no diagnostics)"]


def download(
    source: RestFhirSource, manifest: dict, outdir: Path, gaps: ExportGaps | None = None
) -> list[Path]:
    """Stream every output file to `outdir` (tmp + rename, so a crash never leaves a half file named .ndjson).

    A file that cannot be fetched (expired: 410, gone, broken off beyond the retries) does not stop the export:
    its type goes to `gaps` as missing, with the manifest's error entries.
    """
    gaps = gaps if gaps is not None else ExportGaps()
    outdir.mkdir(parents=True, exist_ok=True)
    token = bool(manifest.get("requiresAccessToken"))
    written: list[Path] = []
    counters: dict[str, int] = {}
    outputs = [i for i in manifest["output"] if isinstance(i, dict) and isinstance(i.get("url"), str)]
    for item in outputs:
        rtype = str(item.get("type") or ANY_TYPE)
        counters[rtype] = counters.get(rtype, 0) + 1
        target = outdir / f"{rtype if rtype != ANY_TYPE else 'Unknown'}.{counters[rtype]:04d}.ndjson"
        if target.exists():
            written.append(target)  # downloaded before an interruption
            continue
        try:
            _fetch_file(source, item["url"], target, token=token)
        except FhirAuthError:
            raise
        except FhirError as exc:
            expired = exc.status in (404, 410)
            message = (
                f"export file {counters[rtype]} of {rtype} "
                f"{'has expired or is gone' if expired else 'could not be downloaded'}"
                f"{f' (HTTP {exc.status})' if exc.status else ''}"
            )
            log.warning("%s", message)
            gaps.errors.append(message)
            gaps.missing(rtype, message)
            continue
        written.append(target)
    errors = [e for e in manifest.get("error") or [] if isinstance(e, dict)]
    for entry in errors:
        for message in _error_messages(source, entry, token):
            gaps.errors.append(message)
            named = refused_types(
                {"resourceType": "OperationOutcome", "issue": [{"diagnostics": message}]}, EXPORT_TYPES
            )
            for rtype in sorted(named) or [ANY_TYPE]:
                gaps.missing(rtype, f"the export reported an error: {message[:200]}")
    if errors:
        log.warning("the bulk export reported %d error file(s); they are listed in %s", len(errors), COMPLETE)
    return written


def _discard_files(outdir: Path) -> None:
    """Files of an earlier job: a new job has its own transaction time, so they must not be mixed in."""
    for path in ndjson_files(outdir):
        path.unlink()
    for path in outdir.glob("*.part"):
        path.unlink()


def bulk_export(
    source: RestFhirSource,
    outdir: Path | str,
    *,
    types: Iterable[str] = EXPORT_TYPES,
    max_wait: float = 3600.0,
    on_progress: Callable[[str], None] | None = None,
) -> Path:
    """Export the server to an NDJSON directory; an interrupted export resumes polling the same job.

    A job the server no longer knows (404/410 on its status URL, e.g. after a restart) is started again. What
    could not be exported is written to the status file; `NdjsonDirSource(outdir).completeness` reads it.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if (outdir / COMPLETE).exists():
        return outdir
    job_file = outdir / JOB_FILE
    gaps = ExportGaps()
    status_url = None
    if job_file.exists():
        try:
            saved = json.loads(job_file.read_text(encoding="utf-8"))
        except ValueError:
            saved = {}
        status_url = saved.get("status_url") if isinstance(saved, dict) else None
        if status_url:
            gaps.missing_types.update(saved.get("missing_types") or {})
            gaps.notes.extend(saved.get("notes") or [])
    manifest = None
    if status_url:
        try:
            manifest = poll(source, status_url, max_wait=max_wait, on_progress=on_progress)
        except FhirNotFoundError:
            log.warning("the server no longer knows the export job; starting a new one")
            _discard_files(outdir)
            gaps = ExportGaps()
    if manifest is None:
        status_url = kick_off(source, types=types, gaps=gaps)
        job_file.write_text(
            json.dumps({"status_url": status_url, "missing_types": gaps.missing_types, "notes": gaps.notes}),
            encoding="utf-8",
        )
        manifest = poll(source, status_url, max_wait=max_wait, on_progress=on_progress)
    download(source, manifest, outdir, gaps)
    (outdir / COMPLETE).write_text(
        json.dumps(
            {
                "transactionTime": manifest.get("transactionTime"),
                "files": len(manifest["output"]),
                "errors": manifest.get("error") or [],
                "missing_types": gaps.missing_types,
                "error_messages": gaps.errors,
                "notes": gaps.notes,
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
    except (requests.RequestException, FhirError):
        log.info("could not delete the finished export job")
    return outdir

"""The audit's unit of work (one batch of patients) and its per-patient step, shared by the local and dask engines."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from assistant.normalize import build_chart
from assistant.rules.engine import (
    Catalogue,
    default_catalogue,
    evaluate,
    load_catalogue,
    not_judged_rules,
    stale_data,
    types_read,
)
from assistant.rules.retrospective import episodes, period_of
from connectors.base import PatientRecord
from connectors.partition import read_partition

log = logging.getLogger(__name__)

ResultSink = Callable[[int, list[dict[str, Any]]], None]


@dataclass(frozen=True, slots=True)
class Unit:
    """One batch of work: a partition file of an NDJSON export, or patient records read by the driver."""

    index: int
    partition: str | None = None
    shared: tuple[dict, ...] = ()
    records: tuple[PatientRecord, ...] = ()
    patients: int = 0
    missing_types: tuple[
        tuple[str, str], ...
    ] = ()  # source-wide gaps (type, why) merged into partition records


@dataclass(slots=True)
class AuditOptions:
    now: datetime
    engine: str = "local"  # local | dask
    workers: int = 1
    scheduler: str | None = None
    batch_size: int = 50
    partitions: int | None = None
    catalogue_path: str | None = None
    progress: bool | None = None  # None: when stderr is a terminal
    dask_processes: bool = True  # False runs the LocalCluster's workers as threads (tests)
    # Retrospective mode: episodes over a period instead of findings at `now`. (None, None) = each chart's own span.
    retrospective: bool = False
    period_start: datetime | None = None
    period_end: datetime | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    """When the rules are judged: at one instant (bedside snapshot) or over a period (retrospective); JSON-able."""

    now: str
    retrospective: bool = False
    period_start: str | None = None
    period_end: str | None = None

    @classmethod
    def from_options(cls, options: AuditOptions, now_iso: str) -> Judgement:
        return cls(
            now=now_iso,
            retrospective=options.retrospective,
            period_start=options.period_start.isoformat() if options.period_start else None,
            period_end=options.period_end.isoformat() if options.period_end else None,
        )


def audit_record(
    record: PatientRecord, now: datetime, catalogue: Catalogue, judgement: Judgement | None = None
) -> dict[str, Any]:
    """One patient's audit as a JSON-able row; any failure is caught and reported, never raised."""
    judgement = judgement or Judgement(now=now.isoformat())
    row: dict[str, Any] = {
        "patient": f"Patient/{record.patient_id}",
        "ward": None,
        "resources": len(record.resources),
        "findings": [],
        "issues": [],
        "error": None,
    }
    # Types this chart may lack (refused for the whole source or failed for this patient): the chart is incomplete
    # for the audit when a rule reads one of them. A type no rule reads (e.g. Flag, isolation) is said, not judged.
    needed = types_read(catalogue)
    missing = {t: why for t, why in record.missing_types.items() if t in needed or t == "*"}
    unread = sorted(t for t in record.missing_types if t not in missing)
    if missing:
        row["incomplete"] = {"missing_types": sorted(missing), "reasons": missing}
    if unread:
        row["unread_types"] = unread
    if record.error is not None:
        row["patient"] = record.patient_id if ":" in record.patient_id else row["patient"]
        row["error"] = {"code": "unreadable", "message": str(record.error), "source": record.origin}
        return row
    try:
        chart = build_chart(
            record.resources, source=record.origin, patient_id=record.patient_id, issues=record.issues
        )
        skip = not_judged_rules(catalogue, set(missing))
        if skip:
            row["not_judged"] = sorted(skip)
        if judgement.retrospective:
            start, end = period_of(
                chart,
                datetime.fromisoformat(judgement.period_start) if judgement.period_start else None,
                datetime.fromisoformat(judgement.period_end) if judgement.period_end else None,
            )
            row["period"] = {
                "start": start.isoformat() if start else None,
                "end": end.isoformat() if end else None,
            }
            found = (
                episodes(chart, start=start, end=end, catalogue=catalogue, skip=skip) if start and end else []
            )
            row["episodes"] = [e.to_dict() for e in found]
        else:
            findings = evaluate(chart, now=now, catalogue=catalogue, skip=skip)
            row["findings"] = [f.to_dict() for f in findings]
            stale = stale_data(chart, now, catalogue)
            if stale is not None:
                row["stale"] = stale.to_dict()
    except Exception as exc:  # one broken patient must never stop the run; report why and move on
        row["error"] = {"code": exc.__class__.__name__, "message": str(exc)[:500], "source": record.origin}
        row["issues"] = [asdict(i) for i in record.issues]
        log.debug("patient skipped: %s", "".join(traceback.format_exception_only(exc)).strip())
        return row
    row["ward"] = (chart.encounter.ward_name or chart.encounter.ward_ref) if chart.encounter else None
    row["issues"] = [asdict(i) for i in chart.issues]
    return row


_CATALOGUES: dict[str | None, Catalogue] = {}


def cached_catalogue(path: str | None) -> Catalogue:
    if path is None:
        return default_catalogue()
    if path not in _CATALOGUES:
        _CATALOGUES[path] = load_catalogue(path)
    return _CATALOGUES[path]


def run_unit(
    unit: Unit, judgement: Judgement | str, catalogue_path: str | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """Audit one batch; runs in a worker process (local pool or dask) as well as in-process."""
    if isinstance(judgement, str):
        judgement = Judgement(now=judgement)
    now = datetime.fromisoformat(judgement.now)
    catalogue = cached_catalogue(catalogue_path)
    if unit.partition is not None:
        records: Iterable[PatientRecord] = read_partition(
            Path(unit.partition), list(unit.shared), missing_types=dict(unit.missing_types)
        )
    else:
        records = unit.records
    return unit.index, [audit_record(r, now, catalogue, judgement) for r in records]

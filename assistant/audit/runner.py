"""Batch chart audit: per-patient rule evaluation in batches, checkpointed so a killed run resumes exactly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from assistant.audit.status import RunStatus
from assistant.audit.unit import (
    AuditOptions,
    Judgement,
    ResultSink,
    Unit,
    audit_record,
    cached_catalogue,
    run_unit,
)
from assistant.normalize import CHART_TYPES
from assistant.rules.engine import types_read
from connectors.base import FhirSource, PatientRecord
from connectors.partition import PartitionedExport, partition_export

__all__ = [
    "AuditError",
    "AuditOptions",
    "AuditSummary",
    "audit_record",
    "run_audit",
]  # audit_record: dashboard

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
PARTS = "parts"
# Test hook: simulate a kill after N checkpoints ("N") or after writing part N+1 but before its checkpoint ("N+").
CRASH_ENV = "NVA_AUDIT_CRASH_AFTER"


class AuditError(RuntimeError):
    """The audit cannot start or resume as asked; the message says what to change."""


@dataclass(slots=True)
class AuditSummary:
    patients: int = 0
    resources: int = 0
    findings: int = 0
    errors: int = 0
    units: int = 0
    resumed_units: int = 0
    seconds: float = 0.0
    by_severity: dict[str, int] = field(default_factory=dict)
    global_issues: list[dict] = field(default_factory=list)
    retrospective: bool = False
    episodes: int = 0
    doses_during: int = 0  # administrations of the implicated drugs while an episode held (harm potential)
    period_start: str | None = None  # earliest / latest judged period bound over all charts
    period_end: str | None = None
    stale: int = 0  # charts whose newest data is older than some rule window at the judged time
    stale_example: str | None = None
    status: RunStatus = field(default_factory=lambda: RunStatus())

    @property
    def complete(self) -> bool:
        return self.status.complete


# --- planning ---------------------------------------------------------------------------------------------------


def plan_units(
    source: FhirSource, workdir: Path, options: AuditOptions
) -> tuple[Iterator[Unit], int | None, list]:
    """Work units in a fixed order (so a resumed run sees the same batches), the patient total, global issues."""
    from connectors.ndjson_dir import NdjsonDirSource

    if isinstance(source, NdjsonDirSource):
        root = workdir / "partitions"
        export = PartitionedExport.load(root)
        if export is None:
            shutil.rmtree(root, ignore_errors=True)
            export = partition_export(
                source, outdir=root, partitions=options.partitions, keep_types=CHART_TYPES, gz=False
            )
        shared = tuple(export.shared())
        # The partition manifest keeps the gaps (source-wide, plus files that broke off mid-way) across --resume.
        gaps = tuple(sorted(export.missing_types.items()))
        units = (
            Unit(i, partition=str(p), shared=shared, patients=export.patients[i], missing_types=gaps)
            for i, p in enumerate(export.paths)
        )
        issues = [asdict(i) for i in export.issues]
        if export.skipped_types:
            issues.append(
                {
                    "source": str(source.path),
                    "code": "not-audited",
                    "severity": "info",
                    "message": "resource types not used by the audit were skipped: "
                    + ", ".join(f"{t} ({n})" for t, n in sorted(export.skipped_types.items())),
                }
            )
        return units, sum(export.patients), issues
    return _record_batches(source.iter_patient_records(), options.batch_size), None, []


def _record_batches(records: Iterator[PatientRecord], size: int) -> Iterator[Unit]:
    batch: list[PatientRecord] = []
    index = 0
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield Unit(index, records=tuple(batch), patients=len(batch))
            index += 1
            batch = []
    if batch:
        yield Unit(index, records=tuple(batch), patients=len(batch))


# --- checkpointing ----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def catalogue_fingerprint(path: str | None) -> str:
    from assistant.rules.engine import CATALOGUE_PATH

    return hashlib.sha256(Path(path or CATALOGUE_PATH).read_bytes()).hexdigest()[:16]


class Checkpoint:
    """Completed batches of one run, kept next to the output; written atomically after each batch's part file."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        self.completed: set[int] = set()
        self.global_issues: list[dict] = []
        self._crash = os.environ.get(CRASH_ENV)

    @property
    def path(self) -> Path:
        return self.workdir / CHECKPOINT

    def part(self, index: int) -> Path:
        return self.workdir / PARTS / f"batch-{index:06d}.jsonl"

    def start(self, resume: bool) -> None:
        if resume and self.path.exists():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            mismatch = {
                k: (saved["config"].get(k), v)
                for k, v in self.config.items()
                if saved["config"].get(k) != v and k != "now"
            }
            if mismatch:
                raise AuditError(
                    "the interrupted run used different settings "
                    + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in mismatch.items())
                    + "; rerun with the same settings or without --resume"
                )
            self.config["now"] = saved["config"]["now"]
            self.completed = set(saved["completed"])
            self.completed = {i for i in self.completed if self.part(i).exists()}
            return
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        (self.workdir / PARTS).mkdir(parents=True)
        self._save()

    def _save(self) -> None:
        _atomic_write(self.path, json.dumps({"config": self.config, "completed": sorted(self.completed)}))

    def record(self, index: int, rows: list[dict[str, Any]]) -> None:
        _atomic_write(self.part(index), "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        if self._crash and self._crash.endswith("+") and len(self.completed) >= int(self._crash[:-1]):
            os._exit(137)  # test hook: killed after the part file, before the checkpoint names it
        self.completed.add(index)
        self._save()
        if self._crash and not self._crash.endswith("+") and len(self.completed) >= int(self._crash):
            os._exit(137)  # test hook: killed right after a checkpoint

    def rows(self) -> Iterator[dict[str, Any]]:
        for index in sorted(self.completed):
            with self.part(index).open("r", encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)


# --- engines ----------------------------------------------------------------------------------------------------


def run_local(units: Iterator[Unit], judgement: Judgement, options: AuditOptions, sink: ResultSink) -> None:
    if options.workers <= 1:
        for unit in units:
            sink(*run_unit(unit, judgement, options.catalogue_path))
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    window = options.workers * 2  # bounded in-flight batches: memory stays flat however large the source
    with ProcessPoolExecutor(max_workers=options.workers, mp_context=ctx) as pool:
        pending: set[Future] = set()
        for unit in units:
            pending.add(pool.submit(run_unit, unit, judgement, options.catalogue_path))
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    sink(*fut.result())
        for fut in pending:
            sink(*fut.result())


def run_audit(
    source: FhirSource,
    out: Path,
    *,
    options: AuditOptions,
    fmt: str = "jsonl",
    resume: bool = False,
    source_label: str | None = None,
    keep_work: bool = False,
) -> AuditSummary:
    """Audit every patient of `source` and write `out`; resumable from the work directory next to `out`."""
    from assistant.audit.report import write_output

    started = time.perf_counter()
    out = Path(out)
    workdir = out.with_name(out.name + ".work")
    config = {
        "source": source_label or getattr(source, "description", ""),
        "now": options.now.isoformat(),
        "catalogue": catalogue_fingerprint(options.catalogue_path),
        "batch_size": options.batch_size,
        "partitions": options.partitions,
        "period": [
            options.period_start.isoformat() if options.period_start else None,
            options.period_end.isoformat() if options.period_end else None,
        ]
        if options.retrospective
        else None,
    }
    checkpoint = Checkpoint(workdir, config)
    checkpoint.start(resume)
    now_iso = checkpoint.config["now"]
    summary = AuditSummary()
    summary.resumed_units = len(checkpoint.completed)
    units, total, global_issues = plan_units(source, workdir, options)
    summary.global_issues = global_issues
    bar = _progress(options, total)

    def todo() -> Iterator[Unit]:
        for unit in units:
            summary.units += 1
            if unit.index in checkpoint.completed:
                if bar is not None:
                    bar.update(unit.patients)
                continue
            yield unit

    def sink(index: int, rows: list[dict[str, Any]]) -> None:
        checkpoint.record(index, rows)
        if bar is not None:
            bar.update(len(rows))

    judgement = Judgement.from_options(options, now_iso)
    try:
        if options.engine == "dask":
            from assistant.audit.dask_engine import run_dask

            run_dask(todo(), judgement, options, sink)
        elif options.engine == "local":
            run_local(todo(), judgement, options, sink)
        else:
            raise AuditError(f"unknown engine {options.engine!r}; use local or dask")
    finally:
        if bar is not None:
            bar.close()
    summary.retrospective = options.retrospective
    # Read after the records: per-patient gaps fill in while they are read.
    status = RunStatus.of_source(source)
    export = PartitionedExport.load(workdir / "partitions")
    if export is not None:
        for rtype, why in export.missing_types.items():
            status.missing_types.setdefault(rtype, why)
    status.keep_needed(types_read(cached_catalogue(options.catalogue_path)))
    status.add_global_issues(global_issues)
    for row in checkpoint.rows():
        summary.patients += 0 if row["error"] and ":" in row["patient"] else 1
        summary.resources += row["resources"]
        summary.errors += 1 if row["error"] else 0
        status.add_row(row)
        for f in (*row["findings"], *row.get("episodes", ())):
            summary.findings += 1
            summary.by_severity[f["severity"]] = summary.by_severity.get(f["severity"], 0) + 1
        for e in row.get("episodes", ()):
            summary.episodes += 1
            summary.doses_during += e["doses_count"]
        period = row.get("period") or {}
        if period.get("start") and (summary.period_start is None or period["start"] < summary.period_start):
            summary.period_start = period["start"]
        if period.get("end") and (summary.period_end is None or period["end"] > summary.period_end):
            summary.period_end = period["end"]
        if row.get("stale"):
            summary.stale += 1
            summary.stale_example = summary.stale_example or row["stale"]["text"]
    summary.status = status
    write_output(
        checkpoint.rows,
        out,
        fmt=fmt,
        now=_judged_label(options, now_iso),
        source=config["source"],
        global_issues=global_issues,
        status=status,
        retrospective=options.retrospective,
    )
    if not keep_work:
        shutil.rmtree(workdir, ignore_errors=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _progress(options: AuditOptions, total: int | None) -> Any:
    show = sys.stderr.isatty() if options.progress is None else options.progress
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="patient", desc="audit", file=sys.stderr, dynamic_ncols=True)


def _judged_label(options: AuditOptions, now_iso: str) -> str:
    """What the report says was judged: the instant, the given period, or '' for each chart's own span."""
    if not options.retrospective:
        return now_iso
    if options.period_start is None and options.period_end is None:
        return ""
    start = options.period_start.isoformat() if options.period_start else "each chart's first data"
    end = options.period_end.isoformat() if options.period_end else "each chart's newest data"
    return f"{start} to {end}"

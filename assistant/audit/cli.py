"""`nva audit` (batch chart audit) and `nva rules` (the rule catalogue) subcommands."""

from __future__ import annotations

import argparse
import shutil
import sys
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import TextIO

from assistant.audit.report import FORMATS
from assistant.audit.runner import AuditError, AuditOptions, AuditSummary, run_audit
from assistant.clock import ClockError, clinical_now
from assistant.textsafe import one_line


def add_subparsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="run the chart-contradiction rules over every patient of a source",
        description="Audit every chart of SOURCE (FHIR base URL, bundle directory or NDJSON "
        "directory). Resumable: rerun with --resume after an interruption.",
    )
    p.add_argument(
        "source", help="FHIR base URL (Bulk $export when offered), bundle directory or NDJSON directory"
    )
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", choices=FORMATS, help="default: from the --out suffix, else jsonl")
    p.add_argument("--engine", choices=("local", "dask"), default="local")
    p.add_argument("--workers", type=int, default=1, help="processes (local) or dask workers (default 1)")
    p.add_argument(
        "--scheduler", help="dask scheduler address, e.g. tcp://10.0.0.5:8786 (default: a LocalCluster)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same --out")
    p.add_argument("--now", help="ISO time the audit is evaluated at (default: the current time, UTC)")
    p.add_argument(
        "--period",
        nargs="?",
        const="/",
        metavar="START/END",
        help="retrospective audit: judge every rule at each moment its inputs change over START/END (ISO dates or "
        "times, either side may be empty) and report episodes; --period alone: each chart's own span",
    )
    p.add_argument(
        "--batch-size", type=int, default=50, help="patients per batch for bundle and REST sources"
    )
    p.add_argument("--partitions", type=int, help="NDJSON partitions (default: from the export size)")
    p.add_argument("--catalogue", help="alternative rule catalogue (YAML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (parts, checkpoint)")
    p.add_argument("--export-wait", type=float, default=3600.0, help="seconds to wait for a bulk export")
    p.set_defaults(handler=cmd_audit)

    p = sub.add_parser("rules", help="list the contradiction rules, or print docs/RULES.md")
    p.add_argument("--markdown", action="store_true", help="the full catalogue documentation as Markdown")
    p.set_defaults(handler=cmd_rules)


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = Path(args.out).suffix.lower().lstrip(".")
    return {"csv": "csv", "html": "html", "htm": "html"}.get(suffix, "jsonl")


def cmd_audit(args: argparse.Namespace, out: TextIO) -> int:
    from connectors import open_source

    try:
        try:
            now = clinical_now(args.source, args.now)
        except ClockError as exc:
            raise AuditError(str(exc)) from exc
        if args.workers < 1:
            raise AuditError("--workers must be at least 1")
        if args.scheduler and args.engine != "dask":
            raise AuditError("--scheduler needs --engine dask")
        if args.period is not None and args.now:
            raise AuditError(
                "--period and --now exclude each other: a period audit judges every moment in it"
            )
        period_start, period_end = parse_period(args.period) if args.period is not None else (None, None)
        options = AuditOptions(
            now=now,
            engine=args.engine,
            workers=args.workers,
            scheduler=args.scheduler,
            batch_size=args.batch_size,
            partitions=args.partitions,
            catalogue_path=args.catalogue,
            progress=False if args.no_progress else None,
            retrospective=args.period is not None,
            period_start=period_start,
            period_end=period_end,
        )
        out_path = Path(args.out)
        source = open_source(args.source)
        export_dir = None
        from connectors.rest import RestFhirSource

        if isinstance(source, RestFhirSource):
            from connectors.bulk_export import bulk_export, supports_bulk_export

            if supports_bulk_export(source):
                from connectors.ndjson_dir import NdjsonDirSource

                export_dir = out_path.with_name(out_path.name + ".export")
                if not args.resume and export_dir.exists():
                    shutil.rmtree(export_dir)
                if sys.stderr.isatty():
                    sys.stderr.write("nva: waiting for the server's bulk $export...\n")
                bulk_export(source, export_dir, max_wait=args.export_wait)
                source.close()
                source = NdjsonDirSource(export_dir)
        with source:
            summary = run_audit(
                source,
                out_path,
                options=options,
                fmt=_format(args),
                resume=args.resume,
                source_label=args.source,
                keep_work=args.keep_work,
            )
        if export_dir is not None and not args.keep_work:
            shutil.rmtree(export_dir, ignore_errors=True)
    except AuditError as exc:
        sys.stderr.write(f"nva: error: {exc}\n")
        return 2
    out.write(summary_line(summary, out_path) + "\n")
    if summary.stale:
        out.write(
            f"note: {summary.stale} charts have no data inside some rules' windows at the judged time "
            f"(e.g. {one_line(summary.stale_example)}); use --period for a retrospective audit\n"
        )
    for note in summary.status.notes:
        out.write(f"note: {one_line(note)}\n")
    if not summary.complete:
        out.write(one_line(summary.status.banner) + "\n")
        return INCOMPLETE_EXIT
    return 0


INCOMPLETE_EXIT = (
    3  # the run finished, but part of the source was not read: its output is not the whole answer
)


def summary_line(summary: AuditSummary, out_path: Path) -> str:
    """The one line `nva audit` prints; an incomplete run starts with INCOMPLETE."""
    sev = ", ".join(f"{summary.by_severity.get(s, 0)} {s}" for s in ("high", "medium", "low"))
    head = "INCOMPLETE: " if not summary.complete else ""
    if summary.retrospective:
        span = f"{summary.period_start or '?'} to {summary.period_end or '?'}"
        what = (
            f"{summary.episodes} episodes ({sev}) over {span}, {summary.doses_during} doses of the implicated "
            "drugs given while they held"
        )
    else:
        what = f"{summary.findings} findings ({sev})"
    resumed = f"; resumed after {summary.resumed_units} finished batches" if summary.resumed_units else ""
    return (
        f"{head}audited {summary.patients} patients ({summary.resources} resources) in {summary.seconds:.1f} s: "
        f"{what}; {summary.errors} records could not be audited{resumed}. Written to {out_path}"
    )


def parse_period(text: str) -> tuple[datetime | None, datetime | None]:
    """START/END as ISO dates or times (UTC when no offset); a date END includes that whole day."""
    if "/" not in text:
        raise AuditError(
            f"--period {text!r} should be START/END, e.g. 2024-01-01/2024-12-31 (either side may be empty)"
        )
    a, b = (part.strip() for part in text.split("/", 1))

    def when(value: str, *, end: bool) -> datetime | None:
        if not value:
            return None
        try:
            if len(value) == 10:
                day = date.fromisoformat(value)
                t = datetime.combine(day, time.max if end else time.min, tzinfo=UTC)
                return t
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise AuditError(
                f"--period: {value!r} is not an ISO date or time (e.g. 2024-01-31 or 2024-01-31T08:00Z)"
            ) from exc
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    start, end = when(a, end=False), when(b, end=True)
    if start and end and end <= start:
        raise AuditError(f"--period: the end {b} is not after the start {a}")
    return start, end


def cmd_rules(args: argparse.Namespace, out: TextIO) -> int:
    from assistant.rules.docs import render_rules_markdown
    from assistant.rules.engine import default_catalogue

    catalogue = default_catalogue()
    if args.markdown:
        out.write(render_rules_markdown(catalogue))
        return 0
    for rule in catalogue.rules:
        out.write(f"{rule.id:36} {rule.severity:7} {rule.kind:30} {rule.title}\n")
    return 0

"""The `nva` command line: one entry point, subcommands that call the core and print."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from assistant.logsetup import configure_logging
from assistant.model import Chart
from assistant.settings import SettingsError
from assistant.textsafe import inert_text, one_line
from connectors.errors import FhirError

log = logging.getLogger("nva")
Handler = Callable[[argparse.Namespace, TextIO], int]


def default_anchor() -> datetime:
    """The demo ward's 'now': today 07:00 UTC, so a ward generated today looks like the start of a day shift."""
    now = datetime.now(UTC)
    return now.replace(hour=7, minute=0, second=0, microsecond=0)


def _cmd_demo_data(args: argparse.Namespace, out: TextIO) -> int:
    from assistant.demo_ward import generate_demo_ward

    anchor = datetime.fromisoformat(args.anchor) if args.anchor else default_anchor()
    if anchor.tzinfo is None:
        anchor = anchor.replace(tzinfo=UTC)
    manifest = generate_demo_ward(Path(args.outdir), anchor=anchor, seed=args.seed)
    count = len(getattr(manifest, "patient_ids", []) or [])
    out.write(f"demo ward written to {args.outdir} ({count} patients, anchor {anchor.isoformat()})\n")
    return 0


def format_chart_text(chart: Chart) -> str:
    p = chart.patient
    lines = [f"{p.name}  {p.sex or ''}  born {p.birth_date or '?'}  MRN {p.mrn or '-'}  [{p.ref}]"]
    if chart.encounter:
        e = chart.encounter
        since = f" since {e.start:%Y-%m-%d %H:%M}" if e.start else ""
        lines.append(
            f"Encounter {e.status}{since}, {e.ward_name or 'ward unknown'}, {e.bed_name or 'bed unknown'}"
            f"  [{e.ref}]"
        )
    lines.append("Allergies:")
    lines += [
        f"  - {a.substance} ({a.criticality or 'criticality unknown'})  [{a.ref}]"
        for a in chart.active_allergies()
    ]
    if not chart.active_allergies():
        lines.append("  (none recorded)")
    lines.append("Active conditions:")
    lines += [f"  - {c.text}  [{c.ref}]" for c in chart.active_conditions()]
    lines.append("Active medication orders:")
    for o in chart.active_orders():
        detail = o.dose_text or (str(o.dose) if o.dose else "")
        lines.append(f"  - {o.text} {detail} {o.route or ''}".rstrip() + f"  [{o.ref}]")
    lines.append("Latest results:")
    latest: dict[str, object] = {}
    for r in chart.results:
        if r.is_usable and (r.value is not None or r.value_text):
            latest[r.analyte] = r
    for r in latest.values():
        flag = " (abnormal)" if r.abnormal else ""  # type: ignore[attr-defined]
        lines.append(f"  - {r.name}: {r.display_value()}{flag} at {r.time:%Y-%m-%d %H:%M}  [{r.ref}]")  # type: ignore[attr-defined]
    lines.append(f"Notes: {len(chart.notes)}")
    if chart.issues:
        lines.append("Data-quality issues:")
        lines += [f"  - [{i.severity}] {i.source}: {i.code}: {i.message}" for i in chart.issues]
    return "\n".join(lines) + "\n"


def _cmd_chart(args: argparse.Namespace, out: TextIO) -> int:
    from connectors import open_source

    with open_source(args.source) as source:
        chart = source.patient_chart(args.patient, strict=args.strict)
    if args.format == "json":
        json.dump(chart.to_dict(include_resources=False), out, indent=2)
        out.write("\n")
    else:
        out.write(inert_text(format_chart_text(chart)))  # chart text is data: no terminal controls
    return 0


def _cmd_patients(args: argparse.Namespace, out: TextIO) -> int:
    from connectors import open_source

    with open_source(args.source) as source:
        if args.ward:
            for entry in source.ward_census(args.ward):
                out.write(
                    one_line(f"{entry.patient_id} {entry.ward_ref or ''} {entry.bed_ref or ''}").replace(
                        " ", "\t"
                    )
                    + "\n"
                )
        else:
            for pid in source.iter_patient_ids():
                out.write(one_line(pid) + "\n")
    return 0


def _cmd_export_ndjson(args: argparse.Namespace, out: TextIO) -> int:
    from connectors import open_source
    from connectors.ndjson_dir import write_ndjson_export

    with open_source(args.source) as source:
        records = ((r.patient_id, r.resources) for r in source.iter_patient_records() if r.error is None)
        write_ndjson_export(records, Path(args.outdir), gz=args.gzip)
    out.write(f"NDJSON export written to {args.outdir}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nva", description="Nurse Virtual Assistant")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="generate the demo ward as FHIR bundles")
    p.add_argument("outdir")
    p.add_argument("--anchor", help="ISO time the ward is generated for (default: today 07:00 UTC)")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(handler=_cmd_demo_data)

    p = sub.add_parser("chart", help="print one patient's normalized chart with provenance")
    p.add_argument("source", help="FHIR base URL, bundle directory or NDJSON directory")
    p.add_argument("--patient", required=True, help="patient id")
    p.add_argument("--format", choices=("json", "text"), default="text")
    p.add_argument("--strict", action="store_true", help="validate every resource with fhir.resources R4B")
    p.set_defaults(handler=_cmd_chart)

    p = sub.add_parser("patients", help="list patient ids (or a ward's census)")
    p.add_argument("source")
    p.add_argument("--ward", help="Location reference of a ward, e.g. Location/ward-4b")
    p.set_defaults(handler=_cmd_patients)

    p = sub.add_parser("export-ndjson", help="write a source as a Bulk Data style NDJSON directory")
    p.add_argument("source")
    p.add_argument("outdir")
    p.add_argument("--gzip", action="store_true")
    p.set_defaults(handler=_cmd_export_ndjson)

    # Subcommands that live next to their capability; imported here so `import assistant.cli` stays light.
    from assistant.audit.cli import add_subparsers as add_audit
    from assistant.summary.cli import add_subparsers as add_summary
    from guidelines.cli import add_subparsers as add_guidelines

    for register in (add_guidelines, add_audit, add_summary):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        handler = getattr(args, "handler", None)
        if handler is None:  # subcommands registered by capability modules take (args) and write to stdout
            return int(args.func(args) or 0)
        return int(handler(args, out) or 0)
    except BrokenPipeError:  # `nva ... | head` closed the pipe: not an error worth a traceback
        sys.stderr.close()
        return 0
    except FhirError as exc:
        sys.stderr.write(f"nva: error: {exc}\n")
        return 2
    # Not found (PatientNotFoundError and friends), or a setting / secrets.toml: each message says what to fix.
    except (LookupError, SettingsError) as exc:
        sys.stderr.write(f"nva: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`nva summarize` and `nva handoff`: read charts, run the rules, compose verified summaries, print."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections import Counter
from typing import Any, TextIO

from assistant.clock import clinical_now
from assistant.llm.config import BACKENDS as LLM_BACKENDS
from assistant.textsafe import inert_text

log = logging.getLogger(__name__)
BACKENDS = LLM_BACKENDS  # the choices declared for NVA_LLM_BACKEND in assistant/settings.py


def max_tokens_of(args: argparse.Namespace) -> int:
    """--max-tokens, else NVA_LLM_MAX_TOKENS (one budget for summaries and handoffs, declared once)."""
    from assistant.llm import LlmSettings

    return args.max_tokens or LlmSettings.from_env().max_tokens


def make_llm(name: str | None) -> Any | None:
    """The backend named on the command line (or NVA_LLM_BACKEND); None for `none`."""
    from assistant.llm import LlmSettings, make_backend

    settings = LlmSettings.from_env()
    if name:
        settings = dataclasses.replace(settings, backend=name)
    if settings.backend == "none":
        return None
    return make_backend(settings)


def format_summary_text(res: Any) -> str:
    lines = [
        f"Summary for {res.patient} (backend {res.backend}{' ' + res.model if res.model else ''}, "
        f"{res.latency_s:.2f} s)"
    ]
    for s in res.sentences:
        origin = "LLM" if s.origin == "llm" else "template"
        flag = "" if s.verified else " UNVERIFIED"
        lines.append(f"- {s.text}  [{', '.join(s.citations)}] ({origin}{flag})")
    for note in res.notes:
        lines.append(f"note: {note}")
    if res.dropped:
        lines.append(f"dropped {len(res.dropped)} sentence(s):")
        lines += [f"  x {s.text}  ({s.reason})" for s in res.dropped]
    return "\n".join(lines) + "\n"


def _cmd_summarize(args: argparse.Namespace, out: TextIO) -> int:
    from assistant import pipeline
    from connectors import open_source

    now = clinical_now(args.source, args.now)
    backend = make_llm(args.backend)
    with open_source(args.source) as source:
        chart = source.patient_chart(args.patient)
    view = pipeline.patient_view(chart, now, patient_id=args.patient)
    passages = (
        pipeline.guideline_passages(view.findings, pipeline.open_retriever()) if args.guidelines else []
    )
    # A stand-alone text summary: the flags are part of it (the dashboard shows them in their own column).
    res = pipeline.summary_for(view, backend, passages, max_tokens=max_tokens_of(args), include_flags=True)
    if args.format == "json":
        json.dump(res.to_dict(), out, indent=2)
        out.write("\n")
    else:
        out.write(inert_text(format_summary_text(res)))  # chart text is data: no terminal controls
    return 0


def resolve_ward(source: Any, ward: str | None) -> tuple[str | None, str | None]:
    """(Location reference, display name) for a ward given by name or reference; (None, None) for all wards."""
    if not ward:
        return None, None
    wards = source.wards()
    for w in wards:
        if ward in (w.ref, w.ref.split("/", 1)[-1]) or ward.lower() == w.name.lower():
            return w.ref, w.name
    prefix = [w for w in wards if w.name.lower().startswith(ward.lower())]
    if len(prefix) == 1:
        return prefix[0].ref, prefix[0].name
    if ward.startswith("Location/"):
        return ward, ward
    names = ", ".join(f"{w.name} ({w.ref})" for w in wards) or "none found"
    raise LookupError(f"ward {ward!r} not found; known wards: {names}")


def _cmd_handoff(args: argparse.Namespace, out: TextIO) -> int:
    from assistant import pipeline
    from assistant.summary.handoff import handoff_markdown
    from connectors import open_source

    now = clinical_now(args.source, args.now)
    backend = make_llm(args.backend)
    retriever = pipeline.open_retriever() if args.guidelines else None
    with open_source(args.source) as source:
        ward_ref, ward_name = resolve_ward(source, args.ward)
        ward = pipeline.ward_view(
            source,
            ward_ref,
            now,
            ward_name=ward_name,
            with_handoff=True,
            backend=backend,
            retriever=retriever,
            max_tokens=max_tokens_of(args),
        )
    handoff = ward.handoff
    if args.format == "json":
        json.dump(handoff.to_dict(), out, indent=2)
        out.write("\n")
    else:
        out.write(inert_text(handoff_markdown(handoff)))
    return 0


DELTA_WORDS = {
    "result-new": "new result(s)",
    "result-changed": "changed result(s)",
    "order-started": "order(s) started",
    "order-stopped": "order(s) stopped",
    "dose-given": "dose(s) given",
    "dose-held": "dose(s) not given",
    "dose-refused": "dose(s) refused",
    "dose-missed": "dose(s) missed",
    "note": "note(s)",
    "isolation-started": "isolation started",
    "isolation-lifted": "isolation lifted",
    "news2": "NEWS2 change",  # shown as "NEWS2 a -> b"
}


def census_text(ward: Any) -> str:
    """The ward census as text: sickest first, NEWS2 band, flags, holds, doses due now, changes since `since`."""
    lines = [
        f"Ward census{' - ' + ward.ward_name if ward.ward_name else ''} at {ward.now:%Y-%m-%d %H:%M} UTC "
        f"(changes since {ward.since:%Y-%m-%d %H:%M} UTC)"
    ]
    deltas = {d.patient_ref: d for d in (ward.delta.patients if ward.delta else [])}
    for r in ward.rows:
        news = f"NEWS2 {r.news2} {r.news2_band_label}" if r.news2 is not None else "NEWS2 not scored"
        if r.news2_incomplete:
            news += " (incomplete)"
        age = f" ({r.age})" if r.age is not None else ""
        lines.append(f"{r.bed or '-'}  {r.name}{age}  {news}  [{r.acuity.label}]  {r.patient_ref}")
        # Isolation (assistant.views.Isolation) when charted or not retrieved; nothing when none is charted.
        iso = getattr(r, "isolation", None)
        if iso is not None and iso.status != "none":
            lines.append(f"    {iso.text}" + (f"  ({', '.join(iso.refs)})" if iso.refs else ""))
        for b in r.badges:
            lines.append(f"    {b.severity.upper()}: {b.title}")
        for d in r.due_next_hour:
            mark = f"  {d.hold_text}" if d.hold else ""
            lines.append(f"    {'LATE' if d.state == 'late' else 'DUE'} {d.time:%H:%M} {d.label}{mark}")
        delta = deltas.get(r.patient_ref)
        if delta is not None and delta.items:
            kinds = Counter(i.kind for i in delta.items)
            counts = ", ".join(f"{kinds[k]} {w}" for k, w in DELTA_WORDS.items() if kinds[k] and k != "news2")
            change = ""
            if delta.news2_change:
                change = f"; NEWS2 {delta.news2_before} -> {delta.news2_now}"
            lines.append(f"    since {ward.since:%H:%M}: {counts}{change}")
        if r.error:
            lines.append(f"    could not be read: {r.error}")
    return "\n".join(lines) + "\n"


def _cmd_census(args: argparse.Namespace, out: TextIO) -> int:
    from assistant import pipeline
    from assistant.clock import parse_iso
    from assistant.views import to_jsonable
    from connectors import open_source

    now = clinical_now(args.source, args.now)
    since = parse_iso(args.since, what="--since") if args.since else None
    with open_source(args.source) as source:
        ward_ref, ward_name = resolve_ward(source, args.ward)
        ward = pipeline.ward_view(source, ward_ref, now, ward_name=ward_name, since=since)
    if args.format == "json":
        data = {
            "ward": ward.ward_name,
            "now": ward.now.isoformat(),
            "since": ward.since.isoformat(),
            "rows": to_jsonable(ward.rows),
            "delta": to_jsonable(ward.delta),
            "errors": ward.errors,
        }
        json.dump(data, out, indent=2)
        out.write("\n")
    else:
        out.write(inert_text(census_text(ward)))
    return 0


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("census", help="a ward's patients, sickest first, with holds and due doses")
    p.add_argument("source", help="FHIR base URL, bundle directory or NDJSON directory")
    p.add_argument("--ward", help="ward name or Location reference (default: all patients)")
    p.add_argument("--format", choices=("json", "text"), default="text")
    p.add_argument("--now", help="ISO time the census is for (default: now)")
    p.add_argument("--since", help="ISO time the shift delta starts (default: 12 h before now)")
    p.set_defaults(handler=_cmd_census)

    p = subparsers.add_parser("summarize", help="one patient's cited, verified summary")
    p.add_argument("source", help="FHIR base URL, bundle directory or NDJSON directory")
    p.add_argument("--patient", required=True, help="patient id")
    p.add_argument("--format", choices=("json", "text"), default="text")
    p.add_argument(
        "--backend", choices=BACKENDS, help="LLM backend (default: NVA_LLM_BACKEND); none = template"
    )
    p.add_argument("--now", help="ISO time the summary is written for (default: now)")
    p.add_argument("--guidelines", action="store_true", help="add guideline passages linked to the flags")
    p.add_argument("--max-tokens", type=int, help="LLM completion budget (default: NVA_LLM_MAX_TOKENS)")
    p.set_defaults(handler=_cmd_summarize)

    p = subparsers.add_parser("handoff", help="I-PASS handoff for a ward (or every patient)")
    p.add_argument("source", help="FHIR base URL, bundle directory or NDJSON directory")
    p.add_argument("--ward", help="ward name or Location reference (default: all patients)")
    p.add_argument("--format", choices=("json", "md"), default="md")
    p.add_argument(
        "--backend", choices=BACKENDS, help="LLM backend for the patient summary (default: NVA_LLM_BACKEND)"
    )
    p.add_argument("--now", help="ISO time the handoff is written for (default: now)")
    p.add_argument("--guidelines", action="store_true", help="add guideline passages linked to the flags")
    p.add_argument(
        "--max-tokens", type=int, help="LLM completion budget per patient (default: NVA_LLM_MAX_TOKENS)"
    )
    p.set_defaults(handler=_cmd_handoff)

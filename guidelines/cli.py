"""`guidelines ingest|search|stats` subcommands (registered into the `nva` CLI via add_subparsers)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from guidelines.errors import GuidelineError

log = logging.getLogger(__name__)


def _store():
    from guidelines.store import open_store

    return open_store()


def cmd_ingest(args: argparse.Namespace) -> int:
    from guidelines.embedding import get_embedder
    from guidelines.ingest import ingest

    try:
        store = _store()
        report = ingest(args.paths, store, get_embedder(), prune=args.prune)
    except GuidelineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if getattr(args, "format", "text") == "json":
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(report.summary() + "\n")
        for f, err in report.errors:
            sys.stdout.write(f"  skipped {f}: {err}\n")
    return 1 if report.errors else 0


def _rules_in_question(query: str) -> list[str]:
    """A question with a lab value ('K is 5.9 and KCl is ordered') is about the rule that value trips."""
    try:
        from assistant.rules.query_hint import rules_suggested_by
    except ImportError:  # the guideline store also runs without NVA's core, e.g. on a separate ingest host
        return []
    return rules_suggested_by(query)


def cmd_search(args: argparse.Namespace) -> int:
    from guidelines.embedding import get_embedder
    from guidelines.retrieval import GuidelineRetriever

    try:
        retriever = GuidelineRetriever(_store(), get_embedder())
        rule_ids = args.rule or _rules_in_question(args.query)
        hits = retriever.search(
            args.query, k=args.k, rule_ids=rule_ids or None, doc_ids=args.doc or None, tags=args.tag or None
        )
    except GuidelineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.format == "json":
        sys.stdout.write(json.dumps([h.to_dict() for h in hits], indent=2) + "\n")
        return 0
    if not hits:
        sys.stdout.write("no guideline passages found (is the store empty? run `guidelines ingest`)\n")
        return 0
    for i, h in enumerate(hits, 1):
        page = f" p.{h.page}" if h.page else ""
        snippet = " ".join(h.text.split())
        snippet = snippet if len(snippet) <= 300 else snippet[:297] + "..."
        sys.stdout.write(f"{i}. [{h.citation}] {h.section_path}{page} (score {h.score:.4f})\n   {snippet}\n")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        stats = _store().stats()
    except GuidelineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    d = stats.to_dict()
    if args.format == "json":
        sys.stdout.write(json.dumps(d) + "\n")
        return 0
    last = (
        datetime.fromtimestamp(d["last_ingest"], UTC).isoformat(timespec="seconds")
        if d["last_ingest"]
        else "never"
    )
    sys.stdout.write(f"documents: {d['documents']}\nchunks: {d['chunks']}\nlast ingest: {last}\n")
    return 0


def add_subparsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `guidelines` with `ingest`, `search` and `stats`; each sets `func(args) -> exit code`."""
    g = subparsers.add_parser("guidelines", help="ingest and search nursing guidelines")
    gsub = g.add_subparsers(dest="guidelines_command", required=True)

    p = gsub.add_parser("ingest", help="ingest guideline files or directories (idempotent)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--prune", action="store_true", help="remove documents whose source file is gone from PATHs"
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_ingest)

    p = gsub.add_parser("search", help="hybrid (vector + BM25) guideline search")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="number of passages (default 5)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--rule", action="append", help="rule id whose linked guidelines rank first (repeatable)")
    p.add_argument("--doc", action="append", help="restrict to a document id (repeatable)")
    p.add_argument("--tag", action="append", help="restrict to documents with this tag (repeatable)")
    p.set_defaults(func=cmd_search)

    p = gsub.add_parser("stats", help="documents, chunks and last ingest time")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_stats)
    return g


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m guidelines.cli guidelines search "K+ replacement"`."""
    parser = argparse.ArgumentParser(prog="nva")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Idempotent ingestion of guideline files into a GuidelineStore (unchanged docs skipped, changed replaced)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guidelines.chunking import ChunkParams, chunk_document, doc_hash
from guidelines.embedding import Embedder, get_embedder
from guidelines.errors import GuidelineError, GuidelineFileError
from guidelines.parsing import SUPPORTED_SUFFIXES, parse_file
from guidelines.store import DocInfo, GuidelineStore

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """Outcome of one ingest run; `errors` pairs a file with the reason it was skipped."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    chunks_written: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["errors"] = [{"file": f, "error": e} for f, e in self.errors]
        return d

    def summary(self) -> str:
        return (
            f"added {len(self.added)}, updated {len(self.updated)}, unchanged {len(self.unchanged)}, "
            f"removed {len(self.removed)}, chunks written {self.chunks_written}, errors {len(self.errors)} "
            f"in {self.seconds:.1f}s"
        )


def discover(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand directories into supported files (recursively, skipping hidden and `_`-prefixed names).

    Explicitly named files are kept whatever their type so that parse_file reports unsupported ones.
    """
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if (
                    f.is_file()
                    and not any(part.startswith((".", "_")) for part in rel)
                    and f.suffix.lower() in SUPPORTED_SUFFIXES
                    and f.name.lower() != "readme.md"
                ):
                    files.append(f)
        elif p.exists():
            files.append(p)
        else:
            errors.append((str(p), "path does not exist; check the spelling"))
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique, errors


def _under(source: str, roots: list[Path]) -> bool:
    sp = Path(source)
    for r in roots:
        if sp == r or r in sp.parents:
            return True
    return False


def ingest(
    paths: Iterable[str | Path],
    store: GuidelineStore,
    embedder: Embedder | None = None,
    *,
    prune: bool = False,
    params: ChunkParams | None = None,
    progress: bool | None = None,
) -> IngestReport:
    """Ingest files/directories; re-running on unchanged files writes nothing.

    With `prune`, documents whose source file lies under the given paths but produced no document this run
    (file deleted, or its id changed) are removed.
    A file that fails to parse is reported in `errors` and the rest continue.
    """
    t0 = time.perf_counter()
    paths = [Path(p) for p in paths]
    report = IngestReport()
    files, report.errors = discover(paths)
    existing = store.list_docs()
    model_name = embedder.name if embedder is not None else None
    seen_ids: dict[str, str] = {}
    failed_sources: set[str] = set()
    show = sys.stderr.isatty() if progress is None else progress
    iterator: Iterable[Path] = files
    if show and files:
        from tqdm import tqdm

        iterator = tqdm(files, desc="ingest guidelines", unit="file", file=sys.stderr)
    for f in iterator:
        try:
            doc = parse_file(f)
        except GuidelineFileError as exc:
            log.warning("skipping guideline file: %s", exc)
            report.errors.append((exc.path, exc.reason))
            failed_sources.add(str(f.resolve()))
            continue
        if doc.doc_id in seen_ids:
            reason = (
                f"duplicate document id {doc.doc_id!r} (also in {seen_ids[doc.doc_id]}); give it a unique id"
            )
            report.errors.append((str(f), reason))
            continue
        seen_ids[doc.doc_id] = doc.source_file
        if embedder is None:
            embedder = get_embedder()
            model_name = embedder.name
        dh = doc_hash(doc, model_name or "")
        old = existing.get(doc.doc_id)
        if old is not None and old.doc_hash == dh:
            if old.source_file != doc.source_file:
                # Same content moved to another path: only the registry changes.
                old.source_file = doc.source_file
                store.set_doc(old)
            report.unchanged.append(doc.doc_id)
            continue
        chunks = chunk_document(doc, params, model_name or "")
        try:
            vectors = embedder.embed_documents([c.embed_text for c in chunks])
            if old is not None:
                store.delete_doc(doc.doc_id)
            store.upsert_chunks(chunks, vectors)
            store.set_doc(
                DocInfo(
                    doc.doc_id,
                    dh,
                    doc.source_file,
                    doc.title,
                    doc.version,
                    len(chunks),
                    time.time(),
                    list(doc.rules),
                    list(doc.tags),
                )
            )
        except GuidelineError as exc:
            report.errors.append((str(f), str(exc)))
            continue
        report.chunks_written += len(chunks)
        (report.updated if old is not None else report.added).append(doc.doc_id)
    if prune:
        roots = [p.resolve() for p in paths]
        for doc_id, info in existing.items():
            if doc_id in seen_ids or not info.source_file:
                continue
            # Every supported file under the roots was parsed this run, so an id not seen is gone
            # (deleted, or its file now carries another id) unless its file failed to parse.
            if _under(info.source_file, roots) and info.source_file not in failed_sources:
                store.delete_doc(doc_id)
                report.removed.append(doc_id)
    report.seconds = time.perf_counter() - t0
    log.info("guideline ingest: %s", report.summary())
    return report

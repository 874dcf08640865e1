"""Structure-aware chunking: size-bounded, overlapping chunks that keep their heading path and page."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from guidelines.parsing import ParsedDocument

# Bump when chunking output changes so every document is re-chunked on the next ingest.
CHUNKER_VERSION = "1"
PATH_SEP = " > "


@dataclass(frozen=True)
class ChunkParams:
    """Word bounds: chunks aim for `target_words`, never exceed `max_words`, and repeat `overlap_words`."""

    min_words: int = 120
    target_words: int = 200
    max_words: int = 250
    overlap_words: int = 40


@dataclass
class Chunk:
    """One retrievable passage; `embed_text` is what gets embedded (title and heading path prefix)."""

    chunk_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def citation(self) -> str:
        return f"guideline:{self.chunk_id}"

    @property
    def embed_text(self) -> str:
        return embed_text(self.metadata.get("section_path", ""), self.text)


def embed_text(section_path: str, text: str) -> str:
    return f"{section_path}\n{text}" if section_path else text


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+(?=[A-Z0-9(\"'\-•*])|\n+")


def split_units(text: str) -> list[str]:
    """Split into sentence-ish units; list items and lines stay whole."""
    units = [u.strip() for u in _SENTENCE_END.split(text) if u and u.strip()]
    out: list[str] = []
    for u in units:
        words = u.split()
        # A run-on unit longer than a whole chunk is cut on word boundaries.
        while len(words) > 120:
            out.append(" ".join(words[:100]))
            words = words[100:]
        if words:
            out.append(" ".join(words))
    return out


def _pack(units: list[str], params: ChunkParams) -> list[list[str]]:
    total = sum(len(u.split()) for u in units)
    if total <= params.max_words:
        return [units]
    n = math.ceil(total / params.target_words)
    per_chunk = total / n
    chunks: list[list[str]] = []
    current: list[str] = []
    count = 0
    for u in units:
        w = len(u.split())
        if current and (count + w > params.max_words or count >= per_chunk):
            chunks.append(current)
            overlap: list[str] = []
            ow = 0
            for prev in reversed(current):
                pw = len(prev.split())
                if ow + pw > params.overlap_words:
                    break
                overlap.insert(0, prev)
                ow += pw
            current, count = overlap, ow
        current.append(u)
        count += w
    if current:
        new_words = count
        # Fold a small tail into the previous chunk when it fits, instead of a tiny last chunk.
        if chunks and new_words < params.min_words // 2:
            prev_words = sum(len(u.split()) for u in chunks[-1])
            tail = [u for u in current if u not in chunks[-1]]
            if prev_words + sum(len(u.split()) for u in tail) <= params.max_words:
                chunks[-1] = chunks[-1] + tail
                return chunks
        chunks.append(current)
    return chunks


def doc_hash(doc: ParsedDocument, model_name: str = "") -> str:
    """Hash of the file bytes, the chunker version and the embedding model: any change means re-ingest."""
    h = hashlib.sha256()
    for part in (doc.raw_hash, CHUNKER_VERSION, model_name, doc.doc_id):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def chunk_document(
    doc: ParsedDocument, params: ChunkParams | None = None, model_name: str = ""
) -> list[Chunk]:
    """Chunk a parsed document; ids are `<doc_id>#<n>` in reading order, so re-ingest overwrites in place."""
    params = params or ChunkParams()
    dh = doc_hash(doc, model_name)
    chunks: list[Chunk] = []
    for section in doc.sections:
        units = split_units(section.text)
        if not units:
            continue
        section_path = PATH_SEP.join(section.headings)
        for group in _pack(units, params):
            text = _join_units(group)
            meta: dict[str, Any] = {
                "doc_id": doc.doc_id,
                "title": doc.title,
                "section_path": section_path,
                "section": section.headings[-1] if section.headings else doc.title,
                "version": doc.version,
                "source_file": doc.source_file,
                "content_hash": hashlib.sha256(text.encode()).hexdigest()[:16],
                "doc_hash": dh,
                "rules": ",".join(doc.rules),
                "tags": ",".join(doc.tags),
                "last_reviewed": doc.last_reviewed,
                "word_count": len(text.split()),
            }
            if section.page is not None:
                meta["page"] = section.page
            # Per-rule and per-tag boolean keys make chroma where-filters possible (no substring match there).
            for r in doc.rules:
                meta[f"rule:{r}"] = True
            for t in doc.tags:
                meta[f"tag:{t}"] = True
            chunks.append(Chunk(f"{doc.doc_id}#{len(chunks)}", text, meta))
    return chunks


def _join_units(units: list[str]) -> str:
    out = ""
    for u in units:
        if not out:
            out = u
        elif u.startswith(("- ", "* ", "• ")) or re.match(r"^\d+[.)]\s", u) or "|" in u:
            out += "\n" + u
        else:
            out += " " + u
    return out

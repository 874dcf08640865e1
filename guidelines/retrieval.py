"""Hybrid guideline retrieval: vector search fused with BM25 by reciprocal rank fusion, abbreviation expansion."""

from __future__ import annotations

import json
import re
import threading
import tomllib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from guidelines.bm25 import BM25Index, tokenize
from guidelines.embedding import Embedder
from guidelines.store import GuidelineStore, StoredChunk, Where, matches_where

ABBREVIATIONS_FILE = Path(__file__).resolve().parent / "abbreviations.toml"


@dataclass
class GuidelineHit:
    """One retrieved passage; cite it as `citation` (`guideline:<chunk-id>`)."""

    citation: str
    chunk_id: str
    doc_id: str
    title: str
    section_path: str
    section: str
    text: str
    score: float
    page: int | None = None
    version: str = ""
    rules: list[str] = field(default_factory=list)
    vector_score: float | None = None
    bm25_score: float | None = None
    rule_linked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AbbreviationExpander:
    """Appends the long forms of nursing abbreviations found in a text (data: abbreviations.toml)."""

    def __init__(self, mapping: dict[str, list[str]], case_sensitive: set[str] | None = None) -> None:
        self.mapping = mapping
        cs = case_sensitive or set()
        # One alternation per case mode (longest keys first so "NEWS2" wins over "NEWS", "K+" over "K"):
        # a single regex pass keeps indexing 100k chunks fast.
        self._lookup_ci: dict[str, list[str]] = {}
        self._lookup_cs: dict[str, list[str]] = {}
        for key, longs in mapping.items():
            table, k = (self._lookup_cs, key) if key in cs else (self._lookup_ci, key.lower())
            table.setdefault(k, [])
            table[k] += [x for x in longs if x not in table[k]]
        self._patterns: list[tuple[re.Pattern[str], dict[str, list[str]], bool]] = []
        for table, ci in ((self._lookup_cs, False), (self._lookup_ci, True)):
            if table:
                keys = sorted(table, key=len, reverse=True)
                alt = "|".join(re.escape(k) for k in keys)
                pat = re.compile(rf"(?<![A-Za-z0-9])(?:{alt})(?![A-Za-z0-9+])", re.IGNORECASE if ci else 0)
                self._patterns.append((pat, table, ci))

    @classmethod
    def from_file(cls, path: str | Path = ABBREVIATIONS_FILE) -> AbbreviationExpander:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        return cls(
            {k: list(v) for k, v in data.get("abbreviations", {}).items()},
            set(data.get("case_sensitive", [])),
        )

    def expansions(self, text: str) -> list[str]:
        found: list[str] = []
        lowered = text.lower()
        for pat, table, ci in self._patterns:
            for m in pat.finditer(text):
                for long in table[m.group(0).lower() if ci else m.group(0)]:
                    if long.lower() not in lowered and long not in found:
                        found.append(long)
        return found

    def expand(self, text: str) -> str:
        extra = self.expansions(text)
        return f"{text} ({'; '.join(extra)})" if extra else text


@lru_cache(maxsize=1)
def default_expander() -> AbbreviationExpander:
    return AbbreviationExpander.from_file()


class _KeywordIndex:
    """BM25 over a snapshot of the store's chunks plus their metadata for filtering."""

    def __init__(self, chunks: list[StoredChunk], expander: AbbreviationExpander) -> None:
        self.chunks = chunks
        self.pos = {c.chunk_id: i for i, c in enumerate(chunks)}
        docs_tokens = []
        for c in chunks:
            section_path = c.metadata.get("section_path", "")
            text = f"{section_path}\n{c.text}"
            # Document-side expansion lets "potassium" queries match chunks that only say "K+".
            docs_tokens.append(tokenize(text + " " + " ".join(expander.expansions(text))))
        self.bm25 = BM25Index(docs_tokens)
        self._masks: dict[str, np.ndarray] = {}

    def mask(self, where: Where | None) -> np.ndarray | None:
        if not where:
            return None
        key = json.dumps(where, sort_keys=True)
        m = self._masks.get(key)
        if m is None:
            m = np.fromiter(
                (matches_where(where, c.metadata) for c in self.chunks), dtype=bool, count=len(self.chunks)
            )
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[key] = m
        return m

    def search(self, query: str, k: int, where: Where | None) -> list[StoredChunk]:
        out = []
        for i, s in self.bm25.top(tokenize(query), k, self.mask(where)):
            c = self.chunks[i]
            out.append(StoredChunk(c.chunk_id, c.text, c.metadata, s))
        return out


def _and(*conds: Where | None) -> Where | None:
    parts = [c for c in conds if c]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"$and": parts}


def _any_true(keys: list[str]) -> Where | None:
    if not keys:
        return None
    if len(keys) == 1:
        return {keys[0]: True}
    return {"$or": [{k: True} for k in keys]}


class GuidelineRetriever:
    """search(query) -> ranked GuidelineHit list; BM25 index rebuilt lazily when the store revision changes."""

    def __init__(
        self,
        store: GuidelineStore,
        embedder: Embedder,
        *,
        expander: AbbreviationExpander | None = None,
        rrf_k: int = 60,
        candidates: int = 30,
        hybrid: bool = True,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.expander = expander or default_expander()
        self.rrf_k = rrf_k
        self.candidates = candidates
        self.hybrid = hybrid
        self._index: _KeywordIndex | None = None
        self._index_rev: str | None = None
        self._lock = threading.Lock()

    def keyword_index(self) -> _KeywordIndex:
        rev = self.store.revision()
        with self._lock:
            if self._index is None or self._index_rev != rev:
                self._index = _KeywordIndex(list(self.store.iter_chunks()), self.expander)
                self._index_rev = rev
            return self._index

    def search(
        self,
        query: str,
        k: int = 5,
        where: Where | None = None,
        rule_ids: list[str] | None = None,
        doc_ids: list[str] | None = None,
        tags: list[str] | None = None,
    ) -> list[GuidelineHit]:
        """Top-k passages. `where` is a chroma-style metadata filter; `doc_ids`/`tags` are shortcuts for it.

        With `rule_ids`, passages from documents whose front matter lists any of those rules come first.
        """
        if not query.strip() or k <= 0:
            return []
        expanded = self.expander.expand(query)
        qvec = self.embedder.embed_query(expanded)
        base = _and(
            where,
            {"doc_id": {"$in": list(doc_ids)}} if doc_ids else None,
            _any_true([f"tag:{t}" for t in tags or []]),
        )
        n = max(self.candidates, 4 * k)
        ranked = self._fused(expanded, qvec, n, base)
        linked: list[tuple[StoredChunk, float, dict[str, float]]] = []
        if rule_ids:
            rule_where = _and(base, _any_true([f"rule:{r}" for r in rule_ids]))
            linked = self._fused(expanded, qvec, n, rule_where)
            linked_ids = {c.chunk_id for c, _, _ in linked}
            ranked = [r for r in ranked if r[0].chunk_id not in linked_ids]
        hits = [self._hit(c, s, parts, True) for c, s, parts in linked[:k]]
        hits += [self._hit(c, s, parts, False) for c, s, parts in ranked[: k - len(hits)]]
        return hits

    def _fused(
        self, query: str, qvec: np.ndarray, n: int, where: Where | None
    ) -> list[tuple[StoredChunk, float, dict[str, float]]]:
        lists = [("vector", self.store.query(qvec, n, where))]
        if self.hybrid:
            lists.append(("bm25", self.keyword_index().search(query, n, where)))
        scores: dict[str, float] = {}
        chunks: dict[str, StoredChunk] = {}
        parts: dict[str, dict[str, float]] = {}
        for name, items in lists:
            for rank, c in enumerate(items):
                scores[c.chunk_id] = scores.get(c.chunk_id, 0.0) + 1.0 / (self.rrf_k + rank + 1)
                chunks.setdefault(c.chunk_id, c)
                if c.score is not None:
                    parts.setdefault(c.chunk_id, {})[name] = c.score
        order = sorted(scores, key=lambda cid: (-scores[cid], cid))
        return [(chunks[cid], scores[cid], parts.get(cid, {})) for cid in order]

    @staticmethod
    def _hit(c: StoredChunk, score: float, parts: dict[str, float], linked: bool) -> GuidelineHit:
        m = c.metadata
        page = m.get("page")
        return GuidelineHit(
            citation=f"guideline:{c.chunk_id}",
            chunk_id=c.chunk_id,
            doc_id=str(m.get("doc_id", "")),
            title=str(m.get("title", "")),
            section_path=str(m.get("section_path", "")),
            section=str(m.get("section", "")),
            text=c.text,
            score=round(score, 6),
            page=int(page) if page is not None else None,
            version=str(m.get("version", "")),
            rules=[r for r in str(m.get("rules", "")).split(",") if r],
            vector_score=parts.get("vector"),
            bm25_score=parts.get("bm25"),
            rule_linked=linked,
        )

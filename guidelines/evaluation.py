"""Retrieval evaluation over a YAML list of {query, doc, section}: recall@k and MRR."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from guidelines.chunking import PATH_SEP
from guidelines.retrieval import GuidelineHit, GuidelineRetriever


@dataclass
class EvalItem:
    query: str
    doc: str
    section: str | None = None
    rule_ids: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    n: int
    recall_at_1: float
    recall_at_5: float
    mrr: float
    misses: list[dict[str, Any]] = field(default_factory=list)


def load_eval_set(path: str | Path) -> list[EvalItem]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if isinstance(data, dict):
        data = data.get("items") or data.get("queries") or []
    items = []
    for row in data or []:
        items.append(
            EvalItem(
                query=str(row["query"]),
                doc=str(row["doc"]),
                section=str(row["section"]) if row.get("section") else None,
                rule_ids=[str(r) for r in row.get("rule_ids") or []],
            )
        )
    return items


def _norm(s: str) -> str:
    return " ".join(s.lower().replace("#", "").split())


def is_relevant(hit: GuidelineHit, item: EvalItem) -> bool:
    """Same document, and the expected section is the hit's leaf heading or any heading on its path."""
    if hit.doc_id != item.doc:
        return False
    if not item.section:
        return True
    want = _norm(item.section)
    return want == _norm(hit.section) or want in {_norm(p) for p in hit.section_path.split(PATH_SEP)}


def evaluate(retriever: GuidelineRetriever, items: list[EvalItem], k: int = 5) -> EvalResult:
    r1 = r5 = 0
    rr = 0.0
    misses = []
    for item in items:
        hits = retriever.search(item.query, k=max(k, 10), rule_ids=item.rule_ids or None)
        rank = next((i + 1 for i, h in enumerate(hits) if is_relevant(h, item)), None)
        if rank == 1:
            r1 += 1
        if rank is not None and rank <= k:
            r5 += 1
        if rank is not None:
            rr += 1.0 / rank
        if rank is None or rank > k:
            misses.append(
                {
                    "query": item.query,
                    "doc": item.doc,
                    "section": item.section,
                    "rank": rank,
                    "top": [f"{h.doc_id} :: {h.section}" for h in hits[:3]],
                }
            )
    n = len(items) or 1
    return EvalResult(len(items), r1 / n, r5 / n, rr / n, misses)

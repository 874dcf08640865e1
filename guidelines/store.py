"""Guideline vector store: the GuidelineStore interface, a chroma implementation and an in-memory fake."""

from __future__ import annotations

import json
import logging
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from guidelines.chunking import Chunk
from guidelines.errors import GuidelineStoreError
from guidelines.settings import DEFAULT_COLLECTION, DEFAULT_HNSW, GuidelineSettings

log = logging.getLogger(__name__)

Where = dict[str, Any]


@dataclass
class DocInfo:
    """What the store knows about one ingested document."""

    doc_id: str
    doc_hash: str
    source_file: str
    title: str = ""
    version: str = ""
    chunks: int = 0
    ingested_at: float = 0.0
    rules: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@dataclass
class StoredChunk:
    """A chunk read back from the store; `score` is cosine similarity for vector queries."""

    chunk_id: str
    text: str
    metadata: dict[str, Any]
    score: float | None = None


@dataclass
class StoreStats:
    documents: int
    chunks: int
    last_ingest: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"documents": self.documents, "chunks": self.chunks, "last_ingest": self.last_ingest}


class GuidelineStore(ABC):
    """Chunks with vectors and metadata, plus a per-document registry of hashes for idempotent ingest."""

    @abstractmethod
    def upsert_chunks(self, chunks: Sequence[Chunk], embeddings: np.ndarray) -> None: ...

    @abstractmethod
    def set_doc(self, info: DocInfo) -> None:
        """Record a document's hash and source after its chunks were written."""

    @abstractmethod
    def delete_doc(self, doc_id: str) -> int:
        """Remove a document's chunks and registry entry; return the number of chunks removed."""

    @abstractmethod
    def list_docs(self) -> dict[str, DocInfo]: ...

    @abstractmethod
    def query(self, embedding: np.ndarray, k: int, where: Where | None = None) -> list[StoredChunk]: ...

    @abstractmethod
    def get(self, chunk_ids: Sequence[str]) -> list[StoredChunk]: ...

    @abstractmethod
    def iter_chunks(self, batch_size: int = 1000) -> Iterator[StoredChunk]: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def revision(self) -> str:
        """Changes whenever the contents change; retrievers key their caches on it."""

    @abstractmethod
    def stats(self) -> StoreStats: ...


def matches_where(where: Where | None, metadata: dict[str, Any]) -> bool:
    """Evaluate a chroma-style where filter ($and/$or, $eq/$ne/$in/$nin/$gt/$gte/$lt/$lte) in Python."""
    if not where:
        return True
    for key, cond in where.items():
        if key == "$and":
            if not all(matches_where(c, metadata) for c in cond):
                return False
        elif key == "$or":
            if not any(matches_where(c, metadata) for c in cond):
                return False
        else:
            value = metadata.get(key)
            if not isinstance(cond, dict):
                cond = {"$eq": cond}
            for op, arg in cond.items():
                if not _compare(op, value, arg):
                    return False
    return True


def _compare(op: str, value: Any, arg: Any) -> bool:
    if op == "$eq":
        return value == arg
    if op == "$ne":
        return value != arg
    if op == "$in":
        return value in arg
    if op == "$nin":
        return value not in arg
    if value is None:
        return False
    if op == "$gt":
        return value > arg
    if op == "$gte":
        return value >= arg
    if op == "$lt":
        return value < arg
    if op == "$lte":
        return value <= arg
    raise ValueError(f"unsupported where operator {op!r}; use $eq, $ne, $in, $nin, $gt, $gte, $lt, $lte")


class InMemoryGuidelineStore(GuidelineStore):
    """Exact brute-force store for unit tests and tiny corpora."""

    def __init__(self) -> None:
        self._chunks: dict[str, StoredChunk] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self._docs: dict[str, DocInfo] = {}
        self._rev = 0
        self._last_ingest: float | None = None

    def upsert_chunks(self, chunks: Sequence[Chunk], embeddings: np.ndarray) -> None:
        if len(chunks) != len(embeddings):
            raise GuidelineStoreError(f"{len(chunks)} chunks but {len(embeddings)} embeddings")
        for c, e in zip(chunks, embeddings, strict=True):
            self._chunks[c.chunk_id] = StoredChunk(c.chunk_id, c.text, dict(c.metadata))
            self._vectors[c.chunk_id] = np.asarray(e, dtype=np.float32)
        self._touch()

    def set_doc(self, info: DocInfo) -> None:
        self._docs[info.doc_id] = info
        self._touch()

    def delete_doc(self, doc_id: str) -> int:
        ids = [cid for cid, c in self._chunks.items() if c.metadata.get("doc_id") == doc_id]
        for cid in ids:
            del self._chunks[cid]
            del self._vectors[cid]
        self._docs.pop(doc_id, None)
        self._touch()
        return len(ids)

    def list_docs(self) -> dict[str, DocInfo]:
        return dict(self._docs)

    def query(self, embedding: np.ndarray, k: int, where: Where | None = None) -> list[StoredChunk]:
        ids = [cid for cid, c in self._chunks.items() if matches_where(where, c.metadata)]
        if not ids or k <= 0:
            return []
        mat = np.stack([self._vectors[i] for i in ids])
        sims = mat @ np.asarray(embedding, dtype=np.float32)
        order = np.argsort(-sims, kind="stable")[:k]
        return [
            StoredChunk(
                ids[i], self._chunks[ids[i]].text, dict(self._chunks[ids[i]].metadata), float(sims[i])
            )
            for i in order
        ]

    def get(self, chunk_ids: Sequence[str]) -> list[StoredChunk]:
        return [self._chunks[c] for c in chunk_ids if c in self._chunks]

    def iter_chunks(self, batch_size: int = 1000) -> Iterator[StoredChunk]:
        yield from list(self._chunks.values())

    def count(self) -> int:
        return len(self._chunks)

    def revision(self) -> str:
        return str(self._rev)

    def stats(self) -> StoreStats:
        return StoreStats(len(self._docs), len(self._chunks), self._last_ingest)

    def _touch(self) -> None:
        self._rev += 1
        self._last_ingest = time.time()


_META_ID = "__store_meta__"


class ChromaGuidelineStore(GuidelineStore):
    """chromadb-backed store: PersistentClient(path) by default, HttpClient(host, port) for a shared server.

    Chunks live in `<collection>`; a companion `<collection>_docs` collection holds one record per document
    (hash, source file) and a meta record (revision, last ingest time), so listing documents never scans chunks.
    Embeddings are always passed explicitly: chroma's default embedding function would download a model.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        host: str | None = None,
        port: int = 8000,
        collection: str = DEFAULT_COLLECTION,
        hnsw: dict[str, int] | None = None,
        client: Any = None,
    ) -> None:
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        try:
            if client is not None:
                self._client = client
            elif host:
                self._client = chromadb.HttpClient(host=host, port=port, settings=settings)
            else:
                if path is None:
                    raise GuidelineStoreError("ChromaGuidelineStore needs a data directory path or a host")
                Path(path).mkdir(parents=True, exist_ok=True)
                self._client = chromadb.PersistentClient(path=str(path), settings=settings)
            hnsw_cfg = {"space": "cosine", **DEFAULT_HNSW, **(hnsw or {})}
            self._col = self._client.get_or_create_collection(
                collection, configuration={"hnsw": hnsw_cfg}, embedding_function=None
            )
            # The registry holds no meaningful vectors; a 1-d constant keeps chroma satisfied.
            self._docs_col = self._client.get_or_create_collection(
                f"{collection}_docs", configuration={"hnsw": {"space": "l2"}}, embedding_function=None
            )
        except GuidelineStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - chroma raises many types for connection/storage problems
            where = f"http://{host}:{port}" if host else str(path)
            raise GuidelineStoreError(
                f"cannot open chroma store at {where} ({type(exc).__name__}: {exc}); "
                "check the data directory is writable or the chroma server is running"
            ) from exc
        self.collection_name = collection
        self._max_batch = (
            self._client.get_max_batch_size() if hasattr(self._client, "get_max_batch_size") else 5000
        )

    @classmethod
    def from_settings(cls, settings: GuidelineSettings | None = None) -> ChromaGuidelineStore:
        s = settings or GuidelineSettings.from_env()
        if s.chroma_host:
            return cls(host=s.chroma_host, port=s.chroma_port, collection=s.collection)
        return cls(s.data_dir, collection=s.collection)

    @property
    def hnsw_configuration(self) -> dict[str, Any]:
        with warnings.catch_warnings():
            # chroma warns about the (deliberately absent) embedding function when reading the configuration.
            warnings.simplefilter("ignore", DeprecationWarning)
            return dict((self._col.configuration or {}).get("hnsw") or {})

    def upsert_chunks(self, chunks: Sequence[Chunk], embeddings: np.ndarray) -> None:
        if len(chunks) != len(embeddings):
            raise GuidelineStoreError(f"{len(chunks)} chunks but {len(embeddings)} embeddings")
        step = max(1, min(self._max_batch, 4000))
        for i in range(0, len(chunks), step):
            part = chunks[i : i + step]
            self._col.upsert(
                ids=[c.chunk_id for c in part],
                documents=[c.text for c in part],
                metadatas=[_clean_meta(c.metadata) for c in part],
                embeddings=np.asarray(embeddings[i : i + step], dtype=np.float32),
            )
        self._touch()

    def set_doc(self, info: DocInfo) -> None:
        meta = {
            "doc_id": info.doc_id,
            "doc_hash": info.doc_hash,
            "source_file": info.source_file,
            "title": info.title,
            "version": info.version,
            "chunks": info.chunks,
            "ingested_at": info.ingested_at,
            "rules": ",".join(info.rules),
            "tags": ",".join(info.tags),
        }
        self._docs_col.upsert(ids=[f"doc:{info.doc_id}"], embeddings=[[0.0]], metadatas=[meta])
        self._touch()

    def delete_doc(self, doc_id: str) -> int:
        existing = self._col.get(where={"doc_id": doc_id}, include=[])
        ids = existing["ids"]
        if ids:
            self._col.delete(ids=ids)
        self._docs_col.delete(ids=[f"doc:{doc_id}"])
        self._touch()
        return len(ids)

    def list_docs(self) -> dict[str, DocInfo]:
        got = self._docs_col.get(include=["metadatas"])
        out: dict[str, DocInfo] = {}
        for rid, m in zip(got["ids"], got["metadatas"] or [], strict=False):
            if rid == _META_ID or not m:
                continue
            out[m["doc_id"]] = DocInfo(
                doc_id=m["doc_id"],
                doc_hash=m.get("doc_hash", ""),
                source_file=m.get("source_file", ""),
                title=m.get("title", ""),
                version=m.get("version", ""),
                chunks=int(m.get("chunks", 0)),
                ingested_at=float(m.get("ingested_at", 0.0)),
                rules=[r for r in str(m.get("rules", "")).split(",") if r],
                tags=[t for t in str(m.get("tags", "")).split(",") if t],
            )
        return out

    def query(self, embedding: np.ndarray, k: int, where: Where | None = None) -> list[StoredChunk]:
        if k <= 0:
            return []
        res = self._col.query(
            query_embeddings=[np.asarray(embedding, dtype=np.float32)],
            n_results=k,
            where=where or None,
            include=["documents", "metadatas", "distances"],
        )
        ids = res["ids"][0]
        docs = (res.get("documents") or [[]])[0]
        metas = (res.get("metadatas") or [[]])[0]
        dists = (res.get("distances") or [[]])[0]
        # Cosine space: distance = 1 - similarity.
        return [
            StoredChunk(i, d or "", dict(m or {}), 1.0 - float(dist))
            for i, d, m, dist in zip(ids, docs, metas, dists, strict=False)
        ]

    def query_ids(self, embedding: np.ndarray, k: int) -> list[str]:
        """Ids only (benchmarks: skips fetching documents and metadata)."""
        res = self._col.query(
            query_embeddings=[np.asarray(embedding, dtype=np.float32)], n_results=k, include=[]
        )
        return list(res["ids"][0])

    def get(self, chunk_ids: Sequence[str]) -> list[StoredChunk]:
        if not chunk_ids:
            return []
        res = self._col.get(ids=list(chunk_ids), include=["documents", "metadatas"])
        by_id = {
            i: StoredChunk(i, d or "", dict(m or {}))
            for i, d, m in zip(res["ids"], res["documents"] or [], res["metadatas"] or [], strict=False)
        }
        return [by_id[c] for c in chunk_ids if c in by_id]

    def iter_chunks(self, batch_size: int = 1000) -> Iterator[StoredChunk]:
        offset = 0
        while True:
            res = self._col.get(limit=batch_size, offset=offset, include=["documents", "metadatas"])
            ids = res["ids"]
            if not ids:
                return
            for i, d, m in zip(ids, res["documents"] or [], res["metadatas"] or [], strict=False):
                yield StoredChunk(i, d or "", dict(m or {}))
            offset += len(ids)
            if len(ids) < batch_size:
                return

    def count(self) -> int:
        return int(self._col.count())

    def _meta(self) -> dict[str, Any]:
        got = self._docs_col.get(ids=[_META_ID], include=["metadatas"])
        metas = got.get("metadatas") or []
        return dict(metas[0]) if metas and metas[0] else {}

    def revision(self) -> str:
        m = self._meta()
        return json.dumps([m.get("revision", 0), m.get("last_ingest", 0.0), self.count()])

    def stats(self) -> StoreStats:
        docs = len(self.list_docs())
        m = self._meta()
        return StoreStats(docs, self.count(), m.get("last_ingest"))

    def _touch(self) -> None:
        m = self._meta()
        meta = {"revision": int(m.get("revision", 0)) + 1, "last_ingest": time.time()}
        self._docs_col.upsert(ids=[_META_ID], embeddings=[[0.0]], metadatas=[meta])


def _clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    # chroma metadata values must be str/int/float/bool; drop None and stringify anything else.
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if v is None:
            continue
        out[k] = v if isinstance(v, str | int | float | bool) else str(v)
    return out


def open_store(settings: GuidelineSettings | None = None) -> ChromaGuidelineStore:
    """The configured chroma store (HttpClient when NVA_CHROMA_HOST is set, else PersistentClient)."""
    return ChromaGuidelineStore.from_settings(settings)

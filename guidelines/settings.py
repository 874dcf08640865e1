"""Guideline store settings read from the environment (data dir, chroma server, embedding model)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COLLECTION = "nva_guidelines"
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

# HNSW parameters chosen by bench/bench_guidelines.py (recall@5 >= 0.95 vs exact, p95 <= 25 ms at 100k chunks).
DEFAULT_HNSW: dict[str, int] = {"max_neighbors": 32, "ef_construction": 200, "ef_search": 200}


def default_data_dir() -> Path:
    """`$NVA_DATA_DIR/guidelines` when set, else `var/guidelines` under the repository."""
    base = os.environ.get("NVA_DATA_DIR")
    if base:
        return Path(base).expanduser() / "guidelines"
    return REPO_ROOT / "var" / "guidelines"


@dataclass(frozen=True)
class GuidelineSettings:
    """Where the store lives and which embedding model to load."""

    data_dir: Path = field(default_factory=default_data_dir)
    chroma_host: str | None = None
    chroma_port: int = 8000
    collection: str = DEFAULT_COLLECTION
    model_path: str | None = None

    @classmethod
    def from_env(cls) -> GuidelineSettings:
        """Read NVA_DATA_DIR, NVA_CHROMA_HOST, NVA_CHROMA_PORT, NVA_GUIDELINES_COLLECTION, NVA_EMBEDDING_MODEL."""
        port_text = os.environ.get("NVA_CHROMA_PORT", "8000")
        try:
            port = int(port_text)
        except ValueError as exc:
            raise ValueError(f"NVA_CHROMA_PORT must be an integer port number, got {port_text!r}") from exc
        return cls(
            data_dir=default_data_dir(),
            chroma_host=os.environ.get("NVA_CHROMA_HOST") or None,
            chroma_port=port,
            collection=os.environ.get("NVA_GUIDELINES_COLLECTION") or DEFAULT_COLLECTION,
            model_path=os.environ.get("NVA_EMBEDDING_MODEL") or None,
        )

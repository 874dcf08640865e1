"""Typed errors raised by the guideline ingestion, store and retrieval code."""

from __future__ import annotations

from pathlib import Path


class GuidelineError(Exception):
    """Base class for guideline errors."""


class GuidelineFileError(GuidelineError):
    """A guideline source file could not be read or parsed; the message names the file and the fix."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class GuidelineStoreError(GuidelineError):
    """The vector store could not be opened, read or written."""


class EmbeddingModelError(GuidelineError):
    """The local embedding model could not be found or loaded."""

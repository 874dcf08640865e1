"""The summary's word lists (vocabulary.toml, connectives.toml), loaded once."""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from typing import Any


@cache
def vocabulary() -> dict[str, Any]:
    with resources.files("assistant.summary").joinpath("vocabulary.toml").open("rb") as fh:
        return tomllib.load(fh)


@cache
def connectives() -> frozenset[str]:
    """Words a sentence may add around the facts; they claim nothing clinical (connectives.toml)."""
    with resources.files("assistant.summary").joinpath("connectives.toml").open("rb") as fh:
        data = tomllib.load(fh)
    return frozenset(w.lower() for group in data.values() for w in group["words"])

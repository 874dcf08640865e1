"""Chart-contradiction rules: the catalogue (data), the generic engine and the NEWS2 calculator."""

from assistant.rules.engine import (
    Catalogue,
    CatalogueError,
    Rule,
    default_catalogue,
    evaluate,
    load_catalogue,
)

__all__ = ["Catalogue", "CatalogueError", "Rule", "default_catalogue", "evaluate", "load_catalogue"]

"""Start-up warm-up of the summary model: load it once and pre-fill the prompt prefixes every patient uses."""

from __future__ import annotations

from typing import Any

from assistant.llm import warm
from assistant.summary import synopsis
from assistant.summary.composer import build_fact_messages
from assistant.summary.facts import Fact


def warm_summary_model(backend: Any | None) -> None:
    """Call once per process at start (the dashboard does); never raises for LLM trouble, a no-op for servers."""
    probe = Fact(
        tag="F1", kind="result", label="warm-up", text="Glucose 5.0 mmol/L at 2020-01-01 06:00", provenance=()
    )
    warm(backend, [build_fact_messages(probe), synopsis.build_messages([probe])])

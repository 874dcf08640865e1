"""Shared benchmark helpers: machine description, medians, Markdown tables, patient views via the pipeline."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SYNTHEA_DIR = Path(os.environ.get("NVA_SYNTHEA_DIR", REPO.parent / "shared" / "data" / "synthea-r4"))


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        kernel = subprocess.run(["uname", "-srm"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        kernel = platform.platform()
    return f"{cpu}, {os.cpu_count()} cores, {kernel}, Python {platform.python_version()}"


def stamp() -> str:
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def patient_views(source: Any, now: datetime, patient_ids: list[str] | None = None) -> list[Any]:
    """Patient views (chart, flags incl. NEWS2, holds) exactly as the CLI and the dashboard build them."""
    from assistant import pipeline

    ids = patient_ids if patient_ids is not None else sorted(source.iter_patient_ids())
    return [pipeline.load_patient_view(source, pid, now) for pid in ids]

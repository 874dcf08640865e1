"""I-PASS illness severity: NEWS2 stated once (score, band, response); only the other high-severity flags counted."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from assistant import pipeline
from assistant.rules.news2 import news2
from assistant.summary.handoff import compose_handoff
from tests.test_summary_support import NOW, high_k_finding, make_chart

WARD = "Location/ward-4b"
LOCAL = timezone(timedelta(hours=-5), "EST")  # a non-UTC clock


@pytest.fixture(scope="module")
def ward(demo_ward_dir: Path, demo_anchor: datetime) -> Any:
    from connectors import open_source

    with open_source(demo_ward_dir) as src:
        return pipeline.ward_view(
            src, WARD, demo_anchor.astimezone(LOCAL), ward_name="4B Med-Surg", with_handoff=True
        )


def _illness_line(entry: Any) -> str:
    (line,) = [s.text for s in entry.sections["illness"]]
    return line


def test_news2_is_stated_once_and_only_other_high_flags_are_counted(ward: Any) -> None:
    entries = {p.patient: p for p in ward.handoff.patients}
    news2_flagged = plain_count = 0
    for view in ward.patients.values():
        if view.chart is None:
            continue
        # Expectations from the rules themselves: the NEWS2 score and band, and the flags the pipeline raises.
        score = news2(view.chart, now=view.now)
        found = pipeline.findings_for(view.chart, view.now, score)
        news2_flagged += any(f.severity == "high" and f.category == "early-warning" for f in found)
        others = [f for f in found if f.severity == "high" and f.category != "early-warning"]
        line = _illness_line(entries[view.chart.patient_ref])
        assert len(re.findall(r"NEWS2 \d+", line)) == 1, line
        assert f"NEWS2 {score.total}, {score.band} clinical risk ({score.response.rstrip('.')})" in line, line
        flagged = any(f.severity == "high" and f.category == "early-warning" for f in found)
        counted = re.search(r"(\d+) (other )?high-severity flags?", line)
        assert (int(counted.group(1)) if counted else 0) == len(others), line
        # "other" only beside a NEWS2 that is itself a high flag (it said "1 other" when NEWS2 raised none)
        assert not counted or bool(counted.group(2)) == flagged, line
        plain_count += bool(counted and not flagged)
    assert news2_flagged >= 1  # the demo ward has a patient whose NEWS2 is itself a high-severity flag
    assert plain_count >= 1  # ... and one with a high flag beside a NEWS2 that raised none


def test_hand_built_chart_without_news2_counts_every_high_flag() -> None:
    entry = compose_handoff(make_chart(), [high_k_finding()], now=NOW, news2=None)
    line = _illness_line(entry)
    assert "1 high-severity flag" in line and "other" not in line and "NEWS2" not in line

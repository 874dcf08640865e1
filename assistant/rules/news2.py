"""NEWS2 (RCP 2017, SpO2 scale 1) from a chart's latest vital signs; thresholds live in news2.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from assistant.model import Chart, Result
from assistant.summary.display import show_result

# Category of the findings NEWS2 >= 5 and a single parameter of 3 raise (assistant.pipeline.news2_flags): they
# restate the score, so counts of "other" flags leave them out.
NEWS2_FLAG_CATEGORY = "early-warning"

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when libyaml is present
NEWS2_PATH = Path(__file__).with_name("news2.yaml")


@dataclass(frozen=True, slots=True)
class News2Parameter:
    name: str
    label: str
    points: int
    value: str  # as shown, e.g. "22 /min", "38.6 °C" or "New confusion"
    ref: str
    time: datetime | None


@dataclass(frozen=True, slots=True)
class News2Score:
    total: int  # sum over the parameters that were available
    parameters: tuple[News2Parameter, ...]
    missing: tuple[str, ...]  # parameter names with no usable recent value: the score may be understated
    band: str  # low | low-medium | medium | high
    response: str
    evidence: tuple[str, ...]  # ResourceType/id of every value scored

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def points(self) -> dict[str, int]:
        return {p.name: p.points for p in self.parameters}


@cache
def news2_table(path: str | None = None) -> dict[str, Any]:
    with Path(path or NEWS2_PATH).open("r", encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_LOADER)  # noqa: S506 - a safe loader


def _band_points(bands: list[dict], value: float) -> int:
    for band in bands:
        if "max" not in band or value <= float(band["max"]):
            return int(band["points"])
    raise ValueError("NEWS2 bands must end with a band without max (fix assistant/rules/news2.yaml)")


def _recent(rows: list[Result], floor: datetime | None, now: datetime | None) -> list[Result]:
    return [
        r
        for r in rows
        if r.is_usable
        and (now is None or r.time <= now)  # type: ignore[operator]
        and (floor is None or r.time >= floor)
    ]  # type: ignore[operator]


def _consciousness(chart: Chart, spec: dict, floor: datetime | None, now: datetime | None) -> Result | None:
    codes = set(spec.get("loinc") or ())
    patterns = [p.lower() for p in spec.get("name_patterns") or ()]
    rows = [
        r
        for r in chart.results
        if r.value_text
        and ((r.loinc in codes) or any(p in r.name.lower() or p in r.analyte for p in patterns))
    ]
    rows = _recent(rows, floor, now)
    rows.sort(key=lambda r: (r.time, r.ref))  # type: ignore[arg-type, return-value]
    return rows[-1] if rows else None


def news2(chart: Chart, *, now: datetime | None = None, table: dict[str, Any] | None = None) -> News2Score:
    """Score the latest value of each NEWS2 parameter; values older than max_age_hours before `now` are missing."""
    table = table or news2_table()
    floor = now - timedelta(hours=float(table.get("max_age_hours", 24))) if now else None
    params: list[News2Parameter] = []
    missing: list[str] = []
    for name, spec in table["parameters"].items():
        if "analyte" not in spec:
            result = _consciousness(chart, spec, floor, now)
            if result is None:
                missing.append(name)
                continue
            answer = (result.value_text or "").strip().lower()
            if answer in spec.get("alert_answers", ()):
                points = 0
            elif answer in spec.get("other_answers", ()):
                points = int(spec.get("points_not_alert", 3))
            else:
                missing.append(name)  # an answer we cannot map is not "alert"
                continue
            params.append(
                News2Parameter(name, spec["label"], points, result.value_text or "", result.ref, result.time)
            )
            continue
        rows = [r for r in _recent(chart.results_for(spec["analyte"]), floor, now) if r.value is not None]
        if not rows:
            missing.append(name)
            continue
        latest = rows[-1]
        points = _band_points(spec["bands"], float(latest.value))  # type: ignore[arg-type]
        params.append(
            # shown as the rest of the app shows it ('38.6 °C', '102 mmHg'), not as UCUM codes ('Cel', 'mm[Hg]')
            News2Parameter(name, spec["label"], points, show_result(latest), latest.ref, latest.time)
        )
    total = sum(p.points for p in params)
    top = max((p.points for p in params), default=0)
    band, response = "low", ""
    for rule in table["responses"]:
        if (
            "min_total" in rule
            and total >= int(rule["min_total"])
            or ("single_parameter_points" in rule and top >= int(rule["single_parameter_points"]))
        ):
            band, response = rule["band"], rule["response"]
            break
    return News2Score(
        total=total,
        parameters=tuple(params),
        missing=tuple(missing),
        band=band,
        response=response,
        evidence=tuple(dict.fromkeys(p.ref for p in params)),
    )

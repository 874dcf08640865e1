"""How values are shown: the unit as the lab reported it, written as people write it, rounded to the analyte's precision."""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources

from assistant.model import Result


@cache
def _units() -> dict[str, str]:
    with resources.files("assistant.data").joinpath("units.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["display"])


@cache
def _precision() -> dict[str, tuple[int, dict[str, int]]]:
    with resources.files("assistant.data").joinpath("lab_analytes.toml").open("rb") as fh:
        data = tomllib.load(fh)
    out: dict[str, tuple[int, dict[str, int]]] = {}
    for key, spec in data.items():
        if isinstance(spec, dict) and "decimals" in spec:
            per_unit = {_norm(u): int(d) for u, d in spec.get("unit_decimals", {}).items()}
            per_unit.setdefault(_norm(spec.get("canonical_unit")), int(spec["decimals"]))
            out[key] = (int(spec["decimals"]), per_unit)
    return out


def _norm(unit: str | None) -> str:
    return (unit or "").replace(" ", "").lower()


def display_unit(unit: str | None) -> str:
    """'mm[Hg]' -> 'mmHg', 'Cel' -> '°C', '{INR}' -> '' (assistant/data/units.toml); other units unchanged."""
    if not unit:
        return ""
    return _units().get(unit, unit)


def decimals_for(analyte: str | None, unit: str | None = None) -> int | None:
    """Decimals a value of this analyte is shown with in `unit` (None: the analyte has no precision in the data)."""
    spec = _precision().get(analyte or "")
    if spec is None:
        return None
    default, per_unit = spec
    return per_unit.get(_norm(unit), default)


def round_value(value: float, analyte: str | None, unit: str | None = None) -> float:
    d = decimals_for(analyte, unit)
    return round(value, d) if d is not None else value


def format_value(value: float, analyte: str | None, unit: str | None = None) -> str:
    """The number at the analyte's precision, as a lab prints it ('1.40 mg/dL', '5.0 mmol/L', '101 mg/dL')."""
    d = decimals_for(analyte, unit)
    if d is None:
        text = f"{value:.3f}".rstrip("0").rstrip(".")
    elif d == 0:
        text = str(int(round(value)))
    else:
        text = f"{round(value, d):.{d}f}"
    return "0" if text in ("-0", "") else text


def reported(result: Result) -> tuple[float | None, str]:
    """(value, unit code) as the laboratory reported it; the canonical value when the original is unknown."""
    if result.original is not None and result.original.value is not None:
        return float(result.original.value), result.original.unit or ""
    return result.value, result.unit or ""


def in_unit(result: Result, unit: str) -> float | None:
    """The result's value in another reported unit of the same analyte (for a trend stated in one unit)."""
    value, own = reported(result)
    if value is None or _norm(own) == _norm(unit):
        return value
    from assistant.terminology import terminology

    analyte = terminology().analytes.get(result.analyte)
    if analyte is None or result.value is None:
        return None
    factor = analyte.factors.get(_norm(unit))
    if not factor:
        return None
    return result.value / factor - analyte.offsets.get(_norm(unit), 0.0)


def show_result(result: Result, unit: str | None = None) -> str:
    """'5.9 mmol/L', '132 mmHg', '36.9 °C': one unit per test, as reported, at the analyte's precision."""
    value, own = reported(result)
    if unit is not None:
        value, own = in_unit(result, unit), unit
    if value is None:
        return result.value_text or result.display_value()
    return f"{format_value(value, result.analyte, own)} {display_unit(own)}".strip()

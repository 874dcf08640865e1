"""Faithfulness of the shown summary on the demo ward, judged by a checker that reads the raw FHIR resources."""

# The checker is independent of the verifier: it does not use the fact sheet, the claim extraction or the atoms.
# It reads the cited resources' JSON (values, units, times, doses, administrations, allergies) and the rule
# catalogue text, and marks a shown sentence wrong when it states a number, time, direction, dose time or allergy
# status that the cited resources do not hold together. Run: `python -m bench.bench_faithfulness [--patients N]`.

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from assistant.demo_ward import generate_demo_ward  # noqa: E402
from assistant.rules.engine import evaluate  # noqa: E402
from assistant.summary.composer import compose  # noqa: E402
from bench.common import stamp  # noqa: E402
from connectors import open_source  # noqa: E402

ANCHOR = datetime(2026, 3, 16, 7, 0, tzinfo=UTC)
CREOLA_RATE = 1.47  # % hallucinated sentences, CREOLA clinical-note study (Asgari et al., npj Digit Med 2025)
CATALOGUE = Path(__file__).resolve().parents[1] / "assistant" / "rules" / "catalogue.yaml"
# conversions the checker accepts between a stated and a charted number (glucose mmol/L<->mg/dL, creatinine
# umol/L<->mg/dL); the checker's own table, not the analyte data file
FACTORS = (1.0, 18.016, 1 / 18.016, 88.4, 1 / 88.4)

STAMP_RE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2})(?::\d{2})?(?:\s*UTC)?")
DATE_RE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
CLOCK_RE = re.compile(r"\b\d{1,2}:\d{2}\b")
NUM_RE = re.compile(r"(?<![\w.^*/])(\d+(?:,\d{3})*(?:\.\d+)?)(?![\w.]*\d)(?!-?[A-Za-z]*\d)")
UP = re.compile(r"\b(rising|rose|risen|increas\w*|up from|climb\w*|went up)\b", re.I)
DOWN = re.compile(r"\b(falling|fell|fallen|decreas\w*|down from|drop\w*|went down)\b", re.I)
NO_ALLERGY = re.compile(r"\b(no known (drug )?allerg\w*|nkda|not allergic|no allerg\w*)\b", re.I)


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def _numbers(text: str) -> list[float]:
    text = STAMP_RE.sub(" ", text)
    text = DATE_RE.sub(" ", text)
    return [
        float(m.group(1).replace(",", "")) for m in re.finditer(r"(?<![\w.])(\d+(?:,\d{3})*(?:\.\d+)?)", text)
    ]


@dataclass
class Raw:
    """What one raw resource says: numbers, times, and for observations (code, value, time) readings."""

    kind: str
    numbers: list[float] = field(default_factory=list)
    times: list[datetime] = field(default_factory=list)
    readings: list[tuple[str, float, datetime | None]] = field(default_factory=list)  # (code, value, time)
    given: list[datetime] = field(default_factory=list)  # completed administrations
    interval_h: float | None = None
    active_allergy: bool = False


def read_raw(resource: dict[str, Any], anchor: datetime) -> Raw:
    kind = resource.get("resourceType", "")
    raw = Raw(kind)
    text = json.dumps(resource)
    for key in ("effectiveDateTime", "authoredOn", "recordedDate", "date", "issued", "onsetDateTime"):
        t = _when(resource.get(key))
        if t:
            raw.times.append(t)
    for key in ("effectivePeriod", "period"):
        for k in ("start", "end"):
            t = _when((resource.get(key) or {}).get(k))
            if t:
                raw.times.append(t)
    if kind == "Observation":
        code = ((resource.get("code") or {}).get("coding") or [{}])[0].get("code", "")
        vq = resource.get("valueQuantity") or {}
        t = _when(resource.get("effectiveDateTime"))
        if "value" in vq:
            raw.numbers.append(float(vq["value"]))
            raw.readings.append((code, float(vq["value"]), t))
        for comp in resource.get("component") or []:
            cq = comp.get("valueQuantity") or {}
            ccode = ((comp.get("code") or {}).get("coding") or [{}])[0].get("code", "")
            if "value" in cq:
                raw.numbers.append(float(cq["value"]))
                raw.readings.append((ccode, float(cq["value"]), t))
    if kind in (
        "MedicationRequest",
        "MedicationAdministration",
        "Condition",
        "Encounter",
        "AllergyIntolerance",
    ):
        raw.numbers += _numbers(text)  # doses, strengths, volumes, bed numbers as written
    if kind == "MedicationRequest":
        for d in resource.get("dosageInstruction") or []:
            rep = ((d.get("timing") or {}).get("repeat")) or {}
            per, unit, freq = rep.get("period"), rep.get("periodUnit"), rep.get("frequency", 1)
            hours = {"h": 1, "d": 24, "wk": 168, "min": 1 / 60}.get(unit or "")
            if per and hours:
                raw.interval_h = float(per) * hours / float(freq or 1)
            for k in ("start", "end"):
                t = _when((rep.get("boundsPeriod") or {}).get(k))
                if t:
                    raw.times.append(t)
    if kind == "MedicationAdministration" and resource.get("status") in ("completed", "in-progress"):
        raw.given += raw.times
    if kind == "AllergyIntolerance":
        status = json.dumps(resource.get("clinicalStatus") or {})
        ver = json.dumps(resource.get("verificationStatus") or {})
        code = json.dumps(resource.get("code") or {}).lower()
        no_known = "no known" in code or "716186003" in code or "409137002" in code  # an NKA statement
        raw.active_allergy = ("active" in status or not status) and "refuted" not in ver and not no_known
    if kind == "DocumentReference":
        for c in resource.get("content") or []:
            data = (c.get("attachment") or {}).get("data")
            if data:
                raw.numbers += _numbers(base64.b64decode(data).decode("utf-8", "replace"))
    if kind == "Patient":
        born = resource.get("birthDate")
        if isinstance(born, str) and len(born) >= 10:
            b = date.fromisoformat(born[:10])
            d = anchor.date()
            raw.numbers.append(float(d.year - b.year - ((d.month, d.day) < (b.month, b.day))))
    return raw


def rule_numbers(rule_id: str) -> list[float]:
    """Numbers written in the rule's catalogue entry (thresholds, criteria, windows): the raw YAML text."""
    text = CATALOGUE.read_text(encoding="utf-8")
    m = re.search(rf"- id: {re.escape(rule_id)}\n(.*?)(?=\n  - id: |\Z)", text, re.S)
    return _numbers(m.group(1)) if m else []


def _near(x: float, values: list[float], decimals: int) -> bool:
    tol = 0.5 * 10**-decimals + 1e-9
    for v in values:
        for f in FACTORS:
            w = v * f
            if abs(w - x) <= tol or (f != 1.0 and abs(w - x) <= 0.02 * max(abs(w), 1e-9)):
                return True
    return False


RELATIVE_RE = re.compile(r"\b(\d{2}:\d{2}) (today|yesterday)\b")


def spell_out_days(text: str, now: datetime) -> str:
    """ "05:00 today" / "22:21 yesterday" (the small model's prompt form) as full UTC stamps, so the times of such
    sentences are checked like any other."""
    day = now.astimezone(UTC).date()

    def full(m: re.Match[str]) -> str:
        d = day - timedelta(days=1 if m.group(2) == "yesterday" else 0)
        return f"{d:%Y-%m-%d} {m.group(1)}"

    return RELATIVE_RE.sub(full, text)


def judge(sentence: Any, raw: dict[str, Raw], patient_allergic: bool) -> str | None:
    """None when the cited raw resources hold what the sentence states; else what is wrong."""
    cited = [raw[c] for c in sentence.citations if c in raw]
    numbers = [n for r in cited for n in r.numbers]
    for c in sentence.citations:
        if c.startswith("rule:"):
            numbers += rule_numbers(c.removeprefix("rule:"))
    times = [t for r in cited for t in r.times]
    for r in cited:
        if r.interval_h:
            given = sorted(t for x in cited for t in x.given)
            times += [g + timedelta(hours=r.interval_h) for g in given[-1:]]
    text = spell_out_days(sentence.text, ANCHOR)
    stamps = []
    for m in STAMP_RE.finditer(text):
        t = datetime(*(int(g) for g in m.groups()), tzinfo=UTC)
        stamps.append((m.start(), t))
        if t not in times:
            return f"time {t:%Y-%m-%d %H:%M} is in no cited resource"
    body = CLOCK_RE.sub(" ", DATE_RE.sub(" ", STAMP_RE.sub(" ", text)))
    body = re.sub(r"x?10\^\d+|/1\.73\s?m2", " ", body)  # unit parts: x10^3/uL, mL/min/1.73m2
    body = re.sub(r"\b\d+[A-Za-z]\w*", " ", body)  # identifiers: ward 4B, 1st
    for m in re.finditer(r"(?<![\w.^/])(\d+(?:,\d{3})*)(\.\d+)?", body):
        x = float(m.group(1).replace(",", "") + (m.group(2) or ""))
        d = len(m.group(2)) - 1 if m.group(2) else 0
        if not _near(x, numbers, d):
            return f"number {m.group(0)} is in no cited resource"
    # a value stated "at T" is a reading charted at T
    readings = [rd for r in cited for rd in r.readings]
    for m in re.finditer(
        r"(\d+(?:\.\d+)?)\s*[^\s,;()]*,?(?:\s+\w+,)?\s+at\s+(\d{4}-\d{2}-\d{2} \d{2}:\d{2})", text
    ):
        x, t = float(m.group(1)), datetime.fromisoformat(m.group(2)).replace(tzinfo=UTC)
        d = len(m.group(1).split(".")[1]) if "." in m.group(1) else 0
        same_time = [v for _c, v, rt in readings if rt == t]
        if same_time and not _near(x, same_time, d):
            return f"{m.group(1)} is not the value charted at {t:%Y-%m-%d %H:%M}"
    # direction: the earliest and latest cited readings of one test
    by_code: dict[str, list[tuple[datetime, float]]] = {}
    for code, v, t in readings:
        if t:
            by_code.setdefault(code, []).append((t, v))
    up, down = bool(UP.search(text)), bool(DOWN.search(text))
    if up or down:
        for rows in by_code.values():
            if len(rows) >= 2:
                rows.sort()
                delta = rows[-1][1] - rows[0][1]
                if (up and delta < 0) or (down and delta > 0):
                    return "direction is the opposite of the cited readings"
    # "given T" is a completed administration; "due T" is not one
    given = {t for r in cited for t in r.given}
    for m in re.finditer(r"\b(given|due)\b[^.;]{0,30}?(\d{4}-\d{2}-\d{2} \d{2}:\d{2})", text):
        t = datetime.fromisoformat(m.group(2)).replace(tzinfo=UTC)
        if m.group(1) == "given" and given and t not in given:
            return f"no administration was given at {t:%Y-%m-%d %H:%M}"
        if m.group(1) == "due" and t in given and not any(r.interval_h for r in cited):
            return f"{t:%Y-%m-%d %H:%M} is when a dose was given, not when it is due"
    if NO_ALLERGY.search(text) and patient_allergic:
        return "says no allergy, but the chart has an active allergy"
    return None


@dataclass
class Tally:
    label: str
    patients: int = 0
    shown: int = 0
    shown_llm: int = 0
    shown_template: int = 0
    dropped_llm: int = 0
    attempted_llm: int = 0
    wrong: list[str] = field(default_factory=list)
    wrong_llm: int = 0
    wrong_template: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    llm_seconds: float = 0.0
    timeouts: int = 0  # patients whose model calls failed (then their template sentences are shown)

    def cells(self) -> list[str]:
        surv = (
            f"{100 * self.shown_llm / self.attempted_llm:.0f} % ({self.shown_llm}/{self.attempted_llm})"
            if self.attempted_llm
            else "n/a"
        )
        wrong_pct = 100 * len(self.wrong) / self.shown if self.shown else 0.0
        return [
            self.label,
            str(self.patients),
            f"{self.shown} ({self.shown_llm} model, {self.shown_template} template)",
            str(self.dropped_llm),
            f"{len(self.wrong)} ({wrong_pct:.2f} %)",
            surv,
            f"{self.seconds:.0f} s (model {self.llm_seconds:.0f} s; {self.timeouts} patients with a failed call)",
        ]


def load_raw(folder: Path, anchor: datetime) -> tuple[dict[str, Raw], dict[str, bool]]:
    raw: dict[str, Raw] = {}
    allergic: dict[str, bool] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("resourceType") != "Bundle":
            continue
        for e in data.get("entry") or []:
            res = e.get("resource") or {}
            ref = f"{res.get('resourceType')}/{res.get('id')}"
            raw[ref] = read_raw(res, anchor)
            subj = ((res.get("subject") or res.get("patient") or {}).get("reference")) or (
                ref if res.get("resourceType") == "Patient" else None
            )
            if subj and raw[ref].active_allergy:
                allergic[subj] = True
    return raw, allergic


def run(
    label: str,
    backend: Any,
    charts: list,
    raw: dict[str, Raw],
    allergic: dict[str, bool],
    timeout: float = 300.0,
) -> Tally:
    t = Tally(label)
    t0 = time.perf_counter()
    for chart in charts:
        findings = evaluate(chart, now=ANCHOR)
        res = compose(chart, findings, backend=backend, now=ANCHOR, timeout=timeout)
        t.patients += 1
        t.llm_seconds += res.llm_latency_s or 0.0
        t.timeouts += sum("unavailable" in n for n in res.notes)
        llm = [s for s in res.sentences if s.origin == "llm"]
        dropped = [d for d in res.dropped if d.origin == "llm"]
        t.shown_llm += len(llm)
        t.dropped_llm += len(dropped)
        t.attempted_llm += len(llm) + len(dropped)
        t.shown_template += sum(1 for s in res.sentences if s.origin == "template")
        t.shown += len(res.sentences)
        for d in dropped:
            t.reasons[re.sub(r"[\d.:-]+", "#", (d.reason or "")[:60])] += 1
        for s in res.sentences:
            why = judge(s, raw, allergic.get(chart.patient_ref, False))
            if why:
                t.wrong.append(f"[{s.origin}] {s.text} -- {why}")
                if s.origin == "llm":
                    t.wrong_llm += 1
                else:
                    t.wrong_template += 1
    t.seconds = time.perf_counter() - t0
    return t


def checker_selftest(
    charts: list, raw: dict[str, Raw], allergic: dict[str, bool]
) -> list[tuple[str, int, int]]:
    """How many of the adversarial suite's wrong sentences the checker itself would flag, per error class."""
    from assistant.summary.facts import build_fact_sheet
    from assistant.summary.verifier import Verifier
    from tests.test_verifier_adversarial import ERROR_CLASSES

    out = []
    sheets = [(c, build_fact_sheet(c, evaluate(c, now=ANCHOR), now=ANCHOR)) for c in charts]
    for group, gen in ERROR_CLASSES.items():
        total = flagged = 0
        for chart, sheet in sheets:
            v = Verifier(sheet)
            for sentence in gen(sheet):
                s = v.verify(sentence)
                if not s.citations:
                    continue
                total += 1
                flagged += judge(s, raw, allergic.get(chart.patient_ref, False)) is not None
        out.append((group, flagged, total))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=0, help="patients given to the model (0: the whole ward)")
    ap.add_argument("--no-llm", action="store_true", help="template only (checks the checker)")
    ap.add_argument("--out", default="", help="append the result section to this Markdown file")
    ap.add_argument("--backend", default="transformers", help="embedded backend: transformers or onnx")
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="nva-bench-faith-"))
    generate_demo_ward(folder, anchor=ANCHOR, seed=7)
    raw, allergic = load_raw(folder, ANCHOR)
    with open_source(folder) as src:
        charts = [src.patient_chart(pid) for pid in sorted(src.iter_patient_ids())]
    rows = [run("template (no model)", None, charts, raw, allergic)]
    selftest = checker_selftest(charts, raw, allergic)
    if not args.no_llm:
        from assistant.llm import make_backend

        backend = make_backend({"NVA_LLM_BACKEND": args.backend})
        load = getattr(backend, "load", None)
        if callable(load):
            load()
        subset = charts[: args.patients] if args.patients else charts
        rows.append(
            run(
                f"embedded model ({getattr(backend, 'model', args.backend)}, {args.backend}, per-fact)",
                backend,
                subset,
                raw,
                allergic,
            )
        )
    head = [
        "composer",
        "patients",
        "sentences shown",
        "model sentences dropped",
        "shown but wrong",
        "model survival",
        "time",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    lines += [
        "",
        "Checker self-test (adversarial suite's wrong sentences the raw-resource checker flags):",
        "",
    ]
    lines += ["| error class | flagged by the checker |", "|---|---|"]
    lines += [f"| {g} | {f}/{t} |" for g, f, t in selftest]
    report = "\n".join(lines)
    print(stamp() if callable(stamp) else "")
    print(report)
    for r in rows:
        for w in r.wrong[:20]:
            print("WRONG", w)
        for reason, n in r.reasons.most_common(8):
            print(f"DROPPED {n:3d} {reason}")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render docs/RULES.md from the rule catalogue, so the documentation never drifts from the data."""

from __future__ import annotations

import sys
from pathlib import Path

from assistant.rules.engine import Catalogue, Rule, default_catalogue
from assistant.terminology import terminology

KIND_TEXT = {
    "threshold-latest": "Fires when the latest result in the window crosses the threshold while a matching order is "
    "active (a newer normal value supersedes an older abnormal one).",
    "relative-change": "Fires when the latest result, taken within the recency window, has changed from a baseline "
    "(lowest or highest earlier value in a baseline window) by the stated criterion.",
    "allergy-conflict": "Fires for each active, non-refuted allergy and actively ordered drug that share an ingredient "
    "or a cross-reactive class (copies of one drug's order are one flag citing every copy).",
    "duplicate-class": "Fires when two or more scheduled active orders of different drugs (RxNorm ingredients) fall in "
    "the same therapeutic group, unless the pair is an intended combination; two orders of one drug are a duplicate "
    "order, not two drugs of the group.",
    "duplicate-order": "Fires when two or more active orders carry the same drug (same RxNorm ingredients, else the "
    "same RxNorm code, else the same order text): written at different moments, or written at the same moment with "
    "the same dose, route and timing (one prescription recorded more than once).",
    "administration-without-order": "Fires for each administration given in the window whose order is missing, "
    "never valid, or had ended before the dose.",
    "order-not-administered": "Fires for each drug with a scheduled (non-PRN) active order started long enough ago "
    "that has no given administration in its window (a dose charted against any copy of the drug's order counts; "
    "the copies are one flag).",
    "monitoring-gap": "Fires when a matching order is active and, for some monitored test, no result exists in the "
    "window (a test group counts as done when any of its analytes was resulted).",
    "drug-condition": "Fires when a matching order is active in a patient with a listed diagnosis (by SNOMED CT or "
    "ICD-10 code, or by name), unless a protecting drug is also active.",
}


def _drugs(rule: Rule) -> str:
    terms = terminology()
    parts = [f"{terms.class_label(c)} (`{c}`)" for c in sorted(rule.drug_classes)]
    parts += [
        f"{terms.ingredients[i].name} (RxNorm {terms.ingredients[i].rxcui})"
        for i in sorted(rule.drug_ingredients)
    ]
    return ", ".join(parts) or "any active order"


def _lab(rule: Rule) -> str:
    monitor = rule.params.get("_monitor") or ()
    if len(monitor) > 1 or (monitor and monitor[0][1] != (rule.analyte,)):
        terms = terminology()
        return "; ".join(
            f"{label}: "
            + " or ".join(
                f"{terms.analytes[a].name} (LOINC {', '.join(terms.analytes[a].loinc)})" for a in keys
            )
            for label, keys in monitor
        )
    if rule.kind == "drug-condition":
        from assistant.rules.engine import condition_sets

        spec = condition_sets()[rule.params["conditions"]]
        return f"diagnosis: {spec['label']} (codes {', '.join(sorted(spec['codes']))})"
    if not rule.analyte:
        return "-"
    a = terminology().analytes[rule.analyte]
    codes = sorted(rule.loinc) if rule.loinc else list(a.loinc)
    return f"{a.name} (`{a.key}`, canonical unit {a.canonical_unit}); LOINC {', '.join(codes)}"


def _criterion(rule: Rule) -> str:
    p = rule.params
    if rule.threshold:
        text = f"latest value {rule.threshold.op} {rule.threshold.display} within {rule.window_hours:g} h"
        if p.get("decide") == "any":
            text = f"any value {rule.threshold.op} {rule.threshold.display} within {rule.window_hours:g} h"
        return text
    if rule.kind == "relative-change":
        crit = " or ".join(c.get("label", c["measure"]) for c in p.get("change", {}).get("criteria", []))
        return f"{crit}; latest value within {p.get('latest_within_hours', 48)} h"
    if rule.kind == "allergy-conflict":
        return "same ingredient, or shared class among " + ", ".join(p.get("cross_reactive_classes", []))
    if rule.kind == "duplicate-class":
        return "; ".join(g.get("label", g["name"]) for g in p.get("groups", [])) + (
            " (PRN orders not counted)" if p.get("ignore_prn", True) else ""
        )
    if rule.kind == "duplicate-order":
        how = (
            "same drug written at the same moment with the same dose, route and timing"
            if p.get("written") == "same"
            else "same drug in active orders written at different moments"
        )
        return (
            how
            + (" (PRN orders not counted)" if p.get("ignore_prn", True) else "")
            + (
                "; retrospective: a stopped order's prescribing instant alone (stop unknown, 0 h) is no episode"
                if p.get("instant_episodes", True) is False
                else ""
            )
        )
    if rule.kind == "administration-without-order":
        return f"administrations given in the last {rule.window_hours:g} h"
    if rule.kind == "order-not-administered":
        return (
            f"order started > {p.get('started_hours', 24)} h ago, no given dose in max({rule.window_hours:g} h, "
            f"dosing interval x {p.get('interval_factor', 1.5)}); admitted patients only"
        )
    if rule.kind == "monitoring-gap":
        window = p.get("window_text") or f"{rule.window_hours:g} h"
        return (
            f"no result in the last {window}"
            + (f" ({rule.window_hours:g} h)" if p.get("window_text") else "")
            + ("; admitted patients only" if p.get("requires_admission") else "")
            + (f"; patients aged {p['min_age']} or older" if p.get("min_age") is not None else "")
            + ("; reads medication lists as well as orders" if p.get("include_statements") else "")
        )
    if rule.kind == "drug-condition":
        ingredients, classes = p.get("_unless", ((), ()))
        terms = terminology()
        unless = [terms.class_label(c) for c in sorted(classes)] + [
            terms.ingredients[i].name for i in sorted(ingredients)
        ]
        return (
            (
                "history or active diagnosis"
                if p.get("condition_status", "any") == "any"
                else "active diagnosis"
            )
            + (f"; not when {', '.join(unless)} is also taken" if unless else "")
            + ("; reads medication lists as well as orders" if p.get("include_statements") else "")
        )
    return ""


def render_rules_markdown(catalogue: Catalogue | None = None) -> str:
    catalogue = catalogue or default_catalogue()
    lines = [
        "# Chart-contradiction rules",
        "",
        "<!-- Generated from assistant/rules/catalogue.yaml by `nva rules --markdown` "
        "(python -m assistant.rules.docs); do not edit by hand. -->",
        "",
        "Rules are data (`assistant/rules/catalogue.yaml`); the engine (`assistant/rules/engine.py`) has one generic "
        "evaluator per rule kind. Only active orders count, units are converted to the analyte's canonical unit "
        "before any comparison, a text-only medication is resolved by name, and a missing value never counts as "
        "normal: a rule lacking its lab simply does not fire (monitoring-gap rules report the absence).",
        "",
        "| Rule | Severity | Kind | Checks |",
        "|---|---|---|---|",
    ]
    for r in catalogue.rules:
        lines.append(f"| `{r.id}` | {r.severity} | {r.kind} | {r.title} |")
    lines.append("")
    if catalogue.guideline_note:
        lines += [f"> Note: {catalogue.guideline_note}.", ""]
    for r in catalogue.rules:
        lines += [
            f"## `{r.id}` - {r.title}",
            "",
            f"- **Category / severity:** {r.category} / {r.severity}",
            f"- **Kind:** {r.kind}. {KIND_TEXT[r.kind]}",
        ]
        if r.kind not in (
            "allergy-conflict",
            "duplicate-class",
            "duplicate-order",
            "administration-without-order",
            "order-not-administered",
        ):
            lines.append(f"- **Drugs:** {_drugs(r)}")
            lines.append(f"- **Lab:** {_lab(r)}")
        extra = []
        if r.params.get("_suppressed_by"):
            extra.append(
                "- **Quiet when:** "
                + ", ".join(f"`{x}`" for x in r.params["_suppressed_by"])
                + " fires (it says it first)"
            )
        lines += [
            f"- **Threshold / window:** {_criterion(r)}",
            *extra,
            f"- **Message:** {r.message}",
            f"- **Nursing action:** {r.action}",
            f"- **Guidelines:** {', '.join(f'`{g}`' for g in r.guideline_ids) or '(none linked)'}",
            "- **Sources:**",
            *[f"  - {s}" for s in r.sources],
            "",
        ]
    lines += _news2_section() + AUDIT_SECTION
    return "\n".join(lines)


def _news2_section() -> list[str]:
    from assistant.rules.news2 import news2_table

    table = news2_table()
    lines = [
        "## NEWS2 (handoff acuity)",
        "",
        "`assistant.rules.news2.news2(chart, now=...)` scores the latest value of each parameter (RCP 2017, SpO2 "
        f"scale 1; thresholds in `assistant/rules/news2.yaml`). Values older than {table['max_age_hours']} h are "
        "reported as missing, never as normal.",
        "",
        "| Parameter | Bands (value <= max: points) |",
        "|---|---|",
    ]
    for spec in table["parameters"].values():
        if "bands" in spec:
            bands = ", ".join(
                f"<= {b['max']}: {b['points']}" if "max" in b else f"above: {b['points']}"
                for b in spec["bands"]
            )
        else:
            bands = (
                f"alert: 0, new confusion / voice / pain / unresponsive: {spec.get('points_not_alert', 3)}"
            )
        lines.append(f"| {spec['label']} | {bands} |")
    lines += ["", "| Response band | When | Response |", "|---|---|---|"]
    for r in table["responses"]:
        when = (
            f"total >= {r['min_total']}"
            if "min_total" in r
            else f"any single parameter scores {r['single_parameter_points']}"
        )
        lines.append(f"| {r['band']} | {when} | {r['response']} |")
    return [*lines, ""]


AUDIT_SECTION = [
    "## Batch audit (`nva audit`)",
    "",
    "`nva audit SOURCE --out FILE [--format jsonl|csv|html] [--engine local|dask] [--workers N] "
    "[--scheduler ADDRESS] [--resume] [--now ISO]` runs these rules over every patient of a FHIR base URL (Bulk Data "
    "`$export` when the server advertises it, per-patient searches otherwise), a bundle directory or an NDJSON "
    "directory. JSONL has one finding per line (`patient` is `Patient/<id>`, `evidence` a list of `ResourceType/id`, "
    "plus `ward`), ordered by patient then severity so every engine writes the same bytes; HTML adds counts per "
    "rule, severity and ward, the top patients and a data-quality section (records that could not be read and why).",
    "",
    "A run writes per-batch part files and a checkpoint to `FILE.work/` (atomic writes); after a kill, rerun with "
    "`--resume` to finish with exactly the findings of an uninterrupted run. NDJSON exports are first routed by "
    "patient into partition files (one streaming pass, crc32 of the patient id), so memory stays flat; the local "
    "engine audits partitions in a process pool, `--engine dask` on a LocalCluster (127.0.0.1, no dashboard) or a "
    "`--scheduler` whose workers share the filesystem. A broken record is reported and skipped.",
    "",
    "### Retrospective audit (`--period START/END`)",
    "",
    "`nva audit SOURCE --out FILE --period [START/END]` judges every rule at each moment its inputs change over the "
    "period (each result, order start or stop, administration, admission, and each time a rule window expires) "
    "instead of at one instant, and reports **episodes**: rule, patient, start, end (empty while it still held at "
    "the period end), end reason, duration, the evidence and message as they stood at the start, and the doses of "
    "the implicated drugs given while it held (the harm-potential signal). Without START/END each chart's own span "
    "(first to newest data) is judged. When an order was stopped without a stop time it is taken to run until the "
    "next order for the same drug (a renewal); with none, only its prescribing moment counts (end reason "
    "`order-stop-unknown`, duration 0). Such an instant is kept as an episode (a drug prescribed while another was "
    "active is a prescribing event even when its duration is unknown), except for rules that say it is no exposure "
    "(`instant_episodes: false`, e.g. `duplicate-order-record`: copies of one stopped prescription). Population "
    "indicators of the PINCER kind (`population-*` categories) are "
    "judged the same way, over outpatient medication lists (MedicationStatement) as well as orders.",
    "",
    "### Incomplete sources and stale data",
    "",
    "When the source could not deliver some resource types (refused by the server, a failed or expired export file, "
    "a failed per-patient search), the rules that read those types are not judged for the patients concerned (rules "
    "resting on an absence, such as 'no INR' or 'no administration', would otherwise fire falsely), the run exits "
    'with status 3, and every output says so: a first JSONL line `{"record": "run-status", ...}`, a first CSV '
    "line `# INCOMPLETE AUDIT: ...`, a banner in the HTML report and an `INCOMPLETE:` CLI summary line. When a chart's "
    "newest data is older than a rule's window at the judged time, the CLI, the report and the dashboard say "
    '"judged at ...; newest data ..." (`assistant.rules.engine.stale_data`).',
    "",
]


def write_rules_doc(path: Path | str = "docs/RULES.md") -> Path:
    path = Path(path)
    path.write_text(render_rules_markdown(), encoding="utf-8")
    return path


if __name__ == "__main__":
    target = write_rules_doc(sys.argv[1] if len(sys.argv) > 1 else "docs/RULES.md")
    sys.stdout.write(f"wrote {target}\n")

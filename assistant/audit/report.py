"""Audit output: JSONL (one finding or episode a line), CSV, or a self-contained HTML report with data quality."""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from assistant.audit.status import RunStatus
from assistant.model import SEVERITY_ORDER
from assistant.rules.retrospective import duration_text
from assistant.textsafe import html_text

FORMATS = ("jsonl", "csv", "html")
CSV_FIELDS = (
    "patient",
    "ward",
    "rule_id",
    "category",
    "severity",
    "title",
    "message",
    "evidence",
    "values",
    "action",
    "guideline_ids",
    "sources",
)
EPISODE_FIELDS = (
    "patient",
    "ward",
    "rule_id",
    "category",
    "severity",
    "title",
    "start",
    "end",
    "end_reason",
    "duration_hours",
    "doses_count",
    "doses",
    "message",
    "evidence",
    "values",
    "action",
    "guideline_ids",
    "sources",
)
SEVERITY_COLOURS = {"high": "#c0392b", "medium": "#e67e22", "low": "#2980b9"}
EXAMPLES_PER_CODE = 10


def counts_as_patient(row: dict[str, Any]) -> bool:
    """A row that names a patient (an unreadable file is a record, not a patient): stdout and HTML count alike."""
    return not (row["error"] and ":" in row["patient"])


def finding_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finding with the patient's ward, ordered by patient then severity: the same bytes whatever the engine,
    the worker count or the partitioning (findings are few; the per-patient rows are streamed)."""
    out = [{**f, "ward": row.get("ward")} for row in rows for f in row["findings"]]
    out.sort(key=lambda f: (f["patient"], SEVERITY_ORDER.get(f["severity"], 9), f["rule_id"], f["evidence"]))
    return out


def episode_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each episode with the patient's ward, ordered by patient, start, severity and rule (deterministic)."""
    out = [{**e, "ward": row.get("ward")} for row in rows for e in row.get("episodes", ())]
    out.sort(
        key=lambda e: (
            e["patient"],
            e["start"],
            SEVERITY_ORDER.get(e["severity"], 9),
            e["rule_id"],
            e["evidence"],
        )
    )
    return out


def write_output(
    rows: Callable[[], Iterable[dict[str, Any]]],
    out: Path,
    *,
    fmt: str,
    now: str,
    source: str,
    global_issues: list[dict] | None = None,
    status: RunStatus | None = None,
    retrospective: bool = False,
) -> None:
    """Assemble the output from the per-batch rows, atomically (tmp file + os.replace).

    An incomplete run says so first in every format: a `run-status` JSONL line, a `# INCOMPLETE AUDIT` CSV line, a
    banner at the top of the HTML report. A complete run's output is unchanged (findings or episodes only).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    status = status or RunStatus()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    select = episode_rows if retrospective else finding_rows
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        if fmt == "jsonl":
            if not status.complete:
                fh.write(json.dumps(status.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n")
            for f in select(rows()):
                fh.write(json.dumps(f, ensure_ascii=False, separators=(",", ":")) + "\n")
        elif fmt == "csv":
            if not status.complete:
                fh.write("# " + status.banner.replace("\n", " ") + "\n")
            writer = csv.DictWriter(
                fh, fieldnames=EPISODE_FIELDS if retrospective else CSV_FIELDS, extrasaction="ignore"
            )
            writer.writeheader()
            for f in select(rows()):
                writer.writerow(_csv_row(f))
        else:
            fh.write(
                render_html(
                    rows,
                    now=now,
                    source=source,
                    global_issues=global_issues or [],
                    status=status,
                    retrospective=retrospective,
                )
            )
    os.replace(tmp, out)


def _csv_row(f: dict[str, Any]) -> dict[str, Any]:
    values = "; ".join(
        f"{v.get('label')}={v.get('value') or ''}@{v.get('time') or ''} [{v.get('ref')}]"
        for v in f.get("values") or []
        if isinstance(v, dict)
    )
    doses = "; ".join(
        f"{d.get('text')}@{d.get('time')} [{d.get('ref')}]"
        for d in f.get("doses") or []
        if isinstance(d, dict)
    )
    return {
        **f,
        "doses": doses,
        "evidence": " ".join(f.get("evidence") or []),
        "values": values,
        "guideline_ids": " ".join(f.get("guideline_ids") or []),
        "sources": " | ".join(f.get("sources") or []),
    }


def findings_csv(rows: Iterable[dict[str, Any]], fields: Sequence[str] = CSV_FIELDS) -> str:
    """Finding (or, with EPISODE_FIELDS, episode) rows as CSV text in the column layout of `nva audit --format csv`
    (the dashboard's download)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    for f in rows:
        writer.writerow(_csv_row(f))
    return buf.getvalue()


def parse_run_status(lines: Iterable[str | bytes]) -> dict[str, Any] | None:
    """The run-status record of an incomplete run's JSONL lines (the dashboard's banner), or None for a complete run."""
    for line in lines:
        line = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) and obj.get("record") == "run-status" else None
    return None


def parse_findings_jsonl(lines: Iterable[str | bytes]) -> tuple[list[dict[str, Any]], int]:
    """Finding rows from an audit JSONL (one finding a line, or one patient a line with `findings`); bad lines counted."""
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in lines:
        line = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(obj, dict):
            bad += 1
        elif obj.get("record") == "run-status":
            continue  # an incomplete run's banner line, not a finding
        elif isinstance(obj.get("findings"), list):
            rows += [
                _finding_row({**f, "ward": obj.get("ward")}) for f in obj["findings"] if isinstance(f, dict)
            ]
        elif "rule_id" in obj:
            rows.append(_finding_row(obj))
        else:
            bad += 1
    return rows, bad


def _finding_row(obj: dict[str, Any]) -> dict[str, Any]:
    row = dict(obj)
    patient = str(row.get("patient") or "")
    if patient and "/" not in patient and ":" not in patient:
        patient = f"Patient/{patient}"
    row["patient"] = patient
    row["ward"] = row.get("ward") or "(no ward)"
    row["severity"] = str(row.get("severity") or "low")
    row["evidence"] = list(row.get("evidence") or [])
    row["values"] = list(row.get("values") or [])
    return row


def read_findings(path: Path) -> list[dict[str, Any]]:
    """Findings (or episodes) back from a JSONL or CSV output; evidence always as a list; the run-status line of an
    incomplete run is skipped (read it with `read_status`)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        lines = [line for line in text.splitlines(keepends=True) if not line.startswith("# ")]
        rows = list(csv.DictReader(io.StringIO("".join(lines))))
        return [{**r, "evidence": r["evidence"].split()} for r in rows]
    out = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in out if r.get("record") != "run-status"]


def read_status(path: Path) -> dict[str, Any] | None:
    """The run-status record of an incomplete run's JSONL output, or None for a complete run."""
    with path.open("r", encoding="utf-8") as fh:
        first = fh.readline()
    if not first.strip():
        return None
    row = json.loads(first)
    return row if row.get("record") == "run-status" else None


# --- HTML ---------------------------------------------------------------------------------------------------------


def _bars(counts: list[tuple[str, int]], *, colour: Callable[[str], str] = lambda _k: "#34495e") -> str:
    """Horizontal bar chart as inline SVG (no scripts, no CDN)."""
    if not counts:
        return "<p><em>none</em></p>"
    top = max(n for _, n in counts) or 1
    row_h, label_w, bar_w = 22, 260, 360
    parts = [
        f'<svg role="img" width="{label_w + bar_w + 60}" height="{row_h * len(counts) + 4}" '
        'font-family="sans-serif" font-size="12">'
    ]
    for i, (label, n) in enumerate(counts):
        y = i * row_h + 2
        w = max(1, round(bar_w * n / top))
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html_text(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row_h - 6}" fill="{colour(label)}">'
            f"<title>{html_text(label)}: {n}</title></rect>"
            f'<text x="{label_w + w + 6}" y="{y + 15}">{n}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(
    rows: Callable[[], Iterable[dict[str, Any]]],
    *,
    now: str,
    source: str,
    global_issues: list[dict],
    status: RunStatus | None = None,
    retrospective: bool = False,
) -> str:
    """The report; every string that came from the data goes through html_text (inert, escaped)."""
    status = status or RunStatus()
    by_rule: Counter[str] = Counter()
    by_severity: Counter[str] = Counter()
    by_ward: Counter[str] = Counter()
    per_patient: dict[str, list[dict]] = {}
    patient_ward: dict[str, str] = {}
    issue_counts: Counter[tuple[str, str]] = Counter()
    issue_examples: dict[tuple[str, str], list[str]] = {}
    unreadable: list[dict] = []
    stale: list[dict] = []
    patients = resources = doses = 0
    first = last = None
    for row in rows():
        if row["error"]:
            unreadable.append(row)
        patients += 1 if counts_as_patient(row) else 0
        resources += row["resources"]
        if row.get("stale"):
            stale.append(row)
        period = row.get("period") or {}
        if period.get("start") and (first is None or period["start"] < first):
            first = period["start"]
        if period.get("end") and (last is None or period["end"] > last):
            last = period["end"]
        ward = row.get("ward") or "(no current ward)"
        patient_ward[row["patient"]] = ward
        for f in (*row["findings"], *row.get("episodes", ())):
            doses += f.get("doses_count", 0)
            by_rule[f["rule_id"]] += 1
            by_severity[f["severity"]] += 1
            by_ward[ward] += 1
            per_patient.setdefault(row["patient"], []).append(f)
        for issue in row["issues"]:
            key = (issue["code"], issue["severity"])
            issue_counts[key] += 1
            examples = issue_examples.setdefault(key, [])
            if len(examples) < EXAMPLES_PER_CODE:
                examples.append(f"{issue['source']}: {issue['message']}")
    for issue in global_issues:
        key = (issue["code"], issue["severity"])
        issue_counts[key] += 1
        examples = issue_examples.setdefault(key, [])
        if len(examples) < EXAMPLES_PER_CODE:
            examples.append(f"{issue['source']}: {issue['message']}")

    weight = {"high": 100, "medium": 10, "low": 1}
    top = sorted(
        per_patient.items(), key=lambda kv: (-sum(weight.get(f["severity"], 0) for f in kv[1]), kv[0])
    )[:25]
    total = sum(by_rule.values())
    e = html_text
    what = "episodes" if retrospective else "findings"
    if retrospective:
        when = (
            f"retrospectively over each chart's own span ({e(first or '?')} to {e(last or '?')})"
            if not now
            else f"retrospectively over <strong>{e(now)}</strong>"
        )
        doses_text = f"; {doses} doses of the implicated drugs were given while an episode held"
    else:
        when = f"as of <strong>{e(now)}</strong>"
        doses_text = ""
    banner = (
        f"<div class='incomplete' role='alert'><strong>{e(status.banner)}</strong></div>"
        if not status.complete
        else ""
    )
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>NVA chart audit</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        ".high{color:#c0392b;font-weight:bold}.medium{color:#e67e22}.low{color:#2980b9}"
        "code{font-size:90%}.incomplete{background:#c0392b;color:#fff;padding:.8em;margin:1em 0}"
        ".stale{background:#fdf2e9;border-left:4px solid #e67e22;padding:.5em}</style></head><body>",
        "<h1>Chart audit</h1>",
        banner,
        f"<p>Source <code>{e(source)}</code>, audited {when}: {patients} patients, "
        f"{resources} resources, <strong>{total}</strong> {what}{doses_text}; {len(unreadable)} records could not "
        "be audited (see data quality).</p>",
        _stale_html(stale),
        f"<h2>{what.capitalize()} by severity</h2>",
        _bars(
            [(s, by_severity[s]) for s in ("high", "medium", "low") if by_severity[s]],
            colour=lambda k: SEVERITY_COLOURS.get(k, "#34495e"),
        ),
        f"<h2>{what.capitalize()} by rule</h2>",
        _bars(by_rule.most_common()),
        f"<h2>{what.capitalize()} by ward</h2>",
        _bars(by_ward.most_common()),
        "<h2>Top patients</h2>",
    ]
    if top:
        out.append("<table><tr><th>Patient</th><th>Ward</th><th>Findings</th></tr>")
        for patient, findings in top:
            items = "".join(
                f"<li><span class='{e(f['severity'])}'>{e(f['severity'])}</span> "
                f"<code>{e(f['rule_id'])}</code>: {_episode_span(f)}{e(f['message'])}<br><small>Evidence: "
                f"{e(', '.join(f['evidence']))}</small></li>"
                for f in findings
            )
            out.append(
                f"<tr><td><code>{e(patient)}</code></td><td>{e(patient_ward.get(patient, ''))}</td>"
                f"<td><ul>{items}</ul></td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p><em>No findings.</em></p>")
    out.append("<h2>Data quality</h2>")
    if not status.complete:
        out.append(f"<p class='incomplete'>{e(status.banner)}</p>")
    for note in status.notes:
        out.append(f"<p><em>Note:</em> {e(note)}</p>")
    if unreadable:
        out.append("<h3>Records that could not be audited</h3><table><tr><th>Record</th><th>Why</th></tr>")
        for row in unreadable:
            err = row["error"]
            out.append(
                f"<tr><td><code>{e(row['patient'])}</code></td><td>{e(err['code'])}: {e(err['message'])}"
                "</td></tr>"
            )
        out.append("</table>")
    if issue_counts:
        out.append(
            "<h3>Issues in the data that was read</h3><table><tr><th>Issue</th><th>Severity</th>"
            "<th>Count</th><th>Examples</th></tr>"
        )
        for (code, severity), n in sorted(issue_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            examples = "<br>".join(e(x) for x in issue_examples[(code, severity)])
            out.append(
                f"<tr><td><code>{e(code)}</code></td><td>{e(severity)}</td><td>{n}</td>"
                f"<td><small>{examples}</small></td></tr>"
            )
        out.append("</table>")
    if not unreadable and not issue_counts and status.complete:
        out.append("<p>Every record was read without issues.</p>")
    out.append("</body></html>\n")
    return "".join(out)


def _episode_span(f: dict[str, Any]) -> str:
    if "start" not in f:
        return ""
    end = f["end"] or "period end"
    doses = f" — {f['doses_count']} doses given meanwhile" if f.get("doses_count") else ""
    return (
        f"<em>{html_text(f['start'])} to {html_text(end)} ({html_text(duration_text(f['duration_hours']))}, "
        f"{html_text(f['end_reason'])}{html_text(doses)})</em> "
    )


def _stale_html(stale: list[dict[str, Any]]) -> str:
    if not stale:
        return ""
    examples = "".join(
        f"<li><code>{html_text(r['patient'])}</code>: {html_text(r['stale']['text'])}</li>"
        for r in stale[:10]
    )
    return (
        f"<div class='stale'><p>{len(stale)} charts have no data inside some rules' windows at the judged time, so "
        "those rules could not fire on them (use <code>--period</code> for a retrospective audit):</p>"
        f"<ul>{examples}</ul></div>"
    )

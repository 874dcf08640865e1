"""Audit view: open an audit run's JSONL or start one for a ward, filter, chart counts, drill in, export CSV."""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from assistant.rules.retrospective import duration_text
from assistant.textsafe import markdown_text as md
from assistant.textsafe import one_line
from dashboard import render, services

MAX_NAMED = 300  # patients looked up for name, bed and ward; beyond this the table shows ids only
END_REASONS = {
    "resolved": "resolved",
    "period-end": "still holding at the end of the period",
    "order-stop-unknown": "ended with its order, whose stop time is not recorded",
}

cfg, user = render.boot("audit")
ward_ref = render.ward_picker(cfg, user)
ward_name = next((w.name for w in services.ward_choices(cfg, user) if w.ref == ward_ref), "all patients")
st.markdown("## Audit")
st.caption(
    f"Audit runs are read from {services.audit_dir(cfg)}; rules judged at {cfg.rules_now():%d %b %Y %H:%M} UTC."
)

ss = st.session_state
PERIODS = (24, 48, 72, 168, 336, 720)  # hours before the judged time
mode_col, period_col = st.columns([2, 3], vertical_alignment="bottom")
mode = mode_col.radio(
    "What to audit",
    ("now", "period"),
    format_func=lambda m: "Flags at the judged time" if m == "now" else "A past period (episodes)",
    horizontal=True,
    key="audit-mode",
)
period = None
if mode == "period":
    hours = period_col.select_slider(
        "Period before the judged time",
        options=PERIODS,
        value=72,
        format_func=lambda h: f"{h // 24} days" if h >= 48 else f"{h} h",
        key="audit-period",
        help="The retrospective audit: each contradiction as an episode (start, end, doses given while it held).",
    )
    period = (cfg.rules_now() - timedelta(hours=hours), cfg.rules_now())
    period_col.caption(f"From {period[0]:%d %b %Y %H:%M} to {period[1]:%d %b %Y %H:%M} UTC")
col_run, col_up, col_new = st.columns([2, 2, 1.3], vertical_alignment="bottom")
runs = services.audit_runs(cfg)
with col_new:
    label_now = f"Audit {ward_name} now" if period is None else "Audit the period"
    if st.button(label_now, key="audit-start", icon=":material/play_arrow:", type="primary"):
        render.record_or_stop(cfg, user, "audit-run", ward_ref or "all-patients", once=False)
        bar = st.progress(0.0, text="Auditing…")
        path = services.run_ward_audit(
            cfg,
            ward_ref,
            lambda i, n: bar.progress(i / max(n, 1), text=f"Audited {i} of {n} patients"),
            period=period,
        )
        ss["audit_run"] = str(path)
        st.rerun()
with col_run:
    options = [str(p) for p in runs]
    if ss.get("audit_run") not in options:
        ss["audit_run"] = options[0] if options else None
    chosen = st.selectbox(
        "Audit run",
        options,
        key="audit_run",
        format_func=lambda p: one_line(p.split("/")[-1]),
        placeholder="No audit runs yet",
    )
with col_up:
    upload = st.file_uploader("…or open a JSONL file", type=["jsonl"], key="audit-upload")

if upload is not None:
    render.record_or_stop(cfg, user, "audit-view", f"uploaded-file:{upload.file_id}", f"{upload.size} bytes")
    rows, bad = services.read_audit_jsonl(upload.getvalue().splitlines())
    status = services.audit_run_status(upload.getvalue().splitlines())
    label = one_line(upload.name)
elif chosen:
    render.record_or_stop(cfg, user, "audit-view", f"audit-run:{chosen.split('/')[-1]}")
    with open(chosen, encoding="utf-8") as fh:
        rows, bad = services.read_audit_jsonl(fh)
    with open(chosen, encoding="utf-8") as fh:
        status = services.audit_run_status(fh)
    label = chosen.split("/")[-1]
else:
    st.info(
        "No audit run yet: start one for this ward, or upload an audit JSONL (`nva audit SOURCE --out run.jsonl`).",
        icon=":material/info:",
    )
    st.stop()
if status:
    # An incomplete run is never read as a clean one: what is missing and which rules were not judged.
    st.error(
        "**INCOMPLETE AUDIT** — " + md(status.get("banner") or "part of the data could not be read"),
        icon=":material/error:",
    )
if bad:
    st.warning(f"{bad} line(s) of {md(label)} are not audit findings and were skipped.")
if not rows:
    st.success(f"{md(label)}: no findings.")
    st.stop()


def absent(value: Any) -> bool:
    """None, blank or the NaN pandas puts in a missing cell (an episode still holding has no end)."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def human_time(value: Any) -> str:
    """ISO strings as '06 Jan 2025 05:00 UTC' (blank when absent, as written when unreadable)."""
    if absent(value):
        return ""
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return one_line(value)
    return f"{when:%d %b %Y %H:%M} {when.tzname() or ''}".strip()


# Names, beds and wards from the current source, for roles that may open charts (the auditor may; a role
# without the patient permission sees record ids only).
show_names = user.can("patient")


def csv_bytes(records: list[dict[str, Any]]) -> bytes:
    """The filtered findings in the CLI's CSV layout, with name, bed and ward first for roles that see names."""
    base = services.audit_csv(records).decode("utf-8")
    if not show_names:
        return base.encode("utf-8")
    comments = [line for line in base.splitlines(keepends=True) if line.startswith("# ")]
    body = list(
        csv.reader(io.StringIO("".join(x for x in base.splitlines(keepends=True) if not x.startswith("# "))))
    )
    out = io.StringIO()
    out.writelines(comments)
    writer = csv.writer(out)
    if body:
        writer.writerow(["name", "bed", "ward_name", *body[0]])
        for rec, row in zip(records, body[1:], strict=False):
            writer.writerow([rec.get("name", ""), rec.get("bed", ""), rec.get("ward_name", ""), *row])
    return out.getvalue().encode("utf-8")


def who(patient_refs: list[str]) -> dict[str, tuple[str, str, str]]:
    out: dict[str, tuple[str, str, str]] = {}
    if not show_names:
        return out
    for ref in patient_refs[:MAX_NAMED]:
        pid = ref.split("/", 1)[-1]
        try:
            v = services.patient_view(cfg, pid)
        except Exception:  # noqa: BLE001, S112 - a patient not in this source keeps its id only
            continue
        if v.chart is None:
            continue
        head = getattr(v, "header", None)
        enc = v.chart.encounter
        ward = (getattr(head, "ward", "") or (enc.ward_name if enc else "") or "") if v.chart else ""
        out[ref] = (one_line(v.chart.patient.name), one_line(services.bed_label(v)), one_line(ward))
    return out


df = pd.DataFrame(rows)
names = who(sorted(df.patient.astype(str).unique()))
df["name"] = df.patient.map(lambda p: names.get(p, ("", "", ""))[0])
df["bed"] = df.patient.map(lambda p: names.get(p, ("", "", ""))[1])
df["ward_name"] = df.patient.map(lambda p: names.get(p, ("", "", ""))[2] or "")
if show_names and len(set(df.patient)) > MAX_NAMED:
    st.caption(f"Names, beds and wards are shown for the first {MAX_NAMED} patients only.")
f1, f2, f3 = st.columns(3)
rules = f1.multiselect("Rule", sorted(df.rule_id.unique()), key="audit-rule", placeholder="All rules")
sevs = f2.multiselect(
    "Severity",
    [s for s in services.SEVERITIES if s in set(df.severity)],
    key="audit-sev",
    placeholder="All severities",
)
wards = f3.multiselect(
    "Ward", sorted(df.ward.astype(str).unique()), key="audit-ward", placeholder="All wards"
)
mask = pd.Series(True, index=df.index)
if rules:
    mask &= df.rule_id.isin(rules)
if sevs:
    mask &= df.severity.isin(sevs)
if wards:
    mask &= df.ward.astype(str).isin(wards)
view = df[mask]

episodic = services.is_episodes(
    rows
)  # a retrospective run: each row is an episode, not a finding at one moment
m1, m2, m3, m4 = st.columns(4)
m1.metric("Episodes" if episodic else "Findings", len(view))
m2.metric("Patients", view.patient.nunique())
m3.metric("High", int((view.severity == "high").sum()))
m4.metric("Rules firing", view.rule_id.nunique())

counts = view.groupby(["rule_id", "severity"]).size().reset_index(name="findings")
if not counts.empty:
    n_rules = counts.rule_id.nunique()
    chart = (
        alt.Chart(counts)
        .mark_bar()
        .encode(
            y=alt.Y("rule_id:N", sort="-x", title=None, axis=alt.Axis(labelLimit=320, labelOverlap=False)),
            x=alt.X("sum(findings):Q", title="Findings", axis=alt.Axis(tickMinStep=1, format="d")),
            color=alt.Color(
                "severity:N",
                scale=alt.Scale(
                    domain=list(render.SEVERITY_COLORS), range=list(render.SEVERITY_COLORS.values())
                ),
                legend=alt.Legend(orient="top", title=None),
            ),
            tooltip=["rule_id:N", "severity:N", "findings:Q"],
        )
    )
    # An explicit height: with one rule selected streamlit otherwise draws an empty strip (issue 15).
    st.altair_chart(chart, width="stretch", height=90 + 30 * n_rules, alt="Findings per rule and severity")
else:
    st.caption("No findings match these filters.")

cols = ["name", "bed", "ward_name", "patient", "ward", "severity", "rule_id", "title"]
time_cols = [c for c in ("start", "end", "time", "judged_at") if c in view.columns]
# Retrospective runs write episodes: how long the contradiction held and how many doses were given meanwhile.
episode_cols = [c for c in ("duration_hours", "doses_count") if c in view.columns]
table = view[cols + time_cols + episode_cols].copy()
for c in time_cols:
    table[c] = table[c].map(human_time)
for c in ("title", "ward", "rule_id"):
    table[c] = table[c].map(one_line)
table["order"] = table.severity.map({"high": 0, "medium": 1, "low": 2}).fillna(9)
table = table.sort_values(["order", "rule_id", "bed", "patient"]).drop(columns="order")
table = table.rename(
    columns={
        "name": "Patient",
        "bed": "Bed",
        "ward_name": "Ward",
        "patient": "Patient id",
        "ward": "Ward id",
        "severity": "Severity",
        "rule_id": "Rule",
        "title": "Finding",
        "start": "Start",
        "end": "End",
        "time": "Time",
        "judged_at": "Judged at",
        "duration_hours": "Hours",
        "doses_count": "Doses given while it held",
    }
)
if not show_names:
    table = table.drop(columns=["Patient", "Bed", "Ward"])
elif (table["Ward"] == table["Ward id"]).all():  # the run recorded the ward by name: one column says it
    table = table.drop(columns=["Ward id"])
st.dataframe(table, hide_index=True, width="stretch", height=min(36 * (len(table) + 1) + 4, 420))
records = view.drop(columns=[] if show_names else ["name", "bed", "ward_name"]).to_dict("records")
st.download_button(
    "Download CSV",
    csv_bytes(records),
    file_name=f"{Path(label).stem}{'-filtered' if len(view) != len(df) else ''}.csv",
    mime="text/csv",
    icon=":material/download:",
    key="audit-csv",
)

st.markdown("### Patient evidence")
patients = sorted(view.patient.unique(), key=lambda p: (names.get(p, ("", "~"))[1], p))


def patient_choice(ref: str) -> str:
    name, bed, ward = names.get(ref, ("", "", ""))
    return " · ".join(x for x in (bed, name, ward, one_line(ref)) if x)


pick = st.selectbox(
    "Patient",
    patients,
    index=None,
    key="audit-patient",
    placeholder="Choose a patient to drill in",
    format_func=patient_choice,
)
if pick:
    pid = pick.split("/", 1)[-1]
    st.page_link(
        "screens/patient.py",
        label="Open the patient view",
        icon=":material/person:",
        query_params={"patient": pid},
    )
    for n, f in enumerate(view[view.patient == pick].to_dict("records")):
        with st.container(border=True, key=f"flag-{f['severity']}-audit-{n}"):
            period = " · ".join(
                x
                for x in (
                    f"from {human_time(f.get('start'))}" if not absent(f.get("start")) else "",
                    f"until {human_time(f.get('end'))}" if not absent(f.get("end")) else "",
                )
                if x
            )
            st.markdown(
                f"{render.severity_badge(f['severity'])} **{md(f.get('title', ''))}** · {md(f['rule_id'])}"
                + (f" :gray[{md(period)}]" if period else "")
            )
            st.markdown(md(f.get("message", ""), multiline=True))
            if not absent(f.get("duration_hours")):  # a retrospective episode: how long it held, how it ended
                ended = END_REASONS.get(str(f.get("end_reason") or ""), one_line(f.get("end_reason") or ""))
                st.markdown(f"**Held** {md(duration_text(f['duration_hours']))} · {md(ended)}")
            values = [
                {
                    "Evidence": one_line(v.get("label")),
                    "Value": one_line(v.get("value") or ""),
                    "Time": human_time(v.get("time")),
                    "Source": one_line(v.get("ref")),
                }
                for v in f.get("values") or []
                if isinstance(v, dict)
            ]
            if values:
                st.dataframe(pd.DataFrame(values), hide_index=True, width="stretch")
            else:
                st.caption("Evidence: " + md(", ".join(f.get("evidence") or [])))
            doses = [d for d in f.get("doses") or [] if isinstance(d, dict)]
            if doses:
                # A list, not a grid: each dose is read (and found by a screen reader) as a line of text.
                st.markdown(
                    f"**Doses given while it held:** {len(doses)}\n\n"
                    + "\n".join(
                        f"- {md(human_time(d.get('time')) or 'time not recorded')} · "
                        f"{md(d.get('text') or d.get('dose') or '')} · {md(d.get('ref') or '')}"
                        for d in doses
                    )
                )
            if not absent(f.get("action")):
                st.markdown(f"**Suggested nursing action:** {md(f['action'])}")

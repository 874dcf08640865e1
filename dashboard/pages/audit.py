"""Audit view: open an audit run's JSONL or start one for a ward, filter, chart counts, drill in, export CSV."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import render, services

cfg, user = render.boot("audit")
ward_ref = render.ward_picker(cfg, user)
ward_name = next((w.name for w in services.ward_choices(cfg, user) if w.ref == ward_ref), "all patients")
st.markdown("## Audit")
st.caption(
    f"Audit runs are read from {services.audit_dir(cfg)}; rules judged at {cfg.rules_now():%d %b %Y %H:%M} UTC."
)

ss = st.session_state
col_run, col_up, col_new = st.columns([2, 2, 1.3], vertical_alignment="bottom")
runs = services.audit_runs(cfg)
with col_new:
    if st.button(f"Audit {ward_name} now", key="audit-start", icon=":material/play_arrow:", type="primary"):
        render.record_or_stop(cfg, user, "audit-run", ward_ref or "all-patients", once=False)
        bar = st.progress(0.0, text="Auditing…")
        path = services.run_ward_audit(
            cfg, ward_ref, lambda i, n: bar.progress(i / max(n, 1), text=f"Audited {i} of {n} patients")
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
        format_func=lambda p: p.split("/")[-1],
        placeholder="No audit runs yet",
    )
with col_up:
    upload = st.file_uploader("…or open a JSONL file", type=["jsonl"], key="audit-upload")

if upload is not None:
    render.record_or_stop(cfg, user, "audit-view", f"uploaded-file:{upload.file_id}", f"{upload.size} bytes")
    rows, bad = services.read_audit_jsonl(upload.getvalue().splitlines())
    label = upload.name
elif chosen:
    render.record_or_stop(cfg, user, "audit-view", f"audit-run:{chosen.split('/')[-1]}")
    with open(chosen, encoding="utf-8") as fh:
        rows, bad = services.read_audit_jsonl(fh)
    label = chosen.split("/")[-1]
else:
    st.info(
        "No audit run yet: start one for this ward, or upload an audit JSONL (`nva audit SOURCE --out run.jsonl`).",
        icon=":material/info:",
    )
    st.stop()
if bad:
    st.warning(f"{bad} line(s) of {label} are not audit findings and were skipped.")
if not rows:
    st.success(f"{label}: no findings.")
    st.stop()

df = pd.DataFrame(rows)
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

m1, m2, m3, m4 = st.columns(4)
m1.metric("Findings", len(view))
m2.metric("Patients", view.patient.nunique())
m3.metric("High", int((view.severity == "high").sum()))
m4.metric("Rules firing", view.rule_id.nunique())

counts = view.groupby(["rule_id", "severity"]).size().reset_index(name="findings")
if not counts.empty:
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
        .properties(height=max(120, 26 * counts.rule_id.nunique()))
    )
    st.altair_chart(chart, width="stretch")

table = view[["patient", "ward", "severity", "rule_id", "title"]].copy()
table["order"] = table.severity.map({"high": 0, "medium": 1, "low": 2}).fillna(9)
table = table.sort_values(["order", "rule_id", "patient"]).drop(columns="order")
st.dataframe(table, hide_index=True, width="stretch", height=min(36 * (len(table) + 1) + 4, 420))
st.download_button(
    "Download CSV",
    services.audit_csv(view.to_dict("records")),
    file_name=f"{label}.csv",
    mime="text/csv",
    icon=":material/download:",
    key="audit-csv",
)

st.markdown("### Patient evidence")
patients = sorted(view.patient.unique())
pick = st.selectbox(
    "Patient", patients, index=None, key="audit-patient", placeholder="Choose a patient to drill in"
)
if pick:
    pid = pick.split("/", 1)[-1]
    st.page_link(
        "pages/patient.py",
        label="Open the patient view",
        icon=":material/person:",
        query_params={"patient": pid},
    )
    for n, f in enumerate(view[view.patient == pick].to_dict("records")):
        with st.container(border=True, key=f"flag-{f['severity']}-audit-{n}"):
            st.markdown(f"{render.severity_badge(f['severity'])} **{f.get('title', '')}** · `{f['rule_id']}`")
            st.markdown(str(f.get("message", "")))
            values = [
                {
                    "Evidence": v.get("label"),
                    "Value": v.get("value") or "",
                    "Time": v.get("time") or "",
                    "Source": v.get("ref"),
                }
                for v in f.get("values") or []
                if isinstance(v, dict)
            ]
            if values:
                st.dataframe(pd.DataFrame(values), hide_index=True, width="stretch")
            else:
                st.caption("Evidence: " + ", ".join(f.get("evidence") or []))
            if f.get("action"):
                st.markdown(f"**Suggested nursing action:** {f['action']}")

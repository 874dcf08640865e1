"""Ward handoff (charge nurse): every patient sorted by acuity, I-PASS per patient, print and PDF export."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from assistant.textsafe import markdown_text as md
from assistant.textsafe import one_line
from dashboard import pdf, render, services

cfg, user = render.boot("handoff-view")
ward_ref = render.ward_picker(cfg, user)
source = services.session_source(cfg)
ward_name = next((w.name for w in services.ward_choices(cfg, user) if w.ref == ward_ref), "All patients")
target = ward_ref or "all-patients"
render.record_or_stop(cfg, user, "handoff-view", target)

rows = services.ward_handoff(cfg, ward_ref)
loaded = min((r.view.loaded_at for r in rows), default=None)
render.freshness(cfg, loaded, "handoff")

st.markdown(f"## Ward handoff — {md(ward_name)}")
st.caption(
    f"{len(rows)} patients, sickest first (flag severity and NEWS2 band together, as on the census). "
    f"Judged at {cfg.rules_now():%d %b %Y %H:%M} UTC. Select a row to open the patient here."
)
file_errors = services.source_file_errors(source)
if file_errors:
    render.load_banners(services.PatientView("-", None), file_errors)
failed = [r for r in rows if r.view.error or r.view.error_issues]
if failed:
    st.error(
        "**Part of the ward could not be loaded:** "
        + "; ".join(
            md(
                f"{services.patient_label(r.view)}: "
                + (r.view.error or ", ".join(f"{i.source} ({i.code})" for i in r.view.error_issues[:3]))
            )
            for r in failed[:10]
        ),
        icon=":material/report:",
    )


def pending_text(item: object) -> str:
    """A pending item (text, or the core's PendingItem) with its hold mark."""
    text = str(getattr(item, "text", item))
    if (
        getattr(item, "hold", False) and "HOLD" not in text
    ):  # the core's text usually carries the mark already
        return f"HOLD — see flag: {text}"
    return text


def isolation_badge(r: services.HandoffRow) -> str:
    """'ISOLATION · Contact' / 'ISOLATION NOT RETRIEVED' from the core's header ('' when none is charted)."""
    iso = getattr(getattr(r.view, "header", None), "isolation", None)
    return iso.badge if iso is not None else ""


def patient_name(r: services.HandoffRow) -> str:
    return r.view.chart.patient.name if r.view.chart else f"Patient/{r.patient_id}"


table = pd.DataFrame(
    [
        {
            "Bed": one_line(services.bed_label(r.view)),
            "Patient": one_line(patient_name(r)),
            "NEWS2": r.view.news2_total,
            "Severity": one_line(r.level),
            "Flags": services.flag_counts(r.view),
            "Top flags": one_line(
                "; ".join(
                    [isolation_badge(r)] * bool(isolation_badge(r))
                    + [f"{f.severity.upper()}: {f.title}" for f in r.view.findings[:2]]
                )
            ),
            "Pending": one_line(
                "; ".join(pending_text(p) for p in r.pending[:3])
                + (f" (+{len(r.pending) - 3})" if len(r.pending) > 3 else "")
            ),
        }
        for r in rows
    ]
)
printable = False
if user.can("handoff-export"):
    col_a, col_b, _ = st.columns([1, 1, 3], vertical_alignment="center")
    printable = col_a.toggle(
        "Print-friendly layout",
        key="handoff-print",
        help="Plain layout for the browser's Print (Ctrl+P); sidebar and buttons are hidden.",
    )
    # Each switch to the print layout is an export; logged before the layout is drawn.
    if printable and not st.session_state.get("_nva_print_logged"):
        render.record_or_stop(cfg, user, "handoff-export", target, "print layout", once=False)
        st.session_state["_nva_print_logged"] = True
    elif not printable:
        st.session_state.pop("_nva_print_logged", None)
    try:
        build_pdf = services.exporter(
            cfg, user, target, "pdf", lambda: pdf.ward_handoff_pdf(ward_name, rows, cfg.rules_now())
        )
    except services.AccessLogError as exc:
        col_b.error(f"PDF export unavailable: the access log cannot be written ({exc}).")
    else:
        col_b.download_button(
            "Export PDF",
            data=build_pdf,
            file_name=f"handoff-{ward_name.replace(' ', '_')}-{cfg.rules_now():%Y%m%d-%H%M}.pdf",
            mime="application/pdf",
            icon=":material/picture_as_pdf:",
            key="handoff-pdf",
        )

if printable:
    # Page 1 of the printout is the ward overview (st.table renders cells as Markdown: each through md()).
    st.markdown("### Ward overview")
    st.table(
        pd.DataFrame(
            [
                {k: md(v) if isinstance(v, str) else ("—" if pd.isna(v) else v) for k, v in row.items()}
                | {"Bed": md(str(row["Bed"])).replace(" ", "\u00a0")}  # "bed 18" on one line
                for row in table.to_dict("records")
            ]
        )
    )
    st.html('<div style="break-after: page"></div>')
else:
    picked = st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        height=min(35 * (len(table) + 1) + 3, 900),  # the grid's row height: no empty rows under the last one
        on_select="rerun",
        selection_mode="single-row",
        key="handoff-table",
        column_config={
            "Bed": st.column_config.TextColumn(width="small"),
            "NEWS2": st.column_config.NumberColumn(format="%d", width="small"),
            "Severity": st.column_config.TextColumn(width="small"),
            "Flags": st.column_config.TextColumn(width="small"),
            # Pending (HOLD marks, overdue doses) is what the next shift acts on: it gets the room, not the flags.
            "Top flags": st.column_config.TextColumn(width="medium"),
            "Pending": st.column_config.TextColumn(width="large"),
        },
    )
    chosen_rows = list(getattr(getattr(picked, "selection", None), "rows", []) or [])
    if chosen_rows:
        # Same tab, same session: the patient view opens in place of the handoff.
        st.switch_page(render.PATIENT_PAGE, query_params={"patient": rows[chosen_rows[0]].patient_id})
    st.markdown("### I-PASS per patient")

for n, r in enumerate(rows):
    title = (
        f"{md(services.bed_label(r.view))} · {md(patient_name(r))} · "
        f"NEWS2 {r.view.news2_total if r.view.news2_total is not None else '—'} · "
        f"{md(r.level or 'severity unknown')}"
    )
    if printable:
        st.markdown(f"#### {title}")
        render.ipass_block(r, key=f"ho-{n}", interactive=False)
        st.divider()
    else:
        # Lazy expanders: an I-PASS is composed when its patient is opened (the top three start open).
        box = st.expander(title, expanded=n < 3, key=f"ho-exp-{r.patient_id}", on_change="rerun")
        if box.open is not False:
            with box:
                render.ipass_block(r, key=f"ho-{n}", interactive=True)

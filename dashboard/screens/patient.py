"""Patient view (ward workstation): header, flags, cited summary, labs, vitals, medications and notes."""

from __future__ import annotations

import streamlit as st

from assistant.textsafe import markdown_text as md
from assistant.textsafe import one_line
from dashboard import render, services

cfg, user = render.boot("patient")
ward_ref = render.ward_picker(cfg, user)
source = services.session_source(cfg)

# The URL names the patient (?patient=<id>); a new id in the URL wins over the last pick.
requested = st.query_params.get("patient")
if requested and st.session_state.get("_nva_req") != requested:
    st.session_state["nva_patient"] = requested
    st.session_state["_nva_req"] = requested
picker_slot = st.sidebar.empty()


def patient_picker(chosen: str | None) -> str | None:
    """The sidebar picker, bed order with names. Loading the ward takes ~1 s, so it is drawn after the chart."""
    ward = services.ward_views(cfg, ward_ref)
    ward.sort(key=lambda v: services.bed_sort_key(services.bed_label(v)))
    ids = [v.patient_id for v in ward]
    if chosen and chosen not in ids:
        ids = [chosen, *ids]
    labels = {v.patient_id: services.patient_label(v) for v in ward}
    default = {} if "nva_patient" in st.session_state else {"index": None}  # no pick until the nurse picks
    with picker_slot.container():
        return st.selectbox(
            "Patient",
            ids,
            format_func=lambda p: one_line(labels.get(p, f"Patient/{p}")),
            key="nva_patient",
            placeholder="Choose a patient",
            **default,
        )


pid = st.session_state.get("nva_patient")
if pid is None:
    pid = patient_picker(None)
    if pid is None:
        st.markdown("## Patient view")
        st.info("Choose a patient in the sidebar, or from the ward census.", icon=":material/person_search:")
        st.page_link("screens/census.py", label="Ward census", icon=":material/groups:")
        st.stop()
    drawn = True
else:
    drawn = False
# Always written back: page navigation may have dropped it from the address bar, and a reload or a copied link
# must reopen this patient.
st.query_params["patient"] = pid
st.session_state["_nva_req"] = pid

# Ward access is decided from the census before the chart is read; the view is logged before it is shown.
if not user.all_wards and not user.may_see_ward(services.patient_ward(cfg, user, pid)):
    render.refuse(
        cfg,
        user,
        f"Patient/{pid}",
        f"**{md('Patient/' + pid)} is not on a ward assigned to you.** You may open "
        "patients of your own wards only; ask the charge nurse if you need this chart.",
        "patient not on an assigned ward",
    )
render.record_or_stop(cfg, user, "view-chart", f"Patient/{pid}")
since = render.since_picker(cfg)
view = services.patient_view(cfg, pid)
render.freshness(cfg, view.loaded_at, "patient")
render.load_banners(view, services.source_file_errors(source))
slots: list = []
summary_slot = None
suggest_slot = None
draw_trends = None
if view.chart is not None:
    render.source_dialog(view)
    render.patient_header(view)
    col_flags, col_summary = st.columns([3, 2], gap="medium")
    with col_flags:
        slots = render.flags_section(view, key=pid)
        suggest_slot = st.empty()  # LLM-suggested contradictions, once the summary has run (never flags)
    with col_summary:
        st.markdown("### Summary")
        summary_slot = st.empty()
        summary_slot.caption("Composing the cited summary…")
    # Lazy tabs: only the open tab is drawn, so the first paint carries no hidden charts.
    labs_tab, vitals_tab, meds_tab, notes_tab, delta_tab = st.tabs(
        ["Labs", "Vitals and NEWS2", "Medications and MAR", "Nursing notes", "Since last shift"],
        key="nva_tab",
        on_change="rerun",
    )
    if labs_tab.open is not False:
        with labs_tab:
            draw_trends = render.labs_section(view, pid)
    if notes_tab.open:
        with notes_tab:
            render.notes_section(view, pid)
    if vitals_tab.open:
        with vitals_tab:
            render.vitals_section(view, pid)
    if meds_tab.open:
        with meds_tab:
            render.meds_section(view, pid)
    if delta_tab.open:
        with delta_tab:
            render.patient_delta_section(view, since)
# Header, flags and the labs table are on screen. Then the slower parts: the ward picker (server work while the
# browser paints), guideline passages, the LLM summary, and the trend charts last: vega draws them in the browser,
# and while the local model composes on the same cores that drawing slowed the summary by ~2 s (2 cores,
# bench/bench_dashboard_llm.py). The order is the nurse's too: flags, the cited summary, then trends.
if not drawn:
    patient_picker(pid)
if view.chart is not None and summary_slot is not None:
    passages = [p for finding, slot in slots for p in render.fill_guideline(slot, finding)]
    render.summary_section(cfg, view, summary_slot, passages, suggest_slot=suggest_slot)
if draw_trends is not None:
    draw_trends()

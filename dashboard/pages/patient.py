"""Patient view (ward workstation): header, flags, cited summary, labs, vitals, medications and notes."""

from __future__ import annotations

import streamlit as st

from dashboard import render, services

cfg = render.boot()
ward_ref = render.ward_picker(cfg)
source = services.session_source(cfg)

requested = st.query_params.get("patient")
ward = services.ward_views(cfg, ward_ref)  # < 1 s for a 25-bed ward; gives the picker names and beds
ward.sort(key=lambda v: services.bed_sort_key(services.bed_label(v)))
ids = [v.patient_id for v in ward]
if requested and requested not in ids:
    ids = [requested, *ids]
if not ids:
    st.warning("No patients are on this ward right now.")
    st.stop()
labels = {v.patient_id: services.patient_label(v) for v in ward}


def _label(pid: str) -> str:
    return labels.get(pid, f"Patient/{pid}")


if requested and st.session_state.get("nva_patient") != requested and st.session_state.get("_nva_req") != requested:
    st.session_state["nva_patient"] = requested
    st.session_state["_nva_req"] = requested
if st.session_state.get("nva_patient") not in ids:
    st.session_state["nva_patient"] = None
pid = st.sidebar.selectbox("Patient", ids, format_func=_label, key="nva_patient", placeholder="Choose a patient")
if pid is None:
    st.markdown("## Patient view")
    st.info("Choose a patient in the sidebar, or open `?patient=<id>`.", icon=":material/person_search:")
    st.stop()
if st.query_params.get("patient") != pid:
    st.query_params["patient"] = pid
    st.session_state["_nva_req"] = pid

view = services.patient_view(cfg, pid)
render.freshness(cfg, view.loaded_at, "patient")
render.load_banners(view, services.source_file_errors(source, cfg))
if view.chart is None:
    st.stop()

render.source_dialog(view)
render.patient_header(view)
col_flags, col_summary = st.columns([3, 2], gap="medium")
with col_flags:
    slots = render.flags_section(view, key=pid)
with col_summary:
    st.markdown("### Summary")
    summary_slot = st.empty()
    summary_slot.caption("Composing the cited summary…")
tabs = st.tabs(["Labs", "Vitals and NEWS2", "Medications and MAR", "Nursing notes"])
with tabs[0]:
    render.labs_section(view, pid)
with tabs[1]:
    render.vitals_section(view, pid)
with tabs[2]:
    render.meds_section(view, pid)
with tabs[3]:
    render.notes_section(view, pid)

# Facts and flags are on screen; now the slow parts: guideline passages, then the LLM summary.
passages = [p for finding, slot in slots for p in render.fill_guideline(slot, finding)]
render.summary_section(cfg, view, summary_slot, passages)

"""Ward census (landing page): one row per patient, sickest first, one click (or Enter) to the patient."""

from __future__ import annotations

import streamlit as st

from assistant.textsafe import markdown_text as md
from dashboard import render, services

cfg, user = render.boot("patient")
ward_ref = render.ward_picker(cfg, user)
services.session_source(cfg)

ward_name = next((w.name for w in services.ward_choices(cfg, user) if w.ref == ward_ref), "All patients")
render.record_or_stop(cfg, user, "handoff-view", ward_ref or "all-patients", "census")
st.markdown(f"## Ward census — {md(ward_name)}")

since = render.since_picker(cfg)
rows, delta = render.census_rows(cfg, ward_ref, since)
loaded = min((r.loaded_at for r in rows if r.loaded_at), default=None)
render.freshness(cfg, loaded, "census")
st.caption(
    f"{len(rows)} patients, sickest first (flag severity and NEWS2 band together). "
    f"Judged at {cfg.rules_now():%d %b %Y %H:%M} UTC · new results since {since:%d %b %H:%M} UTC. "
    "Tab to a name and press Enter to open the patient."
)
render.census_table(rows, since)
render.ward_delta_section(delta, since)

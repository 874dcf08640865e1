"""Ward census (landing page): one row per patient, sickest first, one click (or Enter) to the patient."""

from __future__ import annotations

from datetime import timedelta

import streamlit as st

from assistant.textsafe import markdown_text as md
from dashboard import render, services

cfg, user = render.boot("patient")
ward_ref = render.ward_picker(cfg, user)
services.session_source(cfg)

ward_name = next((w.name for w in services.ward_choices(cfg, user) if w.ref == ward_ref), "All patients")
render.record_or_stop(cfg, user, "handoff-view", ward_ref or "all-patients", "census")
st.markdown(f"## Ward census — {md(ward_name)}")

hours = st.sidebar.select_slider(
    "Since last shift",
    options=[4, 6, 8, 10, 12, 16, 24, 36, 48],
    value=int(render.delta_hours()),
    format_func=lambda h: f"{h} h",
    key="nva_since_hours",
    help="New results and the 'since last shift' list count from this many hours before the judged time.",
)
since = cfg.rules_now() - timedelta(hours=hours)
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

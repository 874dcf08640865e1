"""NVA dashboard entry point: `streamlit run dashboard/app.py --server.address 127.0.0.1`."""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script by streamlit: make the repository importable even without an installed package.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard import render  # noqa: E402

PAGES = Path(__file__).resolve().parent / "pages"

st.set_page_config(page_title="NVA — Nurse Virtual Assistant", layout="wide",
                   page_icon=":material/medical_services:")
render.page_setup()
nav = st.navigation([
    st.Page(PAGES / "patient.py", title="Patient", icon=":material/person:", default=True),
    st.Page(PAGES / "handoff.py", title="Ward handoff", icon=":material/assignment:", url_path="handoff"),
    st.Page(PAGES / "audit.py", title="Audit", icon=":material/fact_check:", url_path="audit"),
    st.Page(PAGES / "status.py", title="Settings and status", icon=":material/settings:", url_path="status"),
])
with st.sidebar:
    render.demo_banner()
nav.run()

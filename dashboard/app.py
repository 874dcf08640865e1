"""NVA dashboard entry point: `streamlit run dashboard/app.py --server.address 127.0.0.1`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# Run as a script by streamlit: make the repository importable even without an installed package.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard import render, services  # noqa: E402

# Not `pages/`: Streamlit runs a folder of that name beside the main script as an old-style multipage app until the
# first st.navigation() call of the process, so a server's first session opened on /audit would run that file alone
# (the folder's file names in the sidebar, no sign-in gate; issue 15).
PAGES = Path(__file__).resolve().parent / "screens"

# The favicon is drawn here: a `:material/...:` or emoji icon is fetched from a font CDN by the browser, and NVA
# makes no outside request at run time.
st.set_page_config(page_title="NVA — Nurse Virtual Assistant", layout="wide", page_icon=render.app_icon())
render.page_setup()

try:
    gate = services.gate()
except services.RoleFileError as exc:
    gate = services.Gate("config-error", message=f"**NVA cannot check roles:** {exc}")
if gate.user is None:
    if gate.state == "no-role" and st.session_state.get("_nva_refused") != gate.who:
        try:  # best effort: the refusal stands even if it cannot be logged
            services.access_log(services.app_config()).record(
                user=gate.who,
                role="none",
                action="access-denied",
                target="nva",
                detail="signed in without an NVA role",
                subject=gate.subject,
            )
            st.session_state["_nva_refused"] = gate.who
        except services.AccessLogError:
            logging.getLogger(__name__).exception("no-role refusal could not be logged")

    def refused() -> None:
        render.gate_page(gate)

    # Always through st.navigation: the app's pages only, hidden while nobody is let in.
    st.navigation([st.Page(refused, title="NVA", url_path="nva", default=True)], position="hidden").run()
    st.stop()

user = gate.user
services.forget_other_user(user)
# The ward census is the landing page: who is sickest, one click to the patient (issue 15). A link that names a
# patient (/?patient=<id>, as older links and bookmarks do) lands on that patient instead.
to_patient = bool(st.query_params.get("patient"))
pages = [
    st.Page(PAGES / "census.py", title="Ward census", icon=":material/groups:", default=not to_patient),
    st.Page(
        PAGES / "patient.py",
        title="Patient",
        icon=":material/person:",
        url_path="patient",
        default=to_patient,
    ),
    st.Page(PAGES / "handoff.py", title="Ward handoff", icon=":material/assignment:", url_path="handoff"),
]
# Pages a role may not open are not listed; each page checks again (a URL can be typed).
if user.can("audit"):
    pages.append(st.Page(PAGES / "audit.py", title="Audit", icon=":material/fact_check:", url_path="audit"))
if user.can("access-log"):
    pages.append(
        st.Page(PAGES / "access_log.py", title="Access log", icon=":material/policy:", url_path="access-log")
    )
pages.append(
    st.Page(PAGES / "status.py", title="Settings and status", icon=":material/settings:", url_path="status")
)
render.start_llm_warmup(services.app_config())  # once per server process, in the background
services.settle_process()  # once per server process, before any chart is read
nav = st.navigation(pages)
with st.sidebar:
    render.user_box(user)
nav.run()

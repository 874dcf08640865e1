"""Access log (auditors): who opened which chart, summary, handoff or audit, and when; filter and export."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import streamlit as st

from assistant.security.access_log import ACTIONS
from assistant.textsafe import markdown_text as md
from assistant.textsafe import one_line
from dashboard import render, services

cfg, user = render.boot("access-log")
st.markdown("## Access log")
# The hash chain is checked before this view is logged: a missing or broken log must show even if it cannot be written.
chain = services.access_log_status(cfg)
if not chain.ok:
    st.error(
        "**Access log integrity broken — do not trust these entries.** "
        + "; ".join(md(p) for p in chain.problems)
        + ". Keep the log file and its `.head` file as they are and report this to your security team.",
        icon=":material/gpp_bad:",
    )
render.record_or_stop(cfg, user, "access-log-view", "access-log")
st.caption(
    f"Append-only log at {services.access_log_path(cfg)}: references only (Patient/…, Location/…), never "
    "chart content. Times are UTC."
)

f1, f2, f3, f4 = st.columns([2, 2, 2, 1])
who = f1.text_input("User", key="al-user", placeholder="exact user name (email)").strip()
target = f2.text_input(
    "Patient or ward", key="al-target", placeholder="Patient/<id> or Location/<id>"
).strip()
actions = f3.multiselect("Action", ACTIONS, key="al-actions", placeholder="All actions")
days = f4.number_input("Last days", min_value=1, max_value=3650, value=30, key="al-days")
since = (datetime.now(UTC) - timedelta(days=int(days))).isoformat()
try:
    events = services.access_log(cfg).events(
        limit=2000, user=who or None, target=target or None, actions=tuple(actions), since=since
    )
except Exception as exc:  # noqa: BLE001 - an unreadable log is reported, not a crash
    st.error(f"The access log cannot be read: {md(exc)}", icon=":material/error:")
    st.stop()

m1, m2, m3 = st.columns(3)
m1.metric("Events", len(events))
m2.metric("Users", len({e.user for e in events}))
m3.metric("Refusals", sum(e.action == "access-denied" for e in events))
if not events:
    st.info("No access events match these filters.", icon=":material/info:")
    st.stop()
table = pd.DataFrame(
    [
        {
            "Time": e.at,
            "User": one_line(e.user),
            "Role": one_line(e.role),
            "Action": one_line(e.action),
            "Target": one_line(e.target),
            "Detail": one_line(e.detail),
        }
        for e in events
    ]
)
st.dataframe(table, hide_index=True, width="stretch", height=min(36 * (len(table) + 1) + 4, 600))
st.download_button(
    "Download CSV",
    table.to_csv(index=False).encode("utf-8"),
    file_name="nva-access-log.csv",
    mime="text/csv",
    icon=":material/download:",
    key="al-csv",
)

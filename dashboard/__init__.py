"""Streamlit dashboard: patient view, ward handoff, audit and status pages over the NVA core."""

from dashboard.navguard import through_app

through_app()  # a page opened by its URL as a server's first session reruns through app.py (navguard.py)

"""Streamlit dashboard: patient view, ward handoff, audit and status pages over the NVA core."""

"""Settings and status: data source and its health, LLM backend and model, guideline store, effective settings."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from assistant.textsafe import markdown_text as md
from assistant.textsafe import one_line
from dashboard import render, services

cfg = services.app_config()
st.markdown("## Settings and status")
if cfg.setup_error:
    st.error(md(cfg.setup_error), icon=":material/error:")

user = services.current_user()
st.markdown(
    f"**User:** {md(user.name)} · role `{user.role}`"
    + (" · local demo mode (no access control)" if user.demo else "")
)
st.markdown(
    f"**Sign-in:** {'identity provider (OIDC)' if services.auth_configured() else 'not configured'} · "
    f"access log `{services.access_log_path(cfg)}`"
)

st.markdown("### Data source")
health = services.source_health(cfg)
c2, c3, c4 = st.columns(3)
c2.metric("Health", "OK" if health["ok"] else "FAILING")
c3.metric("Patients", health.get("patients", "—"))
c4.metric("Wards", health.get("wards", "—"))
st.markdown(f"**{md(cfg.source_kind)}** {md(cfg.source)} — answered in {health['seconds'] * 1000:.0f} ms")
if not health["ok"]:
    st.error(f"The source cannot be read: {md(health['error'])}", icon=":material/error:")
for where, why in health.get("file_errors", []):
    st.error(f"Unreadable source file **{md(where)}**: {md(why)}", icon=":material/report:")
st.markdown(f"**Rules 'now':** {cfg.rules_now():%Y-%m-%d %H:%M} UTC — {cfg.now_reason}")

st.markdown("### Language model")
try:
    backend = services.get_llm(cfg)
    available = bool(getattr(backend, "available", False))
    st.markdown(
        f"Backend **{getattr(backend, 'name', cfg.llm_backend)}** · model "
        f"`{getattr(backend, 'model', '') or cfg.settings.get('NVA_LLM_MODEL') or 'default'}` · "
        + (
            "available (loads on first summary)"
            if available
            else "not configured: summaries use the verified template"
        )
    )
except Exception as exc:  # noqa: BLE001 - a misconfigured backend is reported, the app keeps working
    st.error(f"The LLM backend `{cfg.llm_backend}` cannot be set up: {md(exc)}", icon=":material/error:")

st.markdown("### Guideline store")
gs = services.guideline_status()
if gs["ok"]:
    g1, g2, g3 = st.columns(3)
    g1.metric("Documents", gs["documents"])
    g2.metric("Chunks", gs["chunks"])
    g3.metric("Last ingest", f"{gs['last_ingest']:%d %b %H:%M} UTC" if gs["last_ingest"] else "never")
    if not gs["chunks"]:
        st.warning("The guideline store is empty: run `nva guidelines ingest guidelines/corpus`.")
else:
    st.error(f"The guideline store cannot be opened: {md(gs['error'])}", icon=":material/error:")

st.markdown("### Effective settings")
st.caption("Environment overrides .streamlit/secrets.toml overrides defaults; secrets are masked.")
st.dataframe(
    pd.DataFrame(
        sorted((k, one_line(v)) for k, v in cfg.redacted_settings().items()), columns=["Setting", "Value"]
    ),
    hide_index=True,
    width="stretch",
)
render.freshness(cfg, None, "status")

"""Every page runs through app.py (sign-in gate, the app's navigation), even the first one opened by its URL."""

from __future__ import annotations

import streamlit as st

# Streamlit treats the `pages/` folder beside app.py as an old-style multipage app until the first st.navigation()
# call in the server process. Until then a session opened on a page URL (e.g. /audit) runs pages/audit.py on its
# own: the sidebar lists the folder's file names and app.py's gate is skipped (issue 15). dashboard/__init__.py runs
# this once per process, when the first script run imports the package (before a page's first line of its own).


def through_app() -> None:
    """In an old-style run, turn that mode off for the process and rerun: app.py then runs first and resolves the
    same page (same script, same URL) behind its gate, with the app's navigation."""
    from streamlit.runtime.pages_manager import PagesManager

    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False  # what st.navigation() sets on its first call
        st.rerun()

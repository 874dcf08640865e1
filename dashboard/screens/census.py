"""Ward census (landing page): one row per patient, sickest first, one click (or Enter) to the patient."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import streamlit as st

from assistant.textsafe import html_text as esc
from assistant.textsafe import markdown_text as md
from dashboard import render, services

# A row is three elements (bed, the patient's page link, one HTML block for the rest) rather than eight columns of
# eight elements: the census is the landing page and its first paint is budgeted (issue 15: <= 2 s).
BED_PX, NAME_PX = 78, 215
GRID = "grid-template-columns: " + " ".join(f"minmax(0, {w}fr)" for w in (0.4, 1.35, 2.1, 1.5, 1.9, 0.65))
BAND_CLASS = {"high": "red", "medium": "orange", "low-medium": "yellow", "low": "green"}
SEVERITY_CLASS = {"high": "red", "medium": "orange", "low": "blue"}
CSS = f"""<style>
.nva-census {{ display:grid; {GRID}; gap:0.5rem; align-items:center; font-size:0.9rem; line-height:1.35; }}
.nva-census.head {{ font-weight:600; align-items:end; }}
.nva-cell-bed {{ font-size:0.9rem; }}
.nva-head-bed, .nva-head-name {{ font-weight:600; font-size:0.9rem; }}
.nva-b {{ display:inline-block; border-radius:0.3rem; padding:0 0.35rem; margin:0 0.2rem 0.1rem 0;
  font-size:0.8rem; font-weight:600; white-space:nowrap; }}
.nva-b.red {{ background:#fee4e2; color:#912018; }} .nva-b.orange {{ background:#fef0c7; color:#93370d; }}
.nva-b.yellow {{ background:#fef7c3; color:#713b12; }} .nva-b.green {{ background:#dcfae6; color:#085d3a; }}
.nva-b.blue {{ background:#dbeafe; color:#1e3a8a; }} .nva-b.gray {{ background:#f2f4f7; color:#344054; }}
.nva-b.purple {{ background:#ebe9fe; color:#3e1c96; }}
.nva-none {{ color:#667085; }} .nva-small {{ font-size:0.8rem; color:#344054; }}
.nva-err {{ color:#b42318; font-size:0.8rem; }}
[class*="st-key-census-row-"] {{ border-bottom:1px solid #eaecf0; padding-bottom:0.3rem; }}
details.nva-delta {{ border:1px solid #d0d5dd; border-radius:0.4rem; padding:0.35rem 0.7rem; margin:0 0 0.4rem 0; }}
details.nva-delta summary {{ cursor:pointer; }}
details.nva-delta ul {{ margin:0.3rem 0 0 1.1rem; padding:0; font-size:0.9rem; }}
</style>"""
HEADINGS = ("Age", "NEWS2", "Flags", "Holds", "Doses due next hour", "New results")


def badge(colour: str, text: str) -> str:
    return f'<span class="nva-b {colour}">{esc(text)}</span>'


def none() -> str:
    return '<span class="nva-none">none</span>'


def news2_cell(r: Any) -> str:
    """NEWS2 as colour AND words (the band's one-word name; the column heading says NEWS2)."""
    if r.news2 is None:
        return badge("gray", "not scored")
    words = render.BAND_LABEL.get(r.news2_band) or r.news2_band_label or "band unknown"
    cell = badge(BAND_CLASS.get(r.news2_band, "gray"), f"{r.news2} · {words}")
    return cell + (' <span class="nva-small">(incomplete)</span>' if r.news2_incomplete else "")


def _isolation_badge(r: Any) -> str:
    """The core's isolation badge text (CensusRow.isolation.badge: '' when none is charted)."""
    iso = r.isolation  # None for a chart that could not be read
    if iso is None or not iso.badge:
        return ""
    return badge("purple" if iso.status == "charted" else "orange", iso.badge) + "<br>"


def flags_cell(r: Any) -> str:
    iso = _isolation_badge(r)
    if not r.badges:
        return iso + '<span class="nva-none">no flags</span>'
    counts = {s: sum(1 for b in r.badges if b.severity == s) for s in services.SEVERITIES}
    marks = "".join(badge(SEVERITY_CLASS.get(s, "gray"), f"{n} {s.upper()}") for s, n in counts.items() if n)
    return f'{iso}{marks}<br><span class="nva-small">{esc(r.badges[0].title)}</span>'


def holds_cell(r: Any) -> str:
    if not r.holds:
        return none()
    return "<br>".join(f"{badge('red', 'HOLD')}{esc(h)}" for h in r.holds[:3]) + (
        f'<br><span class="nva-none">+{len(r.holds) - 3} more</span>' if len(r.holds) > 3 else ""
    )


def due_cell(r: Any) -> str:
    due = r.due_next_hour
    if not due:
        return none()
    lines = [
        (badge("orange", "LATE") if d.state == "late" else "")
        + f"{render.fmt_clock(d.time)} {esc(d.label)}"
        + (f" {badge('red', 'HOLD — see flag')}" if d.hold else "")
        for d in due[:3]
    ]
    more = f'<br><span class="nva-none">+{len(due) - 3} more</span>' if len(due) > 3 else ""
    return "<br>".join(lines) + more


def row_html(r: Any) -> str:
    cells = (
        "—" if r.age is None else str(r.age),
        news2_cell(r),
        flags_cell(r)
        + (f'<br><span class="nva-err">chart not loaded: {esc(r.error)}</span>' if r.error else ""),
        holds_cell(r),
        due_cell(r),
        "—" if r.new_results is None else str(r.new_results),
    )
    return '<div class="nva-census">' + "".join(f"<div>{c}</div>" for c in cells) + "</div>"


def census_table(rows: list[Any]) -> None:
    """One row per patient; the name is a page link (a Tab stop, opens in the same tab and session)."""
    with st.container(horizontal=True, vertical_alignment="bottom", wrap=False, key="census-head"):
        st.html(CSS + '<div class="nva-head-bed">Bed</div>', width=BED_PX)
        st.html('<div class="nva-head-name">Patient</div>', width=NAME_PX)
        st.html('<div class="nva-census head">' + "".join(f"<div>{h}</div>" for h in HEADINGS) + "</div>")
    for n, r in enumerate(rows):
        with st.container(horizontal=True, vertical_alignment="center", wrap=False, key=f"census-row-{n}"):
            st.html(f'<div class="nva-cell-bed">{esc(r.bed or "—")}</div>', width=BED_PX)
            acuity = getattr(r.acuity, "label", "") or ""
            st.page_link(
                render.PATIENT_PAGE,
                label=md(r.name),
                query_params={"patient": r.patient_id},
                icon=":material/person:",
                help=f"Open {md(r.name)}" + (f" — {md(acuity)}" if acuity else ""),
                width=NAME_PX,
            )
            st.html(row_html(r))


def ward_delta_section(delta: Any, since: datetime) -> None:
    """'Since last shift' for the ward, per patient (sickest first), as native disclosure widgets in one block."""
    st.markdown(f"### Since last shift ({since:%d %b %H:%M} UTC)")
    if delta is None:
        st.caption("The shift delta is not available.")
        return
    shown = [p for p in delta.patients if p.items or p.news2_change]
    if not shown:
        st.caption("Nothing new since then.")
        return
    blocks = []
    for p in shown:
        change = ""
        if p.news2_change:
            before = "—" if p.news2_before is None else p.news2_before
            after = "—" if p.news2_now is None else p.news2_now
            change = f" · NEWS2 {before} → {after}"
        items = p.items[:30]
        lines = "".join(
            f"<li>{render.fmt_clock(i.time)} · <b>{esc(i.label)}</b> · {esc(i.text)}</li>" for i in items
        ) + (f"<li>… and {len(p.items) - 30} more</li>" if len(p.items) > 30 else "")
        blocks.append(
            f'<details class="nva-delta"><summary>{esc(p.bed)} · {esc(p.name)} — {len(p.items)} change(s)'
            f"{esc(change)}</summary><ul>{lines or '<li>NEWS2 changed</li>'}</ul></details>"
        )
    st.html("".join(blocks))


cfg, user = render.boot("patient")
ward_ref = render.ward_picker(cfg, user)
services.session_source(cfg)

ward_name = next((w.name for w in services.ward_choices(cfg, user) if w.ref == ward_ref), "All patients")
render.record_or_stop(cfg, user, "handoff-view", ward_ref or "all-patients", "census")
st.markdown(f"## Ward census — {md(ward_name)}")

since = render.since_picker(cfg)
wv = services.ward_view(cfg, ward_ref, since=since)
loaded = min((v.loaded_at for v in wv.patients.values() if v.loaded_at), default=None)
render.freshness(cfg, loaded, "census")
st.caption(
    f"{len(wv.rows)} patients, sickest first (flag severity and NEWS2 band together). "
    f"Judged at {cfg.rules_now():%d %b %Y %H:%M} UTC · new results since {since:%d %b %H:%M} UTC. "
    "Tab to a name and press Enter to open the patient."
)
census_table(wv.rows)
ward_delta_section(wv.delta, since)

"""Rendering helpers shared by the dashboard pages: banners, flags, tables, charts and the source viewer."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, is_dataclass
from datetime import datetime, timedelta
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from assistant.model import Chart, Finding, Result
from assistant.security.roles import User
from assistant.textsafe import html_text, inert_text, markdown_text, one_line
from dashboard import services

SEVERITY_COLORS = {"high": "#b42318", "medium": "#b54708", "low": "#1d4ed8"}
SEVERITY_BADGE = {"high": "red", "medium": "orange", "low": "blue"}
log = logging.getLogger(__name__)
# Every piece of chart (or identity-provider, or source) text shown through Markdown goes through md(): patient
# data is data, never markup (issue 12). HTML the app writes itself goes through st.html with html_text().
md = markdown_text
VITALS = (
    ("heart_rate", "Heart rate"),
    ("respiratory_rate", "Respiratory rate"),
    ("spo2", "SpO2"),
    ("systolic_bp", "Systolic BP"),
    ("temperature", "Temperature"),
)

CSS = """
<style>
[class*="st-key-flag-high"] { border-left: 6px solid #b42318 !important; }
[class*="st-key-flag-medium"] { border-left: 6px solid #b54708 !important; }
[class*="st-key-flag-low"] { border-left: 6px solid #1d4ed8 !important; }
.nva-allergy { background:#fef3f2; border:2px solid #b42318; color:#7a271a; padding:0.45rem 0.8rem;
  border-radius:0.4rem; font-weight:600; margin:0.25rem 0 0.5rem 0; }
.nva-allergy.nka { background:#ecfdf3; border-color:#15803d; color:#14532d; }
.nva-allergy.unknown { background:#fffaeb; border-color:#b54708; color:#7a2e0e; }
.nva-isolation { background:#f4f3ff; border:2px solid #5b21b6; color:#3b0764; padding:0.4rem 0.8rem;
  border-radius:0.4rem; margin:0.25rem 0 0.5rem 0; }
.nva-isolation.unknown { background:#fffaeb; border-color:#b54708; color:#7a2e0e; }
.nva-isolation .nva-ref { color:#475467; font-size:0.85rem; }
.nva-demo { background:#eef4ff; border:1px solid #1d4ed8; color:#1e3a8a; padding:0.3rem 0.7rem;
  border-radius:0.4rem; font-size:0.85rem; }
.nva-muted { color:#475467; font-size:0.85rem; }
table.nva-labs { width:100%; border-collapse:collapse; font-size:0.9rem; }
table.nva-labs th, table.nva-labs td { border-bottom:1px solid #d0d5dd; padding:0.25rem 0.5rem; text-align:left; }
table.nva-labs th { background:#f2f4f7; }
table.nva-labs tr.abn td { background:#fde2e1; color:#7a271a; }
table.nva-labs code { font-size:0.75rem; color:#475467; background:none; }
/* Keyboard focus is a thick outline, never the look of the current page's highlight (issue 15). */
a:focus-visible, button:focus-visible, [role="tab"]:focus-visible, summary:focus-visible,
input:focus-visible, [tabindex]:focus-visible { outline: 3px solid #1d4ed8 !important; outline-offset: 2px; }
[data-testid="stSidebarNav"] a:focus-visible { outline: 3px solid #f59e0b !important; }
/* Chart toolbars are not Tab stops: the charts' data is in the tables and tooltips beside them. */
[data-testid="stVegaLiteChart"] [data-testid="stElementToolbar"],
.stVegaLiteChart [data-testid="stElementToolbar"], [data-testid="stElementContainer"]:has(
  [data-testid="stVegaLiteChart"]) [data-testid="stElementToolbar"] { display: none !important; }
@media print {
  [data-testid="stSidebar"], [data-testid="stHeader"], [data-testid="stToolbar"], .stButton,
  .stDownloadButton, [data-testid="stSidebarCollapsedControl"] { display:none !important; }
  .block-container { padding-top: 0 !important; }
}
</style>
"""


def app_icon() -> Any:
    """A 32x32 favicon (white cross on NVA blue) drawn in memory: served by streamlit itself, no CDN."""
    from PIL import Image, ImageDraw

    icon = Image.new("RGB", (32, 32), (29, 78, 216))
    draw = ImageDraw.Draw(icon)
    draw.rectangle((6, 13, 25, 18), fill=(255, 255, 255))
    draw.rectangle((13, 6, 18, 25), fill=(255, 255, 255))
    return icon


def page_setup() -> None:
    st.markdown(CSS, unsafe_allow_html=True)


def user_box(user: User) -> None:
    """Sidebar: the demo banner, or who is signed in with which role and wards, and sign-out."""
    if user.demo:
        st.markdown(
            '<div class="nva-demo"><b>Local demo mode</b> (127.0.0.1 only): no sign-in, no access control; '
            "every page is open. Configure sign-in before real patients.</div>",
            unsafe_allow_html=True,
        )
        return
    wards = "all wards" if user.all_wards else (", ".join(w.split("/")[-1] for w in user.wards) or "no wards")
    st.caption(f"Signed in as **{md(user.name, links=True)}** · {md(user.role)} · {md(wards)}")
    st.button("Sign out", key="nva-logout", icon=":material/logout:", on_click=st.logout)


def gate_page(g: services.Gate) -> None:
    """Everything a run shows when nobody may use the app yet: sign in, no role, or an exposed demo."""
    st.markdown("## NVA — Nurse Virtual Assistant")
    if g.state == "sign-in":
        st.info("Sign in with your hospital account to open NVA.", icon=":material/login:")
        if importlib.util.find_spec("authlib") is None:
            st.error(
                "Sign-in is configured but Authlib is not installed: `pip install 'streamlit[auth]'`.",
                icon=":material/error:",
            )
            return
        for provider in services.auth_providers():
            st.button(
                f"Sign in with {provider}" if provider else "Sign in",
                key=f"login-{provider or 'default'}",
                type="primary",
                icon=":material/login:",
                on_click=st.login,
                args=(provider,) if provider else (),
            )
    elif g.state == "no-role":
        st.error(
            f"**You have no NVA role — ask your administrator.** Signed in as {md(g.who)}; an administrator must "
            "give you the role nurse, charge-nurse or auditor (identity provider claim or NVA role file).",
            icon=":material/block:",
        )
        st.button("Sign out", key="nva-logout", icon=":material/logout:", on_click=st.logout)
    elif g.state == "demo-exposed":
        st.error(f"**NVA refuses to start in local demo mode.** {md(g.message)}", icon=":material/gpp_bad:")
    else:
        if g.state == "config-error":
            st.error(
                "**NVA cannot start: its sign-in or settings configuration is invalid.** " + md(g.message),
                icon=":material/error:",
            )
        else:
            st.error(md(g.message or "NVA cannot start."), icon=":material/error:")


def refuse(cfg: services.AppConfig, user: User, target: str, message: str, detail: str) -> None:
    """Show a refusal, log it (best effort: the refusal stands either way) and stop the page."""
    try:
        services.record_access(cfg, user, "access-denied", target, detail, once=True)
    except services.AccessLogError:
        log.exception("access-denied could not be logged")
    st.error(message, icon=":material/block:")
    st.stop()


def record_or_stop(
    cfg: services.AppConfig, user: User, action: str, target: str, detail: str = "", *, once: bool = True
) -> None:
    """Log an access before showing it; if the log cannot be written, show nothing but the reason."""
    try:
        services.record_access(cfg, user, action, target, detail, once=once)
    except services.AccessLogError as exc:
        st.error(
            f"**Not shown: the access could not be recorded.** NVA only shows patient data it can log. {md(exc)}. "
            "Check NVA_ACCESS_LOG / NVA_DATA_DIR (writable, disk not full) or call your administrator.",
            icon=":material/error:",
        )
        st.stop()


def show(result: Result) -> str:
    """A result as the core words it ('132 mmHg', '1.38 mg/dL'), falling back to the raw display."""
    try:
        from assistant.summary.display import show_result

        return show_result(result)
    except Exception:  # noqa: BLE001 - an older core, or a value the display cannot place: show it as read
        return result.display_value()


def fmt_time(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "time unknown"
    text = when.strftime("%d %b %H:%M")
    if now is not None:
        delta = now - when
        if timedelta(0) <= delta < timedelta(hours=48):
            hours = int(delta.total_seconds() // 3600)
            text += f" ({hours} h ago)" if hours else f" ({int(delta.total_seconds() // 60)} min ago)"
    return text


def severity_badge(severity: str) -> str:
    return f":{SEVERITY_BADGE.get(severity, 'gray')}-badge[{severity.upper()}]"


# --- banners -----------------------------------------------------------------------------------------
def load_banners(view: services.PatientView, file_errors: list[tuple[str, str]] | None = None) -> None:
    """A visible banner for every part of the chart that could not be loaded: which part, and why."""
    if view.error:
        st.error(
            f"**The chart of {md('Patient/' + view.patient_id)} could not be loaded.** {md(view.error)}",
            icon=":material/error:",
        )
    issues = view.error_issues
    if issues:
        lines = "\n".join(f"- **{md(i.source)}**: {md(i.message)} ({md(i.code)})" for i in issues[:12])
        more = f"\n- ... and {len(issues) - 12} more" if len(issues) > 12 else ""
        st.error(
            f"**Part of this chart could not be loaded** ({len(issues)} problem"
            f"{'s' if len(issues) != 1 else ''}); what is shown may be incomplete:\n{lines}{more}",
            icon=":material/report:",
        )
    if file_errors:
        lines = "\n".join(f"- **{md(f)}**: {md(why)}" for f, why in file_errors[:12])
        st.error(
            f"**{len(file_errors)} source file(s) could not be read**; patients in them are missing:\n{lines}",
            icon=":material/report:",
        )
    for note in view.notices:
        st.info(md(note), icon=":material/info:")


# --- header ------------------------------------------------------------------------------------------
def patient_header(view: services.PatientView) -> None:
    """Who, where, NEWS2 with band and response, allergies, code status, isolation, and what to do now."""
    chart = view.chart
    assert chart is not None
    head = getattr(view, "header", None)
    p = chart.patient
    age = head.age if head is not None else services.age_of(chart, view.now)
    enc = chart.encounter
    where = "location not recorded"
    if enc and (enc.ward_name or enc.bed_name):
        bed = enc.bed_name or ""
        where = (
            bed
            if enc.ward_name and enc.ward_name in bed
            else " · ".join(x for x in (enc.ward_name, bed) if x)
        )
    st.markdown(f"## {md(p.name)}")
    bits = [
        f"**{age} y**" if age is not None else "age unknown",
        md((p.sex or "sex not recorded").capitalize()),
        md(where),
        f"MRN {md(p.mrn)}" if p.mrn else None,
        f":gray[{md(p.ref)}]",
    ]
    st.markdown(" · ".join(b for b in bits if b))
    if enc and enc.reason:
        st.caption(f"Admitted {fmt_time(enc.start)} for {md(enc.reason)}")
    news = getattr(head, "news2", None)
    if news is not None:
        news2_banner(news)
    allergy_banner(chart, head)
    cs = getattr(head, "code_status", None) if head is not None else None
    legacy = services.code_status(chart) if head is None else None
    if cs is not None:
        st.markdown(f"**Code status:** {md(cs.text)} :gray[({md(cs.ref)})]")
    elif legacy:
        st.markdown(f"**Code status:** {md(legacy[0])} :gray[({md(legacy[1])})]")
    else:
        st.markdown("**Code status:** :gray[not recorded]")
    isolation_line(getattr(head, "isolation", None) if head is not None else None)
    do_now_section(view)


def isolation_line(iso: Any) -> None:
    """The header's isolation line in the core's words (assistant.views.isolation_status), cited Flag/<id>;
    'none charted' and 'not retrieved' are said differently, never both as 'no isolation'."""
    if iso is None:
        return
    if iso.status == "none":
        st.markdown(f"**Isolation:** :gray[{md(iso.text)}]")
        return
    # A boxed banner like the allergy one: it decides how to enter the room. Violet = charted, orange = unknown.
    cls = "" if iso.status == "charted" else " unknown"
    cites = " ".join(f'<span class="nva-ref">({html_text(ref)})</span>' for ref in iso.refs)
    text = iso.text.removeprefix("ISOLATION: ")
    st.html(
        f'<div class="nva-isolation{cls}" role="note"><strong>{html_text(iso.badge)}</strong> — '
        f"{html_text(text)} {cites}</div>"
    )


def news2_banner(news: Any) -> None:
    """NEWS2 where the nurse looks: score, band in colour AND words, the RCP response, what may be missing."""
    if news.total is None:
        st.markdown(":gray-badge[NEWS2 — not scored] :gray[no recent vital signs]")
        return
    arrow = ""
    if news.change is not None:
        arrow = (
            f" ▲ +{news.change}"
            if news.change > 0
            else (f" ▼ {news.change}" if news.change < 0 else " (no change)")
        )
    when = f" · {fmt_time(news.time)}" if news.time else ""
    missing = f" — **missing, may be understated:** {md(', '.join(news.missing))}" if news.missing else ""
    st.markdown(
        f"{news2_badge(news.total, news.band, news.band_label, news.incomplete)}{md(arrow)} "
        f"**{md(news.response or 'routine monitoring')}**{missing} :gray[{md(when)}]"
    )


def do_now_section(view: services.PatientView) -> None:
    """Doses due within the hour (and late ones), each marked HOLD — see flag when a flag says not to give it."""
    do_now = getattr(view, "do_now", None)
    if do_now is None:
        return
    if not do_now:
        st.markdown("**What to do now:** :gray[no dose due within the hour]")
        return
    lines = []
    for d in do_now:
        state = ":red-badge[LATE]" if d.state == "late" else ":blue-badge[DUE]"
        why = md(d.hold_text.removeprefix("HOLD — see flag: ")) if d.hold_text else ""
        hold = f" :red-badge[HOLD — see flag] {why}" if d.hold else ""
        lines.append(f"- {state} {fmt_clock(d.time)} {md(d.label)}{hold}")
    st.markdown("**What to do now** (doses due within the hour):\n" + "\n".join(lines))


def allergy_banner(chart: Chart, head: Any = None) -> None:
    """The allergy banner, in the core's wording (the PDF prints the same text)."""
    status = head.allergy_status if head is not None else None
    text = head.allergy_text if head is not None else allergy_text(chart)
    if status is None:
        status = (
            "active"
            if chart.active_allergies()
            else ("nka" if any(a.no_known_allergy for a in chart.allergies) else "not-recorded")
        )
    cls = {"active": "", "nka": " nka"}.get(status, " unknown")
    role = "" if status == "nka" else ' role="alert"'
    st.html(f'<div class="nva-allergy{cls}"{role}>{html_text(text)}</div>')


def allergy_text(chart: Chart) -> str:
    """The allergy banner's wording; the PDF prints the same words (issue 15)."""
    active = chart.active_allergies()
    if active:
        parts = []
        for a in active:
            crit = (
                f" — {a.criticality} criticality"
                if a.criticality and a.criticality != "unable-to-assess"
                else ""
            )
            react = f" ({', '.join(a.reactions)})" if a.reactions else ""
            parts.append(f"{a.substance}{react}{crit}")
        return "ALLERGIES: " + "; ".join(parts)
    if any(a.no_known_allergy for a in chart.allergies):
        return "No known allergies (recorded)"
    return "Allergy status not recorded — ask and document"


# --- flags -------------------------------------------------------------------------------------------
def flags_section(view: services.PatientView, key: str) -> list[tuple[Finding, Any]]:
    """Severity-sorted flags; returns (finding, placeholder) pairs to fill with guideline passages later."""
    st.markdown(f"### Flags ({len(view.findings)})")
    if not view.findings:
        st.success("No chart contradictions found by the rules.", icon=":material/check_circle:")
        return []
    slots = []
    for n, f in enumerate(view.findings):
        with st.container(border=True, key=f"flag-{f.severity}-{key}-{n}"):
            st.markdown(
                f"{severity_badge(f.severity)} **{md(f.title)}** :gray[· {md(f.rule_id)}"
                f"{'' if f.verified else ' · UNVERIFIED (LLM-suggested)'}]"
            )
            st.markdown(md(f.message, multiline=True))
            if f.values:
                st.markdown(evidence_table(f.values, view.now))
            if f.action:
                st.markdown(f"**Suggested nursing action:** {md(f.action)}")
            citation_buttons(
                view,
                list(dict.fromkeys(f.evidence)),
                key=f"{key}-flag{n}",
                names={v.ref: v.label for v in f.values if v.ref},
            )
            slots.append((f, st.empty()))
    return slots


def _cell(text: Any) -> str:
    return md(text)  # one line, and '|' is a character reference: no cell can split the table


def evidence_table(values: Any, now: datetime | None) -> str:
    """Evidence values as a Markdown table (light to render: flags must paint first)."""
    rows = ["| Evidence | Value | Time | Source |", "| --- | --- | --- | --- |"]
    rows += [
        f"| {_cell(v.label)} | {_cell(v.value or '')} | {_cell(fmt_time(v.time, now))} | {_cell(v.ref)} |"
        for v in values
    ]
    return "\n".join(rows)


def fill_guideline(slot: Any, finding: Finding) -> list[services.Passage]:
    passages, note = services.guideline_passages(finding)
    with slot.container():
        if passages:
            p = passages[0]
            with st.expander(f"Guideline: {md(p.title)} — {md(p.section_path)}", expanded=False):
                st.markdown(md(p.text, multiline=True))
                st.caption(md(p.citation))
        elif note:
            st.caption(md(note))
    return passages


# --- source viewer -----------------------------------------------------------------------------------
SOURCES_PER_ROW = 3


def source_name(ref: str, names: dict[str, str] | None = None) -> str:
    """A button's words for a cited record: what it is when the flag says (e.g. 'Pulse (2 points)'), else its type
    and the start of its id; the full reference is the button's tooltip and the dialog's title."""
    if names and names.get(ref):
        return one_line(names[ref])
    rtype, _, rid = ref.partition("/")
    return f"{rtype} {rid[:8]}…" if len(rid) > 9 else ref


def citation_buttons(
    view: services.PatientView,
    refs: list[str],
    key: str,
    label: str = "Sources",
    names: dict[str, str] | None = None,
) -> None:
    """One button per cited record, in full rows of SOURCES_PER_ROW under a caption (no ragged grid)."""
    if not refs:
        return
    st.caption(label)
    for start in range(0, len(refs), SOURCES_PER_ROW):
        cols = st.columns(SOURCES_PER_ROW)
        for col, (i, ref) in zip(cols, enumerate(refs[start : start + SOURCES_PER_ROW], start), strict=False):
            col.button(
                md(source_name(ref, names)),
                key=f"cite-{key}-{i}",
                help=md(ref),
                type="tertiary",
                icon=":material/description:",
                on_click=_open_source,
                args=(view.patient_id, ref),
            )


def _open_source(patient_id: str, ref: str) -> None:
    st.session_state["_nva_open_ref"] = (patient_id, ref)


def _close_source() -> None:
    st.session_state.pop("_nva_open_ref", None)


@st.dialog("Source", width="large", on_dismiss=_close_source)
def show_source(view: services.PatientView, ref: str) -> None:
    render_source(view, ref)


def source_dialog(view: services.PatientView) -> None:
    """Open the cited source the user clicked (kept in session state so the dialog survives reruns)."""
    opened = st.session_state.get("_nva_open_ref")
    if opened and opened[0] == view.patient_id:
        show_source(view, opened[1])


def render_source(view: services.PatientView, ref: str) -> None:
    st.markdown(f"#### {md(ref)}")
    if ref.startswith("guideline:"):
        _render_guideline_source(ref)
        return
    if ref.startswith("rule:"):
        _render_rule_source(ref)
        return
    chart = view.chart
    raw = chart.resources.get(ref) if chart else None
    fact = find_fact(chart, ref) if chart else None
    if raw is None and fact is None:
        st.warning(f"{md(ref)} is not in this chart; it may have been filtered out or failed to load.")
        return
    rows = readable_rows(fact, raw)
    if rows:
        # st.table renders cells as Markdown: every cell through md().
        st.table(
            pd.DataFrame([(md(k), md(v)) for k, v in rows], columns=["Field", "Value"]).set_index("Field")
        )
    text = getattr(fact, "text", None)
    if text and type(fact).__name__ == "Note":
        st.text(inert_text(text))
    if raw is not None and st.toggle("Show raw JSON", key=f"raw-{ref}"):
        # ensure_ascii: bidi and control characters show as \\u escapes, never reorder the JSON.
        st.code(json.dumps(raw, indent=2, ensure_ascii=True), language="json")


def _render_rule_source(ref: str) -> None:
    """A threshold cited as `rule:<id>`: the catalogue entry it comes from and the public sources behind it."""
    rule = services.catalogue_rule(ref.split(":", 1)[1])
    if rule is None:
        st.warning(f"{md(ref)} is not in the rule catalogue")
        return
    st.markdown(f"**{md(rule.title)}** · {severity_badge(rule.severity)} · {md(rule.category)}")
    if rule.threshold is not None:
        st.markdown(f"Threshold: {md(rule.threshold.display)}")
    if rule.action:
        st.markdown(f"**Suggested nursing action:** {md(rule.action)}")
    st.markdown("**Sources**\n" + "\n".join(f"- {md(src)}" for src in rule.sources))


def _render_guideline_source(ref: str) -> None:
    try:
        chunks = services.guideline_store().get([ref.split(":", 1)[1]])
    except Exception as exc:  # noqa: BLE001
        st.warning(f"the guideline store is unavailable ({md(type(exc).__name__)})")
        return
    if not chunks:
        st.warning("this guideline passage is no longer in the store")
        return
    c = chunks[0]
    st.markdown(f"**{md(c.metadata.get('title', ''))}** — {md(c.metadata.get('section_path', ''))}")
    st.markdown(md(c.text, multiline=True))


def find_fact(chart: Chart | None, ref: str) -> Any | None:
    if chart is None:
        return None
    if ref == chart.patient.ref:
        return chart.patient
    for group in (
        chart.results,
        chart.orders,
        chart.administrations,
        chart.allergies,
        chart.conditions,
        chart.notes,
        chart.encounters,
    ):
        for item in group:
            if item.ref == ref:
                return item
    return None


_LABELS = {
    "ref_low": "Reference low",
    "ref_high": "Reference high",
    "value_text": "Value (text)",
    "order_ref": "Order",
    "status_reason": "Reason",
    "dose_text": "Dose (as written)",
    "resolved_by": "Resolved by",
    "birth_date": "Born",
    "mrn": "MRN",
    "bed_name": "Bed",
    "ward_name": "Ward",
    "class_code": "Class",
}
_SKIP = {"ref", "ingredients", "classes", "rxnorm_codes", "codes", "ward_ref", "bed_ref", "text"}


def readable_rows(fact: Any, raw: dict | None) -> list[tuple[str, str]]:
    """Field/value rows a nurse can read: the normalized fact when there is one, else the resource's top level."""
    rows: list[tuple[str, str]] = []
    if fact is not None and is_dataclass(fact):
        if isinstance(fact, Result):
            rows.append(("Value", show(fact) or "—"))
        for k, v in asdict(fact).items():
            if k in _SKIP or v in (None, "", (), [], {}) or (k == "text" and type(fact).__name__ == "Note"):
                continue
            rows.append((_LABELS.get(k, k.replace("_", " ").capitalize()), _fmt_value(v)))
        if hasattr(fact, "text") and type(fact).__name__ != "Note":
            rows.insert(0, ("Name", str(fact.text)))
        return rows
    if raw:
        for k, v in raw.items():
            if (
                k in ("meta", "text", "contained")
                or isinstance(v, (dict, list))
                and k not in ("code", "name", "physicalType")
            ):
                continue
            rows.append((k, _fmt_value(v)))
    return rows


def _fmt_value(v: Any) -> str:
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M %Z").strip()
    if isinstance(v, dict):
        if "value" in v and "unit" in v:
            from assistant.model import Quantity

            return (
                str(Quantity(float(v["value"]), str(v["unit"] or "")))
                if isinstance(v["value"], (int, float))
                else f"{v['value']} {v['unit']}"
            )
        if "frequency" in v and "period_unit" in v:
            return str(v.get("text") or "") or (
                "as needed"
                if v.get("as_needed")
                else f"{v.get('frequency') or '?'} per {_num(v['period']) if v.get('period') else '?'} {v.get('period_unit') or ''}"
            )
        if "text" in v and v["text"]:
            return str(v["text"])
        for c in v.get("coding", []) or []:
            if isinstance(c, dict) and (c.get("display") or c.get("code")):
                return str(c.get("display") or c.get("code"))
        return ", ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items() if x not in (None, "", [], {}))
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(x) for x in v)
    return str(v)


# --- summary -----------------------------------------------------------------------------------------
MAX_SHOWN_CITATIONS = 3


def shown_citations(sent: Any) -> list[str]:
    """The first citations of a sentence (the composer's own split when it has one); the rest go behind '+N'."""
    shown = getattr(sent, "shown_citations", None)
    return list(shown if shown is not None else sent.citations[:MAX_SHOWN_CITATIONS])


def overflow_citations(sent: Any) -> list[str]:
    more = getattr(sent, "overflow_citations", None)
    return list(more if more is not None else sent.citations[MAX_SHOWN_CITATIONS:])


def cite_marks(refs: list[str], numbers: dict[str, int]) -> str:
    for c in refs:
        numbers.setdefault(c, len(numbers) + 1)
    return f" :gray[{''.join(f'&#91;{numbers[c]}&#93;' for c in refs)}]" if refs else ""


def sentence_line(sent: Any, numbers: dict[str, int]) -> str:
    """One sentence as Markdown: the text (inert), its numbered citations, '+N sources', unverified mark."""
    more = overflow_citations(sent)
    for c in more:
        numbers.setdefault(c, len(numbers) + 1)
    extra = f" :gray[+{len(more)} source{'s' if len(more) != 1 else ''}]" if more else ""
    mark = "" if sent.verified else " :orange-badge[unverified]"
    return f"{md(sent.text)}{cite_marks(shown_citations(sent), numbers)}{extra}{mark}"


def sentence_markdown(sentences: list[Any], numbers: dict[str, int]) -> str:
    """Sentences with numbered citations as a Markdown list; an unverified sentence says so (dropped ones never
    reach here). Chart text is escaped by md(): only the app's own markup is Markdown."""
    return "\n".join(f"- {sentence_line(sent, numbers)}" for sent in sentences)


def summary_section(
    cfg: services.AppConfig,
    view: services.PatientView,
    slot: Any,
    passages: list[services.Passage] | None = None,
    suggest_slot: Any = None,
) -> None:
    """Stream the cited summary into `slot`; only sentences the verifier let through are shown."""
    cache = st.session_state.setdefault("_nva_summaries", {})
    result = cache.get(view.patient_id)
    if result is None:
        try:
            services.record_access(cfg, services.current_user(), "summary", f"Patient/{view.patient_id}")
        except services.AccessLogError as exc:
            slot.error(f"The summary was not composed: the access could not be recorded ({md(exc)}).")
            return
        try:
            stream = services.compose_summary_stream(cfg, view, passages)
        except Exception as exc:  # noqa: BLE001 - the summary is an aid; facts above stand alone
            slot.warning(
                f"The summary could not be composed ({md(type(exc).__name__)}: {md(exc)}). The facts and flags "
                "above are complete."
            )
            return
        shown: list[Any] = []
        last = 0.0
        for sentence in stream:
            shown.append(sentence)
            # Redraw at most 4 times a second: each redraw re-renders the whole block in the browser.
            if time.monotonic() - last >= 0.25:
                slot.markdown(sentence_markdown(shown, {}) + "\n\n*composing…*")
                last = time.monotonic()
        result = stream.result
        cache[view.patient_id] = result
    with slot.container():
        render_summary(view, result, key=f"sum-{view.patient_id}")
    suggestions = list(getattr(result, "suggestions", None) or [])
    if suggest_slot is not None and suggestions:
        with suggest_slot.container():
            suggestions_section(view, suggestions)


def suggestions_section(view: services.PatientView, suggestions: list[Any]) -> None:
    """Contradictions the LLM suggests (verified, cited): below the rule flags, never counted as flags."""
    st.markdown(f"#### AI suggestions ({len(suggestions)})")
    for i, sug in enumerate(suggestions):
        with st.container(border=True, key=f"suggestion-{view.patient_id}-{i}"):
            st.markdown(
                f":violet-badge[{md(getattr(sug, 'label', 'AI-suggested — not a rule'))}] {md(sug.text)}"
            )
            if getattr(sug, "reason", ""):
                st.caption("Why: " + md(sug.reason))
            citation_buttons(view, list(dict.fromkeys(sug.citations)), key=f"sug-{view.patient_id}-{i}")


def start_llm_warmup(cfg: services.AppConfig) -> None:
    """Load the summary model once per server process, in the background (no-op without a local model)."""
    if (cfg.llm_backend or "none") == "none":
        return
    try:
        backend = services.get_llm(cfg)
    except Exception:  # noqa: BLE001 - the status page reports a broken backend; the app runs on templates
        log.warning("LLM backend unavailable for warm-up")
        return
    _warm_once(id(backend), backend)


@st.cache_resource(show_spinner=False)
def _warm_once(_key: int, _backend: Any) -> bool:
    import threading

    def run() -> None:
        try:
            from assistant.summary.warmup import warm_summary_model

            warm_summary_model(_backend)
        except Exception:  # noqa: BLE001 - warm-up is an optimisation; it never stops the app
            log.warning("LLM warm-up failed")

    threading.Thread(target=run, name="nva-llm-warmup", daemon=True).start()
    return True


def _summary_groups(result: Any) -> list[tuple[str, list[Any]]]:
    groups = getattr(result, "groups", None)
    if callable(groups):
        try:
            return [(title, list(sents)) for _key, title, sents in groups() if sents]
        except Exception:  # noqa: BLE001 - an older result without groups is shown as one list
            log.warning("summary groups unavailable; showing one list")
    return [("", list(result.sentences))]


def render_summary(view: services.PatientView, result: Any, key: str) -> None:
    numbers: dict[str, int] = {}
    synopsis = [s for s in (getattr(result, "synopsis", None) or []) if getattr(s, "verified", True)]
    if synopsis:
        source = getattr(result, "synopsis_source", "") or ""
        st.markdown(
            "**In short**"
            + (" :gray[(LLM, verified)]" if source == "llm" else "")
            + "\n"
            + sentence_markdown(synopsis, numbers)
        )
    groups = _summary_groups(result)
    if not any(sents for _t, sents in groups):
        st.markdown("_No facts to summarize._")
    for g, (title, sents) in enumerate(groups):
        if title:
            st.markdown(f"**{md(title)}**")
        for i, sent in enumerate(sents):
            st.markdown(f"- {sentence_line(sent, numbers)}")
            more = overflow_citations(sent)
            dropped = getattr(sent, "dropped_text", None)
            if more:
                with st.expander(f"+{len(more)} sources", key=f"{key}-more-{g}-{i}"):
                    citation_list(view, more, numbers, key=f"{key}-more-{g}-{i}")
            if dropped:
                with st.expander("dropped by the verifier", key=f"{key}-drop-{g}-{i}"):
                    st.markdown(
                        "The model wrote: "
                        + md(dropped)
                        + "  \n**Why dropped:** "
                        + md(getattr(sent, "dropped_reason", None) or "not supported by the cited records")
                        + "  \nThe sentence above is the template sentence shown in its place."
                    )
    overflow = list(getattr(result, "overflow", None) or [])
    if overflow:
        with st.expander(f"{len(overflow)} more sentence(s)", key=f"{key}-overflow"):
            st.markdown(sentence_markdown(overflow, numbers))
    origin = (
        "LLM, verified sentence by sentence"
        if any(s.origin == "llm" for s in result.sentences)
        else "template"
    )
    st.caption(
        " · ".join(
            [
                f"Composed by {origin}" + (f" ({md(result.model)})" if result.model else ""),
                *map(md, result.notes),
            ]
        )
    )
    if result.dropped:
        with st.expander(
            f"{len(result.dropped)} sentence(s) dropped by the verifier and not shown", key=f"{key}-dropped"
        ):
            st.markdown(
                "\n".join(
                    f"- {md(d.text)} — **why:** {md(getattr(d, 'reason', None) or 'not supported')}"
                    for d in result.dropped
                )
            )
    if numbers:
        # Buttons inside an expander: every citation is a Tab stop and opens with Enter.
        with st.expander(f"Sources ({len(numbers)})", expanded=False, key=f"{key}-sources"):
            citation_list(view, sorted(numbers, key=numbers.get), numbers, key=f"{key}-src")


def citation_list(view: services.PatientView, refs: list[str], numbers: dict[str, int], key: str) -> None:
    for i, ref in enumerate(refs):
        st.button(
            f"[{numbers.get(ref, i + 1)}] {md(ref)}",
            key=f"{key}-{i}",
            type="tertiary",
            icon=":material/description:",
            on_click=_open_source,
            args=(view.patient_id, ref),
        )


# --- labs --------------------------------------------------------------------------------------------
def _is_lab(r: Result) -> bool:
    return r.is_lab


def labs_table(chart: Chart, now: datetime) -> pd.DataFrame:
    rows = []
    for r in chart.results:
        if not _is_lab(r):
            continue
        rng = ""
        if r.ref_low is not None or r.ref_high is not None:
            rng = f"{'' if r.ref_low is None else _num(r.ref_low)}–{'' if r.ref_high is None else _num(r.ref_high)}"
        rows.append(
            {
                "Time": r.time,
                "Test": one_line(r.name),
                "Value": one_line(show(r)),
                "Reference": rng,
                "Flag": one_line(r.interpretation or "abnormal") if r.abnormal else "",
                "Status": one_line(r.status),
                "Source": one_line(r.ref),
            }
        )
    df = pd.DataFrame(rows, columns=["Time", "Test", "Value", "Reference", "Flag", "Status", "Source"])
    return df.sort_values("Time", ascending=False) if not df.empty else df


def _num(x: float) -> str:
    from assistant.model import format_number

    return format_number(x)


def labs_section(view: services.PatientView, key: str) -> Any:
    """The labs table and trend picker now; returns a callable that draws the trend charts (after first paint)."""
    chart = view.chart
    assert chart is not None
    st.markdown("### Labs")
    df = labs_table(chart, view.now)
    if df.empty:
        st.caption("No laboratory results in this chart.")
        return lambda: None

    st.html(latest_labs_html(chart, view.now))
    analytes: dict[str, str] = {}
    for r in chart.results:
        if _is_lab(r) and r.value is not None:
            analytes.setdefault(r.analyte, r.name)
    abnormal = [a for a in analytes if any(r.abnormal for r in chart.results_for(a))]
    chosen = st.multiselect(
        "Trend",
        options=list(analytes),
        default=abnormal[:4] or list(analytes)[:2],
        format_func=lambda a: one_line(analytes[a]),
        key=f"trend-{key}",
    )
    holder = st.container()

    def draw() -> None:
        with holder.expander(f"All laboratory results ({len(df)})"):
            st.dataframe(
                df.style.apply(_highlight, axis=1),
                hide_index=True,
                width="stretch",
                column_config={"Time": st.column_config.DatetimeColumn(format="DD MMM HH:mm")},
            )
        cols = holder.columns(2)
        for i, analyte in enumerate(chosen):
            cols[i % 2].altair_chart(
                trend_chart(chart.results_for(analyte), one_line(analytes[analyte])),
                width="stretch",
                height=240,
                alt=f"{one_line(analytes[analyte])} trend",
            )

    return draw


def _highlight(row: pd.Series) -> list[str]:
    style = "background-color: #fde2e1; color: #7a271a; font-weight: 600" if row["Flag"] else ""
    return [style] * len(row)


def latest_labs_html(chart: Chart, now: datetime) -> str:
    """Latest value of each lab with the one before it; abnormal rows highlighted (plain HTML: paints at once)."""
    latest: dict[str, list[Result]] = {}
    for r in chart.results:
        if _is_lab(r):
            latest.setdefault(r.analyte, []).append(r)
    rows = []
    for series in sorted(latest.values(), key=lambda xs: (not xs[-1].abnormal, xs[-1].name)):
        series.sort(key=lambda r: r.time)  # type: ignore[arg-type, return-value]
        cur, prev = series[-1], (series[-2] if len(series) > 1 else None)
        rng = ""
        if cur.ref_low is not None or cur.ref_high is not None:
            rng = f"{'' if cur.ref_low is None else _num(cur.ref_low)}–{'' if cur.ref_high is None else _num(cur.ref_high)}"
        flag = (cur.interpretation or "abnormal") if cur.abnormal else ""
        cls = ' class="abn"' if cur.abnormal else ""
        h = html_text
        # Abnormal is said in words (the Flag column and a mark), not by the row colour alone.
        mark = "⚠ " if cur.abnormal else ""
        rows.append(
            f"<tr{cls}><td>{h(cur.name)}</td><td><b>{h(mark)}{h(show(cur))}</b></td>"
            f"<td>{h(flag)}</td><td>{h(fmt_time(cur.time, now))}</td>"
            f"<td>{h(show(prev)) if prev else ''}</td><td>{h(rng)}</td>"
            f"<td><code>{h(cur.ref)}</code></td></tr>"
        )
    head = (
        "<tr><th>Test</th><th>Latest</th><th>Flag</th><th>Time</th><th>Previous</th><th>Reference</th>"
        "<th>Source</th></tr>"
    )
    return f'<table class="nva-labs"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def trend_chart(results: list[Result], title: str) -> alt.LayerChart | alt.Chart:
    rows = [
        {
            "time": r.time,
            "value": r.value,
            "abnormal": "abnormal" if r.abnormal else "in range",
            "display": one_line(show(r)),
            "ref": one_line(r.ref),
        }
        for r in results
        if r.value is not None
    ]
    df = pd.DataFrame(rows)
    unit = one_line(next((r.unit for r in results if r.unit), ""))
    base = alt.Chart(df).encode(x=alt.X("time:T", title=None, axis=alt.Axis(format="%d %b %H:%M")))
    line = base.mark_line(color="#334155").encode(
        y=alt.Y("value:Q", title=unit or None, scale=alt.Scale(zero=False))
    )
    points = base.mark_point(filled=True, size=60).encode(
        y="value:Q",
        color=alt.Color(
            "abnormal:N",
            scale=alt.Scale(domain=["in range", "abnormal"], range=["#334155", "#b42318"]),
            legend=None,
        ),
        # Abnormal results are triangles as well as red: never colour alone.
        shape=alt.Shape(
            "abnormal:N",
            scale=alt.Scale(domain=["in range", "abnormal"], range=["circle", "triangle-up"]),
            legend=None,
        ),
        tooltip=[alt.Tooltip("time:T", format="%d %b %H:%M"), "display:N", "abnormal:N", "ref:N"],
    )
    layers: list[Any] = []
    low = next((r.ref_low for r in reversed(results) if r.ref_low is not None), None)
    high = next((r.ref_high for r in reversed(results) if r.ref_high is not None), None)
    if low is not None or high is not None and not df.empty:
        lo = low if low is not None else min(df["value"].min(), high)  # type: ignore[type-var]
        hi = high if high is not None else max(df["value"].max(), low)  # type: ignore[type-var]
        band = (
            alt.Chart(pd.DataFrame({"lo": [lo], "hi": [hi]}))
            .mark_rect(color="#16a34a", opacity=0.12)
            .encode(y="lo:Q", y2="hi:Q")
        )
        layers.append(band)
    layers += [line, points]
    return alt.layer(*layers).properties(title=title, height=180)


# --- vitals & NEWS2 ------------------------------------------------------------------------------------
def vital_tile(r: Result | None) -> tuple[str, str]:
    """(number, unit) of a vital sign as the app shows it ('112', 'beats/min'); ('—', '') when none is charted."""
    if r is None:
        return "—", ""
    from assistant.summary.display import display_unit, format_value, reported

    value, unit = reported(r)
    if value is None:
        return one_line(show(r)), ""
    return format_value(value, r.analyte, unit), display_unit(unit)


def vitals_section(view: services.PatientView, key: str) -> None:
    chart = view.chart
    assert chart is not None
    st.markdown("### Vital signs and NEWS2")
    score = view.news2_score
    cols = st.columns(len(VITALS) + 1)
    head = getattr(view, "header", None)
    news = getattr(head, "news2", None)
    cols[0].metric(
        "NEWS2",
        "—" if view.news2_total is None else str(view.news2_total),
        delta=None if news is None or news.total is None else f"{news.band_label or news.band} risk",
        delta_color="off",
        delta_arrow="off",
    )
    if score is not None and view.news2_total is not None:
        parts = ", ".join(f"{p.label} {p.value} (+{p.points})" for p in score.parameters if p.points)
        st.caption(
            f"NEWS2 {score.total} ({md(score.band)}): {md(score.response or 'routine monitoring')}"
            + (f" — scored: {md(parts)}" if parts else "")
            + (f" — **missing, may be understated:** {md(', '.join(score.missing))}" if score.missing else "")
        )
    for col, (analyte, label) in zip(cols[1:], VITALS, strict=True):
        r = chart.latest(analyte)
        # The unit goes in the label, the number alone in the tile: "112 beats/min" does not fit a seventh of the page.
        number, unit = vital_tile(r)
        col.metric(
            f"{label} ({md(unit)})" if unit else label,
            number,
            help=f"{md(show(r))} · {fmt_time(r.time, view.now)} · {md(r.ref)}" if r else None,
        )
    window = (view.now - timedelta(hours=72), view.now + timedelta(hours=1))
    series = {a: [r for r in chart.results_for(a) if r.value is not None and r.time] for a, _ in VITALS}
    if not any(series.values()) and not view.news2:
        st.caption("No vital signs recorded.")
        return
    st.caption(
        "Shared time axis (last 72 h). Green band: the range that scores 0 in NEWS2; points outside it are drawn "
        "as ▲ triangles (not by colour alone)."
    )
    if view.news2:
        # An explicit pixel height: without it streamlit squeezes layered charts to a strip (issue 15).
        st.altair_chart(
            news2_chart(view.news2, window), width="stretch", height=250, alt="NEWS2 over the last 72 hours"
        )
    for analyte, label in VITALS:
        if series[analyte]:
            st.altair_chart(
                vital_chart(series[analyte], label, analyte, window),
                width="stretch",
                height=190,
                alt=f"{label} over the last 72 hours",
            )


def _time_scale(window: tuple[datetime, datetime]) -> alt.Scale:
    return alt.Scale(domain=[window[0].isoformat(), window[1].isoformat()])


def news2_chart(points: list[Any], window: tuple[datetime, datetime]) -> Any:
    nd = pd.DataFrame(
        [
            {
                "time": p.time,
                "NEWS2": p.score,
                "band": one_line(p.band or ""),
                "parts": one_line(", ".join(f"{k} {v}" for k, v in p.parts.items() if v)),
            }
            for p in points
        ]
    )
    ranges = news2_ranges()
    top = max(10, int(nd.NEWS2.max()) + 1)
    bands = (
        alt.Chart(
            pd.DataFrame(
                [
                    {"lo": lo - 0.5, "hi": (hi + 0.5) if hi is not None else top, "risk": label}
                    for _band, label, lo, hi in ranges
                ]
            )
        )
        .mark_rect(opacity=0.12)
        .encode(
            y="lo:Q",
            y2="hi:Q",
            color=alt.Color(
                "risk:N",
                scale=alt.Scale(
                    domain=[r[1] for r in ranges],
                    range=[BAND_COLOURS.get(r[0], "#94a3b8") for r in ranges],
                ),
                legend=alt.Legend(orient="top", title="NEWS2 band"),
            ),
        )
    )
    line = (
        alt.Chart(nd)
        .mark_line(point=True, color="#0f172a", interpolate="step-after")
        .encode(
            x=alt.X("time:T", title=None, scale=_time_scale(window), axis=alt.Axis(format="%d %b %H:%M")),
            y=alt.Y("NEWS2:Q", scale=alt.Scale(domain=[0, top]), title="NEWS2"),
            tooltip=[alt.Tooltip("time:T", format="%d %b %H:%M"), "NEWS2:Q", "band:N", "parts:N"],
        )
    )
    return (bands + line).properties(title="NEWS2 over time", height=180)


BAND_COLOURS = {"low": "#16a34a", "low-medium": "#eab308", "medium": "#f59e0b", "high": "#b42318"}


def news2_ranges() -> list[tuple[str, str, int, int | None]]:
    """The aggregate NEWS2 bands as the core reads them from news2.yaml (fallback: RCP 2017 0-4, 5-6, 7+)."""
    try:
        from assistant.views import news2_band_ranges

        return list(news2_band_ranges())
    except ImportError:
        return [("low", "Low", 0, 4), ("medium", "Medium", 5, 6), ("high", "High", 7, None)]


def zero_band(analyte: str) -> tuple[float | None, float | None]:
    """The range of a vital sign that scores 0 in NEWS2 (news2.yaml), as a reference band for its chart."""
    from assistant.rules.news2 import news2_table

    for spec in news2_table()["parameters"].values():
        if spec.get("analyte") != analyte or not spec.get("bands"):
            continue
        prev = None
        for band in spec["bands"]:
            if band.get("points") == 0:
                return prev, band.get("max")
            prev = band.get("max")
    return None, None


def vital_chart(results: list[Result], label: str, analyte: str, window: tuple[datetime, datetime]) -> Any:
    lo, hi = zero_band(analyte)
    rows = []
    for r in results:
        outside = (lo is not None and r.value <= lo) or (hi is not None and r.value > hi)  # type: ignore[operator]
        rows.append(
            {
                "time": r.time,
                "value": r.value,
                "display": one_line(show(r)),
                "status": "outside the 0-point range" if outside else "in range",
            }
        )
    df = pd.DataFrame(rows)
    unit = one_line(next((r.unit for r in results if r.unit), ""))
    vmin, vmax = float(df.value.min()), float(df.value.max())
    base = alt.Chart(df).encode(
        x=alt.X("time:T", title=None, scale=_time_scale(window), axis=alt.Axis(format="%d %b %H:%M"))
    )
    line = base.mark_line(color="#334155").encode(
        y=alt.Y("value:Q", title=unit or None, scale=alt.Scale(zero=False))
    )
    points = base.mark_point(filled=True, size=70).encode(
        y="value:Q",
        color=alt.Color(
            "status:N",
            scale=alt.Scale(domain=["in range", "outside the 0-point range"], range=["#334155", "#b42318"]),
            legend=None,
        ),
        shape=alt.Shape(
            "status:N",
            scale=alt.Scale(
                domain=["in range", "outside the 0-point range"], range=["circle", "triangle-up"]
            ),
            legend=None,
        ),
        tooltip=[alt.Tooltip("time:T", format="%d %b %H:%M"), "display:N", "status:N"],
    )
    layers: list[Any] = []
    if lo is not None or hi is not None:
        band_lo = lo if lo is not None else min(vmin, hi)  # type: ignore[type-var]
        band_hi = hi if hi is not None else max(vmax, lo)  # type: ignore[type-var]
        layers.append(
            alt.Chart(pd.DataFrame({"lo": [band_lo], "hi": [band_hi]}))
            .mark_rect(color="#16a34a", opacity=0.12)
            .encode(y="lo:Q", y2="hi:Q")
        )
    return alt.layer(*layers, line, points).properties(title=label, height=130)


# --- medications -------------------------------------------------------------------------------------
MAR_STATES = {  # state: (colour, shape, legend text) — every status has a shape and a word, not colour alone
    "given": ("#15803d", "circle", "given ●"),
    "held": ("#6b7280", "square", "held ■"),
    "refused": ("#7c3aed", "cross", "refused ✚"),
    "missed": ("#b54708", "triangle-down", "missed ▼"),
    "late": ("#b42318", "diamond", "late ◆"),
    "due": ("#1d4ed8", "triangle-up", "due ▲"),
}


def meds_section(view: services.PatientView, key: str) -> None:
    chart = view.chart
    assert chart is not None
    st.markdown("### Active medications")
    orders = chart.active_orders()
    holds = getattr(view, "holds", None) or {}
    if not orders:
        st.caption("No active medication orders.")
    else:
        rows = [
            {
                "Medication": one_line(o.text),
                "Hold": "HOLD — see flag" if o.ref in holds else "",
                "Dose": one_line(o.dose_text or (str(o.dose) if o.dose else "")),
                "Route": one_line(o.route or ""),
                "Schedule": one_line(o.timing.text or _schedule(o)),
                "Started": o.start or o.authored_on,
                "Source": one_line(o.ref),
            }
            for o in orders
        ]
        st.dataframe(
            pd.DataFrame(rows),
            hide_index=True,
            width="stretch",
            column_config={"Started": st.column_config.DatetimeColumn(format="DD MMM HH:mm")},
        )
    events = getattr(view, "mar", None)
    if events is None:
        events = services.mar_events(chart, view.now)
    chart_, rows = mar_chart(events, orders, view.now, holds)
    st.altair_chart(
        chart_,
        width="stretch",
        height=110 + 38 * rows,
        alt="MAR timeline, one row per order, 24 h back and 12 h ahead",
    )
    if events:
        counts = {s: sum(1 for e in events if e.state == s) for s in MAR_STATES}
        st.markdown(
            "**MAR timeline** (24 h back, 12 h ahead; dashed line = now): "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        )
    else:
        st.caption("No doses given, held or due in the 24 h back and 12 h ahead.")


def mar_chart(events: list[Any], orders: list[Any], now: datetime, holds: dict[str, Any]) -> tuple[Any, int]:
    """One labelled row per order (every active order, and any order with a dose in the window)."""
    window = (now - timedelta(hours=24), now + timedelta(hours=12))
    names: dict[str, str] = {}
    for o in orders:
        names[o.ref] = one_line(o.text)
    for e in events:
        names.setdefault(e.order_ref, one_line(e.order))
    # Two orders with the same text keep two rows: the label carries a number then.
    labels: dict[str, str] = {}
    for ref, name in names.items():
        label = name[:60] + (" (HOLD)" if ref in holds else "")
        while label in labels.values():
            label += " ·"
        labels[ref] = label
    df = pd.DataFrame(
        [
            {
                "time": e.time,
                "order": labels.get(e.order_ref, one_line(e.order)),
                "state": MAR_STATES.get(e.state, ("#000", "circle", e.state))[2],
                "detail": one_line(e.detail),
                "hold": "HOLD — see flag" if getattr(e, "hold", False) else "",
                "ref": one_line(e.ref or e.order_ref),
            }
            for e in events
            if window[0] <= e.time <= window[1]
        ],
        columns=["time", "order", "state", "detail", "hold", "ref"],
    )
    rows = list(labels.values())
    y = alt.Y("order:N", title=None, scale=alt.Scale(domain=rows), axis=alt.Axis(labelLimit=320))
    legend = [v[2] for v in MAR_STATES.values()]
    marks = (
        alt.Chart(df)
        .mark_point(filled=True, size=120, opacity=1)
        .encode(
            x=alt.X("time:T", title=None, scale=_time_scale(window), axis=alt.Axis(format="%d %b %H:%M")),
            y=y,
            color=alt.Color(
                "state:N",
                scale=alt.Scale(domain=legend, range=[v[0] for v in MAR_STATES.values()]),
                legend=alt.Legend(orient="top", title=None),
            ),
            shape=alt.Shape(
                "state:N",
                scale=alt.Scale(domain=legend, range=[v[1] for v in MAR_STATES.values()]),
                legend=None,
            ),
            tooltip=[
                alt.Tooltip("time:T", format="%d %b %H:%M"),
                "order:N",
                "state:N",
                "hold:N",
                "detail:N",
                "ref:N",
            ],
        )
    )
    hold_text = (
        alt.Chart(df[df.hold != ""])
        .mark_text(align="left", dx=9, dy=-9, fontSize=10, fontWeight="bold", color="#b42318")
        .encode(x=alt.X("time:T", scale=_time_scale(window)), y=y, text="hold:N")
    )
    now_rule = (
        alt.Chart(pd.DataFrame({"time": [now]}))
        .mark_rule(color="#0f172a", strokeDash=[4, 3])
        .encode(x=alt.X("time:T", scale=_time_scale(window)))
    )
    return alt.layer(marks, hold_text, now_rule).properties(title="MAR timeline"), max(len(rows), 1)


def _schedule(order: Any) -> str:
    t = order.timing
    if t.as_needed:
        return "as needed"
    hours = t.interval_hours()
    return f"every {hours:g} h" if hours else ""


# --- notes -------------------------------------------------------------------------------------------
def notes_section(view: services.PatientView, key: str, limit: int = 5) -> None:
    chart = view.chart
    assert chart is not None
    st.markdown("### Recent nursing notes")
    notes = sorted(
        chart.notes, key=lambda n: n.time or datetime.min.replace(tzinfo=view.now.tzinfo), reverse=True
    )
    if not notes:
        st.caption("No notes in this chart.")
        return
    for n in notes[:limit]:
        with st.expander(
            f"{fmt_time(n.time, view.now)} — {md(n.title)}{' — ' + md(n.author) if n.author else ''}"
        ):
            st.text(inert_text(n.text) or "(empty note)")
            st.caption(md(n.ref))


# --- page scaffolding ----------------------------------------------------------------------------------
PAGE_TITLES = {
    "patient": "the patient view",
    "handoff-view": "the ward handoff",
    "audit": "the audit",
    "access-log": "the access log",
}


def boot(permission: str) -> tuple[services.AppConfig, User]:
    """Config, the user (refused unless their role grants `permission`) and this session's source, or a stopped page."""
    from connectors.errors import FhirError

    cfg = services.app_config()
    user = services.current_user()
    if not user.can(permission):
        refuse(
            cfg,
            user,
            f"page:{permission}",
            f"**Your role ({user.role}) may not open "
            f"{PAGE_TITLES.get(permission, permission)}.** Ask your administrator if you need it.",
            "page not allowed for role",
        )
    if cfg.setup_error:
        st.error(
            f"**NVA could not start:** {md(cfg.setup_error)}. Set NVA_SOURCE to a FHIR server or bundle directory.",
            icon=":material/error:",
        )
        st.stop()
    try:
        services.session_source(cfg)
    except (FhirError, OSError) as exc:
        st.error(
            f"**The data source could not be opened** ({md(cfg.source)}): {md(exc)}", icon=":material/error:"
        )
        st.stop()
    return cfg, user


def ward_picker(cfg: services.AppConfig, user: User) -> str | None:
    """The ward this session works on, among the user's wards (sidebar); None for all patients of a source with
    no wards (only for users who may see every ward)."""
    wards = services.ward_choices(cfg, user)
    if not wards and not user.all_wards:
        st.error(
            "**No ward of this data source is assigned to you.** Ask your administrator to assign your wards "
            "(identity provider claim or NVA role file).",
            icon=":material/block:",
        )
        st.stop()
    if not wards:
        st.sidebar.caption("This source lists no wards: showing all patients.")
        return None
    refs = [w.ref for w in wards]
    names = {w.ref: w.name for w in wards}
    current = st.session_state.get("nva_ward")
    if current not in refs:
        st.session_state["nva_ward"] = services.DEMO_WARD_REF if services.DEMO_WARD_REF in refs else refs[0]
    return st.sidebar.selectbox("Ward", refs, format_func=lambda r: one_line(names.get(r, r)), key="nva_ward")


def freshness(cfg: services.AppConfig, loaded_at: Any, key: str) -> None:
    """'Data as of' and the refresh button, in the sidebar."""
    with st.sidebar:
        if loaded_at is not None:
            st.caption(f"Data as of {loaded_at:%d %b %Y %H:%M:%S} UTC")
        st.caption(
            f"Rules judged at {cfg.rules_now():%d %b %H:%M} UTC ({'demo anchor' if cfg.anchor else 'wall clock'})"
        )
        if st.button("Refresh data", key=f"refresh-{key}", icon=":material/refresh:"):
            services.refresh()
            st.rerun()


# --- handoff -------------------------------------------------------------------------------------------
def ipass_block(row: services.HandoffRow, key: str, interactive: bool) -> None:
    view = row.view
    if view.chart is None:
        st.error(f"Chart not loaded: {md(view.error)}")
        return
    result = row.handoff()
    if result is None:
        st.warning("The I-PASS handoff could not be composed; open the patient view.")
        return
    numbers: dict[str, int] = {}
    parts = []
    pending_results = services.pending_results(view)
    for heading, sentences in services.ipass_sections(result):
        body = sentence_markdown(sentences, numbers) if sentences else "- nothing recorded"
        if heading.startswith("A") and pending_results:
            body += "\n" + "\n".join(f"- Pending: {md(p)}" for p in pending_results)
        parts.append(f"**{heading}**\n\n{body}")
    synthesis = services.synthesis_line(result).replace("Synthesis by receiver:", "").strip()
    parts.append(f"**S — Synthesis by receiver:** {md(synthesis.replace('[ ]', '☐'))}")
    st.markdown("\n\n".join(parts))  # one element per patient keeps the page light
    if interactive and numbers:
        refs = sorted(numbers, key=numbers.get)
        pick = st.selectbox(
            "Open a cited source",
            refs,
            index=None,
            key=f"{key}-pick",
            format_func=lambda r: f"[{numbers[r]}] {one_line(r)}",
            placeholder="Open a cited source",
        )
        if pick:
            with st.container(border=True):
                render_source(view, pick)


# --- ward census -----------------------------------------------------------------------------------------
PATIENT_PAGE = "screens/patient.py"
BAND_BADGE = {"high": "red", "medium": "orange", "low-medium": "yellow", "low": "green"}
BAND_LABEL = {"high": "High", "medium": "Medium", "low-medium": "Low-medium", "low": "Low"}


def delta_hours() -> float:
    """The default 'since last shift' look-back, from the acuity data file (assistant/data/acuity.toml)."""
    from assistant.views import acuity_table

    return float(acuity_table()["delta_hours"])


def news2_badge(
    total: int | None, band: str, label: str, incomplete: bool = False, *, short: bool = False
) -> str:
    """NEWS2 as colour AND words: ':red-badge[NEWS2 7 · High]' (short: the band's one-word name, for tables)."""
    if total is None:
        return ":gray-badge[NEWS2 — not scored]"
    words = (BAND_LABEL.get(band) if short else None) or label or BAND_LABEL.get(band, band) or "band unknown"
    text = f"{'' if short else 'NEWS2 '}{total} · {md(words)}"  # short: the column heading says NEWS2
    return f":{BAND_BADGE.get(band, 'gray')}-badge[{text}]" + (" :gray[(incomplete)]" if incomplete else "")


def fmt_clock(t: datetime | None) -> str:
    return "--:--" if t is None else f"{t:%H:%M}"


def since_picker(cfg: services.AppConfig) -> datetime:
    """The sidebar 'since last shift' picker (hours back from the judged time; default from acuity.toml),
    shared by the census and the patient view through the session."""
    hours = st.sidebar.select_slider(
        "Since last shift",
        options=[4, 6, 8, 10, 12, 16, 24, 36, 48],
        value=st.session_state.get("nva_since_hours", int(delta_hours())),
        format_func=lambda h: f"{h} h",
        key="nva_since_hours",
        help="New results and the 'since last shift' lists count from this many hours before the judged time.",
    )
    return cfg.rules_now() - timedelta(hours=hours)


def delta_lines(items: list[Any], limit: int = 40) -> str:
    return "\n".join(f"- {fmt_clock(i.time)} · **{md(i.label)}** · {md(i.text)}" for i in items[:limit]) + (
        f"\n- … and {len(items) - limit} more" if len(items) > limit else ""
    )


def patient_delta_section(view: services.PatientView, since: datetime) -> None:
    """One patient's changes since the picked time: results, orders, doses, notes, NEWS2."""
    st.markdown(f"### Since last shift ({since:%d %b %H:%M} UTC)")
    fn = getattr(services, "patient_delta", None)
    delta = fn(view, since) if callable(fn) else None
    if delta is None:
        st.caption("The shift delta is not available for this chart.")
        return
    if delta.news2_change is not None:
        st.markdown(
            f"**NEWS2** {delta.news2_before} → {delta.news2_now} "
            f"({'+' if delta.news2_change > 0 else ''}{delta.news2_change})"
        )
    st.markdown(delta_lines(delta.items) if delta.items else ":gray[nothing new since then]")
    refs = list(dict.fromkeys(r for i in delta.items for r in getattr(i, "refs", ())))[:8]
    if refs:
        citation_buttons(view, refs, key=f"delta-{view.patient_id}")

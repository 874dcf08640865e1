"""PDF export of the ward handoff (fpdf2): the ward overview on page 1, then one page per patient, sickest first."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fpdf import FPDF

from assistant.textsafe import one_line
from dashboard import services

_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)
SEVERITY_RGB = {"high": (180, 35, 24), "medium": (181, 71, 8), "low": (29, 78, 216)}
ALLERGY_RGB = (180, 35, 24)
ISOLATION_RGB = (91, 33, 182)  # violet, as the app's isolation badge; the words say ISOLATION too


class _HandoffPdf(FPDF):
    def __init__(self, title: str) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.doc_title = title
        self.footer_note = ""  # record ids of the patient on this page: for tracing, not for reading
        self.font_name = "Helvetica"
        for d in _FONT_DIRS:  # a Unicode font when the system has one; core fonts are Latin-1 only
            regular, bold = d / "DejaVuSans.ttf", d / "DejaVuSans-Bold.ttf"
            if regular.is_file() and bold.is_file():
                self.add_font("DejaVu", "", str(regular))
                self.add_font("DejaVu", "B", str(bold))
                self.font_name = "DejaVu"
                break
        self.set_auto_page_break(auto=True, margin=16)
        self.set_margins(12, 12, 12)

    def text_ok(self, text: Any) -> str:
        """Chart text as plain, inert text (bidi and control characters shown as ⟨U+XXXX⟩): fpdf draws it as
        glyphs, never as markup (markdown=False everywhere)."""
        clean = one_line(text)
        if self.font_name == "DejaVu":
            return clean
        return clean.encode("latin-1", "replace").decode("latin-1")

    def header(self) -> None:
        self.set_font(self.font_name, "B", 8)
        self.set_text_color(71, 84, 103)
        self.cell(0, 4.5, self.text_ok(self.doc_title), new_x="LMARGIN", new_y="NEXT")
        self.set_text_color(0, 0, 0)

    def footer(self) -> None:
        self.set_y(-13)
        self.set_font(self.font_name, "", 6)
        self.set_text_color(71, 84, 103)
        if self.footer_note:
            self.cell(0, 3, self.text_ok(self.footer_note), new_x="LMARGIN", new_y="NEXT")
        self.cell(0, 4, self.text_ok(f"Page {self.page_no()} - confidential patient information"), align="C")
        self.set_text_color(0, 0, 0)


def _name(r: services.HandoffRow) -> str:
    return r.view.chart.patient.name if r.view.chart else "chart not loaded"


def _news2(view: Any) -> str:
    news = getattr(getattr(view, "header", None), "news2", None)
    if view.news2_total is None:
        return "not scored"
    label = getattr(news, "band_label", "") or getattr(view.news2_score, "band", "")
    return f"{view.news2_total} ({label})" if label else str(view.news2_total)


def _pending(item: Any) -> str:
    text = str(getattr(item, "text", item))
    return f"{text} - HOLD, see flag" if getattr(item, "hold", False) else text


def ward_handoff_pdf(
    ward_name: str, rows: list[services.HandoffRow], now: datetime, printed: datetime | None = None
) -> bytes:
    """The whole ward's handoff as PDF bytes: overview table on page 1, then I-PASS per patient."""
    printed = (printed or datetime.now(UTC)).astimezone(UTC)
    now = now.astimezone(UTC)  # both times are printed as UTC
    pdf = _HandoffPdf(
        f"NVA ward handoff - {ward_name} - printed {printed:%d %b %Y %H:%M} UTC - "
        f"rules judged at {now:%d %b %Y %H:%M} UTC"
    )
    f = pdf.font_name
    t = pdf.text_ok
    pdf.add_page()
    pdf.set_font(f, "B", 14)
    pdf.cell(0, 8, t(f"Ward handoff: {ward_name}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(f, "", 8.5)
    pdf.multi_cell(
        0,
        4.3,
        t(
            f"Printed {printed:%d %b %Y %H:%M} UTC. Flags and NEWS2 judged at {now:%d %b %Y %H:%M} UTC "
            f"(data as of that time). {len(rows)} patients, sickest first (flag severity and NEWS2 band)."
        ),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    pdf.ln(1.5)
    with pdf.table(
        # Compact enough that a ward of ~25 patients fits the overview on page 1 (issue 15.7); the full flags,
        # holds and pending items are on each patient's page.
        col_widths=(14, 32, 18, 14, 108),
        text_align="LEFT",
        line_height=3.0,
        padding=0.6,
        first_row_as_headings=True,
    ) as table:
        pdf.set_font(f, "", 6.5)
        table.row([t(x) for x in ("Bed", "Patient", "NEWS2", "Severity", "Top flags / holds / pending")])
        for r in rows:
            flags = "; ".join(f"{x.severity.upper()}: {x.title}" for x in r.view.findings[:2])
            more = len(r.view.findings) - 2
            flags += f" (+{more} more)" if more > 0 else ""
            holds = list(getattr(r.view, "holds", {}) or {})
            orders = {o.ref: o.text for o in r.view.chart.orders} if r.view.chart else {}
            hold = "; ".join(f"HOLD {orders.get(h, 'order')}" for h in holds[:2])
            pending = "; ".join(_pending(p) for p in r.pending[:1])
            iso = _isolation(r.view)
            flags = "; ".join(x for x in (iso.badge if iso is not None else "", flags) if x)
            table.row(
                [
                    t(services.bed_label(r.view) or "-"),
                    t(_name(r)),
                    t(_news2(r.view)),
                    t(r.level or "-"),
                    t(" | ".join(x for x in (flags, hold, pending) if x) or "-"),
                ]
            )
    for r in rows:
        _patient_page(pdf, r)
    pdf.footer_note = ""
    return bytes(pdf.output())


def _allergy_text(view: Any) -> str:
    """The app's banner wording (the core's Header.allergy_text), never a second phrasing."""
    head = getattr(view, "header", None)
    if head is not None and getattr(head, "allergy_text", ""):
        return str(head.allergy_text)
    from dashboard.render import allergy_text

    return allergy_text(view.chart)


def _isolation(view: Any) -> Any:
    """The core's Header.isolation (assistant.views.Isolation), or None when the chart was not loaded."""
    return getattr(getattr(view, "header", None), "isolation", None)


def _patient_page(pdf: _HandoffPdf, r: services.HandoffRow) -> None:
    f, t = pdf.font_name, pdf.text_ok
    view = r.view
    pdf.footer_note = f"Record ids: Patient/{r.patient_id}"
    pdf.add_page()
    pdf.set_font(f, "B", 11)
    if view.chart is None:
        pdf.multi_cell(0, 5.5, t(f"Chart not loaded ({view.error})"), new_x="LMARGIN", new_y="NEXT")
        return
    p = view.chart.patient
    age = services.age_of(view.chart, view.now)
    pdf.multi_cell(
        0,
        5.5,
        t(
            f"{services.bed_label(view) or 'bed not recorded'} - {p.name}, {age if age is not None else '?'} y, "
            f"{p.sex or '?'} - NEWS2 {_news2(view)} - {r.level or 'severity unknown'}"
        ),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    news = getattr(getattr(view, "header", None), "news2", None)
    pdf.set_font(f, "", 8)
    if news is not None and news.total is not None and news.response:
        pdf.multi_cell(0, 4, t(f"NEWS2 response: {news.response}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(f, "B", 8.5)
    pdf.set_text_color(*ALLERGY_RGB)
    pdf.multi_cell(0, 4.5, t(_allergy_text(view)), new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0, 0, 0)
    cs = getattr(getattr(view, "header", None), "code_status", None)
    if cs is not None:
        pdf.set_font(f, "", 8)
        pdf.multi_cell(0, 4, t(f"Code status: {cs.text}"), new_x="LMARGIN", new_y="NEXT")
    numbers: dict[str, int] = {}
    iso = _isolation(view)
    if iso is not None and iso.status != "none":
        # The header's own words; its Flag ids are source [1].. of this page (the I-PASS line cites the same).
        for ref in iso.refs:
            numbers.setdefault(ref, len(numbers) + 1)
        cites = "".join(f"[{numbers[ref]}]" for ref in iso.refs)
        pdf.set_font(f, "B", 8.5)
        pdf.set_text_color(*ISOLATION_RGB)
        pdf.multi_cell(0, 4.5, t(f"{iso.text} {cites}".strip()), new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(0, 0, 0)
    do_now = list(getattr(view, "do_now", []) or [])
    if do_now:
        pdf.set_font(f, "B", 8.5)
        pdf.cell(0, 4.5, t("What to do now (doses due within the hour)"), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(f, "", 8)
        for d in do_now:
            hold = f" - {d.hold_text}" if d.hold else ""
            state = "LATE" if d.state == "late" else "DUE"
            pdf.multi_cell(
                0, 4, t(f"- {state} {d.time:%H:%M} {d.label}{hold}"), new_x="LMARGIN", new_y="NEXT"
            )
    result = r.handoff()
    if result is None:
        pdf.set_font(f, "", 8.5)
        pdf.multi_cell(
            0,
            4.5,
            t("I-PASS handoff could not be composed; see the patient view."),
            new_x="LMARGIN",
            new_y="NEXT",
        )
        _sources(pdf, numbers)
        return
    for heading, sentences in services.ipass_sections(result):
        pdf.set_font(f, "B", 8.5)
        pdf.cell(0, 4.6, t(heading), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(f, "", 8)
        items = []
        for s in sentences:
            for c in s.citations:
                numbers.setdefault(c, len(numbers) + 1)
            cites = "".join(f"[{numbers[c]}]" for c in s.citations[:3])
            more = f" [+{len(s.citations) - 3}]" if len(s.citations) > 3 else ""
            items.append(f"{s.text} {cites}{more}{'' if s.verified else ' (unverified)'}")
        if heading.startswith("A"):
            items += [f"Pending: {x}" for x in services.pending_results(view)]
        for line in items or ["nothing recorded"]:
            pdf.multi_cell(0, 4, t(f"- {line}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(f, "B", 8.5)
    pdf.multi_cell(
        0, 4.6, t(services.synthesis_line(result).replace("[ ]", "[  ]")), new_x="LMARGIN", new_y="NEXT"
    )
    _sources(pdf, numbers)


def _sources(pdf: _HandoffPdf, numbers: dict[str, int]) -> None:
    t = pdf.text_ok
    if numbers:
        # Record ids are for tracing a statement back: small, at the end of the patient's page.
        pdf.ln(1)
        pdf.set_font(pdf.font_name, "", 5.5)
        pdf.set_text_color(71, 84, 103)
        pdf.multi_cell(
            0,
            2.8,
            t("Sources: " + "  ".join(f"[{n}] {ref}" for ref, n in numbers.items())),
            new_x="LMARGIN",
            new_y="NEXT",
        )
        pdf.set_text_color(0, 0, 0)

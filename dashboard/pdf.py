"""PDF export of the ward handoff (fpdf2): one section per patient, sickest first, citations kept."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fpdf import FPDF

from dashboard import services

_FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)
SEVERITY_RGB = {"high": (180, 35, 24), "medium": (181, 71, 8), "low": (29, 78, 216)}


class _HandoffPdf(FPDF):
    def __init__(self, title: str) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.doc_title = title
        self.font_name = "Helvetica"
        for d in _FONT_DIRS:  # a Unicode font when the system has one; core fonts are Latin-1 only
            regular, bold = d / "DejaVuSans.ttf", d / "DejaVuSans-Bold.ttf"
            if regular.is_file() and bold.is_file():
                self.add_font("DejaVu", "", str(regular))
                self.add_font("DejaVu", "B", str(bold))
                self.font_name = "DejaVu"
                break
        self.set_auto_page_break(auto=True, margin=14)
        self.set_margins(12, 12, 12)

    def text_ok(self, text: str) -> str:
        if self.font_name == "DejaVu":
            return text
        return text.encode("latin-1", "replace").decode("latin-1")

    def header(self) -> None:
        self.set_font(self.font_name, "B", 9)
        self.set_text_color(71, 84, 103)
        self.cell(0, 5, self.text_ok(self.doc_title), new_x="LMARGIN", new_y="NEXT")
        self.set_text_color(0, 0, 0)

    def footer(self) -> None:
        self.set_y(-10)
        self.set_font(self.font_name, "", 7)
        self.set_text_color(71, 84, 103)
        self.cell(0, 5, self.text_ok(f"Page {self.page_no()} - confidential patient information"), align="C")


def ward_handoff_pdf(ward_name: str, rows: list[services.HandoffRow], now: datetime) -> bytes:
    """The whole ward's handoff as PDF bytes: overview table, then I-PASS per patient with numbered sources."""
    created = datetime.now(UTC)
    pdf = _HandoffPdf(
        f"NVA ward handoff - {ward_name} - judged at {now:%d %b %Y %H:%M} UTC - "
        f"printed {created:%d %b %Y %H:%M} UTC"
    )
    f = pdf.font_name
    t = pdf.text_ok
    pdf.add_page()
    pdf.set_font(f, "B", 15)
    pdf.cell(0, 9, t(f"Ward handoff: {ward_name}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(f, "", 9)
    pdf.cell(
        0,
        5,
        t(f"{len(rows)} patients, sickest first (NEWS2, illness severity, worst flag)"),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    pdf.ln(2)
    with pdf.table(
        col_widths=(22, 40, 12, 18, 94), text_align="LEFT", line_height=4.2, first_row_as_headings=True
    ) as table:
        pdf.set_font(f, "", 7.5)
        table.row([t(x) for x in ("Bed", "Patient", "NEWS2", "Severity", "Top flags / pending")])
        for r in rows:
            name = r.view.chart.patient.name if r.view.chart else f"Patient/{r.patient_id}"
            flags = "; ".join(f"{x.severity.upper()}: {x.title}" for x in r.view.findings[:3])
            pending = "; ".join(r.pending[:2])
            table.row(
                [
                    t(services.bed_label(r.view)),
                    t(name),
                    "-" if r.view.news2_total is None else str(r.view.news2_total),
                    t(r.level or "-"),
                    t(" | ".join(x for x in (flags, pending) if x) or "-"),
                ]
            )
    for r in rows:
        _patient_section(pdf, r)
    return bytes(pdf.output())


def _patient_section(pdf: _HandoffPdf, r: services.HandoffRow) -> None:
    f, t = pdf.font_name, pdf.text_ok
    view = r.view
    pdf.ln(3)
    if pdf.get_y() > 250:
        pdf.add_page()
    pdf.set_draw_color(200, 205, 212)
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.w - pdf.r_margin, pdf.get_y())
    pdf.ln(1.5)
    pdf.set_font(f, "B", 11)
    if view.chart is None:
        pdf.multi_cell(
            0,
            5.5,
            t(f"Patient/{r.patient_id}: chart not loaded ({view.error})"),
            new_x="LMARGIN",
            new_y="NEXT",
        )
        return
    p = view.chart.patient
    age = services.age_of(view.chart, view.now)
    pdf.multi_cell(
        0,
        5.5,
        t(
            f"{services.bed_label(view)} - {p.name}, {age if age is not None else '?'} y, "
            f"{p.sex or '?'} - NEWS2 {view.news2_total if view.news2_total is not None else '-'}"
            f" - {r.level or 'severity unknown'}"
        ),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    allergies = view.chart.active_allergies()
    pdf.set_font(f, "B", 8.5)
    pdf.set_text_color(180, 35, 24)
    pdf.multi_cell(
        0,
        4.5,
        t(
            "Allergies: "
            + ("; ".join(a.substance for a in allergies) if allergies else "none recorded as active")
        ),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    pdf.set_text_color(0, 0, 0)
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
        return
    numbers: dict[str, int] = {}
    for heading, sentences in services.ipass_sections(result):
        pdf.set_font(f, "B", 8.5)
        pdf.cell(0, 5, t(heading), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(f, "", 8.5)
        items = []
        for s in sentences:
            for c in s.citations:
                numbers.setdefault(c, len(numbers) + 1)
            cites = "".join(f"[{numbers[c]}]" for c in s.citations)
            items.append(f"{s.text} {cites}{'' if s.verified else ' (unverified)'}")
        if heading.startswith("A"):
            items += [f"Pending: {x}" for x in services.pending_results(view)]
        for line in items or ["nothing recorded"]:
            pdf.multi_cell(0, 4.3, t(f"- {line}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(f, "B", 8.5)
    pdf.multi_cell(
        0, 5, t(services.synthesis_line(result).replace("[ ]", "[  ]")), new_x="LMARGIN", new_y="NEXT"
    )
    if numbers:
        pdf.set_font(f, "", 6.5)
        pdf.set_text_color(71, 84, 103)
        pdf.multi_cell(
            0,
            3.4,
            t("Sources: " + "  ".join(f"[{n}] {ref}" for ref, n in numbers.items())),
            new_x="LMARGIN",
            new_y="NEXT",
        )
        pdf.set_text_color(0, 0, 0)

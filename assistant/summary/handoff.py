"""I-PASS handoff: Illness severity, Patient summary, Action list, Situation awareness, Synthesis by receiver."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from assistant.model import Chart, Finding
from assistant.summary.composer import SummaryResult, compose, template_sentence
from assistant.summary.facts import (
    DEFAULT_MAX_FACTS,
    Fact,
    GuidelinePassage,
    News2,
    bed_label,
    build_fact_sheet,
    severity_rank,
)
from assistant.summary.verifier import Sentence, Verifier
from assistant.views import Isolation, hold_map, hold_text, isolation_status

SECTIONS = (
    ("illness", "Illness severity"),
    ("patient", "Patient summary"),
    ("action", "Action list"),
    ("situation", "Situation awareness and contingencies"),
)
SYNTHESIS = (
    "Synthesis by receiver: [ ] summary read back  [ ] action list confirmed  "
    "[ ] contingencies understood  [ ] questions answered"
)


@dataclass(slots=True)
class HandoffPatient:
    patient: str
    name: str
    bed: str | None
    illness_severity: str  # stable | watcher | unstable
    sections: dict[str, list[Sentence]]
    synthesis: str
    summary: SummaryResult  # facts, dropped sentences and LLM figures behind the handoff
    acuity: Any = (
        None  # assistant.views.Acuity: the census's place of this patient (set by assistant.pipeline)
    )

    def sentences(self) -> list[Sentence]:
        return [s for key, _ in SECTIONS for s in self.sections.get(key, [])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "name": self.name,
            "bed": self.bed,
            "illness_severity": self.illness_severity,
            "acuity": (
                {"tier": self.acuity.tier, "label": self.acuity.label, "reasons": list(self.acuity.reasons)}
                if self.acuity is not None
                else None
            ),
            "sections": {key: [s.to_dict() for s in self.sections.get(key, [])] for key, _ in SECTIONS},
            "synthesis": self.synthesis,
            "dropped": [s.to_dict() for s in self.summary.dropped],
            "backend": self.summary.backend,
            "model": self.summary.model,
            "latency_s": round(self.summary.latency_s, 4),
            "prompt_tokens": self.summary.prompt_tokens,
            "completion_tokens": self.summary.completion_tokens,
            "notes": list(self.summary.notes),
            "facts": self.summary.facts.to_dict(),
        }


@dataclass(slots=True)
class WardHandoff:
    ward: str | None
    now: datetime
    patients: list[HandoffPatient] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # patients whose chart could not be read, by id

    def to_dict(self) -> dict[str, Any]:
        return {
            "ward": self.ward,
            "now": self.now.astimezone(UTC).isoformat(),
            "patients": [p.to_dict() for p in self.patients],
            "errors": list(self.errors),
        }


def _action_sentence(fact: Fact) -> str | None:
    """A flag's action as its own action-list line (the words come from the flag fact)."""
    if fact.kind != "flag" or "Action:" not in fact.text:
        return None
    action = fact.text.split("Action:", 1)[1].strip().rstrip(".")
    return f"{action} ({fact.label}). [{fact.tag}]"


def isolation_sentence(iso: Isolation) -> Sentence | None:
    """The header's isolation wording as the patient summary's first line, cited Flag/<id>; None when none charted.

    It is the Flag rendered by assistant.views.isolation_status (the same words as the header and the PDF), not
    prose about the chart, so it is not checked against the fact sheet (which holds no Flag facts)."""
    if iso.status == "none":
        return None
    return Sentence(
        text=iso.text,
        citations=iso.refs,
        origin="template",
        verified=True,
        raw=iso.text,
        section="patient",
        group="status",
    )


def compose_handoff(
    chart: Chart,
    findings: Sequence[Finding] = (),
    guidelines: Iterable[GuidelinePassage] = (),
    backend: Any | None = None,
    *,
    now: datetime,
    news2: News2 | None | str = "auto",
    max_facts: int = DEFAULT_MAX_FACTS,
    max_tokens: int = 256,
    timeout: float | None = None,
) -> HandoffPatient:
    """One patient's I-PASS entry. The LLM (when given) writes the patient summary; the rest is deterministic."""
    sheet = build_fact_sheet(chart, findings, guidelines, now=now, max_facts=max_facts, news2=news2)
    verifier = Verifier(sheet)
    sections: dict[str, list[Sentence]] = {key: [] for key, _ in SECTIONS}

    def add(section: str, raw: str) -> None:
        s = verifier.verify(raw, origin="template")
        s.section = section
        sections[section].append(s)

    severity = next((f for f in sheet.facts if f.kind == "severity"), None)
    if severity is not None:
        add("illness", template_sentence(severity))

    summary = compose(
        chart, findings, guidelines, backend, now=now, sheet=sheet, max_tokens=max_tokens, timeout=timeout
    )
    llm = [s for s in summary.sentences if s.origin == "llm"]
    if llm:
        for s in llm:
            s.section = "patient"
            sections["patient"].append(s)
    cited = {t for s in llm for t in s.tags}
    for f in sheet.facts:
        if f.section == "patient" and f.sentence and f.tag not in cited:
            add("patient", template_sentence(f))
    # Action list: what a flag says not to give comes first, then the other flags' actions, then the doses and
    # results to chase; a dose of a drug on hold carries "HOLD — see flag" (issue 15).
    holds = hold_map(chart, list(findings))
    flag_tags = {f.label: f.tag for f in sheet.facts if f.kind == "flag"}
    stops = [f for f in sheet.facts if _action_sentence(f) and f.severity in ("high", "medium")]
    first = [f for f in stops if any(h.title == f.label for hs in holds.values() for h in hs)]
    for f in first + [f for f in stops if f not in first]:
        add("action", _action_sentence(f))  # type: ignore[arg-type]
    for f in sheet.facts:
        if f.section == "action" and f.sentence:
            flags = holds.get(f.provenance[0], ()) if f.kind == "administration" and f.provenance else ()
            if flags and f.severity in ("due", "overdue"):
                # The mark is the flag's own title, added after verification: the verifier reads the dose
                # sentence (cited with the flag) and the words "HOLD — see flag" are the product's, not a claim.
                tags = "".join(f"[{flag_tags[h.title]}]" for h in flags if h.title in flag_tags)
                body = template_sentence(f).rsplit(" [", 1)[0]
                add("action", f"{body} [{f.tag}]{tags}")
                held = sections["action"][-1]
                held.text = f"{hold_text(flags)} — {held.text}"
            else:
                add("action", template_sentence(f))
    for f in sheet.facts:
        if f.section == "situation" and f.sentence:
            add("situation", template_sentence(f))
    for key in sections:
        kept = [s for s in sections[key] if s.verified or s.origin == "template" and _must(sheet, s)]
        summary.dropped.extend(s for s in sections[key] if s not in kept and s.origin == "template")
        sections[key] = kept
    iso = isolation_sentence(isolation_status(chart, now))
    if iso is not None:  # isolation (or "not retrieved") leads the patient summary: it decides how to enter
        sections["patient"].insert(0, iso)
    e = chart.encounter
    return HandoffPatient(
        patient=chart.patient_ref,
        name=chart.patient.name,
        bed=bed_label(e) or None,
        illness_severity=severity.value if severity and severity.value else "stable",
        sections=sections,
        synthesis=SYNTHESIS,
        summary=summary,
    )


def _must(sheet: Any, s: Sentence) -> bool:
    must = {f.tag for f in sheet.must_cover()}
    return bool(set(s.tags) & must)


def compose_ward_handoff(
    entries: Iterable[HandoffPatient], *, ward: str | None, now: datetime, errors: Sequence[str] = ()
) -> WardHandoff:
    """Patients in acuity order (assistant/data/acuity.toml) when known, else by illness severity, then bed."""
    entries = list(entries)
    if entries and all(p.acuity is not None for p in entries):
        patients = sorted(entries, key=lambda p: (p.acuity.key, p.patient))
    else:
        patients = sorted(entries, key=lambda p: (severity_rank(p.illness_severity), p.bed or "", p.patient))
    return WardHandoff(ward=ward, now=now, patients=patients, errors=list(errors))


def handoff_markdown(handoff: WardHandoff) -> str:
    lines = [
        f"# I-PASS handoff{' - ' + handoff.ward if handoff.ward else ''}",
        f"Generated for {handoff.now.astimezone(UTC):%Y-%m-%d %H:%M} UTC. Every line cites its chart sources.",
        "",
    ]
    for p in handoff.patients:
        bed = f"{p.bed} - " if p.bed else ""
        lines.append(f"## {bed}{p.name} ({p.patient}) - {p.illness_severity.upper()}")
        if p.acuity is not None:
            why = f" ({'; '.join(p.acuity.reasons)})" if p.acuity.reasons else ""
            lines.append(f"Acuity: {p.acuity.label}{why}")
        for key, title in SECTIONS:
            lines.append(f"**{title}**")
            rows = p.sections.get(key, [])
            if not rows:
                lines.append("- (nothing recorded)")
            for s in rows:
                mark = "" if s.verified else " _(unverified)_"
                origin = " _(LLM)_" if s.origin == "llm" else ""
                cites = f" `{', '.join(s.citations)}`" if s.citations else ""
                lines.append(f"- {s.text}{cites}{origin}{mark}")
        lines.append(f"**{p.synthesis}**")
        if p.summary.notes:
            lines += [f"> {n}" for n in p.summary.notes]
        lines.append("")
    for err in handoff.errors:
        lines.append(f"> could not read: {err}")
    return "\n".join(lines) + "\n"

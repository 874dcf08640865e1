"""I-PASS handoff: Illness severity, Patient summary, Action list, Situation awareness, Synthesis by receiver."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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

    def sentences(self) -> list[Sentence]:
        return [s for key, _ in SECTIONS for s in self.sections.get(key, [])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "patient": self.patient,
            "name": self.name,
            "bed": self.bed,
            "illness_severity": self.illness_severity,
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
            "now": self.now.isoformat(),
            "patients": [p.to_dict() for p in self.patients],
            "errors": list(self.errors),
        }


def _action_sentence(fact: Fact) -> str | None:
    """A flag's action as its own action-list line (the words come from the flag fact)."""
    if fact.kind != "flag" or "Action:" not in fact.text:
        return None
    action = fact.text.split("Action:", 1)[1].strip().rstrip(".")
    return f"{action} ({fact.label}). [{fact.tag}]"


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
    for f in sheet.facts:
        if f.section == "action" and f.sentence:
            add("action", template_sentence(f))
    for f in sheet.facts:
        line = _action_sentence(f)
        if line and f.severity in ("high", "medium"):
            add("action", line)
    for f in sheet.facts:
        if f.section == "situation" and f.sentence:
            add("situation", template_sentence(f))
    for key in sections:
        kept = [s for s in sections[key] if s.verified or s.origin == "template" and _must(sheet, s)]
        summary.dropped.extend(s for s in sections[key] if s not in kept and s.origin == "template")
        sections[key] = kept
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
    """Patients sorted by illness severity (unstable first), then bed."""
    patients = sorted(entries, key=lambda p: (severity_rank(p.illness_severity), p.bed or "", p.patient))
    return WardHandoff(ward=ward, now=now, patients=patients, errors=list(errors))


def handoff_markdown(handoff: WardHandoff) -> str:
    lines = [
        f"# I-PASS handoff{' - ' + handoff.ward if handoff.ward else ''}",
        f"Generated for {handoff.now:%Y-%m-%d %H:%M} UTC. Every line cites its chart sources.",
        "",
    ]
    for p in handoff.patients:
        bed = f"{p.bed} - " if p.bed else ""
        lines.append(f"## {bed}{p.name} ({p.patient}) - {p.illness_severity.upper()}")
        for key, title in SECTIONS:
            lines.append(f"**{title}**")
            rows = p.sections.get(key, [])
            if not rows:
                lines.append("- (nothing recorded)")
            for s in rows:
                mark = "" if s.verified else " _(unverified)_"
                origin = " _(LLM)_" if s.origin == "llm" else ""
                lines.append(f"- {s.text} `{', '.join(s.citations)}`{origin}{mark}")
        lines.append(f"**{p.synthesis}**")
        if p.summary.notes:
            lines += [f"> {n}" for n in p.summary.notes]
        lines.append("")
    for err in handoff.errors:
        lines.append(f"> could not read: {err}")
    return "\n".join(lines) + "\n"

"""Whether an audit run is complete: missing resource types, failed export files, incomplete patients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Global issue codes (connectors, partitioning) that mean part of the source was not read at all.
INCOMPLETE_CODES = frozenset(
    {"export-error", "export-file-failed", "export-file-expired", "missing-type", "fetch-failed", "truncated"}
)
EXAMPLES = 10


@dataclass(slots=True)
class RunStatus:
    """Collected over every per-patient row; `banner` is the one sentence every output format carries."""

    missing_types: dict[str, str] = field(default_factory=dict)  # type -> why, missing for every patient
    export_errors: list[str] = field(default_factory=list)
    incomplete_patients: int = 0
    incomplete_examples: list[str] = field(default_factory=list)
    not_judged_rules: list[str] = field(default_factory=list)
    notes: list[str] = field(
        default_factory=list
    )  # said, but not making the run incomplete (e.g. no Location)

    @classmethod
    def of_source(cls, source: Any) -> RunStatus:
        """The source-wide part of the status (types missing for every patient, export errors, notes); read it
        after the records, since per-patient gaps fill in while they are read."""
        completeness = getattr(source, "completeness", None)
        if completeness is None:
            return cls()
        return cls(
            missing_types=dict(completeness.missing_types),
            export_errors=list(completeness.errors),
            notes=list(getattr(completeness, "notes", None) or []),
        )

    def keep_needed(self, needed: frozenset[str]) -> None:
        """Types no rule reads (`needed`: the catalogue's) cannot change a verdict: said in the notes, not a gap."""
        for rtype in sorted(t for t in self.missing_types if t not in needed and t != "*"):
            why = self.missing_types.pop(rtype)
            note = f"{rtype} not retrieved ({why}); no audit rule reads it"
            if note not in self.notes:
                self.notes.append(note)

    @property
    def complete(self) -> bool:
        return not (self.missing_types or self.export_errors or self.incomplete_patients)

    def add_global_issues(self, issues: list[dict[str, Any]]) -> None:
        for issue in issues:
            if issue.get("code") in INCOMPLETE_CODES:
                text = f"{issue.get('source', '')}: {issue.get('message', '')}".strip(": ")
                if text not in self.export_errors:
                    self.export_errors.append(text)

    def add_row(self, row: dict[str, Any]) -> None:
        inc = row.get("incomplete")
        if inc:
            self.incomplete_patients += 1
            if len(self.incomplete_examples) < EXAMPLES:
                what = ", ".join(inc.get("missing_types") or ()) or inc.get("reason") or "part of the chart"
                self.incomplete_examples.append(f"{row['patient']}: {what}")
        for rule_id in row.get("not_judged") or ():
            if rule_id not in self.not_judged_rules:
                self.not_judged_rules.append(rule_id)

    @property
    def banner(self) -> str:
        """'' when complete; otherwise what is missing and which rules could therefore not be judged."""
        if self.complete:
            return ""
        parts = []
        if self.missing_types:
            parts.append(
                "resource types missing for every patient: "
                + ", ".join(f"{t} ({why})" for t, why in sorted(self.missing_types.items()))
            )
        if self.export_errors:
            shown = "; ".join(self.export_errors[:EXAMPLES])
            more = (
                f" (+{len(self.export_errors) - EXAMPLES} more)" if len(self.export_errors) > EXAMPLES else ""
            )
            parts.append(f"{len(self.export_errors)} export file(s) failed: {shown}{more}")
        if self.incomplete_patients:
            parts.append(
                f"{self.incomplete_patients} patient(s) with an incomplete chart (e.g. "
                + "; ".join(self.incomplete_examples[:3])
                + ")"
            )
        if self.not_judged_rules:
            parts.append(
                "rules not judged where data is missing: " + ", ".join(sorted(self.not_judged_rules))
            )
        return "INCOMPLETE AUDIT: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": "run-status",
            "complete": self.complete,
            "missing_types": dict(sorted(self.missing_types.items())),
            "export_errors": list(self.export_errors),
            "incomplete_patients": self.incomplete_patients,
            "incomplete_examples": list(self.incomplete_examples),
            "not_judged_rules": sorted(self.not_judged_rules),
            "banner": self.banner,
            "notes": list(self.notes),
        }

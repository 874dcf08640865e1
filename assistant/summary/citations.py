"""Citation tags and sentence text: only tags the composer issued are citations; all other brackets are data."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

# Tags the composer writes: [F3], [F3, F7], [F3][F7]; small models also write (F3). A resource reference
# ([Observation/k2], [guideline:x], [rule:y]) is a citation too. Anything else in brackets ("[K-Tab]",
# "[Pfizerpen]", "[1]") is chart or model text and stays in the sentence, where the claim checks read it.
_FTAG = r"F\d{1,4}"
# FHIR R4 resource types a chart fact can rest on (hl7.org/fhir/R4/resourcelist.html); "[Moles/volume]" in a
# LOINC name is not one of them, so it stays text.
_TYPES = (
    "AllergyIntolerance|CarePlan|CareTeam|Condition|Device|DiagnosticReport|DocumentReference|Encounter|Flag|"
    "Goal|Immunization|Location|Medication|MedicationAdministration|MedicationDispense|MedicationRequest|"
    "MedicationStatement|Observation|Organization|Patient|Practitioner|Procedure|ServiceRequest|Specimen"
)
_REF = rf"(?:(?:{_TYPES})/[A-Za-z0-9\-.]{{1,64}}|guideline:[^\s\[\](),;]{{1,120}}|rule:[a-z0-9\-_.]{{1,80}})"
_TOKEN = rf"(?:{_FTAG}|{_REF})"
_TAG_GROUP_RE = re.compile(rf"\[\s*({_TOKEN}(?:\s*[,;]?\s*{_TOKEN})*)\s*\]")
_PAREN_TAG_RE = re.compile(rf"\(\s*({_FTAG}(?:\s*[,;]?\s*{_FTAG})*)\s*\)")
_FTAG_RE = re.compile(rf"^{_FTAG}$")

# Bidi controls, zero-width characters and C0/C1 controls can make a sentence display something other than the
# characters the verifier read ("lm 0001" shown as "1000 ml" under U+202E). They never pass as verified text.
_INVISIBLE = {
    *(chr(c) for c in range(0x202A, 0x202F)),  # LRE RLE PDF LRO RLO
    *(chr(c) for c in range(0x2066, 0x206A)),  # LRI RLI FSI PDI
    "\u200e",
    "\u200f",
    "\u061c",  # LRM RLM ALM
    "\u200b",
    "\u200c",
    "\u200d",
    "\u2060",
    "\ufeff",  # zero-width
}


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return ch in _INVISIBLE or unicodedata.category(ch) == "Cc"


def has_controls(text: str) -> bool:
    """True when the text holds a bidi, zero-width or control character (NUL included)."""
    return any(_is_control(ch) for ch in text)


def make_visible(text: str) -> str:
    """Every bidi/zero-width/control character replaced by a visible marker such as ⟨U+202E⟩."""
    if not has_controls(text):
        return text
    return "".join(f"⟨U+{ord(ch):04X}⟩" if _is_control(ch) else ch for ch in text)


def neutralise_tags(text: str) -> str:
    """Chart text that looks like a citation tag ('[F2]', '[Observation/x]') can never be read as one."""
    text = _TAG_GROUP_RE.sub(lambda m: f"‹{m.group(1)}›", text)
    return _PAREN_TAG_RE.sub(lambda m: f"‹{m.group(1)}›", text)


def parse_citations(
    raw: str, issued: Collection[str] | None = None
) -> tuple[str, list[str], list[str], list[str]]:
    """(text without citation tags, F-tags, resource refs, unknown F-tags) of one sentence.

    `issued` is the allow-list of fact tags the composer wrote; an F-tag outside it is returned as unknown (the
    verifier drops the sentence). Without `issued`, every F-tag is accepted as a tag.
    """
    tags: list[str] = []
    refs: list[str] = []
    unknown: list[str] = []

    def collect(body: str) -> str:
        for tok in re.split(r"[,;\s]+", body.strip()):
            if not tok:
                continue
            if _FTAG_RE.match(tok):
                (tags if issued is None or tok in issued else unknown).append(tok)
            else:
                refs.append(tok)
        return " "

    text = _TAG_GROUP_RE.sub(lambda m: collect(m.group(1)), raw)
    text = _PAREN_TAG_RE.sub(lambda m: collect(m.group(1)), text)
    return clean_text(text), list(dict.fromkeys(tags)), list(dict.fromkeys(refs)), unknown


def clean_text(text: str) -> str:
    t = text.replace("**", "").replace("__", "")
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"\s+([.,;:!?])", r"\1", t)
    t = re.sub(r"([.!?])\1+$", r"\1", t)
    t = t.strip(" -*•")
    if t and t[-1] not in ".!?":
        t += "."
    return t


# --- splitting LLM output into sentences --------------------------------------------------------------------

_TAGS_TAIL = rf"(?:\s*(?:\[\s*{_TOKEN}(?:\s*[,;]?\s*{_TOKEN})*\s*\]|\({_FTAG}(?:\s*[,;]?\s*{_FTAG})*\)))*"
_BOUNDARY_RE = re.compile(r"[.!?]" + _TAGS_TAIL + r"(?=\s+[^\s\[(])")
_BULLET_RE = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|#+)\s+")


def is_heading(line: str) -> bool:
    s = line.strip()
    if "[" in s:
        return False
    words = s.split()
    return (
        bool(words)
        and len(words) <= 8
        and (s.endswith(":") or s.startswith("#") or (s.startswith("**") and s.endswith("**")))
    )


class SentenceSplitter:
    """Feeds streamed text, returns complete sentences as soon as the next one starts (or a line ends)."""

    def __init__(self) -> None:
        self.buf = ""

    def feed(self, delta: str) -> list[str]:
        self.buf += delta
        out: list[str] = []
        while True:
            nl = self.buf.find("\n")
            mt = _BOUNDARY_RE.search(self.buf)
            if mt and (nl < 0 or mt.end() <= nl):
                piece, self.buf = self.buf[: mt.end()], self.buf[mt.end() :]
            elif nl >= 0:
                piece, self.buf = self.buf[:nl], self.buf[nl + 1 :]
            else:
                break
            out += self._clean(piece)
        return out

    def flush(self) -> list[str]:
        piece, self.buf = self.buf, ""
        return self._clean(piece)

    @staticmethod
    def _clean(piece: str) -> list[str]:
        s = _BULLET_RE.sub("", piece).strip()
        if not s or is_heading(s) or not re.search(r"[A-Za-z]", s):  # "2." alone is a list number
            return []
        return [s]


def split_sentences(text: str) -> list[str]:
    sp = SentenceSplitter()
    return sp.feed(text) + sp.flush()

"""De-identify what goes to a remote LLM (people, contacts, addresses, ids, dates) and re-identify its answer."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import tomllib
from collections.abc import Generator, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

from assistant.llm.base import ChatMessage, ChatResult, ChatStream, LlmBackend
from assistant.model import Chart

# Placeholders that replace free-text identifiers; what the nurse reads if the model repeats one.
PLACEHOLDERS = {
    "[NAME]": "another person",
    "[PHONE]": "a phone number",
    "[EMAIL]": "an e-mail address",
    "[URL]": "a web address",
    "[ADDRESS]": "an address",
    "[ID]": "an identifier",
    "[DATE]": "a date",
}
# A capitalised word: Smith, O'Neil, Mary-Ann, Haverford-Smythe, Zoë. Case-sensitive on purpose.
_CAP = r"(?:[A-Z][a-z\u00df-\u00ff]+|[A-Z](?=['\u2019]))(?:['\u2019-][A-Z]?[a-z\u00df-\u00ff]+)*"
_CAP_NAME = (
    rf"(?:[A-Z]\.\s*)?{_CAP}(?:\s+(?:[A-Z]\.\s*)?{_CAP}){{0,2}}"  # up to three words, initials allowed
)


@functools.cache
def _words() -> dict[str, Any]:
    with resources.files("assistant.data").joinpath("deid.toml").open("rb") as fh:
        return tomllib.load(fh)


def _alternation(words: Iterable[str]) -> str:
    return "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in sorted(set(words), key=len, reverse=True))


@functools.cache
def _patterns() -> dict[str, Any]:
    w = _words()
    names, addr, ids = w["names"], w["addresses"], w["identifiers"]
    not_names = frozenset(names["not_names"]) | frozenset(names["titles"]) | frozenset(names["credentials"])
    street = _alternation(addr["street_types"])
    return {
        "not_names": not_names,
        "given": frozenset(names["given"]),
        "email": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
        "url": re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE),
        "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
        # +44 20 7946 0958, (555) 123-4567, 555.123.4567, 07700 900123: 10-15 digits in two or more groups
        "phone": re.compile(
            r"(?<![\w./-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,5}\)\s?|\d{2,5}[\s.-])\d{2,4}(?:[\s.-]?\d{2,5}){1,2}(?![\w/-]|\.\d)"
        ),
        "phone_label": re.compile(
            rf"\b({_alternation(ids['phone_labels'])})(\.?\s*(?:no\.?|number|#|:)?\s*)(\+?\d[\d\s().-]{{2,}}\d)",
            re.IGNORECASE,
        ),
        "id_label": re.compile(
            rf"\b({_alternation(ids['labels'])})(\.?\s*(?:no\.?|number|#|:)?\s*)"
            r"((?=[A-Za-z0-9-]*\d)[A-Za-z0-9][A-Za-z0-9-]{2,}(?:\s\d{3,4}){0,2})",
            re.IGNORECASE,
        ),
        # letters and five or more digits in one token (MRN99812, A1234567, UUID pieces), or 7+ bare digits
        "id_mixed": re.compile(
            r"\b(?=[A-Za-z0-9-]*\d{5})(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9][A-Za-z0-9-]{5,}\b"
        ),
        "id_digits": re.compile(r"(?<![\d.,/])\d{7,}(?![\d.,/])"),
        "street": re.compile(
            rf"\b\d{{1,5}}[A-Za-z]?,?\s+(?:{_CAP}\.?\s+){{1,4}}(?:{street})\b\.?"
            r"(?:,?\s*(?:Apt|Apartment|Unit|Suite|Flat|#)\.?\s*[\w-]+)?"
            rf"(?:,\s*{_CAP}(?:\s+{_CAP}){{0,2}})?(?:,?\s*(?:{_alternation(addr['us_states'])})\s+\d{{5}}(?:-\d{{4}})?)?"
        ),
        # "lives in Boston": a place name (capitalised words) after these verbs; "lives in a care home" stays
        "city_lead": re.compile(
            rf"\b((?i:lives|living|resides|residing|moved|staying)\s+(?i:in|to|at)\s+)({_CAP}(?:\s+{_CAP}){{0,3}})"
        ),
        "po_box": re.compile(r"\bP\.?\s?O\.?\s+Box\s+\d+\b", re.IGNORECASE),
        "zip": re.compile(rf"\b(?:{_alternation(addr['us_states'])})\s+\d{{5}}(?:-\d{{4}})?\b"),
        "postcode": re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]?\s?\d[ABD-HJLNP-UW-Z]{2}\b"),
        "address_lead": re.compile(
            rf"\b({_alternation(addr['lead_ins'])})(\s*:?\s+)([^.;\n\[]+)", re.IGNORECASE
        ),
        "titled": re.compile(rf"\b({_alternation(names['titles'])})(\.?\s+)({_CAP_NAME})"),
        "related": re.compile(
            rf"\b((?i:{_alternation(names['relations'])}))((?:\s*[,:(]\s*|\s+)(?:(?i:is|named|called)\s+)?)({_CAP_NAME})"
        ),
        "lead_in": re.compile(
            rf"\b((?i:{_alternation(names['lead_ins'])}))"
            rf"(\s+(?:(?:the\s+)?(?:{_alternation(names['titles'])})\.?\s+|[A-Z]{{2,5}}\s+){{0,2}})({_CAP_NAME})"
        ),
        "credentialed": re.compile(
            rf"\b((?:[A-Z]\.\s*)?{_CAP}(?:\s+{_CAP})?)(,?\s+)(?=(?:{_alternation(names['credentials'])})\b)"
        ),
        "given_family": re.compile(rf"\b({_CAP})(\s+(?:[A-Z]\.\s*)?)({_CAP})\b"),
        "long_date": re.compile(
            r"\b(?:\d{1,2}(?:st|nd|rd|th)?\s+(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?,?\s+\d{4}"
            r"|(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}"
            r"|\d{1,2}[/.]\d{1,2}[/.]\d{4})\b"
        ),
    }


def _digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _phone(m: re.Match[str]) -> str:
    found = m.group(0)
    if _ISO_DATE.search(found) or not 10 <= _digits(found) <= 15:
        return found  # a date and time (shifted later) or a run of values, not a phone number
    return "[PHONE]"


def _name_part(words: str, not_names: frozenset[str]) -> bool:
    """True when the captured words look like a person's name, not a ward, team, protocol or common word."""
    parts = [w.rstrip(".") for w in words.split()]
    named = [w for w in parts if len(w) > 1]
    return bool(named) and not any(w in not_names for w in named) and not words.isupper()


def scrub_free_text(text: str, *, other_names: Iterable[str] = ()) -> str:
    """Free text with people other than the patient, phone numbers, e-mails, URLs, street addresses, postal codes,
    identifying numbers and written-out dates replaced by placeholders (PLACEHOLDERS).

    Deterministic rules (assistant/data/deid.toml, HIPAA Safe Harbor list): titles ("Dr Okonkwo"), relations
    ("daughter Jane"), lead-ins ("seen by Patel"), credentials ("J. Smith, RN"), common given names followed by a
    surname, and every name in `other_names` (the chart's practitioners, related persons and note authors).
    ISO dates (yyyy-mm-dd) are left for the date shift; fact tags ([F3]) and ID-n tokens are kept.
    """
    p = _patterns()
    not_names = p["not_names"]
    text = p["email"].sub("[EMAIL]", text)
    text = p["url"].sub("[URL]", text)
    text = p["ssn"].sub("[ID]", text)
    text = p["id_label"].sub(lambda m: f"{m.group(1)}{m.group(2)}[ID]", text)
    text = p["phone_label"].sub(lambda m: f"{m.group(1)}{m.group(2)}[PHONE]", text)
    text = p["phone"].sub(_phone, text)
    text = p["po_box"].sub("[ADDRESS]", text)
    text = p["street"].sub("[ADDRESS]", text)
    text = p["city_lead"].sub(
        lambda m: m.group(0) if not _name_part(m.group(2), not_names) else f"{m.group(1)}[ADDRESS]", text
    )
    text = p["address_lead"].sub(lambda m: f"{m.group(1)}{m.group(2)}[ADDRESS]", text)
    text = p["zip"].sub("[ADDRESS]", text)
    text = p["postcode"].sub("[ADDRESS]", text)
    text = p["long_date"].sub("[DATE]", text)
    text = p["id_mixed"].sub(lambda m: m.group(0) if re.fullmatch(r"ID-\d+", m.group(0)) else "[ID]", text)
    text = p["id_digits"].sub("[ID]", text)
    known = sorted({n.strip() for n in other_names if n and len(n.strip()) > 2}, key=len, reverse=True)
    parts = {part for n in known for part in re.split(r"[\s,]+", n) if len(part) > 2 and part[0].isupper()}
    parts -= not_names
    if known or parts:
        names_re = re.compile(r"\b(?:" + _alternation(list(known) + sorted(parts)) + r")\b")
        text = names_re.sub("[NAME]", text)

    def named(m: re.Match[str]) -> str:
        return f"{m.group(1)}{m.group(2)}[NAME]" if _name_part(m.group(3), not_names) else m.group(0)

    text = p["titled"].sub(named, text)
    text = p["related"].sub(named, text)
    text = p["lead_in"].sub(named, text)
    text = p["credentialed"].sub(
        lambda m: f"[NAME]{m.group(2)}" if _name_part(m.group(1), not_names) else m.group(0), text
    )
    text = p["given_family"].sub(
        lambda m: "[NAME]" if m.group(1) in p["given"] and m.group(3) not in not_names else m.group(0), text
    )
    return re.sub(r"\[NAME\](?:\s+\[NAME\])+", "[NAME]", text)


def chart_contacts(chart: Chart) -> dict[str, str]:
    """Addresses (lines, city, district, postal code), phone numbers, e-mails and other identifiers written in the
    chart's Patient, RelatedPerson and Person resources, each with the placeholder that replaces it."""
    found: dict[str, str] = {}
    kinds = ("Patient", "RelatedPerson", "Person")
    for ref, resource in chart.resources.items():
        if ref.split("/", 1)[0] not in kinds or not isinstance(resource, dict):
            continue
        for addr in resource.get("address") or [] if isinstance(resource.get("address"), list) else []:
            if not isinstance(addr, dict):
                continue
            lines = addr.get("line") if isinstance(addr.get("line"), list) else []
            for part in [*lines, addr.get("city"), addr.get("district"), addr.get("postalCode")]:
                if isinstance(part, str) and len(part.strip()) > 2:
                    found[part.strip()] = "[ADDRESS]"
        for tel in resource.get("telecom") or [] if isinstance(resource.get("telecom"), list) else []:
            if isinstance(tel, dict) and isinstance(tel.get("value"), str) and len(tel["value"].strip()) > 4:
                found[tel["value"].strip()] = "[EMAIL]" if tel.get("system") == "email" else "[PHONE]"
        for ident in resource.get("identifier") or [] if isinstance(resource.get("identifier"), list) else []:
            if (
                isinstance(ident, dict)
                and isinstance(ident.get("value"), str)
                and len(ident["value"].strip()) > 3
            ):
                found.setdefault(ident["value"].strip(), "[ID]")
    return found


def people_names(chart: Chart) -> tuple[str, ...]:
    """Names of people in the chart other than the patient: practitioners, related persons, note authors and the
    display text of every reference to one (requester, performer, author, participant)."""
    found: set[str] = {n.author for n in chart.notes if n.author}
    people = ("Practitioner", "PractitionerRole", "RelatedPerson", "Person")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("reference")
            if (
                isinstance(ref, str)
                and ref.split("/", 1)[0] in people
                and isinstance(node.get("display"), str)
            ):
                found.add(node["display"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for ref, resource in chart.resources.items():
        if ref.split("/", 1)[0] in people:
            for name in resource.get("name", []) if isinstance(resource.get("name"), list) else []:
                if isinstance(name, dict):
                    if isinstance(name.get("text"), str):
                        found.add(name["text"])
                    given = (
                        [g for g in name.get("given", []) if isinstance(g, str)]
                        if isinstance(name.get("given"), list)
                        else []
                    )
                    family = name.get("family") if isinstance(name.get("family"), str) else ""
                    found.add(" ".join([*given, family]).strip())
        walk(resource)
    patient = chart.patient.name or ""
    return tuple(sorted(n for n in found if n and n.strip() and n.strip() != patient.strip()))


_PROCESS_KEY = secrets.token_bytes(
    32
)  # date shifts differ per process, so they cannot be learned from outputs
_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::\d{2})?)?")
_TOKEN = re.compile(r"\bID-\d{3,}\b")
_SENTENCE_END = re.compile(r"(?<=[.!?\n])\s")


class Deidentifier:
    """Reversible for one chart: the same chart always maps to the same tokens and the same date shift."""

    def __init__(self, chart: Chart, *, key: bytes = _PROCESS_KEY) -> None:
        digest = hmac.new(key, chart.patient.ref.encode(), hashlib.sha256).digest()
        self.shift = timedelta(days=30 + int.from_bytes(digest[:4], "big") % 335)
        names = [
            part for part in re.split(r"[\s,]+", chart.patient.name) if len(part) > 1 and part[0].isalpha()
        ]
        self._names = sorted(set(names), key=len, reverse=True)
        identifiers = [chart.patient.mrn or "", chart.patient.ref.split("/", 1)[1]]
        identifiers += [ref.split("/", 1)[1] for ref in sorted(chart.fact_refs()) if "/" in ref]
        self._to_token: dict[str, str] = {}
        for ident in identifiers:
            if ident and len(ident) >= 4 and ident not in self._to_token:
                self._to_token[ident] = f"ID-{len(self._to_token) + 101}"
        self._from_token = {v: k for k, v in self._to_token.items()}
        ids = sorted(self._to_token, key=len, reverse=True)
        self._id_re = re.compile("|".join(re.escape(i) for i in ids)) if ids else None
        self._name_re = (
            re.compile(r"\b(" + "|".join(re.escape(n) for n in self._names) + r")\b", re.IGNORECASE)
            if self._names
            else None
        )
        self._others = people_names(chart)
        contacts = chart_contacts(chart)
        self._contacts_re = (
            re.compile(r"(?<!\w)(?:" + _alternation(contacts) + r")(?!\w)", re.IGNORECASE)
            if contacts
            else None
        )
        self._contacts = {k.lower(): v for k, v in contacts.items()}

    def _shift_dates(self, text: str, sign: int) -> str:
        def move(m: re.Match[str]) -> str:
            year, month, day, hour, minute = m.groups()
            try:
                when = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0))
            except ValueError:
                return m.group(0)
            when += sign * self.shift
            return when.strftime("%Y-%m-%d %H:%M" if hour else "%Y-%m-%d").replace(
                " ", m.group(0)[10] if hour else " "
            )

        return _DATE.sub(move, text)

    def apply(self, text: str) -> str:
        if self._id_re:
            text = self._id_re.sub(lambda m: self._to_token[m.group(0)], text)
        if self._name_re:
            text = re.sub(
                r"\[PATIENT\](?:\s+\[PATIENT\])+", "[PATIENT]", self._name_re.sub("[PATIENT]", text)
            )
        if (
            self._contacts_re
        ):  # the patient's and related persons' own addresses, phones and e-mails, verbatim
            text = self._contacts_re.sub(lambda m: self._contacts.get(m.group(0).lower(), "[ID]"), text)
        text = scrub_free_text(text, other_names=self._others)  # after the ids: chart refs stay reversible
        return self._shift_dates(text, -1)

    def reverse(self, text: str) -> str:
        text = _TOKEN.sub(lambda m: self._from_token.get(m.group(0), m.group(0)), text)
        text = text.replace("[PATIENT]", "the patient")
        for placeholder, words in PLACEHOLDERS.items():  # removed for good: the nurse reads what stood there
            text = text.replace(placeholder, words)
        return self._shift_dates(text, +1)


class DeidentifyingBackend(LlmBackend):
    """Wraps a remote backend for one chart: what leaves is de-identified, what comes back is re-identified."""

    def __init__(self, inner: LlmBackend, chart: Chart) -> None:
        self.inner = inner
        self.deid = Deidentifier(chart)
        self.name = inner.name
        self.model = inner.model

    @property
    def available(self) -> bool:
        return self.inner.available

    def outgoing(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        return [ChatMessage(m.role, self.deid.apply(m.content)) for m in messages]

    def stream(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatStream:
        inner = self.inner.stream(self.outgoing(messages), **kwargs)

        def reidentified() -> Generator[str, None, ChatResult]:
            pending = ""
            for delta in inner:
                pending += delta
                # Re-identify whole sentences only: a date or token may be split across deltas.
                parts = _SENTENCE_END.split(pending)
                for done in parts[:-1]:
                    yield self.deid.reverse(done) + " "
                pending = parts[-1]
            if pending:
                yield self.deid.reverse(pending)
            result = inner.result
            return replace(result, text=self.deid.reverse(result.text))

        return ChatStream(reidentified())

    def close(self) -> None:
        self.inner.close()


def for_chart(backend: LlmBackend, chart: Chart) -> LlmBackend:
    """The backend to use for one patient: wrapped in de-identification when its facts leave the machine
    (`make_backend` marks such a backend `requires_deid`). De-identification depends on the LLM interface,
    never the reverse."""
    if getattr(backend, "requires_deid", False):
        return DeidentifyingBackend(backend, chart)
    return backend

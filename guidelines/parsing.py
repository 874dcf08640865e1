"""Parse guideline files (Markdown with YAML front matter, HTML, PDF, DOCX, text) into headed sections."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from guidelines.errors import GuidelineFileError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
    ".txt": "text",
}


@dataclass
class Section:
    """A run of body text under one heading path; `page` is 1-based for paginated sources."""

    headings: tuple[str, ...]
    text: str
    page: int | None = None


@dataclass
class ParsedDocument:
    """A guideline document: identity and front matter plus its sections in reading order."""

    doc_id: str
    title: str
    source_file: str
    raw_hash: str
    version: str = ""
    last_reviewed: str = ""
    sources: list[dict[str, str]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    @property
    def word_count(self) -> int:
        return sum(len(s.text.split()) for s in self.sections)


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "document"


def parse_file(path: str | Path) -> ParsedDocument:
    """Parse one file by its suffix; raise GuidelineFileError naming the file when it can't be used."""
    p = Path(path)
    kind = SUPPORTED_SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise GuidelineFileError(
            p,
            f"unsupported file type {p.suffix or '(none)'!r}; use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}",
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise GuidelineFileError(
            p, f"cannot read file ({exc.strerror or exc}); check it exists and is readable"
        ) from exc
    if not raw.strip():
        raise GuidelineFileError(p, "file is empty; add guideline content or remove the file")
    parser = {
        "markdown": _parse_markdown,
        "html": _parse_html,
        "pdf": _parse_pdf,
        "docx": _parse_docx,
        "text": _parse_text,
    }[kind]
    try:
        doc = parser(p, raw)
    except GuidelineFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party parsers raise anything on corrupt input
        raise GuidelineFileError(
            p, f"cannot parse {kind} file ({type(exc).__name__}: {exc}); check the file is not corrupt"
        ) from exc
    doc.sections = [s for s in doc.sections if s.text.strip()]
    if not doc.sections:
        raise GuidelineFileError(p, f"no text found in {kind} file; scanned PDFs need OCR before ingestion")
    return doc


def _new_doc(p: Path, raw: bytes, title: str | None, meta: dict[str, Any] | None = None) -> ParsedDocument:
    meta = meta or {}
    title = str(meta.get("title") or title or p.stem.replace("_", " ").replace("-", " ").strip() or p.name)
    doc_id = str(meta.get("id") or slugify(p.stem))
    sources = []
    for src in meta.get("sources") or []:
        if isinstance(src, dict):
            sources.append({"title": str(src.get("title", "")), "url": str(src.get("url", ""))})
        else:
            sources.append({"title": str(src), "url": ""})
    return ParsedDocument(
        doc_id=doc_id,
        title=title,
        source_file=str(p.resolve()),
        raw_hash=hashlib.sha256(raw).hexdigest(),
        version=str(meta.get("version") or ""),
        last_reviewed=str(meta.get("last_reviewed") or ""),
        sources=sources,
        rules=[str(r) for r in _as_list(meta.get("rules"))],
        tags=[str(t) for t in _as_list(meta.get("tags"))],
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _decode(p: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GuidelineFileError(
            p, f"not valid UTF-8 text (byte {exc.start}); re-save the file as UTF-8"
        ) from exc


class _SectionBuilder:
    """Collects paragraphs under the current heading path."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.path: list[tuple[int, str]] = []
        self.buf: list[str] = []
        self.page: int | None = None

    def heading(self, level: int, text: str, page: int | None = None) -> None:
        self.flush()
        while self.path and self.path[-1][0] >= level:
            self.path.pop()
        self.path.append((level, text.strip()))
        if page is not None:
            self.page = page

    def text(self, text: str, page: int | None = None) -> None:
        if not text.strip():
            return
        if page is not None and page != self.page:
            # A section continuing on a new page starts a new Section so chunks keep the right page.
            self.flush()
            self.page = page
        self.buf.append(text.strip())

    def flush(self) -> None:
        if self.buf:
            self.sections.append(Section(tuple(h for _, h in self.path), "\n\n".join(self.buf), self.page))
        self.buf = []


_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _parse_markdown(p: Path, raw: bytes) -> ParsedDocument:
    text = _decode(p, raw)
    meta: dict[str, Any] = {}
    m = _FRONT_MATTER.match(text)
    if m:
        try:
            loaded = yaml.safe_load(m.group(1))
        except yaml.YAMLError as exc:
            raise GuidelineFileError(
                p, f"invalid YAML front matter ({exc}); fix the block between the --- lines"
            ) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise GuidelineFileError(p, "front matter must be a YAML mapping (key: value lines)")
        meta = loaded or {}
        text = text[m.end() :]
    builder = _SectionBuilder()
    title = None
    fenced = False
    para: list[str] = []

    def end_para() -> None:
        if para:
            builder.text("\n".join(para))
            para.clear()

    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            para.append(line)
            continue
        hm = None if fenced else _MD_HEADING.match(line)
        if hm:
            end_para()
            level, heading = len(hm.group(1)), hm.group(2).strip()
            if level == 1 and title is None:
                title = heading
            builder.heading(level, heading)
        elif not line.strip() and not fenced:
            end_para()
        else:
            para.append(line.rstrip())
    end_para()
    builder.flush()
    doc = _new_doc(p, raw, title, meta)
    doc.sections = _root_title(builder.sections, doc.title)
    return doc


def _root_title(sections: list[Section], title: str) -> list[Section]:
    """Make every heading path start with the document title."""
    out = []
    for s in sections:
        headings = s.headings if s.headings and s.headings[0] == title else (title, *s.headings)
        out.append(Section(headings, s.text, s.page))
    return out


def _parse_html(p: Path, raw: bytes) -> ParsedDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "nav", "header", "footer", "noscript", "template"]):
        tag.decompose()
    meta: dict[str, Any] = {}
    for m in soup.find_all("meta"):
        name = (m.get("name") or "").lower()
        if name in {"guideline-id", "version", "rules", "tags", "last_reviewed"} and m.get("content"):
            meta["id" if name == "guideline-id" else name] = m["content"]
    title_tag = soup.find("title")
    h1 = soup.find("h1")
    title = (h1.get_text(" ", strip=True) if h1 else None) or (
        title_tag.get_text(" ", strip=True) if title_tag else None
    )
    builder = _SectionBuilder()
    body = soup.body or soup
    block_tags = ["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "tr", "dt", "dd"]
    for el in body.find_all(block_tags):
        # Nested blocks (p inside li) are emitted by their innermost element only.
        if el.find(block_tags):
            continue
        txt = el.get_text(" ", strip=True)
        if not txt:
            continue
        if el.name[0] == "h" and el.name[1:].isdigit():
            builder.heading(int(el.name[1:]), txt)
        elif el.name == "li":
            builder.text(f"- {txt}")
        else:
            builder.text(txt)
    builder.flush()
    if not builder.sections:
        loose = body.get_text("\n", strip=True)
        if loose:
            builder.sections.append(Section((), loose))
    doc = _new_doc(p, raw, title, meta)
    doc.sections = _root_title(builder.sections, doc.title)
    return doc


_NUMBERED_HEADING = re.compile(r"^(\d+(?:\.\d+){0,3})\.?\s+([A-Z][^.!?:;]{1,80})$")


def _pdf_heading(line: str) -> tuple[int, str] | None:
    """Heuristic: numbered ('2.1 Monitoring') or short ALL-CAPS lines are headings; pypdf gives no styles."""
    s = line.strip()
    if not s or len(s.split()) > 12:
        return None
    m = _NUMBERED_HEADING.match(s)
    if m:
        return m.group(1).count(".") + 2, s
    letters = [c for c in s if c.isalpha()]
    if len(letters) >= 4 and all(c.isupper() for c in letters) and not s.endswith((".", ",")):
        return 2, s.title()
    return None


def _parse_pdf(p: Path, raw: bytes) -> ParsedDocument:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(raw), strict=False)
        if reader.is_encrypted:
            raise GuidelineFileError(p, "PDF is encrypted; save an unencrypted copy before ingestion")
        pages = [pg.extract_text() or "" for pg in reader.pages]
        info = reader.metadata or {}
    except PdfReadError as exc:
        raise GuidelineFileError(p, f"corrupt or unreadable PDF ({exc}); re-export the PDF") from exc
    title = str(info.get("/Title") or "").strip() or None
    builder = _SectionBuilder()
    for page_no, page_text in enumerate(pages, start=1):
        para: list[str] = []
        for line in page_text.splitlines():
            if title is None and line.strip():
                title = line.strip()
                continue
            if title is not None and line.strip() == title:
                continue
            h = _pdf_heading(line)
            if h:
                if para:
                    builder.text(" ".join(para), page_no)
                    para = []
                builder.heading(h[0], h[1], page_no)
            elif not line.strip():
                if para:
                    builder.text(" ".join(para), page_no)
                    para = []
            else:
                para.append(line.strip())
        if para:
            builder.text(" ".join(para), page_no)
    builder.flush()
    doc = _new_doc(p, raw, title, {"version": str(info.get("/Version") or "")} if info else None)
    doc.sections = _root_title(builder.sections, doc.title)
    return doc


def _parse_docx(p: Path, raw: bytes) -> ParsedDocument:
    import io
    import zipfile

    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(raw))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise GuidelineFileError(p, f"not a valid DOCX file ({exc}); re-save it from Word as .docx") from exc
    props = document.core_properties
    title = (props.title or "").strip() or None
    builder = _SectionBuilder()
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                cells = [c.text.strip() for c in row.cells]
                if any(cells):
                    builder.text(" | ".join(cells))
            continue
        text = block.text.strip()
        if not text:
            continue
        style = (block.style.name if block.style is not None else "") or ""
        if style == "Title":
            title = title or text
            continue
        m = re.match(r"Heading\s*(\d)", style)
        if m:
            level = int(m.group(1))
            if level == 1 and title is None:
                title = text
                continue
            builder.heading(level + 1, text)
        elif style.startswith("List"):
            builder.text(f"- {text}")
        else:
            builder.text(text)
    builder.flush()
    meta: dict[str, Any] = {}
    if props.revision:
        meta["version"] = str(props.revision)
    if props.identifier:
        meta["id"] = props.identifier
    if props.keywords:
        meta["tags"] = props.keywords
    doc = _new_doc(p, raw, title, meta)
    doc.sections = _root_title(builder.sections, doc.title)
    return doc


def _parse_text(p: Path, raw: bytes) -> ParsedDocument:
    text = _decode(p, raw)
    paras = [q.strip() for q in re.split(r"\n\s*\n", text) if q.strip()]
    title = None
    if paras and len(paras[0].split()) <= 15 and "\n" not in paras[0]:
        title = paras.pop(0)
    doc = _new_doc(p, raw, title)
    doc.sections = [Section((doc.title,), "\n\n".join(paras))] if paras else []
    return doc

"""Guideline parsing, chunking, store and idempotent ingestion (fast: hashing embedder, no model load)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from guidelines.chunking import ChunkParams, chunk_document
from guidelines.errors import GuidelineFileError
from guidelines.ingest import ingest
from guidelines.parsing import parse_file
from guidelines.retrieval import AbbreviationExpander, GuidelineRetriever, default_expander
from guidelines.store import ChromaGuidelineStore, InMemoryGuidelineStore, matches_where

FIXTURES = Path(__file__).parent / "data" / "guidelines_fixture"


class HashEmbedder:
    """Deterministic bag-of-words hashing embedder: fast stand-in for the real model in plumbing tests."""

    name = "hash-test"
    dimension = 256

    def __init__(self) -> None:
        self.calls = 0

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dimension, dtype=np.float32)
        for tok in re.findall(r"[a-z0-9]+", text.lower()):
            v[int(hashlib.md5(tok.encode()).hexdigest(), 16) % self.dimension] += 1.0  # noqa: S324
        n = np.linalg.norm(v)
        return v / n if n else v

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        self.calls += len(texts)
        return np.stack([self._vec(t) for t in texts]) if texts else np.zeros((0, self.dimension), np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self._vec(text)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    shutil.copytree(FIXTURES, d)
    return d


# ---------------------------------------------------------------- parsing


def test_markdown_front_matter_and_heading_paths():
    doc = parse_file(FIXTURES / "potassium.md")
    assert doc.doc_id == "fixture-potassium"
    assert doc.version == "1.0"
    assert doc.rules == ["hypokalemia-untreated", "kcl-rate"]
    assert doc.tags == ["electrolytes", "potassium"]
    assert doc.sources[0]["url"].startswith("https://www.ismp.org/")
    paths = [s.headings for s in doc.sections]
    assert paths[0] == ("Potassium replacement (fixture)",)
    assert ("Potassium replacement (fixture)", "Infusion rate", "Peripheral line") in paths
    assert ("Potassium replacement (fixture)", "Infusion rate", "Central line") in paths


def test_html_headings_and_lists(tmp_path: Path):
    f = tmp_path / "sepsis.html"
    f.write_text(
        "<html><head><title>ignored</title><script>var x=1;</script></head><body>"
        "<h1>Sepsis screening</h1><p>Screen every adult with a suspected infection.</p>"
        "<h2>Red flags</h2><ul><li>Systolic pressure 90 or below</li><li>New confusion</li></ul>"
        "<h3>Escalation</h3><p>Call the rapid response team within 15 minutes.</p></body></html>",
        encoding="utf-8",
    )
    doc = parse_file(f)
    assert doc.title == "Sepsis screening"
    by_path = {s.headings: s.text for s in doc.sections}
    assert "var x" not in " ".join(by_path.values())
    assert "- New confusion" in by_path[("Sepsis screening", "Red flags")]
    assert "rapid response" in by_path[("Sepsis screening", "Red flags", "Escalation")]


def test_pdf_keeps_page_numbers_and_numbered_headings(tmp_path: Path):
    fpdf = pytest.importorskip("fpdf")
    pdf = fpdf.FPDF()
    pdf.set_font("Helvetica", size=11)
    pdf.set_title("Falls prevention")
    pdf.add_page()
    pdf.multi_cell(
        0,
        6,
        "Falls prevention\n\n1 Risk assessment\n\nAssess every patient on admission "
        "using a validated tool and repeat after any fall.",
    )
    pdf.add_page()
    pdf.multi_cell(0, 6, "2 Interventions\n\nKeep the bed low and the call bell within reach at all times.")
    f = tmp_path / "falls.pdf"
    pdf.output(str(f))
    doc = parse_file(f)
    assert doc.title == "Falls prevention"
    sections = {s.headings[-1]: s for s in doc.sections}
    assert sections["1 Risk assessment"].page == 1
    assert sections["2 Interventions"].page == 2
    chunks = chunk_document(doc)
    assert {c.metadata["page"] for c in chunks} == {1, 2}


def test_docx_headings_from_styles(tmp_path: Path):
    docx = pytest.importorskip("docx")
    d = docx.Document()
    d.core_properties.title = "Pressure injury prevention"
    d.add_heading("Pressure injury prevention", level=1)
    d.add_paragraph("Skin inspection at least once per shift.")
    d.add_heading("Repositioning", level=2)
    d.add_paragraph("Reposition immobile patients every two hours.")
    d.add_heading("Heels", level=3)
    d.add_paragraph("Offload heels with a pillow under the calves.")
    f = tmp_path / "pressure.docx"
    d.save(str(f))
    doc = parse_file(f)
    assert doc.title == "Pressure injury prevention"
    paths = {s.headings: s.text for s in doc.sections}
    assert paths[("Pressure injury prevention",)].startswith("Skin inspection")
    assert "every two hours" in paths[("Pressure injury prevention", "Repositioning")]
    assert "calves" in paths[("Pressure injury prevention", "Repositioning", "Heels")]


def test_plain_text_title_and_body(tmp_path: Path):
    f = tmp_path / "hand_hygiene.txt"
    f.write_text("Hand hygiene\n\nClean hands before and after patient contact.\n\nUse soap when soiled.\n")
    doc = parse_file(f)
    assert doc.title == "Hand hygiene" and doc.doc_id == "hand-hygiene"
    assert "soap" in doc.sections[0].text


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("broken.pdf", b"%PDF-1.4\n garbage without xref", "pdf"),
        ("empty.md", b"   \n", "empty"),
        ("notes.xyz", b"hello", "unsupported file type"),
        ("latin1.txt", "café au lait".encode("latin-1") * 3, "UTF-8"),
        ("bad.docx", b"PK\x03\x04 not really a zip", "docx"),
        ("badyaml.md", b"---\nid: [unclosed\n---\n# T\n\ntext\n", "front matter"),
    ],
)
def test_bad_files_raise_typed_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes, fragment: str
):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(GuidelineFileError) as err:
        parse_file(f)
    assert name in str(err.value)
    assert fragment.lower() in str(err.value).lower()


def test_unreadable_path_is_a_file_error(tmp_path: Path):
    d = tmp_path / "folder.md"
    d.mkdir()
    with pytest.raises(GuidelineFileError, match="cannot read"):
        parse_file(d)


# ---------------------------------------------------------------- chunking


def test_chunks_are_bounded_overlapping_and_prefixed(tmp_path: Path):
    sentences = " ".join(f"Sentence number {i} describes one nursing check in detail." for i in range(90))
    f = tmp_path / "long.md"
    f.write_text(f"---\nid: long\nrules: [r1, r2]\n---\n# Long guide\n\n## Checks\n\n{sentences}\n")
    chunks = chunk_document(parse_file(f), ChunkParams())
    assert len(chunks) >= 3
    words = [len(c.text.split()) for c in chunks]
    assert all(120 <= w <= 250 for w in words), words
    # consecutive chunks share their boundary sentences
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.text.split(". ")[0] in a.text
    c0 = chunks[0]
    assert c0.chunk_id == "long#0" and c0.citation == "guideline:long#0"
    assert c0.embed_text.startswith("Long guide > Checks\n")
    meta = c0.metadata
    assert meta["section"] == "Checks" and meta["rules"] == "r1,r2" and meta["rule:r1"] is True
    for key in ("doc_id", "title", "section_path", "version", "source_file", "content_hash", "doc_hash"):
        assert key in meta
    # ids are stable across runs
    assert [c.chunk_id for c in chunk_document(parse_file(f))] == [c.chunk_id for c in chunks]


def test_sections_are_never_merged():
    chunks = chunk_document(parse_file(FIXTURES / "potassium.md"))
    assert [c.metadata["section"] for c in chunks] == [
        "Potassium replacement (fixture)",
        "Route",
        "Peripheral line",
        "Central line",
    ]


# ---------------------------------------------------------------- where filter / store


def test_matches_where_operators():
    m = {"doc_id": "a", "page": 3, "rule:x": True}
    assert matches_where({"doc_id": "a"}, m)
    assert matches_where({"$and": [{"doc_id": {"$in": ["a", "b"]}}, {"page": {"$gte": 3}}]}, m)
    assert not matches_where({"$or": [{"doc_id": "b"}, {"rule:y": True}]}, m)
    assert matches_where({"$or": [{"doc_id": "b"}, {"rule:x": True}]}, m)


# ---------------------------------------------------------------- ingestion


def test_ingest_is_idempotent(corpus: Path):
    store, emb = InMemoryGuidelineStore(), HashEmbedder()
    first = ingest([corpus], store, emb)
    assert sorted(first.added) == ["fixture-hypoglycemia", "fixture-potassium", "fixture-warfarin"]
    assert first.chunks_written == store.count() > 0
    rev, calls = store.revision(), emb.calls
    again = ingest([corpus], store, emb)
    assert again.added == [] and again.updated == [] and again.chunks_written == 0
    assert sorted(again.unchanged) == sorted(first.added)
    assert store.revision() == rev and emb.calls == calls


def test_changed_doc_replaces_its_chunks(corpus: Path):
    store, emb = InMemoryGuidelineStore(), HashEmbedder()
    ingest([corpus], store, emb)
    before = {c.chunk_id for c in store.iter_chunks() if c.metadata["doc_id"] == "fixture-potassium"}
    f = corpus / "potassium.md"
    text = f.read_text()
    f.write_text(
        text.split("## Infusion rate")[0] + "## Monitoring\n\nRecheck serum potassium after each dose.\n"
    )
    report = ingest([corpus], store, emb)
    assert report.updated == ["fixture-potassium"]
    assert sorted(report.unchanged) == ["fixture-hypoglycemia", "fixture-warfarin"]
    after = [c for c in store.iter_chunks() if c.metadata["doc_id"] == "fixture-potassium"]
    assert len(after) == 3 < len(before)
    assert not any("Central line" in c.metadata["section_path"] for c in after)
    assert any(c.metadata["section"] == "Monitoring" for c in after)


def test_prune_removes_docs_whose_source_disappeared(corpus: Path, tmp_path: Path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "extra.txt").write_text("Extra guide\n\nOnly here to check prune leaves other roots alone.\n")
    store, emb = InMemoryGuidelineStore(), HashEmbedder()
    ingest([corpus, other], store, emb)
    (corpus / "warfarin.md").unlink()
    kept = ingest([corpus], store, emb)  # without prune nothing is removed
    assert kept.removed == [] and "fixture-warfarin" in store.list_docs()
    pruned = ingest([corpus], store, emb, prune=True)
    assert pruned.removed == ["fixture-warfarin"]
    assert set(store.list_docs()) == {"fixture-potassium", "fixture-hypoglycemia", "extra"}
    assert not any(c.metadata["doc_id"] == "fixture-warfarin" for c in store.iter_chunks())


def test_bad_files_are_reported_and_the_rest_ingested(corpus: Path):
    (corpus / "corrupt.pdf").write_bytes(b"%PDF-1.7 truncated")
    (corpus / "blank.md").write_text("")
    (corpus / "weird.xyz").write_text("not picked up from a directory walk")
    store = InMemoryGuidelineStore()
    report = ingest([corpus, corpus / "weird.xyz", corpus / "missing.md"], store, HashEmbedder())
    failed = {Path(f).name for f, _ in report.errors}
    assert failed == {"corrupt.pdf", "blank.md", "weird.xyz", "missing.md"}
    assert len(report.added) == 3


def test_duplicate_doc_id_is_an_error(corpus: Path):
    (corpus / "copy.md").write_text((corpus / "glucose.md").read_text())
    report = ingest([corpus], InMemoryGuidelineStore(), HashEmbedder())
    assert len(report.errors) == 1 and "duplicate document id" in report.errors[0][1]


# ---------------------------------------------------------------- chroma persistent store


def test_persistent_store_survives_reopen(corpus: Path, tmp_path: Path):
    emb = HashEmbedder()
    path = tmp_path / "store"
    s1 = ChromaGuidelineStore(path, collection="test_guidelines")
    ingest([corpus], s1, emb)
    n = s1.count()
    assert s1.hnsw_configuration["space"] == "cosine"
    del s1
    s2 = ChromaGuidelineStore(path, collection="test_guidelines")
    assert s2.count() == n and set(s2.list_docs()) == {
        "fixture-potassium",
        "fixture-hypoglycemia",
        "fixture-warfarin",
    }
    stats = s2.stats()
    assert stats.documents == 3 and stats.chunks == n and stats.last_ingest
    hits = s2.query(emb.embed_query("peripheral line potassium bolus"), 2)
    assert hits[0].chunk_id == "fixture-potassium#2" and hits[0].score > 0.3
    # where filters on per-rule keys work in chroma too
    only = s2.query(emb.embed_query("potassium"), 5, where={"rule:warfarin-inr-high": True})
    assert only and {h.metadata["doc_id"] for h in only} == {"fixture-warfarin"}
    assert s2.get(["fixture-warfarin#1"])[0].metadata["section"] == "High results"
    assert ingest([corpus], s2, emb).chunks_written == 0


# ---------------------------------------------------------------- retrieval plumbing (hash embedder)


def test_rule_ids_put_linked_documents_first(corpus: Path):
    store, emb = InMemoryGuidelineStore(), HashEmbedder()
    ingest([corpus], store, emb)
    r = GuidelineRetriever(store, emb)
    plain = r.search("potassium infusion rate", k=3)
    assert plain[0].doc_id == "fixture-potassium"
    boosted = r.search("potassium infusion rate", k=3, rule_ids=["warfarin-inr-high"])
    assert boosted[0].doc_id == "fixture-warfarin" and boosted[0].rule_linked
    assert boosted[-1].doc_id == "fixture-potassium"


def test_filters_by_doc_and_tag(corpus: Path):
    store, emb = InMemoryGuidelineStore(), HashEmbedder()
    ingest([corpus], store, emb)
    r = GuidelineRetriever(store, emb)
    assert {h.doc_id for h in r.search("potassium", k=5, tags=["diabetes"])} == {"fixture-hypoglycemia"}
    assert {h.doc_id for h in r.search("glucose", k=5, doc_ids=["fixture-warfarin"])} == {"fixture-warfarin"}


def test_keyword_index_rebuilds_when_store_changes(corpus: Path, tmp_path: Path):
    store, emb = InMemoryGuidelineStore(), HashEmbedder()
    ingest([corpus], store, emb)
    r = GuidelineRetriever(store, emb)
    assert r.search("tracheostomy", k=3)[0].doc_id != "trach"
    extra = tmp_path / "trach"
    extra.mkdir()
    (extra / "trach.md").write_text(
        "---\nid: trach\n---\n# Tracheostomy care\n\n## Suction\n\nTracheostomy "
        "suction uses a sterile catheter.\n"
    )
    ingest([extra], store, emb)
    assert r.search("tracheostomy", k=3)[0].doc_id == "trach"


def test_abbreviation_expansion():
    exp = default_expander()
    assert "potassium" in exp.expand("K+ 3.1 on KCl")
    assert "potassium chloride" in exp.expand("KCl infusion")
    assert "blood glucose" in exp.expand("BG 3.2")
    assert "as needed" in exp.expand("PRN morphine")
    assert "heparin-induced thrombocytopenia" in exp.expand("suspected HIT")
    assert exp.expand("did the fall hit his head") == "did the fall hit his head"
    assert "National Early Warning Score" in exp.expand("NEWS2 of 7")
    custom = AbbreviationExpander({"XYZ": ["long form"]})
    assert custom.expand("xyz now") == "xyz now (long form)"


# ---------------------------------------------------------------- CLI


def test_cli_ingest_stats_search(corpus: Path, tmp_path: Path, monkeypatch, capsys):
    from guidelines import cli

    monkeypatch.setenv("NVA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NVA_CHROMA_HOST", raising=False)
    monkeypatch.setattr("guidelines.embedding.get_embedder", lambda *a, **k: HashEmbedder())
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4 nope")
    assert cli.main(["guidelines", "ingest", str(corpus)]) == 1  # one bad file -> non-zero, rest ingested
    out = capsys.readouterr().out
    assert "added 3" in out and "broken.pdf" in out
    assert cli.main(["guidelines", "stats", "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 3 and stats["chunks"] > 3
    assert cli.main(["guidelines", "search", "warfarin ratio above 5", "-k", "2", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["citation"].startswith("guideline:fixture-warfarin#")
    assert cli.main(["guidelines", "search", "warfarin", "-k", "1"]) == 0
    assert "[guideline:fixture-warfarin#" in capsys.readouterr().out
    assert (tmp_path / "data" / "guidelines").is_dir()

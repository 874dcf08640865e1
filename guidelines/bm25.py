"""Small Okapi BM25 keyword index over chunk texts (numpy postings, so 100k chunks stay fast)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be by for from has have how if in into is it its of on or that the their then there "
    "these this to was were what when where which while who why will with should must can do does after before "
    "per than any all not no".split()
)


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


class BM25Index:
    """Okapi BM25 with precomputed per-posting weights; search sums idf-weighted postings per query term."""

    def __init__(self, docs_tokens: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        self.n = len(docs_tokens)
        lengths = np.array([len(t) for t in docs_tokens], dtype=np.float32)
        avgdl = float(lengths.mean()) if self.n else 0.0
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for i, toks in enumerate(docs_tokens):
            for term, tf in Counter(toks).items():
                ids, tfs = postings.setdefault(term, ([], []))
                ids.append(i)
                tfs.append(tf)
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        norm = k1 * (1 - b + b * lengths / avgdl) if avgdl else np.ones_like(lengths)
        for term, (ids, tfs) in postings.items():
            ida = np.asarray(ids, dtype=np.int32)
            tfa = np.asarray(tfs, dtype=np.float32)
            df = len(ids)
            idf = math.log(1 + (self.n - df + 0.5) / (df + 0.5))
            self._postings[term] = (ida, (idf * tfa * (k1 + 1) / (tfa + norm[ida])).astype(np.float32))

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        for term in set(query_tokens):
            hit = self._postings.get(term)
            if hit is not None:
                out[hit[0]] += hit[1]
        return out

    def top(
        self, query_tokens: Sequence[str], k: int, mask: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """Indices and scores of the best `k` documents with a positive score (optionally within `mask`)."""
        if self.n == 0 or k <= 0:
            return []
        s = self.scores(query_tokens)
        if mask is not None:
            s = np.where(mask, s, 0.0)
        k = min(k, self.n)
        idx = np.argpartition(-s, k - 1)[:k]
        idx = idx[np.argsort(-s[idx], kind="stable")]
        return [(int(i), float(s[i])) for i in idx if s[i] > 0]

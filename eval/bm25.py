"""BM25, the paper's strongest classical baseline (it used Elasticsearch; we use bm25s)."""

from __future__ import annotations

import functools

import bm25s

from .data import LocoTask
from .metrics import Run

# Elasticsearch's defaults, which the paper's BM25 ran with.
K1, B = 1.2, 0.75


@functools.lru_cache(maxsize=1)
def _english_stemmer():
    import Stemmer  # PyStemmer: Snowball stemmers compiled from C

    return Stemmer.Stemmer("english")


class BM25Retriever:
    """Okapi BM25 (Lucene's variant, k1=1.2, b=0.75) over each task's own documents.

    Text is lower-cased, split into words of two or more letters or digits, English stop words are
    removed and words are reduced to their Snowball (Porter 2) English stems, close to the Elasticsearch
    English analyzer the paper used. Documents sharing no term with a query are not returned, as in
    Elasticsearch."""

    kind = "bm25"

    def __init__(self, label: str = "bm25", show_progress: bool = True):
        self.label = label
        self.show_progress = show_progress

    def describe(self) -> dict:
        return {"label": self.label, "kind": self.kind, "k1": K1, "b": B, "stopwords": "en", "stemming": "snowball-english",
                "implementation": f"bm25s {bm25s.__version__}"}

    def retrieve(self, task: LocoTask, top_k: int) -> Run:
        document_ids = list(task.documents)
        index = bm25s.BM25(k1=K1, b=B, method="lucene")
        index.index(self._terms(list(task.documents.values())), show_progress=self.show_progress)
        hits, scores = index.retrieve(self._terms(list(task.queries.values())), k=min(top_k, len(document_ids)),
                                      show_progress=self.show_progress)
        return {qid: {document_ids[d]: float(s) for d, s in zip(hits[row], scores[row]) if s > 0}
                for row, qid in enumerate(task.queries)}

    def _terms(self, texts: list[str]) -> list[list[str]]:
        # bm25s writes an empty text as the term "": drop it, so empty texts match nothing.
        tokenized = bm25s.tokenize(texts, stopwords="en", stemmer=_english_stemmer(), return_ids=False,
                                   show_progress=False)
        return [[term for term in terms if term] for terms in tokenized]

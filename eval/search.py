"""Exact cosine search of queries over a task's documents.

A document is one vector or several (its chunks, for the chunk-max protocol); its score is the best
cosine similarity over its vectors. `exact_search` scores blockwise (a block of queries against a
block of documents at a time) and keeps a running top-k, so memory stays bounded whatever the corpus
size. `faiss_search` does the same exact search through a FAISS flat index (optional dependency).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .metrics import Run


@dataclasses.dataclass(frozen=True)
class DocumentVectors:
    """Document embeddings: `vectors[starts[i]:starts[i+1]]` belong to `ids[i]` (one or more each)."""

    ids: list[str]
    vectors: np.ndarray
    starts: np.ndarray

    @classmethod
    def single(cls, ids: list[str], vectors: np.ndarray) -> DocumentVectors:
        """One vector per document."""
        return cls(ids, vectors, np.arange(len(ids) + 1))

    def __post_init__(self):
        if len(self.starts) != len(self.ids) + 1 or self.starts[-1] != len(self.vectors):
            raise ValueError("DocumentVectors: starts must have one entry per document plus the end")
        if np.any(np.diff(self.starts) < 1):
            raise ValueError("DocumentVectors: every document needs at least one vector")


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def exact_search(query_ids: list[str], queries: np.ndarray, documents: DocumentVectors, top_k: int = 100,
                 query_block: int = 1024, vector_block: int = 16384) -> Run:
    """The `top_k` documents of each query by cosine similarity (max over a document's vectors)."""
    top_k = min(top_k, len(documents.ids))
    queries = normalized(queries)
    vectors = normalized(documents.vectors)
    run: Run = {}
    for q_start in range(0, len(query_ids), query_block):
        block = queries[q_start:q_start + query_block]
        best_scores = np.full((len(block), 0), -np.inf, dtype=np.float32)
        best_docs = np.zeros((len(block), 0), dtype=np.int64)
        for d_start, d_end in _document_blocks(documents.starts, vector_block):
            v_start, v_end = documents.starts[d_start], documents.starts[d_end]
            similarities = block @ vectors[v_start:v_end].T
            # Max over each document's vectors: its vectors are contiguous, starting at these offsets.
            doc_scores = np.maximum.reduceat(similarities, documents.starts[d_start:d_end] - v_start, axis=1)
            best_scores = np.concatenate([best_scores, doc_scores], axis=1)
            best_docs = np.concatenate([best_docs, np.broadcast_to(np.arange(d_start, d_end), doc_scores.shape)], axis=1)
            if best_scores.shape[1] > top_k:
                keep = np.argpartition(-best_scores, top_k - 1, axis=1)[:, :top_k]
                best_scores = np.take_along_axis(best_scores, keep, axis=1)
                best_docs = np.take_along_axis(best_docs, keep, axis=1)
        for row, qid in enumerate(query_ids[q_start:q_start + query_block]):
            run[qid] = {documents.ids[d]: float(s) for d, s in zip(best_docs[row], best_scores[row])}
    return run


def _document_blocks(starts: np.ndarray, vector_block: int):
    """(first, end) document ranges holding about `vector_block` vectors each (at least one document)."""
    first, n_documents = 0, len(starts) - 1
    while first < n_documents:
        end = int(np.searchsorted(starts, starts[first] + vector_block, side="right")) - 1
        end = min(max(end, first + 1), n_documents)
        yield first, end
        first = end


def faiss_search(query_ids: list[str], queries: np.ndarray, documents: DocumentVectors, top_k: int = 100) -> Run:
    """Exact inner-product search on normalized vectors with a FAISS flat index (CPU).

    Multi-vector documents: a query's top `top_k * (most vectors of one document)` vectors always
    contain its top `top_k` documents, so the max over each document's retrieved vectors is exact."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("--search faiss needs the faiss extra: pip install 'm2-loco[faiss]'") from err
    top_k = min(top_k, len(documents.ids))
    vectors = normalized(documents.vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    most_vectors = int(np.diff(documents.starts).max())
    scores, positions = index.search(normalized(queries), min(len(vectors), top_k * most_vectors))
    owner = np.repeat(np.arange(len(documents.ids)), np.diff(documents.starts))
    run: Run = {}
    for row, qid in enumerate(query_ids):
        ranked: dict[str, float] = {}
        for score, position in zip(scores[row], positions[row]):
            doc = documents.ids[owner[position]]
            if doc not in ranked:  # scores come best first: the first hit of a document is its max
                ranked[doc] = float(score)
                if len(ranked) == top_k:
                    break
        run[qid] = ranked
    return run

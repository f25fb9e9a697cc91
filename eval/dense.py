"""Dense retrieval: a `model.encoders.TextEncoder` under a protocol, with cached embeddings."""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from .cache import EmbeddingCache, text_hash
from .data import LocoTask
from .metrics import Run
from .protocols import CHUNK_MEAN, Protocol
from .search import DocumentVectors, exact_search, faiss_search
from .sharding import Shard

SEARCHES = ("exact", "faiss")
# Texts encoded between two cache commits, in batches: an interruption loses at most this many.
BATCHES_PER_COMMIT = 8


@dataclasses.dataclass
class EmbeddingCounts:
    """How many distinct encoder inputs were embedded now and how many came from the cache."""

    embedded: int = 0
    cached: int = 0


class DenseRetriever:
    """Embeds a task's queries and documents (through the cache) and ranks by cosine similarity.

    `space` is the cache space id for this encoder and truncation length (see `eval.cache`)."""

    kind = "dense"

    def __init__(self, label: str, encoder, protocol: Protocol, cache: EmbeddingCache, space: str,
                 description: dict, batch_size: int = 16, search: str = "exact", show_progress: bool = True):
        if search not in SEARCHES:
            raise ValueError(f"unknown search {search!r}; expected one of {SEARCHES}")
        self.label = label
        self.encoder = encoder
        self.protocol = protocol
        self.cache = cache
        self.space = space
        self.description = description
        self.batch_size = batch_size
        self.search = search
        self.show_progress = show_progress
        self.counts = EmbeddingCounts()

    def describe(self) -> dict:
        return {"label": self.label, "kind": self.kind, "protocol": self.protocol.kind,
                "max_length": self.protocol.max_length, "query_prefix": self.protocol.query_prefix,
                "document_prefix": self.protocol.document_prefix, "batch_size": self.batch_size,
                "search": self.search, "cache_space": self.space, **self.description}

    def retrieve(self, task: LocoTask, top_k: int) -> Run:
        queries = self.embed_queries(task, list(task.queries))
        documents = self.embed_documents(task, list(task.documents))
        search = faiss_search if self.search == "faiss" else exact_search
        return search(list(task.queries), queries, documents, top_k)

    def embed_shard(self, task: LocoTask, shard: Shard) -> None:
        """Embed (into the cache) only the queries and documents this shard owns."""
        self.embed_queries(task, [qid for qid, text in task.queries.items() if shard.owns(text)])
        owned = [pid for pid, text in task.documents.items() if shard.owns(text)]
        self._embed([part for parts in self._document_inputs(task, owned) for part in parts],
                    f"{self.label} | {task.name} documents")

    def embed_queries(self, task: LocoTask, qids: list[str]) -> np.ndarray:
        inputs = [self.protocol.query_input(task.queries[qid]) for qid in qids]
        return self._embed(inputs, f"{self.label} | {task.name} queries")

    def embed_documents(self, task: LocoTask, pids: list[str]) -> DocumentVectors:
        inputs = self._document_inputs(task, pids)
        starts = np.concatenate([[0], np.cumsum([len(parts) for parts in inputs])])
        vectors = self._embed([part for parts in inputs for part in parts], f"{self.label} | {task.name} documents")
        if self.protocol.kind == CHUNK_MEAN:
            chunk_counts = np.diff(starts)[:, None]
            return DocumentVectors.single(pids, np.add.reduceat(vectors, starts[:-1], axis=0) / chunk_counts)
        return DocumentVectors(pids, vectors, starts)

    def _document_inputs(self, task: LocoTask, pids: list[str]) -> list[list[str]]:
        """Per document, the encoder inputs: the document, or its chunks."""
        passages = tqdm([task.documents[pid] for pid in pids], desc=f"chunk {task.name} documents",
                        disable=not (self.show_progress and self.protocol.chunked), leave=False)
        return [self.protocol.document_inputs(passage, self.encoder.tokenizer) for passage in passages]

    def _embed(self, inputs: list[str], description: str) -> np.ndarray:
        """Vectors for `inputs`, in order: from the cache, or encoded longest first and then cached."""
        hashes = [text_hash(text) for text in inputs]
        found = self.cache.lookup(self.space, hashes)
        missing = {key: text for key, text in zip(hashes, inputs) if key not in found}
        order = sorted(missing, key=lambda key: -len(missing[key]))
        group = self.batch_size * BATCHES_PER_COMMIT
        with tqdm(total=len(order), desc=f"embed {description}", unit="text",
                  disable=not self.show_progress or not order) as progress:
            for start in range(0, len(order), group):
                keys = order[start:start + group]
                vectors = self.encoder.encode([missing[key] for key in keys], batch_size=self.batch_size,
                                              max_length=self.protocol.max_length)
                self.cache.store(self.space, keys, vectors)
                found.update(zip(keys, vectors))
                progress.update(len(keys))
        self.counts.embedded += len(order)
        self.counts.cached += len(set(hashes)) - len(order)
        if not inputs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[key] for key in hashes]).astype(np.float32, copy=False)

"""Dense retrieval: a `model.encoders.TextEncoder` under a protocol, with cached embeddings."""

from __future__ import annotations

import dataclasses

import numpy as np
from tqdm.auto import tqdm

from .cache import EmbeddingCache, input_hash
from .data import LocoTask
from .metrics import Run
from .protocols import CHUNK_MEAN, EncoderInput, Protocol
from .search import DocumentVectors, exact_search, faiss_search
from .sharding import Shard
from .token_inputs import encode_token_ids

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
        owned = [text for text in task.documents.values() if shard.owns(text)]
        self.embed([part for parts in self.document_inputs(owned, task.name) for part in parts],
                   f"{self.label} | {task.name} documents")

    def embed_queries(self, task: LocoTask, qids: list[str]) -> np.ndarray:
        inputs = [self.protocol.query_input(task.queries[qid]) for qid in qids]
        return self.embed(inputs, f"{self.label} | {task.name} queries")

    def embed_documents(self, task: LocoTask, pids: list[str]) -> DocumentVectors:
        return self.embed_passages(pids, [task.documents[pid] for pid in pids], task.name)

    def embed_passages(self, ids: list[str], passages: list[str], name: str) -> DocumentVectors:
        """Vectors of documents under the protocol: one each (truncate, chunk-mean) or one per chunk."""
        inputs = self.document_inputs(passages, name)
        starts = np.concatenate([[0], np.cumsum([len(parts) for parts in inputs])])
        vectors = self.embed([part for parts in inputs for part in parts], f"{self.label} | {name} documents")
        if self.protocol.kind == CHUNK_MEAN:
            chunk_counts = np.diff(starts)[:, None]
            return DocumentVectors.single(ids, np.add.reduceat(vectors, starts[:-1], axis=0) / chunk_counts)
        return DocumentVectors(ids, vectors, starts)

    def document_inputs(self, passages: list[str], name: str) -> list[list[EncoderInput]]:
        """Per document, the encoder inputs: the document, or its chunks."""
        passages = tqdm(passages, desc=f"chunk {name} documents",
                        disable=not (self.show_progress and self.protocol.chunked), leave=False)
        return [self.protocol.document_inputs(passage, self.encoder.tokenizer) for passage in passages]

    def embed(self, inputs: list[EncoderInput], description: str) -> np.ndarray:
        """Vectors for `inputs` (texts, or chunks of token ids), in order: from the cache, or encoded
        longest first and then cached."""
        hashes = [input_hash(item) for item in inputs]
        found = self.cache.lookup(self.space, hashes)
        missing = {key: item for key, item in zip(hashes, inputs) if key not in found}
        order = sorted(missing, key=lambda key: -len(missing[key]))
        group = self.batch_size * BATCHES_PER_COMMIT
        with tqdm(total=len(order), desc=f"embed {description}", unit="text",
                  disable=not self.show_progress or not order) as progress:
            for start in range(0, len(order), group):
                keys = order[start:start + group]
                vectors = self._encode([missing[key] for key in keys])
                self.cache.store(self.space, keys, vectors)
                found.update(zip(keys, vectors))
                progress.update(len(keys))
        self.counts.embedded += len(order)
        self.counts.cached += len(set(hashes)) - len(order)
        if not inputs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[key] for key in hashes]).astype(np.float32, copy=False)

    def _encode(self, inputs: list[EncoderInput]) -> np.ndarray:
        """Texts through the encoder (it tokenizes and truncates); token-id chunks as they are."""
        if all(isinstance(item, str) for item in inputs):
            return self.encoder.encode(inputs, batch_size=self.batch_size, max_length=self.protocol.max_length)
        return encode_token_ids(self.encoder, inputs, batch_size=self.batch_size)

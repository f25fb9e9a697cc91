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

SEARCHES = ("exact", "faiss")
PREVIEW_CHARACTERS = 60
# Texts encoded between two cache commits, in batches: an interruption loses at most this many.
BATCHES_PER_COMMIT = 8


class NonFiniteEmbeddingError(ValueError):
    """An encoder gave a vector holding NaN or infinity."""


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
        inputs = self.document_inputs([task.documents[pid] for pid in owned], task.name)
        self.embed([part for parts in inputs for part in parts], task.name, "documents", _part_names(owned, inputs))

    def embed_queries(self, task: LocoTask, qids: list[str]) -> np.ndarray:
        return self.embed_query_texts([task.queries[qid] for qid in qids], task.name, qids)

    def embed_query_texts(self, texts: list[str], task_name: str, qids: list[str]) -> np.ndarray:
        """Vectors of queries (prefixed, truncated); `qids` name them in errors."""
        inputs = [self.protocol.query_input(text) for text in texts]
        return self.embed(inputs, task_name, "queries", [f"query {qid!r}" for qid in qids])

    def embed_documents(self, task: LocoTask, pids: list[str]) -> DocumentVectors:
        return self.embed_passages(pids, [task.documents[pid] for pid in pids], task.name)

    def embed_passages(self, ids: list[str], passages: list[str], name: str) -> DocumentVectors:
        """Vectors of documents under the protocol: one each (truncate, chunk-mean) or one per chunk."""
        inputs = self.document_inputs(passages, name)
        starts = np.concatenate([[0], np.cumsum([len(parts) for parts in inputs])])
        vectors = self.embed([part for parts in inputs for part in parts], name, "documents", _part_names(ids, inputs))
        if self.protocol.kind == CHUNK_MEAN:
            chunk_counts = np.diff(starts)[:, None]
            return DocumentVectors.single(ids, np.add.reduceat(vectors, starts[:-1], axis=0) / chunk_counts)
        return DocumentVectors(ids, vectors, starts)

    def document_inputs(self, passages: list[str], name: str) -> list[list[EncoderInput]]:
        """Per document, the encoder inputs: the document, or its chunks."""
        passages = tqdm(passages, desc=f"chunk {name} documents",
                        disable=not (self.show_progress and self.protocol.chunked), leave=False)
        return [self.protocol.document_inputs(passage, self.encoder.tokenizer) for passage in passages]

    def embed(self, inputs: list[EncoderInput], task_name: str, kind: str, names: list[str]) -> np.ndarray:
        """Vectors for `inputs` (texts, or chunks of token ids), in order: from the cache, or encoded
        longest first and then cached. `names[i]` says what input i is ("query 'q1'") in errors: a
        vector holding NaN or infinity is refused (`NonFiniteEmbeddingError`), and never cached."""
        hashes = [input_hash(item) for item in inputs]
        found = self.cache.lookup(self.space, hashes)
        missing = {key: item for key, item in zip(hashes, inputs) if key not in found}
        name_of = {}
        for key, name in zip(hashes, names):
            name_of.setdefault(key, name)
        order = sorted(missing, key=lambda key: -len(missing[key]))
        group = self.batch_size * BATCHES_PER_COMMIT
        with tqdm(total=len(order), desc=f"embed {self.label} | {task_name} {kind}", unit="text",
                  disable=not self.show_progress or not order) as progress:
            for start in range(0, len(order), group):
                keys = order[start:start + group]
                vectors = self._encode([missing[key] for key in keys])
                self._check_finite(vectors, [missing[key] for key in keys], [name_of[key] for key in keys], task_name)
                self.cache.store(self.space, keys, vectors)
                found.update(zip(keys, vectors))
                progress.update(len(keys))
        self.counts.embedded += len(order)
        self.counts.cached += len(set(hashes)) - len(order)
        if not inputs:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = np.stack([found[key] for key in hashes]).astype(np.float32, copy=False)
        self._check_finite(vectors, inputs, names, task_name)  # cached ones too (a cache written elsewhere)
        return vectors

    def _check_finite(self, vectors: np.ndarray, inputs: list[EncoderInput], names: list[str], task_name: str) -> None:
        """Refuse vectors holding NaN or infinity (an overflow, or broken weights): scored, they would
        give a plausible-looking but meaningless ranking. The error names the first such input."""
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if not len(bad):
            return
        first = int(bad[0])
        raise NonFiniteEmbeddingError(
            f"{self.label}: the embedding of task {task_name!r} {names[first]} ({_preview(inputs[first], self.encoder)}) "
            f"holds NaN or infinity ({len(bad)} of {len(inputs)} vectors in this batch do): the model's weights "
            "or its arithmetic overflow; it cannot be scored")

    def _encode(self, inputs: list[EncoderInput]) -> np.ndarray:
        """Texts through the encoder (it tokenizes and truncates); token-id chunks as they are."""
        if all(isinstance(item, str) for item in inputs):
            return self.encoder.encode(inputs, batch_size=self.batch_size, max_length=self.protocol.max_length)
        return self.encoder.encode_token_ids(inputs, batch_size=self.batch_size)


def _part_names(ids: list[str], inputs: list[list[EncoderInput]]) -> list[str]:
    """A name for every encoder input of some documents: `document 'd1'`, or `document 'd1' chunk 2/5`."""
    return [f"document {pid!r}" + (f" chunk {i + 1}/{len(parts)}" if len(parts) > 1 else "")
            for pid, parts in zip(ids, inputs) for i in range(len(parts))]


def _preview(item: EncoderInput, encoder) -> str:
    """The first characters of an encoder input (a chunk's token ids decoded), quoted."""
    text = item if isinstance(item, str) else encoder.tokenizer.decode(list(item[:PREVIEW_CHARACTERS]))
    return repr(text[:PREVIEW_CHARACTERS] + ("..." if len(text) > PREVIEW_CHARACTERS else ""))

"""Our models under mteb's evaluator: anything `eval.loco --model` accepts, as an mteb model.

    import mteb
    from eval.mteb_models import loco_model

    model = loco_model("runs/finetune-m2-32k/final")          # an M2 export (masked padding), truncated
    model = loco_model("/models/m2-bert-80M-32k-retrieval")   # the authors' checkpoint: reference padding
    model = loco_model("all-MiniLM-L6-v2:chunk-max")           # sentence-transformers / HF, any protocol
    model = loco_model("/models/e5-large-v2", protocol="chunk-mean", query_prefix="query: ",
                       document_prefix="passage: ")
    mteb.evaluate(model, mteb.get_tasks(tasks=["LEMBPasskeyRetrieval"]), encode_kwargs={"batch_size": 8})

`LocoEncoder` is mteb's `EncoderProtocol` (truncate and chunk-mean give one vector per text), so mteb
runs its own search and metrics over our vectors. `LocoChunkMaxSearch` is its `SearchProtocol` for
chunk-max, where a document scores its best chunk: a multi-vector search, ours (`eval.search`).
Both embed through `eval.dense.DenseRetriever`, so a text gets exactly the inputs it gets in
`eval.loco` (prefixes, token-span chunks, padding mode) and, given a `cache_dir`, the same embedding
cache: vectors `eval.loco` computed are reused, and the other way round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from model.encoders import MINILM_ALIASES

from .cache import EmbeddingCache
from .dense import DenseRetriever
from .models import BM25, ModelSpec, build_retriever
from .protocols import CHUNK_MAX
from .search import exact_search

MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def loco_model(model: str | ModelSpec, *, device: str | None = None, cache_dir=None, name: str | None = None,
               **options) -> LocoEncoder | LocoChunkMaxSearch:
    """An mteb model for `model` (`NAME[:PROTOCOL]` as in `eval.loco --model`, or a `ModelSpec`);
    `options` are `ModelSpec` fields (protocol, max_length, query_prefix, document_prefix, label,
    trust_remote_code). The model is checked and loaded as `eval.loco` does: a folder that would run
    code of its own is refused (PermissionError) unless `trust_remote_code=True`."""
    spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(model, **options)
    kind = LocoChunkMaxSearch if spec.protocol == CHUNK_MAX else LocoEncoder
    return kind(spec, device=device, cache_dir=cache_dir, name=name)


class _LocoModel:
    """Loading shared by both wrappers: the retriever (encoder, protocol, cache) and mteb's metadata."""

    def __init__(self, model_name: str | ModelSpec, revision: str | None = None, *, device: str | None = None,
                 cache_dir=None, name: str | None = None, **options: Any):
        spec = model_name if isinstance(model_name, ModelSpec) else ModelSpec.parse(model_name, **options)
        if spec.is_bm25:
            raise ValueError(f"{BM25} has nothing to embed; mteb has its own BM25 model (mteb.get_model('bm25s'))")
        spec.check_loadable()  # before the cache folder is made
        self.spec = spec
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache = EmbeddingCache(cache_dir)
        self.retriever: DenseRetriever = build_retriever(spec, self.cache, device, show_progress=False)
        self.mteb_model_meta = _model_meta(spec, self.retriever, name, revision)

    def _configure(self, encode_kwargs: dict) -> None:
        """mteb's encode kwargs: its batch size (it sets 32 unless told) and progress bars."""
        self.retriever.batch_size = int(encode_kwargs.get("batch_size") or self.retriever.batch_size)
        self.retriever.show_progress = bool(encode_kwargs.get("show_progress_bar", False))

    def _embed_queries(self, texts: list[str], task_name: str, ids: list[str] | None = None) -> np.ndarray:
        ids = ids if ids is not None else [f"#{i}" for i in range(len(texts))]  # mteb's encode() gives no ids
        return self.retriever.embed_query_texts(texts, task_name, ids)


class LocoEncoder(_LocoModel, AbsEncoder):
    """mteb's `EncoderProtocol` for the truncate and chunk-mean protocols: one vector per text.

    Queries (`PromptType.query`) get the query prefix and are truncated; everything else is a
    document under the protocol (document prefix, truncation or the mean of its chunks)."""

    def __init__(self, model_name: str | ModelSpec, revision: str | None = None, **kwargs: Any):
        super().__init__(model_name, revision, **kwargs)
        if self.spec.protocol == CHUNK_MAX:
            raise ValueError("chunk-max gives a document several vectors, which mteb's encoder protocol cannot "
                             "carry: use loco_model() or LocoChunkMaxSearch (retrieval tasks)")

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None,
               **kwargs: Any) -> np.ndarray:
        self._configure(kwargs)
        texts = [text for batch in inputs for text in batch["text"]]
        if prompt_type == PromptType.query:
            return self._embed_queries(texts, task_metadata.name)
        ids = [f"#{i}" for i in range(len(texts))]
        return self.retriever.embed_passages(ids, texts, task_metadata.name).vectors


class LocoChunkMaxSearch(_LocoModel):
    """mteb's `SearchProtocol` for chunk-max: each document embedded as its chunks, scored by its best
    chunk with `eval.search.exact_search` (exact cosine similarity). Retrieval tasks only."""

    def __init__(self, model_name: str | ModelSpec, revision: str | None = None, **kwargs: Any):
        super().__init__(model_name, revision, **kwargs)
        if self.spec.protocol != CHUNK_MAX:
            raise ValueError(f"LocoChunkMaxSearch is for chunk-max; {self.spec.protocol} is an encoder: LocoEncoder")
        self._documents = None

    def index(self, corpus, *, task_metadata, hf_split: str, hf_subset: str, encode_kwargs: dict,
              num_proc: int | None = None, **kwargs: Any) -> None:
        self._configure(encode_kwargs)
        texts = _texts(corpus, task_metadata, PromptType.document, num_proc)
        self._documents = self.retriever.embed_passages(list(corpus["id"]), texts, task_metadata.name)

    def search(self, queries, *, task_metadata, hf_split: str, hf_subset: str, top_k: int, encode_kwargs: dict,
               top_ranked=None, num_proc: int | None = None, **kwargs: Any) -> dict[str, dict[str, float]]:
        if self._documents is None:
            raise ValueError("index() the corpus before search()")
        if top_ranked is not None:
            raise ValueError("chunk-max reranking of given candidates is not supported (full-corpus retrieval only)")
        self._configure(encode_kwargs)
        qids = list(queries["id"])
        vectors = self._embed_queries(_texts(queries, task_metadata, PromptType.query, num_proc), task_metadata.name,
                                      qids)
        run = exact_search(qids, vectors, self._documents, top_k)
        self._documents = None
        return run


def _texts(dataset, task_metadata, prompt_type: PromptType, num_proc: int | None) -> list[str]:
    """The texts mteb gives an encoder for a corpus or queries dataset (a document's title joined to
    its text, a query's instruction, ...), read through mteb's own data loader."""
    from mteb._create_dataloaders import create_dataloader

    loader = create_dataloader(dataset, task_metadata=task_metadata, prompt_type=prompt_type, num_proc=num_proc)
    return [text for batch in loader for text in batch["text"]]


def _model_meta(spec: ModelSpec, retriever: DenseRetriever, name: str | None, revision: str | None) -> ModelMeta:
    """mteb's description of the model. The name is `organisation/model` (a local model: `local/<folder>`),
    the revision the fingerprint of its files, and the protocol settings are experiment parameters, so
    mteb's result cache keeps each model, version and protocol apart."""
    description = retriever.description
    if name is None:
        local = spec.labelled(None).removesuffix(f" ({spec.protocol})").replace("/", "--")
        name = MINILM_HUB_NAME if spec.name.lower() in MINILM_ALIASES else f"local/{local}"
    encoder = retriever.encoder
    experiment = {"protocol": retriever.protocol.kind, "max_length": retriever.protocol.max_length}
    if retriever.protocol.query_prefix or retriever.protocol.document_prefix:
        experiment.update(query_prefix=retriever.protocol.query_prefix,
                          document_prefix=retriever.protocol.document_prefix)
    if "padding_mode" in description:
        experiment["padding_mode"] = description["padding_mode"]
    uses_sentence_transformers = type(encoder).__name__ == "SentenceTransformerEncoder"
    return ModelMeta(
        loader=None, name=name, revision=revision or description["fingerprint"][:16], release_date=None,
        languages=None, n_parameters=sum(p.numel() for p in encoder.parameters()), memory_usage_mb=None,
        max_tokens=retriever.protocol.max_length, embed_dim=None, license=None, open_weights=True,
        public_training_code=None, public_training_data=None,
        framework=["PyTorch", "Sentence Transformers"] if uses_sentence_transformers else ["PyTorch"],
        similarity_fn_name="cosine", use_instructions=bool(retriever.protocol.query_prefix), training_datasets=None,
        experiment_kwargs=experiment)

"""Which models to evaluate, and how: model specs and the retrievers built from them.

A spec on the command line is `NAME[:PROTOCOL]`:
  * NAME: `bm25`, `all-MiniLM-L6-v2` (bundled, offline), or a local model directory: an M2-BERT
    checkpoint (ours, or the authors' released ones), a sentence-transformers model, or a Hugging Face
    encoder (mean-pooled);
  * PROTOCOL: `truncate` (default), `chunk-mean` or `chunk-max` (see `eval.protocols`).
A config file's `models:` entries take the same `model` and `protocol` plus `max_length`,
`query_prefix`, `document_prefix`, `label` and `batch_size`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from .bm25 import BM25Retriever
from .cache import EmbeddingCache, fingerprint_files, space_key
from .dense import DenseRetriever
from .protocols import PROTOCOLS, TRUNCATE, Protocol

logger = logging.getLogger(__name__)

BM25 = "bm25"
SPEC_KEYS = ("model", "protocol", "max_length", "query_prefix", "document_prefix", "label", "batch_size",
             "precision")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate and its protocol options (`None`: the model's or the run's default)."""

    name: str
    protocol: str = TRUNCATE
    max_length: int | None = None
    query_prefix: str = ""
    document_prefix: str = ""
    label: str | None = None
    batch_size: int | None = None
    precision: str | None = None

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"model {self.name!r}: unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}")
        if self.is_bm25 and (self.protocol != TRUNCATE or self.max_length or self.query_prefix or self.document_prefix
                             or self.precision):
            raise ValueError("bm25 takes no protocol, max_length, prefixes or precision")
        if self.precision is not None:
            from model.batching import check_encode_precision

            try:
                check_encode_precision(self.precision)
            except ValueError as error:
                raise ValueError(f"model {self.name!r}: {error}") from None

    @classmethod
    def parse(cls, text: str, **options) -> ModelSpec:
        """`NAME[:PROTOCOL]` (a `:suffix` that is not a protocol stays part of the name)."""
        name, _, suffix = text.rpartition(":")
        if name and suffix in PROTOCOLS:
            return cls(name=name, protocol=suffix, **options)
        return cls(name=text, **options)

    @classmethod
    def from_config(cls, entry: dict | str, where: str) -> ModelSpec:
        """A `models:` entry of a config file: a spec string or a mapping with `SPEC_KEYS`."""
        if isinstance(entry, str):
            return cls.parse(entry)
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{where}: a model entry must be a string or a mapping with a `model` key, got {entry!r}")
        unknown = sorted(set(entry) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"{where}: model entry {entry['model']!r} has unknown key(s) {unknown}; known: {SPEC_KEYS}")
        values = {key: value for key, value in entry.items() if key != "model" and value is not None}
        return cls.parse(str(entry["model"]), **values)

    @property
    def is_bm25(self) -> bool:
        return self.name.lower() == BM25

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        if self.is_bm25:
            return BM25
        options = [self.protocol] + ([str(self.max_length)] if self.max_length else []) + \
            ([self.precision] if self.precision else [])
        path = Path(self.name)
        # Training runs export to <run>/final: such models are known by their run's name.
        name = f"{path.parent.name}/{path.name}" if path.name == "final" and path.parent.name else path.name
        return f"{name} ({', '.join(options)})"


def build_retriever(spec: ModelSpec, cache: EmbeddingCache, device: torch.device, batch_size: int = 16,
                    search: str = "exact", show_progress: bool = True):
    """A `BM25Retriever` or a `DenseRetriever` (its encoder loaded on `device`) for `spec`."""
    if spec.is_bm25:
        return BM25Retriever(spec.display_name, show_progress=show_progress)
    from model.encoders import M2Encoder, load_encoder

    encoder = load_encoder(spec.name, max_length=spec.max_length, precision=spec.precision).to(device)
    max_length = spec.max_length or encoder.max_length
    if max_length > encoder.max_length:
        raise ValueError(f"model {spec.name!r} reads at most {encoder.max_length} tokens; max_length={max_length}")
    # Everything but the text that an embedding depends on: it names the cache space.
    identity = {"fingerprint": fingerprint_files(model_directory(spec.name)), "encoder": type(encoder).__name__,
                "max_length": max_length, "device": device.type}
    if spec.precision:
        identity["precision"] = spec.precision
    description = {"model": spec.name, **identity}
    if isinstance(encoder, M2Encoder):
        description["padding_mode"] = encoder.model.config.padding_mode
    space = space_key(identity)
    cache.register(space, description)
    protocol = Protocol(spec.protocol, max_length, spec.query_prefix, spec.document_prefix)
    logger.info("%s: %s on %s, protocol %s at %d tokens", spec.display_name, type(encoder).__name__, device,
                protocol.kind, max_length)
    return DenseRetriever(spec.display_name, encoder, protocol, cache, space, description,
                          batch_size=spec.batch_size or batch_size, search=search, show_progress=show_progress)


def model_directory(name: str) -> Path:
    """The directory a model name loads from (the bundled all-MiniLM-L6-v2 for its aliases)."""
    from model.encoders import MINILM_ALIASES, minilm_path

    return minilm_path() if name.lower() in MINILM_ALIASES else Path(name)

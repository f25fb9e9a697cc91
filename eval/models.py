"""Which models to evaluate, and how: model specs and the retrievers built from them.

A spec on the command line is `NAME[:PROTOCOL]`:
  * NAME: `bm25`, `all-MiniLM-L6-v2` (bundled, offline), or a local model directory: an M2-BERT
    checkpoint (ours, or the authors' released ones), a sentence-transformers model, or a Hugging Face
    encoder (mean-pooled);
  * PROTOCOL: `truncate` (default), `chunk-mean` or `chunk-max` (see `eval.protocols`).
A config file's `models:` entries take the same `model` and `protocol` plus `max_length`,
`query_prefix`, `document_prefix`, `label`, `batch_size` and `trust_remote_code`.

`ModelSpec.check_loadable` refuses, before any data is read or any model runs, a spec that cannot
load (an unknown name, a folder that is not a model, a bad M2 config, a folder that would run its own
code without `trust_remote_code`); `build_retriever` runs the same check before it loads anything.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from model.batching import check_encode_precision

from .bm25 import BM25Retriever
from .cache import EmbeddingCache, code_fingerprint, fingerprint_files, library_versions, space_key
from .dense import DenseRetriever
from .protocols import PROTOCOLS, TRUNCATE, Protocol

logger = logging.getLogger(__name__)

BM25 = "bm25"
# Libraries whose code computes a dense embedding (tokenizers and tensors); sentence-transformers models add theirs.
LIBRARIES = ("torch", "transformers", "tokenizers")
SPEC_KEYS = ("model", "protocol", "max_length", "query_prefix", "document_prefix", "label", "batch_size",
             "trust_remote_code", "precision")
MINILM = "all-MiniLM-L6-v2"
SPEC_FORMAT = f"a model is NAME[:PROTOCOL], NAME one of {BM25}, {MINILM} or a model directory, PROTOCOL one of " \
              f"{', '.join(PROTOCOLS)}"


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
    trust_remote_code: bool = False  # let a sentence-transformers / HF folder run code it ships or names
    precision: str | None = None  # encode() precision (model.batching.check_encode_precision); None: the model's

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model name must be a non-empty string, got {self.name!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"model {self.name!r}: unknown protocol {self.protocol!r}; expected one of "
                             f"{', '.join(PROTOCOLS)}")
        for key in ("max_length", "batch_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"model {self.name!r}: {key} must be a positive integer, got {value!r}")
        for key in ("query_prefix", "document_prefix", "label"):
            value = getattr(self, key)
            if not isinstance(value, str) and not (key == "label" and value is None):
                raise ValueError(f"model {self.name!r}: {key} must be a string, got {value!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"model {self.name!r}: trust_remote_code must be true or false, "
                             f"got {self.trust_remote_code!r}")
        if self.is_bm25 and (self.protocol != TRUNCATE or self.max_length or self.query_prefix or self.document_prefix
                             or self.trust_remote_code or self.precision):
            raise ValueError("bm25 takes no protocol, max_length, prefixes, trust_remote_code or precision")
        if self.precision is not None:
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
        try:
            return cls.parse(str(entry["model"]), **values)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def check_loadable(self) -> None:
        """Refuse (naming the model and why) a spec whose model cannot load, without loading it: a name
        that is neither bm25, the MiniLM alias nor a directory; a directory with neither config.json nor
        modules.json; an M2 checkpoint without weights, or whose config is invalid or shorter than
        `max_length`; a sentence-transformers or HF folder that would run code of its own (PermissionError)
        unless `trust_remote_code`. Reads a few small files: run it on every spec before any work starts."""
        if self.is_bm25:
            return
        from model.encoders import check_loadable

        check_loadable(self.name, self.max_length, self.trust_remote_code, known_names=SPEC_FORMAT)

    @property
    def is_bm25(self) -> bool:
        return self.name.lower() == BM25

    @property
    def display_name(self) -> str:
        """The label, with the length when it was given (`labelled` adds the model's own length)."""
        return self.labelled(self.max_length)

    def labelled(self, max_length: int | None) -> str:
        """`NAME (PROTOCOL, LENGTH)`, e.g. `all-MiniLM-L6-v2 (chunk-max, 256)`, unless given a `label`."""
        if self.label:
            return self.label
        if self.is_bm25:
            return BM25
        options = [self.protocol] + ([str(max_length)] if max_length else []) + \
            ([self.precision] if self.precision else [])
        path = Path(self.name)
        # Training runs export to <run>/final: such models are known by their run's name.
        name = f"{path.parent.name}/{path.name}" if path.name == "final" and path.parent.name else path.name
        return f"{name} ({', '.join(options)})"


def build_retriever(spec: ModelSpec, cache: EmbeddingCache, device: torch.device, batch_size: int = 16,
                    search: str = "exact", show_progress: bool = True):
    """A `BM25Retriever` or a `DenseRetriever` (its encoder loaded on `device`) for `spec`."""
    spec.check_loadable()
    if spec.is_bm25:
        return BM25Retriever(spec.display_name, show_progress=show_progress)
    from model.encoders import M2Encoder, load_encoder

    encoder = load_encoder(spec.name, max_length=spec.max_length, precision=spec.precision,
                           trust_remote_code=spec.trust_remote_code).to(device)
    max_length = spec.max_length or encoder.max_length
    if max_length > encoder.max_length:
        raise ValueError(f"model {spec.name!r} reads at most {encoder.max_length} tokens; max_length={max_length}")
    # Everything but the text that an embedding depends on: it names the cache space. The model's files,
    # the code that runs them (ours and the libraries') and the arithmetic (device kind).
    libraries = LIBRARIES if isinstance(encoder, M2Encoder) else (*LIBRARIES, "sentence-transformers")
    identity = {"fingerprint": fingerprint_files(model_directory(spec.name)), "encoder": type(encoder).__name__,
                "code": code_fingerprint(), "libraries": library_versions(libraries),
                "max_length": max_length, "device": device.type}
    if spec.precision:
        identity["precision"] = spec.precision
    description = {"model": spec.name, **identity}
    if spec.trust_remote_code:
        description["trust_remote_code"] = True
    if isinstance(encoder, M2Encoder):
        description["padding_mode"] = encoder.model.config.padding_mode
    space = space_key(identity)
    cache.register(space, description)
    protocol = Protocol(spec.protocol, max_length, spec.query_prefix, spec.document_prefix)
    label = spec.labelled(max_length)
    logger.info("%s: %s on %s, protocol %s at %d tokens", label, type(encoder).__name__, device,
                protocol.kind, max_length)
    return DenseRetriever(label, encoder, protocol, cache, space, description,
                          batch_size=spec.batch_size or batch_size, search=search, show_progress=show_progress)


def model_directory(name: str) -> Path:
    """The directory a model name loads from (the bundled all-MiniLM-L6-v2 for its aliases)."""
    from model.encoders import MINILM_ALIASES, minilm_path

    return minilm_path() if name.lower() in MINILM_ALIASES else Path(name)

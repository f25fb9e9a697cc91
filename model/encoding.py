"""Batched text embedding with an M2-BERT encoder, in either padding mode."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .tokenizer import load_tokenizer

# Masked-mode batches are padded to a multiple of this: keeps shapes (and FFT plans) few.
PAD_MULTIPLE = 64


def padded_length(longest: int, max_length: int) -> int:
    """Length a masked-mode batch is padded to: the longest text rounded up, never past the model length."""
    return min(max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def encode_texts(model, texts, batch_size: int = 16, max_length: int | None = None, tokenizer=None,
                 show_progress_bar: bool = False) -> np.ndarray:
    """(N, H) float32 pooler outputs of `model` (an M2BertModel) for `texts`, in input order."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, not a single string")
    config = model.config
    model_length = config.max_position_embeddings
    max_length = model_length if max_length is None else max_length
    if max_length > model_length:
        raise ValueError(f"max_length {max_length} exceeds the model's maximum length {model_length}")
    tokenizer = tokenizer or load_tokenizer()
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True,
                    return_attention_mask=False)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: memory peaks early
    out = np.empty((len(ids), config.hidden_size), dtype=np.float32)
    was_training = model.training
    model.eval()
    device = model.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        for start in tqdm(range(0, len(ids), batch_size), desc="encode", disable=not show_progress_bar):
            index = order[start:start + batch_size]
            batch = [ids[i] for i in index]
            width = model_length if config.padding_mode == "reference" else padded_length(len(batch[0]), model_length)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)  # [PAD] = 0
            attention_mask = torch.zeros_like(input_ids)
            for row, tokens in enumerate(batch):
                input_ids[row, :len(tokens)] = torch.tensor(tokens)
                attention_mask[row, :len(tokens)] = 1
            with autocast:
                pooled = model(input_ids.to(device), attention_mask.to(device)).pooler_output
            out[index] = pooled.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out

"""Batched, gradient-free embedding of many texts: the loop behind every `encode()` of the package.

`M2BertModel.encode` and every `model.encoders.TextEncoder.encode` run the same loop: texts sorted longest
first (by characters), so that batches hold similar lengths and memory peaks at the start; the module in
eval mode without gradients (restored afterwards); bf16 autocast on CUDA; embeddings returned in input order.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

# Masked-mode M2 batches are padded to a multiple of this: keeps shapes (and FFT plans) few.
PAD_MULTIPLE = 64


def padded_length(longest: int, model_length: int) -> int:
    """Length a masked-mode batch is padded to: the longest text rounded up, never past the model's."""
    return min(model_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


@torch.no_grad()
def encode_in_batches(module: torch.nn.Module, embed: Callable[[list[str]], torch.Tensor], texts: list[str],
                      batch_size: int, show_progress_bar: bool = False, description: str = "encode") -> np.ndarray:
    """(N, D) float32 embeddings of `texts` in input order; `embed(batch)` gives a batch's (B, D) tensor
    and `module` is what it runs (put in eval mode for the loop)."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, not a single string")
    order = np.argsort([-len(t) for t in texts], kind="stable")
    chunks = []
    was_training = module.training
    module.eval()
    device_type = next(module.parameters()).device.type
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device_type == "cuda")
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=description, disable=not show_progress_bar):
            batch = [texts[i] for i in order[start:start + batch_size]]
            with autocast:
                chunks.append(embed(batch).float().cpu().numpy())
    finally:
        module.train(was_training)
    out = np.empty((len(texts), chunks[0].shape[1] if chunks else 0), dtype=np.float32)
    if chunks:
        out[order] = np.concatenate(chunks)
    return out

"""Batched, gradient-free embedding of many texts: the loop behind every `encode()` of the package.

`M2BertModel.encode` and every `model.encoders.TextEncoder.encode` (and `encode_token_ids`, for texts already
cut into token-id spans) run the same loop: inputs checked before any work (a list of strings, or of token-id
sequences); inputs sorted longest first (texts by characters, spans by tokens) and cut into batches of similar
lengths, so that a masked-mode batch is padded little and memory peaks at the start; the module in eval mode
without gradients (restored afterwards); a progress bar with documents/s and tokens/s and a closing summary
in the log; embeddings returned in input order, identical to embedding each text alone (masked mode).

Precision (`ENCODE_PRECISIONS`): `None` is the device's default, bf16 autocast on CUDA (as training
evaluates) and fp32 on CPU; on CPU, `bf16` runs the GEMMs in bfloat16 (see `model.cpu_ops`). The CPU path's
int8 GEMMs are measured (bench/encode.py) but not offered here: they miss the fidelity bound.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

# Masked-mode batches are padded to at most 1/16 more than their longest text (and to a multiple of 8):
# about 16 widths per octave, so that FFT plans and GEMM kernels are reused across batches.
WIDTHS_PER_OCTAVE = 16
MIN_PAD_MULTIPLE = 8

ENCODE_PRECISIONS = ("fp32", "bf16")
NOT_OFFERED = {"int8": "precision 'int8' is not offered: dynamic int8 GEMMs keep all-MiniLM-L6-v2's embeddings of "
                       "the QMSum texts only to cosine ~0.99 of fp32 (the bound is 0.999) and are no faster than "
                       "bf16 on CPUs with bfloat16 units (docs/serving.md); use bf16"}


def padded_length(longest: int, model_length: int) -> int:
    """Width a masked-mode batch is padded to: the longest text rounded up to a multiple of
    max(8, 2^floor(log2 longest) / 16), never past the model's length."""
    step = max(MIN_PAD_MULTIPLE, (1 << max(longest.bit_length() - 1, 0)) // WIDTHS_PER_OCTAVE)
    return min(model_length, -(-longest // step) * step)


def check_texts(texts) -> list[str]:
    """`texts` as a list of strings, or a TypeError naming the first entry that is not one."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, not a single string")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"encode(): texts[{index}] is {type(text).__name__}, not str")
    return texts


def check_token_ids(chunks) -> list[tuple[int, ...]]:
    """`chunks` as a list of token-id tuples, or a TypeError naming the first entry that is not a sequence of
    ints."""
    checked = []
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, (str, bytes)) or not all(isinstance(i, (int, np.integer)) for i in chunk):
            raise TypeError(f"encode_token_ids(): chunks[{index}] is not a sequence of token ids")
        checked.append(tuple(int(i) for i in chunk))
    return checked


def pad_rows(rows: list[list[int]], width: int, pad_token_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` (B, width) holding each row of token ids, padded on the right (or the
    left) with `pad_token_id`."""
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, W)
    attention_mask = torch.zeros_like(input_ids)  # (B, W)
    for row, ids in enumerate(rows):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def check_encode_precision(precision: str | None) -> str | None:
    """`precision` if encode() offers it (None: the device's default), else a ValueError saying why not."""
    if precision in NOT_OFFERED:
        raise ValueError(NOT_OFFERED[precision])
    if precision is not None and precision not in ENCODE_PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {ENCODE_PRECISIONS}")
    return precision


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision an encode() on `device` runs in (None: bf16 on CUDA, fp32 elsewhere)."""
    if check_encode_precision(precision) is None:
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@torch.no_grad()
def encode_in_batches(module: torch.nn.Module, tokenize: Callable[[list], dict],
                      forward: Callable[[dict, str], torch.Tensor], texts: list, batch_size: int, width: int,
                      show_progress_bar: bool = False, description: str = "encode",
                      precision: str | None = None) -> np.ndarray:
    """(N, width) float32 embeddings of `texts` in input order (strings or token-id tuples, as `check_texts` or
    `check_token_ids` returns them): `tokenize(batch)` gives a batch's features (with an `attention_mask`,
    which counts its tokens) and `forward(features, precision)` its (B, width) embeddings; `module` is what
    they run (put in eval mode for the loop)."""
    if batch_size < 1:
        raise ValueError(f"encode(): batch_size must be at least 1, got {batch_size}")
    device = next(module.parameters()).device
    precision = resolve_precision(precision, device)
    out = np.empty((len(texts), width), dtype=np.float32)
    if not texts:
        return out
    order = np.argsort([-len(t) for t in texts], kind="stable")
    was_training = module.training
    module.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and precision == "bf16")
    tokens = 0
    start = time.perf_counter()
    progress = tqdm(total=len(texts), desc=description, unit="doc", disable=not show_progress_bar)
    try:
        for first in range(0, len(texts), batch_size):
            rows = order[first:first + batch_size]
            features = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                        for k, v in tokenize([texts[i] for i in rows]).items()}
            with autocast:
                out[rows] = forward(features, precision).float().cpu().numpy()
            tokens += int(features["attention_mask"].sum())
            progress.update(len(rows))
            seconds = time.perf_counter() - start
            progress.set_postfix(tok_s=f"{tokens / seconds:.0f}", refresh=False)
    finally:
        progress.close()
        module.train(was_training)
    seconds = time.perf_counter() - start
    logger.info("%s: %d texts, %d tokens in %.2f s (%.2f texts/s, %.0f tokens/s, %s)", description, len(texts),
                tokens, seconds, len(texts) / seconds, tokens / seconds, precision)
    return out


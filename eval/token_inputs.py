"""Embedding chunks given as token ids: the model inputs each kind of encoder expects, built from ids.

`model.encoders.TextEncoder.encode` takes texts. A chunk is a span of a document's token ids
(`eval.protocols`), so it is given to the model as ids: special tokens added by the tokenizer's own
rule, padded as the encoder pads (M2 `reference` mode: to the model's full length; otherwise to the
batch's longest, on the tokenizer's padding side).
"""

from __future__ import annotations

import numpy as np
import torch


def token_id_features(encoder, chunks: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` (B, L) for chunks of token ids (without special tokens)."""
    from model.batching import padded_length
    from model.encoders import M2Encoder

    tokenizer = encoder.tokenizer
    rows = [tokenizer.build_inputs_with_special_tokens(list(ids)) for ids in chunks]
    longest = max(len(row) for row in rows)
    if longest > encoder.max_length:
        raise ValueError(f"a chunk of {longest} tokens (special tokens included) is longer than the "
                         f"{encoder.max_length} tokens {encoder.name} reads")
    if isinstance(encoder, M2Encoder):
        reference = encoder.model.config.padding_mode == "reference"
        width = encoder.max_length if reference else padded_length(longest, encoder.max_length)
    else:
        width = longest
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for row, ids in enumerate(rows):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def encode_token_ids(encoder, chunks: list[tuple[int, ...]], batch_size: int = 16) -> np.ndarray:
    """(N, D) float32 embeddings of token-id chunks in input order, batched longest first (as
    `TextEncoder.encode` batches texts), under bf16 autocast on CUDA."""
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    order = np.argsort([-len(chunk) for chunk in chunks], kind="stable")
    was_training = encoder.training
    encoder.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=encoder.device.type == "cuda")
    batches = []
    try:
        for start in range(0, len(chunks), batch_size):
            features = token_id_features(encoder, [chunks[i] for i in order[start:start + batch_size]])
            with autocast:
                batches.append(encoder({k: v.to(encoder.device) for k, v in features.items()}).float().cpu().numpy())
    finally:
        encoder.train(was_training)
    vectors = np.empty((len(chunks), batches[0].shape[1]), dtype=np.float32)
    vectors[order] = np.concatenate(batches)
    return vectors

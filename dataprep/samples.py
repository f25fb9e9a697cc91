"""Training samples from token ids: natural-length documents and documents packed to the full length.

Both kinds are `[CLS] ... [SEP]`. A natural sample is one document (or, for a document longer than the
sequence, each of its successive chunks). Concatenated samples are cut from the documents joined by
`[SEP]` and are exactly `seq_len` long; the tail that does not fill a last sample is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .manifest import SPECIAL_TOKENS

TOKEN_DTYPE = np.uint16   # bert-base-uncased has 30,522 ids
CLS = np.array([SPECIAL_TOKENS["cls"]], dtype=TOKEN_DTYPE)
SEP = np.array([SPECIAL_TOKENS["sep"]], dtype=TOKEN_DTYPE)


def natural_samples(documents: Sequence[np.ndarray], seq_len: int, min_tokens: int) -> Iterator[np.ndarray]:
    """`[CLS] chunk [SEP]` for each `seq_len - 2` token chunk of each document, in order.

    A document's later chunks are kept when they have at least `min_tokens` tokens; its first chunk always
    is (documents shorter than `min_tokens` are filtered out before this).
    """
    body = seq_len - 2
    for ids in documents:
        for start in range(0, len(ids), body):
            chunk = ids[start:start + body]
            if start == 0 or len(chunk) >= min_tokens:
                yield np.concatenate([CLS, chunk, SEP])


def concatenated_samples(documents: Sequence[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Exactly `seq_len`-long samples cut from the documents joined by `[SEP]`, in order."""
    if not documents:
        return
    body = seq_len - 2
    parts = [part for ids in documents for part in (SEP, ids)][1:]
    joined = np.concatenate(parts)  # (n_tokens + n_documents - 1,)
    for start in range(0, len(joined) - body + 1, body):
        yield np.concatenate([CLS, joined[start:start + body], SEP])

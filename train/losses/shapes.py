"""Input checks shared by the losses: errors that name the argument and the shape expected."""

from __future__ import annotations

import torch


def check_pairs(queries: torch.Tensor, others: torch.Tensor, name: str) -> None:
    """`queries` is (B, D) with B >= 1 and `others` (called `name` in errors) has the same shape."""
    if queries.dim() != 2 or queries.shape[0] == 0:
        raise ValueError(f"query_embeddings must have shape (B, D) with B >= 1, got {tuple(queries.shape)}")
    if others.shape != queries.shape:
        raise ValueError(f"{name} must match query_embeddings' shape {tuple(queries.shape)}, "
                         f"got {tuple(others.shape)}")


def check_negatives(queries: torch.Tensor, negatives: torch.Tensor) -> None:
    if negatives.dim() != 2 or negatives.shape[1] != queries.shape[1]:
        raise ValueError(f"negative_embeddings must have shape (M, {queries.shape[1]}), got {tuple(negatives.shape)}")


def check_ids(ids: torch.Tensor | None, rows: int, name: str) -> None:
    """Document ids, when given, are one integer per row of the embeddings they label."""
    if ids is not None and (ids.shape != (rows,) or ids.dtype.is_floating_point):
        raise ValueError(f"{name} must be {rows} integer ids, got {tuple(ids.shape)} {ids.dtype}")

"""The multiple negatives ranking loss (in-batch and given negatives), on embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shapes import check_ids, check_negatives, check_pairs


class MultipleNegativesRankingLoss(nn.Module):
    """Multiple negatives ranking loss (MNRL): the contrastive baseline of the paper's loss comparison.

    Henderson et al., "Efficient Natural Language Response Suggestion for Smart Reply" (2017), as used by
    sentence-transformers and compared with OPL in Saad-Falcon et al. (ICML 2024), Table 8 (MNRL at batch
    size 2 against OPL at batch size 1). Each query must pick its own positive among every candidate of
    the batch, the other queries' positives (in-batch negatives) and all given negatives:

        scores = scale * cos(q_i, c_j) over candidates c = [positives; negatives]
        loss   = mean_i cross_entropy(scores_i, target = i)

    With document ids, a candidate that is the query's own positive document again (the same document
    as another query's positive, or drawn as another query's negative) is left out of that query's
    scores instead of being pushed away: on a small corpus a batch of 32 often holds such duplicates.

    Unlike OPL the whole batch must be embedded at once, so memory grows with batch size and negatives;
    at 32k tokens that limits it to a couple of examples per step (`CachedMultipleNegativesRankingLoss`
    computes the same loss in the memory of one mini-batch).

    Inputs:
        query_embeddings:    (B, D)
        positive_embeddings: (B, D), row i relevant to query i
        negative_embeddings: (M, D) or None, irrelevant to every query (e.g. one hard negative per query)
        positive_ids:        (B,) integer document ids, or None (no duplicate is left out)
        negative_ids:        (M,) integer document ids, or None
    Returns the mean over the B queries (a scalar).

    Example:
        >>> loss_fn = MultipleNegativesRankingLoss(scale=20.0)
        >>> q = encoder.embed(queries)               # 2 queries
        >>> p = encoder.embed(positive_documents)    # their 2 relevant documents
        >>> n = encoder.embed(negative_documents)    # e.g. one random negative each
        >>> loss_fn(q, p, n).backward()
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale

    def forward(self, query_embeddings: torch.Tensor, positive_embeddings: torch.Tensor,
                negative_embeddings: torch.Tensor | None = None, positive_ids: torch.Tensor | None = None,
                negative_ids: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(query_embeddings, positive_embeddings, negative_embeddings, positive_ids, negative_ids)
        return ranking_loss(query_embeddings, positive_embeddings, negative_embeddings, self.scale, positive_ids,
                            negative_ids)


def check_inputs(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                 positive_ids: torch.Tensor | None, negative_ids: torch.Tensor | None) -> None:
    check_pairs(queries, positives, "positive_embeddings")
    if negatives is not None:
        check_negatives(queries, negatives)
    check_ids(positive_ids, queries.shape[0], "positive_ids")
    if negative_ids is not None and negatives is None:
        raise ValueError("negative_ids were given without negative_embeddings")
    if negatives is not None:
        check_ids(negative_ids, negatives.shape[0], "negative_ids")
    if (positive_ids is None) != (negative_ids is None) and negatives is not None:
        raise ValueError("give ids for both positives and negatives, or for neither")


def ranking_loss(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None, scale: float,
                 positive_ids: torch.Tensor | None = None, negative_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The MNRL of checked inputs (shapes as `MultipleNegativesRankingLoss`), in float32."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])  # (B + M, D)
    queries = F.normalize(queries.float(), dim=-1)
    scores = scale * queries @ F.normalize(candidates.float(), dim=-1).T  # (B, B + M)
    targets = torch.arange(queries.shape[0], device=scores.device)
    if positive_ids is not None:
        candidate_ids = positive_ids if negatives is None else torch.cat([positive_ids, negative_ids])
        duplicate = candidate_ids.to(scores.device)[None, :] == positive_ids.to(scores.device)[:, None]  # (B, B + M)
        duplicate[targets, targets] = False  # the target itself stays
        scores = scores.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(scores, targets)

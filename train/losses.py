"""Retrieval fine-tuning losses on embeddings: the orthogonal projection loss and its contrastive baseline.

Both take embeddings (any encoder's, see `model.encoders.TextEncoder.embed`) and compare them by cosine
similarity, computed in float32 whatever precision the encoder runs in.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class OrthogonalProjectionLoss(nn.Module):
    """Orthogonal projection loss (OPL) of M2-BERT retrieval fine-tuning.

    Saad-Falcon et al., "Benchmarking and Building Long-Context Retrieval Models with LoCo and M2-BERT"
    (ICML 2024), section 4.3: each (query, document) pair is scored on its own, pulling the cosine of a
    query and a relevant document to 1 and that of a query and an irrelevant document to 0:

        loss = mean_i (cos(q_i, d_i) - y_i)^2,   y_i = 1 for a positive, 0 for a negative.

    The terms are independent, so one pair per micro-step (batch size 1, the paper's setting for 32k-token
    documents) trains the same objective as a large batch, and memory does not depend on how many
    negatives a query has. The authors' code computes it as sentence-transformers' `CosineSimilarityLoss`
    on pairs labelled 1.0 and 0.0.

    Inputs:
        query_embeddings:    (B, D)
        document_embeddings: (B, D), row i paired with query row i
        labels:              (B,) 1.0 (relevant) or 0.0 (irrelevant)
    Returns the mean over the B pairs (a scalar).

    Example:
        >>> loss_fn = OrthogonalProjectionLoss()
        >>> q = encoder.embed(["who proposed the XML format?"])
        >>> d = encoder.embed([meeting_transcript])
        >>> loss = loss_fn(q, d, torch.tensor([1.0]))   # a positive pair; 0.0 for a negative
        >>> loss.backward()
    """

    def forward(self, query_embeddings: torch.Tensor, document_embeddings: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        _check_pairs(query_embeddings, document_embeddings, "document_embeddings")
        if labels.shape != query_embeddings.shape[:1]:
            raise ValueError(f"labels must have shape ({query_embeddings.shape[0]},), got {tuple(labels.shape)}")
        cosine = F.cosine_similarity(query_embeddings.float(), document_embeddings.float(), dim=-1)
        return F.mse_loss(cosine, labels.to(device=cosine.device, dtype=torch.float32))


class MultipleNegativesRankingLoss(nn.Module):
    """Multiple negatives ranking loss (MNRL): the contrastive baseline of the paper's loss comparison.

    Henderson et al., "Efficient Natural Language Response Suggestion for Smart Reply" (2017), as used by
    sentence-transformers and compared with OPL in Saad-Falcon et al. (ICML 2024), Table 8 (MNRL at batch
    size 2 against OPL at batch size 1). Each query must pick its own positive among every candidate of
    the micro-batch, the other queries' positives (in-batch negatives) and all given negatives:

        scores = scale * cos(q_i, c_j) over candidates c = [positives; negatives]
        loss   = mean_i cross_entropy(scores_i, target = i)

    Unlike OPL the whole micro-batch must be embedded at once, so memory grows with batch size and
    negatives; at 32k tokens that limits it to a couple of examples per step.

    Inputs:
        query_embeddings:    (B, D)
        positive_embeddings: (B, D), row i relevant to query i
        negative_embeddings: (M, D) or None, irrelevant to every query (e.g. one hard negative per query)
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
                negative_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        _check_pairs(query_embeddings, positive_embeddings, "positive_embeddings")
        candidates = positive_embeddings
        if negative_embeddings is not None:
            if negative_embeddings.dim() != 2 or negative_embeddings.shape[1] != query_embeddings.shape[1]:
                raise ValueError(f"negative_embeddings must have shape (M, {query_embeddings.shape[1]}), "
                                 f"got {tuple(negative_embeddings.shape)}")
            candidates = torch.cat([positive_embeddings, negative_embeddings])
        queries = F.normalize(query_embeddings.float(), dim=-1)
        scores = self.scale * queries @ F.normalize(candidates.float(), dim=-1).T  # (B, B + M)
        targets = torch.arange(queries.shape[0], device=scores.device)
        return F.cross_entropy(scores, targets)


def _check_pairs(queries: torch.Tensor, others: torch.Tensor, name: str) -> None:
    if queries.dim() != 2 or queries.shape[0] == 0:
        raise ValueError(f"query_embeddings must have shape (B, D) with B >= 1, got {tuple(queries.shape)}")
    if others.shape != queries.shape:
        raise ValueError(f"{name} must match query_embeddings' shape {tuple(queries.shape)}, "
                         f"got {tuple(others.shape)}")

"""The orthogonal projection loss of M2-BERT retrieval fine-tuning, on embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shapes import check_pairs


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
        check_pairs(query_embeddings, document_embeddings, "document_embeddings")
        if labels.shape != query_embeddings.shape[:1]:
            raise ValueError(f"labels must have shape ({query_embeddings.shape[0]},), got {tuple(labels.shape)}")
        cosine = F.cosine_similarity(query_embeddings.float(), document_embeddings.float(), dim=-1)
        return F.mse_loss(cosine, labels.to(device=cosine.device, dtype=torch.float32))

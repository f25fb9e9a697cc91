"""Fine-tuning losses: values against the formulas worked by hand, gradients' direction, bad shapes."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import MultipleNegativesRankingLoss, OrthogonalProjectionLoss


def test_opl_is_the_mean_squared_gap_between_cosine_and_label():
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    documents = torch.tensor([[2.0, 0.0], [0.0, 5.0], [3.0, 0.0]])  # cosines 1, 0, 0.6
    labels = torch.tensor([1.0, 1.0, 0.0])
    expected = ((1 - 1) ** 2 + (0 - 1) ** 2 + (0.6 - 0) ** 2) / 3
    assert OrthogonalProjectionLoss()(queries, documents, labels).item() == pytest.approx(expected, abs=1e-6)


def test_opl_pulls_positives_together_and_makes_negatives_orthogonal():
    loss_fn = OrthogonalProjectionLoss()
    query = torch.tensor([[1.0, 0.0]])
    document = torch.tensor([[1.0, 1.0]], requires_grad=True)  # cos = 0.707
    loss_fn(query, document, torch.tensor([1.0])).backward()
    toward_query = -document.grad  # a gradient-descent step for a positive turns the document towards the query
    assert toward_query[0, 0] > 0 and toward_query[0, 1] < 0
    document.grad = None
    loss_fn(query, document, torch.tensor([0.0])).backward()
    away = -document.grad  # for a negative, away from the query's direction
    assert away[0, 0] < 0 and away[0, 1] > 0
    orthogonal = torch.tensor([[0.0, 2.0]])
    assert loss_fn(query, orthogonal, torch.tensor([0.0])).item() == 0.0


def test_opl_of_single_pairs_averages_to_the_batch_loss():
    # Single-sample training relies on this: averaging B one-pair losses (gradient accumulation) is the
    # B-pair batch loss.
    generator = torch.Generator().manual_seed(0)
    queries, documents = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    loss_fn = OrthogonalProjectionLoss()
    batch = loss_fn(queries, documents, labels)
    singles = [loss_fn(queries[i:i + 1], documents[i:i + 1], labels[i:i + 1]) for i in range(6)]
    assert torch.stack(singles).mean().item() == pytest.approx(batch.item(), abs=1e-6)


def test_mnrl_is_cross_entropy_over_scaled_cosines_of_all_candidates():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0]])
    scale = 10.0
    cos_rows = [[1.0, math.sqrt(0.5), 0.0], [0.0, math.sqrt(0.5), 1.0]]  # candidates: pos0, pos1, neg
    expected = 0.0
    for row, target in zip(cos_rows, (0, 1)):
        logits = [scale * c for c in row]
        expected += -logits[target] + math.log(sum(math.exp(v) for v in logits))
    expected /= 2
    loss = MultipleNegativesRankingLoss(scale=scale)(queries, positives, negatives)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    in_batch_only = MultipleNegativesRankingLoss(scale=scale)(queries, positives)
    expected_in_batch = sum(-scale * row[t] + math.log(sum(math.exp(scale * c) for c in row[:2]))
                            for row, t in zip(cos_rows, (0, 1))) / 2
    assert in_batch_only.item() == pytest.approx(expected_in_batch, rel=1e-5)


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="document_embeddings must match"):
        OrthogonalProjectionLoss()(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="labels must have shape"):
        OrthogonalProjectionLoss()(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="negative_embeddings must have shape"):
        MultipleNegativesRankingLoss()(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="scale must be positive"):
        MultipleNegativesRankingLoss(scale=0.0)

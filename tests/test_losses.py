"""Fine-tuning losses: values against the formulas worked by hand, gradients' direction, bad shapes; the cached
MNRL against plain MNRL (same loss and gradients, dropout on), and its random-state replay.
(tests/test_cached_mnrl.py checks the cached loss across processes and in training.)"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from train.losses import (CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss, OrthogonalProjectionLoss,
                          RandomState)
from train.losses.cached_multiple_negatives_ranking import split_features


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
    with pytest.raises(ValueError, match="positive_ids must be 2 integer ids"):
        MultipleNegativesRankingLoss()(torch.zeros(2, 4), torch.zeros(2, 4), positive_ids=torch.zeros(3))
    with pytest.raises(ValueError, match="mini_batch_size must be at least 1"):
        CachedMultipleNegativesRankingLoss(lambda features: features, mini_batch_size=0)


def test_mnrl_leaves_out_a_queries_own_positive_found_again_among_the_candidates():
    # Both queries have document 7 as their positive, and the second negative is document 7 too: each query
    # keeps its own column and is scored against the one other document (id 3) only.
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    scale = 10.0
    loss = MultipleNegativesRankingLoss(scale)(queries, positives, negatives, positive_ids=torch.tensor([7, 7]),
                                               negative_ids=torch.tensor([3, 7]))
    cos = [[1.0, math.sqrt(0.5), 0.0, math.sqrt(0.5)], [0.0, math.sqrt(0.5), 1.0, math.sqrt(0.5)]]
    kept = [[0, 2], [1, 2]]  # per query: its target, and the candidate that is another document (id 3)
    expected = sum(-scale * cos[i][i] + math.log(sum(math.exp(scale * cos[i][j]) for j in kept[i]))
                   for i in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert MultipleNegativesRankingLoss(scale)(queries, positives, negatives).item() > loss.item()


@pytest.fixture(scope="module")
def tiny_encoder():
    """A tiny M2-BERT encoder in training mode: dropout (p = 0.1) is on."""
    from model import M2BertConfig, M2BertModel
    from model.encoders import M2Encoder

    torch.manual_seed(0)
    encoder = M2Encoder(M2BertModel(M2BertConfig.from_preset("m2-bert-tiny"))).train()
    assert encoder.model.config.hidden_dropout_prob > 0
    return encoder


@pytest.fixture(scope="module")
def batch(tiny_encoder):
    """5 tokenized queries, positives and negatives, and document ids with duplicates (positive 0 again as
    positive 2 and negative 4, positive 1 as negative 1)."""
    queries = [f"who raised question {i} about the {topic} budget?" for i, topic in enumerate("abcde")]
    documents = [f"meeting {i}: " + "the remote control budget was discussed " * (2 + i) for i in range(10)]
    return dict(query_features=tiny_encoder.tokenize(queries, 32),
                positive_features=tiny_encoder.tokenize(documents[:5], 48),
                negative_features=tiny_encoder.tokenize(documents[5:], 48),
                positive_ids=torch.tensor([0, 1, 0, 2, 3]), negative_ids=torch.tensor([4, 1, 5, 6, 0]))


def plain_mnrl_gradients(encoder, batch, mini_batch_size: int, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain MNRL's loss and gradients, its embeddings computed with gradients in the cached loss's mini-batches
    and order, from the random state `seed`: the same dropout masks as the cached loss's first pass."""
    encoder.zero_grad()
    torch.manual_seed(seed)
    embeddings = [torch.cat([encoder(piece) for piece in split_features(batch[key], mini_batch_size)])
                  for key in ("query_features", "positive_features", "negative_features")]
    loss = MultipleNegativesRankingLoss(scale=20.0)(*embeddings, batch["positive_ids"], batch["negative_ids"])
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


def cached_mnrl_gradients(encoder, batch, mini_batch_size: int, seed: int) -> tuple[float, dict[str, torch.Tensor], int]:
    """The cached loss's loss, gradients and number of `backward` calls, from the random state `seed`."""
    encoder.zero_grad()
    torch.manual_seed(seed)
    calls = []

    def backward(surrogate: torch.Tensor) -> None:
        calls.append(1)
        surrogate.backward()

    output = CachedMultipleNegativesRankingLoss(encoder, mini_batch_size, scale=20.0)(**batch, backward=backward)
    gradients = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    return output.loss.item(), gradients, len(calls)


def assert_same_gradients(actual: dict, expected: dict, relative_to_largest: bool = False) -> None:
    """Equal within 1e-5 (absolute and relative); or, for sums taken in another order, within 1e-5 of each
    gradient's largest entry (the Hyena filters' reach 100 here)."""
    assert actual.keys() == expected.keys() and len(expected) > 50
    for name, gradient in expected.items():
        atol = 1e-5 * max(1.0, gradient.abs().max().item()) if relative_to_largest else 1e-5
        torch.testing.assert_close(actual[name], gradient, rtol=1e-5, atol=atol,
                                   msg=lambda message: f"{name}: {message}")


def test_cached_mnrl_gives_plain_mnrls_loss_and_gradients_with_dropout_on(tiny_encoder, batch):
    # 5 of each with mini-batches of 2: the last mini-batch of each kind is shorter
    loss, gradients = plain_mnrl_gradients(tiny_encoder, batch, mini_batch_size=2, seed=7)
    cached_loss, cached_gradients, calls = cached_mnrl_gradients(tiny_encoder, batch, mini_batch_size=2, seed=7)
    assert cached_loss == pytest.approx(loss, abs=1e-5)
    assert_same_gradients(cached_gradients, gradients)
    assert calls == CachedMultipleNegativesRankingLoss.backward_calls(5, 5, mini_batch_size=2) == 9
    # Inputs tokenized a mini-batch at a time (as fine-tuning passes long documents) train the same.
    pieces = {key: split_features(value, 2) if key.endswith("features") else value for key, value in batch.items()}
    listed_loss, listed_gradients, _ = cached_mnrl_gradients(tiny_encoder, pieces, mini_batch_size=2, seed=7)
    assert listed_loss == pytest.approx(loss, abs=1e-5)
    assert_same_gradients(listed_gradients, gradients)
    # The comparison is not vacuous: another random state (other dropout masks) gives other gradients.
    _, other = plain_mnrl_gradients(tiny_encoder, batch, mini_batch_size=2, seed=8)
    assert max((other[name] - g).abs().max().item() for name, g in gradients.items()) > 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_mnrl_replays_cuda_dropout(tiny_encoder, batch):
    import copy

    encoder = copy.deepcopy(tiny_encoder).cuda()
    on_gpu = {key: {k: v.cuda() for k, v in value.items()} if key.endswith("features") else value.cuda()
              for key, value in batch.items()}
    loss, gradients = plain_mnrl_gradients(encoder, on_gpu, mini_batch_size=2, seed=7)
    cached_loss, cached_gradients, _ = cached_mnrl_gradients(encoder, on_gpu, mini_batch_size=2, seed=7)
    assert cached_loss == pytest.approx(loss, abs=1e-4)
    assert_same_gradients(cached_gradients, gradients, relative_to_largest=True)
    _, other = plain_mnrl_gradients(encoder, on_gpu, mini_batch_size=2, seed=8)
    assert max((other[name] - g).abs().max().item() for name, g in gradients.items()) > 1e-2


def test_cached_mnrl_without_the_random_state_replay_would_differ(tiny_encoder, batch, monkeypatch):
    # The control of the test above: if the second pass drew new dropout masks, its gradients would belong to
    # another network than the one the loss was computed with.
    _, gradients = plain_mnrl_gradients(tiny_encoder, batch, mini_batch_size=2, seed=7)
    monkeypatch.setattr(RandomState, "replay", lambda self: contextlib.nullcontext())
    _, cached_gradients, _ = cached_mnrl_gradients(tiny_encoder, batch, mini_batch_size=2, seed=7)
    assert max((cached_gradients[name] - g).abs().max().item() for name, g in gradients.items()) > 1e-2


def test_cached_mnrl_gradients_do_not_depend_on_the_mini_batch_size_without_dropout(tiny_encoder, batch):
    tiny_encoder.eval()  # no dropout: every mini-batch size computes the same network
    try:
        _, whole = plain_mnrl_gradients(tiny_encoder, batch, mini_batch_size=5, seed=0)
        _, one_at_a_time, calls = cached_mnrl_gradients(tiny_encoder, batch, mini_batch_size=1, seed=0)
    finally:
        tiny_encoder.train()
    assert calls == 15
    assert_same_gradients(one_at_a_time, whole, relative_to_largest=True)


def test_random_state_replays_dropout_and_leaves_the_generator_where_it_was():
    dropout = torch.nn.Dropout(0.5)
    ones = torch.ones(1000)
    state = RandomState()
    first = dropout(ones)
    after = torch.get_rng_state()
    with state.replay():
        again = dropout(ones)
    assert torch.equal(again, first) and torch.equal(torch.get_rng_state(), after)
    assert not torch.equal(dropout(ones), first)

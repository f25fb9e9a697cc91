"""The multiple negatives ranking loss at any batch size in the memory of one mini-batch (gradient caching)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .multiple_negatives_ranking import check_inputs, ranking_loss

Features = dict  # a tokenized batch: tensors of B rows (input_ids, attention_mask, ...), maybe other values


@dataclass
class CachedLossOutput:
    """The batch's loss (detached: its gradients are already back-propagated) and this process's embeddings
    (detached), e.g. to log their cosines."""

    loss: torch.Tensor  # ()
    query_embeddings: torch.Tensor  # (B, D)
    positive_embeddings: torch.Tensor  # (B, D)
    negative_embeddings: torch.Tensor | None  # (M, D)


class RandomState:
    """The random generators' state at one moment: the CPU's, and the current CUDA device's once CUDA is in use.

    `replay()` runs a block from that state, so that a second forward pass draws the same dropout masks as
    the first (the idea of sentence-transformers' `RandContext`); afterwards the generators continue from
    where they were, as if the block had not run.
    """

    def __init__(self):
        self.cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self.cpu = torch.get_rng_state()
        self.cuda = None if self.cuda_device is None else torch.cuda.get_rng_state(self.cuda_device)

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[] if self.cuda_device is None else [self.cuda_device]):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


class CachedMultipleNegativesRankingLoss(nn.Module):
    """Multiple negatives ranking loss by gradient caching: a large contrastive batch in the memory of one mini-batch.

    Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (GradCache,
    RepL4NLP 2021, arXiv:2101.06983); sentence-transformers' `CachedMultipleNegativesRankingLoss`. The loss
    is `MultipleNegativesRankingLoss`'s (scaled-cosine cross-entropy over in-batch and given negatives,
    duplicates of a query's positive left out when ids are given), its value and gradients the same;
    only the memory differs. It runs the model itself, in three passes:

      1. embed every mini-batch of `mini_batch_size` texts without gradients (queries, positives and
         negatives each in their own mini-batches), remembering the random state each started from;
      2. compute the loss over the whole batch from these embeddings and its gradient with respect to them;
      3. embed each mini-batch again, with gradients and from its remembered random state (the same
         dropout masks, so the same network as in pass 1), and back-propagate the cached gradient of its
         embeddings, one `backward` call per mini-batch.

    Peak memory is that of one mini-batch's forward and backward pass, whatever the batch size; the price
    is a second forward pass. In a process group (DeepSpeed, DDP) every process passes its own share of the
    batch: pass 2 gathers all processes' embeddings, so that each query is scored against every process's
    candidates and the loss is that of the global batch, as one process holding the whole batch would
    compute it. Each process back-propagates the gradients of its own embeddings, scaled by the number of
    processes because DeepSpeed and DDP average the processes' gradients where the global loss needs their
    sum. Every process must pass as many queries and negatives, and ids or none, so that all make the same
    number of `backward` calls.

    Args:
        model: a callable from a tokenized batch (`Features`) to its (B, D) embeddings, e.g. a
            `model.encoders.TextEncoder` or the DeepSpeed engine wrapping one, in training mode.
        mini_batch_size: texts per forward pass (memory), independent of the batch size (the loss).
        scale: the cosine scale (inverse temperature).
        gather_across_processes: score against every process's candidates (the global batch); False scores
            each process's batch on its own, as plain MNRL under data parallelism does.

    Inputs (each batch of texts tokenized at once, or as a list of its tokenized mini-batches: tokenizing
    long documents then takes the memory of one mini-batch too):
        query_features:    the B tokenized queries (`TextEncoder.tokenize`)
        positive_features: the B tokenized positives, row i relevant to query i
        negative_features: M tokenized negatives, or None
        positive_ids, negative_ids: (B,) and (M,) integer document ids, or None
        backward: turns each mini-batch's surrogate loss into gradients (default `Tensor.backward`; the
            trainer's, which counts the calls, in fine-tuning); `backward_calls` says how many come.
    Returns a `CachedLossOutput`: the loss (the global batch's when gathered) and this process's embeddings.

    Example:
        >>> encoder = load_encoder("all-MiniLM-L6-v2").train()
        >>> loss_fn = CachedMultipleNegativesRankingLoss(encoder, mini_batch_size=4)
        >>> output = loss_fn(encoder.tokenize(queries), encoder.tokenize(positives, 512),
        ...                  encoder.tokenize(negatives, 512))   # 32 of each: 24 passes of 4 texts
        >>> optimizer.step()                                       # the gradients are in place
    """

    def __init__(self, model: Callable[[Features], torch.Tensor], mini_batch_size: int = 32, scale: float = 20.0,
                 gather_across_processes: bool = True):
        super().__init__()
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be at least 1, got {mini_batch_size}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.model = model
        self.mini_batch_size = mini_batch_size
        self.scale = scale
        self.gather_across_processes = gather_across_processes

    @staticmethod
    def backward_calls(batch_size: int, negatives: int, mini_batch_size: int) -> int:
        """How many times `forward` calls `backward`: once per mini-batch of the `batch_size` queries, of their
        positives and of the `negatives` negatives."""
        return 2 * math.ceil(batch_size / mini_batch_size) + math.ceil(negatives / mini_batch_size)

    def forward(self, query_features: Features | list[Features], positive_features: Features | list[Features],
                negative_features: Features | list[Features] | None = None, positive_ids: torch.Tensor | None = None,
                negative_ids: torch.Tensor | None = None,
                backward: Callable[[torch.Tensor], None] | None = None) -> CachedLossOutput:
        inputs = [query_features, positive_features] + ([] if negative_features is None else [negative_features])
        mini_batches = [features if isinstance(features, list) else split_features(features, self.mini_batch_size)
                        for features in inputs]
        # 1. Every mini-batch's embeddings, without gradients, and the random state it started from.
        states, embeddings = [], []
        for pieces in mini_batches:
            chunks = []
            for piece in pieces:
                states.append(RandomState())
                with torch.no_grad():
                    chunks.append(self.model(piece).detach())
            embeddings.append(torch.cat(chunks))  # (B or M, D)
        queries, positives = embeddings[:2]
        negatives = embeddings[2] if negative_features is not None else None
        check_inputs(queries, positives, negatives, positive_ids, negative_ids)
        # 2. The loss and the gradients of this process's embeddings.
        loss, gradients = self.loss_and_gradients(queries, positives, negatives, positive_ids, negative_ids)
        # 3. Each mini-batch again, with gradients and the same dropout masks: back-propagate its cached gradient.
        backward = backward or torch.Tensor.backward
        pieces = [piece for kind in mini_batches for piece in kind]
        gradient_pieces = [g for gradient, kind in zip(gradients, mini_batches)
                           for g in gradient.split([rows(piece) for piece in kind])]
        for piece, state, gradient in zip(pieces, states, gradient_pieces, strict=True):
            with state.replay():
                embedding = self.model(piece)  # (b, D)
            backward((embedding.float() * gradient).sum())
        return CachedLossOutput(loss.detach(), queries, positives, negatives)

    def loss_and_gradients(self, queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                           positive_ids: torch.Tensor | None, negative_ids: torch.Tensor | None
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss of the batch (every process's, when gathered) from detached embeddings, and its gradients with
        respect to this process's queries, positives (and negatives), scaled for the processes' gradient averaging."""
        mine = [queries, positives] + ([] if negatives is None else [negatives])
        batch, starts = mine, [0] * len(mine)
        ids = [] if positive_ids is None else [positive_ids] + ([] if negatives is None else [negative_ids])
        world_size = dist.get_world_size() if self.gather_across_processes and dist.is_initialized() else 1
        if world_size > 1:
            batch, ids, starts = gather_batch(mine, ids)
        leaves = [t.detach().float().requires_grad_() for t in batch]
        loss = ranking_loss(leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None, self.scale,
                            ids[0] if ids else None, ids[1] if len(ids) > 1 else None)
        gradients = torch.autograd.grad(loss, leaves)
        return loss, [world_size * g[start:start + t.shape[0]] for g, start, t in zip(gradients, starts, mine)]


def rows(features: Features) -> int:
    """The number of texts in a tokenized batch."""
    counts = {value.shape[0] for value in features.values() if torch.is_tensor(value)}
    if len(counts) != 1:
        raise ValueError(f"tokenized features must hold tensors with the same number of rows, got {sorted(counts)}")
    return counts.pop()


def split_features(features: Features, size: int) -> list[Features]:
    """A tokenized batch cut into mini-batches of `size` rows (the last may be shorter); non-tensor values are shared."""
    return [{key: value[start:start + size] if torch.is_tensor(value) else value for key, value in features.items()}
            for start in range(0, rows(features), size)]


def gather_batch(embeddings: list[torch.Tensor], ids: list[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Every process's embeddings (queries, positives[, negatives]) and ids, concatenated in rank order, and where
    this process's rows start in each. All processes must hold the same inputs in the same numbers (checked on
    every process alike, so that all raise rather than wait for each other)."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    layout = torch.tensor([t.shape[0] for t in embeddings] + [-1] * (3 - len(embeddings)) + [len(ids)],
                          device=embeddings[0].device)
    layouts = [torch.empty_like(layout) for _ in range(world_size)]
    dist.all_gather(layouts, layout)
    if any(not torch.equal(other, layout) for other in layouts):
        raise ValueError(f"the processes' batches differ (queries, positives, negatives or -1 for none, ids): "
                         f"{[other.tolist() for other in layouts]}; every process must pass as many of each")
    gathered = [gather(t.detach().float()) for t in embeddings]
    gathered_ids = [gather(t.to(embeddings[0].device)) for t in ids]
    return gathered, gathered_ids, [rank * t.shape[0] for t in embeddings]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """All processes' `tensor` (of the same shape) concatenated along dim 0 in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)

"""What one retrieval micro-step computes: embed its units through the model, score them with a loss, back-propagate.

An objective lays the training examples out as its units (`train.retrieval_examples`) and, for one
micro-batch of them, embeds the texts through the model being trained (`Embedder`), applies its loss
(`train.losses`) and turns the loss into gradients with the `backward` the trainer provides, as many
times per micro-step as its `backward_calls` says (once, or once per mini-batch for the cached loss,
which runs the model itself). It returns the loss and the cosines it scored, for the logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from model.encoders import TextEncoder
from train.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss, OrthogonalProjectionLoss
from train.retrieval_examples import LabelledPair, RetrievalExample, TaskTexts, Triplet, labelled_pairs, triplets
from train.trainer import Backward


@dataclass
class MicroStepOutput:
    """A micro-step's loss (detached: already back-propagated) and the cosines it scored, for the logs."""

    loss: torch.Tensor
    positive_cosines: torch.Tensor  # one per (query, relevant document) scored
    negative_cosines: torch.Tensor


class Embedder:
    """Tokenizes with the encoder and embeds through `model` (the encoder, or the DeepSpeed engine wrapping it);
    queries and documents are truncated to their own lengths."""

    def __init__(self, model: Callable, encoder: TextEncoder, device: torch.device, query_max_length: int | None,
                 document_max_length: int | None):
        self.model = model
        self.encoder = encoder
        self.device = device
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length

    def _features(self, texts: list[str], max_length: int | None) -> dict:
        features = self.encoder.tokenize(texts, max_length)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in features.items()}

    def query_features(self, texts: list[str]) -> dict:
        """The queries tokenized, on the device."""
        return self._features(texts, self.query_max_length)

    def document_features(self, texts: list[str]) -> dict:
        return self._features(texts, self.document_max_length)

    def queries(self, texts: list[str]) -> torch.Tensor:
        return self.model(self.query_features(texts))  # (B, D)

    def documents(self, texts: list[str]) -> torch.Tensor:
        return self.model(self.document_features(texts))  # (B, D)


class PairObjective:
    """OPL on `LabelledPair` units: a micro-step embeds its queries, then its documents, and scores the pairs."""

    def __init__(self, repeat_positive: bool):
        self.loss_fn = OrthogonalProjectionLoss()
        self.repeat_positive = repeat_positive

    def units(self, examples: list[RetrievalExample]) -> list[LabelledPair]:
        return labelled_pairs(examples, self.repeat_positive)

    def backward_calls(self, micro_batch_size: int) -> int:
        return 1

    def micro_step(self, embed: Embedder, batch: list[LabelledPair], texts: TaskTexts,
                   backward: Backward) -> MicroStepOutput:
        queries = embed.queries([texts.query(p.task, p.qid) for p in batch])
        documents = embed.documents([texts.document(p.task, p.pid) for p in batch])
        labels = torch.tensor([p.label for p in batch], device=queries.device)
        loss = self.loss_fn(queries, documents, labels)
        backward(loss)
        cosines = F.cosine_similarity(queries.detach().float(), documents.detach().float(), dim=-1)
        return MicroStepOutput(loss.detach(), cosines[labels == 1.0], cosines[labels == 0.0])


class TripletObjective:
    """MNRL on `Triplet` units: a micro-step embeds its queries and all its documents (positives, then
    negatives) at once, as the loss needs every candidate of the micro-batch. A document that is a query's
    own positive is never scored as its negative (document numbers: `TaskTexts.document_number`)."""

    def __init__(self, scale: float):
        self.loss_fn = MultipleNegativesRankingLoss(scale)

    def units(self, examples: list[RetrievalExample]) -> list[Triplet]:
        return triplets(examples)

    def backward_calls(self, micro_batch_size: int) -> int:
        return 1

    def micro_step(self, embed: Embedder, batch: list[Triplet], texts: TaskTexts,
                   backward: Backward) -> MicroStepOutput:
        with_negative = [i for i, t in enumerate(batch) if t.negative_pid is not None]
        queries = embed.queries([texts.query(t.task, t.qid) for t in batch])
        documents = embed.documents([texts.document(t.task, t.positive_pid) for t in batch]
                                    + [texts.document(batch[i].task, batch[i].negative_pid) for i in with_negative])
        positives, negatives = documents[:len(batch)], documents[len(batch):]
        positive_ids, negative_ids = document_numbers(batch, texts, with_negative)
        loss = self.loss_fn(queries, positives, negatives if with_negative else None, positive_ids,
                            negative_ids if with_negative else None)
        backward(loss)
        return triplet_output(loss, queries, positives, negatives, with_negative)


class CachedTripletObjective:
    """Cached MNRL on `Triplet` units (`CachedMultipleNegativesRankingLoss`): the micro-batch is the contrastive
    batch, gathered over the processes, and the model runs on `mini_batch_size` texts at a time, so memory
    does not grow with the batch. Every unit must have a negative, or none: the number of mini-batches, and
    so of `backward` calls, is then the same at every micro-step."""

    def __init__(self, scale: float, mini_batch_size: int):
        self.scale = scale
        self.mini_batch_size = mini_batch_size
        self.with_negatives = True

    def units(self, examples: list[RetrievalExample]) -> list[Triplet]:
        units = triplets(examples)
        lonely = sum(t.negative_pid is None for t in units)
        if 0 < lonely < len(units):
            raise ValueError(f"cached_mnrl needs a negative for every example or for none (negatives.per_positive: "
                             f"0), but {lonely} of {len(units)} examples have none: their task has no document "
                             "besides the query's relevant ones")
        self.with_negatives = lonely == 0
        return units

    def backward_calls(self, micro_batch_size: int) -> int:
        negatives = micro_batch_size if self.with_negatives else 0
        return CachedMultipleNegativesRankingLoss.backward_calls(micro_batch_size, negatives, self.mini_batch_size)

    def micro_step(self, embed: Embedder, batch: list[Triplet], texts: TaskTexts,
                   backward: Backward) -> MicroStepOutput:
        with_negative = list(range(len(batch))) if self.with_negatives else []
        slices = [batch[i:i + self.mini_batch_size] for i in range(0, len(batch), self.mini_batch_size)]
        # Tokenized a mini-batch at a time: the tokenizer reads a long document whole before truncating it.
        queries = [embed.query_features([texts.query(t.task, t.qid) for t in s]) for s in slices]
        positives = [embed.document_features([texts.document(t.task, t.positive_pid) for t in s]) for s in slices]
        negatives = ([embed.document_features([texts.document(t.task, t.negative_pid) for t in s]) for s in slices]
                     if self.with_negatives else None)
        positive_ids, negative_ids = document_numbers(batch, texts, with_negative)
        loss_fn = CachedMultipleNegativesRankingLoss(embed.model, self.mini_batch_size, self.scale)
        output = loss_fn(queries, positives, negatives, positive_ids, negative_ids if self.with_negatives else None,
                         backward=backward)
        return triplet_output(output.loss, output.query_embeddings, output.positive_embeddings,
                              output.negative_embeddings, with_negative)


def document_numbers(batch: list[Triplet], texts: TaskTexts, with_negative: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) numbers of the positives and (M,) of the negatives of the units `with_negative`."""
    positives = torch.tensor([texts.document_number(t.task, t.positive_pid) for t in batch])
    negatives = torch.tensor([texts.document_number(batch[i].task, batch[i].negative_pid) for i in with_negative],
                             dtype=torch.long)
    return positives, negatives


def triplet_output(loss: torch.Tensor, queries: torch.Tensor, positives: torch.Tensor,
                   negatives: torch.Tensor | None, with_negative: list[int]) -> MicroStepOutput:
    q = queries.detach().float()
    positive_cosines = F.cosine_similarity(q, positives.detach().float(), dim=-1)
    negative_cosines = (F.cosine_similarity(q[with_negative], negatives.detach().float(), dim=-1)
                        if with_negative else q.new_zeros(0))
    return MicroStepOutput(loss.detach(), positive_cosines, negative_cosines)

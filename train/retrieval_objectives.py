"""What one retrieval micro-step computes: embed its units through the model, score them with a loss, back-propagate.

An objective lays the training examples out as its units (`train.retrieval_examples`) and, for one
micro-batch of them, embeds the texts through the model being trained (`Embedder`), applies its loss
(`train.losses`) and turns the loss into gradients with the `backward` the trainer provides. It returns
the loss and the cosines it scored, for the logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from model.encoders import TextEncoder
from train.losses import MultipleNegativesRankingLoss, OrthogonalProjectionLoss
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

    def _embed(self, texts: list[str], max_length: int | None) -> torch.Tensor:
        features = self.encoder.tokenize(texts, max_length)
        return self.model({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in features.items()})

    def queries(self, texts: list[str]) -> torch.Tensor:
        return self._embed(texts, self.query_max_length)  # (B, D)

    def documents(self, texts: list[str]) -> torch.Tensor:
        return self._embed(texts, self.document_max_length)  # (B, D)


class PairObjective:
    """OPL on `LabelledPair` units: a micro-step embeds its queries, then its documents, and scores the pairs."""

    def __init__(self, repeat_positive: bool):
        self.loss_fn = OrthogonalProjectionLoss()
        self.repeat_positive = repeat_positive

    def units(self, examples: list[RetrievalExample]) -> list[LabelledPair]:
        return labelled_pairs(examples, self.repeat_positive)

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
    negatives) at once, as the loss needs every candidate of the micro-batch."""

    def __init__(self, scale: float):
        self.loss_fn = MultipleNegativesRankingLoss(scale)

    def units(self, examples: list[RetrievalExample]) -> list[Triplet]:
        return triplets(examples)

    def micro_step(self, embed: Embedder, batch: list[Triplet], texts: TaskTexts,
                   backward: Backward) -> MicroStepOutput:
        with_negative = [i for i, t in enumerate(batch) if t.negative_pid is not None]
        queries = embed.queries([texts.query(t.task, t.qid) for t in batch])
        documents = embed.documents([texts.document(t.task, t.positive_pid) for t in batch]
                                    + [texts.document(batch[i].task, batch[i].negative_pid) for i in with_negative])
        positives, negatives = documents[:len(batch)], documents[len(batch):]
        loss = self.loss_fn(queries, positives, negatives if with_negative else None)
        backward(loss)
        q = queries.detach().float()
        positive_cosines = F.cosine_similarity(q, positives.detach().float(), dim=-1)
        negative_cosines = F.cosine_similarity(q[with_negative], negatives.detach().float(), dim=-1)
        return MicroStepOutput(loss.detach(), positive_cosines, negative_cosines)

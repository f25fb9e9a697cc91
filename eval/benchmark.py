"""Scoring models on tasks, or (for a sharded run) only embedding a shard of their texts."""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from .cache import EmbeddingCache
from .data import LocoTask
from .metrics import HEADLINE_METRIC, evaluate_run
from .models import ModelSpec, build_retriever
from .sharding import Shard

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One model on one task: mean metrics (fractions), the task's main metric and group (see
    `LocoTask`), and what it cost."""

    model: str
    task: str
    n_queries: int
    n_documents: int
    metrics: dict[str, float]
    seconds: float
    embedded: int | None = None
    cached: int | None = None
    metric: str = HEADLINE_METRIC
    group: str | None = None

    @property
    def main_score(self) -> float:
        return self.metrics[self.metric]


def evaluate_retriever(retriever, tasks: list[LocoTask], top_k: int = 100) -> list[TaskResult]:
    """Retrieve the top `top_k` documents of every query of every task and score the runs."""
    results = []
    for task in tasks:
        counts = getattr(retriever, "counts", None)
        before = dataclasses.replace(counts) if counts else None
        started = time.perf_counter()
        run = retriever.retrieve(task, top_k)
        seconds = time.perf_counter() - started
        result = TaskResult(
            model=retriever.label, task=task.name, n_queries=len(task.queries), n_documents=len(task.documents),
            metrics=evaluate_run(task.qrels, run), seconds=seconds,
            embedded=counts.embedded - before.embedded if counts else None,
            cached=counts.cached - before.cached if counts else None, metric=task.metric, group=task.group)
        logger.info("%s | %s: %s %.1f (%d queries, %d documents, %.1f s%s)", result.model, result.task,
                    result.metric, 100 * result.main_score, result.n_queries, result.n_documents,
                    seconds, "" if counts is None else f", {result.embedded} embedded, {result.cached} from cache")
        results.append(result)
    return results


def score_models(specs: list[ModelSpec], tasks: list[LocoTask], cache: EmbeddingCache, device: torch.device,
                 batch_size: int = 16, search: str = "exact", top_k: int = 100,
                 show_progress: bool = True) -> tuple[list[TaskResult], list[dict]]:
    """Every model on every task, one model in memory at a time: the results and each model's description."""
    results, descriptions = [], []
    for spec in specs:
        retriever = build_retriever(spec, cache, device, batch_size, search, show_progress)
        if any(description["label"] == retriever.label for description in descriptions):
            raise ValueError(f"several models are labelled {retriever.label!r} (the same model, protocol and "
                             "length): give them distinct labels in a --config")
        results += evaluate_retriever(retriever, tasks, top_k)
        descriptions.append(retriever.describe())
        del retriever  # free the encoder before loading the next
    return results, descriptions


def embed_shard(specs: list[ModelSpec], tasks: list[LocoTask], shard: Shard, cache: EmbeddingCache,
                device: torch.device, batch_size: int = 16, show_progress: bool = True) -> None:
    """Embed into the cache the texts `shard` owns, for every dense model and task."""
    for spec in specs:
        if spec.is_bm25:
            logger.info("shard %d/%d: %s has nothing to embed", shard.index, shard.count, spec.display_name)
            continue
        retriever = build_retriever(spec, cache, device, batch_size, show_progress=show_progress)
        for task in tasks:
            retriever.embed_shard(task, shard)
        logger.info("shard %d/%d: %s embedded %d texts (%d already cached)", shard.index, shard.count,
                    spec.display_name, retriever.counts.embedded, retriever.counts.cached)
        del retriever

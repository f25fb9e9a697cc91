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


def evaluate_task(retriever, task: LocoTask, top_k: int = 100) -> TaskResult:
    """Retrieve the top `top_k` documents of every query of `task` and score the run."""
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
    return result


def evaluate_retriever(retriever, tasks: list[LocoTask], top_k: int = 100) -> list[TaskResult]:
    """`evaluate_task` on every task."""
    return [evaluate_task(retriever, task, top_k) for task in tasks]


def describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def score_models(specs: list[ModelSpec], tasks: list[LocoTask], cache: EmbeddingCache, device: torch.device,
                 batch_size: int = 16, search: str = "exact", top_k: int = 100,
                 show_progress: bool = True) -> tuple[list[TaskResult], list[dict]]:
    """Every model on every task, one model in memory at a time: the results and each model's description.

    A model that fails (it does not load, runs out of memory, gives NaN, ...) does not stop the others:
    its description gets an `error` (and it keeps the results of the tasks it finished)."""
    results, descriptions = [], []
    for spec in specs:
        label, description, retriever = spec.display_name, None, None
        try:
            retriever = build_retriever(spec, cache, device, batch_size, search, show_progress)
            if any(d["label"] == retriever.label for d in descriptions):
                raise ValueError(f"several models are labelled {retriever.label!r} (the same model, protocol and "
                                 "length): give them distinct labels in a --config")
            label, description = retriever.label, retriever.describe()
            for task in tasks:
                results.append(evaluate_task(retriever, task, top_k))
        except Exception as err:  # noqa: BLE001 - recorded, reported and turned into the exit status
            logger.exception("%s failed; the other models go on", label)
            description = {**(description or {"label": label, "model": spec.name, "protocol": spec.protocol}),
                           "error": describe_error(err)}
        descriptions.append(description)
        del retriever  # free the encoder before loading the next
    return results, descriptions


def embed_shard(specs: list[ModelSpec], tasks: list[LocoTask], shard: Shard, cache: EmbeddingCache,
                device: torch.device, batch_size: int = 16, show_progress: bool = True) -> dict[str, str]:
    """Embed into the cache the texts `shard` owns, for every dense model and task. A model that fails
    does not stop the others: the errors, by model label."""
    failures = {}
    for spec in specs:
        if spec.is_bm25:
            logger.info("shard %d/%d: %s has nothing to embed", shard.index, shard.count, spec.display_name)
            continue
        retriever = None
        try:
            retriever = build_retriever(spec, cache, device, batch_size, show_progress=show_progress)
            for task in tasks:
                retriever.embed_shard(task, shard)
            logger.info("shard %d/%d: %s embedded %d texts (%d already cached)", shard.index, shard.count,
                        spec.display_name, retriever.counts.embedded, retriever.counts.cached)
        except Exception as err:  # noqa: BLE001 - reported and turned into the exit status
            logger.exception("shard %d/%d: %s failed; the other models go on", shard.index, shard.count,
                             spec.display_name)
            failures[spec.display_name] = describe_error(err)
        del retriever
    return failures

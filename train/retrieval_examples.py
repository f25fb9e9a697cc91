"""Retrieval fine-tuning examples: (query, positive document, negatives) from LoCo-format tasks.

Following the authors' `gather_loco_training_examples` (reference §4.1): every (query, relevant document)
pair becomes one `RetrievalExample` with up to N negatives drawn without replacement from the same
task's documents, excluding the query's relevant ones; random by default, BM25's top-ranked as an option.
Draws are keyed by (seed, task, query, positive), so an example gets the same negatives whatever else is
loaded, in any order. BM25 rankings are mined once per run and kept in a file named by a fingerprint of
the data and settings (`bm25_rankings_path`), which the other processes and a resumed run read.

The examples are then laid out as the units one micro-step consumes:
  * `LabelledPair` for the orthogonal projection loss: (q, pos, 1.0) and (q, neg, 0.0); as in the
    authors' pair-label data path, the positive pair is repeated once per negative by default (1:1);
  * `Triplet` for the multiple negatives ranking loss: (q, pos, neg), one per negative.
and `BatchPlan` says which units each process takes at each micro-step of each optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from eval.bm25 import BM25Retriever
from eval.data import LocoTask

logger = logging.getLogger(__name__)

NEGATIVE_KINDS = ("random", "bm25")


@dataclass(frozen=True)
class RetrievalExample:
    """A training query, one of its relevant documents and sampled irrelevant ones (ids within `task`)."""

    task: str
    qid: str
    positive_pid: str
    negative_pids: tuple[str, ...]


@dataclass(frozen=True)
class LabelledPair:
    """A (query, document) pair with its target cosine: 1.0 relevant, 0.0 irrelevant."""

    task: str
    qid: str
    pid: str
    label: float


@dataclass(frozen=True)
class Triplet:
    """A query, a relevant document and an irrelevant one (None: in-batch negatives only)."""

    task: str
    qid: str
    positive_pid: str
    negative_pid: str | None


class TaskTexts:
    """Query and document texts of the loaded tasks, looked up by (task, id), and a number for every document
    (the same in every process), with which a contrastive loss recognises the same document twice in a batch."""

    def __init__(self, tasks: Iterable[LocoTask]):
        self.tasks = {task.name: task for task in tasks}
        self._numbers = {key: number for number, key in enumerate(sorted(
            (task.name, pid) for task in self.tasks.values() for pid in task.documents))}

    def query(self, task: str, qid: str) -> str:
        return self.tasks[task].queries[qid]

    def document(self, task: str, pid: str) -> str:
        return self.tasks[task].documents[pid]

    def document_number(self, task: str, pid: str) -> int:
        return self._numbers[task, pid]


def split_queries(tasks: list[LocoTask], heldout: int, max_train: int | None, seed: int
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training, held-out) lists of (task, qid): a seeded shuffle of every query of every task; the first
    `heldout` are held out and the next `max_train` (None: all the rest) train."""
    everything = [(task.name, qid) for task in tasks for qid in task.queries]
    random.Random(f"{seed}/split").shuffle(everything)
    if heldout >= len(everything):
        raise ValueError(f"cannot hold out {heldout} of {len(everything)} queries and still train")
    held = everything[:heldout]
    rest = everything[heldout:]
    return (rest if max_train is None else rest[:max_train]), held


Rankings = dict[str, dict[str, list[str]]]  # task -> query id -> document ids, best first


class NegativeSampler:
    """Draws up to `count` negatives per (query, positive): random documents of the query's task, or
    BM25's top-ranked ones (only documents that share a term with the query rank); never one of the
    query's relevant documents. BM25 ranks a task when first needed, unless `rankings` (of
    `mine_bm25_rankings`, e.g. read from a run's file) are given."""

    def __init__(self, tasks: list[LocoTask], count: int, kind: str = "random", seed: int = 0,
                 rankings: Rankings | None = None):
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"negatives kind {kind!r}; expected one of {NEGATIVE_KINDS}")
        if count < 0:
            raise ValueError(f"the number of negatives must be >= 0, got {count}")
        self.tasks = {task.name: task for task in tasks}
        self.count = count
        self.kind = kind
        self.seed = seed
        self._bm25 = dict(rankings or {})

    def __call__(self, task: str, qid: str, positive_pid: str) -> tuple[str, ...]:
        loco_task = self.tasks[task]
        relevant = set(loco_task.qrels[qid])
        if self.kind == "bm25":
            return tuple(pid for pid in self._bm25_ranking(task, qid) if pid not in relevant)[:self.count]
        # Sorted, so that the draw does not depend on the corpus file's order.
        pool = sorted(pid for pid in loco_task.documents if pid not in relevant)
        rng = random.Random(f"{self.seed}/{task}/{qid}/{positive_pid}")
        return tuple(rng.sample(pool, min(self.count, len(pool))))

    def _bm25_ranking(self, task: str, qid: str) -> list[str]:
        if task not in self._bm25:
            self._bm25[task] = bm25_ranking(self.tasks[task], self.count)
        return list(self._bm25[task].get(qid, ()))


def bm25_ranking(task: LocoTask, count: int) -> dict[str, list[str]]:
    """Every query's documents that share a term with it, best first: the ranking of `eval.loco`'s `bm25`
    baseline (same analyser, same scoring), deep enough to leave `count` irrelevant ones."""
    depth = count + max(len(relevant) for relevant in task.qrels.values())
    run = BM25Retriever(show_progress=False).retrieve(task, depth)
    logger.info("BM25 ranking of task %s: %d documents, %d queries", task.name, len(task.documents),
                len(task.queries))
    return {qid: list(documents) for qid, documents in run.items()}


def mine_bm25_rankings(tasks: list[LocoTask], count: int) -> Rankings:
    """`bm25_ranking` of every task."""
    return {task.name: bm25_ranking(task, count) for task in tasks}


def bm25_rankings_path(directory: Path, tasks: list[LocoTask], count: int) -> Path:
    """Where a run keeps its BM25 rankings: a file named by a fingerprint of everything they depend on (each
    task's documents, queries and relevance judgements, the depth and BM25's settings), so that a run on
    other data or settings never reads them."""
    digest = hashlib.sha256(json.dumps({"count": count, "bm25": BM25Retriever().describe()}, sort_keys=True).encode())
    for task in sorted(tasks, key=lambda t: t.name):
        for part in (task.name, sorted(task.documents.items()), sorted(task.queries.items()),
                     sorted((qid, sorted(relevant)) for qid, relevant in task.qrels.items())):
            digest.update(json.dumps(part).encode() + b"\0")
    return Path(directory) / f"bm25-rankings-{digest.hexdigest()[:16]}.json"


def write_rankings(path: Path, rankings: Rankings) -> None:
    """Write `rankings` to `path` whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(rankings))
    os.replace(temporary, path)


def read_rankings(path: Path) -> Rankings:
    try:
        rankings = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the BM25 rankings ({err})") from err
    if not (isinstance(rankings, dict) and all(isinstance(by_query, dict) and all(
            isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in by_query.values())
            for by_query in rankings.values())):
        raise ValueError(f"{path}: expected {{task: {{query id: [document ids]}}}}")
    return rankings


def build_examples(queries: list[tuple[str, str]], sampler: NegativeSampler,
                   tasks: list[LocoTask]) -> list[RetrievalExample]:
    """One example per (query, relevant document) of `queries` ((task, qid) pairs), in that order."""
    by_name = {task.name: task for task in tasks}
    examples = []
    for task, qid in queries:
        for positive in by_name[task].qrels[qid]:
            examples.append(RetrievalExample(task, qid, positive, sampler(task, qid, positive)))
    short = sum(len(e.negative_pids) < sampler.count for e in examples)
    if short:
        logger.warning("%d of %d examples have fewer than %d negatives (small corpora)", short, len(examples),
                       sampler.count)
    return examples


def labelled_pairs(examples: Iterable[RetrievalExample], repeat_positive: bool = True) -> list[LabelledPair]:
    """OPL units: per negative, (q, pos, 1.0) [every time, or only before the first] then (q, neg, 0.0).
    An example without negatives still contributes its positive pair."""
    pairs = []
    for example in examples:
        positive = LabelledPair(example.task, example.qid, example.positive_pid, 1.0)
        if not example.negative_pids:
            pairs.append(positive)
        for index, negative in enumerate(example.negative_pids):
            if repeat_positive or index == 0:
                pairs.append(positive)
            pairs.append(LabelledPair(example.task, example.qid, negative, 0.0))
    return pairs


def triplets(examples: Iterable[RetrievalExample]) -> list[Triplet]:
    """MNRL units: one (q, pos, neg) per negative; (q, pos, None) for an example without negatives."""
    units = []
    for example in examples:
        for negative in example.negative_pids or (None,):
            units.append(Triplet(example.task, example.qid, example.positive_pid, negative))
    return units


def shuffled(units: list, seed: int, epoch: int) -> list:
    """The units in the seeded order of `epoch` (a new order each epoch, the same on every rank)."""
    order = list(units)
    random.Random(f"{seed}/epoch{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class BatchPlan:
    """Which units each process embeds at each micro-step.

    Optimizer step s of an epoch consumes units [s * batch_size, (s + 1) * batch_size) of that epoch's
    order; micro-step m of rank r takes the `micro_batch_size` units at offset
    (m * world_size + r) * micro_batch_size within them. A remainder shorter than a batch is dropped.
    """

    units: int
    batch_size: int
    micro_batch_size: int
    world_size: int
    epochs: int
    max_steps: int | None

    def __post_init__(self):
        per_pass = self.micro_batch_size * self.world_size
        if self.batch_size % per_pass:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size x processes "
                             f"= {self.micro_batch_size} x {self.world_size}")
        if self.units < self.batch_size:
            raise ValueError(f"only {self.units} training units, fewer than one batch of {self.batch_size}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.units // self.batch_size

    @property
    def total_steps(self) -> int:
        full = self.steps_per_epoch * self.epochs
        return full if self.max_steps is None else min(full, self.max_steps)

    def micro_batches(self, step: int, rank: int) -> tuple[int, list[range]]:
        """(epoch, index ranges into that epoch's order) of `rank`'s micro-steps in optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.batch_size
        ranges = []
        for micro_step in range(self.accumulation_steps):
            offset = start + (micro_step * self.world_size + rank) * self.micro_batch_size
            ranges.append(range(offset, offset + self.micro_batch_size))
        return epoch, ranges


def fingerprint(units: list) -> str:
    """A digest of the unit list, to refuse resuming a checkpoint with different examples."""
    return hashlib.sha256("\n".join(map(repr, units)).encode()).hexdigest()[:16]

"""Retrieval fine-tuning of a text encoder under DeepSpeed, with the orthogonal projection loss (or MNRL).

    deepspeed train/finetune.py --config configs/finetune_m2_32k.yaml [KEY=VALUE ...] [--resume]
    python -m train.finetune --config configs/finetune_minilm_qmsum_opl.yaml training.max_steps=10

Any `model.encoders` encoder trains on the same examples: M2-BERT (a pretraining export, whose pooler
starts fresh, or the authors' checkpoints) and any sentence-transformers / Hugging Face encoder. Each
(query, relevant document) pair of the LoCo-format training split gets N negatives from its own task
(`train.retrieval_examples`). With OPL each micro-step embeds one query and one document and gradient
accumulation makes the batch, so memory does not grow with the number of negatives (docs/finetuning.md).

The run directory holds the resolved config, DeepSpeed checkpoints (`checkpoints/`, with the step and
random state), `metrics.jsonl`, TensorBoard logs, `curves.png`, `summary.json` and the final model
(`final/`): for M2 a checkpoint that `model.M2BertModel.from_pretrained`, `model.encoders.load_encoder`
(hence `eval.loco`) and `sentence_transformers.SentenceTransformer` all load; otherwise a
sentence-transformers directory. `--resume` continues from the latest checkpoint with the same
micro-batches (and, on CPU, the same losses) as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`deepspeed train/finetune.py`): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from eval.data import load_tasks
from train.checkpointing import CheckpointManager, export_pretrained
from train.cli import run_training, training_arguments
from train.config import apply_overrides, from_mapping, read_yaml
from train.distributed import (all_reduce_sum, barrier, deepspeed_config, initialize_engine, launch_environment, resolve_precision)
from train.logging_utils import METRICS_FILE, MetricsLogger, plot_training_curves, progress_bar
from train.losses import MultipleNegativesRankingLoss, OrthogonalProjectionLoss
from train.memory import peak_memory_bytes, reset_peak_memory
from train.optim import linear_warmup_decay
from train.retrieval_examples import (NEGATIVE_KINDS, NegativeSampler, RetrievalExample, TaskTexts, build_examples,
                                      labelled_pairs, shuffled, split_queries, triplets)

logger = logging.getLogger("train.finetune")

LOSSES = ("opl", "mnrl")
# The authors' fine-tuning decays every weight except biases and LayerNorm weights; M2's Hyena `d_skip` is
# their `bias` (and so undecayed), our `layer_norm` their `LayerNorm`.
NO_WEIGHT_DECAY = re.compile(r"(bias|LayerNorm\.weight|layer_norm\.weight|d_skip)$")


# --- config -------------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    """The encoder to fine-tune: an M2-BERT directory (pretraining export or the authors' checkpoint), a
    sentence-transformers or Hugging Face directory, or `all-MiniLM-L6-v2` (`model.encoders.load_encoder`)."""

    name_or_path: str
    overrides: dict = field(default_factory=dict)  # M2 config overrides, e.g. {padding_mode: masked}
    activation_checkpointing: bool = False


@dataclass
class DataSection:
    """Training queries and documents in the LoCoV1 schema (`eval.data.load_tasks`)."""

    path: str | None = None  # a folder of LoCo files, "hf" for LoCoV1 on the Hub, None for the bundled QMSum
    tasks: list[str] | None = None  # None: every task found
    split: str = "train"
    max_documents: int | None = None  # per task: a corpus subset, with the queries it answers (LocoTask.subset)
    max_queries: int | None = None  # a seeded random subset of training queries
    heldout_queries: int = 32  # held out of training to measure the cosine margin on unseen queries
    query_max_length: int | None = None  # tokens; None: the encoder's maximum
    document_max_length: int | None = None

    def __post_init__(self):
        if self.heldout_queries < 0:
            raise ValueError(f"heldout_queries must be >= 0, got {self.heldout_queries}")
        for key in ("max_documents", "max_queries"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")


@dataclass
class NegativesSection:
    """Negatives per (query, positive): random documents of the same task (the authors') or BM25's top."""

    per_positive: int = 32
    kind: str = "random"
    seed: int = 0
    heldout_per_query: int = 8

    def __post_init__(self):
        if self.kind not in NEGATIVE_KINDS:
            raise ValueError(f"negatives kind {self.kind!r}; expected one of {NEGATIVE_KINDS}")
        if self.per_positive < 0 or self.heldout_per_query < 1:
            raise ValueError(f"per_positive must be >= 0 and heldout_per_query >= 1, got {self.per_positive} "
                             f"and {self.heldout_per_query}")


@dataclass
class LossSection:
    name: str = "opl"
    repeat_positive: bool = True  # OPL: one positive pair per negative pair, as the authors' data (1:1)
    scale: float = 20.0  # MNRL: cosine scale (inverse temperature)

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss name {self.name!r}; expected one of {LOSSES}")


@dataclass
class OptimizerSection:
    """AdamW (no decay on biases and LayerNorm weights) with linear warmup then linear decay to 0."""

    lr: float = 5e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    warmup_fraction: float = 0.1


@dataclass
class TrainingSection:
    """Batching (in units: OPL pairs or MNRL triplets), duration, precision and cadences (optimizer steps)."""

    batch_size: int = 32  # units per optimizer step, over all processes and accumulation steps
    micro_batch_size: int = 1  # units per forward pass: 1 for OPL as in the paper, 2 for the MNRL baseline
    epochs: int = 1
    max_steps: int | None = None  # stop (and end the schedule) earlier than `epochs`
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # bf16 on GPU, fp32 on CPU
    log_every: int = 1
    eval_every: int = 100
    eval_batch_size: int = 8
    checkpoint_every: int = 500
    keep_last: int = 2

    def __post_init__(self):
        for key in ("batch_size", "micro_batch_size", "epochs", "log_every", "eval_every", "eval_batch_size",
                    "checkpoint_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")


@dataclass
class OutputSection:
    dir: str
    tensorboard: bool = True


@dataclass
class FinetuneConfig:
    """A fine-tuning run (one YAML file; see configs/finetune_*.yaml)."""

    model: ModelSection
    output: OutputSection
    data: DataSection = field(default_factory=DataSection)
    negatives: NegativesSection = field(default_factory=NegativesSection)
    loss: LossSection = field(default_factory=LossSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    deepspeed: dict = field(default_factory=lambda: {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0})


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    return from_mapping(FinetuneConfig, apply_overrides(read_yaml(path), overrides), where=str(path))


# --- batching -----------------------------------------------------------------------------------------

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


# --- objectives ---------------------------------------------------------------------------------------

@dataclass
class MicroStepOutput:
    """A micro-step's loss (to back-propagate) and the cosines it scored, for the logs."""

    loss: torch.Tensor
    positive_cosines: torch.Tensor  # detached, one per (query, relevant document) scored
    negative_cosines: torch.Tensor


class Embedder:
    """Tokenizes with the encoder and embeds through the DeepSpeed engine (queries and documents truncated
    to their own lengths)."""

    def __init__(self, engine, encoder, device: torch.device, query_max_length: int | None,
                 document_max_length: int | None):
        self.engine = engine
        self.encoder = encoder
        self.device = device
        self.query_max_length = query_max_length
        self.document_max_length = document_max_length

    def _embed(self, texts: list[str], max_length: int | None) -> torch.Tensor:
        features = self.encoder.tokenize(texts, max_length)
        return self.engine({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in features.items()})

    def queries(self, texts: list[str]) -> torch.Tensor:
        return self._embed(texts, self.query_max_length)

    def documents(self, texts: list[str]) -> torch.Tensor:
        return self._embed(texts, self.document_max_length)


class PairObjective:
    """OPL on `LabelledPair` units: a micro-step embeds its queries, then its documents, and scores the pairs."""

    def __init__(self, repeat_positive: bool):
        self.loss_fn = OrthogonalProjectionLoss()
        self.repeat_positive = repeat_positive

    def units(self, examples: list[RetrievalExample]) -> list:
        return labelled_pairs(examples, self.repeat_positive)

    def micro_step(self, embed: Embedder, batch: list, texts: TaskTexts) -> MicroStepOutput:
        queries = embed.queries([texts.query(p.task, p.qid) for p in batch])
        documents = embed.documents([texts.document(p.task, p.pid) for p in batch])
        labels = torch.tensor([p.label for p in batch], device=queries.device)
        loss = self.loss_fn(queries, documents, labels)
        cosines = F.cosine_similarity(queries.detach().float(), documents.detach().float(), dim=-1)
        return MicroStepOutput(loss, cosines[labels == 1.0], cosines[labels == 0.0])


class TripletObjective:
    """MNRL on `Triplet` units: a micro-step embeds its queries and all its documents (positives, then
    negatives) at once, as the loss needs every candidate of the micro-batch."""

    def __init__(self, scale: float):
        self.loss_fn = MultipleNegativesRankingLoss(scale)

    def units(self, examples: list[RetrievalExample]) -> list:
        return triplets(examples)

    def micro_step(self, embed: Embedder, batch: list, texts: TaskTexts) -> MicroStepOutput:
        with_negative = [i for i, t in enumerate(batch) if t.negative_pid is not None]
        queries = embed.queries([texts.query(t.task, t.qid) for t in batch])
        documents = embed.documents([texts.document(t.task, t.positive_pid) for t in batch]
                                    + [texts.document(batch[i].task, batch[i].negative_pid) for i in with_negative])
        positives, negatives = documents[:len(batch)], documents[len(batch):]
        loss = self.loss_fn(queries, positives, negatives if with_negative else None)
        q = queries.detach().float()
        positive_cosines = F.cosine_similarity(q, positives.detach().float(), dim=-1)
        negative_cosines = F.cosine_similarity(q[with_negative], negatives.detach().float(), dim=-1)
        return MicroStepOutput(loss, positive_cosines, negative_cosines)


def make_objective(section: LossSection):
    return PairObjective(section.repeat_positive) if section.name == "opl" else TripletObjective(section.scale)


# --- model --------------------------------------------------------------------------------------------

def build_encoder(section: ModelSection):
    """The encoder on CPU, in training mode (an M2 pretraining export gets a fresh pooler: seed first)."""
    from model.encoders import load_encoder

    encoder = load_encoder(section.name_or_path, **section.overrides)
    if section.activation_checkpointing:
        encoder.gradient_checkpointing_enable()
    return encoder.train()


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: `decay` and `no_decay` (biases, LayerNorm weights, Hyena `d_skip`)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if NO_WEIGHT_DECAY.search(name) else decay).append(param)
    return [group for group in ({"name": "decay", "params": decay, "weight_decay": weight_decay},
                                {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}) if group["params"]]


# --- metrics ------------------------------------------------------------------------------------------

class IntervalMetrics:
    """Sums over the micro-steps since the last log line: loss, and cosines of positive and negative pairs."""

    def __init__(self):
        self.values = torch.zeros(6, dtype=torch.float64)
        self.started = time.perf_counter()

    def add(self, output: MicroStepOutput) -> None:
        self.values += torch.tensor([output.loss.detach().double().item(), 1.0,
                                     output.positive_cosines.double().sum().item(), output.positive_cosines.numel(),
                                     output.negative_cosines.double().sum().item(), output.negative_cosines.numel()],
                                    dtype=torch.float64)

    def reduce(self) -> dict[str, float]:
        """Collective: the interval's means over all ranks; resets the interval."""
        loss_sum, micro_steps, positive_sum, positives, negative_sum, negatives = all_reduce_sum(self.values).tolist()
        positive = positive_sum / max(positives, 1)
        negative = negative_sum / max(negatives, 1)
        metrics = {"loss": loss_sum / max(micro_steps, 1), "positive_cosine": positive, "negative_cosine": negative,
                   "margin": positive - negative, "seconds": time.perf_counter() - self.started}
        self.values.zero_()
        self.started = time.perf_counter()
        return metrics


def heldout_metrics(encoder, examples: list[RetrievalExample], texts: TaskTexts, batch_size: int,
                    query_max_length: int | None, document_max_length: int | None) -> dict[str, float]:
    """Retrieval quality on examples never trained on, per example then averaged:
      * margin: cos(q, positive) - mean cos(q, negatives), and the two mean cosines;
      * accuracy: whether the positive outscores every negative;
      * loss: the OPL of its pairs laid out as the authors' training data, the positive pair once per
        negative pair: mean over negatives of ((cos(q, positive) - 1)^2 + cos(q, negative)^2) / 2.
    """
    query_keys = sorted({(e.task, e.qid) for e in examples})
    document_keys = sorted({(e.task, pid) for e in examples for pid in (e.positive_pid, *e.negative_pids)})
    query_vectors = torch.from_numpy(encoder.encode([texts.query(*k) for k in query_keys], batch_size,
                                                    query_max_length))
    document_vectors = torch.from_numpy(encoder.encode([texts.document(*k) for k in document_keys], batch_size,
                                                       document_max_length))
    query_row = {k: i for i, k in enumerate(query_keys)}
    document_row = {k: i for i, k in enumerate(document_keys)}
    query_vectors = F.normalize(query_vectors, dim=-1)
    document_vectors = F.normalize(document_vectors, dim=-1)
    per_example = []
    for e in examples:
        q = query_vectors[query_row[e.task, e.qid]]
        positive = float(q @ document_vectors[document_row[e.task, e.positive_pid]])
        negatives = [float(q @ document_vectors[document_row[e.task, pid]]) for pid in e.negative_pids]
        mean_negative = sum(negatives) / len(negatives)
        loss = sum(((positive - 1) ** 2 + n ** 2) / 2 for n in negatives) / len(negatives)
        wins = float(positive > max(negatives))
        per_example.append((positive - mean_negative, positive, mean_negative, wins, loss))
    means = [sum(column) / len(per_example) for column in zip(*per_example)]
    return dict(zip(("margin", "positive_cosine", "negative_cosine", "accuracy", "loss"), means))


def max_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return max(values)


# --- the run ------------------------------------------------------------------------------------------

class FineTuning:
    """One fine-tuning run: builds examples, encoder and engine, trains, evaluates, checkpoints and exports."""

    def __init__(self, config: FinetuneConfig, device: torch.device):
        self.config = config
        self.device = device
        self.env = launch_environment()
        self.output_dir = Path(config.output.dir)
        data, negatives, training = config.data, config.negatives, config.training

        tasks = [task.subset(max_documents=data.max_documents)
                 for task in load_tasks(data.path, data.tasks, split=data.split)]
        self.texts = TaskTexts(tasks)
        train_queries, heldout_queries = split_queries(tasks, data.heldout_queries, data.max_queries, negatives.seed)
        self.examples = build_examples(train_queries, NegativeSampler(tasks, negatives.per_positive, negatives.kind,
                                                                      negatives.seed), tasks)
        heldout = build_examples(heldout_queries, NegativeSampler(tasks, negatives.heldout_per_query, "random",
                                                                  negatives.seed), tasks)
        self.heldout = [e for e in heldout if e.negative_pids]  # a margin needs negatives
        self.objective = make_objective(config.loss)
        self.units = self.objective.units(self.examples)
        self.units_fingerprint = fingerprint(self.units)
        self.plan = BatchPlan(len(self.units), training.batch_size, training.micro_batch_size, self.env.world_size,
                              training.epochs, training.max_steps)
        logger.info("%d tasks, %d training queries -> %d examples -> %d %s units; %d steps of %d (%d accumulation "
                    "steps x %d per micro-step x %d processes); %d held-out queries", len(tasks), len(train_queries),
                    len(self.examples), len(self.units), config.loss.name, self.plan.total_steps,
                    training.batch_size, self.plan.accumulation_steps, training.micro_batch_size,
                    self.env.world_size, len(heldout_queries))

        torch.manual_seed(training.seed)  # the same fresh pooler (M2 pretraining exports) on every rank
        self.encoder = build_encoder(config.model)
        optimizer = torch.optim.AdamW(weight_decay_groups(self.encoder, config.optimizer.weight_decay),
                                      lr=config.optimizer.lr, betas=tuple(config.optimizer.betas),
                                      eps=config.optimizer.eps)
        scheduler = linear_warmup_decay(optimizer, self.plan.total_steps, config.optimizer.warmup_fraction)
        self.precision = resolve_precision(training.precision, device)
        ds_config = deepspeed_config(config.deepspeed, micro_batch_size=training.micro_batch_size,
                                     gradient_accumulation_steps=self.plan.accumulation_steps,
                                     precision=self.precision, world_size=self.env.world_size)
        self.engine = initialize_engine(self.encoder, optimizer, scheduler, ds_config)
        torch.manual_seed(training.seed + 1000 * (self.env.rank + 1))  # distinct dropout stream per rank
        self.embedder = Embedder(self.engine, self.encoder, device, data.query_max_length, data.document_max_length)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", training.keep_last)
        self.step = 0
        self._epoch_order: tuple[int, list] | None = None

    # --- data -------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, shuffled(self.units, self.config.training.seed, epoch))
        return self._epoch_order[1]

    # --- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        client_state = {"step": self.step, "units": len(self.units), "units_fingerprint": self.units_fingerprint,
                        "world_size": self.env.world_size, "batch_size": self.config.training.batch_size}
        path = self.checkpoints.save(self.engine, self.step, client_state)
        logger.info("checkpoint written: %s", path)

    def resume(self) -> bool:
        """Continue from the latest checkpoint; False (and a fresh start) when the run has none yet."""
        if self.checkpoints.latest() is None:
            logger.info("no checkpoint in %s: starting from step 0", self.checkpoints.directory)
            return False
        client_state, _ = self.checkpoints.load(self.engine)
        for key, expected in (("units_fingerprint", self.units_fingerprint),
                              ("batch_size", self.config.training.batch_size), ("world_size", self.env.world_size)):
            if client_state.get(key) != expected:
                raise ValueError(f"{self.checkpoints.directory}: the checkpoint has {key}={client_state.get(key)!r} "
                                 f"but this run has {expected!r}; resume with the config (data, negatives, loss, "
                                 "batch size) and number of processes it was written with")
        self.step = int(client_state["step"])
        return True

    # --- training ---------------------------------------------------------------------------------------
    def train_step(self, interval: IntervalMetrics) -> None:
        epoch, micro_batches = self.plan.micro_batches(self.step, self.env.rank)
        order = self.epoch_order(epoch)
        for indices in micro_batches:
            output = self.objective.micro_step(self.embedder, [order[i] for i in indices], self.texts)
            self.engine.backward(output.loss)
            self.engine.step()
            interval.add(output)
        self.step += 1

    def evaluate(self) -> dict[str, float]:
        data = self.config.data
        return heldout_metrics(self.encoder, self.heldout, self.texts, self.config.training.eval_batch_size,
                             data.query_max_length, data.document_max_length)

    def run(self, stop_after_steps: int | None = None) -> dict:
        training = self.config.training
        main = self.env.is_main
        total = self.plan.total_steps
        metrics_log = MetricsLogger(self.output_dir, enabled=main, tensorboard=self.config.output.tensorboard)
        eval_initial, last_train, last_eval = {}, {}, {}
        if self.heldout and self.step == 0:
            eval_initial = self.evaluate()
            metrics_log.log(0, "eval", eval_initial)
            logger.info("held-out before training: margin %.4f (cos positive %.4f, negative %.4f)",
                        eval_initial["margin"], eval_initial["positive_cosine"], eval_initial["negative_cosine"])
        last_step = min(total, stop_after_steps or total)
        bar = progress_bar(total=total, initial=self.step, enabled=main,
                           description=f"finetune ({self.config.loss.name})")
        interval = IntervalMetrics()
        started = time.perf_counter()
        reset_peak_memory(self.device)
        while self.step < last_step:
            self.train_step(interval)
            bar.update(1)
            if self.step % training.log_every == 0 or self.step == last_step:
                last_train = interval.reduce()
                last_train["lr"] = self.engine.get_lr()[0]
                metrics_log.log(self.step, "train", last_train)
                bar.set_postfix(loss=f"{last_train['loss']:.4f}", margin=f"{last_train['margin']:.3f}",
                                lr=f"{last_train['lr']:.2e}")
            if self.heldout and (self.step % training.eval_every == 0 or self.step == total):
                last_eval = self.evaluate()
                metrics_log.log(self.step, "eval", last_eval)
                logger.info("step %d held-out: margin %.4f accuracy %.3f", self.step, last_eval["margin"],
                            last_eval["accuracy"])
            if self.step % training.checkpoint_every == 0 or self.step == last_step:
                self.save_checkpoint()
        bar.close()
        peak = max_over_ranks(peak_memory_bytes(self.device))
        metrics_log.close()
        summary = {"step": self.step, "total_steps": total, "finished": self.step >= total,
                   "seconds": time.perf_counter() - started, "world_size": self.env.world_size,
                   "precision": self.precision, "zero_stage": self.engine.zero_optimization_stage(),
                   "loss": self.config.loss.name, "examples": len(self.examples), "units": len(self.units),
                   "heldout_examples": len(self.heldout), "negatives_per_positive": self.config.negatives.per_positive,
                   "accumulation_steps": self.plan.accumulation_steps, "peak_memory_bytes": peak,
                   "train": last_train, "eval_initial": eval_initial, "eval": last_eval}
        if summary["finished"]:
            export_pretrained(self.engine, lambda: build_encoder(self.config.model), self.output_dir / "final",
                              save=lambda encoder, directory: encoder.save(directory))
            summary["export"] = str(self.output_dir / "final")
        if main:
            if (self.output_dir / METRICS_FILE).is_file():
                plot_training_curves(self.output_dir, self.output_dir / "curves.png", panels=("loss", "margin"),
                                     title=f"retrieval fine-tuning, {self.config.loss.name} ({self.output_dir.name})")
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        barrier()
        return summary


# --- command line -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_arguments(__doc__.split("\n\n")[0], "configs/finetune_*.yaml",
                                "loss.name=mnrl training.micro_batch_size=2 output.dir=runs/x")
    return parser.parse_intermixed_args(argv)


def format_summary(summary: dict) -> str:
    lines = [f"fine-tuning ({summary['loss']}) {'finished' if summary['finished'] else 'stopped'} at step "
             f"{summary['step']}/{summary['total_steps']} in {summary['seconds']:.1f} s on {summary['world_size']} "
             f"process(es) ({summary['precision']}, ZeRO stage {summary['zero_stage']}); {summary['examples']} "
             f"examples, {summary['units']} units, peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB"]
    if summary["train"]:
        train = summary["train"]
        lines.append(f"  last train step: loss {train['loss']:.4f}, cos positive {train['positive_cosine']:.4f}, "
                     f"negative {train['negative_cosine']:.4f}")
    for key, label in (("eval_initial", "held-out before"), ("eval", "held-out after")):
        if summary[key]:
            values = summary[key]
            lines.append(f"  {label}: loss {values['loss']:.4f}, margin {values['margin']:.4f} (cos positive "
                         f"{values['positive_cosine']:.4f}, negative {values['negative_cosine']:.4f}), "
                         f"accuracy {values['accuracy']:.3f}")
    if "export" in summary:
        lines.append(f"  fine-tuned model: {summary['export']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_training(parse_args(argv), load_finetune_config, FineTuning, format_summary)


if __name__ == "__main__":
    sys.exit(main())

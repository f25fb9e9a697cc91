"""The retrieval fine-tuning task: a text encoder trained with the orthogonal projection loss, MNRL or cached MNRL.

Its config adds `model` (any `model.encoders` encoder), `data` (LoCo-format tasks), `negatives` and `loss`
to the shared sections. Each (query, relevant document) pair of the training split gets N negatives from
its own task (`train.retrieval_examples`; BM25's are mined once per run into `<output.dir>/negatives`);
the objective lays the examples out as units (OPL pairs or MNRL triplets, `train.retrieval_objectives`),
which `BatchPlan` deals out to the processes and micro-steps of each optimizer step. With OPL one
micro-step embeds one query and one document and gradient accumulation makes the batch, so memory does
not grow with the number of negatives (docs/finetuning.md). With cached MNRL a micro-step's triplets,
gathered over the processes, are one contrastive batch, embedded `loss.mini_batch_size` texts at a time
with one `backward` call per mini-batch, so memory does not grow with the batch either. The
evaluation is the cosine margin, accuracy and OPL loss on held-out queries, before and during training.
The export is the encoder's own format (`TextEncoder.save`): for M2 a checkpoint that `model.M2BertModel`,
`model.encoders.load_encoder` and sentence-transformers load; otherwise a sentence-transformers folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.data import LocoTask, load_tasks
from model.encoders import TextEncoder, check_loadable, load_encoder
from train.config import RunConfig
from train.distributed import LaunchEnvironment, barrier
from train.retrieval_examples import (NEGATIVE_KINDS, BatchPlan, NegativeSampler, Rankings, RetrievalExample,
                                      TaskTexts, bm25_rankings_path, build_examples, fingerprint, mine_bm25_rankings,
                                      read_rankings, shuffled, split_queries, write_rankings)
from train.retrieval_objectives import CachedTripletObjective, Embedder, PairObjective, TripletObjective
from train.trainer import Backward, Task

logger = logging.getLogger(__name__)

LOSSES = ("opl", "mnrl", "cached_mnrl")


@dataclass
class ModelSection:
    """The encoder to fine-tune: an M2-BERT directory (pretraining export or the authors' checkpoint), a
    sentence-transformers or Hugging Face directory, or `all-MiniLM-L6-v2` (`model.encoders.load_encoder`).
    A folder that would run code of its own (a module it names, Python files it ships) is refused unless
    `trust_remote_code`. A sentence-transformers encoder reads up to the longer of `data.query_max_length` and
    `data.document_max_length` when they are set (its `max_seq_length`, also in the export)."""

    name_or_path: str
    overrides: dict = field(default_factory=dict)  # M2 config overrides, e.g. {padding_mode: masked}
    activation_checkpointing: bool = False
    trust_remote_code: bool = False


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
    """`opl` (pairs), `mnrl` (triplets; the micro-batch is the contrastive batch) or `cached_mnrl` (the same
    loss over each micro-batch, gathered over the processes, in the memory of `mini_batch_size` texts)."""

    name: str = "opl"
    repeat_positive: bool = True  # OPL: one positive pair per negative pair, as the authors' data (1:1)
    scale: float = 20.0  # MNRL, cached MNRL: cosine scale (inverse temperature)
    mini_batch_size: int = 8  # cached MNRL: texts per forward pass

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss name {self.name!r}; expected one of {LOSSES}")
        if self.mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be at least 1, got {self.mini_batch_size}")


@dataclass(kw_only=True)
class FinetuneConfig(RunConfig):
    """A fine-tuning run (one YAML file; see configs/finetune_*.yaml). Batch sizes count units (OPL pairs or
    MNRL triplets). Keys a file leaves out get the authors' fine-tuning recipe (reference §4.2): AdamW at
    lr 5e-6 with 10% warmup, no weight decay on biases and norms, 32 units per optimizer step, one epoch."""

    SECTION_DEFAULTS = {
        "optimizer": {"lr": 5e-6, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01, "warmup_fraction": 0.1,
                      "decay_biases_and_norms": False},
        "training": {"global_batch_size": 32, "epochs": 1, "log_every": 1, "eval_every": 100, "eval_batch_size": 8,
                     "checkpoint_every": 500},
    }

    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    negatives: NegativesSection = field(default_factory=NegativesSection)
    loss: LossSection = field(default_factory=LossSection)


def make_objective(section: LossSection) -> PairObjective | TripletObjective | CachedTripletObjective:
    if section.name == "opl":
        return PairObjective(section.repeat_positive)
    if section.name == "mnrl":
        return TripletObjective(section.scale)
    return CachedTripletObjective(section.scale, section.mini_batch_size)


def check_encoder_source(section: ModelSection) -> None:
    """What `load_encoder` would refuse about the model (`model.encoders.check_loadable`), before any work."""
    try:
        check_loadable(section.name_or_path, trust_remote_code=section.trust_remote_code)
    except PermissionError as err:
        raise PermissionError(f"model.name_or_path: {err} (in a fine-tuning config: model.trust_remote_code: "
                              "true)") from None
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"model.name_or_path: {err}") from None


def build_encoder(section: ModelSection, data: DataSection) -> TextEncoder:
    """The encoder on CPU, in training mode (an M2 pretraining export gets a fresh pooler: seed first)."""
    lengths = [n for n in (data.query_max_length, data.document_max_length) if n is not None]
    # sentence-transformers truncates at its max_seq_length (256 for all-MiniLM-L6-v2) whatever it is asked for
    encoder = load_encoder(section.name_or_path, max_length=max(lengths, default=None),
                           trust_remote_code=section.trust_remote_code, **section.overrides)
    if section.activation_checkpointing:
        encoder.gradient_checkpointing_enable()
    return encoder.train()


def heldout_metrics(encoder: TextEncoder, examples: list[RetrievalExample], texts: TaskTexts, batch_size: int,
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


class RetrievalTask(Task):
    """Retrieval fine-tuning on LoCo-format examples (module docstring)."""

    config_class = FinetuneConfig
    title = "retrieval fine-tuning"
    headline_metrics = ("loss", "margin")
    evaluate_before_training = True

    @classmethod
    def check_inputs(cls, config: FinetuneConfig) -> None:
        check_encoder_source(config.model)

    def __init__(self, config: FinetuneConfig, env: LaunchEnvironment, device: torch.device):
        self.config = config
        self.env = env
        self.device = device
        data, negatives, training = config.data, config.negatives, config.training
        self.name = f"finetune ({config.loss.name})"

        tasks = [task.subset(max_documents=data.max_documents)
                 for task in load_tasks(data.path, data.tasks, split=data.split)]
        self.texts = TaskTexts(tasks)
        train_queries, heldout_queries = split_queries(tasks, data.heldout_queries, data.max_queries, negatives.seed)
        rankings = self.bm25_rankings(tasks) if negatives.kind == "bm25" else None
        self.examples = build_examples(train_queries, NegativeSampler(tasks, negatives.per_positive, negatives.kind,
                                                                      negatives.seed, rankings), tasks)
        heldout = build_examples(heldout_queries, NegativeSampler(tasks, negatives.heldout_per_query, "random",
                                                                  negatives.seed), tasks)
        self.heldout = [e for e in heldout if e.negative_pids]  # a margin needs negatives
        self.objective = make_objective(config.loss)
        self.units = self.objective.units(self.examples)
        self.backward_calls = self.objective.backward_calls(training.micro_batch_size)
        self.units_fingerprint = fingerprint(self.units)
        per_step = training.micro_batch_size * env.world_size * training.accumulation_steps(env.world_size)
        self.plan = BatchPlan(len(self.units), per_step, training.micro_batch_size, env.world_size,
                              training.epochs or 1, training.max_steps)
        self.total_steps = self.plan.total_steps
        logger.info("%d tasks, %d training queries -> %d examples -> %d %s units; %d steps of %d (%d accumulation "
                    "steps x %d per micro-step x %d processes); %d held-out queries", len(tasks), len(train_queries),
                    len(self.examples), len(self.units), config.loss.name, self.plan.total_steps, per_step,
                    self.plan.accumulation_steps, training.micro_batch_size, env.world_size, len(heldout_queries))
        if config.loss.name == "cached_mnrl":
            logger.info("cached MNRL: contrastive batches of %d triplets (%d per micro-step x %d processes, gathered), "
                        "%d texts per forward pass, %d backward calls per micro-step",
                        training.micro_batch_size * env.world_size, training.micro_batch_size, env.world_size,
                        config.loss.mini_batch_size, self.backward_calls)
        self.encoder: TextEncoder | None = None
        self._epoch_order: tuple[int, list] | None = None

    def bm25_rankings(self, tasks: list[LocoTask]) -> Rankings:
        """Collective: the BM25 rankings for the negatives, mined by the main process into the run's folder unless
        an earlier start of the run already did (same data and settings); every process then reads that file."""
        path = bm25_rankings_path(Path(self.config.output.dir) / "negatives", tasks, self.config.negatives.per_positive)
        if self.env.is_main:
            if path.is_file():
                logger.info("BM25 negatives: reading the rankings mined earlier, %s", path)
            else:
                write_rankings(path, mine_bm25_rankings(tasks, self.config.negatives.per_positive))
                logger.info("BM25 negatives: rankings mined and written to %s", path)
        barrier()
        return read_rankings(path)

    def build_model(self) -> TextEncoder:
        self.encoder = build_encoder(self.config.model, self.config.data)
        return self.encoder

    def epoch_order(self, epoch: int) -> list:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, shuffled(self.units, self.config.training.seed, epoch))
        return self._epoch_order[1]

    def micro_step(self, step: int, index: int, model, backward: Backward) -> dict[str, float]:
        epoch, micro_batches = self.plan.micro_batches(step, self.env.rank)
        order = self.epoch_order(epoch)
        data = self.config.data
        embed = Embedder(model, self.encoder, self.device, data.query_max_length, data.document_max_length)
        output = self.objective.micro_step(embed, [order[i] for i in micro_batches[index]], self.texts, backward)
        return {"loss": output.loss.double().item(), "micro_steps": 1.0,
                "positive_sum": output.positive_cosines.double().sum().item(),
                "positives": output.positive_cosines.numel(),
                "negative_sum": output.negative_cosines.double().sum().item(),
                "negatives": output.negative_cosines.numel()}

    def interval_metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        """The mean micro-step loss and the mean cosines of the positive and negative pairs scored."""
        positive = sums["positive_sum"] / max(sums["positives"], 1)
        negative = sums["negative_sum"] / max(sums["negatives"], 1)
        return {"loss": sums["loss"] / max(sums["micro_steps"], 1), "positive_cosine": positive,
                "negative_cosine": negative, "margin": positive - negative}

    def evaluate(self, model) -> dict[str, float] | None:
        if not self.heldout:
            return None
        data = self.config.data
        return heldout_metrics(self.encoder, self.heldout, self.texts, self.config.training.eval_batch_size,
                               data.query_max_length, data.document_max_length)

    def state_dict(self) -> dict:
        return {"units_fingerprint": self.units_fingerprint, "global_batch_size": self.plan.batch_size}

    def load_state_dict(self, state: dict, rank_state: dict[str, torch.Tensor]) -> None:
        for key, expected in (("units_fingerprint", self.units_fingerprint),
                              ("global_batch_size", self.plan.batch_size)):
            if state.get(key) != expected:
                raise ValueError(f"the checkpoint has {key}={state.get(key)!r} but this run has {expected!r}; "
                                 "resume with the config (data, negatives, loss, batch size) it was written with")

    def fresh_model(self) -> TextEncoder:
        return build_encoder(self.config.model, self.config.data)

    def save_model(self, model: TextEncoder, directory: Path) -> None:
        model.save(directory)

    def summary(self) -> dict:
        return {"loss": self.config.loss.name, "examples": len(self.examples), "units": len(self.units),
                "heldout_examples": len(self.heldout), "negatives_per_positive": self.config.negatives.per_positive,
                "negatives_kind": self.config.negatives.kind, "backward_calls_per_micro_step": self.backward_calls}

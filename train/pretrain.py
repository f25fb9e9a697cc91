"""Masked-LM pretraining of M2-BERT under DeepSpeed ZeRO on the `dataprep` mixture.

    deepspeed train/pretrain.py --config configs/pretrain_tiny.yaml [KEY=VALUE ...] [--resume]
    torchrun --nproc_per_node 2 -m train.pretrain --config configs/pretrain_80M_2k.yaml training.max_steps=100

One process per device (CPU processes with gloo, or GPUs with NCCL). The run directory holds the
resolved config, DeepSpeed checkpoints (`checkpoints/`, with the data position and random state),
`metrics.jsonl`, TensorBoard logs, `curves.png`, `summary.json` and, at the end, the `save_pretrained`
export (`final/`) that `model.M2BertForMaskedLM.from_pretrained` loads. `--resume` continues from the
latest checkpoint with the same batches (and, on CPU, the same losses) as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`deepspeed train/pretrain.py`): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from train.checkpointing import CheckpointManager, export_pretrained
from train.cli import run_training, training_arguments
from train.config import from_mapping, apply_overrides, read_yaml
from train.distributed import (all_reduce_sum, barrier, deepspeed_config, initialize_engine,
                               launch_environment, resolve_precision)
from train.logging_utils import METRICS_FILE, MetricsLogger, peak_memory_bytes, plot_training_curves, progress_bar
from train.mlm_data import DataConfig, MLMMasker, PaddingCollator, eval_samples, manifest_seq_len, train_loader
from train.mlm_eval import evaluate_mlm
from train.optim import OptimizerConfig, build_adamw, linear_warmup_decay

logger = logging.getLogger("train.pretrain")


@dataclass
class ModelSection:
    """The model to train: a preset (with config overrides) or a `save_pretrained` directory to start from."""

    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    init_from: str | None = None
    activation_checkpointing: bool = False

    def __post_init__(self):
        if (self.preset is None) == (self.init_from is None):
            raise ValueError("set exactly one of model.preset and model.init_from")


@dataclass
class TrainingSection:
    """Batching, duration, precision and the cadence of logging, evaluation and checkpoints."""

    max_steps: int
    micro_batch_size: int
    gradient_accumulation_steps: int | None = None
    global_batch_size: int | None = None
    seed: int = 17
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 10
    eval_every: int = 500
    eval_batch_size: int | None = None
    checkpoint_every: int = 1000
    keep_last: int = 3

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; from `global_batch_size` when that is set, so
        that one config keeps its batch size on any number of nodes."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"training.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"micro_batch_size x processes = {self.micro_batch_size} x {world_size}")
        return self.global_batch_size // per_step

    def __post_init__(self):
        for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "global_batch_size", "log_every",
                    "eval_every", "checkpoint_every", "keep_last"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.gradient_accumulation_steps is not None and self.global_batch_size is not None:
            raise ValueError("set gradient_accumulation_steps or global_batch_size, not both")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; expected auto, cpu or cuda")


@dataclass
class OutputSection:
    dir: str
    tensorboard: bool = True


@dataclass
class PretrainConfig:
    """A pretraining run (one YAML file; see configs/pretrain_*.yaml)."""

    model: ModelSection
    data: DataConfig
    training: TrainingSection
    output: OutputSection
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    deepspeed: dict = field(default_factory=lambda: {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0})


def load_pretrain_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    return from_mapping(PretrainConfig, apply_overrides(read_yaml(path), overrides), where=str(path))


def build_model(section: ModelSection, seq_len: int):
    """The masked-LM model on CPU (same initial weights on every rank for the same seed)."""
    from model import M2BertConfig, M2BertForMaskedLM

    if section.init_from is not None:
        model = M2BertForMaskedLM.from_pretrained(section.init_from, **section.overrides)
    else:
        model = M2BertForMaskedLM(M2BertConfig.from_preset(section.preset, **section.overrides))
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    if model.config.padding_mode != "masked":
        logger.warning("padding_mode=%r: padded positions influence the others; pretraining expects 'masked'",
                       model.config.padding_mode)
    if section.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


class StepMetrics:
    """Sums over the micro-batches since the last log line: masked-token loss, hits, masked and real tokens."""

    def __init__(self):
        self.values = torch.zeros(4, dtype=torch.float64)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
        targets = labels[labels != -100]
        n_masked = targets.numel()
        hits = (logits.detach().argmax(-1) == targets).sum()
        self.values += torch.tensor([loss.detach().double().item() * n_masked, hits.item(), n_masked,
                                     attention_mask.sum().item()], dtype=torch.float64)

    def reduce(self) -> dict[str, float]:
        """Collective: the interval's metrics over all ranks; resets the interval."""
        total = all_reduce_sum(self.values)
        elapsed = time.perf_counter() - self.started
        loss_sum, hits, masked, tokens = total.tolist()
        metrics = {"loss": loss_sum / max(masked, 1), "accuracy": hits / max(masked, 1),
                   "tokens_per_second": tokens / max(elapsed, 1e-9), "tokens": tokens}
        self.values.zero_()
        self.started = time.perf_counter()
        return metrics


class Pretraining:
    """One pretraining run: builds data, model and engine, trains, evaluates, checkpoints and exports."""

    def __init__(self, config: PretrainConfig, device: torch.device):
        self.config = config
        self.device = device
        self.env = launch_environment()
        self.output_dir = Path(config.output.dir)
        self.seq_len = config.data.seq_len or manifest_seq_len(config.data.manifest)
        training = config.training

        torch.manual_seed(training.seed)  # identical initial weights on every rank
        model = build_model(config.model, self.seq_len)
        self.model_config = model.config
        optimizer = build_adamw(model, config.optimizer, device)
        scheduler = linear_warmup_decay(optimizer, training.max_steps, config.optimizer.warmup_fraction,
                                        config.optimizer.final_lr_fraction)
        self.precision = resolve_precision(training.precision, device)
        self.accumulation_steps = training.accumulation_steps(self.env.world_size)
        ds_config = deepspeed_config(config.deepspeed, micro_batch_size=training.micro_batch_size,
                                     gradient_accumulation_steps=self.accumulation_steps,
                                     precision=self.precision, world_size=self.env.world_size)
        self.engine = initialize_engine(model, optimizer, scheduler, ds_config)
        torch.manual_seed(training.seed + 1000 * (self.env.rank + 1))  # distinct dropout stream per rank

        if config.data.clean_stale_shared_memory:
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()
        self.collator = PaddingCollator(self.seq_len, pad_to=config.data.pad_to)
        self.masker = MLMMasker(config.data.mlm_probability, seed=training.seed + self.env.rank + 1)
        self.loader = train_loader(config.data, training.micro_batch_size, self.collator)
        self.eval_batch_size = training.eval_batch_size or training.micro_batch_size
        self.eval_set = eval_samples(config.data, config.data.eval_samples, self.eval_batch_size)
        self.eval_collator = PaddingCollator(self.seq_len, pad_to="longest")
        self.eval_masker = MLMMasker(config.data.eval_mlm_probability, seed=training.seed + 7919 * (self.env.rank + 1))
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", training.keep_last)
        self.step = 0
        self.resumed_from = None
        self.tokens_seen = 0.0
        self._epoch_iterator = None

    # --- data -------------------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next padded batch; a finished epoch starts the next (StreamingDataset reshuffles it)."""
        for _ in range(2):
            if self._epoch_iterator is None:
                self._epoch_iterator = iter(self.loader)
            try:
                return next(self._epoch_iterator)
            except StopIteration:
                self._epoch_iterator = None
        raise RuntimeError(f"{self.config.data.manifest}: the training split yields no full batch of "
                           f"{self.config.training.micro_batch_size} samples per rank")

    # --- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        client_state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.loader.state_dict(),
                        "seq_len": self.seq_len, "world_size": self.env.world_size}
        path = self.checkpoints.save(self.engine, self.step, client_state,
                                     rank_state={"masking_generator": self.masker.generator_state()})
        logger.info("checkpoint written: %s", path)

    def resume(self) -> bool:
        """Continue from the latest checkpoint; False (and a fresh start) when the run has none yet."""
        if self.checkpoints.latest() is None:
            logger.info("no checkpoint in %s: starting from step 0", self.checkpoints.directory)
            return False
        client_state, rank_state = self.checkpoints.load(self.engine)
        if client_state.get("world_size") != self.env.world_size:
            logger.warning("resuming a %s-process run with %d processes: the data order stays deterministic, "
                           "but random masking and dropout streams differ", client_state.get("world_size"),
                           self.env.world_size)
        self.step = int(client_state["step"])
        self.resumed_from = self.step
        self.tokens_seen = float(client_state.get("tokens_seen", 0.0))
        self.loader.load_state_dict(client_state["data"])
        if "masking_generator" in rank_state:
            self.masker.set_generator_state(rank_state["masking_generator"])
        return True

    # --- training ---------------------------------------------------------------------------------------
    def train_step(self, metrics: StepMetrics) -> None:
        for _ in range(self.accumulation_steps):
            batch = self.masker(self.next_batch())
            inputs = {k: batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}
            output = self.engine(**inputs)
            self.engine.backward(output.loss)
            self.engine.step()
            metrics.add(output.loss, output.logits, inputs["labels"], inputs["attention_mask"])
        self.step += 1

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()  # also empties the filters' spectrum caches: the weights changed since last time
        metrics = evaluate_mlm(self.engine, self.eval_set, self.eval_collator, self.eval_masker,
                               self.eval_batch_size, self.device)
        self.engine.module.clear_spectrum_caches()  # at 32k they hold gigabytes that training needs
        self.engine.train()
        return metrics

    def log_train(self, interval: StepMetrics, metrics_log: MetricsLogger, bar) -> dict[str, float]:
        """Collective: reduce the interval's metrics, write them and show them on the progress bar."""
        metrics = interval.reduce()
        self.tokens_seen += metrics.pop("tokens")
        metrics.update(lr=self.engine.get_lr()[0], memory_gb=peak_memory_bytes(self.device) / 2**30,
                       tokens_seen=self.tokens_seen)
        metrics_log.log(self.step, "train", metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}", lr=f"{metrics['lr']:.2e}",
                        tok_s=f"{metrics['tokens_per_second']:.0f}")
        return metrics

    def run(self, stop_after_steps: int | None = None) -> dict:
        """Train to `max_steps` (or `stop_after_steps`), evaluating and checkpointing on the way; then
        export (when finished), plot the curves and write the summary. Returns the summary."""
        training = self.config.training
        main = self.env.is_main
        metrics_log = MetricsLogger(self.output_dir, enabled=main, tensorboard=self.config.output.tensorboard)
        last_step = min(training.max_steps, stop_after_steps or training.max_steps)
        bar = progress_bar(total=training.max_steps, initial=self.step, enabled=main, description="pretrain")
        interval = StepMetrics()
        started = time.perf_counter()
        last_train, last_eval = {}, {}
        while self.step < last_step:
            self.train_step(interval)
            bar.update(1)
            if self.step % training.log_every == 0 or self.step == last_step:
                last_train = self.log_train(interval, metrics_log, bar)
            if self.step % training.eval_every == 0 or self.step == training.max_steps:
                last_eval = self.evaluate()
                metrics_log.log(self.step, "eval", last_eval)
                logger.info("step %d eval: loss %.4f accuracy %.4f", self.step, last_eval["loss"],
                            last_eval["accuracy"])
            if self.step % training.checkpoint_every == 0 or self.step == last_step:
                self.save_checkpoint()
        bar.close()
        metrics_log.close()
        summary = {"step": self.step, "max_steps": training.max_steps, "finished": self.step >= training.max_steps,
                   "seconds": time.perf_counter() - started, "world_size": self.env.world_size,
                   "precision": self.precision, "zero_stage": self.engine.zero_optimization_stage(),
                   "seq_len": self.seq_len, "resumed_from": self.resumed_from,
                   "global_batch_size": training.micro_batch_size * self.accumulation_steps * self.env.world_size,
                   "train": last_train, "eval": last_eval}
        if summary["finished"]:
            export_pretrained(self.engine, self._fresh_model, self.output_dir / "final")
            summary["export"] = str(self.output_dir / "final")
        if main:
            if (self.output_dir / METRICS_FILE).is_file():
                plot_training_curves(self.output_dir, self.output_dir / "curves.png",
                                     title=f"M2-BERT MLM pretraining ({self.output_dir.name})")
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        barrier()
        return summary

    def _fresh_model(self):
        from model import M2BertForMaskedLM

        return M2BertForMaskedLM(self.model_config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_arguments(__doc__.split("\n\n")[0], "configs/pretrain_*.yaml",
                                "training.max_steps=100 output.dir=runs/x")
    return parser.parse_intermixed_args(argv)


def format_summary(summary: dict) -> str:
    train, evaluation = summary.get("train", {}), summary.get("eval", {})
    lines = [f"pretraining {'finished' if summary['finished'] else 'stopped'} at step {summary['step']}/"
             f"{summary['max_steps']} in {summary['seconds']:.1f} s on {summary['world_size']} process(es) "
             f"({summary['precision']}, ZeRO stage {summary['zero_stage']}, seq_len {summary['seq_len']})"]
    if train:
        lines.append(f"  last train: loss {train['loss']:.4f}, accuracy {train['accuracy']:.4f}, "
                     f"{train['tokens_per_second']:.0f} tokens/s, peak memory {train['memory_gb']:.2f} GiB")
    if evaluation:
        lines.append(f"  last eval:  loss {evaluation['loss']:.4f}, accuracy {evaluation['accuracy']:.4f} "
                     f"({evaluation['masked_tokens']:.0f} masked tokens)")
    if "export" in summary:
        lines.append(f"  exported model: {summary['export']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_training(parse_args(argv), load_pretrain_config, Pretraining, format_summary)


if __name__ == "__main__":
    sys.exit(main())

"""The training loop of every run: one `Trainer`, and the `Task` interface that pretraining and fine-tuning fill in.

The trainer owns what the jobs share: the DeepSpeed engine (the model, AdamW over `train.optim`'s parameter
groups with the warmup/decay schedule, ZeRO, precision), the loop and its gradient accumulation, the
interval metrics and their reduction over ranks, the evaluation cadence, checkpoints and resume, the fp32
export, TensorBoard / `metrics.jsonl` / progress bar / curves, the summary and the command line (`main`).
A `Task` says what differs: its model, what one micro-step computes, what it evaluates and what it must
checkpoint to resume exactly (`train.mlm_task.MaskedLMTask`, `train.retrieval_task.RetrievalTask`). A
task never touches the engine or the checkpoint layout: a micro-step gets the model to call and a
`backward` to turn its losses into gradients, once or (gradient caching) several times.

    trainer = Trainer(config, MaskedLMTask(config, env, device), device)
    trainer.resume()                 # optional: continue from the latest checkpoint
    summary = trainer.run()
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from train.checkpointing import CheckpointManager, export_pretrained
from train.config import RunConfig, load_config, to_mapping, write_yaml
from train.distributed import (all_reduce, barrier, deepspeed_config, init_distributed,
                               initialize_engine, launch_environment, resolve_precision, shutdown)
from train.files import atomic_write_text
from train.logging_utils import METRICS_FILE, MetricsLogger, plot_training_curves, progress_bar, setup_logging
from train.memory import peak_memory_bytes, reset_peak_memory
from train.optim import build_adamw, linear_warmup_decay

logger = logging.getLogger(__name__)

Backward = Callable[[torch.Tensor], None]


class Task:
    """What a training job adds to the `Trainer`, constructed as `task_class(config, env, device)`. Subclasses
    set the attributes and implement the methods that have no default.

    `config_class` is the job's config schema; `name` labels the progress bar and the summary, `title` the
    curves; `headline_metrics` are shown on the progress bar and plotted; `total_steps` is the length of the
    run and its schedule; `backward_calls` is how many times each micro-step calls `backward` (more than one
    when it back-propagates its micro-batch in pieces, as gradient caching does).
    """

    config_class: type[RunConfig]
    name: str
    title: str
    headline_metrics: tuple[str, ...] = ("loss",)
    evaluate_before_training: bool = False  # a starting point to compare with
    backward_calls: int = 1
    total_steps: int

    @classmethod
    def check_inputs(cls, config: RunConfig) -> None:
        """Refuse what the config names that could not be used, or would run code unasked (e.g. a model folder
        shipping its own), before anything is written or built; the error names the file or key."""

    def build_model(self) -> torch.nn.Module:
        """The model to train, on CPU, in training mode; called after seeding, so identical on every rank."""
        raise NotImplementedError

    def micro_step(self, step: int, index: int, model: Callable, backward: Backward) -> dict[str, float]:
        """Run micro-batch `index` of optimizer step `step` on this rank through `model` and call
        `backward(loss)` `backward_calls` times, with losses that add up to the micro-batch's. Returns values
        to log, summed over micro-steps and ranks until the next log line (the same keys every time)."""
        raise NotImplementedError

    def interval_metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        """One log interval's metrics from its summed micro-step values and its duration."""
        raise NotImplementedError

    def evaluate(self, model: Callable) -> dict[str, float] | None:
        """Collective: metrics of the current weights (`model` is in eval mode); None without an evaluation set."""
        return None

    def state_dict(self) -> dict:
        """What the task needs to resume exactly and is the same on every rank, as plain data."""
        return {}

    def rank_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's own resumable state (e.g. a random generator's), as tensors."""
        return {}

    def load_state_dict(self, state: dict, rank_state: dict[str, torch.Tensor]) -> None:
        """Restore both (`rank_state` is empty when the checkpoint has none for this rank); ValueError when the
        checkpoint was written for other data."""

    def fresh_model(self) -> torch.nn.Module:
        """A model of the trained one's class and config on CPU, to receive the full fp32 weights for export."""
        raise NotImplementedError

    def save_model(self, model: torch.nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        """Facts about the run for `summary.json` (e.g. its sequence length or number of examples)."""
        return {}


class IntervalSums:
    """The task's micro-step values summed since the last log line (in float64), and when the interval started."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, a checkpoint) out of the interval's duration."""
        self.started += seconds

    def reduce(self) -> tuple[dict[str, float], float]:
        """Collective: the interval's sums over all ranks and its seconds; starts the next interval."""
        total = all_reduce(torch.tensor(list(self.sums.values()), dtype=torch.float64)).tolist()
        seconds = time.perf_counter() - self.started
        sums, self.sums, self.started = dict(zip(self.sums, total)), {}, time.perf_counter()
        return sums, seconds


class Trainer:
    """One training run of a `Task` under DeepSpeed: builds the engine, trains, evaluates, checkpoints,
    exports and summarises."""

    def __init__(self, config: RunConfig, task: Task, device: torch.device):
        self.config = config
        self.task = task
        self.device = device
        self.env = launch_environment()
        self.output_dir = Path(config.output.dir)
        training, optimizer_config = config.training, config.optimizer
        self.accumulation_steps = training.accumulation_steps(self.env.world_size)
        self.total_steps = task.total_steps

        torch.manual_seed(training.seed)  # identical initial weights (and fresh poolers) on every rank
        model = task.build_model()
        optimizer = build_adamw(model, optimizer_config, device)
        scheduler = linear_warmup_decay(optimizer, self.total_steps, optimizer_config.warmup_fraction,
                                        optimizer_config.final_lr_fraction)
        self.precision = resolve_precision(training.precision, device)
        ds_config = deepspeed_config(config.deepspeed, micro_batch_size=training.micro_batch_size,
                                     gradient_accumulation_steps=self.accumulation_steps * task.backward_calls,
                                     precision=self.precision, world_size=self.env.world_size)
        self.engine = initialize_engine(model, optimizer, scheduler, ds_config)
        torch.manual_seed(training.seed + 1000 * (self.env.rank + 1))  # distinct dropout stream per rank
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", training.keep_last)
        self.step = 0
        self.resumed_from: int | None = None
        self._backward_calls = 0

    # --- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective: the engine's state with the trainer's and the task's."""
        state = {"step": self.step, "world_size": self.env.world_size, "task": self.task.state_dict()}
        path = self.checkpoints.save(self.engine, self.step, state, rank_state=self.task.rank_state_dict())
        logger.info("checkpoint written: %s", path)

    def resume(self) -> bool:
        """Collective: continue from the newest complete checkpoint; False (and a fresh start) when the run has
        none yet. `train.checkpointing.CheckpointError` when it has checkpoints but none to resume from."""
        found = self.checkpoints.load(self.engine)
        if found is None:
            logger.info("no checkpoint in %s: starting from step 0", self.checkpoints.directory)
            return False
        tag, state, rank_state = found
        if "task" not in state:
            raise ValueError(f"{self.checkpoints.directory / tag}: not a checkpoint of train.trainer (no task state)")
        if state["world_size"] != self.env.world_size:
            logger.warning("resuming a %d-process run with %d processes: the data order stays the same, but the "
                           "random streams (dropout, masking) differ", state["world_size"], self.env.world_size)
        try:
            self.task.load_state_dict(state["task"], rank_state)
        except ValueError as err:
            raise ValueError(f"{self.checkpoints.directory / tag}: {err}") from err
        self.step = self.resumed_from = int(state["step"])
        return True

    # --- training ---------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of (a share of) a micro-batch's loss, averaged over the accumulation steps. DeepSpeed counts
        each call as one of its micro-steps (hence `backward_calls` x accumulation steps in its config; calling
        its `backward` twice per `step()` would lose gradients under ZeRO 1 and 2), and after the last call of
        an optimizer step it reduces the gradients over ranks and updates the weights."""
        self._backward_calls += 1
        self.engine.backward(loss / self.accumulation_steps, scale_wrt_gas=False)
        self.engine.step()

    def train_step(self, interval: IntervalSums) -> None:
        """One optimizer step: the task's micro-steps on this rank."""
        for index in range(self.accumulation_steps):
            self._backward_calls = 0
            interval.add(self.task.micro_step(self.step, index, self.engine, self.backward))
            if self._backward_calls != self.task.backward_calls:
                raise RuntimeError(f"{type(self.task).__name__}.micro_step called backward {self._backward_calls} "
                                   f"times; the task declares backward_calls={self.task.backward_calls}")
        self.step += 1

    def log_train(self, interval: IntervalSums, metrics_log: MetricsLogger, bar) -> dict[str, float]:
        """Collective: reduce the interval's metrics, write them and show them on the progress bar."""
        sums, seconds = interval.reduce()
        metrics = self.task.interval_metrics(sums, seconds)
        metrics.update(lr=self.engine.get_lr()[0], memory_gb=peak_memory_bytes(self.device) / 2**30,
                       seconds=seconds)
        metrics_log.log(self.step, "train", metrics)
        bar.set_postfix({key: f"{metrics[key]:.4g}" for key in (*self.task.headline_metrics, "lr")})
        return metrics

    def evaluate(self, metrics_log: MetricsLogger) -> dict[str, float]:
        """Collective: the task's evaluation of the current weights, logged; {} when it has none."""
        self.engine.eval()
        metrics = self.task.evaluate(self.engine)
        self.engine.train()  # also empties the Hyena filters' spectrum caches, which at 32k hold gigabytes
        if metrics is None:
            return {}
        metrics_log.log(self.step, "eval", metrics)
        logger.info("step %d eval: %s", self.step, format_metrics(metrics))
        return metrics

    def run(self, stop_after_steps: int | None = None) -> dict:
        """Train to the task's last step (or `stop_after_steps`), evaluating and checkpointing on the way;
        then export (when finished), plot the curves and write the summary. Returns the summary."""
        training = self.config.training
        main = self.env.is_main
        metrics_log = MetricsLogger(self.output_dir, enabled=main, tensorboard=self.config.output.tensorboard,
                                    resumed_from=self.resumed_from)
        eval_initial, last_train, last_eval = {}, {}, {}
        if self.task.evaluate_before_training and self.step == 0:
            eval_initial = self.evaluate(metrics_log)
        last_step = min(self.total_steps, stop_after_steps or self.total_steps)
        bar = progress_bar(total=self.total_steps, initial=self.step, enabled=main, description=self.task.name)
        reset_peak_memory(self.device)  # the training phase's peak, without loading
        interval = IntervalSums()
        started = time.perf_counter()
        while self.step < last_step:
            self.train_step(interval)
            bar.update(1)
            if self.step % training.log_every == 0 or self.step == last_step:
                last_train = self.log_train(interval, metrics_log, bar)
            paused = time.perf_counter()  # the intervals' seconds (throughput) count training only
            if self.step % training.eval_every == 0 or self.step == self.total_steps:
                last_eval = self.evaluate(metrics_log) or last_eval
            if self.step % training.checkpoint_every == 0 or self.step == last_step:
                self.save_checkpoint()
            interval.exclude(time.perf_counter() - paused)
        bar.close()
        peak = int(all_reduce(torch.tensor([peak_memory_bytes(self.device)]), dist.ReduceOp.MAX).item())
        metrics_log.close()
        summary = {"task": self.task.name, "step": self.step, "total_steps": self.total_steps,
                   "finished": self.step >= self.total_steps, "seconds": time.perf_counter() - started,
                   "resumed_from": self.resumed_from, "world_size": self.env.world_size, "precision": self.precision,
                   "zero_stage": self.engine.zero_optimization_stage(), "accumulation_steps": self.accumulation_steps,
                   "global_batch_size": training.micro_batch_size * self.accumulation_steps * self.env.world_size,
                   "peak_memory_bytes": peak, **self.task.summary(),
                   "train": last_train, "eval_initial": eval_initial, "eval": last_eval}
        if summary["finished"]:
            export_pretrained(self.engine, self.task.fresh_model, self.task.save_model, self.output_dir / "final")
            summary["export"] = str(self.output_dir / "final")
        if main:
            if (self.output_dir / METRICS_FILE).is_file():
                plot_training_curves(self.output_dir, self.output_dir / "curves.png",
                                     panels=self.task.headline_metrics,
                                     title=f"{self.task.title} ({self.output_dir.name})")
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        barrier()
        return summary


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())


def format_summary(summary: dict) -> str:
    """The summary as the command line prints it at the end of a run."""
    lines = [f"{summary['task']} {'finished' if summary['finished'] else 'stopped'} at step {summary['step']}/"
             f"{summary['total_steps']} in {summary['seconds']:.1f} s on {summary['world_size']} process(es) "
             f"({summary['precision']}, ZeRO stage {summary['zero_stage']}, global batch "
             f"{summary['global_batch_size']}), peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB"]
    for key, label in (("train", "last train"), ("eval_initial", "eval before training"), ("eval", "last eval")):
        if summary[key]:
            lines.append(f"  {label}: {format_metrics(summary[key])}")
    if "export" in summary:
        lines.append(f"  model: {summary['export']}")
    return "\n".join(lines)


def main(argv: list[str] | None, task_class: type[Task], description: str) -> int:
    """The training command of a task (`train.pretrain`, `train.finetune`; `description`: its usage text).

    Loads the config, joins the process group, records the resolved config in the run directory, starts
    or resumes the run, prints the summary on rank 0 and leaves the group. Exit status 1 when the last
    training loss is not finite."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. training.max_steps=100 output.dir=runs/x")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output directory (fresh start if none)")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="checkpoint and stop after this many optimizer steps (as if preempted)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    env = launch_environment()
    setup_logging(env.rank)
    config = load_config(task_class.config_class, args.config, args.overrides)
    task_class.check_inputs(config)
    device = init_distributed(config.training.device)
    output_dir = Path(config.output.dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(to_mapping(config), output_dir / "config.yaml")
    trainer = Trainer(config, task_class(config, env, device), device)
    if args.resume:
        trainer.resume()
    elif trainer.checkpoints.has_checkpoints():
        raise SystemExit(f"{trainer.checkpoints.directory} already holds checkpoints: pass --resume to continue "
                         "that run, or choose another output.dir")
    summary = trainer.run(stop_after_steps=args.stop_after_steps)
    shutdown()
    if env.is_main:
        print(format_summary(summary))
    return 0 if math.isfinite(summary["train"].get("loss", 0.0)) else 1

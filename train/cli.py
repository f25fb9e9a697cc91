"""The command-line lifecycle shared by the training commands (`train.pretrain`, `train.finetune`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from train.config import to_mapping, write_yaml
from train.distributed import init_distributed, launch_environment, shutdown
from train.logging_utils import setup_logging


def training_arguments(description: str, config_pattern: str, override_example: str) -> argparse.ArgumentParser:
    """`--config FILE [KEY=VALUE ...] [--resume] [--stop-after-steps K]`, as every training command takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML run config ({config_pattern})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"config overrides, e.g. {override_example}")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output directory (fresh start if none)")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="checkpoint and stop after this many optimizer steps (as if preempted)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def run_training(args: argparse.Namespace, load_config: Callable, run_class: Callable,
                 format_summary: Callable[[dict], str]) -> int:
    """Load the config, join the process group, record the resolved config, start or resume the run,
    print its summary on rank 0 and leave the group. Exit status 1 when the last training loss is not finite."""
    env = launch_environment()
    setup_logging(env.rank)
    config = load_config(args.config, args.overrides)
    device = init_distributed(config.training.device)
    output_dir = Path(config.output.dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(to_mapping(config), output_dir / "config.yaml")
    run = run_class(config, device)
    if args.resume:
        run.resume()
    elif run.checkpoints.latest() is not None:
        raise SystemExit(f"{run.checkpoints.directory} already holds checkpoints: pass --resume to continue "
                         "that run, or choose another output.dir")
    summary = run.run(stop_after_steps=args.stop_after_steps)
    shutdown()
    if env.is_main:
        print(format_summary(summary))
    return 0 if math.isfinite(summary.get("train", {}).get("loss", 0.0)) else 1

"""Pretraining throughput and peak memory: training tokens per second of full DeepSpeed MLM steps.

    python bench/pretrain.py --out bench/results/pretrain            # CPU here; CUDA when there is a GPU
    python bench/pretrain.py --cases tiny-128 80M-2k --steps 3

Each case runs in its own process (so that the peak memory is its own): the model, a one-process
DeepSpeed ZeRO-1 engine with the recipe's AdamW and parameter groups, and `--steps` timed optimizer steps
(after one untimed warm-up step) on full-length batches of random tokens masked at 30%, the
throughput-relevant shape of the `concat` samples that make up 70% of the mixture. Writes
`pretrain.json` (all figures, with the ratios of the 80M model with and without activation
checkpointing measured in the same run) and `pretrain.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# name: (preset, seq_len, micro_batch_size, activation checkpointing)
CASES = {
    "tiny-128": ("m2-bert-tiny", 128, 8, False),
    "tiny-2k": ("m2-bert-tiny", 2048, 2, False),
    "80M-2k": ("m2-bert-80M-2k", 2048, 1, False),
    "80M-2k-ckpt": ("m2-bert-80M-2k", 2048, 1, True),
}


def run_case(name: str, steps: int, device_kind: str, threads: int | None) -> dict:
    """Time `steps` optimizer steps of one case in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from train.config import HyenaGroupConfig, OptimizerConfig
    from train.distributed import deepspeed_config, init_distributed, initialize_engine, resolve_precision
    from train.memory import peak_memory_bytes
    from train.mlm_data import MLMMasker
    from train.mlm_task import ModelSection, build_model
    from train.optim import build_adamw, linear_warmup_decay

    preset, seq_len, micro_batch, checkpointing = CASES[name]
    device = init_distributed(device_kind)
    baseline = peak_memory_bytes(device)
    torch.manual_seed(0)
    model = build_model(ModelSection(preset=preset, overrides={"max_position_embeddings": seq_len},
                                     activation_checkpointing=checkpointing), seq_len)
    optim = OptimizerConfig(hyena_filter=HyenaGroupConfig(1e-3, 0.1), hyena_positional=HyenaGroupConfig(1e-5, 0.0))
    optimizer = build_adamw(model, optim, device)
    scheduler = linear_warmup_decay(optimizer, 1000, optim.warmup_fraction)
    precision = resolve_precision("auto", device)
    engine = initialize_engine(model, optimizer, scheduler, deepspeed_config(
        {"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}, micro_batch_size=micro_batch,
        gradient_accumulation_steps=1, precision=precision, world_size=1))
    masker = MLMMasker(0.30, seed=0)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        tokens = torch.randint(1000, 30000, (micro_batch, seq_len), generator=generator)  # (B, L)
        tokens[:, 0], tokens[:, -1] = 101, 102
        batch = masker({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})
        output = engine(**{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")})
        engine.backward(output.loss)
        engine.step()

    step()  # warm-up: allocator, FFT plans, lazily built optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = peak_memory_bytes(device)
    return {
        "case": name, "preset": preset, "seq_len": seq_len, "micro_batch_size": micro_batch,
        "activation_checkpointing": checkpointing, "precision": precision, "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "parameters": model.num_parameters(), "steps": steps, "seconds_per_step": seconds / steps,
        "tokens_per_second": steps * micro_batch * seq_len / seconds,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_above_baseline_gib": (peak - baseline) / 2**30 if device.type == "cpu" else peak / 2**30,
        "memory_kind": "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


def device_description(device_kind: str, threads: int | None) -> str:
    import torch

    if device_kind != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{threads or torch.get_num_threads()} torch thread(s)")


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [r["tokens_per_second"] for r in results], color="tab:blue")
    axes[0].set_ylabel("training tokens / s")
    axes[0].set_yscale("log")
    axes[1].bar(names, [r["peak_memory_gib"] for r in results], color="tab:orange")
    axes[1].set_ylabel(f"peak memory (GiB, {results[0]['memory_kind']})")
    for axis in axes:
        axis.tick_params(axis="x", rotation=20)
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per case")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per case (default: torch's choice); on a shared or busy CPU, 1 "
                             "avoids OpenMP threads spinning against other processes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pretrain")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # a child process's one case
    args = parser.parse_args(argv)

    if args.case:
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_case(args.case, args.steps, args.device, args.threads)))
        return 0

    from tqdm import tqdm

    results = []
    for name in tqdm(args.cases, desc="bench cases"):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        child = subprocess.run([sys.executable, __file__, "--case", name, "--steps", str(args.steps), "--device",
                                args.device, *(["--threads", str(args.threads)] if args.threads else [])],
                               capture_output=True, text=True, env=env)
        if child.returncode != 0:
            print(child.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"case {name} failed (exit {child.returncode})")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    by_case = {r["case"]: r for r in results}
    ratios = {}
    if {"80M-2k", "80M-2k-ckpt"} <= set(by_case):
        plain, ckpt = by_case["80M-2k"], by_case["80M-2k-ckpt"]
        ratios["80M-2k activation checkpointing: time per step (ckpt / plain)"] = (
            ckpt["seconds_per_step"] / plain["seconds_per_step"])
        ratios["80M-2k activation checkpointing: peak memory above baseline (ckpt / plain)"] = (
            ckpt["peak_memory_above_baseline_gib"] / plain["peak_memory_above_baseline_gib"])
    if {"tiny-2k", "80M-2k"} <= set(by_case):
        ratios["tokens/s at 2k (tiny / 80M)"] = by_case["tiny-2k"]["tokens_per_second"] / by_case["80M-2k"]["tokens_per_second"]
    report = {"benchmark": "pretrain", "device": device_description(args.device, args.threads), "results": results, "ratios": ratios,
              "command": " ".join([Path(sys.executable).name, "bench/pretrain.py", *(argv or sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out / "pretrain.png", f"M2-BERT MLM training step ({report['device']})")

    print(f"{'case':<14}{'params':>12}{'s/step':>10}{'tokens/s':>12}{'peak GiB':>10}")
    for r in results:
        print(f"{r['case']:<14}{r['parameters']:>12,}{r['seconds_per_step']:>10.3f}{r['tokens_per_second']:>12.0f}"
              f"{r['peak_memory_gib']:>10.2f}")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    print(f"wrote {args.out / 'pretrain.json'} and {args.out / 'pretrain.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of the Monarch Mixer kernels on a GPU, measured side by side in one run.

Systems, each in one dtype (bfloat16 by default) on full-length inputs (`reference` padding, as the released
models run):
- `m2-kernels`: the 80M M2-BERT through the kernel path (`kernel_implementation="cuda"`, which fails loudly
  rather than falling back);
- `m2-torch`: the same model through the PyTorch path (`kernel_implementation="torch"`);
- `m2-torch-compile`: the PyTorch path under `torch.compile` (compile time reported apart, not timed);
- `sdpa-transformer`: a BERT-base-sized transformer (12 layers, 768 wide, 12 heads, FFN 3072) whose attention
  is PyTorch's scaled_dot_product_attention.

Measurements: first the two ceilings of the machine (a device-to-device copy, counting bytes read and
written, and a bf16 8192^3 matrix product); then forward tokens/s at 2k, 8k and 32k positions (batch
--tokens-per-batch / length, halved on out-of-memory) with peak memory; then one fine-tuning step
(forward, cosine loss on the embedding, backward, AdamW) at 32k with batch 1: time and peak memory.
Times are medians of CUDA-event timings after warm-up.

Each forward rate is also given as a fraction of two bounds (`cost_per_token`):
- memory: tokens/s x the bytes the model must move per token / the measured copy bandwidth (and the
  H200's datasheet 4.8 TB/s). Bytes counted per layer at the operation level: each of the layer's
  operations reads its inputs and writes its outputs once in the activation dtype (for M2: in_proj, the
  mixer core as one fused operation, out_proj, the GLU's first GEMM, the GELU gate, its second GEMM,
  dropout + residual + LayerNorm: 16 H + 6 I values per token; for the transformer: QKV, attention as one
  fused operation, output projection, two residual + LayerNorms, FFN in, GELU, FFN out: 18 H + 4 I), plus
  the embeddings (4 H); weights and filter spectra, read once per batch, are left out.
- arithmetic: tokens/s x the model FLOPs per token / the measured bf16 matrix rate (GEMMs 2 x m x n x k,
  attention 4 L H per layer, FFT convolutions 5 n log2 n per row and transform pair).

Measurements run in priority order; with --time-budget-s, one that no longer fits is recorded as skipped.
The JSON is rewritten after every measurement, so a run stopped from outside keeps what it measured.

    python bench/kernels.py --out bench/results/kernels.json     # also writes kernels.png
    python bench/kernels.py --dry-run --out /tmp/kernels.json    # CPU, tiny models: checks this script only
                                                                 # (there m2-kernels falls back to PyTorch)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model import M2BertConfig, M2BertModel  # noqa: E402
from model.kernels import transform_size  # noqa: E402

logger = logging.getLogger("bench.kernels")

PRESETS = {2048: "m2-bert-80M-2k", 8192: "m2-bert-80M-8k", 32768: "m2-bert-80M-32k"}
DRY_RUN_LENGTHS = (128, 256)
GOAL_TOKENS_PER_SECOND_32K = 2.5e6
GOAL_SPEEDUP_32K = 3.0
H200_DATASHEET = {"memory_bytes_per_second": 4.8e12, "bf16_dense_flops_per_second": 989e12}
SYSTEMS = ("m2-kernels", "m2-torch", "m2-torch-compile", "sdpa-transformer")
FINETUNE_SYSTEMS = ("m2-kernels", "m2-torch", "sdpa-transformer")
COLORS = {"m2-kernels": "tab:blue", "m2-torch": "tab:orange", "m2-torch-compile": "tab:green",
          "sdpa-transformer": "tab:red"}
# Rough seconds a measurement takes on an H100-class GPU, to skip one that no longer fits the budget.
ESTIMATED_SECONDS = {"forward": 15, "compile": 90, "finetune": 20}


class SdpaEncoderLayer(nn.Module):
    """A post-LN BERT layer whose attention is F.scaled_dot_product_attention."""

    def __init__(self, hidden: int = 768, heads: int = 12, intermediate: int = 3072):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, head_dim)
        h = self.attention_norm(h + self.attention_out(attended.transpose(1, 2).reshape(batch, length, hidden)))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


@dataclass(frozen=True)
class TransformerShape:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 30528


class SdpaBert(nn.Module):
    """BERT-base-sized encoder (learned positions up to `max_length`) returning the [CLS] embedding."""

    def __init__(self, max_length: int, shape: TransformerShape = TransformerShape()):
        super().__init__()
        self.word_embeddings = nn.Embedding(shape.vocab_size, shape.hidden)
        self.position_embeddings = nn.Embedding(max_length, shape.hidden)
        self.embedding_norm = nn.LayerNorm(shape.hidden, eps=1e-12)
        self.layers = nn.ModuleList(SdpaEncoderLayer(shape.hidden, shape.heads, shape.intermediate)
                                    for _ in range(shape.layers))
        self.pooler = nn.Linear(shape.hidden, shape.hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embedding_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        for layer in self.layers:
            h = layer(h)
        return torch.tanh(self.pooler(h[:, 0]))


# --- what each system must move and compute per token ----------------------------------------------------

def m2_cost_per_token(config: M2BertConfig, length: int, value_bytes: int) -> dict[str, float]:
    """Forward bytes (operation-level floor) and FLOPs per token of an M2-BERT encoder (module docstring)."""
    hidden, inner, blocks = config.hidden_size, config.intermediate_size, config.monarch_mlp_nblocks
    fft_size = 2 * length if config.padding_mode == "reference" else None
    n = fft_size or transform_size(length)
    convolutions = 2 if config.residual_long_conv else 1
    layer_flops = (2 * hidden * 3 * hidden + 2 * hidden * hidden  # in_proj, out_proj
                   + 2 * hidden * 2 * inner / blocks + 2 * inner * hidden / blocks  # block-diagonal GLU
                   + 2 * 3 * 3 * hidden  # width-3 depthwise conv
                   + convolutions * hidden * (5 * n * math.log2(n) + 6 * (n // 2 + 1)) / length)  # FFT conv
    layer_values = 16 * hidden + 6 * inner
    return {"bytes": (layer_values * config.num_hidden_layers + 4 * hidden) * value_bytes,
            "flops": layer_flops * config.num_hidden_layers}


def transformer_cost_per_token(shape: TransformerShape, length: int, value_bytes: int) -> dict[str, float]:
    hidden, inner = shape.hidden, shape.intermediate
    layer_flops = 2 * (3 * hidden * hidden + hidden * hidden + 2 * hidden * inner) + 4 * length * hidden
    layer_values = 18 * hidden + 4 * inner
    return {"bytes": (layer_values * shape.layers + 4 * hidden) * value_bytes, "flops": layer_flops * shape.layers}


# --- timing --------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of step() over `repeats` runs after `warmup` runs: CUDA events on a GPU, the host
    clock (after a synchronisation) elsewhere."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure_ceilings(device: torch.device, dry_run: bool) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) and the bf16 matrix-product rate."""
    elements = (1 << 16) if dry_run else (1 << 30)  # 2 GiB of bf16 on a GPU
    source = torch.randn(elements, device=device).to(torch.bfloat16)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, warmup=3, repeats=10)
    copy_rate = 2 * source.numel() * source.element_size() / seconds
    del source, target
    size = 256 if dry_run else 8192
    a, b = (torch.randn(size, size, device=device).to(torch.bfloat16) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, device, warmup=3, repeats=10)
    return {"copy_bytes_per_second": copy_rate, "bf16_matmul_flops_per_second": 2 * size**3 / seconds,
            "copy_gib": 2 * elements * 2 / 2**30, "matmul_size": size}


# --- the systems ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """Where and at what size the benchmark runs: the GPU, or the CPU with tiny models for --dry-run."""

    device: torch.device
    dtype: torch.dtype
    dry_run: bool

    def m2_config(self, system: str, length: int) -> M2BertConfig:
        implementation = "cuda" if system == "m2-kernels" else "torch"
        if self.dry_run:  # the kernels need a GPU: `auto` takes the PyTorch path on the CPU
            implementation = "auto" if system == "m2-kernels" else implementation
            return M2BertConfig.from_preset("m2-bert-tiny", max_position_embeddings=length, padding_mode="reference",
                                            kernel_implementation=implementation)
        return M2BertConfig.from_preset(PRESETS[length], padding_mode="reference", kernel_implementation=implementation)

    @property
    def transformer(self) -> TransformerShape:
        return TransformerShape(hidden=64, layers=2, heads=2, intermediate=128) if self.dry_run else TransformerShape()

    def build(self, system: str, length: int) -> nn.Module:
        torch.manual_seed(0)
        if system == "sdpa-transformer":
            model = SdpaBert(length, self.transformer)
        else:
            model = M2BertModel(self.m2_config(system, length))
        return model.to(self.device, self.dtype)

    def cost_per_token(self, system: str, length: int) -> dict[str, float]:
        value_bytes = torch.finfo(self.dtype).bits // 8
        if system == "sdpa-transformer":
            return transformer_cost_per_token(self.transformer, length, value_bytes)
        return m2_cost_per_token(self.m2_config(system, length), length, value_bytes)


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids, torch.ones_like(input_ids))
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def forward_throughput(setup: Setup, system: str, length: int, batch: int, warmup: int, repeats: int,
                       ceilings: dict) -> dict:
    """Forward tokens/s at the largest batch <= `batch` (halving on out-of-memory) that fits."""
    built = setup.build(system, length).eval()
    model = torch.compile(built) if system == "m2-torch-compile" else built
    compile_seconds = None
    try:
        while True:
            input_ids = torch.randint(1000, 30000, (batch, length), device=setup.device)
            reset_peak_memory(setup.device)
            try:
                with torch.no_grad():
                    if system == "m2-torch-compile" and compile_seconds is None:
                        started = time.perf_counter()
                        embed(model, input_ids)  # compiles
                        synchronize(setup.device)
                        compile_seconds = time.perf_counter() - started
                    seconds = median_seconds(lambda: embed(model, input_ids), setup.device, warmup, repeats)
                break
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                compile_seconds = None
                torch.cuda.empty_cache()
                logger.info("%s at %d: out of memory, retrying with batch %d", system, length, batch)
        peak = peak_memory_gib(setup.device)
    finally:
        del model, built
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    rate = batch * length / seconds
    cost = setup.cost_per_token(system, length)
    row = {"system": system, "length": length, "batch": batch, "seconds_per_batch": seconds,
           "tokens_per_second": rate, "peak_memory_gib": peak, "bytes_per_token": cost["bytes"],
           "flops_per_token": cost["flops"],
           "fraction_of_copy_bandwidth": rate * cost["bytes"] / ceilings["copy_bytes_per_second"],
           "fraction_of_datasheet_bandwidth": rate * cost["bytes"] / H200_DATASHEET["memory_bytes_per_second"],
           "fraction_of_matmul_rate": rate * cost["flops"] / ceilings["bf16_matmul_flops_per_second"]}
    if compile_seconds is not None:
        row["compile_seconds"] = compile_seconds
    logger.info("%-18s L=%-6d batch=%-4d %.4f s/batch %12.0f tokens/s  %.1f%% of copy bandwidth, %.1f%% of matmul "
                "rate%s", system, length, batch, seconds, rate, 100 * row["fraction_of_copy_bandwidth"],
                100 * row["fraction_of_matmul_rate"], "" if peak is None else f", peak {peak:.1f} GiB")
    return row


def finetune_step(setup: Setup, system: str, length: int, warmup: int, repeats: int) -> dict:
    """Seconds and peak memory of one training step at batch 1: forward, a cosine loss on the embedding,
    backward, AdamW."""
    reset_peak_memory(setup.device)
    model = setup.build(system, length).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids = torch.randint(1000, 30000, (1, length), device=setup.device)
    target = torch.randn(1, setup.transformer.hidden if system == "sdpa-transformer" else model.config.hidden_size,
                         device=setup.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = 1 - F.cosine_similarity(embed(model, input_ids).float(), target).mean()
        loss.backward()
        optimizer.step()

    try:
        seconds = median_seconds(step, setup.device, warmup, repeats)
        peak = peak_memory_gib(setup.device)
    finally:
        del model, optimizer
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    logger.info("%-18s fine-tuning step at L=%d, batch 1: %.3f s%s", system, length, seconds,
                "" if peak is None else f" (peak {peak:.1f} GiB)")
    return {"system": system, "length": length, "batch": 1, "seconds": seconds, "peak_memory_gib": peak}


# --- the run -------------------------------------------------------------------------------------------

def plan(lengths: list[int], finetune_length: int) -> list[tuple[str, str, int]]:
    """(kind, system, length) in priority order: what the issue asks first, the slow compile last."""
    jobs = [("forward", system, length) for system in ("m2-kernels", "m2-torch", "sdpa-transformer")
            for length in sorted(lengths, reverse=True)]
    jobs += [("finetune", system, finetune_length) for system in FINETUNE_SYSTEMS]
    jobs += [("compile", "m2-torch-compile", length) for length in sorted(lengths, reverse=True)]
    return jobs


def ratios(result: dict) -> dict:
    def rate(system, length):
        return next((r["tokens_per_second"] for r in result["forward"]
                     if r["system"] == system and r["length"] == length), None)

    out = {}
    for length in result["lengths"]:
        kernels, others = rate("m2-kernels", length), {s: rate(s, length) for s in SYSTEMS if s != "m2-kernels"}
        if kernels is not None:
            out[str(length)] = {f"kernels_over_{s.replace('-', '_')}": kernels / r for s, r in others.items() if r}
    step = {r["system"]: r["seconds"] for r in result["finetune"]}
    if "m2-kernels" in step and "m2-torch" in step:
        out["finetune_step_torch_over_kernels"] = step["m2-torch"] / step["m2-kernels"]
    return out


def write(result: dict, path: Path) -> None:
    result["ratios"] = ratios(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.4))
    for system in SYSTEMS:
        rows = sorted((r for r in result["forward"] if r["system"] == system), key=lambda r: r["length"])
        if not rows:
            continue
        lengths = [r["length"] for r in rows]
        left.plot(lengths, [r["tokens_per_second"] for r in rows], marker="o", label=system, color=COLORS[system])
        middle.plot(lengths, [100 * r["fraction_of_copy_bandwidth"] for r in rows], marker="o", label=system,
                    color=COLORS[system])
    if not result.get("dry_run"):
        left.axhline(GOAL_TOKENS_PER_SECOND_32K, color="grey", linestyle=":", label="goal at 32k")
    for axis in (left, middle):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length")
        axis.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("forward tokens / s")
    left.set_title(f"forward throughput ({result['dtype']}, {result['device']})", fontsize=9)
    middle.set_ylabel("% of the copy bandwidth bound")
    middle.set_title("bytes moved per token (operation floor) x tokens/s / copy bandwidth", fontsize=9)
    steps = result["finetune"]
    if steps:
        bars = right.bar([r["system"] for r in steps], [r["seconds"] for r in steps],
                         color=[COLORS[r["system"]] for r in steps])
        for bar, row in zip(bars, steps):
            if row["peak_memory_gib"] is not None:
                right.annotate(f"{row['peak_memory_gib']:.1f} GiB",
                               (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                               fontsize=8)
        right.set_title(f"one fine-tuning step, L={steps[0]['length']}, batch 1 (peak memory on the bars)", fontsize=9)
    right.set_ylabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    print(f"{'system':<18} {'length':>6} {'batch':>5} {'tokens/s':>12} {'%copy-bw':>9} {'%matmul':>8} {'peak GiB':>9}")
    for r in result["forward"]:
        peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        print(f"{r['system']:<18} {r['length']:>6} {r['batch']:>5} {r['tokens_per_second']:>12.0f} "
              f"{100 * r['fraction_of_copy_bandwidth']:>8.1f}% {100 * r['fraction_of_matmul_rate']:>7.1f}% {peak:>9}")
    for length, values in result["ratios"].items():
        if isinstance(values, dict):
            print(f"L={length}: " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))
    for r in result["finetune"]:
        peak = "" if r["peak_memory_gib"] is None else f", peak {r['peak_memory_gib']:.1f} GiB"
        print(f"fine-tuning step {r['system']:<18} L={r['length']} batch 1: {r['seconds']:.3f} s{peak}")
    for s in result["skipped"]:
        print(f"skipped: {s['kind']} {s['system']} L={s['length']} ({s['reason']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"sequence lengths (default {sorted(PRESETS)}; with --dry-run {list(DRY_RUN_LENGTHS)})")
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="batch = this / length (at least 1); "
                        "default 2^18 (2^9 with --dry-run)")
    parser.add_argument("--finetune-length", type=int, default=None, help="default: the longest length")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="skip the measurements (in priority order) that no longer fit in this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny models (checks the script)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    if args.dry_run:
        device = torch.device("cpu")
        lengths = args.lengths or list(DRY_RUN_LENGTHS)
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 1)
    else:
        if not torch.cuda.is_available():
            parser.exit(2, "bench/kernels.py measures GPU kernels and needs a CUDA GPU; none is visible here "
                           "(--dry-run checks the script on the CPU).\n")
        device = torch.device("cuda")
        lengths = args.lengths or sorted(PRESETS)
        unknown = sorted(set(lengths) - set(PRESETS))
        if unknown:
            parser.error(f"--lengths {unknown}: the 80M presets are {sorted(PRESETS)}")
        torch.backends.cuda.matmul.allow_tf32 = True
    tokens_per_batch = args.tokens_per_batch or ((1 << 9) if args.dry_run else (1 << 18))
    finetune_length = args.finetune_length or max(lengths)
    if finetune_length not in lengths:
        parser.error(f"--finetune-length {finetune_length} must be one of --lengths {lengths}")
    setup = Setup(device, getattr(torch, args.dtype), args.dry_run)

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "dry_run": args.dry_run,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cuda": torch.version.cuda},
              "dtype": args.dtype, "tokens_per_batch": tokens_per_batch, "lengths": lengths,
              "warmup": args.warmup, "repeats": args.repeats, "datasheet_h200": H200_DATASHEET,
              "ceilings": measure_ceilings(device, args.dry_run), "forward": [], "finetune": [], "skipped": []}
    ceilings = result["ceilings"]
    logger.info("ceilings: copy %.2f TB/s, bf16 matmul %.0f TFLOP/s", ceilings["copy_bytes_per_second"] / 1e12,
                ceilings["bf16_matmul_flops_per_second"] / 1e12)
    jobs = [job for job in plan(lengths, finetune_length) if job[1] in args.systems]
    failures = 0
    for number, (kind, system, length) in enumerate(jobs, 1):
        elapsed = time.perf_counter() - started
        if args.time_budget_s is not None and elapsed + ESTIMATED_SECONDS[kind] > args.time_budget_s:
            result["skipped"].append({"kind": kind, "system": system, "length": length,
                                      "reason": f"time budget: {elapsed:.0f} of {args.time_budget_s:.0f} s used"})
            continue
        logger.info("[%d/%d] %s %s at %d", number, len(jobs), kind, system, length)
        try:
            if kind == "finetune":
                result["finetune"].append(finetune_step(setup, system, length, max(1, args.warmup - 1),
                                                        max(1, args.repeats // 2)))
            else:
                batch = max(1, tokens_per_batch // length)
                result["forward"].append(forward_throughput(setup, system, length, batch, args.warmup, args.repeats,
                                                            result["ceilings"]))
        except Exception as error:  # one failed measurement must not lose the others
            failures += 1
            logger.exception("%s %s at %d failed", kind, system, length)
            result["skipped"].append({"kind": kind, "system": system, "length": length,
                                      "reason": f"failed: {type(error).__name__}: {error}"[:2000]})
        write(result, args.out)
    write(result, args.out)
    if 32768 in lengths and any(r["system"] == "m2-kernels" and r["length"] == 32768 for r in result["forward"]):
        reached = next(r["tokens_per_second"] for r in result["forward"]
                       if r["system"] == "m2-kernels" and r["length"] == 32768)
        result["goal_32k"] = {"tokens_per_second": reached, "target_tokens_per_second": GOAL_TOKENS_PER_SECOND_32K,
                              "speedup_over_torch": result["ratios"].get("32768", {}).get("kernels_over_m2_torch"),
                              "target_speedup": GOAL_SPEEDUP_32K}
    result["seconds"] = time.perf_counter() - started
    write(result, args.out)
    plot(result, args.out.with_suffix(".png"))
    print_table(result)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of the Monarch Mixer kernels on a GPU, measured side by side in one run.

- forward tokens per second of the whole 80M M2-BERT at 2k, 8k and 32k positions (batches of about
  --tokens-per-batch tokens), through the PyTorch path (`kernel_implementation="torch"`) and the kernel
  path (`kernel_implementation="cuda"`, which fails loudly rather than falling back);
- the same for a BERT-base-sized transformer (12 layers, 768 wide, 12 heads, FFN 3072) whose attention is
  PyTorch's scaled_dot_product_attention;
- the time of one fine-tuning step (forward, backward, AdamW) at 32k positions with batch 1 for all three.

Models run in one dtype (bfloat16 by default) with full-length inputs (`reference` padding, as the
released models); times are CUDA-event medians after warm-up.

    python bench/kernels.py --out bench/results/kernels.json     # also writes kernels.png
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import M2BertConfig, M2BertModel

logger = logging.getLogger("bench.kernels")

PRESETS = {2048: "m2-bert-80M-2k", 8192: "m2-bert-80M-8k", 32768: "m2-bert-80M-32k"}
GOAL_TOKENS_PER_SECOND_32K = 2.5e6
GOAL_SPEEDUP_32K = 3.0


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


class SdpaBert(nn.Module):
    """BERT-base-sized encoder (learned positions up to `max_length`) returning the [CLS] embedding."""

    def __init__(self, max_length: int, vocab_size: int = 30528, hidden: int = 768, layers: int = 12):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_length, hidden)
        self.embedding_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(SdpaEncoderLayer(hidden) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embedding_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        for layer in self.layers:
            h = layer(h)
        return torch.tanh(self.pooler(h[:, 0]))


SYSTEMS = ("m2-torch", "m2-kernels", "sdpa-transformer")


def build(system: str, length: int, dtype: torch.dtype) -> nn.Module:
    """The model of a system for inputs of `length` tokens, on the GPU, and selects the M2 path."""
    torch.manual_seed(0)
    if system == "sdpa-transformer":
        model = SdpaBert(length)
    else:
        implementation = "cuda" if system == "m2-kernels" else "torch"
        model = M2BertModel(M2BertConfig.from_preset(PRESETS[length], padding_mode="reference",
                                                     kernel_implementation=implementation))
    return model.to("cuda", dtype)


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids, torch.ones_like(input_ids))
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def median_cuda_seconds(step, warmup: int, repeats: int) -> float:
    """Median seconds of step() over `repeats` runs timed with CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def forward_throughput(system: str, length: int, batch: int, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """Forward tokens/s at the largest batch <= `batch` (halving on out-of-memory) that fits."""
    model = build(system, length, dtype).eval()
    try:
        while True:
            input_ids = torch.randint(1000, 30000, (batch, length), device="cuda")
            try:
                with torch.no_grad():
                    seconds = median_cuda_seconds(lambda: embed(model, input_ids), warmup, repeats)
                break
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                torch.cuda.empty_cache()
                logger.info("%s at %d: out of memory, retrying with batch %d", system, length, batch)
    finally:
        del model
        torch.cuda.empty_cache()
    row = {"system": system, "length": length, "batch": batch, "seconds_per_batch": seconds,
           "tokens_per_second": batch * length / seconds}
    logger.info("%-16s L=%-6d batch=%-4d %.4f s/batch  %12.0f tokens/s", system, length, batch, seconds,
                row["tokens_per_second"])
    return row


def finetune_step_seconds(system: str, length: int, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """Seconds of one training step at batch 1: forward, a cosine loss on the embedding, backward, AdamW."""
    torch.cuda.reset_peak_memory_stats()
    model = build(system, length, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    input_ids = torch.randint(1000, 30000, (1, length), device="cuda")
    target = torch.randn(1, 768, device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = 1 - F.cosine_similarity(embed(model, input_ids).float(), target).mean()
        loss.backward()
        optimizer.step()

    try:
        seconds = median_cuda_seconds(step, warmup, repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30
    finally:
        del model, optimizer
        torch.cuda.empty_cache()
    logger.info("%-16s fine-tuning step at L=%d, batch 1: %.3f s (peak %.1f GiB)", system, length, seconds, peak)
    return {"system": system, "length": length, "batch": 1, "seconds": seconds, "peak_memory_gib": peak}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in SYSTEMS:
        rows = [r for r in result["forward"] if r["system"] == system]
        left.plot([r["length"] for r in rows], [r["tokens_per_second"] for r in rows], marker="o", label=system)
    left.axhline(GOAL_TOKENS_PER_SECOND_32K, color="grey", linestyle=":", label="goal at 32k")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("sequence length")
    left.set_ylabel("forward tokens / s")
    left.set_title(f"forward throughput ({result['dtype']}, {result['device']})")
    left.legend()
    steps = result["finetune"]
    right.bar([r["system"] for r in steps], [r["seconds"] for r in steps],
              color=["tab:blue", "tab:orange", "tab:green"])
    right.set_ylabel("seconds")
    right.set_title(f"one fine-tuning step, L={steps[0]['length']}, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--tokens-per-batch", type=int, default=1 << 18, help="batch = this / length (at least 1)")
    parser.add_argument("--finetune-length", type=int, default=32768, choices=sorted(PRESETS))
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "bench/kernels.py measures GPU kernels and needs a CUDA GPU; none is visible here.\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True

    total = len(args.lengths) * len(SYSTEMS) + len(SYSTEMS)
    forward, finetune = [], []
    for length in args.lengths:
        batch = max(1, args.tokens_per_batch // length)
        for system in SYSTEMS:
            logger.info("[%d/%d] forward %s at %d", len(forward) + 1, total, system, length)
            forward.append(forward_throughput(system, length, batch, dtype, args.warmup, args.repeats))
    for system in SYSTEMS:
        logger.info("[%d/%d] fine-tuning step %s", len(forward) + len(finetune) + 1, total, system)
        finetune.append(finetune_step_seconds(system, args.finetune_length, dtype, max(1, args.warmup - 1),
                                              max(3, args.repeats // 2)))

    def rate(system, length):
        return next(r["tokens_per_second"] for r in forward if r["system"] == system and r["length"] == length)

    step = {r["system"]: r["seconds"] for r in finetune}
    ratios = {str(length): {"kernels_over_torch": rate("m2-kernels", length) / rate("m2-torch", length),
                            "kernels_over_sdpa_transformer": rate("m2-kernels", length)
                            / rate("sdpa-transformer", length)}
              for length in args.lengths}
    ratios["finetune_step_torch_over_kernels"] = step["m2-torch"] / step["m2-kernels"]
    result = {
        "device": torch.cuda.get_device_name(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "dtype": args.dtype,
        "tokens_per_batch": args.tokens_per_batch,
        "forward": forward,
        "finetune": finetune,
        "ratios": ratios,
    }
    if 32768 in args.lengths:
        reached = rate("m2-kernels", 32768)
        result["goal_32k"] = {"tokens_per_second": reached, "target_tokens_per_second": GOAL_TOKENS_PER_SECOND_32K,
                              "speedup_over_torch": ratios["32768"]["kernels_over_torch"],
                              "target_speedup": GOAL_SPEEDUP_32K}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))

    print(f"{'system':<18} {'length':>6} {'batch':>5} {'tokens/s':>12}")
    for r in forward:
        print(f"{r['system']:<18} {r['length']:>6} {r['batch']:>5} {r['tokens_per_second']:>12.0f}")
    for length in args.lengths:
        print(f"L={length}: kernels {ratios[str(length)]['kernels_over_torch']:.2f}x the PyTorch path, "
              f"{ratios[str(length)]['kernels_over_sdpa_transformer']:.2f}x the SDPA transformer")
    for r in finetune:
        print(f"fine-tuning step {r['system']:<18} L={r['length']} batch 1: {r['seconds']:.3f} s, "
              f"peak {r['peak_memory_gib']:.1f} GiB")
    if "goal_32k" in result:
        goal = result["goal_32k"]
        print(f"32k forward: {goal['tokens_per_second'] / 1e6:.2f}M tokens/s "
              f"(goal {GOAL_TOKENS_PER_SECOND_32K / 1e6:.1f}M), {goal['speedup_over_torch']:.2f}x the PyTorch path "
              f"(goal {GOAL_SPEEDUP_32K:.0f}x)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

"""Encoding speed of M2BertModel on this machine, both padding modes, measured side by side.

For the 80M model at 2k and 8k positions: forward tokens per second on full-length inputs, and the time
to embed one 32-token query, which `reference` mode pads to the full length and `masked` mode does not.

    python bench/encode.py --out bench/results/encode.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from model import M2BertConfig, M2BertModel

logger = logging.getLogger("bench.encode")


def time_forward(model: M2BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass (after one warm-up pass, which also fills the filter cache)."""
    with torch.no_grad():
        model(input_ids, attention_mask)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids, attention_mask)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_length(preset: str, repeats: int, query_tokens: int) -> list[dict]:
    rows = []
    for mode in ("reference", "masked"):
        torch.manual_seed(0)
        model = M2BertModel(M2BertConfig.from_preset(preset, padding_mode=mode)).eval()
        length = model.config.max_position_embeddings
        full = torch.randint(1000, 30000, (1, length))
        seconds = time_forward(model, full, torch.ones_like(full), repeats)
        # A short query: `reference` must pad to the full length; `masked` pads to the next multiple of 64.
        query_width = length if mode == "reference" else 64
        query = torch.zeros((1, query_width), dtype=torch.long)
        query[0, :query_tokens] = torch.randint(1000, 30000, (query_tokens,))
        query_seconds = time_forward(model, query, (query != 0).long(), repeats)
        rows.append({"preset": preset, "length": length, "padding_mode": mode,
                     "full_length_seconds": seconds, "tokens_per_second": length / seconds,
                     "query_tokens": query_tokens, "query_padded_to": query_width, "query_seconds": query_seconds})
        logger.info("%s %-9s full %.3f s (%.0f tok/s); %d-token query %.4f s", preset, mode, seconds,
                    length / seconds, query_tokens, query_seconds)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['length']} {r['padding_mode']}" for r in rows]
    axes[0].bar(labels, [r["tokens_per_second"] for r in rows], color="tab:blue")
    axes[0].set_title("forward tokens/s, full-length input")
    axes[1].bar(labels, [r["query_seconds"] * 1000 for r in rows], color="tab:orange")
    axes[1].set_title(f"ms to embed a {rows[0]['query_tokens']}-token query")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["m2-bert-80M-2k", "m2-bert-80M-8k"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/encode.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = [row for preset in args.presets for row in bench_length(preset, args.repeats, args.query_tokens)]
    ratios = {}
    for preset in args.presets:
        ref, masked = (next(r for r in rows if r["preset"] == preset and r["padding_mode"] == m)
                       for m in ("reference", "masked"))
        ratios[preset] = {"full_length_masked_over_reference_time": masked["full_length_seconds"] / ref["full_length_seconds"],
                          "query_reference_over_masked_time": ref["query_seconds"] / masked["query_seconds"]}
    result = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "rows": rows, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))

    print(f"{'model':<16} {'mode':<10} {'tok/s':>8} {'query ms':>9}")
    for r in rows:
        print(f"{r['preset']:<16} {r['padding_mode']:<10} {r['tokens_per_second']:>8.0f} {r['query_seconds'] * 1000:>9.1f}")
    for preset, ratio in ratios.items():
        print(f"{preset}: a {args.query_tokens}-token query costs {ratio['query_reference_over_masked_time']:.0f}x "
              "more in reference mode than in masked mode")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

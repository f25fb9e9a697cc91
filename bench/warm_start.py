"""MLM loss of a warm-started longer model against the shorter model it came from.

    python bench/warm_start.py --model runs/pretrain-8k/final --length 32768 \
        --short-manifest data/mixture-8k/manifest.json --long-manifest data/mixture-32k/manifest.json

For each `--z-mode` (train/warm_start.py) the source model is warm-started in memory and evaluated, with
the same validation samples and masks (15% masking) as the source, on samples of the source's length
and on samples of the new length; a randomly initialised model of the new length is the floor. Writes
`warm_start.json` and `warm_start.png` to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 4))
    labels = [row["model"] for row in rows]
    width = 0.38
    for offset, key, name in ((-width / 2, "loss_short", "short validation samples"),
                              (width / 2, "loss_long", "long validation samples")):
        values = [row.get(key) for row in rows]
        xs = [i + offset for i, v in enumerate(values) if v is not None]
        axis.bar(xs, [v for v in values if v is not None], width, label=name)
    axis.set_xticks(range(len(labels)), labels, rotation=15)
    axis.set_ylabel("MLM loss (15% masking)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the shorter model (save_pretrained directory)")
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--short-manifest", required=True, help="mixture at the source model's length")
    parser.add_argument("--long-manifest", required=True, help="mixture at the new length")
    parser.add_argument("--z-modes", nargs="+", default=["tile", "interpolate"])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "warm_start")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    from model import M2BertForMaskedLM
    from train.evaluate_mlm import validation_mlm_metrics
    from train.warm_start import warm_start

    source = M2BertForMaskedLM.from_pretrained(args.model)
    short = source.config.max_position_embeddings
    torch.manual_seed(0)
    random_init = M2BertForMaskedLM(source.config.__class__.from_dict(
        {**source.config.to_dict(), "max_position_embeddings": args.length, "long_conv_l_max": args.length}))
    candidates = [(f"source ({short})", source, False)]
    candidates += [(f"warm {args.length} (z {mode})", warm_start(source, args.length, mode), True) for mode in args.z_modes]
    candidates.append((f"random init {args.length}", random_init, True))

    def evaluate(model, manifest):
        metrics = validation_mlm_metrics(model, manifest, args.samples, args.batch_size)
        return metrics["loss"], metrics["accuracy"]

    rows = []
    for name, model, is_long in tqdm(candidates, desc="models"):
        row = {"model": name}
        row["loss_short"], row["accuracy_short"] = evaluate(model, args.short_manifest)
        if is_long:
            row["loss_long"], row["accuracy_long"] = evaluate(model, args.long_manifest)
        rows.append(row)
    report = {"benchmark": "warm_start", "source": args.model, "source_length": short, "length": args.length,
              "samples": args.samples, "mlm_probability": 0.15, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warm_start.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "warm_start.png", f"Warm start {short} -> {args.length}: MLM validation loss")
    print(f"{'model':<28}{'loss @' + str(short):>12}{'acc @' + str(short):>10}{'loss @' + str(args.length):>12}"
          f"{'acc @' + str(args.length):>10}")
    for row in rows:
        long_part = (f"{row['loss_long']:>12.4f}{row['accuracy_long']:>10.4f}" if "loss_long" in row else f"{'-':>12}{'-':>10}")
        print(f"{row['model']:<28}{row['loss_short']:>12.4f}{row['accuracy_short']:>10.4f}{long_part}")
    print(f"wrote {args.out / 'warm_start.json'} and {args.out / 'warm_start.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Masked-LM loss and accuracy on a fixed set of validation samples, overall and per sample kind.

    python -m train.evaluate_mlm --model runs/pretrain-8k/final --manifest data/mixture-8k/manifest.json

`evaluate_mlm` is pretraining's periodic evaluation (its sums are reduced over ranks, so the figures are
those of the whole validation subset); the command evaluates a saved model in one process. The same
samples and the same masked positions for every model evaluated with the same manifest, sample count and
seed, so the losses of different models (e.g. before and after a warm start) compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from model import M2BertForMaskedLM
from train.distributed import all_reduce
from train.mlm_data import KIND_IDS, DataConfig, MLMMasker, PaddingCollator, batches, eval_samples, manifest_seq_len


@torch.no_grad()
def evaluate_mlm(forward, samples: list[dict], collator: PaddingCollator, masker: MLMMasker, batch_size: int,
                 device: torch.device) -> dict[str, float]:
    """`forward(input_ids=, attention_mask=, labels=)` -> MaskedLMOutput (logits at masked positions).

    The masker is reset first, so every call masks the same positions of the same samples. Returns
    `loss` and `accuracy` over all masked tokens, the same per kind (`loss_natural`, ...) and
    `masked_tokens`. Collective when distributed.
    """
    masker.reset()
    kinds = sorted(KIND_IDS.values())
    # Per kind: summed cross-entropy, correct predictions, masked tokens.
    totals = torch.zeros(len(kinds), 3, dtype=torch.float64)
    for group in batches(samples, batch_size):
        batch = masker(collator(group))
        labels = batch["labels"].to(device)
        output = forward(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         labels=labels)
        selected = labels != -100  # (B, L)
        targets = labels[selected]  # (n_masked,)
        token_kind = batch["kind"].to(device)[selected.nonzero()[:, 0]]  # (n_masked,)
        losses = F.cross_entropy(output.logits.float(), targets, reduction="none")  # (n_masked,)
        correct = (output.logits.argmax(-1) == targets).double()
        for kind in kinds:
            chosen = token_kind == kind
            totals[kind] += torch.stack([losses[chosen].double().sum(), correct[chosen].sum(),
                                         chosen.double().sum()]).cpu()
    totals = all_reduce(totals)
    overall = totals.sum(0)
    count = overall[2].item()
    metrics = {"loss": overall[0].item() / max(count, 1), "accuracy": overall[1].item() / max(count, 1),
               "masked_tokens": count}
    for name, kind in KIND_IDS.items():
        if totals[kind, 2] > 0:
            metrics[f"loss_{name}"] = totals[kind, 0].item() / totals[kind, 2].item()
            metrics[f"accuracy_{name}"] = totals[kind, 1].item() / totals[kind, 2].item()
    return metrics


def validation_mlm_metrics(model, manifest: str | Path, num_samples: int = 256, batch_size: int = 16,
                           mlm_probability: float = 0.15, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Evaluate `model` (an `M2BertForMaskedLM`) on the first `num_samples` of a seeded shuffle of the
    manifest's validation split, with `mlm_probability` masking (`evaluate_mlm`)."""
    data = DataConfig(manifest=str(manifest), shuffle_seed=seed)
    seq_len = manifest_seq_len(manifest)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"{manifest}: samples of up to {seq_len} tokens, but the model takes at most "
                         f"{model.config.max_position_embeddings}")
    samples = eval_samples(data, num_samples, batch_size)
    model = model.to(device).eval()
    metrics = evaluate_mlm(model, samples, PaddingCollator(seq_len, pad_to="longest"),
                           MLMMasker(mlm_probability, seed=seed + 1), batch_size, torch.device(device))
    return {**metrics, "samples": len(samples), "seq_len": seq_len}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a save_pretrained directory of an M2BertForMaskedLM")
    parser.add_argument("--manifest", required=True, help="manifest.json of a dataprep mixture")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mlm-probability", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the metrics to this file")
    args = parser.parse_args(argv)

    model = M2BertForMaskedLM.from_pretrained(args.model)
    metrics = validation_mlm_metrics(model, args.manifest, args.samples, args.batch_size, args.mlm_probability,
                                     args.seed, args.device)
    metrics.update(model=args.model, manifest=args.manifest)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{args.model} on {args.manifest}: MLM loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f} "
          f"({metrics['masked_tokens']:.0f} masked tokens in {metrics['samples']} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

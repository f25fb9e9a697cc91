"""Masked-LM loss and accuracy on a fixed set of validation samples, overall and per sample kind.

Used by pretraining's periodic evaluation and by `python -m train.evaluate_mlm` (the warm-start
figures). Sums are reduced over ranks, so the figures are those of the whole validation subset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum
from .mlm_data import KIND_IDS, MLMMasker, PaddingCollator, batches


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
    totals = all_reduce_sum(totals)
    overall = totals.sum(0)
    count = overall[2].item()
    metrics = {"loss": overall[0].item() / max(count, 1), "accuracy": overall[1].item() / max(count, 1),
               "masked_tokens": count}
    for name, kind in KIND_IDS.items():
        if totals[kind, 2] > 0:
            metrics[f"loss_{name}"] = totals[kind, 0].item() / totals[kind, 2].item()
            metrics[f"accuracy_{name}"] = totals[kind, 1].item() / totals[kind, 2].item()
    return metrics

"""Masked-LM batches from the MDS mixture that `dataprep` builds.

Samples (`input_ids` uint16 `[CLS] ... [SEP]`, `source`, `kind`; docs/interfaces.md) are drawn from the
manifest's streams with their proportions by `streaming.StreamingDataset`, which makes the order
deterministic, shardable over any number of ranks and resumable mid-epoch. `PaddingCollator`
pads natural-length samples and builds the attention mask; `MLMMasker` masks tokens with Hugging Face's
`DataCollatorForLanguageModeling` rule (80% [MASK], 10% random, 10% kept) from a generator that
checkpoints save and restore.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PAD_TO_CHOICES = ("max_length", "longest")
KIND_IDS = {"natural": 0, "concat": 1}


@dataclass
class DataConfig:
    """Where the mixture is and how batches are made from it.

    `manifest` is the local `manifest.json` of a `dataprep.build_mixture` output. With `remote` set
    (e.g. `s3://bucket/mixture-8k`, laid out as the manifest's folder), shards stream from there into
    `local_cache`. `seq_len` defaults to the manifest's. `clean_stale_shared_memory` removes every
    StreamingDataset shared-memory segment on the node before starting (streaming's remedy for "Reused
    local directory" after a crash); only safe when no other job on the node uses streaming.
    """

    manifest: str
    seq_len: int | None = None
    remote: str | None = None
    local_cache: str | None = None
    pad_to: str = "max_length"
    mlm_probability: float = 0.30
    eval_mlm_probability: float = 0.15
    shuffle_seed: int = 9176
    num_canonical_nodes: int | None = None
    num_workers: int = 0
    eval_samples: int = 64
    clean_stale_shared_memory: bool = False

    def __post_init__(self):
        if self.pad_to not in PAD_TO_CHOICES:
            raise ValueError(f"pad_to={self.pad_to!r}; expected one of {PAD_TO_CHOICES}")
        for key in ("mlm_probability", "eval_mlm_probability"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"{key} must be in (0, 1), got {getattr(self, key)}")
        if self.remote is not None and self.local_cache is None:
            raise ValueError("remote is set but local_cache is not: say where shards are cached")


class PaddingCollator:
    """Collate function: natural-length samples padded to `seq_len` (or the batch's longest) with [PAD].

    Returns `input_ids` and `attention_mask` (B, L) int64 and `kind` (B,) (0 natural, 1 concatenated).
    Masking is left to `MLMMasker` in the training process, so that its generator is the one the
    checkpoints save, whatever the number of loader workers.
    """

    def __init__(self, seq_len: int, pad_id: int = 0, pad_to: str = "max_length"):
        if pad_to not in PAD_TO_CHOICES:
            raise ValueError(f"pad_to={pad_to!r}; expected one of {PAD_TO_CHOICES}")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(s["input_ids"]) for s in samples]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.seq_len]
        if too_long:
            raise ValueError(f"sample(s) longer than seq_len={self.seq_len} (batch index, tokens): {too_long}; "
                             "was the mixture built for a longer sequence length?")
        width = self.seq_len if self.pad_to == "max_length" else max(lengths)
        input_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)  # (B, L)
        for row, (sample, length) in enumerate(zip(samples, lengths)):
            input_ids[row, :length] = torch.from_numpy(np.asarray(sample["input_ids"], dtype=np.int64))
            attention_mask[row, :length] = 1
        kind = torch.tensor([KIND_IDS.get(s.get("kind"), -1) for s in samples], dtype=torch.long)  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "kind": kind}


class MLMMasker:
    """Masks a padded batch for MLM with Hugging Face's `DataCollatorForLanguageModeling` rule.

    Each non-special token is selected with `mlm_probability`; a selected token becomes [MASK] 80% of
    the time, a random token 10%, and stays 10%. Adds `labels` (-100 where not selected) and replaces
    `input_ids`. Special tokens ([CLS], [SEP], [PAD], ...) are never selected.
    """

    def __init__(self, mlm_probability: float, seed: int, tokenizer=None):
        from transformers import DataCollatorForLanguageModeling

        from model import load_tokenizer

        self.tokenizer = tokenizer or load_tokenizer()
        self.seed = seed
        self.special_ids = torch.tensor(sorted(self.tokenizer.all_special_ids))
        self.collator = DataCollatorForLanguageModeling(self.tokenizer, mlm=True, mlm_probability=mlm_probability,
                                                        return_tensors="pt")
        self.collator.generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        """Back to the seed's first draw (evaluation masks the same positions every time)."""
        self.collator.generator.manual_seed(self.seed)

    def generator_state(self) -> torch.Tensor:
        return self.collator.generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self.collator.generator.set_state(state)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        special = torch.isin(batch["input_ids"], self.special_ids)  # (B, L)
        input_ids, labels = self.collator.torch_mask_tokens(batch["input_ids"].clone(), special_tokens_mask=special)
        return {**batch, "input_ids": input_ids, "labels": labels}


def manifest_seq_len(manifest_path: str | Path) -> int:
    from dataprep.manifest import read_manifest

    return int(read_manifest(manifest_path)["seq_len"])


def mixture_streams(config: DataConfig, split: str) -> list:
    """The `streaming.Stream`s of one split with their proportions (local, or remote with a local cache)."""
    from dataprep.manifest import read_manifest, streams

    if config.remote is None:
        return streams(config.manifest, split)
    from streaming import Stream

    manifest = read_manifest(config.manifest)
    selected = []
    for entry in manifest["streams"]:
        part = entry["splits"][split]
        if part["samples"] == 0:
            logger.warning("%s: stream %s has no %s samples; leaving it out", config.manifest, entry["name"], split)
            continue
        selected.append(Stream(remote=f"{config.remote.rstrip('/')}/{part['path']}",
                               local=str(Path(config.local_cache) / part["path"]), proportion=entry["proportion"]))
    return selected


def streaming_dataset(config: DataConfig, split: str, batch_size: int, shuffle_seed: int | None = None):
    """A shuffled `StreamingDataset` over the split's streams, partitioned over this job's ranks."""
    from streaming import StreamingDataset

    return StreamingDataset(
        streams=mixture_streams(config, split),
        batch_size=batch_size,
        shuffle=True,
        shuffle_seed=config.shuffle_seed if shuffle_seed is None else shuffle_seed,
        num_canonical_nodes=config.num_canonical_nodes,
    )


def train_loader(config: DataConfig, batch_size: int, collator: PaddingCollator):
    """A `StreamingDataLoader` of padded batches: its `state_dict()` is the resumable data position.

    It gets its own torch generator: a loader drawing its base seed from the global one at every new
    epoch would shift the dropout stream of a resumed run against an uninterrupted one.
    """
    from streaming import StreamingDataLoader

    dataset = streaming_dataset(config, "train", batch_size)
    return StreamingDataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=config.num_workers,
                               drop_last=True, persistent_workers=config.num_workers > 0,
                               generator=torch.Generator().manual_seed(config.shuffle_seed))


def eval_samples(config: DataConfig, num_samples: int, batch_size: int, split: str = "validation") -> list[dict]:
    """This rank's share of a fixed validation subset: the first `num_samples` / world_size samples of a
    seeded shuffle of the split's streams (the same subset at every evaluation)."""
    dataset = streaming_dataset(config, split, batch_size, shuffle_seed=config.shuffle_seed + 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = max(1, num_samples // world)
    samples = []
    for sample in dataset:
        samples.append({"input_ids": np.asarray(sample["input_ids"]), "kind": sample["kind"],
                        "source": sample["source"]})
        if len(samples) == per_rank:
            break
    if not samples:
        raise ValueError(f"{config.manifest}: the {split} split yielded no samples")
    return samples


def batches(samples: list[dict], batch_size: int) -> list[list[dict]]:
    return [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]

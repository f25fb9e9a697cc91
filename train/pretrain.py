"""Masked-LM pretraining of M2-BERT under DeepSpeed ZeRO on the `dataprep` mixture.

    deepspeed train/pretrain.py --config configs/pretrain_tiny.yaml [KEY=VALUE ...] [--resume]
    torchrun --nproc_per_node 2 -m train.pretrain --config configs/pretrain_80M_2k.yaml training.max_steps=100

One process per device (CPU processes with gloo, or GPUs with NCCL): `train.trainer.Trainer` running the
masked-LM task (`train.mlm_task`). The run directory holds the resolved config, DeepSpeed checkpoints
(`checkpoints/`, with the data position and random state), `metrics.jsonl`, TensorBoard logs,
`curves.png`, `summary.json` and, at the end, the `save_pretrained` export (`final/`) that
`model.M2BertForMaskedLM.from_pretrained` loads. `--resume` continues from the latest checkpoint with the
same batches (and, on CPU, the same losses) as an uninterrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`deepspeed train/pretrain.py`): this file's repository first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.mlm_task import MaskedLMTask
from train.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], MaskedLMTask, __doc__))

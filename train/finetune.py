"""Retrieval fine-tuning of a text encoder under DeepSpeed, with the orthogonal projection loss (or MNRL).

    deepspeed train/finetune.py --config configs/finetune_m2_32k.yaml [KEY=VALUE ...] [--resume]
    python -m train.finetune --config configs/finetune_minilm_qmsum_opl.yaml training.max_steps=10

`train.trainer.Trainer` running the retrieval task (`train.retrieval_task`): any `model.encoders` encoder
(M2-BERT, from a pretraining export or the authors' checkpoints, or any sentence-transformers / Hugging
Face encoder) trains on (query, relevant document, negatives) examples of a LoCo-format training split.
The run directory holds the resolved config, DeepSpeed checkpoints (`checkpoints/`), `metrics.jsonl`,
TensorBoard logs, `curves.png`, `summary.json` and the final model (`final/`), which `eval.loco` and
`sentence_transformers.SentenceTransformer` load. `--resume` continues from the latest checkpoint with the
same micro-batches (and, on CPU, the same losses) as an uninterrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (`deepspeed train/finetune.py`): this file's repository first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.retrieval_task import RetrievalTask
from train.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], RetrievalTask, __doc__))

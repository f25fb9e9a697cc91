"""Embed texts with an M2-BERT model from the command line.

    python -m model.embed --model m2-bert-tiny --input texts.jsonl.gz [--out embeddings.npy] [--precision bf16]

`--model` is a checkpoint directory (ours or the authors') or a preset name (randomly initialised, for
smoke tests). `--input` files are JSON lines (gzipped or not) with a `text` field, or plain text with
one text per line. `--precision` (`fp32` or `bf16`; default: bf16 on CUDA, fp32 on CPU) is that of
the GEMMs (see docs/serving.md for which to use where).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .configuration_m2_bert import PRESET_ALIASES, PRESETS, M2BertConfig
from .batching import ENCODE_PRECISIONS
from .modeling_m2_bert import M2BertModel

logger = logging.getLogger("model.embed")


def read_texts(path: Path, field: str = "text") -> list[str]:
    """Texts from a JSON-lines file (field `field`) or a plain-text file (one per line)."""
    opener = gzip.open if path.suffix == ".gz" else open
    is_json = any(s in (".json", ".jsonl") for s in path.suffixes)
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not is_json:
                texts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{line_number}: no string field {field!r}")
            texts.append(record[field])
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="m2-bert-tiny", help="checkpoint directory or preset name")
    parser.add_argument("--input", type=Path, nargs="+", required=True)
    parser.add_argument("--field", default="text", help="JSON field holding the text")
    parser.add_argument("--max-length", type=int, default=None, help="truncate texts (tokens)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", choices=ENCODE_PRECISIONS, default=None,
                        help="precision of the GEMMs (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the embeddings here (.npy)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    start = time.perf_counter()
    if args.model in PRESETS or args.model in PRESET_ALIASES:
        torch.manual_seed(0)
        model = M2BertModel(M2BertConfig.from_preset(args.model)).eval()
    else:
        model = M2BertModel.from_pretrained(args.model)
    load_seconds = time.perf_counter() - start
    texts = [t for path in args.input for t in read_texts(path, args.field)]

    start = time.perf_counter()
    embeddings = model.encode(texts, batch_size=args.batch_size, max_length=args.max_length, show_progress_bar=True,
                              precision=args.precision)
    seconds = time.perf_counter() - start
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, embeddings)
    print(f"model {args.model}: {model.config.max_position_embeddings} positions, "
          f"padding_mode={model.config.padding_mode}, loaded in {load_seconds:.2f} s")
    print(f"embedded {len(texts)} texts -> embeddings of shape {embeddings.shape} in {seconds:.2f} s "
          f"({len(texts) / seconds:.1f} texts/s)")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Throughput of the data-preparation pipeline against the bare tokenizer on the same texts, in one run.

    python -m bench.dataprep [--workers 2] [--seq-len 128] [--c4 ... --wikipedia ... --books ...] [--out bench/results]

(Run it as a module from the repository root: as `python bench/dataprep.py` this file would shadow the
`dataprep` package it measures.)

1. Builds the mixture with the real pipeline (Beam DirectRunner, worker processes), timing the whole build.
2. Reads the same documents in this process, keeps one copy of each (as the pipeline does), and times the
   bundled fast tokenizer on them alone, in the pipeline's batch size.
Writes `dataprep.json` and `dataprep.png` (documents and tokens per second, and their ratio) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from dataprep.build_mixture import SAMPLE_INPUTS, MixtureConfig, build_mixture, configure_logging, match_inputs
from dataprep.documents import parse_record, tokenize_texts
from dataprep.readers import read_records
from dataprep.records import Document, RawRecord
from dataprep.transforms import TOKENIZE_BATCH_DOCUMENTS, open_uncompressed


def unique_documents(inputs: dict[str, list[str]], max_record_bytes: int) -> list[str]:
    """The texts the pipeline tokenizes: every readable document once, in a fixed order."""
    texts = {}
    for source, path in match_inputs(inputs):
        for record in read_records(source, path, open_uncompressed, max_record_bytes):
            parsed = parse_record(record) if isinstance(record, RawRecord) else record
            if isinstance(parsed, Document):
                texts.setdefault(parsed.digest, parsed.text)
    return [texts[digest] for digest in sorted(texts)]


def time_bare_tokenizer(texts: list[str]) -> tuple[float, int]:
    """Seconds and tokens to tokenize `texts` in the pipeline's batches, tokenizer loaded beforehand."""
    from model import load_tokenizer

    tokenizer = load_tokenizer()
    tokenize_texts(tokenizer, texts[:1])  # warm up
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(texts), TOKENIZE_BATCH_DOCUMENTS):
        tokens += sum(len(ids) for ids in tokenize_texts(tokenizer, texts[start:start + TOKENIZE_BATCH_DOCUMENTS]))
    return time.perf_counter() - started, tokens


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["pipeline", "bare tokenizer"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for axis, unit in zip(axes, ("documents_per_second", "tokens_per_second")):
        values = [result["pipeline"][unit], result["bare_tokenizer"][unit]]
        axis.bar(names, values, color=["tab:blue", "tab:gray"])
        axis.set_title(unit.replace("_", " "))
        for index, value in enumerate(values):
            axis.annotate(f"{value:,.0f}", (index, value), ha="center", va="bottom")
    figure.suptitle(f"dataprep on {result['machine']['cpus']} CPUs, {result['pipeline']['workers']} workers: "
                    f"pipeline / tokenizer = {result['ratio']['tokens_per_second']:.3f} (tokens/s)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for source in ("c4", "wikipedia", "books"):
        parser.add_argument(f"--{source}", action="extend", nargs="+", default=[])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    configure_logging()
    inputs = {source: getattr(args, source) for source in ("c4", "wikipedia", "books") if getattr(args, source)}
    inputs = inputs or dict(SAMPLE_INPUTS)

    with tempfile.TemporaryDirectory(prefix="bench-dataprep-") as folder:
        config = MixtureConfig(inputs=inputs, out=os.path.join(folder, "mixture"), seq_len=args.seq_len)
        summary = build_mixture(config, [f"--direct_num_workers={args.workers}"])
    pipeline_seconds = summary["timing"]["seconds"]
    pipeline_documents = sum(entry["documents_train"] + entry["documents_validation"]
                             for entry in summary["sources"].values())
    pipeline_tokens = sum(entry["tokens_train"] + entry["tokens_validation"] for entry in summary["sources"].values())

    texts = unique_documents(inputs, int(config.max_record_mb * (1 << 20)))
    tokenizer_seconds, tokenizer_tokens = time_bare_tokenizer(texts)

    pipeline = {"workers": args.workers, "seconds": pipeline_seconds, "documents": pipeline_documents,
                "tokens": pipeline_tokens, "documents_per_second": pipeline_documents / pipeline_seconds,
                "tokens_per_second": pipeline_tokens / pipeline_seconds}
    bare = {"seconds": tokenizer_seconds, "documents": len(texts), "tokens": tokenizer_tokens,
            "documents_per_second": len(texts) / tokenizer_seconds,
            "tokens_per_second": tokenizer_tokens / tokenizer_seconds}
    result = {
        "benchmark": "dataprep pipeline vs bare tokenizer, same texts, same run",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "inputs": inputs, "seq_len": args.seq_len,
        "pipeline": pipeline, "bare_tokenizer": bare,
        "ratio": {unit: pipeline[unit] / bare[unit] for unit in ("documents_per_second", "tokens_per_second")},
        "notes": "pipeline time is the whole build (worker start-up, reading, parsing, de-duplication, tokenizing, "
                 "MDS writing, index merge); the bare tokenizer runs in this process with its own thread pool.",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dataprep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "dataprep.png")
    print(f"pipeline:       {pipeline['documents_per_second']:10.1f} documents/s {pipeline['tokens_per_second']:12.0f} "
          f"tokens/s ({pipeline_seconds:.1f} s, {args.workers} workers)")
    print(f"bare tokenizer: {bare['documents_per_second']:10.1f} documents/s {bare['tokens_per_second']:12.0f} "
          f"tokens/s ({tokenizer_seconds:.1f} s)")
    print(f"ratio pipeline/tokenizer: {result['ratio']['documents_per_second']:.3f} (documents/s), "
          f"{result['ratio']['tokens_per_second']:.3f} (tokens/s)")
    print(f"wrote {args.out / 'dataprep.json'} and {args.out / 'dataprep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Steady-state throughput of the data-preparation pipeline against the bare tokenizer, per core, in one run.

    python -m bench.dataprep                           # corpora of 1, 2, 4 and 8 sample copies (2.4M-19M tokens)
    python -m bench.dataprep --replicas 1 4 21         # the full-size run: up to 50M tokens
    python -m bench.dataprep --workers 2 --seq-len 128 --out bench/results

(Run it as a module from the repository root: as `python bench/dataprep.py` this file would shadow the
`dataprep` package it measures.)

For each corpus size the bench writes a corpus of distinct documents in the upstream formats (C4 json.gz,
Wikipedia parquet, PG-19 txt and Pile jsonl.zst): the bundled sample and perturbed copies of it, each copy's
text marked with its number so that the exact de-duplication keeps every document and the work is real.
Then, side by side:

1. the real pipeline, `python -m dataprep.build_mixture` (Beam DirectRunner, `--workers` worker processes,
   one tokenizer thread each): wall time and CPU time (the command and its worker processes);
2. the bare batched tokenizer on the same unique texts, in the pipeline's batch size, in as many processes
   as the pipeline has workers (one thread each, an equal share of the text each), half of the texts just
   before the pipeline and half just after, so that both meet the same machine, however busy it is.

A straight line through the pipeline's times, `seconds = start_up + tokens / rate`, separates the fixed
start-up (processes, imports, Beam's job set-up) from the steady-state rate; per worker that rate is compared
with the tokenizer's rate per process (per core). The same is done with CPU seconds, which a busy machine
disturbs less than wall-clock time. Writes `dataprep.json` and `dataprep.png` to --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dataprep.build_mixture import SAMPLE_DATA, match_inputs
from dataprep.documents import GUTENBERG_START, parse_record, tokenize_texts
from dataprep.readers import read_records
from dataprep.records import Document, RawRecord
from dataprep.transforms import TOKENIZE_BATCH_DOCUMENTS, open_uncompressed

DEFAULT_REPLICAS = (1, 2, 4, 8)
MAX_RECORD_BYTES = 8 << 20


def perturbed(text: str, replica: int) -> str:
    """Copy `replica` of a text: the original for 0, else marked inside the part the pipeline keeps
    (after a Project Gutenberg header, which cleaning removes)."""
    if replica == 0:
        return text
    header = GUTENBERG_START.search(text)
    at = header.end() if header else 0
    return f"{text[:at]}\n[copy {replica}]\n{text[at:]}"


def write_corpus(folder: Path, replicas: int) -> dict[str, list[str]]:
    """The bundled sample `replicas` times over (distinct texts), in its upstream formats and file sizes.

    Copy k of each file is its own file, so a larger corpus has more files, as a real one does. The books
    alternate between the PG-19 layout (one .txt per book) and the Pile layout (one jsonl.zst per copy).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    c4 = {path.name: [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
          for path in sorted((SAMPLE_DATA / "c4").rglob("*.json.gz"))}
    wikipedia = {path.name: pq.read_table(path) for path in sorted((SAMPLE_DATA / "wikipedia").rglob("*.parquet"))}
    books = {path.stem: path.read_text(encoding="utf-8")
             for path in sorted((SAMPLE_DATA / "books" / "pg19").rglob("*.txt"))}
    for name in ("c4", "wikipedia", "books"):
        (folder / name).mkdir(parents=True)
    for copy in range(replicas):
        for name, rows in c4.items():
            with gzip.open(folder / "c4" / f"{copy:03d}-{name}", "wt", encoding="utf-8", compresslevel=6) as out:
                out.writelines(json.dumps({**row, "text": perturbed(row["text"], copy)}) + "\n" for row in rows)
        for name, table in wikipedia.items():
            texts = pa.array([perturbed(text, copy) for text in table.column("text").to_pylist()])
            pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", texts),
                           folder / "wikipedia" / f"{copy:03d}-{name}")
        if copy % 2 == 0:
            for stem, text in books.items():
                (folder / "books" / f"{copy:03d}-{stem}.txt").write_text(perturbed(text, copy), encoding="utf-8")
        else:
            lines = "".join(json.dumps({"text": perturbed(text, copy), "meta": {"id": stem}}) + "\n"
                            for stem, text in books.items())
            (folder / "books" / f"{copy:03d}-books.jsonl.zst").write_bytes(
                zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    return {name: [str(folder / name)] for name in ("c4", "wikipedia", "books")}


def unique_documents(inputs: dict[str, list[str]]) -> list[str]:
    """The texts the pipeline tokenizes: every readable document once, in a fixed order."""
    texts = {}
    for source, path in match_inputs(inputs):
        for record in read_records(source, path, open_uncompressed, MAX_RECORD_BYTES):
            parsed = parse_record(record) if isinstance(record, RawRecord) else record
            if isinstance(parsed, Document):
                texts.setdefault(parsed.digest, parsed.text)
    return [texts[digest] for digest in sorted(texts)]


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children, theirs included (the CLI and its worker processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_pipeline(inputs: dict[str, list[str]], folder: Path, workers: int, seq_len: int) -> dict:
    """The command a user runs, `python -m dataprep.build_mixture`, timed from outside."""
    out = folder / "mixture"
    command = [sys.executable, "-m", "dataprep.build_mixture", "--out", str(out), "--seq-len", str(seq_len),
               f"--direct_num_workers={workers}"]
    for source, paths in inputs.items():
        command += [f"--{source}", *paths]
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), children_cpu_seconds()
    completed = subprocess.run(command, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - wall, children_cpu_seconds() - cpu
    if completed.returncode:
        raise RuntimeError(f"build_mixture failed:\n{completed.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    entries = summary["sources"].values()
    tokens = sum(entry["tokens_train"] + entry["tokens_validation"] for entry in entries)
    documents = sum(entry["documents_train"] + entry["documents_validation"] for entry in entries)
    assert not summary["skipped_by_reason"].get("duplicate"), "the bench corpus must have distinct documents"
    return {"documents": documents, "tokens": tokens, "seconds": wall, "cpu_seconds": cpu,
            "tokens_per_second_per_worker": tokens / wall / workers, "load_average_1min_before": load}


_tokenizer = None
_ready = None


def _start_tokenizer_process(ready) -> None:
    global _tokenizer, _ready
    from model import load_tokenizer

    _tokenizer, _ready = load_tokenizer(), ready
    tokenize_texts(_tokenizer, ["warm up"])


def _tokenize_share(texts: list[str]) -> tuple[int, float, float, float]:
    """Tokens, start and end (system-wide monotonic clock) and CPU seconds of one process's share."""
    _ready.wait()  # every process has its share and a loaded tokenizer
    start, cpu, tokens = time.monotonic(), time.thread_time(), 0
    for first in range(0, len(texts), TOKENIZE_BATCH_DOCUMENTS):
        tokens += sum(len(ids) for ids in tokenize_texts(_tokenizer, texts[first:first + TOKENIZE_BATCH_DOCUMENTS]))
    return tokens, start, time.monotonic(), time.thread_time() - cpu


def balanced_shares(texts: list[str], parts: int) -> list[list[str]]:
    """`texts` dealt into `parts` shares of about equal length, longest first (deterministic)."""
    shares, lengths = [[] for _ in range(parts)], [0] * parts
    for text in sorted(texts, key=len, reverse=True):
        smallest = lengths.index(min(lengths))
        shares[smallest].append(text)
        lengths[smallest] += len(text)
    return shares


def time_bare_tokenizer(texts: list[str], workers: int) -> dict:
    """The bundled fast tokenizer alone on `texts`, in the pipeline's batches: as many processes as the
    pipeline has workers, one thread each, each on an equal share, so both meet the same machine."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(workers)
    with context.Pool(workers, initializer=_start_tokenizer_process, initargs=(ready,)) as pool:
        load = os.getloadavg()[0]
        results = pool.map(_tokenize_share, balanced_shares(texts, workers), chunksize=1)
    tokens = sum(result[0] for result in results)
    wall = max(result[2] for result in results) - min(result[1] for result in results)
    cpu = sum(result[3] for result in results)
    return {"documents": len(texts), "tokens": tokens, "seconds": wall, "cpu_seconds": cpu,
            "load_average_1min_before": load}


def time_side_by_side(inputs: dict[str, list[str]], folder: Path, workers: int, seq_len: int) -> tuple[dict, dict]:
    """The pipeline, and the bare tokenizer on the same texts: half of them just before the pipeline and half
    just after, so that on a shared machine both see the same load on average."""
    texts = unique_documents(inputs)
    before = time_bare_tokenizer(texts[0::2], workers)
    pipeline = time_pipeline(inputs, folder, workers, seq_len)
    after = time_bare_tokenizer(texts[1::2], workers)
    bare = {key: before[key] + after[key] for key in ("documents", "tokens", "seconds", "cpu_seconds")}
    bare.update(processes=workers, tokens_per_second_per_process=bare["tokens"] / bare["seconds"] / workers,
                load_average_1min=[before["load_average_1min_before"], after["load_average_1min_before"]])
    return pipeline, bare


def fit_start_up(tokens: list[int], seconds: list[float]) -> dict:
    """Least-squares `seconds = start_up + tokens / rate` over the corpus sizes."""
    slope, start_up = np.polyfit(np.asarray(tokens, dtype=float), np.asarray(seconds), 1)
    return {"start_up_seconds": float(start_up), "tokens_per_second": float(1 / slope)}


def summarise(runs: list[dict], workers: int) -> dict:
    pipeline = [run["pipeline"] for run in runs]
    bare = [run["bare_tokenizer"] for run in runs]
    tokens = [row["tokens"] for row in pipeline]
    bare_tokens = sum(row["tokens"] for row in bare)
    wall = fit_start_up(tokens, [row["seconds"] for row in pipeline])
    cpu = fit_start_up(tokens, [row["cpu_seconds"] for row in pipeline])
    bare_rate = bare_tokens / sum(row["seconds"] for row in bare) / workers
    bare_cpu_rate = bare_tokens / sum(row["cpu_seconds"] for row in bare)
    for row in pipeline:
        row["start_up_share"] = min(1.0, max(0.0, wall["start_up_seconds"] / row["seconds"]))
    largest = runs[-1]
    return {
        "pipeline_wall": {**wall, "tokens_per_second_per_worker": wall["tokens_per_second"] / workers},
        "pipeline_cpu": {"start_up_cpu_seconds": cpu["start_up_seconds"],
                         "tokens_per_cpu_second": cpu["tokens_per_second"]},
        "bare_tokenizer": {"tokens_per_second_per_process": bare_rate, "tokens_per_cpu_second": bare_cpu_rate},
        "ratio": {
            # The goal: the pipeline's steady-state rate per worker against the tokenizer's per process (core).
            "steady_state_per_worker": wall["tokens_per_second"] / workers / bare_rate,
            "steady_state_per_cpu_second": cpu["tokens_per_second"] / bare_cpu_rate,
            "largest_corpus_per_worker": (largest["pipeline"]["tokens_per_second_per_worker"]
                                          / largest["bare_tokenizer"]["tokens_per_second_per_process"]),
        },
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = result["workers"]
    pipeline = [run["pipeline"] for run in result["runs"]]
    tokens = np.array([row["tokens"] for row in pipeline], dtype=float)
    fit, steady = result["steady_state"]["pipeline_wall"], result["steady_state"]
    curve = np.linspace(tokens.min() / 2, tokens.max() * 1.5, 200)
    figure, (rate_axis, time_axis) = plt.subplots(1, 2, figsize=(12, 4.4))
    rate_axis.plot(tokens / 1e6, [row["tokens_per_second_per_worker"] for row in pipeline], "o", color="tab:blue",
                   label="pipeline (measured)")
    rate_axis.plot(curve / 1e6, curve / (fit["start_up_seconds"] + curve / fit["tokens_per_second"]) / workers,
                   color="tab:blue", alpha=0.6, label="pipeline (fit: start-up + tokens / rate)")
    rate_axis.axhline(fit["tokens_per_second_per_worker"], color="tab:blue", linestyle="--",
                      label=f"pipeline steady state {fit['tokens_per_second_per_worker']:,.0f}")
    rate_axis.plot(tokens / 1e6, [run["bare_tokenizer"]["tokens_per_second_per_process"] for run in result["runs"]],
                   "s", color="tab:gray", label="bare tokenizer (measured)")
    bare = steady["bare_tokenizer"]["tokens_per_second_per_process"]
    rate_axis.axhline(bare, color="tab:gray", linestyle="--", label=f"bare tokenizer, per process {bare:,.0f}")
    rate_axis.set_xlabel("corpus (million tokens)")
    rate_axis.set_ylabel("tokens/s per worker (per core)")
    rate_axis.set_ylim(bottom=0)
    rate_axis.legend(fontsize=8, loc="lower right")
    time_axis.plot(tokens / 1e6, [row["seconds"] for row in pipeline], "o-", color="tab:blue", label="wall")
    time_axis.plot(tokens / 1e6, [row["cpu_seconds"] for row in pipeline], "s-", color="tab:orange",
                   label="CPU (driver + workers)")
    for row in pipeline:
        time_axis.annotate(f"start-up {row['start_up_share']:.0%}", (row["tokens"] / 1e6, row["seconds"]),
                           textcoords="offset points", xytext=(4, 6), fontsize=8)
    time_axis.margins(x=0.15, y=0.12)
    time_axis.set_xlabel("corpus (million tokens)")
    time_axis.set_ylabel("seconds")
    time_axis.set_ylim(bottom=0)
    time_axis.legend(fontsize=8, loc="upper left")
    ratio = steady["ratio"]
    figure.suptitle(f"dataprep, {workers} workers on {result['machine']['cpus']} CPUs: steady state per core = "
                    f"{ratio['steady_state_per_worker']:.2f} x bare tokenizer (wall), "
                    f"{ratio['steady_state_per_cpu_second']:.2f} x (CPU time)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=list(DEFAULT_REPLICAS),
                        help="corpus sizes, in copies of the bundled sample (about 2.4M tokens each)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if len(set(args.replicas)) < 2:
        parser.error("--replicas needs at least two different sizes to separate start-up from the rate")
    # One tokenizer thread, here and in the pipeline's workers (which inherit it): the per-core comparison.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    runs = []
    for replicas in sorted(set(args.replicas)):
        with tempfile.TemporaryDirectory(prefix="bench-dataprep-") as folder:
            inputs = write_corpus(Path(folder) / "corpus", replicas)
            pipeline, bare = time_side_by_side(inputs, Path(folder), args.workers, args.seq_len)
        assert bare["tokens"] == pipeline["tokens"], (bare["tokens"], pipeline["tokens"])
        runs.append({"replicas": replicas, "pipeline": pipeline, "bare_tokenizer": bare})
        print(f"{replicas:3d} copies, {pipeline['tokens'] / 1e6:6.1f}M tokens: pipeline {pipeline['seconds']:6.1f} s "
              f"({pipeline['tokens_per_second_per_worker']:9,.0f} tok/s per worker), bare tokenizer "
              f"{bare['seconds']:6.1f} s ({bare['tokens_per_second_per_process']:9,.0f} tok/s per process), "
              f"load {os.getloadavg()[0]:.1f}",
              flush=True)

    result = {
        "benchmark": "dataprep pipeline vs bare tokenizer per core, same texts, several corpus sizes, one run",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min_after": os.getloadavg()[0]},
        "workers": args.workers, "seq_len": args.seq_len,
        "runs": runs,
        "steady_state": summarise(runs, args.workers),
        "notes": "pipeline: the whole `python -m dataprep.build_mixture` run (start-up, reading, parsing, "
                 "tokenizing, de-duplication, MDS writing, index merge), timed in wall-clock and CPU seconds (the "
                 "command and its worker processes); bare tokenizer: one process per worker, one thread each, same "
                 "unique texts in equal shares, batches of "
                 f"{TOKENIZE_BATCH_DOCUMENTS}. Steady state: slope of a straight-line fit over the corpus sizes.",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dataprep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "dataprep.png")
    steady = result["steady_state"]
    print(f"start-up {steady['pipeline_wall']['start_up_seconds']:.1f} s; steady state per worker "
          f"{steady['pipeline_wall']['tokens_per_second_per_worker']:,.0f} tok/s vs bare tokenizer "
          f"{steady['bare_tokenizer']['tokens_per_second_per_process']:,.0f} tok/s per process: ratio "
          f"{steady['ratio']['steady_state_per_worker']:.2f} (wall), "
          f"{steady['ratio']['steady_state_per_cpu_second']:.2f} (CPU time)")
    print(f"wrote {args.out / 'dataprep.json'} and {args.out / 'dataprep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

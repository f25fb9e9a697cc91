"""Score retrieval models on LoCo (LoCoV1 or any task in its format) or LongEmbed, and compare them.

    python -m eval.loco --model bm25 --model all-MiniLM-L6-v2 --model all-MiniLM-L6-v2:chunk-mean
    python -m eval.loco --data hf --model path/to/m2-bert-80M-32k-retrieval --device cuda
    python -m eval.loco --data hf:longembed --model all-MiniLM-L6-v2:chunk-max --metrics main Recall@10
    python -m eval.loco --config configs/eval_baselines.yaml --max-queries 20

A model is `NAME[:PROTOCOL]` (NAME: bm25, all-MiniLM-L6-v2 or a local model directory; PROTOCOL:
truncate, chunk-mean or chunk-max); a --config file lists models with per-model options. Prints the
models x tasks table of each task's main metric (nDCG@10; nDCG@1 for LongEmbed's needle and passkey
lengths) and writes results.json, results.csv, scores.png (and lengths.png). Embeddings are
cached (--cache-dir): a rerun, or a run that adds a model, only embeds what is new. docs/eval.md has
the details, including sharded encoding of big corpora (--shard, or torchrun).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml

from .benchmark import embed_shard, score_models
from .cache import DEFAULT_WRITER, EmbeddingCache
from .data import HUB, LocoDataError, load_tasks
from .longembed import LONGEMBED_SOURCE
from .dense import SEARCHES
from .metrics import HEADLINE_METRIC, METRICS
from .models import ModelSpec
from .needle import needle_heatmap
from .report import MAIN, markdown_table, metric_title, score_table, write_outputs
from .sharding import Shard

DEFAULTS = {"data": None, "tasks": None, "split": "test", "top_k": 100, "batch_size": 16, "max_queries": None,
            "max_documents": None, "search": "exact"}
CONFIG_KEYS = ("models", *DEFAULTS)
DEFAULT_CACHE = Path(".cache/loco-embeddings")
REPORTED_PACKAGES = ("torch", "transformers", "sentence-transformers", "bm25s", "pytrec-eval-terrier", "m2-loco")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.loco", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    models = parser.add_argument_group("models")
    models.add_argument("--model", action="append", default=[], metavar="NAME[:PROTOCOL]",
                        help="a model to score (repeat to compare several)")
    models.add_argument("--config", type=Path, help="YAML file: `models:` (strings or mappings with model, "
                        "protocol, max_length, query_prefix, document_prefix, label, batch_size) and any of "
                        f"{', '.join(DEFAULTS)}; command-line values win")
    models.add_argument("--max-length", type=int, help="truncation/chunk length for the --model entries "
                        "(default: each model's maximum)")
    models.add_argument("--query-prefix", default="", help="text put before every query (--model entries)")
    models.add_argument("--document-prefix", default="", help="text put before every document or chunk (--model entries)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help=f"a folder in LoCo's or LongEmbed's layout, '{HUB}' for LoCoV1 or "
                      f"'{LONGEMBED_SOURCE}' for LongEmbed from the Hugging Face Hub (default: the bundled QMSum task)")
    data.add_argument("--tasks", nargs="+", help="task names (the `dataset` key; default: all)")
    data.add_argument("--split", help="split to score (default: test; 'all' for every row)")
    data.add_argument("--list-tasks", action="store_true", help="list the tasks of --data and stop")
    data.add_argument("--max-queries", type=int, help="quick run: at most this many queries per task")
    data.add_argument("--max-documents", type=int,
                      help="quick run: at most this many documents per task (relevant ones kept first)")
    run = parser.add_argument_group("run")
    run.add_argument("--top-k", type=int, help="documents retrieved per query (default: 100)")
    run.add_argument("--batch-size", type=int, help="encoder batch size (default: 16)")
    run.add_argument("--search", choices=SEARCHES, help="exact blockwise search (default) or FAISS")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="embedding cache folder (default: %(default)s)")
    run.add_argument("--no-cache", action="store_true", help="keep embeddings in memory only")
    run.add_argument("--shard", help="I/N: embed only shard I of N into the cache and stop (see docs/eval.md)")
    run.add_argument("--output-dir", type=Path, help="where results go (default: outputs/loco/<date-time>)")
    run.add_argument("--metrics", nargs="+", default=[MAIN], choices=(MAIN, *METRICS), metavar="METRIC",
                     help=f"tables to print: '{MAIN}' (each task's main metric: nDCG@10; nDCG@1 for LongEmbed's "
                     f"needle and passkey lengths) and/or any of {', '.join(METRICS)} (default: %(default)s); "
                     "the files hold them all")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for ours in ("eval", "model"):
        logging.getLogger(ours).setLevel(logging.INFO)
    started = time.perf_counter()
    if args.shard and args.no_cache:
        parser.error("--shard writes its embeddings to the cache: it cannot go with --no-cache")
    try:
        settings, specs = _settings(args)
    except (OSError, ValueError, yaml.YAMLError) as err:
        parser.error(str(err))
    try:
        tasks = load_tasks(settings["data"], settings["tasks"], settings["split"])
        if args.list_tasks:
            for task in tasks:
                print(f"{task.name}\t{len(task.queries)} queries\t{len(task.documents)} documents\t{task.source}")
            return 0
        if not specs:
            parser.error("no model: give --model (or a --config with models)")
        tasks = [task.subset(settings["max_queries"], settings["max_documents"]) for task in tasks]
        return _run(args, argv, settings, specs, tasks, started)
    except (LocoDataError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _settings(args) -> tuple[dict, list[ModelSpec]]:
    """Run settings and model specs from the config file and the command line (which wins)."""
    config = {}
    if args.config:
        config = yaml.safe_load(args.config.read_text()) or {}
        unknown = sorted(set(config) - set(CONFIG_KEYS)) if isinstance(config, dict) else None
        if unknown is None or unknown:
            raise ValueError(f"{args.config}: expected a mapping with keys from {CONFIG_KEYS}"
                             + (f"; unknown: {unknown}" if unknown else ""))
    settings = {key: config.get(key, default) for key, default in DEFAULTS.items()}
    settings.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None})
    if settings["split"] == "all":
        settings["split"] = None
    specs = [ModelSpec.from_config(entry, f"{args.config}, models[{i}]")
             for i, entry in enumerate(config.get("models") or [])]
    options = {"max_length": args.max_length, "query_prefix": args.query_prefix, "document_prefix": args.document_prefix}
    for text in args.model:
        is_bm25 = ModelSpec.parse(text).is_bm25
        specs.append(ModelSpec.parse(text, **({} if is_bm25 else options)))
    labels = [spec.display_name for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"several models are labelled {duplicates}: give them distinct labels in a --config")
    return settings, specs


def _run(args, argv: list[str], settings: dict, specs: list[ModelSpec], tasks, started: float) -> int:
    shard = Shard.parse(args.shard) if args.shard else Shard.from_torchrun()
    launched_by_torchrun = shard is not None and not args.shard
    device = _device(args.device, launched_by_torchrun)
    cache = EmbeddingCache(None if args.no_cache else args.cache_dir,
                           writer=shard.cache_writer if shard else DEFAULT_WRITER)
    try:
        if shard:
            embed_shard(specs, tasks, shard, cache, device, settings["batch_size"], not args.quiet)
            if not launched_by_torchrun:
                print(f"shard {shard.index}/{shard.count}: embeddings are in {args.cache_dir}; run without --shard "
                      f"(same models, tasks and cache) to score")
                return 0
            # torchrun: every rank embeds its shard; rank 0 then scores from the merged cache.
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            if shard.index != 0:
                return 0
        results, models = score_models(specs, tasks, cache, device, settings["batch_size"], settings["search"],
                                       settings["top_k"], not args.quiet)
    finally:
        cache.close()

    wall_seconds = time.perf_counter() - started
    output_dir = args.output_dir or Path("outputs/loco") / time.strftime("%Y%m%d-%H%M%S")
    settings = {**settings, "tasks": [task.name for task in tasks], "device": str(device),
                "cache_dir": None if args.no_cache else str(args.cache_dir), "wall_seconds": round(wall_seconds, 1),
                "command": " ".join(["python -m eval.loco", *argv]),
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": _versions()}
    paths = write_outputs(output_dir, results, models, settings)
    if needle_heatmap(results, output_dir / "needle.png", HEADLINE_METRIC):
        paths["needle"] = output_dir / "needle.png"

    subset = " (subset: not comparable with full runs)" if settings["max_queries"] or settings["max_documents"] else ""
    for metric in dict.fromkeys(args.metrics):
        print(f"\n{metric_title(results, metric)} x100, split {settings['split']}{subset}\n")
        print(markdown_table(score_table(results, metric)))
    embedded = sum(r.embedded or 0 for r in results)
    cached = sum(r.cached or 0 for r in results)
    print(f"\n{len(specs)} model(s) x {len(tasks)} task(s) in {wall_seconds:.1f} s; "
          f"{embedded} texts embedded, {cached} from the cache")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _device(name: str, launched_by_torchrun: bool) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun else 0)


def _versions() -> dict[str, str]:
    versions = {}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


if __name__ == "__main__":
    raise SystemExit(main())

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

Every model and setting is checked before any data is read or any model runs (exit status 2). A
model that fails while running is recorded with its error in the outputs, the others are scored,
and the exit status is 1. A model folder that would run code of its own is refused unless
--trust-remote-code (or `trust_remote_code: true` in a --config entry).
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
from .report import MAIN, full_table, markdown_table, metric_title, write_outputs
from .sharding import Shard

# Exit statuses: bad input (nothing ran), and a run in which some model failed (the others' results written).
BAD_INPUT, MODEL_FAILED = 2, 1
# Files a run writes into its output folder: one holding any of them holds an earlier run's results.
OUTPUT_FILES = ("results.json", "results.csv", "scores.png", "lengths.png", "needle.png")
POSITIVE_SETTINGS = ("top_k", "batch_size", "max_queries", "max_documents")

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
                        "protocol, max_length, query_prefix, document_prefix, label, batch_size, "
                        "trust_remote_code) and any of "
                        f"{', '.join(DEFAULTS)}; command-line values win")
    models.add_argument("--max-length", type=int, help="truncation/chunk length for the --model entries "
                        "(default: each model's maximum)")
    models.add_argument("--query-prefix", default="", help="text put before every query (--model entries)")
    models.add_argument("--document-prefix", default="", help="text put before every document or chunk (--model entries)")
    models.add_argument("--trust-remote-code", action="store_true",
                        help="let the --model folders run Python code they ship or name (custom "
                        "sentence-transformers modules, Hugging Face remote code): only for folders you trust")
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
    run.add_argument("--output-dir", type=Path, help="where results go (default: outputs/loco/<date-time>); "
                     "a folder holding an earlier run's results is refused unless --overwrite")
    run.add_argument("--overwrite", action="store_true", help="replace the results files in --output-dir")
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
        settings, specs, sources = _settings(args)
    except (OSError, ValueError, yaml.YAMLError) as err:
        parser.error(str(err))
    # Everything that can be checked without the data is checked before it is read and before any model runs.
    if not specs and not args.list_tasks:
        parser.error("no model: give --model (or a --config with models)")
    problems = _model_problems(specs, sources)
    if args.output_dir and not (args.overwrite or args.shard or args.list_tasks):
        earlier = [name for name in OUTPUT_FILES if (args.output_dir / name).exists()]
        if earlier:
            problems.append(f"--output-dir {args.output_dir} already holds an earlier run's {', '.join(earlier)}: "
                            "choose another folder, or pass --overwrite to replace them")
    if problems:
        parser.error("\n  ".join(["bad input, nothing was run:", *problems]))
    try:
        tasks = load_tasks(settings["data"], settings["tasks"], settings["split"])
        if args.list_tasks:
            for task in tasks:
                print(f"{task.name}\t{len(task.queries)} queries\t{len(task.documents)} documents\t{task.source}")
            return 0
        tasks = [task.subset(settings["max_queries"], settings["max_documents"]) for task in tasks]
        return _run(args, argv, settings, specs, tasks, started)
    except (LocoDataError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT


def _settings(args) -> tuple[dict, list[ModelSpec], list[str]]:
    """Run settings, model specs and where each spec came from (for errors), from the config file and
    the command line (which wins)."""
    config = {}
    if args.config:
        config = yaml.safe_load(args.config.read_text()) or {}
        unknown = sorted(set(config) - set(CONFIG_KEYS)) if isinstance(config, dict) else None
        if unknown is None or unknown:
            raise ValueError(f"{args.config}: expected a mapping with keys from {CONFIG_KEYS}"
                             + (f"; unknown: {unknown}" if unknown else ""))
    settings = {key: config.get(key, default) for key, default in DEFAULTS.items()}
    settings.update({key: getattr(args, key) for key in DEFAULTS if getattr(args, key) is not None})
    _check_settings(settings, args.config)
    if settings["split"] == "all":
        settings["split"] = None
    entries = config.get("models") or []
    if not isinstance(entries, list):
        raise ValueError(f"{args.config}: `models` must be a list, got {entries!r}")
    sources = [f"{args.config}, models[{i}]" for i in range(len(entries))]
    specs = [ModelSpec.from_config(entry, where) for entry, where in zip(entries, sources)]
    options = {"max_length": args.max_length, "query_prefix": args.query_prefix,
               "document_prefix": args.document_prefix, "trust_remote_code": args.trust_remote_code}
    for text in args.model:
        is_bm25 = ModelSpec.parse(text).is_bm25
        try:
            specs.append(ModelSpec.parse(text, **({} if is_bm25 else options)))
        except ValueError as err:
            raise ValueError(f"--model: {err}") from err
        sources.append("--model")
    labels = [spec.display_name for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"several models are labelled {duplicates}: give them distinct labels in a --config")
    return settings, specs, sources


def _check_settings(settings: dict, config: Path | None) -> None:
    """Run settings of the right type and range (a config file can hold anything)."""
    where = f"{config}: " if config else ""
    for key in POSITIVE_SETTINGS:
        value = settings[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}{key} must be a positive integer, got {value!r}")
    if settings["search"] not in SEARCHES:
        raise ValueError(f"{where}search must be one of {', '.join(SEARCHES)}, got {settings['search']!r}")
    for key in ("data", "split"):
        if settings[key] is not None and not isinstance(settings[key], str):
            raise ValueError(f"{where}{key} must be a string, got {settings[key]!r}")
    tasks = settings["tasks"]
    if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks)):
        raise ValueError(f"{where}tasks must be a list of task names, got {tasks!r}")


def _model_problems(specs: list[ModelSpec], sources: list[str]) -> list[str]:
    """Why each model that cannot load cannot (`ModelSpec.check_loadable`), named by where it was given."""
    problems = []
    for spec, where in zip(specs, sources):
        try:
            spec.check_loadable()
        except (OSError, ValueError, ImportError) as err:
            problems.append(f"{where}: {err}")
    return problems


def _run(args, argv: list[str], settings: dict, specs: list[ModelSpec], tasks, started: float) -> int:
    shard = Shard.parse(args.shard) if args.shard else Shard.from_torchrun()
    launched_by_torchrun = shard is not None and not args.shard
    device = _device(args.device, launched_by_torchrun)
    cache = EmbeddingCache(None if args.no_cache else args.cache_dir,
                           writer=shard.cache_writer if shard else DEFAULT_WRITER)
    shard_failures = {}
    try:
        if shard:
            shard_failures = embed_shard(specs, tasks, shard, cache, device, settings["batch_size"], not args.quiet)
            _report_failures(shard_failures)
            if not launched_by_torchrun:
                print(f"shard {shard.index}/{shard.count}: embeddings are in {args.cache_dir}; run without --shard "
                      f"(same models, tasks and cache) to score")
                return MODEL_FAILED if shard_failures else 0
            # torchrun: every rank embeds its shard; rank 0 then scores from the merged cache.
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            if shard.index != 0:
                return MODEL_FAILED if shard_failures else 0
        results, models = score_models(specs, tasks, cache, device, settings["batch_size"], settings["search"],
                                       settings["top_k"], not args.quiet)
    finally:
        cache.close()

    wall_seconds = time.perf_counter() - started
    output_dir = args.output_dir or _new_folder(Path("outputs/loco") / time.strftime("%Y%m%d-%H%M%S"))
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
        print(markdown_table(full_table(results, models, settings, metric)))
    embedded = sum(r.embedded or 0 for r in results)
    cached = sum(r.cached or 0 for r in results)
    print(f"\n{len(specs)} model(s) x {len(tasks)} task(s) in {wall_seconds:.1f} s; "
          f"{embedded} texts embedded, {cached} from the cache")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    failures = {m["label"]: m["error"] for m in models if "error" in m}
    _report_failures(failures)
    return MODEL_FAILED if failures or shard_failures else 0


def _report_failures(failures: dict[str, str]) -> None:
    if failures:
        print(f"\n{len(failures)} model(s) failed (the outputs record their errors):", file=sys.stderr)
        for label, error in failures.items():
            print(f"  {label}: {error}", file=sys.stderr)


def _new_folder(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : a folder no other run has taken (two runs may start in the same second)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = path if attempt == 1 else path.with_name(f"{path.name}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: every numbered variant is taken")


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

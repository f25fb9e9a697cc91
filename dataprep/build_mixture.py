"""`python -m dataprep.build_mixture`: C4, Wikipedia and Books files -> the weighted MDS pretraining mixture.

With no input flags it runs on the small real sample bundled in `dataprep/sample_data/`. Any Beam pipeline
option is passed through (`--runner`, `--direct_num_workers`, `--project`, ...); see docs/dataprep.md for
Dataflow, Flink and Spark.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .manifest import DEFAULT_PROPORTIONS, KINDS, SOURCES, stream_name
from .records import BadInputError

SAMPLE_DATA = Path(__file__).parent / "sample_data"
SAMPLE_INPUTS = {
    "c4": [str(SAMPLE_DATA / "c4" / "**" / "*.json.gz")],
    "wikipedia": [str(SAMPLE_DATA / "wikipedia" / "**" / "*.parquet")],
    "books": [str(SAMPLE_DATA / "books" / "pg19" / "**" / "*.txt"),
              str(SAMPLE_DATA / "books" / "pile-format" / "*.jsonl.zst")],
}
DEFAULT_SEQ_LEN = 128
BYTES_PER_MB = 1 << 20

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Arguments that cannot work together (the message says which and why)."""


@dataclass(frozen=True)
class MixtureConfig:
    """The arguments of one build: inputs per source (paths or globs), output folder and sample settings."""

    inputs: dict[str, list[str]]
    out: str
    seq_len: int = DEFAULT_SEQ_LEN
    proportions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PROPORTIONS))
    validation_fraction: float = 0.02
    min_tokens: int = 8
    partitions: int = 8
    max_record_mb: float = 8.0
    strict: bool = False
    overwrite: bool = False


# Where the result goes, not what it is: left out of the summary's settings.
OUTPUT_FIELDS = ("inputs", "out", "overwrite")


def build_mixture(config: MixtureConfig, beam_args: list[str] | None = None) -> dict:
    """Runs the pipeline and returns the run summary; the manifest is `<config.out>/manifest.json`."""
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from . import assemble, output
    from .transforms import PipelineSettings, build_mixture_pipeline

    _check_config(config)
    out = output.normalize(config.out)
    output.check_output(out, config.overwrite)  # before any work: a refused run writes nothing
    files = match_inputs(config.inputs)
    started = time.monotonic()
    with output.OutputLock(out):
        output.check_output(out, config.overwrite)  # again, now that no other run can change it
        staging = output.prepare_staging(out)
        work = FileSystems.join(staging, output.WORK_FOLDER_NAME)
        settings = PipelineSettings(staging=staging, seq_len=config.seq_len, min_tokens=config.min_tokens,
                                    validation_fraction=config.validation_fraction, partitions=config.partitions,
                                    max_record_bytes=int(config.max_record_mb * BYTES_PER_MB), strict=config.strict)
        options = PipelineOptions(_default_beam_args() + list(beam_args or []))
        logger.info("%d input files; staging in %s; stages: ReadCorpusFiles -> ParseDocuments -> DropExactDuplicates "
                    "-> TokenizeDocuments -> WritePartitions -> MergeStreamIndexes", len(files), staging)
        try:
            with beam.Pipeline(options=options) as pipeline:
                build_mixture_pipeline(pipeline, files, settings, work)
        except Exception as error:
            output.delete_folder(staging)  # a failed run leaves nothing behind (a killed one: see prepare_staging)
            message = _bad_input_message(error)
            if message is None:
                raise
            raise BadInputError(message) from None
        logger.info("pipeline finished in %.1f s; writing the manifest", time.monotonic() - started)

        partition_stats = assemble.read_json_lines(FileSystems.join(work, "partitions*.jsonl"))
        tallies = assemble.read_json_lines(FileSystems.join(work, "tallies*.jsonl"))
        assemble.write_empty_indexes(staging, partition_stats)
        totals = assemble.stream_totals(partition_stats)
        manifest = assemble.build_manifest(config.seq_len, config.proportions, totals)
        settings_record = {key: value for key, value in asdict(config).items() if key not in OUTPUT_FIELDS}
        summary = assemble.build_summary(config.inputs, settings_record, files, tallies, totals, manifest,
                                         time.monotonic() - started)
        assemble.finish(staging, out, manifest, summary, config.overwrite)
    for name in summary["empty_streams"]:
        logger.warning("stream %s has no samples", name)
    return summary


def _default_beam_args() -> list[str]:
    # Earlier flags lose to later ones, so anything given on the command line overrides these.
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
            f"--direct_num_workers={os.cpu_count() or 1}", "--default_sdk_harness_log_level=WARNING",
            '--sdk_harness_log_level_overrides={"dataprep": "INFO"}']


def _bad_input_message(error: BaseException) -> str | None:
    # In multi-process runs the worker's exception arrives as text inside the runner's own error.
    if isinstance(error, BadInputError):
        return str(error)
    found = re.search(r"BadInputError: (.+)", str(error))
    return found.group(1).strip() if found else None


def _check_config(config: MixtureConfig) -> None:
    unknown = set(config.proportions) - set(DEFAULT_PROPORTIONS)
    if unknown:
        raise UsageError(f"unknown stream names in --proportions: {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_PROPORTIONS)}")
    if any(value < 0 for value in config.proportions.values()):
        raise UsageError(f"--proportions must not be negative: {config.proportions}")
    total = sum(config.proportions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise UsageError(f"--proportions sum to {total:.6g}, not 1: {config.proportions}")
    for source in SOURCES:
        weighted = [stream_name(source, kind) for kind in KINDS if config.proportions.get(stream_name(source, kind))]
        if weighted and not config.inputs.get(source):
            raise UsageError(f"no --{source} input, but {', '.join(weighted)} have a non-zero proportion; "
                             f"pass --{source} or set their proportions to 0 (and rebalance the others)")
    if config.seq_len < 3:
        raise UsageError(f"--seq-len must be at least 3 ([CLS], one token, [SEP]), got {config.seq_len}")
    if not 1 <= config.min_tokens <= config.seq_len - 2:
        raise UsageError(f"--min-tokens must be between 1 and seq_len - 2 = {config.seq_len - 2}")
    if not 0 <= config.validation_fraction < 1:
        raise UsageError(f"--validation-fraction must be in [0, 1), got {config.validation_fraction}")
    if config.partitions < 1:
        raise UsageError(f"--partitions must be at least 1, got {config.partitions}")


def match_inputs(inputs: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Sorted, distinct (source, file) pairs; a local folder means every file under it."""
    from apache_beam.io.filesystems import FileSystems

    files = set()
    for source, patterns in inputs.items():
        for pattern in patterns:
            if os.path.isdir(pattern):
                pattern = os.path.join(pattern, "**")
            matched = FileSystems.match([pattern])[0].metadata_list
            if not matched:
                raise UsageError(f"--{source} {pattern}: no file matches")
            files.update((source, metadata.path) for metadata in matched)
    for source, path in files:
        try:
            path.encode("utf-8")  # file names travel in the summary and through Beam's coders as UTF-8
        except UnicodeEncodeError:
            raise UsageError(f"--{source}: the file name {path!r} is not valid UTF-8; rename the file") from None
    return sorted(files)


def parse_proportions(text: str) -> dict[str, float]:
    """`c4-natural=0.1,books-concat=0.23,...`: streams not named keep their default proportion."""
    proportions = dict(DEFAULT_PROPORTIONS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, separator, value = item.partition("=")
        if not separator:
            raise UsageError(f"--proportions item {item!r} is not NAME=VALUE")
        try:
            proportions[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--proportions item {item!r}: {value!r} is not a number") from None
    return proportions


def summary_table(summary: dict) -> str:
    """The end-of-run table: documents and skips per source, samples and tokens per stream, time and throughput."""
    lines = [f"{'source':<10} {'files':>6} {'read':>8} {'skipped':>8} {'train docs':>10} {'val docs':>9}  skipped by reason"]
    for source, entry in summary["sources"].items():
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(entry["skipped"].items())) or "-"
        lines.append(f"{source:<10} {entry['files']:>6} {entry['documents_read']:>8} {sum(entry['skipped'].values()):>8} "
                     f"{entry['documents_train']:>10} {entry['documents_validation']:>9}  {reasons}")
    lines.append("")
    lines.append(f"{'stream':<18} {'train samples':>13} {'train tokens':>13} {'val samples':>11} {'val tokens':>11}")
    for name, splits in summary["streams"].items():
        lines.append(f"{name:<18} {splits['train']['samples']:>13} {splits['train']['tokens']:>13} "
                     f"{splits['validation']['samples']:>11} {splits['validation']['tokens']:>11}")
    timing = summary["timing"]
    lines.append("")
    lines.append(f"time {timing['seconds']:.1f} s; {timing['documents_per_second']} documents/s, "
                 f"{timing['tokens_per_second']} tokens/s")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataprep.build_mixture", description=__doc__,
        epilog="Other arguments are Beam pipeline options (e.g. --runner, --direct_num_workers).")
    for source in SOURCES:
        parser.add_argument(f"--{source}", action="extend", nargs="+", default=[], metavar="PATH_OR_GLOB",
                            help=f"{source} input files (repeatable; local or any Beam filesystem, e.g. gs://)")
    parser.add_argument("--out", help="output folder (default: outputs/mixture-<seq-len>)")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--proportions", type=parse_proportions, default=dict(DEFAULT_PROPORTIONS),
                        help="NAME=VALUE,... over the six streams {c4,wikipedia,books}-{natural,concat}; must sum to 1")
    parser.add_argument("--validation-fraction", type=float, default=MixtureConfig.validation_fraction)
    parser.add_argument("--min-tokens", type=int, default=MixtureConfig.min_tokens,
                        help="documents with fewer tokens are skipped")
    parser.add_argument("--partitions", type=int, default=MixtureConfig.partitions,
                        help="output partitions per stream; each must fit one worker's memory")
    parser.add_argument("--max-record-mb", type=float, default=MixtureConfig.max_record_mb,
                        help="longer lines (or text files) are skipped as bad input")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output of this command in --out (never a folder with other files)")
    return parser


def configure_logging() -> None:
    """INFO from this pipeline, warnings only from Beam itself (for command-line runs)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    # Worker logs reach stderr directly; the local job service would repeat each of them as a warning.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    from .output import OutputError  # after configure_logging: Beam logs on import
    try:
        args, beam_args = _parser().parse_known_args(argv)
        given = {source: getattr(args, source) for source in SOURCES if getattr(args, source)}
        config = MixtureConfig(inputs=given or dict(SAMPLE_INPUTS),
                               out=args.out or os.path.join("outputs", f"mixture-{args.seq_len}"),
                               seq_len=args.seq_len, proportions=args.proportions,
                               validation_fraction=args.validation_fraction, min_tokens=args.min_tokens,
                               partitions=args.partitions, max_record_mb=args.max_record_mb, strict=args.strict,
                               overwrite=args.overwrite)
        if not given:
            logger.info("no input flags: using the bundled sample in %s", SAMPLE_DATA)
        summary = build_mixture(config, beam_args)
    except (UsageError, BadInputError, OutputError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    sys.stdout.write(summary_table(summary) + "\n")
    sys.stdout.write(f"manifest: {os.path.join(config.out, 'manifest.json')}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""After the Beam run: merge the partition indexes, write the manifest and summary, and move the result into place.

The pipeline writes everything under a staging folder (`<out>.partial`); only a complete result, manifest
included, is moved to `<out>`. An interrupted run therefore leaves no `<out>` with a manifest behind, and
the next run starts by removing the stale staging folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from .manifest import (FORMAT, KINDS, SOURCES, SPECIAL_TOKENS, SPLITS, STREAM_NAMES, TOKENIZER_NAME, manifest_json,
                       stream_name)
from .records import BAD_INPUT_REASONS, DOCUMENT

MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "summary.json"
WORK_FOLDER_NAME = "_work"
STAGING_SUFFIX = ".partial"
EMPTY_MDS_INDEX = {"version": 2, "shards": []}

logger = logging.getLogger(__name__)


def is_local(path: str) -> bool:
    """Whether `path` is on the local filesystem (no scheme), where a folder can be renamed atomically."""
    return FileSystems.get_scheme(path) is None


def staging_folder(out: str) -> str:
    """Where a run writes before its result is complete."""
    return out.rstrip("/") + STAGING_SUFFIX


def prepare_staging(staging: str) -> None:
    """Remove what an interrupted earlier run left in the staging folder."""
    if _has_files(staging):
        logger.info("removing %s, left by an interrupted run", staging)
        delete_folder(staging)


def delete_folder(path: str) -> None:
    """Remove a folder and everything in it (if it exists), locally or on object storage (a name prefix)."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif _has_files(path):
        FileSystems.delete([path.rstrip("/") + "/"])


def _has_files(folder: str) -> bool:
    return bool(FileSystems.match([FileSystems.join(folder, "**")])[0].metadata_list)


def read_json_lines(pattern: str) -> list[dict]:
    """All rows of the JSON-lines files matching `pattern`."""
    rows = []
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            rows.extend(json.loads(line) for line in handle.read().decode("utf-8").splitlines() if line)
    return rows


def merge_stream_indexes(staging: str, partition_stats: list[dict]) -> None:
    """Writes `<split>/<stream>/index.json` over each stream's partitions (an empty index for an empty stream)."""
    from streaming.base.util import merge_index

    written: dict[tuple[str, str], list[int]] = {}
    for row in partition_stats:
        if row["samples"]:
            written.setdefault((row["split"], row["stream"]), []).append(row["partition"])
    for split in SPLITS:
        for name in STREAM_NAMES:
            folder = FileSystems.join(staging, split, name)
            partitions = sorted(written.get((split, name), []))
            if not partitions:
                _write_text(FileSystems.join(folder, "index.json"), json.dumps(EMPTY_MDS_INDEX))
                continue
            indexes = [FileSystems.join(folder, f"part-{partition:05d}", "index.json") for partition in partitions]
            with _root_warnings_silenced():  # merge_index warns about its temporary folder on every call
                merge_index(indexes, folder)


@contextlib.contextmanager
def _root_warnings_silenced():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def stream_totals(partition_stats: list[dict]) -> dict[tuple[str, str], dict]:
    """(split, stream) -> documents, document tokens, samples and sample tokens, summed over partitions."""
    totals = {(split, name): dict.fromkeys(("documents", "document_tokens", "samples", "tokens"), 0)
              for split in SPLITS for name in STREAM_NAMES}
    for row in partition_stats:
        total = totals[(row["split"], row["stream"])]
        for key in total:
            total[key] += row[key]
    return totals


def build_manifest(seq_len: int, proportions: dict[str, float], totals: dict[tuple[str, str], dict]) -> dict:
    """The `m2-mixture/1` manifest (docs/interfaces.md) of the streams with a non-zero proportion."""
    streams = []
    for kind in KINDS:
        for source in SOURCES:
            name = stream_name(source, kind)
            if proportions.get(name):
                splits = {split: {"path": f"{split}/{name}", "samples": totals[(split, name)]["samples"],
                                  "tokens": totals[(split, name)]["tokens"]} for split in SPLITS}
                streams.append({"name": name, "source": source, "kind": kind, "proportion": proportions[name],
                                "splits": splits})
    return {"format": FORMAT, "tokenizer": TOKENIZER_NAME, "seq_len": seq_len,
            "special_tokens": dict(SPECIAL_TOKENS), "streams": streams}


def build_summary(inputs: dict[str, list[str]], settings: dict, files: list[tuple[str, str]], tallies: list[dict],
                  totals: dict[tuple[str, str], dict], manifest: dict, seconds: float) -> dict:
    """Everything a person checks after a run: per source, per file and per reason, per stream, and timing."""
    per_file = {path: {"source": source, "documents": 0, "skipped": {}} for source, path in files}
    per_source = {source: {"files": 0, "documents_read": 0, "skipped": {}} for source in SOURCES}
    skipped_by_reason: dict[str, int] = {}
    for source, _ in files:
        per_source[source]["files"] += 1
    for tally in sorted(tallies, key=lambda t: (t["file"], t["outcome"])):
        entry, source_entry = per_file[tally["file"]], per_source[tally["source"]]
        if tally["outcome"] == DOCUMENT:
            entry["documents"] = tally["count"]
            source_entry["documents_read"] += tally["count"]
            continue
        entry["skipped"][tally["outcome"]] = {"count": tally["count"], "examples": tally["examples"]}
        source_entry["skipped"][tally["outcome"]] = source_entry["skipped"].get(tally["outcome"], 0) + tally["count"]
        skipped_by_reason[tally["outcome"]] = skipped_by_reason.get(tally["outcome"], 0) + tally["count"]
    document_tokens = 0
    for source in SOURCES:
        for split in SPLITS:
            natural = totals[(split, stream_name(source, "natural"))]
            per_source[source][f"documents_{split}"] = natural["documents"]
            per_source[source][f"tokens_{split}"] = natural["document_tokens"]
            document_tokens += natural["document_tokens"]
    documents_read = sum(entry["documents_read"] for entry in per_source.values())
    streams = {entry["name"]: {split: entry["splits"][split] for split in SPLITS} for entry in manifest["streams"]}
    return {
        "inputs": inputs,
        "settings": settings,
        "sources": per_source,
        "skipped_by_reason": dict(sorted(skipped_by_reason.items())),
        "bad_records": sum(count for reason, count in skipped_by_reason.items() if reason in BAD_INPUT_REASONS),
        "files": dict(sorted(per_file.items())),
        "streams": streams,
        "empty_streams": sorted(f"{split}/{name}" for name, splits in streams.items()
                                for split in SPLITS if not splits[split]["samples"]),
        # Timing differs between runs; everything above is a function of the inputs and arguments.
        "timing": {"seconds": round(seconds, 3),
                   "documents_per_second": round(documents_read / seconds, 1) if seconds else None,
                   "tokens_per_second": round(document_tokens / seconds, 1) if seconds else None},
    }


def finish(staging: str, out: str, manifest: dict, summary: dict) -> None:
    """Writes the summary and then the manifest into the staging folder, and moves it to `out`."""
    delete_folder(FileSystems.join(staging, WORK_FOLDER_NAME))
    _write_text(FileSystems.join(staging, SUMMARY_NAME), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _write_text(FileSystems.join(staging, MANIFEST_NAME), manifest_json(manifest))
    if is_local(staging):
        _replace_local_folder(staging, out)
    else:
        _replace_remote_folder(staging, out)


def _replace_local_folder(staging: str, out: str) -> None:
    previous = out.rstrip("/") + ".replaced"
    if os.path.exists(previous):
        shutil.rmtree(previous)
    if os.path.exists(out):
        os.rename(out, previous)
    os.rename(staging, out)
    if os.path.exists(previous):
        shutil.rmtree(previous)


def _replace_remote_folder(staging: str, out: str) -> None:
    # Object stores have no folder rename: copy every file, the manifest last, so that a reader waiting
    # for the manifest never sees a partial result.
    delete_folder(out)
    sources = sorted(metadata.path for metadata in FileSystems.match([FileSystems.join(staging, "**")])[0].metadata_list)
    sources.sort(key=lambda path: path.endswith("/" + MANIFEST_NAME))
    prefix = staging.rstrip("/") + "/"
    for path in sources:
        FileSystems.copy([path], [FileSystems.join(out, path[len(prefix):])])
    delete_folder(staging)


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(text.encode("utf-8"))

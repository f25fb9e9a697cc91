"""Assembling the result: merged stream indexes, the manifest and the summary, and moving it into place.

The pipeline writes everything under a staging folder (`<out>.partial`); only a complete result, manifest
included, is published as `<out>` (dataprep.output). An interrupted run therefore leaves no `<out>` with a
manifest behind.
"""

from __future__ import annotations

import contextlib
import json
import logging

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from .manifest import (FORMAT, KINDS, SOURCES, SPECIAL_TOKENS, SPLITS, STREAM_NAMES, TOKENIZER_NAME, manifest_json,
                       stream_name)
from .output import MANIFEST_NAME, SUMMARY_NAME, publish, write_text
from .records import BAD_INPUT_REASONS, DOCUMENT

EMPTY_MDS_INDEX = {"version": 2, "shards": []}


def read_json_lines(pattern: str) -> list[dict]:
    """All rows of the JSON-lines files matching `pattern`."""
    rows = []
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            rows.extend(json.loads(line) for line in handle.read().decode("utf-8").splitlines() if line)
    return rows


def merge_stream_index(staging: str, split: str, name: str, partitions: list[int]) -> None:
    """Writes `<split>/<stream>/index.json` over the stream's partitions (in a worker, which has streaming loaded)."""
    from streaming.base.util import merge_index

    folder = FileSystems.join(staging, split, name)
    indexes = [FileSystems.join(folder, f"part-{partition:05d}", "index.json") for partition in sorted(partitions)]
    with _root_warnings_silenced():  # merge_index warns about its temporary folder on every call
        merge_index(indexes, folder)


def write_empty_indexes(staging: str, partition_stats: list[dict]) -> None:
    """An empty MDS index for each stream without samples (the others are merged by the pipeline)."""
    written = {(row["split"], row["stream"]) for row in partition_stats if row["samples"]}
    for split in SPLITS:
        for name in STREAM_NAMES:
            if (split, name) not in written:
                write_text(FileSystems.join(staging, split, name, "index.json"), json.dumps(EMPTY_MDS_INDEX))


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


def finish(staging: str, out: str, manifest: dict, summary: dict, overwrite: bool) -> None:
    """Writes the summary and then the manifest into the staging folder, and publishes it as `out`."""
    write_text(FileSystems.join(staging, SUMMARY_NAME), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_text(FileSystems.join(staging, MANIFEST_NAME), manifest_json(manifest))
    publish(staging, out, overwrite)

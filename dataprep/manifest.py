"""The mixture manifest: the contract between data preparation and pretraining.

`<out>/manifest.json` lists every stream of the mixture (one MDS dataset per source, kind and split)
with its proportion; see docs/interfaces.md. This module has no heavy imports until `streams()` is
called, so the training stage and the CLI can read and validate a manifest cheaply.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

FORMAT = "m2-mixture/1"
TOKENIZER_NAME = "bert-base-uncased"
SPECIAL_TOKENS = {"pad": 0, "cls": 101, "sep": 102, "mask": 103}
SOURCES = ("c4", "wikipedia", "books")
KINDS = ("natural", "concat")
SPLITS = ("train", "validation")
# The M2-BERT recipe (paper Table 2): 30% natural-length documents, 70% concatenated to full length.
DEFAULT_PROPORTIONS = {
    "c4-natural": 0.10, "wikipedia-natural": 0.10, "books-natural": 0.10,
    "c4-concat": 0.24, "wikipedia-concat": 0.23, "books-concat": 0.23,
}
PROPORTION_TOLERANCE = 1e-6

logger = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest that does not follow the `m2-mixture/1` format; the message names the file and key."""


def stream_name(source: str, kind: str) -> str:
    """The name of the stream of `kind` samples from `source`, e.g. `books-concat`."""
    return f"{source}-{kind}"


STREAM_NAMES = tuple(stream_name(source, kind) for kind in KINDS for source in SOURCES)


def manifest_json(manifest: dict) -> str:
    """Validate `manifest` and return it as stable, human-readable JSON (sorted keys, trailing newline)."""
    _validate(manifest, "the manifest being written")
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def read_manifest(path: str | Path) -> dict:
    """Parse and validate `<out>/manifest.json`; raises `ManifestError` naming the file and the bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON ({error})") from error
    return parse_manifest(text, str(path))


def parse_manifest(text: str, where: str) -> dict:
    """Parse and validate a manifest's text; `where` (its path or URL) starts every error message."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{where}: not valid JSON ({error})") from error
    _validate(manifest, where)
    return manifest


def streams(manifest_path: str | Path, split: str) -> list:
    """`streaming.Stream` objects of one split, each with its proportion, for `StreamingDataset(streams=...)`.

    Streams with no samples in this split are left out (with a warning): `StreamingDataset` cannot draw
    from an empty stream, and it renormalises the proportions of the others.
    """
    from streaming import Stream

    if split not in SPLITS:
        raise ManifestError(f"{manifest_path}: unknown split {split!r}; expected one of {SPLITS}")
    manifest = read_manifest(manifest_path)
    root = Path(manifest_path).resolve().parent
    selected = []
    for entry in manifest["streams"]:
        part = entry["splits"][split]
        if part["samples"] == 0:
            logger.warning("%s: stream %s has no %s samples; leaving it out", manifest_path, entry["name"], split)
            continue
        selected.append(Stream(local=str(root / part["path"]), proportion=entry["proportion"]))
    if not selected:
        raise ManifestError(f"{manifest_path}: no stream has {split} samples")
    return selected


def _validate(manifest: object, where: str) -> None:
    def fail(message: str) -> None:
        raise ManifestError(f"{where}: {message}")

    if not isinstance(manifest, dict):
        fail("the manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        fail(f"'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("tokenizer") != TOKENIZER_NAME:
        fail(f"'tokenizer' is {manifest.get('tokenizer')!r}, expected {TOKENIZER_NAME!r}")
    seq_len = manifest.get("seq_len")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        fail(f"'seq_len' must be an integer >= 2, got {seq_len!r}")
    if manifest.get("special_tokens") != SPECIAL_TOKENS:
        fail(f"'special_tokens' must be {SPECIAL_TOKENS}, got {manifest.get('special_tokens')!r}")
    entries = manifest.get("streams")
    if not isinstance(entries, list) or not entries:
        fail("'streams' must be a non-empty list")
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in entries]
    if len(set(names)) != len(names):
        fail(f"stream names repeat: {names}")
    for index, entry in enumerate(entries):
        _validate_stream(entry, f"streams[{index}]", fail)
    total = sum(entry["proportion"] for entry in entries)
    if not math.isclose(total, 1.0, abs_tol=PROPORTION_TOLERANCE):
        fail(f"stream proportions sum to {total}, not 1")


def _validate_stream(entry: object, key: str, fail) -> None:
    if not isinstance(entry, dict):
        fail(f"{key} is not an object")
    source, kind = entry.get("source"), entry.get("kind")
    if source not in SOURCES:
        fail(f"{key}.source is {source!r}, expected one of {SOURCES}")
    if kind not in KINDS:
        fail(f"{key}.kind is {kind!r}, expected one of {KINDS}")
    if entry.get("name") != stream_name(source, kind):
        fail(f"{key}.name is {entry.get('name')!r}, expected {stream_name(source, kind)!r}")
    proportion = entry.get("proportion")
    if not isinstance(proportion, (int, float)) or isinstance(proportion, bool) or not 0 < proportion <= 1:
        fail(f"{key}.proportion must be a number in (0, 1], got {proportion!r}")
    splits = entry.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        fail(f"{key}.splits must have exactly the keys {SPLITS}")
    for split in SPLITS:
        part = splits[split]
        if not isinstance(part, dict):
            fail(f"{key}.splits.{split} is not an object")
        path = part.get("path")
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
            fail(f"{key}.splits.{split}.path must be a relative path inside the manifest's folder, got {path!r}")
        for count in ("samples", "tokens"):
            value = part.get(count)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"{key}.splits.{split}.{count} must be a non-negative integer, got {value!r}")

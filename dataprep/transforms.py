"""The Beam transforms of the mixture pipeline, each a small named step.

    (source, path) -> ReadCorpusFiles -> ParseDocuments -> DropExactDuplicates -> TokenizeDocuments
      -> WritePartitions (split, MDS: one folder per stream and partition) -> MergeStreamIndexes (one per stream)

Texts cross one shuffle (by hash, which drops the copies and spreads the tokenizing evenly over the
workers) and token ids one (into their output partition); what the split rule needs from the whole corpus
(per source: the smallest hash and the count) comes from hashes alone.

Every step that leaves something out emits a `Tally` (and counts it in a Beam counter, for progress);
`CountTallies` adds them up per file and outcome for the run summary. Nothing here depends on how a runner
bundles or orders elements: documents are identified by content hash, and each output partition is written
from its documents sorted by hash.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from .assemble import merge_stream_index
from .documents import digest_fraction, parse_record, partition_of, tokenize_texts
from .manifest import KINDS, SOURCES, stream_name
from .readers import read_records
from .records import (DOCUMENT, DUPLICATE, TOO_SHORT, BadInputError, BadRecord, Document, Tally, TokenizedDocument,
                      bad_input_message)
from .samples import TOKEN_DTYPE, concatenated_samples, natural_samples

TALLIES = "tallies"
METRICS_NAMESPACE = "dataprep"
TOKENIZE_BATCH_DOCUMENTS = 64
TALLY_EXAMPLES = 5
MDS_COLUMNS = {"input_ids": "ndarray:uint16", "source": "str", "kind": "str"}

logger = logging.getLogger(__name__)


class PipelineSettings(NamedTuple):
    """What the transforms need to know about the run (all of it comes from the command line)."""

    staging: str                 # folder the MDS partitions are written under
    seq_len: int
    min_tokens: int
    validation_fraction: float
    partitions: int
    max_record_bytes: int
    strict: bool


def open_uncompressed(path: str):
    """A Beam filesystem file opened as raw bytes (the readers decompress themselves, to see truncation)."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _bad_record_tally(record: BadRecord, strict: bool) -> beam.pvalue.TaggedOutput:
    message = bad_input_message(record)
    if strict:
        raise BadInputError(message)
    logger.warning("bad input: %s", message)
    Metrics.counter(METRICS_NAMESPACE, f"bad_{record.reason}").inc()
    return beam.pvalue.TaggedOutput(TALLIES, Tally(record.source, record.file, record.reason, record.line,
                                                   record.detail))


class _ReadFileFn(beam.DoFn):
    def __init__(self, max_record_bytes: int, strict: bool):
        self._max_record_bytes = max_record_bytes
        self._strict = strict
        self._files_read = Metrics.counter(METRICS_NAMESPACE, "files_read")

    def process(self, source_and_path):
        source, path = source_and_path
        started, records, problems = time.monotonic(), 0, 0
        for item in read_records(source, path, open_uncompressed, self._max_record_bytes):
            if isinstance(item, BadRecord):
                problems += 1
                yield _bad_record_tally(item, self._strict)
            else:
                records += 1
                yield item
        self._files_read.inc()
        logger.info("read %s: %d records, %d unreadable, in %.1f s", path, records, problems,
                    time.monotonic() - started)


class ReadCorpusFiles(beam.PTransform):
    """(source, path) pairs -> `RawRecord`s, plus a `tallies` output for unreadable files and records."""

    def __init__(self, max_record_bytes: int, strict: bool):
        super().__init__()
        self._max_record_bytes = max_record_bytes
        self._strict = strict

    def expand(self, files):
        return (files
                | "SpreadFiles" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(_ReadFileFn(self._max_record_bytes, self._strict)).with_outputs(
                    TALLIES, main="records"))


class _ParseRecordFn(beam.DoFn):
    def __init__(self, strict: bool):
        self._strict = strict
        self._documents = {source: Metrics.counter(METRICS_NAMESPACE, f"documents_read_{source}")
                           for source in SOURCES}

    def process(self, record):
        parsed = parse_record(record)
        if isinstance(parsed, BadRecord):
            yield _bad_record_tally(parsed, self._strict)
            return
        self._documents[parsed.source].inc()
        yield beam.pvalue.TaggedOutput(TALLIES, Tally(parsed.source, parsed.file, DOCUMENT, parsed.line, ""))
        yield parsed


class ParseDocuments(beam.PTransform):
    """`RawRecord`s -> clean `Document`s, plus a `tallies` output (one per document read, one per bad record)."""

    def __init__(self, strict: bool):
        super().__init__()
        self._strict = strict

    def expand(self, records):
        return records | "Parse" >> beam.ParDo(_ParseRecordFn(self._strict)).with_outputs(TALLIES, main="documents")


def _copy_order(document: Document) -> tuple:
    return SOURCES.index(document.source), document.file, document.line


class _KeepFirstCopyFn(beam.DoFn):
    def __init__(self):
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, "duplicates_removed")

    def process(self, digest_and_copies):
        _, copies = digest_and_copies
        kept, *others = sorted(copies, key=_copy_order)
        yield kept
        for copy in others:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput(TALLIES, Tally(copy.source, copy.file, DUPLICATE, copy.line,
                                                          f"same text as {kept.file} line {kept.line}"))


class DropExactDuplicates(beam.PTransform):
    """One `Document` per content hash: the first copy in (source, file, line) order; the others are tallied.

    Grouping by hash also spreads the documents evenly over the workers that tokenize them, whatever the
    sizes of the files they came from.
    """

    def expand(self, documents):
        return (documents
                | "KeyByDigest" >> beam.Map(lambda document: (document.digest, document))
                | "GroupCopies" >> beam.GroupByKey()
                | "KeepFirstCopy" >> beam.ParDo(_KeepFirstCopyFn()).with_outputs(TALLIES, main="documents"))


class _TokenizeFn(beam.DoFn):
    """Tokenizes batches of documents with the bundled fast tokenizer, loaded once per worker."""

    def __init__(self, min_tokens: int):
        self._min_tokens = min_tokens
        self._tokenizer = None
        self._tokens = Metrics.counter(METRICS_NAMESPACE, "tokens")
        self._too_short = Metrics.counter(METRICS_NAMESPACE, "documents_too_short")

    def setup(self):
        from model import load_tokenizer

        # One worker per core already: the tokenizer's own thread pool would only oversubscribe the cores.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._tokenizer = load_tokenizer()

    def start_bundle(self):
        self._bundle_documents = self._bundle_tokens = 0

    def process(self, batch):
        encoded = tokenize_texts(self._tokenizer, [document.text for document in batch])
        for document, ids in zip(batch, encoded):
            if len(ids) < self._min_tokens:
                self._too_short.inc()
                yield beam.pvalue.TaggedOutput(TALLIES, Tally(document.source, document.file, TOO_SHORT,
                                                              document.line, f"{len(ids)} tokens"))
                continue
            self._tokens.inc(len(ids))
            self._bundle_documents += 1
            self._bundle_tokens += len(ids)
            yield TokenizedDocument(document.source, document.digest, np.asarray(ids, dtype=TOKEN_DTYPE))

    def finish_bundle(self):
        if self._bundle_documents:
            logger.info("tokenized %d documents, %d tokens", self._bundle_documents, self._bundle_tokens)


class TokenizeDocuments(beam.PTransform):
    """`Document`s -> `TokenizedDocument`s (no special tokens), dropping those under `min_tokens` tokens."""

    def __init__(self, min_tokens: int):
        super().__init__()
        self._min_tokens = min_tokens

    def expand(self, documents):
        return (documents
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=TOKENIZE_BATCH_DOCUMENTS)
                | "Tokenize" >> beam.ParDo(_TokenizeFn(self._min_tokens)).with_outputs(TALLIES, main="documents"))


def split_of(source: str, digest: str, fraction: float, first_per_source: dict, count_per_source: dict) -> str:
    """Validation or train, from the content hash.

    With a non-zero fraction, a source with no document under it still gives its smallest-hash document
    to validation (unless it has only one), so small corpora get a validation set from every source.
    """
    if digest_fraction(digest) < fraction:
        return "validation"
    if fraction > 0 and count_per_source[source] > 1 and first_per_source[source] == digest:
        return "validation"
    return "train"


class _WritePartitionFn(beam.DoFn):
    """One source's output partition: the natural and concatenated MDS samples of each split, from its
    documents in hash order."""

    def __init__(self, staging: str, seq_len: int, min_tokens: int, validation_fraction: float):
        self._staging = staging
        self._seq_len = seq_len
        self._min_tokens = min_tokens
        self._fraction = validation_fraction
        self._samples = Metrics.counter(METRICS_NAMESPACE, "samples_written")

    def process(self, key_and_documents, first_per_source, count_per_source):
        (source, partition), documents = key_and_documents
        splits: dict[str, list[np.ndarray]] = {}
        for digest, ids in sorted(documents, key=lambda digest_and_ids: digest_and_ids[0]):
            split = split_of(source, digest, self._fraction, first_per_source, count_per_source)
            splits.setdefault(split, []).append(ids)
        for split, ordered in sorted(splits.items()):
            yield from self._write_group(source, split, partition, ordered)

    def _write_group(self, source: str, split: str, partition: int, documents: list[np.ndarray]):
        document_tokens = sum(len(ids) for ids in documents)
        builders = {"natural": natural_samples(documents, self._seq_len, self._min_tokens),
                    "concat": concatenated_samples(documents, self._seq_len)}
        for kind in KINDS:
            name = stream_name(source, kind)
            folder = FileSystems.join(self._staging, split, name, f"part-{partition:05d}")
            samples, tokens = write_mds(builders[kind], source, kind, folder)
            self._samples.inc(samples)
            logger.info("wrote %s/%s partition %d: %d documents, %d samples, %d tokens",
                        split, name, partition, len(documents), samples, tokens)
            yield {"split": split, "stream": name, "partition": partition, "documents": len(documents),
                   "document_tokens": document_tokens, "samples": samples, "tokens": tokens}


def write_mds(samples: Iterable[np.ndarray], source: str, kind: str, folder: str) -> tuple[int, int]:
    """Writes `samples` as one MDS dataset (zstd) into `folder` (if there is any); returns samples and tokens."""
    from streaming import MDSWriter

    encode = _SampleEncoder(source, kind)
    count = tokens = 0
    with tempfile.TemporaryDirectory(prefix="mds-") as local:
        with MDSWriter(out=local, columns=MDS_COLUMNS, compression="zstd") as writer:
            for sample in samples:
                writer.write(encode(sample))
                count += 1
                tokens += len(sample)
        if count:
            _publish(local, folder)
    return count, tokens


class _SampleEncoder:
    """A sample's MDS columns as bytes, made by streaming's own encoders but not once per sample.

    `source` and `kind` are the same for a whole stream, and an ndarray's encoding is a header (dtype,
    shape) followed by the raw values, so the header is encoded once per sample length. MDSWriter takes
    bytes as already encoded; the shards are the same bytes as from arrays and strings
    (tests/test_dataprep_parts.py).
    """

    def __init__(self, source: str, kind: str):
        from streaming.base.format.mds.encodings import mds_encode

        self._mds_encode = mds_encode
        self._constant = {"source": mds_encode(MDS_COLUMNS["source"], source),
                          "kind": mds_encode(MDS_COLUMNS["kind"], kind)}
        self._headers: dict[int, bytes] = {}

    def __call__(self, sample: np.ndarray) -> dict[str, bytes]:
        header = self._headers.get(len(sample))
        if header is None:
            encoded = self._mds_encode(MDS_COLUMNS["input_ids"], sample)
            header = self._headers[len(sample)] = encoded[: len(encoded) - sample.nbytes]
        return {"input_ids": header + sample.tobytes(), **self._constant}


def _publish(local: str, folder: str) -> None:
    # Through Beam's filesystems, so the staging folder can be local or on object storage alike.
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as source, FileSystems.create(
                FileSystems.join(folder, name), compression_type=CompressionTypes.UNCOMPRESSED) as target:
            shutil.copyfileobj(source, target)


class WritePartitions(beam.PTransform):
    """`TokenizedDocument`s -> MDS partitions under `staging/<split>/<stream>/part-NNNNN/`, and a stats dict for each.

    Token ids cross one shuffle, into their (source, partition) group, the partition chosen from the
    content hash. The split is chosen there too, from the hash and two numbers per source (its smallest
    hash and its document count) that a side path computes from hashes alone.
    """

    def __init__(self, settings: PipelineSettings):
        super().__init__()
        self._settings = settings

    def expand(self, documents):
        settings = self._settings
        by_source = documents | "KeyBySource" >> beam.Map(lambda document: (document.source, document.digest))
        smallest = by_source | "SmallestHash" >> beam.CombinePerKey(min)  # hex digests sort as their numbers
        counts = by_source | "CountPerSource" >> beam.combiners.Count.PerKey()
        return (documents
                | "KeyByPartition" >> beam.Map(lambda document: (
                    (document.source, partition_of(document.digest, settings.partitions)),
                    (document.digest, document.ids)))
                | "GroupPartitions" >> beam.GroupByKey()
                | "WriteMds" >> beam.ParDo(
                    _WritePartitionFn(settings.staging, settings.seq_len, settings.min_tokens,
                                      settings.validation_fraction),
                    beam.pvalue.AsDict(smallest), beam.pvalue.AsDict(counts)))


class MergeStreamIndexes(beam.PTransform):
    """Partition stats -> one merged MDS `index.json` per stream with samples, written where the workers are.

    In the pipeline rather than in the launching process: the workers have streaming loaded already.
    """

    def __init__(self, staging: str):
        super().__init__()
        self._staging = staging

    def expand(self, stats):
        staging = self._staging
        return (stats
                | "WithSamples" >> beam.Filter(lambda row: row["samples"] > 0)
                | "KeyByStream" >> beam.Map(lambda row: ((row["split"], row["stream"]), row["partition"]))
                | "GroupStreams" >> beam.GroupByKey()
                | "Merge" >> beam.MapTuple(lambda stream, partitions: merge_stream_index(staging, *stream,
                                                                                         list(partitions))))


class _TallyFn(beam.CombineFn):
    """Count, and the first few (line, detail) examples by line number."""

    def create_accumulator(self):
        return 0, []

    def add_input(self, accumulator, line_and_detail):
        count, examples = accumulator
        return count + 1, sorted([*examples, line_and_detail])[:TALLY_EXAMPLES]

    def merge_accumulators(self, accumulators):
        total, merged = 0, []
        for count, examples in accumulators:
            total += count
            merged = sorted([*merged, *examples])[:TALLY_EXAMPLES]
        return total, merged

    def extract_output(self, accumulator):
        return accumulator


class CountTallies(beam.PTransform):
    """`Tally` events -> one dict per (source, file, outcome): count and the first examples."""

    def expand(self, tallies):
        return (tallies
                | "KeyByFileAndOutcome" >> beam.Map(lambda t: ((t.source, t.file, t.outcome), (t.line, t.detail)))
                | "Count" >> beam.CombinePerKey(_TallyFn())
                | "AsDict" >> beam.MapTuple(lambda key, value: {
                    "source": key[0], "file": key[1], "outcome": key[2], "count": value[0],
                    "examples": [{"line": line, "detail": detail} for line, detail in value[1]]}))


def build_mixture_pipeline(pipeline: beam.Pipeline, inputs: list[tuple[str, str]], settings: PipelineSettings,
                           work_folder: str) -> None:
    """Adds the whole mixture pipeline to `pipeline`: `inputs` are (source, path) pairs of matched files.

    MDS partitions go under `settings.staging`; per-partition stats and the tallies go to JSON-lines files
    in `work_folder` (`partitions*.jsonl`, `tallies*.jsonl`) for the driver to assemble the manifest.
    """
    import json

    files = pipeline | "ListFiles" >> beam.Create(inputs)
    read = files | "ReadCorpusFiles" >> ReadCorpusFiles(settings.max_record_bytes, settings.strict)
    parsed = read.records | "ParseDocuments" >> ParseDocuments(settings.strict)
    unique = parsed.documents | "DropExactDuplicates" >> DropExactDuplicates()
    tokenized = unique.documents | "TokenizeDocuments" >> TokenizeDocuments(settings.min_tokens)
    stats = tokenized.documents | "WritePartitions" >> WritePartitions(settings)
    stats | "MergeStreamIndexes" >> MergeStreamIndexes(settings.staging)

    tallies = ((read[TALLIES], parsed[TALLIES], unique[TALLIES], tokenized[TALLIES])
               | "AllTallies" >> beam.Flatten()
               | "CountTallies" >> CountTallies())
    for name, collection in (("partitions", stats), ("tallies", tallies)):
        (collection
         | f"Format{name.capitalize()}" >> beam.Map(lambda row: json.dumps(row, sort_keys=True))
         | f"Save{name.capitalize()}" >> beam.io.WriteToText(FileSystems.join(work_folder, name),
                                                             file_name_suffix=".jsonl"))

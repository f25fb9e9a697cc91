"""How a dense model meets a document longer than it can read (the paper's two protocols, §5.2).

  * `truncate`: the document is cut at the model's maximum length (what M2-BERT always does);
  * `chunk-mean`: the document is split into chunks of the maximum length, each chunk embedded, and
    the chunk embeddings averaged into one document embedding;
  * `chunk-max`: the same chunks, kept as separate vectors; a document scores its best chunk.
Queries are always truncated. Optional prefixes (instruction models) go before every query and
every document or chunk, and count against the length.

A chunk is a span of the document's token ids (not a span of its text, which could tokenize to more
tokens once cut out and lose its end to truncation): the encoder is given those ids as they are.
"""

from __future__ import annotations

import dataclasses

TRUNCATE, CHUNK_MEAN, CHUNK_MAX = "truncate", "chunk-mean", "chunk-max"
PROTOCOLS = (TRUNCATE, CHUNK_MEAN, CHUNK_MAX)

# What an encoder is given: a text (tokenized and truncated by the encoder) or the token ids of a chunk
# (special tokens not included; the encoder adds them).
EncoderInput = str | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A protocol with its token length and prefixes."""

    kind: str
    max_length: int
    query_prefix: str = ""
    document_prefix: str = ""

    def __post_init__(self):
        if self.kind not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.kind!r}; expected one of {PROTOCOLS}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")

    @property
    def chunked(self) -> bool:
        return self.kind != TRUNCATE

    def query_input(self, query: str) -> str:
        return self.query_prefix + query

    def document_inputs(self, passage: str, tokenizer) -> list[EncoderInput]:
        """What the encoder is given for one document: its text, or the token ids of its chunks
        (each with the document prefix's ids in front)."""
        if not self.chunked:
            return [self.document_prefix + passage]
        prefix = tuple(tokenizer(self.document_prefix, add_special_tokens=False)["input_ids"])
        budget = self.max_length - tokenizer.num_special_tokens_to_add(pair=False) - len(prefix)
        if budget < 1:
            raise ValueError(f"document prefix {self.document_prefix!r} leaves no room in {self.max_length} tokens")
        return [prefix + chunk for chunk in split_into_chunks(passage, tokenizer, budget)]


def split_into_chunks(text: str, tokenizer, tokens_per_chunk: int) -> list[tuple[int, ...]]:
    """The token ids of `text` (no special tokens) cut into consecutive spans of `tokens_per_chunk`
    (the last may be shorter). Empty text is one empty span."""
    ids = tuple(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if not ids:
        return [()]
    return [ids[start:start + tokens_per_chunk] for start in range(0, len(ids), tokens_per_chunk)]

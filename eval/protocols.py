"""How a dense model meets a document longer than it can read (the paper's two protocols, §5.2).

  * `truncate`: the document is cut at the model's maximum length (what M2-BERT always does);
  * `chunk-mean`: the document is split into chunks of the maximum length, each chunk embedded, and
    the chunk embeddings averaged into one document embedding;
  * `chunk-max`: the same chunks, kept as separate vectors; a document scores its best chunk.
Queries are always truncated. Optional prefixes (instruction models) go before every query and
every document or chunk, and count against the length.
"""

from __future__ import annotations

import dataclasses

TRUNCATE, CHUNK_MEAN, CHUNK_MAX = "truncate", "chunk-mean", "chunk-max"
PROTOCOLS = (TRUNCATE, CHUNK_MEAN, CHUNK_MAX)


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

    def document_inputs(self, passage: str, tokenizer) -> list[str]:
        """What the encoder is given for one document: itself, or its chunks."""
        if not self.chunked:
            return [self.document_prefix + passage]
        budget = (self.max_length - tokenizer.num_special_tokens_to_add(pair=False)
                  - len(tokenizer(self.document_prefix, add_special_tokens=False)["input_ids"]))
        if budget < 1:
            raise ValueError(f"document prefix {self.document_prefix!r} leaves no room in {self.max_length} tokens")
        return [self.document_prefix + chunk for chunk in split_into_chunks(passage, tokenizer, budget)]


def split_into_chunks(text: str, tokenizer, tokens_per_chunk: int) -> list[str]:
    """`text` cut into consecutive pieces of `tokens_per_chunk` tokens (the last may be shorter).

    Pieces are spans of the original text (from the tokenizer's character offsets), so casing and
    spacing survive; the whitespace between two pieces is dropped. Empty text is one empty piece."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)["offset_mapping"]
    if not offsets:
        return [text]
    return [text[offsets[start][0]:offsets[min(start + tokens_per_chunk, len(offsets)) - 1][1]]
            for start in range(0, len(offsets), tokens_per_chunk)]

"""Splitting the embedding work of a big corpus over processes, GPUs or separate jobs.

Shard `i` of `n` embeds the queries and documents whose text hashes to `i` modulo `n`, into its own
cache file; a later run without a shard (or rank 0 of a `torchrun` job, after a barrier) finds every
embedding in the shared cache folder and only scores. No shard needs to know about the others.
"""

from __future__ import annotations

import dataclasses
import os

from .cache import text_hash


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based)."""

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: expected 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N`, e.g. `0/4`."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError as err:
            raise ValueError(f"shard {text!r}: expected INDEX/COUNT, e.g. 0/4") from err
        return cls(index, count)

    @classmethod
    def from_torchrun(cls) -> Shard | None:
        """This process's shard when launched by `torchrun` with more than one process, else None."""
        count = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), count) if count > 1 else None

    def owns(self, text: str) -> bool:
        return int(text_hash(text)[:16], 16) % self.count == self.index

    @property
    def cache_writer(self) -> str:
        """Name of this shard's own cache file."""
        return f"shard-{self.index:05d}-of-{self.count:05d}"

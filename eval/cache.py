"""On-disk cache of embeddings, so a rerun or an added model only embeds what is new.

An embedding is stored under its *space* and the SHA-256 of the exact input the encoder was given:
a text (prefix included), or a chunk's token ids (`input_hash`). A space names everything else the
vector depends on: the model's fingerprint (a hash of its files), the code that computes it (a hash
of this package's embedding code, `code_fingerprint`, and the versions of the libraries it runs on),
the truncation length and the device kind (CUDA runs in bf16 autocast, CPU in fp32). Chunk-mean and
chunk-max share chunk vectors; truncation shares nothing.

Storage is a folder of SQLite files: each writer (a process, or one shard of a sharded run) commits
to its own file after every batch, so an interrupted run keeps everything finished, and concurrent
shards never contend for a lock. Reads consult every file of the folder: merging the outputs of
sharded jobs is just pointing them at the same folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import numpy as np

DEFAULT_WRITER = "embeddings"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spaces (space TEXT PRIMARY KEY, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    space TEXT NOT NULL, text_hash TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (space, text_hash));
"""
# SQLite's default limit on host parameters is 999 on old builds.
_LOOKUP_BATCH = 900


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_hash(item: str | tuple[int, ...]) -> str:
    """The cache key of an encoder input: a text, or a chunk's token ids (a NUL-led tag that no
    document text carries keeps the two kinds apart)."""
    if isinstance(item, str):
        return text_hash(item)
    return text_hash("\0token-ids\0" + " ".join(map(str, item)))


def fingerprint_files(directory: Path, suffixes: tuple[str, ...] | None = None) -> str:
    """SHA-256 over the relative names and contents of every file below `directory` (only those whose
    name ends in one of `suffixes`, when given). Git metadata and Python's bytecode caches are skipped."""
    digest = hashlib.sha256()
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not {".git", "__pycache__"} & set(p.parts)
                   and (suffixes is None or p.name.endswith(suffixes)))
    for path in files:
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# Source files of the code that turns an input into a vector: Python, the CUDA/C++ kernels, the bundled
# tokenizer's files.
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".json", ".txt")
PACKAGE = "m2-loco"


def embedding_code_roots() -> list[Path]:
    """What computes an embedding here: the `model` package (encoders, M2-BERT, its tokenizer), the CUDA
    kernels of `csrc/` where the checkout has them, and eval's encoder-input code (`dense`)."""
    import model
    from model.kernels import CSRC

    here = Path(__file__).resolve().parent
    roots = [Path(model.__file__).resolve().parent, here / "dense.py"]
    return roots + ([CSRC] if CSRC.is_dir() else [])


def fingerprint_code(roots: Iterable[Path]) -> str:
    """SHA-256 over the source files of `roots` (folders or single files): changes when any line of them does."""
    digest = hashlib.sha256()
    for root in roots:
        root = Path(root)
        if root.is_dir():
            digest.update(f"{root.name}/\0{fingerprint_files(root, SOURCE_SUFFIXES)}\0".encode())
        else:
            digest.update(root.name.encode() + b"\0" + root.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> dict[str, str]:
    """This package's version and the fingerprint of its embedding code (`embedding_code_roots`), so a
    changed implementation never reads vectors an earlier one computed (an editable install keeps its
    version number while its code changes)."""
    return {"version": _version(PACKAGE), "source": fingerprint_code(embedding_code_roots())}


def library_versions(packages: Iterable[str]) -> dict[str, str]:
    """The installed version of each package (`none` where it is not installed)."""
    return {package: _version(package) for package in packages}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def space_key(description: dict) -> str:
    """A short stable id for a description of everything (but the text) a vector depends on."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


class EmbeddingCache:
    """Embedding vectors by (space, text hash) in a folder of SQLite files; `None` folder: in memory."""

    def __init__(self, directory: str | Path | None, writer: str = DEFAULT_WRITER):
        self.directory = None if directory is None else Path(directory)
        if self.directory is None:
            self._writer = sqlite3.connect(":memory:")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = sqlite3.connect(self.directory / f"{writer}.sqlite", timeout=60)
        self._writer.executescript(_SCHEMA)
        self._writer.commit()

    def register(self, space: str, description: dict) -> None:
        """Record what a space means (for people reading the cache)."""
        with self._writer:
            self._writer.execute("INSERT OR IGNORE INTO spaces VALUES (?, ?)",
                                 (space, json.dumps(description, sort_keys=True)))

    def lookup(self, space: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached vectors among `hashes`, from every file of the folder."""
        wanted = list(dict.fromkeys(hashes))
        found: dict[str, np.ndarray] = {}
        for connection in self._readers():
            missing = [h for h in wanted if h not in found]
            for start in range(0, len(missing), _LOOKUP_BATCH):
                batch = missing[start:start + _LOOKUP_BATCH]
                rows = connection.execute(
                    f"SELECT text_hash, vector FROM embeddings WHERE space = ? AND text_hash IN "
                    f"({','.join('?' * len(batch))})", (space, *batch))
                for key, blob in rows:
                    found[key] = np.frombuffer(blob, dtype=np.float32)
            if connection is not self._writer:
                connection.close()
        return found

    def store(self, space: str, hashes: list[str], vectors: np.ndarray) -> None:
        """Save vectors (one row per hash) in one transaction."""
        vectors = np.asarray(vectors, dtype=np.float32)
        with self._writer:
            self._writer.executemany(
                "INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)",
                [(space, key, vectors.shape[1], vector.tobytes()) for key, vector in zip(hashes, vectors)])

    def _readers(self):
        yield self._writer
        if self.directory is None:
            return
        own = Path(self._writer.execute("PRAGMA database_list").fetchone()[2]).resolve()
        for path in sorted(self.directory.glob("*.sqlite")):
            if path.resolve() != own:
                yield sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)

    def close(self) -> None:
        self._writer.close()

"""Needle-in-a-haystack and passkey retrieval tasks: how retrieval degrades with document length
and with where the relevant passage sits.

Every document is distractor text (the haystack) of a set length with one short passage (the needle)
hidden at a set depth; its query is a question only the needle answers. Two kinds:
  * `needle`: real meeting transcripts as the haystack (the bundled QMSum ones, or `--haystack`),
    secret codes of imaginary animals as needles (or `--needles`);
  * `passkey`: the same few filler sentences repeated as the haystack, "<name>'s pass key is
    <number>" as the needle: the documents differ only in the needle (LongEmbed's passkey test).
Lengths count bert-base-uncased tokens, [CLS] and [SEP] included, so a document of length L fills a
model of length L. Across lengths (and depths), document i always has the same needle and the same
stretch of haystack, so scores differ only by length and depth.

Two layouts (`--format`):
  * `loco`: one LoCo-format task per (length, depth), `needle-L{length}-D{depth %}`; scored by
    nDCG@10, with a length x depth heat map;
  * `longembed`: LongEmbed's layout (`<output>/<kind>/{corpus,queries,qrels}.jsonl` with
    `context_length`), one task per length whose documents cycle through the depths; scored by
    nDCG@1 per length as LongEmbed does, with a score-against-length plot. Lengths default to
    LongEmbed's, 256 to 32768.

    python -m eval.needle --output-dir outputs/needle
    python -m eval.needle --format longembed --kind needle passkey --documents 20 --output-dir outputs/longembed-local
    python -m eval.loco --data outputs/longembed-local --model all-MiniLM-L6-v2 --model all-MiniLM-L6-v2:chunk-max
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import LocoDataError, load_tasks, read_json_lines
from .longembed import write_longembed_folder

KINDS = ("needle", "passkey")
FORMATS = ("loco", "longembed")
DEFAULT_LENGTHS = {"loco": (256, 512, 1024, 2048), "longembed": tuple(256 * 2 ** i for i in range(8))}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASK_PATTERN = re.compile(r"^(\w+)-L(\d+)-D(\d+)$")
SPLIT = "test"
# Template needles: "The secret code of the <adjective> <noun> is <number>." Rare words, so that the
# haystack does not answer the question by chance.
ADJECTIVES = ("amber", "azure", "bronze", "cobalt", "copper", "crimson", "emerald", "gilded", "golden", "indigo",
              "ivory", "jade", "lilac", "magenta", "maroon", "ochre", "opal", "pearl", "russet", "saffron",
              "scarlet", "sepia", "silver", "teal", "topaz", "turquoise", "umber", "velvet", "vermilion", "violet")
NOUNS = ("albatross", "armadillo", "badger", "caribou", "chameleon", "cormorant", "flamingo", "gazelle", "hedgehog",
         "heron", "ibex", "jackal", "kestrel", "lemur", "lynx", "manatee", "marmot", "narwhal", "ocelot", "okapi",
         "pangolin", "pelican", "platypus", "quokka", "salamander", "tapir", "toucan", "walrus", "wombat", "yak")


# Passkey needles: "<first> <last>'s pass key is <number>." Made-up names, one per document.
FIRST_NAMES = ("Ada", "Bruno", "Carmen", "Dmitri", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
               "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Vera", "Wendell",
               "Ximena", "Yusuf", "Zofia", "Anselm", "Beatrix", "Cyrus", "Delphine")
LAST_NAMES = ("Abernathy", "Bellweather", "Castellanos", "Drummond", "Eckhart", "Fairbanks", "Gallagher", "Holloway",
              "Iversen", "Jablonski", "Kowalczyk", "Lindqvist", "Marchetti", "Nakamura", "Oyelaran", "Pemberton",
              "Quiroga", "Rasmussen", "Szabo", "Thornbury", "Uematsu", "Valderrama", "Whitcombe", "Xiong", "Yardley",
              "Zielinski", "Achterberg", "Brannigan", "Cavendish", "Delacroix")
# The passkey haystack: filler that says nothing, repeated.
PASSKEY_FILLER = ("The wind is calm. The lake is still. The road runs on past the hills. "
                  "Day follows night, and night follows day. ")


@dataclasses.dataclass(frozen=True)
class Needle:
    """A short passage to hide and the question it answers."""

    text: str
    query: str


def template_needles(count: int, seed: int = 0) -> list[Needle]:
    """`count` distinct needles: secret codes of imaginary coloured animals."""
    keys = [(adjective, noun) for adjective in ADJECTIVES for noun in NOUNS]
    return [Needle(f"The secret code of the {adjective} {noun} is {code}.",
                   f"What is the secret code of the {adjective} {noun}?")
            for (adjective, noun), code in _coded(keys, count, seed, "template needles (pass --needles)")]


def passkey_needles(count: int, seed: int = 0) -> list[Needle]:
    """`count` distinct passkeys, each of a different made-up person."""
    keys = [(first, last) for first in FIRST_NAMES for last in LAST_NAMES]
    return [Needle(f"{first} {last}'s pass key is {code}. Remember it. {code} is the pass key for {first} {last}.",
                   f"What is the pass key for {first} {last}?")
            for (first, last), code in _coded(keys, count, seed, "passkey needles")]


def _coded(keys: list[tuple[str, str]], count: int, seed: int, what: str) -> list[tuple[tuple[str, str], int]]:
    """`count` of `keys`, each with a distinct 5-digit code, drawn with `seed`."""
    if count > len(keys):
        raise ValueError(f"at most {len(keys)} {what}; asked for {count}")
    rng = random.Random(seed)
    chosen = rng.sample(keys, count)
    return list(zip(chosen, rng.sample(range(10000, 100000), count)))


def passkey_haystack(tokens: int, tokenizer) -> list[str]:
    """The passkey filler repeated to at least `tokens` tokens."""
    per_copy = len(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    return [(PASSKEY_FILLER * (tokens // per_copy + 2)).strip()]


def read_needles(path: Path) -> list[Needle]:
    """Needles from JSON lines `{"needle": ..., "query": ...}` (e.g. Natural Questions answers)."""
    needles = []
    for number, record in read_json_lines(path):
        if not all(isinstance(record.get(k), str) and record[k].strip() for k in ("needle", "query")):
            raise LocoDataError(f"{path}, line {number}: expected an object with non-empty strings "
                                f"`needle` and `query`")
        needles.append(Needle(record["needle"].strip(), record["query"].strip()))
    return needles


def bundled_haystack() -> list[str]:
    """Distractor texts: the bundled task's documents, every split."""
    return [text for task in load_tasks(split=None) for text in task.documents.values()]


def task_name(length: int, depth: float, kind: str = "needle") -> str:
    return f"{kind}-L{length}-D{round(100 * depth)}"


def parse_task_name(name: str) -> tuple[str, int, float] | None:
    """(kind, length, depth) of a LoCo-format needle or passkey task name, None for any other task."""
    match = TASK_PATTERN.match(name)
    return None if match is None else (match[1], int(match[2]), int(match[3]) / 100)


class Haystack:
    """Documents of set lengths cut from distractor text, with a needle hidden at a set depth."""

    def __init__(self, haystack: Sequence[str], needles: Sequence[Needle], lengths: Sequence[int],
                 depths: Sequence[float], tokenizer):
        if not needles:
            raise ValueError("no needles")
        if not lengths or not depths:
            raise ValueError("no lengths or no depths")
        if any(not 0 <= depth <= 1 for depth in depths):
            raise ValueError(f"depths must lie in [0, 1], got {list(depths)}")
        self.needles, self.longest = list(needles), max(lengths)
        self.special = tokenizer.num_special_tokens_to_add(pair=False)
        self.needle_tokens = [len(tokenizer(n.text, add_special_tokens=False)["input_ids"]) for n in needles]
        if min(lengths) - self.special - max(self.needle_tokens) < 1:
            raise ValueError(f"length {min(lengths)} leaves no room for haystack around the longest needle")
        self.text, self.offsets = _haystack_tokens(haystack, tokenizer, len(needles) * self.longest)
        if len(self.offsets) < self.longest:
            raise ValueError(f"the haystack holds {len(self.offsets)} tokens, fewer than the longest document "
                             f"({self.longest})")

    def document(self, i: int, length: int, depth: float) -> str:
        """Document i: `length` tokens of its stretch of haystack, needle i at `depth`."""
        budget = length - self.special - self.needle_tokens[i]
        # Document i reads its own stretch of haystack (they wrap when the haystack is short).
        first = (i * self.longest) % (len(self.offsets) - budget + 1)
        return _insert(self.text, self.offsets[first:first + budget], self.needles[i].text, depth)


def generate(haystack: Sequence[str], needles: Sequence[Needle], lengths: Sequence[int], depths: Sequence[float],
             tokenizer, kind: str = "needle") -> tuple[list[dict], list[dict]]:
    """Document and query records (LoCo schema, split "test") of every (length, depth) task."""
    stack = Haystack(haystack, needles, lengths, depths, tokenizer)
    documents, queries = [], []
    for length in lengths:
        for depth in depths:
            name = task_name(length, depth, kind)
            for i, needle in enumerate(needles):
                pid = f"{name}-doc{i:04d}"
                documents.append({"pid": pid, "passage": stack.document(i, length, depth), "dataset": name,
                                  "split": SPLIT})
                queries.append({"qid": f"{name}-q{i:04d}", "query": needle.query, "answer_pids": [pid],
                                "dataset": name, "split": SPLIT})
    return documents, queries


def generate_longembed(haystack: Sequence[str], needles: Sequence[Needle], lengths: Sequence[int],
                       depths: Sequence[float], tokenizer) -> tuple[list[dict], list[dict], list[dict]]:
    """Corpus, queries and qrels records in LongEmbed's layout: per length, document i with needle i at
    depth `depths[i % len(depths)]`, `context_length` naming the length."""
    stack = Haystack(haystack, needles, lengths, depths, tokenizer)
    corpus, queries, qrels = [], [], []
    for length in lengths:
        for i, needle in enumerate(needles):
            doc_id, qid = f"doc-{length}-{i:04d}", f"q-{length}-{i:04d}"
            corpus.append({"doc_id": doc_id, "text": stack.document(i, length, depths[i % len(depths)]),
                           "context_length": length})
            queries.append({"qid": qid, "text": needle.query, "context_length": length})
            qrels.append({"qid": qid, "doc_id": doc_id, "context_length": length})
    return corpus, queries, qrels


def _haystack_tokens(haystack: Sequence[str], tokenizer, wanted: int) -> tuple[str, list[tuple[int, int]]]:
    """The haystack texts joined (only as many as give `wanted` tokens) and their token offsets."""
    pieces, offsets, position = [], [], 0
    for piece in haystack:
        piece_offsets = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True,
                                  verbose=False)["offset_mapping"]
        offsets.extend((position + start, position + end) for start, end in piece_offsets)
        pieces.append(piece)
        position += len(piece) + 1  # the "\n" that joins the pieces
        if len(offsets) >= wanted:
            break
    if not offsets:
        raise ValueError("the haystack is empty")
    return "\n".join(pieces), offsets


def _insert(text: str, window: list[tuple[int, int]], needle: str, depth: float) -> str:
    """The haystack span covered by `window` (token offsets) with `needle` at `depth`, at a word start."""
    at = round(depth * len(window))
    # Move forward to the start of a word: a token glued to the one before continues a word.
    while 0 < at < len(window) and window[at][0] == window[at - 1][1]:
        at += 1
    start, end = window[0][0], window[-1][1]
    cut = end if at == len(window) else window[at][0]
    return " ".join(part for part in (text[start:cut].strip(), needle, text[cut:end].strip()) if part)


def write_folder(folder: Path, documents: list[dict], queries: list[dict], provenance: str) -> None:
    """Write a LoCo-format folder: documents.jsonl.gz, queries.jsonl.gz and a README."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("documents", documents), ("queries", queries)):
        with gzip.open(folder / f"{name}.jsonl.gz", "wt", encoding="utf-8") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)
    (folder / "README.md").write_text(f"# Needle-in-a-haystack tasks (LoCo format)\n\n{provenance}\n")


def needle_heatmap(results, path: Path, metric: str) -> bool:
    """Plot `metric` by length (x) and depth (y) of LoCo-format needle and passkey tasks, one panel per
    model and kind; False (and nothing written) if no such task ran."""
    from matplotlib.figure import Figure

    cells = [(r.model, *parse_task_name(r.task), r.metrics[metric]) for r in results if parse_task_name(r.task)]
    if not cells:
        return False
    panels_of = list(dict.fromkeys((model, kind) for model, kind, *_ in cells))
    lengths = sorted({cell[2] for cell in cells})
    depths = sorted({cell[3] for cell in cells})
    figure = Figure(figsize=(1.5 + 0.8 * len(lengths) * len(panels_of) + 1.0, 1.2 + 0.45 * len(depths)),
                    layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, len(panels_of), squeeze=False)[0])
    for panel, (model, kind) in zip(panels, panels_of):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for owner, owner_kind, length, depth, value in cells:
            if (owner, owner_kind) == (model, kind):
                grid[depths.index(depth), lengths.index(length)] = 100 * value
        image = panel.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (row, column), value in np.ndenumerate(grid):
            panel.text(column, row, "" if np.isnan(value) else f"{value:.0f}", ha="center", va="center",
                       color="white" if value < 60 else "black", fontsize=8)
        panel.set_xticks(range(len(lengths)), lengths)
        panel.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        panel.set_xlabel("document length (tokens)")
        panel.set_title(f"{model}\n{kind}", fontsize=9)
    panels[0].set_ylabel("needle depth")
    figure.colorbar(image, ax=list(panels), label=f"{metric} (x100)")
    figure.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.needle", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--output-dir", type=Path, required=True, help="folder to write the tasks into")
    parser.add_argument("--kind", nargs="+", choices=KINDS, default=["needle"],
                        help="needle (transcripts and secret codes) and/or passkey (filler and pass keys)")
    parser.add_argument("--format", choices=FORMATS, default="loco",
                        help="loco: a task per length and depth; longembed: LongEmbed's layout, a task per length")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="document lengths in bert-base-uncased tokens (default: "
                        + "; ".join(f"{fmt}: {' '.join(map(str, DEFAULT_LENGTHS[fmt]))}" for fmt in FORMATS) + ")")
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS),
                        help="needle positions as fractions of the document (default: %(default)s)")
    parser.add_argument("--documents", type=int, default=50, help="documents (and queries) per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--needles", type=Path,
                        help="JSON lines {needle, query} to hide instead of the template secret codes (needle kind)")
    parser.add_argument("--haystack", type=Path, nargs="+",
                        help="UTF-8 text files of distractor text (needle kind; default: the bundled QMSum transcripts)")
    args = parser.parse_args(argv)
    lengths = args.lengths or list(DEFAULT_LENGTHS[args.format])

    from model import load_tokenizer

    tokenizer = load_tokenizer()
    documents, queries, written = [], [], []
    for kind in dict.fromkeys(args.kind):
        if kind == "passkey":
            needles = passkey_needles(args.documents, args.seed)
            haystack, source = passkey_haystack(max(lengths), tokenizer), "repeated filler sentences"
        else:
            needles = (read_needles(args.needles)[:args.documents] if args.needles
                       else template_needles(args.documents, args.seed))
            haystack = [p.read_text(encoding="utf-8") for p in args.haystack] if args.haystack else bundled_haystack()
            source = (", ".join(map(str, args.haystack)) if args.haystack
                      else "the bundled QMSum meeting transcripts (eval/data)")
        provenance = (f"Generated by `python -m eval.needle` (seed {args.seed}): {kind}, {len(needles)} documents per "
                      f"length, lengths {lengths}, depths {args.depths}. Haystack: {source}.")
        if args.format == "longembed":
            corpus, kind_queries, qrels = generate_longembed(haystack, needles, lengths, args.depths, tokenizer)
            write_longembed_folder(args.output_dir / kind, corpus, kind_queries, qrels)
            (args.output_dir / kind / "README.md").write_text(f"# {kind} (LongEmbed layout)\n\n{provenance}\n")
            written.append(f"{kind}: {len(corpus)} documents in {len(lengths)} lengths")
        else:
            kind_documents, kind_queries = generate(haystack, needles, lengths, args.depths, tokenizer, kind)
            documents += kind_documents
            queries += kind_queries
            written.append(f"{kind}: {len(kind_documents)} documents in {len(lengths) * len(args.depths)} tasks")
    if args.format == "loco":
        write_folder(args.output_dir, documents, queries,
                     f"Generated by `python -m eval.needle` (seed {args.seed}): kinds {args.kind}, {args.documents} "
                     f"documents per task, lengths {lengths}, depths {args.depths}.")
    print(f"wrote to {args.output_dir} ({args.format} layout): " + "; ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

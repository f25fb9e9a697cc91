"""Needle-in-a-haystack retrieval tasks, in LoCo format: how retrieval degrades with document length
and with where the relevant passage sits.

Every document is distractor text (the haystack: real meeting transcripts by default) of a set
length with one short passage (the needle) hidden at a set depth; its query is a question only the
needle answers. One task per (length, depth), named `needle-L{length}-D{depth %}`. Across tasks,
document i always has the same needle and the same stretch of haystack, so cells differ only in
length and depth. Lengths count bert-base-uncased tokens, [CLS] and [SEP] included, so a document
of length L fills a model of length L.

    python -m eval.needle --output-dir outputs/needle
    python -m eval.loco --data outputs/needle --model bm25 --model path/to/m2
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

from .data import LocoDataError, load_tasks

DEFAULT_LENGTHS = (256, 512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASK_PATTERN = re.compile(r"^needle-L(\d+)-D(\d+)$")
SPLIT = "test"
# Template needles: "The secret code of the <adjective> <noun> is <number>." Rare words, so that the
# haystack does not answer the question by chance.
ADJECTIVES = ("amber", "azure", "bronze", "cobalt", "copper", "crimson", "emerald", "gilded", "golden", "indigo",
              "ivory", "jade", "lilac", "magenta", "maroon", "ochre", "opal", "pearl", "russet", "saffron",
              "scarlet", "sepia", "silver", "teal", "topaz", "turquoise", "umber", "velvet", "vermilion", "violet")
NOUNS = ("albatross", "armadillo", "badger", "caribou", "chameleon", "cormorant", "flamingo", "gazelle", "hedgehog",
         "heron", "ibex", "jackal", "kestrel", "lemur", "lynx", "manatee", "marmot", "narwhal", "ocelot", "okapi",
         "pangolin", "pelican", "platypus", "quokka", "salamander", "tapir", "toucan", "walrus", "wombat", "yak")


@dataclasses.dataclass(frozen=True)
class Needle:
    """A short passage to hide and the question it answers."""

    text: str
    query: str


def template_needles(count: int, seed: int = 0) -> list[Needle]:
    """`count` distinct needles: secret codes of imaginary coloured animals."""
    keys = [(adjective, noun) for adjective in ADJECTIVES for noun in NOUNS]
    if count > len(keys):
        raise ValueError(f"at most {len(keys)} template needles; asked for {count} (pass --needles)")
    rng = random.Random(seed)
    chosen = rng.sample(keys, count)
    codes = rng.sample(range(10000, 100000), count)
    return [Needle(f"The secret code of the {adjective} {noun} is {code}.",
                   f"What is the secret code of the {adjective} {noun}?")
            for (adjective, noun), code in zip(chosen, codes)]


def read_needles(path: Path) -> list[Needle]:
    """Needles from JSON lines `{"needle": ..., "query": ...}` (e.g. Natural Questions answers)."""
    needles = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LocoDataError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k].strip()
                                                       for k in ("needle", "query")):
                raise LocoDataError(f"{path}, line {number}: expected an object with non-empty strings "
                                    f"`needle` and `query`")
            needles.append(Needle(record["needle"].strip(), record["query"].strip()))
    return needles


def bundled_haystack() -> list[str]:
    """Distractor texts: the bundled task's documents, every split."""
    return [text for task in load_tasks(split=None) for text in task.documents.values()]


def task_name(length: int, depth: float) -> str:
    return f"needle-L{length}-D{round(100 * depth)}"


def parse_task_name(name: str) -> tuple[int, float] | None:
    """(length, depth) of a needle task name, None for any other task."""
    match = TASK_PATTERN.match(name)
    return None if match is None else (int(match[1]), int(match[2]) / 100)


def generate(haystack: Sequence[str], needles: Sequence[Needle], lengths: Sequence[int], depths: Sequence[float],
             tokenizer) -> tuple[list[dict], list[dict]]:
    """Document and query records (LoCo schema, split "test") of every (length, depth) task."""
    if not needles:
        raise ValueError("no needles")
    if any(not 0 <= depth <= 1 for depth in depths):
        raise ValueError(f"depths must lie in [0, 1], got {list(depths)}")
    special = tokenizer.num_special_tokens_to_add(pair=False)
    needle_tokens = [len(tokenizer(n.text, add_special_tokens=False)["input_ids"]) for n in needles]
    if min(lengths) - special - max(needle_tokens) < 1:
        raise ValueError(f"length {min(lengths)} leaves no room for haystack around the longest needle")
    text, offsets = _haystack_tokens(haystack, tokenizer, len(needles) * max(lengths))
    if len(offsets) < max(lengths):
        raise ValueError(f"the haystack holds {len(offsets)} tokens, fewer than the longest document ({max(lengths)})")
    documents, queries = [], []
    for length in lengths:
        for depth in depths:
            name = task_name(length, depth)
            for i, needle in enumerate(needles):
                budget = length - special - needle_tokens[i]
                # Document i reads its own stretch of haystack (they wrap when the haystack is short).
                first = (i * max(lengths)) % (len(offsets) - budget + 1)
                passage = _insert(text, offsets[first:first + budget], needle.text, depth)
                pid = f"{name}-doc{i:04d}"
                documents.append({"pid": pid, "passage": passage, "dataset": name, "split": SPLIT})
                queries.append({"qid": f"{name}-q{i:04d}", "query": needle.query, "answer_pids": [pid],
                                "dataset": name, "split": SPLIT})
    return documents, queries


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
    """Plot `metric` by length (x) and depth (y), one panel per model; False if no needle task ran."""
    from matplotlib.figure import Figure

    cells = [(r.model, *parse_task_name(r.task), r.metrics[metric]) for r in results if parse_task_name(r.task)]
    if not cells:
        return False
    models = list(dict.fromkeys(cell[0] for cell in cells))
    lengths = sorted({cell[1] for cell in cells})
    depths = sorted({cell[2] for cell in cells})
    figure = Figure(figsize=(1.5 + 0.8 * len(lengths) * len(models) + 1.0, 1.2 + 0.45 * len(depths)),
                    layout="constrained")
    panels = np.atleast_1d(figure.subplots(1, len(models), squeeze=False)[0])
    for panel, model in zip(panels, models):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for owner, length, depth, value in cells:
            if owner == model:
                grid[depths.index(depth), lengths.index(length)] = 100 * value
        image = panel.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (row, column), value in np.ndenumerate(grid):
            panel.text(column, row, "" if np.isnan(value) else f"{value:.0f}", ha="center", va="center",
                       color="white" if value < 60 else "black", fontsize=8)
        panel.set_xticks(range(len(lengths)), lengths)
        panel.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        panel.set_xlabel("document length (tokens)")
        panel.set_title(model, fontsize=9)
    panels[0].set_ylabel("needle depth")
    figure.colorbar(image, ax=list(panels), label=f"{metric} (x100)")
    figure.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.needle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="folder to write the LoCo-format tasks into")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                        help="document lengths in bert-base-uncased tokens (default: %(default)s)")
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS),
                        help="needle positions as fractions of the document (default: %(default)s)")
    parser.add_argument("--documents", type=int, default=50, help="documents (and queries) per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--needles", type=Path,
                        help="JSON lines {needle, query} to hide instead of the template secret codes")
    parser.add_argument("--haystack", type=Path, nargs="+",
                        help="UTF-8 text files of distractor text (default: the bundled QMSum transcripts)")
    args = parser.parse_args(argv)

    from model import load_tokenizer

    needles = read_needles(args.needles)[:args.documents] if args.needles else template_needles(args.documents, args.seed)
    haystack = [p.read_text(encoding="utf-8") for p in args.haystack] if args.haystack else bundled_haystack()
    documents, queries = generate(haystack, needles, args.lengths, args.depths, load_tokenizer())
    source = ", ".join(map(str, args.haystack)) if args.haystack else "the bundled QMSum meeting transcripts (eval/data)"
    write_folder(args.output_dir, documents, queries,
                 f"Generated by `python -m eval.needle` (seed {args.seed}): {len(needles)} needles, lengths "
                 f"{args.lengths}, depths {args.depths}. Haystack: {source}. Needles: "
                 f"{args.needles or 'template secret codes'}.")
    print(f"wrote {len(documents)} documents and {len(queries)} queries in "
          f"{len(args.lengths) * len(args.depths)} tasks to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

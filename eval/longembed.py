"""LongEmbed (Zhu et al., 2024, arXiv 2404.12096) read in its own file layout, as `LocoTask`s.

The layout of the Hugging Face dataset `dwzhu/LongEmbed`, and of local copies of it, is one folder
per task holding
  * corpus.jsonl:  {"doc_id", "text"[, "context_length"]}
  * queries.jsonl: {"qid", "text"[, "context_length"]}
  * qrels.jsonl:   {"qid", "doc_id"[, "context_length"]}
(`.jsonl.gz` and `.parquet` are read too). The real tasks (narrativeqa, qmsum, summ_screen_fd,
2wikimqa) are scored by nDCG@10. The synthetic tasks (needle, passkey) keep every document length
in one folder, `context_length` telling which (256 ... 32768 tokens): each length is a task of its
own, `needle-L256`, ..., scored by nDCG@1 as LongEmbed and mteb do, and the lengths of one folder
count once, as their mean, in a benchmark average (their `group`).

Sources: a folder in this layout (a task folder, or a folder of task folders such as a download of
the whole dataset), or `hf:longembed` for the Hub at the revision mteb's LongEmbed tasks read.
`python -m eval.needle --format longembed` writes synthetic tasks in this layout.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from .data import (LocoDataError, LocoTask, _check_hub_reachable, _data_files, _identifier, _require_fields, _Row,
                   read_records)

logger = logging.getLogger(__name__)

LONGEMBED_SOURCE = "hf:longembed"
LONGEMBED_HUB = "dwzhu/LongEmbed"
LONGEMBED_REVISION = "6e346642246bfb4928c560ee08640dc84d074e8c"  # the revision mteb's LEMB*Retrieval tasks read
# The paper's order (its Table 2): synthetic tasks first.
LONGEMBED_TASKS = ("passkey", "needle", "narrativeqa", "qmsum", "summ_screen_fd", "2wikimqa")
SYNTHETIC_METRIC = "nDCG@1"
REAL_METRIC = "nDCG@10"
LENGTH_FIELD = "context_length"
FILES = ("corpus", "queries", "qrels")
FIELDS = {"corpus": ("doc_id", "text"), "queries": ("qid", "text"), "qrels": ("qid", "doc_id")}
SPLIT = "test"
_LENGTH_TASK = re.compile(r"^(.+)-L(\d+)$")


def length_task_name(task: str, length: int) -> str:
    """The task holding the documents of one `context_length` of a synthetic task."""
    return f"{task}-L{length}"


def parse_length_task(name: str) -> tuple[str, int] | None:
    """(task, length) of a per-length task name (`needle-L256`), None for any other name."""
    match = _LENGTH_TASK.match(name)
    return None if match is None else (match[1], int(match[2]))


def is_longembed_folder(folder: Path) -> bool:
    """True when `folder`, or one of its sub-folders, holds a LongEmbed `corpus*` file."""
    if not folder.is_dir():
        return False
    return any(_data_files(candidate, "corpus") for candidate in [folder, *(p for p in folder.iterdir() if p.is_dir())])


def load_longembed(data: str | Path, tasks: Iterable[str] | None = None, split: str | None = SPLIT) -> list[LocoTask]:
    """LongEmbed tasks from a folder in its layout or, for `hf:longembed`, from the Hub.

    `tasks` picks tasks by folder name (`needle` is every length of it) or by length task
    (`needle-L1024`); LongEmbed has a test split only."""
    if split not in (SPLIT, None):
        raise LocoDataError(f"LongEmbed has only a {SPLIT!r} split; asked for {split!r}")
    if str(data) == LONGEMBED_SOURCE:
        wanted = list(dict.fromkeys(tasks)) if tasks is not None else None
        names = _hub_task_names(wanted)
        found = [_assemble(name, *_hub_rows(name)) for name in names]
    else:
        folder = Path(data)
        task_folders = _task_folders(folder)
        found = [_assemble(name, *(_file_rows(files, kind) for kind, files in zip(FILES, kind_files)))
                 for name, kind_files in task_folders.items()]
    tasks_found = [task for group in sorted(found, key=_order) for task in group]
    return _select(tasks_found, tasks)


# --- sources -----------------------------------------------------------------------------------

def _task_folders(folder: Path) -> dict[str, tuple[list[Path], list[Path], list[Path]]]:
    """Task name -> its corpus, queries and qrels files: `folder` itself, or each sub-folder."""
    candidates = [folder] if _data_files(folder, "corpus") else sorted(p for p in folder.iterdir() if p.is_dir())
    layout = {}
    for candidate in candidates:
        files = tuple(_data_files(candidate, kind) for kind in FILES)
        if not any(files):
            continue
        missing = [kind for kind, paths in zip(FILES, files) if not paths]
        if missing:
            raise LocoDataError(f"{candidate}: a LongEmbed task folder needs corpus, queries and qrels files; "
                                f"no {' or '.join(missing)} file")
        layout[candidate.name] = files
    if not layout:
        raise LocoDataError(f"{folder}: no LongEmbed task (corpus.jsonl, queries.jsonl, qrels.jsonl) in it or in "
                            f"its sub-folders")
    return layout


def _file_rows(paths: list[Path], kind: str) -> list[_Row]:
    return [row for path in paths for row in read_records(path, kind)]


def _hub_task_names(wanted: list[str] | None) -> list[str]:
    if wanted is None:
        return list(LONGEMBED_TASKS)
    names = list(dict.fromkeys((parse_length_task(name) or (name, None))[0] for name in wanted))
    unknown = [name for name in names if name not in LONGEMBED_TASKS]
    if unknown:
        raise LocoDataError(f"unknown LongEmbed task(s) {unknown}; available: {list(LONGEMBED_TASKS)}")
    return names


def _hub_rows(name: str) -> tuple[list[_Row], list[_Row], list[_Row]]:
    import datasets

    _check_hub_reachable(f"{LONGEMBED_HUB} ({name})")
    try:
        parts = datasets.load_dataset(LONGEMBED_HUB, name, revision=LONGEMBED_REVISION)
    except Exception as err:  # `datasets` raises many types (connection, missing config, cache misses)
        raise LocoDataError(f"could not load {LONGEMBED_HUB} ({name}) from the Hugging Face Hub: {err}") from err
    return tuple([_Row(record, f"{LONGEMBED_HUB}/{name}[{kind}]", f"row {number}")
                  for number, record in enumerate(parts[kind])] for kind in FILES)


# --- validation and assembly -------------------------------------------------------------------

def _assemble(name: str, corpus: list[_Row], queries: list[_Row], qrels: list[_Row]) -> list[LocoTask]:
    """The task(s) of one LongEmbed folder: itself, or one per `context_length`."""
    source = next((rows[0].source for rows in (queries, corpus, qrels) if rows), name)
    synthetic = _has_lengths(corpus, "corpus")
    if _has_lengths(queries, "queries") != synthetic or _has_lengths(qrels, "qrels") != synthetic:
        raise LocoDataError(f"{source}: `{LENGTH_FIELD}` must be on the corpus, queries and qrels records "
                            f"of task {name!r} alike, or on none")
    documents = _records(corpus, "corpus", synthetic)
    texts = _records(queries, "queries", synthetic)
    relevant: dict[tuple, dict[str, int]] = {}
    for row in qrels:
        _require_fields(row, FIELDS["qrels"], "qrels")
        qid, pid, length = _identifier(row, "qid"), _identifier(row, "doc_id"), _length(row, synthetic)
        if (length, qid) not in texts:
            raise LocoDataError(f"{row.where}: qrels name query {qid!r}, which queries do not hold"
                                + (f" at {LENGTH_FIELD} {length}" if synthetic else ""))
        if (length, pid) not in documents:
            raise LocoDataError(f"{row.where}: qrels name document {pid!r}, which the corpus does not hold"
                                + (f" at {LENGTH_FIELD} {length}" if synthetic else ""))
        relevant.setdefault((length, qid), {})[pid] = 1
    unjudged = [key for key in texts if key not in relevant]
    if unjudged:
        # mteb drops such queries too (they have nothing to find).
        logger.warning("%s: %d of %d queries have no qrels and are skipped", source, len(unjudged), len(texts))
    lengths = sorted({length for length, _ in texts}) if synthetic else [None]
    tasks = []
    for length in lengths:
        task_name = length_task_name(name, length) if synthetic else name
        corpus_of = {pid: text for (at, pid), text in documents.items() if at == length}
        judged = [qid for (at, qid) in texts if at == length and (at, qid) in relevant]
        if not corpus_of or not judged:
            raise LocoDataError(f"{source}: task {task_name!r} has no "
                                + ("documents" if not corpus_of else "judged queries"))
        tasks.append(LocoTask(name=task_name, split=SPLIT, documents=corpus_of,
                              queries={qid: texts[length, qid] for qid in judged},
                              qrels={qid: relevant[length, qid] for qid in judged}, source=source,
                              metric=SYNTHETIC_METRIC if synthetic else REAL_METRIC,
                              group=name if synthetic else None))
    return tasks


def _has_lengths(rows: list[_Row], kind: str) -> bool:
    """Whether the records carry `context_length` (all of them, or none)."""
    present = [LENGTH_FIELD in row.values for row in rows]
    if any(present) and not all(present):
        row = rows[present.index(False)]
        raise LocoDataError(f"{row.where}: {kind} record lacks `{LENGTH_FIELD}`, which other records have")
    return bool(present) and present[0]


def _length(row: _Row, synthetic: bool) -> int | None:
    if not synthetic:
        return None
    value = row.values[LENGTH_FIELD]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LocoDataError(f"{row.where}: `{LENGTH_FIELD}` must be a positive integer, got {value!r}")
    return value


def _records(rows: list[_Row], kind: str, synthetic: bool) -> dict[tuple, str]:
    """(length, id) -> text of corpus or queries records, checked for fields and duplicate ids."""
    id_field = FIELDS[kind][0]
    records: dict[tuple, str] = {}
    origin: dict[tuple, str] = {}
    for row in rows:
        _require_fields(row, FIELDS[kind], kind)
        text = row.values["text"]
        if not isinstance(text, str):
            raise LocoDataError(f"{row.where}: `text` must be a string, got {type(text).__name__}")
        key = (_length(row, synthetic), _identifier(row, id_field))
        if key in records:
            raise LocoDataError(f"{row.where}: duplicate {id_field} {key[1]!r} (first at {origin[key]})")
        records[key] = text
        origin[key] = row.where
    return records


def _order(tasks: list[LocoTask]) -> tuple[int, str]:
    name = tasks[0].group or tasks[0].name
    return (LONGEMBED_TASKS.index(name) if name in LONGEMBED_TASKS else len(LONGEMBED_TASKS), name)


def _select(tasks: list[LocoTask], wanted: Iterable[str] | None) -> list[LocoTask]:
    if wanted is None:
        return tasks
    wanted = list(dict.fromkeys(wanted))
    available = [task.name for task in tasks]
    groups = list(dict.fromkeys(task.group for task in tasks if task.group))
    unknown = [name for name in wanted if name not in available and name not in groups]
    if unknown:
        raise LocoDataError(f"unknown task(s) {unknown}; available: {groups + available}")
    return [task for task in tasks if task.name in wanted or task.group in wanted]


# --- writing -----------------------------------------------------------------------------------

def write_longembed_folder(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[dict]) -> None:
    """Write one LongEmbed task folder: corpus.jsonl, queries.jsonl and qrels.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, records in zip(FILES, (corpus, queries, qrels)):
        with (folder / f"{kind}.jsonl").open("w", encoding="utf-8") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)

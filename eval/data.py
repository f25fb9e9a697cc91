"""LoCo-format retrieval tasks: reading, validation and selection.

The schema is LoCoV1's (Hugging Face `hazyresearch/LoCoV1-Documents` and `hazyresearch/LoCoV1-Queries`):
  * documents: `pid`, `passage`, `dataset`
  * queries:   `qid`, `query`, `answer_pids` (list of relevant pids), `dataset`
plus an optional `split` on either. Rows of one `dataset` value form one task; a query is evaluated
against the documents of its own task and split.

Sources (`load_tasks(data=...)`):
  * `None`: the bundled task (QMSum, `eval/data/`), so everything works offline;
  * a folder holding `documents*` and `queries*` files (`.jsonl`, `.jsonl.gz`, `.parquet`), or whose
    sub-folders do (one level deep); one or many tasks per folder;
  * `"hf"`: LoCoV1 from the Hugging Face Hub through `datasets`;
  * LongEmbed's layout (a folder, or `"hf:longembed"`): read by `eval.longembed`.

Every defect is a `LocoDataError` naming the file (or Hub dataset) and the record.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from .metrics import HEADLINE_METRIC

logger = logging.getLogger(__name__)

BUNDLED_DATA = Path(__file__).parent / "data"
HUB = "hf"
HUB_DOCUMENTS = "hazyresearch/LoCoV1-Documents"
HUB_QUERIES = "hazyresearch/LoCoV1-Queries"
# The 12 LoCoV1 tasks in the paper's order (Table 10); other tasks keep the order they are found in.
LOCOV1_TASKS = ("summ_screen_fd", "gov_report", "qmsum", "qasper_title", "qasper_abstract",
                "multifieldqa", "2wikimqa", "passage_retrieval", "courtlistener_Plain_Text",
                "courtlistener_HTML", "legal_case_reports", "stackoverflow")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
DOCUMENT_FIELDS = ("pid", "passage", "dataset")
QUERY_FIELDS = ("qid", "query", "answer_pids", "dataset")


class LocoDataError(ValueError):
    """A LoCo data file or record that cannot be used; the message names the file and the record."""


@dataclasses.dataclass(frozen=True)
class LocoTask:
    """One retrieval task: a corpus, its queries and which documents answer each query.

    `documents` maps pid -> passage and `queries` qid -> query text, both in file order;
    `qrels` maps qid -> {pid: 1} (every relevant document has grade 1, as in LoCoV1).
    `metric` is the task's main score (LoCo's nDCG@10; LongEmbed's needle and passkey lengths: nDCG@1).
    `group` names the benchmark task a task is one part of (a LongEmbed length of `needle`): a
    benchmark average counts each group once, as the mean of its parts.
    """

    name: str
    split: str | None
    documents: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str
    metric: str = HEADLINE_METRIC
    group: str | None = None

    def subset(self, max_queries: int | None = None, max_documents: int | None = None) -> LocoTask:
        """A smaller task for quick runs: the first `max_queries` queries whose relevant documents fit
        within `max_documents`, and a corpus of those relevant documents topped up, in corpus order,
        to `max_documents`. Scores on a subset are not comparable with the full task's."""
        if max_queries is None and max_documents is None:
            return self
        query_limit = len(self.queries) if max_queries is None else max_queries
        document_limit = len(self.documents) if max_documents is None else max_documents
        if query_limit < 1 or document_limit < 1:
            raise ValueError("max_queries and max_documents must be at least 1")
        kept_queries: list[str] = []
        kept_documents: set[str] = set()
        for qid in self.queries:
            if len(kept_queries) == query_limit:
                break
            needed = kept_documents | set(self.qrels[qid])
            if len(needed) <= document_limit:
                kept_queries.append(qid)
                kept_documents = needed
        for pid in self.documents:
            if len(kept_documents) >= document_limit:
                break
            kept_documents.add(pid)
        return dataclasses.replace(
            self,
            documents={pid: text for pid, text in self.documents.items() if pid in kept_documents},
            queries={qid: self.queries[qid] for qid in kept_queries},
            qrels={qid: self.qrels[qid] for qid in kept_queries},
        )


@dataclasses.dataclass(frozen=True)
class _Row:
    """A record with where it came from, for error messages."""

    values: dict
    source: str
    position: str

    @property
    def where(self) -> str:
        return f"{self.source}, {self.position}"


def load_tasks(data: str | Path | None = None, tasks: Iterable[str] | None = None,
               split: str | None = "test") -> list[LocoTask]:
    """Validated tasks from `data`: None (the bundled task), a folder in LoCo's or LongEmbed's layout,
    "hf" (LoCoV1 from the Hub) or "hf:longembed" (LongEmbed from the Hub; see `eval.longembed`).

    `tasks` selects tasks by their `dataset` key (None: all, LoCoV1's in the paper's order first).
    `split` keeps rows whose `split` equals it; rows without a `split` belong to every split;
    None keeps every row. Raises `LocoDataError` on any defect and for unknown task names.
    """
    from .longembed import LONGEMBED_SOURCE, is_longembed_folder, load_longembed

    wanted = None if tasks is None else list(dict.fromkeys(tasks))
    if str(data) == LONGEMBED_SOURCE or (data is not None and is_longembed_folder(Path(data))):
        return load_longembed(data, wanted, split)
    if str(data) == HUB:
        documents, queries = _hub_rows(split)
    else:
        documents, queries = _folder_rows(BUNDLED_DATA if data is None else Path(data), split)
    return _assemble(documents, queries, wanted, split)


def list_tasks(data: str | Path | None = None, split: str | None = "test") -> list[str]:
    """Names of the tasks `data` holds for `split`."""
    return [task.name for task in load_tasks(data, split=split)]


# --- files -------------------------------------------------------------------------------------

def _folder_rows(folder: Path, split: str | None) -> tuple[list[_Row], list[_Row]]:
    document_files, query_files = _find_files(folder)
    documents = [row for path in document_files for row in _split_rows(path, read_records(path, "documents"), split)]
    queries = [row for path in query_files for row in _split_rows(path, read_records(path, "queries"), split)]
    return documents, queries


def _find_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The documents and queries files of `folder`, or of its sub-folders when it has none itself."""
    if not folder.is_dir():
        raise LocoDataError(f"{folder}: no such folder (expected LoCo-format documents and queries files)")
    for candidates in ([folder], sorted(p for p in folder.iterdir() if p.is_dir())):
        documents = [f for d in candidates for f in _data_files(d, "documents")]
        queries = [f for d in candidates for f in _data_files(d, "queries")]
        if documents or queries:
            if not documents:
                raise LocoDataError(f"{folder}: queries files but no documents file "
                                    f"(documents{'|'.join(DATA_SUFFIXES)})")
            if not queries:
                raise LocoDataError(f"{folder}: documents files but no queries file "
                                    f"(queries{'|'.join(DATA_SUFFIXES)})")
            return documents, queries
    raise LocoDataError(f"{folder}: no LoCo data: expected files named documents*{{{','.join(DATA_SUFFIXES)}}} "
                        f"and queries*{{...}} in it or in its sub-folders")


def _data_files(folder: Path, stem: str) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.startswith(stem) and p.name.endswith(DATA_SUFFIXES))


def read_records(path: Path, kind: str) -> list[_Row]:
    """The records of a `.jsonl`, `.jsonl.gz` or `.parquet` file of `kind` (e.g. "documents"); an
    empty file is an error (a truncated download or an export that went wrong)."""
    if path.name.endswith(".parquet"):
        rows = _read_parquet(path)
    else:
        rows = [_Row(record, str(path), f"line {number}") for number, record in read_json_lines(path)]
    if not rows:
        raise LocoDataError(f"{path}: the file is empty (expected {kind} records)")
    return rows


def read_json_lines(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file (gzipped when its name ends in .gz).
    A line that is not a JSON object, or a file that cannot be read, is a `LocoDataError` (a ValueError)
    naming the file and the line."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise LocoDataError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise LocoDataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
                yield number, record
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise LocoDataError(f"{path}: cannot be read: {err}") from err


def _read_parquet(path: Path) -> list[_Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for damaged files
        raise LocoDataError(f"{path}: cannot be read as parquet: {err}") from err
    return [_Row(record, str(path), f"row {number}") for number, record in enumerate(records)]


def _split_rows(source: Path | str, rows: list[_Row], split: str | None) -> list[_Row]:
    """The rows of `split`; rows with no `split` value belong to every split."""
    if split is None:
        return rows
    present = {row.values.get("split") for row in rows} - {None}
    if not present:
        logger.warning("%s has no `split` column: all its rows are used as split %r", source, split)
        return rows
    kept = [row for row in rows if row.values.get("split") in (None, split)]
    if not kept:
        raise LocoDataError(f"{source}: no rows of split {split!r} (splits present: {sorted(map(str, present))})")
    return kept


# --- the Hub -----------------------------------------------------------------------------------

def _hub_rows(split: str | None) -> tuple[list[_Row], list[_Row]]:
    if split is None:
        raise LocoDataError("the Hub datasets need a split (e.g. 'test')")
    _check_hub_reachable(f"{HUB_QUERIES} and {HUB_DOCUMENTS}")
    return _hub_dataset_rows(HUB_DOCUMENTS, split), _hub_dataset_rows(HUB_QUERIES, split)


def _check_hub_reachable(what: str, timeout_s: float = 5.0) -> None:
    """Fail fast offline instead of letting `datasets` retry for half a minute.
    With HF_HUB_OFFLINE=1 a copy in the local `datasets` cache is used and nothing is checked."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise LocoDataError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to load {what} ({err}). "
            f"Offline, pass --data with a local copy in the same layout "
            f"(docs/eval.md shows how to make one), or set HF_HUB_OFFLINE=1 to use a copy already "
            f"in the datasets cache.") from err


def _hub_dataset_rows(name: str, split: str) -> list[_Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # `datasets` raises many types (connection, missing split, cache misses)
        raise LocoDataError(f"could not load {name} (split {split!r}) from the Hugging Face Hub: {err}") from err
    return [_Row(record, f"{name}[{split}]", f"row {number}") for number, record in enumerate(dataset)]


# --- validation and assembly -------------------------------------------------------------------

def _assemble(documents: list[_Row], queries: list[_Row], wanted: list[str] | None,
              split: str | None) -> list[LocoTask]:
    corpora: dict[str, dict[str, str]] = {}
    document_origin: dict[tuple[str, str], str] = {}
    for row in documents:
        pid, passage, task = _document(row)
        corpus = corpora.setdefault(task, {})
        if pid in corpus:
            raise LocoDataError(f"{row.where}: duplicate pid {pid!r} in task {task!r} "
                                f"(first at {document_origin[task, pid]})")
        corpus[pid] = passage
        document_origin[task, pid] = row.where

    query_sets: dict[str, dict[str, str]] = {}
    qrel_sets: dict[str, dict[str, dict[str, int]]] = {}
    query_origin: dict[tuple[str, str], str] = {}
    first_query_row: dict[str, _Row] = {}
    for row in queries:
        qid, text, answer_pids, task = _query(row)
        if task in query_sets and qid in query_sets[task]:
            raise LocoDataError(f"{row.where}: duplicate qid {qid!r} in task {task!r} "
                                f"(first at {query_origin[task, qid]})")
        query_sets.setdefault(task, {})[qid] = text
        qrel_sets.setdefault(task, {})[qid] = {pid: 1 for pid in answer_pids}
        query_origin[task, qid] = row.where
        first_query_row.setdefault(task, row)

    available = _task_order(list(query_sets) + [t for t in corpora if t not in query_sets])
    if wanted is not None:
        unknown = [name for name in wanted if name not in available]
        if unknown:
            raise LocoDataError(f"unknown task(s) {unknown} for split {split!r}; available: {available}")
    selected = available if wanted is None else wanted

    tasks = []
    for name in selected:
        corpus = corpora.get(name, {})
        if name not in query_sets:
            raise LocoDataError(f"task {name!r} has documents but no queries in split {split!r}")
        if not corpus:
            raise LocoDataError(f"{first_query_row[name].where}: task {name!r} has queries but an empty corpus "
                                f"(no documents of split {split!r})")
        for qid, relevant in qrel_sets[name].items():
            missing = [pid for pid in relevant if pid not in corpus]
            if missing:
                raise LocoDataError(f"{query_origin[name, qid]}: query {qid!r} of task {name!r}: answer_pids "
                                    f"{missing} name no document of the task (split {split!r})")
        tasks.append(LocoTask(name=name, split=split, documents=corpus, queries=query_sets[name],
                              qrels=qrel_sets[name], source=first_query_row[name].source))
    return tasks


def _task_order(names: list[str]) -> list[str]:
    known = [name for name in LOCOV1_TASKS if name in names]
    return known + [name for name in names if name not in LOCOV1_TASKS]


def _document(row: _Row) -> tuple[str, str, str]:
    _require_fields(row, DOCUMENT_FIELDS, "document")
    passage = row.values["passage"]
    if not isinstance(passage, str):
        raise LocoDataError(f"{row.where}: `passage` must be a string, got {type(passage).__name__}")
    return _identifier(row, "pid"), passage, _task_name(row)


def _query(row: _Row) -> tuple[str, str, list[str], str]:
    _require_fields(row, QUERY_FIELDS, "query")
    text = row.values["query"]
    if not isinstance(text, str):
        raise LocoDataError(f"{row.where}: `query` must be a string, got {type(text).__name__}")
    answer_pids = row.values["answer_pids"]
    if isinstance(answer_pids, (str, bytes)) or not isinstance(answer_pids, Iterable):
        raise LocoDataError(f"{row.where}: `answer_pids` must be a list of document ids, "
                            f"got {type(answer_pids).__name__}")
    pids = [str(pid) if isinstance(pid, int) else pid for pid in answer_pids]
    if not pids or not all(isinstance(pid, str) and pid for pid in pids):
        raise LocoDataError(f"{row.where}: `answer_pids` must be a non-empty list of document ids, got {answer_pids!r}")
    return _identifier(row, "qid"), text, pids, _task_name(row)


def _require_fields(row: _Row, fields: tuple[str, ...], kind: str) -> None:
    missing = [field for field in fields if row.values.get(field) is None]
    if missing:
        raise LocoDataError(f"{row.where}: {kind} record lacks field(s) {missing} (has {sorted(row.values)})")


def _identifier(row: _Row, field: str) -> str:
    value = row.values[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise LocoDataError(f"{row.where}: `{field}` must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _task_name(row: _Row) -> str:
    value = row.values["dataset"]
    if not isinstance(value, str) or not value:
        raise LocoDataError(f"{row.where}: `dataset` must be a non-empty string, got {value!r}")
    return value

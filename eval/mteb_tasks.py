"""LoCoV1 as mteb retrieval tasks, reading the data `eval.loco` reads; mteb's LongEmbed tasks on local copies.

    import mteb
    from eval.mteb_models import loco_model
    from eval.mteb_tasks import loco_tasks, longembed_tasks

    tasks = loco_tasks()                        # the bundled QMSum task (offline)
    tasks = loco_tasks("hf")                    # LoCoV1's 12 tasks from the Hugging Face Hub
    tasks = loco_tasks("loco-v1", ["qmsum"])    # a local copy in LoCo's schema (docs/eval.md)
    mteb.evaluate(loco_model("all-MiniLM-L6-v2"), tasks, encode_kwargs={"batch_size": 32})
    tasks = longembed_tasks("longembed")        # mteb's LEMB*Retrieval tasks on a local LongEmbed copy

Each of LoCoV1's tasks is an `AbsTaskRetrieval` named `LoCoV1<Task>Retrieval` (e.g.
`LoCoV1QMSumRetrieval`, main score nDCG@10, split `test`), and the bundled QMSum task is
`LoCoQMSumBundledRetrieval` (its test split, as `eval.loco` scores by default). Their data come from
`eval.data.load_tasks` (the same files, validation and errors as `eval.loco`); `max_queries` and
`max_documents` make the same quick subsets as `eval.loco --max-queries/--max-documents`.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata

from .data import HUB, HUB_QUERIES, LocoTask, load_tasks
from .longembed import load_longembed, parse_length_task

PAPER = "https://arxiv.org/abs/2402.07440"
CITATION = r"""
@article{saadfalcon2024benchmarking,
  author = {Saad-Falcon, Jon and Fu, Daniel Y. and Arora, Simran and Guha, Neel and R{\'e}, Christopher},
  journal = {arXiv preprint arXiv:2402.07440},
  title = {Benchmarking and Building Long-Context Retrieval Models with {LoCo} and {M2-BERT}},
  year = {2024},
}
"""
# LoCoV1 `dataset` key (eval.data.LOCOV1_TASKS, in the paper's order) -> (mteb name part, domains, what it is)
LOCOV1 = {
    "summ_screen_fd": ("SummScreenFD", ["Fiction", "Spoken"], "TV show transcripts retrieved by their summary"),
    "gov_report": ("GovReport", ["Government", "Written"], "government reports retrieved by their summary"),
    "qmsum": ("QMSum", ["Spoken"], "meeting transcripts retrieved by a query-focused summary"),
    "qasper_title": ("QasperTitle", ["Academic", "Written"], "NLP papers retrieved by their title"),
    "qasper_abstract": ("QasperAbstract", ["Academic", "Written"], "NLP papers retrieved by their abstract"),
    "multifieldqa": ("MultiFieldQA", ["Written"], "long documents of many fields retrieved by a question"),
    "2wikimqa": ("2WikiMQA", ["Encyclopaedic", "Written"], "Wikipedia passages retrieved by a multi-hop question"),
    "passage_retrieval": ("PassageRetrieval", ["Encyclopaedic", "Written"],
                          "Wikipedia articles retrieved by the summary of one of them"),
    "courtlistener_Plain_Text": ("CourtListenerPlainText", ["Legal", "Written"],
                                 "court opinions (plain text) retrieved by their summary"),
    "courtlistener_HTML": ("CourtListenerHTML", ["Legal", "Written"], "court opinions (HTML) retrieved by their summary"),
    "legal_case_reports": ("LegalCaseReports", ["Legal", "Written"], "legal case reports retrieved by their summary"),
    "stackoverflow": ("StackOverflow", ["Programming", "Written"], "StackOverflow answers retrieved by the question"),
}


class LocoRetrievalTask(AbsTaskRetrieval):
    """A LoCo-format task as an mteb retrieval task; subclasses set `metadata`, `loco_name` and `data`."""

    loco_name: str  # the `dataset` key of the task's rows
    data: str | None  # eval.data.load_tasks's source: None (bundled), "hf" or a folder

    def __init__(self, data: str | None = ..., max_queries: int | None = None, max_documents: int | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        if data is not ...:
            self.data = data
        self.max_queries, self.max_documents = max_queries, max_documents

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = {"default": {}}
        for split in self.eval_splits:
            (task,) = load_tasks(self.data, [self.loco_name], split)
            self.dataset["default"][split] = split_data(task.subset(self.max_queries, self.max_documents))
        self.data_loaded = True


def split_data(task: LocoTask) -> dict:
    """A task's corpus, queries and qrels as mteb holds a retrieval split (its `RetrievalSplitData`)."""
    return {"corpus": Dataset.from_list([{"id": pid, "text": text} for pid, text in task.documents.items()]),
            "queries": Dataset.from_list([{"id": qid, "text": text} for qid, text in task.queries.items()]),
            "relevant_docs": task.qrels, "top_ranked": None}


def _metadata(name: str, description: str, domains: list[str], splits: list[str], dataset: dict) -> TaskMetadata:
    return TaskMetadata(
        name=name, description=description, reference=PAPER, dataset=dataset, type="Retrieval", category="t2t",
        modalities=["text"], eval_splits=splits, eval_langs=["eng-Latn"], main_score="ndcg_at_10",
        domains=domains, task_subtypes=["Article retrieval"], license="not specified",
        annotations_creators="derived", dialect=[], sample_creation="found", bibtex_citation=CITATION)


def _locov1_task(key: str) -> type[LocoRetrievalTask]:
    part, domains, what = LOCOV1[key]
    name = f"LoCoV1{part}Retrieval"
    metadata = _metadata(name, f"LoCoV1 {key}: {what} (long documents; LoCo benchmark).", domains, ["test"],
                         {"path": HUB_QUERIES, "revision": "main"})
    return type(name, (LocoRetrievalTask,), {"metadata": metadata, "loco_name": key, "data": HUB,
                                             "__doc__": f"LoCoV1 `{key}` through `eval.data.load_tasks`."})


LOCOV1_MTEB_TASKS: dict[str, type[LocoRetrievalTask]] = {key: _locov1_task(key) for key in LOCOV1}


class LoCoQMSumBundledRetrieval(LocoRetrievalTask):
    """The QMSum task bundled with the package (eval/data/qmsum), offline."""

    metadata = _metadata("LoCoQMSumBundledRetrieval",
                         "QMSum meeting transcripts retrieved by query-focused summaries, in LoCoV1's schema, "
                         "bundled with m2-loco (35 test meetings; not LoCoV1's qmsum split).",
                         ["Spoken"], ["test"],
                         {"path": "m2-loco/eval/data/qmsum", "revision": "bundled"})
    loco_name = "qmsum"
    data = None


def loco_tasks(data: str | None = None, tasks: list[str] | None = None, **options: Any) -> list[LocoRetrievalTask]:
    """mteb tasks for `data`: None, the bundled QMSum task; "hf" or a folder in LoCo's schema, LoCoV1's
    tasks (`tasks`: their `dataset` keys, default all 12). `options`: max_queries, max_documents."""
    if data is None:
        if tasks not in (None, ["qmsum"]):
            raise ValueError(f"the bundled data holds the qmsum task only; asked for {tasks}")
        return [LoCoQMSumBundledRetrieval(**options)]
    unknown = [key for key in tasks or [] if key not in LOCOV1_MTEB_TASKS]
    if unknown:
        raise ValueError(f"not LoCoV1 task(s): {unknown}; known: {list(LOCOV1_MTEB_TASKS)}")
    return [LOCOV1_MTEB_TASKS[key](data=data, **options) for key in tasks or LOCOV1_MTEB_TASKS]


# LongEmbed task folder -> mteb's task for it.
LONGEMBED_MTEB_TASKS = {"passkey": "LEMBPasskeyRetrieval", "needle": "LEMBNeedleRetrieval",
                        "narrativeqa": "LEMBNarrativeQARetrieval", "qmsum": "LEMBQMSumRetrieval",
                        "summ_screen_fd": "LEMBSummScreenFDRetrieval", "2wikimqa": "LEMBWikimQARetrieval"}


def longembed_tasks(folder, tasks: list[str] | None = None) -> list[AbsTaskRetrieval]:
    """mteb's own LongEmbed tasks (`LEMB*Retrieval`, their metrics and main scores) with the data of a
    local copy in LongEmbed's layout (`eval.longembed`), e.g. a download of `dwzhu/LongEmbed` or what
    `python -m eval.needle --format longembed` writes. Needle and passkey get one split per length
    present (`test_256`, ...), as mteb names them."""
    import mteb

    by_folder: dict[str, list[LocoTask]] = {}
    for task in load_longembed(folder, tasks):
        by_folder.setdefault(task.group or task.name, []).append(task)
    unknown = [name for name in by_folder if name not in LONGEMBED_MTEB_TASKS]
    if unknown:
        raise ValueError(f"{folder}: task folder(s) {unknown} are not LongEmbed's ({list(LONGEMBED_MTEB_TASKS)})")
    found = []
    for name, parts in by_folder.items():
        task = mteb.get_task(LONGEMBED_MTEB_TASKS[name])
        splits = {(f"test_{parse_length_task(part.name)[1]}" if part.group else "test"): part for part in parts}
        task.dataset = {"default": {split: split_data(part) for split, part in splits.items()}}
        task.filter_eval_splits(list(splits))
        task.data_loaded = True
        found.append(task)
    return found

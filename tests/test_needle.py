"""The needle-in-a-haystack generator: lengths, depths, LoCo format, and scoring its tasks."""

from __future__ import annotations

import json
import re

import pytest

from eval.data import LocoDataError, load_tasks
from eval.loco import main
from eval.needle import bundled_haystack, generate, parse_task_name, read_needles, template_needles, write_folder
from eval.needle import main as needle_main
from model import load_tokenizer

LENGTHS = (128, 512)
DEPTHS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def needle_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("needle")
    assert needle_main(["--output-dir", str(folder), "--documents", "12", "--lengths", *map(str, LENGTHS),
                        "--depths", *map(str, DEPTHS)]) == 0
    return folder


def test_tasks_have_the_asked_lengths_and_depths(needle_folder):
    tokenizer = load_tokenizer()
    tasks = load_tasks(needle_folder)
    assert [parse_task_name(t.name) for t in tasks] == [("needle", n, d) for n in LENGTHS for d in DEPTHS]
    for task in tasks:
        _, length, depth = parse_task_name(task.name)
        assert len(task.documents) == len(task.queries) == 12
        for qid, query in task.queries.items():
            (pid,) = task.qrels[qid]
            passage = task.documents[pid]
            assert abs(len(tokenizer(passage)["input_ids"]) - length) <= 2
            subject = query.removeprefix("What is the secret code of the ").removesuffix("?")
            needle = re.search(rf"The secret code of the {subject} is \d+\.", passage)
            # Depth: haystack tokens before the needle over all haystack tokens (give or take a word).
            before = len(tokenizer(passage[:needle.start()], add_special_tokens=False)["input_ids"])
            haystack = length - 2 - len(tokenizer(needle[0], add_special_tokens=False)["input_ids"])
            assert abs(before - depth * haystack) <= 4
    # Across tasks, document i keeps its needle and its stretch of haystack.
    by_cell = {parse_task_name(t.name)[1:]: t for t in tasks}
    at_start = by_cell[512, 0.0].documents["needle-L512-D0-doc0003"]
    at_end = by_cell[512, 1.0].documents["needle-L512-D100-doc0003"]
    needle = re.search(r"The secret code of the \w+ \w+ is \d+\.", at_start)[0]
    assert at_start.startswith(needle) and at_end.endswith(needle)
    assert at_start[len(needle):].lstrip()[:300] == at_end[:300]


def test_needle_tasks_score_and_plot(needle_folder, tiny_m2, tmp_path):
    assert main(["--data", str(needle_folder), "--model", "bm25", "--model", str(tiny_m2),
                 "--output-dir", str(tmp_path), "--no-cache", "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["results"]) == 2 * len(LENGTHS) * len(DEPTHS)
    bm25 = [r["metrics"]["nDCG@10"] for r in results["results"] if r["model"] == "bm25"]
    assert min(bm25) > 0.9  # the needle's rare words occur in one document only
    assert (tmp_path / "needle.png").read_bytes()[:4] == b"\x89PNG"


def test_template_needles_are_distinct_and_seeded():
    needles = template_needles(200, seed=3)
    assert len({n.query for n in needles}) == 200 and needles == template_needles(200, seed=3)
    assert needles != template_needles(200, seed=4)


def test_needles_file_and_its_errors(tmp_path):
    good = tmp_path / "needles.jsonl"
    good.write_text(json.dumps({"needle": "Paris is the capital of France.", "query": "capital of France?"}) + "\n")
    (needle,) = read_needles(good)
    documents, queries = generate(bundled_haystack()[:2], [needle], [64], [0.5], load_tokenizer())
    assert needle.text in documents[0]["passage"] and queries[0]["answer_pids"] == [documents[0]["pid"]]
    write_folder(tmp_path / "task", documents, queries, "test")
    assert load_tasks(tmp_path / "task")[0].name == "needle-L64-D50"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"needle": "x", "query": "y"}) + "\n" + json.dumps({"needle": "x"}) + "\n")
    with pytest.raises(LocoDataError, match=r"bad\.jsonl, line 2: expected an object with non-empty strings"):
        read_needles(bad)
    with pytest.raises(ValueError, match="depths must lie in"):
        generate(["text"], [needle], [64], [1.5], load_tokenizer())
    with pytest.raises(ValueError, match="fewer than the longest document"):
        generate(["a short haystack"], [needle], [64], [0.5], load_tokenizer())


@pytest.fixture(scope="module")
def minilm_by_length(tmp_path_factory):
    """all-MiniLM-L6-v2 (truncated at 256 tokens) on needle and passkey tasks made here in LongEmbed's
    layout at 256 ... 32768 tokens (10 documents per length, needles at 0, 25, ..., 100% depth)."""
    base = tmp_path_factory.mktemp("lengths")
    assert needle_main(["--output-dir", str(base / "data"), "--format", "longembed", "--kind", "needle", "passkey",
                        "--documents", "10"]) == 0
    assert main(["--data", str(base / "data"), "--model", "all-MiniLM-L6-v2", "--output-dir", str(base / "out"),
                 "--cache-dir", str(base / "cache"), "--quiet"]) == 0
    results = json.loads((base / "out" / "results.json").read_text())["results"]
    return base, {(r["group"], int(r["task"].rsplit("-L", 1)[1])): r["metrics"][r["metric"]] for r in results}


# How each kind's query names its needle: (the query's pattern, the needle's opening words).
NEEDLE_OF_QUERY = ((re.compile(r"What is the secret code of the (.+)\?"), "The secret code of the {} is"),
                   (re.compile(r"What is the pass key for (.+)\?"), "{}'s pass key is"))


def window_share(task, tokenizer, window: int) -> float:
    """Share of the task's documents whose needle opening lies within the first `window` tokens."""
    inside = 0
    for qid, relevant in task.qrels.items():
        passage = task.documents[next(iter(relevant))]
        opening = next(form.format(match[1]) for pattern, form in NEEDLE_OF_QUERY
                       if (match := pattern.fullmatch(task.queries[qid])))
        end = passage.index(opening) + len(opening)
        inside += len(tokenizer(passage[:end], add_special_tokens=False)["input_ids"]) < window - 1
    return inside / len(task.qrels)


def test_minilm_scores_fall_once_the_needle_lies_past_its_window(minilm_by_length):
    base, scores = minilm_by_length
    lengths = sorted({length for _, length in scores})
    assert lengths == [256 * 2 ** i for i in range(8)]
    tokenizer = load_tokenizer()
    tasks = {t.name: t for t in load_tasks(base / "data")}
    for kind in ("needle", "passkey"):
        curve = [scores[kind, length] for length in lengths]
        assert curve[-1] < curve[0]  # falling with length
        for length in lengths[3:]:  # 2048 tokens and more: most needles lie past the first 256 tokens
            share = window_share(tasks[f"{kind}-L{length}"], tokenizer, 256)
            assert share < 0.5
            # Truncation cannot see a needle past its window: at most those inside, plus a lucky tie or two.
            assert scores[kind, length] <= share + 0.2
    assert window_share(tasks["passkey-L256"], tokenizer, 256) == 1
    assert scores["passkey", 256] >= 0.7  # all inside the window, and the documents differ only in their needle
    assert (base / "out" / "lengths.png").read_bytes()[:4] == b"\x89PNG"

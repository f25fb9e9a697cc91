"""Fine-tuning examples and batching: negatives (task, exclusion, reproducibility, BM25), unit layouts,
the per-rank batch plan and config errors. No training here (tests/test_finetune.py trains)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.data import LocoTask, load_tasks
from train.config import ConfigError, OptimizerConfig, load_config
from train.optim import parameter_groups
from train.retrieval_examples import (BatchPlan, NegativeSampler, RetrievalExample, TaskTexts, bm25_rankings_path,
                                      build_examples, labelled_pairs, mine_bm25_rankings, read_rankings, shuffled,
                                      split_queries, triplets, write_rankings)
from train.retrieval_objectives import CachedTripletObjective
from train.retrieval_task import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]


def make_task(name: str, documents: dict[str, str], queries: dict[str, tuple[str, list[str]]]) -> LocoTask:
    return LocoTask(name=name, split="train", documents=documents,
                    queries={qid: text for qid, (text, _) in queries.items()},
                    qrels={qid: {pid: 1 for pid in pids} for qid, (_, pids) in queries.items()}, source="test")


@pytest.fixture(scope="module")
def qmsum():
    return load_tasks(None, split="train")


def test_random_negatives_come_from_the_same_task_and_never_a_relevant_document(qmsum):
    other = make_task("other", {f"o{i}": f"other document {i}" for i in range(40)},
                      {"oq": ("a query", ["o1", "o2"])})
    tasks = [*qmsum, other]
    queries, _ = split_queries(tasks, heldout=0, max_train=None, seed=0)
    examples = build_examples(queries, NegativeSampler(tasks, count=32, seed=0), tasks)
    by_name = {t.name: t for t in tasks}
    assert len(examples) == sum(len(r) for t in tasks for r in t.qrels.values())
    for example in examples:
        task = by_name[example.task]
        assert len(example.negative_pids) == 32 == len(set(example.negative_pids))  # without replacement
        assert all(pid in task.documents for pid in example.negative_pids)
        assert not set(example.negative_pids) & set(task.qrels[example.qid])
    # a query with two relevant documents makes two examples, neither using the other positive as a negative
    other_examples = [e for e in examples if e.task == "other"]
    assert sorted(e.positive_pid for e in other_examples) == ["o1", "o2"]


def test_negatives_are_reproducible_from_the_seed_whatever_else_is_loaded(qmsum):
    task = qmsum[0]
    queries = [(task.name, qid) for qid in list(task.queries)[:20]]
    first = build_examples(queries, NegativeSampler(qmsum, count=8, seed=3), qmsum)
    again = build_examples(list(reversed(queries[5:])), NegativeSampler(qmsum, count=8, seed=3), qmsum)
    assert {e.qid: e.negative_pids for e in first[5:]} == {e.qid: e.negative_pids for e in again}
    other_seed = build_examples(queries, NegativeSampler(qmsum, count=8, seed=4), qmsum)
    assert [e.negative_pids for e in first] != [e.negative_pids for e in other_seed]


def test_small_corpus_gives_fewer_negatives_and_bad_settings_are_refused():
    task = make_task("small", {"a": "x", "b": "y", "c": "z"}, {"q": ("query", ["a"])})
    (example,) = build_examples([("small", "q")], NegativeSampler([task], count=32), [task])
    assert sorted(example.negative_pids) == ["b", "c"]
    with pytest.raises(ValueError, match="negatives kind"):
        NegativeSampler([task], count=2, kind="hard")
    with pytest.raises(ValueError, match="cannot hold out"):
        split_queries([task], heldout=1, max_train=None, seed=0)


def test_bm25_negatives_are_the_lexically_closest_irrelevant_documents():
    documents = {
        "answer": "the committee approved the railway budget for the northern line",
        "close": "the railway budget for the northern line was debated again",
        "middle": "a budget meeting about the kitchen",
        "far": "penguins swim in cold water",
    }
    task = make_task("t", documents, {"q": ("railway budget northern line", ["answer"])})
    (example,) = build_examples([("t", "q")], NegativeSampler([task], count=2, kind="bm25"), [task])
    assert example.negative_pids == ("close", "middle")


def test_bm25_negatives_are_ranked_as_the_bm25_baseline_of_eval_loco():
    from eval.bm25 import BM25Retriever

    documents = {"answer": "the railways budgets were approved", "singular": "a railway budget",
                 "budget": "a budget for the kitchen", "unrelated": "penguins swim in cold water"}
    task = make_task("t", documents, {"q": ("railway budgets", ["answer"])})
    (example,) = build_examples([("t", "q")], NegativeSampler([task], count=3, kind="bm25"), [task])
    # Stemmed as the baseline's analyser: "budgets" matches "budget"; a document sharing no term never ranks.
    assert example.negative_pids == ("singular", "budget")
    ranking = BM25Retriever(show_progress=False).retrieve(task, top_k=4)["q"]
    assert [pid for pid in ranking if pid != "answer"] == list(example.negative_pids)


def test_bm25_rankings_are_kept_in_a_file_named_by_the_data_and_settings(tmp_path):
    documents = {"answer": "the railway budget was approved", "close": "a railway budget for the line",
                 "middle": "the kitchen budget", "far": "penguins swim in cold water"}
    task = make_task("t", documents, {"q": ("railway budget", ["answer"]), "q2": ("penguins", ["far"])})
    path = bm25_rankings_path(tmp_path, [task], count=2)
    assert path.parent == tmp_path and path == bm25_rankings_path(tmp_path, [task], count=2)
    edited = make_task("t", {**documents, "far": "penguins swim in warm water"},
                       {"q": ("railway budget", ["answer"]), "q2": ("penguins", ["far"])})
    assert len({path, bm25_rankings_path(tmp_path, [edited], count=2), bm25_rankings_path(tmp_path, [task], count=3)}) == 3
    write_rankings(path, mine_bm25_rankings([task], count=2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    rankings = read_rankings(path)
    mined = build_examples([("t", "q")], NegativeSampler([task], count=2, kind="bm25"), [task])
    assert build_examples([("t", "q")], NegativeSampler([task], 2, "bm25", rankings=rankings), [task]) == mined
    # the sampler follows the file it is given (a resumed run reads, it does not mine again)
    rankings["t"]["q"] = ["middle", "close"]
    (example,) = build_examples([("t", "q")], NegativeSampler([task], 2, "bm25", rankings=rankings), [task])
    assert example.negative_pids == ("middle", "close")
    path.write_text('{"t": {"q": "close"}}')
    with pytest.raises(ValueError, match=f"{path.name}: expected"):
        read_rankings(path)


def test_document_numbers_and_the_cached_objectives_units():
    tasks = [make_task("a", {"x": "1", "y": "2"}, {"q": ("?", ["x"])}),
             make_task("b", {"x": "3"}, {"q": ("?", ["x"])})]
    texts = TaskTexts(tasks)
    assert sorted(texts.document_number(t, pid) for t, pid in (("a", "x"), ("a", "y"), ("b", "x"))) == [0, 1, 2]
    objective = CachedTripletObjective(scale=20.0, mini_batch_size=2)
    with_negative = RetrievalExample("a", "q", "x", ("y",))
    assert len(objective.units([with_negative])) == 1 and objective.backward_calls(5) == 9  # 3 + 3 + 3
    lonely = RetrievalExample("b", "q", "x", ())
    assert len(objective.units([lonely])) == 1 and objective.backward_calls(5) == 6  # in-batch negatives only
    with pytest.raises(ValueError, match="cached_mnrl needs a negative for every example or for none"):
        objective.units([with_negative, lonely])


def test_pair_and_triplet_layouts():
    example = RetrievalExample("t", "q", "pos", ("n1", "n2", "n3"))
    pairs = labelled_pairs([example])
    assert [(p.pid, p.label) for p in pairs] == [("pos", 1.0), ("n1", 0.0), ("pos", 1.0), ("n2", 0.0),
                                                 ("pos", 1.0), ("n3", 0.0)]  # 1:1 as the authors' data
    once = labelled_pairs([example], repeat_positive=False)
    assert [(p.pid, p.label) for p in once] == [("pos", 1.0), ("n1", 0.0), ("n2", 0.0), ("n3", 0.0)]
    assert [(t.positive_pid, t.negative_pid) for t in triplets([example])] == [("pos", "n1"), ("pos", "n2"),
                                                                              ("pos", "n3")]
    lonely = RetrievalExample("t", "q", "pos", ())
    assert [p.label for p in labelled_pairs([lonely])] == [1.0]
    assert [t.negative_pid for t in triplets([lonely])] == [None]
    units = list(range(50))
    assert shuffled(units, seed=1, epoch=0) == shuffled(units, seed=1, epoch=0) != units
    assert shuffled(units, seed=1, epoch=1) != shuffled(units, seed=1, epoch=0)


def test_batch_plan_gives_each_step_one_contiguous_batch_across_ranks_and_micro_steps():
    plan = BatchPlan(units=100, batch_size=8, micro_batch_size=2, world_size=2, epochs=2, max_steps=None)
    assert (plan.accumulation_steps, plan.steps_per_epoch, plan.total_steps) == (2, 12, 24)
    for step in (0, 5, 12, 23):
        covered = []
        epochs = set()
        for rank in range(2):
            epoch, ranges = plan.micro_batches(step, rank)
            epochs.add(epoch)
            covered.extend(i for r in ranges for i in r)
        within = step % 12
        assert sorted(covered) == list(range(within * 8, within * 8 + 8))
        assert epochs == {step // 12}
    assert BatchPlan(100, 8, 1, 1, epochs=1, max_steps=5).total_steps == 5
    with pytest.raises(ValueError, match="not a multiple"):
        BatchPlan(100, 8, 3, 1, epochs=1, max_steps=None)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchPlan(4, 8, 1, 1, epochs=1, max_steps=None)


def test_no_weight_decay_on_biases_and_layer_norms():
    import torch

    from model import M2BertConfig, M2BertModel

    model = M2BertModel(M2BertConfig.from_preset("m2-bert-tiny"))
    groups = {g["name"]: g for g in parameter_groups(model, OptimizerConfig(weight_decay=0.01,
                                                                           decay_biases_and_norms=False))}
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["base"]["weight_decay"] == 0.01
    assert "embeddings.layer_norm.weight" in undecayed and "pooler.dense.bias" in undecayed
    assert "layers.0.sequence_mixer.long_conv.d_skip" in undecayed
    assert "pooler.dense.weight" not in undecayed and "embeddings.word_embeddings.weight" not in undecayed
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    assert isinstance(groups["base"]["params"][0], torch.nn.Parameter)


def test_shipped_configs_load_and_errors_name_the_key(tmp_path):
    for path in sorted((REPO / "configs").glob("*finetune*.yaml")):
        config = load_config(FinetuneConfig, path)
        assert config.training.global_batch_size % config.training.micro_batch_size == 0, path
        assert not config.optimizer.decay_biases_and_norms and config.optimizer.betas == (0.9, 0.999), path
    with pytest.raises(ConfigError, match=r"finetune_tiny_m2_qmsum.yaml: training\.batch_size was renamed "
                                          r"training\.global_batch_size"):
        load_config(FinetuneConfig, REPO / "configs" / "finetune_tiny_m2_qmsum.yaml", ["training.batch_size=8"])
    with pytest.raises(ConfigError, match="mini_batch_size must be at least 1"):
        load_config(FinetuneConfig, REPO / "configs" / "finetune_minilm_qmsum_opl.yaml", ["loss.mini_batch_size=0"])
    with pytest.raises(ConfigError, match="loss name .triplet."):
        load_config(FinetuneConfig, REPO / "configs" / "finetune_minilm_qmsum_opl.yaml", ["loss.name=triplet"])
    with pytest.raises(ConfigError, match=r"negatives.per_query"):
        load_config(FinetuneConfig, REPO / "configs" / "finetune_minilm_qmsum_opl.yaml", ["negatives.per_query=3"])


def test_m2_export_is_an_m2_checkpoint_and_a_sentence_transformer(tmp_path):
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from model import M2BertConfig, M2BertModel
    from model.encoders import M2_SENTENCE_MODULE, M2Encoder, is_m2_directory, load_encoder, minilm_path
    from model.st_module import M2SentenceEncoder

    assert M2_SENTENCE_MODULE == f"{M2SentenceEncoder.__module__}.{M2SentenceEncoder.__qualname__}"
    torch.manual_seed(0)
    encoder = M2Encoder(M2BertModel(M2BertConfig.from_preset("m2-bert-tiny")).eval())
    encoder.save(tmp_path / "export")
    texts = ["a short query", "a longer document " * 40]
    expected = encoder.encode(texts)
    assert is_m2_directory(tmp_path / "export")
    loaded = load_encoder(str(tmp_path / "export"))
    assert isinstance(loaded, M2Encoder)
    np.testing.assert_allclose(loaded.encode(texts), expected, atol=1e-6)
    np.testing.assert_allclose(M2BertModel.from_pretrained(tmp_path / "export").encode(texts), expected, atol=1e-6)
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "export"), device="cpu").encode(texts), expected,
                               atol=1e-6)
    assert not is_m2_directory(minilm_path())  # other sentence-transformers folders are not M2

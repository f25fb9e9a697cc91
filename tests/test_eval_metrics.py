"""Metrics against hand computation; search against brute force; the embedding cache and sharding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.cache import EmbeddingCache
from eval.metrics import METRICS, evaluate_run, per_query_scores
from eval.protocols import Protocol, split_into_chunks
from eval.search import DocumentVectors, exact_search, faiss_search
from eval.sharding import Shard


def test_ndcg_matches_hand_computation():
    qrels = {"q1": {"d1": 1, "d3": 1}, "q2": {"d9": 1}, "q3": {"d5": 1}}
    run = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7, "d4": 0.1},  # relevant at ranks 2 and 3
           "q3": {f"x{i}": 1.0 - i / 100 for i in range(10)} | {"d5": 0.5}}  # relevant at rank 11
    # nDCG = DCG / ideal DCG with gain 1 / log2(rank + 1).
    q1_dcg = 1 / math.log2(3) + 1 / math.log2(4)
    q1_ideal = 1 + 1 / math.log2(3)
    scores = per_query_scores(qrels, run)
    assert scores["nDCG@10"]["q1"] == pytest.approx(q1_dcg / q1_ideal)
    assert scores["nDCG@1"]["q1"] == 0.0
    assert scores["nDCG@3"]["q1"] == pytest.approx(q1_dcg / q1_ideal)
    assert scores["nDCG@100"]["q3"] == pytest.approx(1 / math.log2(12))
    assert scores["nDCG@10"]["q3"] == 0.0
    assert scores["MRR@10"] == {"q1": pytest.approx(0.5), "q2": 0.0, "q3": 0.0}  # rank 11 is past the cut-off
    assert scores["Recall@10"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert scores["Recall@100"]["q3"] == 1.0
    means = evaluate_run(qrels, run)
    assert set(means) == set(METRICS)
    # q2 has no run: it counts as zero in every mean.
    assert means["nDCG@10"] == pytest.approx(q1_dcg / q1_ideal / 3)
    assert means["Recall@100"] == pytest.approx(2 / 3)


def brute_force(queries, documents: DocumentVectors, top_k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    v = documents.vectors / np.linalg.norm(documents.vectors, axis=1, keepdims=True)
    sims = q @ v.T
    per_doc = np.stack([sims[:, a:b].max(axis=1) for a, b in zip(documents.starts[:-1], documents.starts[1:])], axis=1)
    order = np.argsort(-per_doc, axis=1, kind="stable")[:, :top_k]
    return [[documents.ids[d] for d in row] for row in order], per_doc


@pytest.mark.parametrize("multi_vector", [False, True])
def test_blockwise_search_equals_brute_force(multi_vector):
    rng = np.random.default_rng(0)
    n_docs = 53
    counts = rng.integers(1, 6, n_docs) if multi_vector else np.ones(n_docs, dtype=int)
    documents = DocumentVectors([f"d{i}" for i in range(n_docs)], rng.normal(size=(counts.sum(), 8)),
                                np.concatenate([[0], np.cumsum(counts)]))
    queries = rng.normal(size=(17, 8))
    expected, per_doc = brute_force(queries, documents, 10)
    # Tiny blocks: many merges of the running top-k, blocks cut at document boundaries.
    run = exact_search([f"q{i}" for i in range(17)], queries, documents, top_k=10, query_block=5, vector_block=7)
    for row in range(17):
        ranked = sorted(run[f"q{row}"], key=run[f"q{row}"].get, reverse=True)
        assert ranked == expected[row]
        assert run[f"q{row}"][ranked[0]] == pytest.approx(per_doc[row].max(), abs=1e-6)
    assert len(exact_search(["q"], queries[:1], documents, top_k=1000)["q"]) == n_docs


def test_faiss_search_equals_exact_search():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 4, 30)
    documents = DocumentVectors([f"d{i}" for i in range(30)], rng.normal(size=(counts.sum(), 8)).astype(np.float32),
                                np.concatenate([[0], np.cumsum(counts)]))
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    ids = [f"q{i}" for i in range(6)]
    exact, approximate = exact_search(ids, queries, documents, 5), faiss_search(ids, queries, documents, 5)
    for qid in ids:
        assert list(approximate[qid]) == sorted(exact[qid], key=exact[qid].get, reverse=True)
        assert approximate[qid] == pytest.approx(exact[qid], abs=1e-5)


def test_document_vectors_reject_documents_without_vectors():
    with pytest.raises(ValueError, match="at least one vector"):
        DocumentVectors(["a", "b"], np.zeros((1, 2)), np.array([0, 1, 1]))


def test_chunks_are_token_spans_within_the_length():
    from model import load_tokenizer

    tokenizer = load_tokenizer()
    text = "Meeting notes. " * 200 + "Final words, spoken at the end!"
    protocol = Protocol("chunk-mean", max_length=64, document_prefix="passage: ")
    chunks = protocol.document_inputs(text, tokenizer)
    prefix = tuple(tokenizer("passage: ", add_special_tokens=False)["input_ids"])
    assert all(chunk[:len(prefix)] == prefix and len(chunk) <= 64 - 2 for chunk in chunks)
    pieces = split_into_chunks(text, tokenizer, 20)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [i for piece in pieces for i in piece] == ids and all(len(piece) == 20 for piece in pieces[:-1])
    assert len(pieces) == math.ceil(len(ids) / 20)
    assert split_into_chunks("", tokenizer, 20) == [()]
    assert Protocol("truncate", 64).document_inputs(text, tokenizer) == [text]
    # A span cut inside a word is kept as ids: as text it would tokenize to more tokens than it holds.
    word_cut = split_into_chunks("unbelievably " * 50, tokenizer, 3)
    assert any(len(tokenizer(tokenizer.decode(piece), add_special_tokens=False)["input_ids"]) > 3
               for piece in word_cut)


def test_token_chunks_embed_as_the_text_they_hold():
    import torch

    from model import M2BertConfig, M2BertModel
    from model.encoders import M2Encoder, load_encoder

    torch.manual_seed(0)
    texts = ["a short meeting note", "a longer note about the budget of the design team and its remote control"]
    for padding_mode in ("masked", "reference"):
        encoder = M2Encoder(M2BertModel(M2BertConfig.from_preset("m2-bert-tiny", max_position_embeddings=128,
                                                                 padding_mode=padding_mode)))
        ids = [tuple(encoder.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        np.testing.assert_allclose(encoder.encode_token_ids(ids, batch_size=2), encoder.encode(texts), atol=1e-5)
    with pytest.raises(ValueError, match="longer than the 128 tokens"):
        encoder.encode_token_ids([tuple(range(1000, 1200))])
    with pytest.raises(TypeError, match=r"chunks\[1\] is not a sequence of token ids"):
        encoder.encode_token_ids([(1000, 1001), "a text"])
    assert encoder.encode_token_ids([]).shape == (0, encoder.embedding_dim)
    minilm = load_encoder("all-MiniLM-L6-v2")
    ids = [tuple(minilm.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    np.testing.assert_allclose(minilm.encode_token_ids(ids, batch_size=2), minilm.encode(texts), atol=1e-5)


def test_cache_round_trip_and_shard_files_merge(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    first = EmbeddingCache(tmp_path, writer="shard-00000-of-00002")
    first.store("space", ["a", "b"], vectors[:2])
    second = EmbeddingCache(tmp_path, writer="shard-00001-of-00002")
    second.store("space", ["c"], vectors[2:])
    first.close(), second.close()
    merged = EmbeddingCache(tmp_path)
    found = merged.lookup("space", ["a", "b", "c", "d"])
    assert sorted(found) == ["a", "b", "c"]
    np.testing.assert_array_equal(np.stack([found[k] for k in "abc"]), vectors)
    assert merged.lookup("other space", ["a"]) == {}
    in_memory = EmbeddingCache(None)
    in_memory.store("space", ["a"], vectors[:1])
    assert list(in_memory.lookup("space", ["a", "b"])) == ["a"]


def test_shards_partition_the_texts():
    texts = [f"text {i}" for i in range(200)]
    shards = [Shard(i, 3) for i in range(3)]
    owners = [[shard.owns(text) for shard in shards] for text in texts]
    assert all(sum(row) == 1 for row in owners)
    assert all(any(row[i] for row in owners) for i in range(3))
    assert Shard.parse("2/4") == Shard(2, 4)
    with pytest.raises(ValueError, match="expected INDEX/COUNT"):
        Shard.parse("two")
    with pytest.raises(ValueError, match="0 <= index < count"):
        Shard.parse("4/4")


@pytest.mark.parametrize("n_tasks", [1, 5, 12])
def test_score_chart_labels_do_not_overlap_and_show_one_decimal(n_tasks):
    import re

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from eval.benchmark import TaskResult
    from eval.data import LOCOV1_TASKS
    from eval.report import scores_figure, score_table

    models = ["bm25", "all-MiniLM-L6-v2 (chunk-max, 256)", "m2-bert-80M-32k-retrieval (truncate, 32768)"]
    results = [TaskResult(model, task, 1, 1, {"nDCG@10": (i * 37 + j * 11) % 100 / 100 + 0.004}, 0.0)
               for i, model in enumerate(models) for j, task in enumerate(LOCOV1_TASKS[:n_tasks])]
    figure = scores_figure(score_table(results), "nDCG@10")
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)  # lays out the constrained figure
    (axes,) = figure.axes
    labels = axes.get_xticklabels()
    assert len(labels) == n_tasks + 1  # the tasks and the average
    rotation = math.radians(labels[0].get_rotation())
    if rotation == 0:
        boxes = [label.get_window_extent(renderer) for label in labels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    else:  # parallel slanted lines: apart by the tick spacing times sin(angle), which must exceed a line
        ticks = axes.transData.transform([(x, 0) for x in axes.get_xticks()])[:, 0]
        line_height = 1.2 * labels[0].get_fontsize() * figure.dpi / 72
        assert np.diff(ticks).min() * math.sin(rotation) > line_height
    bar_labels = [text.get_text() for text in axes.texts]
    assert len(bar_labels) == len(models) * (n_tasks + 1)
    assert all(re.fullmatch(r"\d+\.\d", label) for label in bar_labels)

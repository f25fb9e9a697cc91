"""`python -m eval.loco` end to end on the bundled QMSum test split: BM25, MiniLM (truncation and
chunking), a tiny M2 and the authors' checkpoint layout; the embedding cache and sharded runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.cache import EmbeddingCache
from eval.data import LocoTask, load_tasks
from eval.loco import main
from eval.models import ModelSpec, build_retriever
from model.encoders import load_encoder

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_CHECKPOINT = ROOT.parent / "shared" / "conformance" / "m2-bert" / "retrieval"
needs_conformance = pytest.mark.skipif(not AUTHORS_CHECKPOINT.is_dir(), reason="../shared/conformance not present")
CPU = torch.device("cpu")


def run_loco(output_dir: Path, *args: str) -> dict:
    """Run the CLI quietly into `output_dir` and return its results.json."""
    assert main([*args, "--output-dir", str(output_dir), "--quiet"]) == 0
    return json.loads((output_dir / "results.json").read_text())


def scores(results: dict, metric: str = "nDCG@10") -> dict[tuple[str, str], float]:
    return {(r["model"], r["task"]): r["metrics"][metric] for r in results["results"]}


def chance_ndcg_at_10(n_documents: int) -> float:
    """Expected nDCG@10 of a random ranking with one relevant document among `n_documents`."""
    return sum(1 / n_documents / math.log2(rank + 1) for rank in range(1, min(10, n_documents) + 1))


def direct_ndcg_at_10(encoder, task: LocoTask) -> float:
    """nDCG@10 of an encoder on a task computed without eval's cache, search or metrics code."""
    pids = list(task.documents)
    documents = encoder.encode([task.documents[pid] for pid in pids], batch_size=8)
    queries = encoder.encode(list(task.queries.values()), batch_size=8)
    documents /= np.linalg.norm(documents, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    total = 0.0
    for row, qid in enumerate(task.queries):
        (relevant,) = task.qrels[qid]  # QMSum: one relevant meeting per query
        similarities = queries[row] @ documents.T
        rank = 1 + int(np.sum(similarities > similarities[pids.index(relevant)]))
        total += 1 / math.log2(rank + 1) if rank <= 10 else 0.0
    return total / len(task.queries)


def test_bm25_on_the_qmsum_test_split(tmp_path, capsys):
    results = run_loco(tmp_path, "--model", "bm25", "--metrics", "main", "Recall@10", "MRR@10")
    (task,) = load_tasks()
    (row,) = results["results"]
    assert (row["task"], row["n_queries"], row["n_documents"]) == ("qmsum", 281, 35)
    assert row["metrics"]["nDCG@10"] > 2 * chance_ndcg_at_10(35)
    assert row["metrics"]["nDCG@1"] <= row["metrics"]["nDCG@10"] <= row["metrics"]["nDCG@100"]
    assert row["metrics"]["Recall@100"] == 1.0  # 35 documents: everything sharing a word is retrieved
    out = capsys.readouterr().out
    assert "| model | qmsum | Average |" in out and f"| bm25 | {100 * row['metrics']['nDCG@10']:.1f} |" in out
    for metric in ("nDCG@10", "Recall@10", "MRR@10"):  # one table per asked metric, in that order
        assert f"\n{metric} x100, split test\n" in out
        assert f"| bm25 | {100 * row['metrics'][metric]:.1f} | {100 * row['metrics'][metric]:.1f} |" in out
    assert out.index("Recall@10 x100") < out.index("MRR@10 x100")
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert csv[0].startswith("model,task,n_queries,n_documents,main_metric,main,nDCG@1,") and len(csv) == 3
    assert results["settings"]["split"] == "test" and "bm25s" in results["settings"]["versions"]


def test_tiny_m2_matches_a_direct_computation_and_a_cached_rerun_embeds_nothing(tiny_m2, tmp_path):
    args = ["--model", str(tiny_m2), "--max-queries", "50", "--max-documents", "15",
            "--cache-dir", str(tmp_path / "cache")]
    first = run_loco(tmp_path / "first", *args)
    (task,) = [t.subset(max_queries=50, max_documents=15) for t in load_tasks()]
    (row,) = first["results"]
    assert (row["n_queries"], row["n_documents"], row["cached"]) == (len(task.queries), 15, 0)
    assert row["embedded"] == len(task.queries) + 15 and len(task.queries) > 30
    expected = direct_ndcg_at_10(load_encoder(str(tiny_m2)), task)
    assert row["metrics"]["nDCG@10"] == pytest.approx(expected, abs=1e-6)

    again = run_loco(tmp_path / "again", *args)
    (rerun,) = again["results"]
    assert (rerun["embedded"], rerun["cached"]) == (0, row["embedded"])
    assert rerun["metrics"] == pytest.approx(row["metrics"], abs=1e-6)


@needs_conformance
def test_authors_checkpoint_runs_in_reference_mode(tmp_path):
    results = run_loco(tmp_path, "--model", str(AUTHORS_CHECKPOINT), "--max-queries", "30", "--no-cache")
    (model,) = results["models"]
    assert (model["padding_mode"], model["max_length"], model["protocol"]) == ("reference", 256, "truncate")
    (task,) = [t.subset(max_queries=30) for t in load_tasks()]
    expected = direct_ndcg_at_10(load_encoder(str(AUTHORS_CHECKPOINT)), task)
    assert results["results"][0]["metrics"]["nDCG@10"] == pytest.approx(expected, abs=1e-6)


def test_sharded_runs_merge_through_the_cache(tiny_m2, tmp_path, capsys):
    subset = ["--max-queries", "40", "--max-documents", "10"]
    common = ["--model", str(tiny_m2), "--model", "bm25", *subset, "--cache-dir", str(tmp_path / "cache")]
    for shard in ("0/2", "1/2"):
        assert main([*common, "--shard", shard, "--quiet"]) == 0
        assert f"shard {shard}: embeddings are in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.sqlite")) == [
        "shard-00000-of-00002.sqlite", "shard-00001-of-00002.sqlite"]
    merged = run_loco(tmp_path / "merged", *common)
    dense = [r for r in merged["results"] if r["model"] != "bm25"]
    (task,) = [t.subset(max_queries=40, max_documents=10) for t in load_tasks()]
    assert [(r["embedded"], r["cached"]) for r in dense] == [(0, len(task.queries) + 10)]
    unsharded = run_loco(tmp_path / "unsharded", "--model", str(tiny_m2), *subset, "--no-cache")
    assert scores(merged)[dense[0]["model"], "qmsum"] == pytest.approx(scores(unsharded)[dense[0]["model"], "qmsum"])


def test_torchrun_ranks_embed_their_shards_and_rank_0_scores(tiny_m2, tmp_path):
    subset = ["--max-queries", "20", "--max-documents", "8"]
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
               "-m", "eval.loco", "--model", str(tiny_m2), *subset, "--cache-dir", str(tmp_path / "cache"),
               "--output-dir", str(tmp_path / "out"), "--quiet"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("| model | qmsum | Average |") == 1  # only rank 0 reports
    assert len(list((tmp_path / "cache").glob("shard-0000?-of-00002.sqlite"))) == 2
    (task,) = [t.subset(max_queries=20, max_documents=8) for t in load_tasks()]
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert (row["embedded"], row["cached"]) == (0, len(task.queries) + 8)


@pytest.fixture(scope="module")
def minilm_runs(tmp_path_factory) -> tuple[dict, dict]:
    """MiniLM under its three protocols on a QMSum test subset (2 meetings), run twice on one cache."""
    base = tmp_path_factory.mktemp("minilm")
    args = ["--model", "all-MiniLM-L6-v2", "--model", "all-MiniLM-L6-v2:chunk-mean",
            "--model", "all-MiniLM-L6-v2:chunk-max", "--max-queries", "8", "--max-documents", "2",
            "--cache-dir", str(base / "cache")]
    return run_loco(base / "first", *args), run_loco(base / "again", *args)


def test_minilm_truncation_and_chunking_end_to_end(minilm_runs):
    first, _ = minilm_runs
    from eval.protocols import Protocol

    (task,) = [t.subset(max_queries=8, max_documents=2) for t in load_tasks()]
    tokenizer = load_encoder("all-MiniLM-L6-v2").tokenizer
    chunks = {chunk for text in task.documents.values()
              for chunk in Protocol("chunk-mean", 256).document_inputs(text, tokenizer)}
    truncate, chunk_mean, chunk_max = first["results"]
    assert [m["protocol"] for m in first["models"]] == ["truncate", "chunk-mean", "chunk-max"]
    assert all(m["max_length"] == 256 for m in first["models"])
    assert (truncate["embedded"], truncate["cached"]) == (len(task.queries) + 2, 0)
    # Chunking reuses the queries' vectors; chunk-max reuses chunk-mean's chunk vectors.
    assert (chunk_mean["embedded"], chunk_mean["cached"]) == (len(chunks), len(task.queries))
    assert (chunk_max["embedded"], chunk_max["cached"]) == (0, len(chunks) + len(task.queries))
    assert len(chunks) > 2 * 10  # the meetings are long: many chunks each
    for row in (truncate, chunk_mean, chunk_max):
        assert row["n_queries"] == len(task.queries) and 0 < row["metrics"]["nDCG@10"] <= 1


def test_cached_minilm_rerun_embeds_nothing(minilm_runs):
    first, again = minilm_runs
    assert [r["embedded"] for r in again["results"]] == [0, 0, 0]
    assert scores(again) == pytest.approx(scores(first))


def test_chunk_protocols_aggregate_the_chunk_embeddings(tmp_path):
    encoder = load_encoder("all-MiniLM-L6-v2")
    text = " ".join(load_tasks()[0].documents.values())[:6000]
    task = LocoTask("one", "test", {"d": text}, {"q": "a question"}, {"q": {"d": 1}}, "memory")
    cache = EmbeddingCache(None)
    mean = build_retriever(ModelSpec("all-MiniLM-L6-v2", "chunk-mean"), cache, CPU, show_progress=False)
    best = build_retriever(ModelSpec("all-MiniLM-L6-v2", "chunk-max"), cache, CPU, show_progress=False)
    chunks = mean.protocol.document_inputs(text, encoder.tokenizer)
    assert len(chunks) > 2
    chunk_vectors = encoder.encode_token_ids(chunks)
    np.testing.assert_allclose(mean.embed_documents(task, ["d"]).vectors, chunk_vectors.mean(axis=0, keepdims=True), atol=1e-5)
    maxed = best.embed_documents(task, ["d"])
    np.testing.assert_allclose(maxed.vectors, chunk_vectors, atol=1e-5)
    assert list(maxed.starts) == [0, len(chunks)]


def test_prefixes_reach_the_encoder(tiny_m2, tmp_path):
    (task,) = [t.subset(max_queries=3, max_documents=2) for t in load_tasks()]
    spec = ModelSpec(str(tiny_m2), query_prefix="query: ", document_prefix="passage: ")
    retriever = build_retriever(spec, EmbeddingCache(None), CPU, show_progress=False)
    encoder = retriever.encoder
    np.testing.assert_allclose(retriever.embed_queries(task, list(task.queries)),
                               encoder.encode(["query: " + q for q in task.queries.values()]), atol=1e-5)
    np.testing.assert_allclose(retriever.embed_documents(task, list(task.documents)).vectors,
                               encoder.encode(["passage: " + d for d in task.documents.values()]), atol=1e-5)


def test_config_file_and_model_specs(tmp_path, capsys):
    from eval.loco import _settings, build_parser

    args = build_parser().parse_args(["--config", str(ROOT / "configs" / "eval_baselines.yaml"), "--model", "bm25:x"])
    settings, specs, sources = _settings(args)
    assert [s.display_name for s in specs] == ["bm25", "all-MiniLM-L6-v2 (truncate)", "all-MiniLM-L6-v2 (chunk-mean)",
                                               "all-MiniLM-L6-v2 (chunk-max)", "bm25:x (truncate)"]
    assert sources[1].endswith("eval_baselines.yaml, models[1]") and sources[4] == "--model"
    assert settings["split"] == "test" and settings["top_k"] == 100
    assert ModelSpec.parse("/models/a:b:chunk-max") == ModelSpec("/models/a:b", "chunk-max")
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  - {model: bm25, protocl: chunk-mean}\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config)])
    assert "unknown key(s) ['protocl']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "all-MiniLM-L6-v2", "--model", "all-MiniLM-L6-v2:truncate"])
    assert "several models are labelled ['all-MiniLM-L6-v2 (truncate)']" in capsys.readouterr().err


def test_cli_errors_and_task_listing(tmp_path, capsys):
    assert main(["--model", "bm25", "--tasks", "qmsum", "gov_report"]) == 2
    assert "unknown task(s) ['gov_report']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:
        main(["--model", str(tmp_path / "no-model"), "--cache-dir", str(tmp_path / "cache")])
    assert exit_status.value.code == 2
    assert f"--model: model '{tmp_path / 'no-model'}': no such directory" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    assert main(["--list-tasks", "--split", "train"]) == 0
    assert capsys.readouterr().out.startswith("qmsum\t1257 queries\t162 documents")

"""Our models under mteb's evaluator and LoCo as mteb tasks: the same scores as `eval.loco`."""

from __future__ import annotations

import json
from pathlib import Path

import mteb
import pytest

from eval.loco import main
from eval.mteb_models import LocoChunkMaxSearch, LocoEncoder, loco_model
from eval.mteb_tasks import LOCOV1_MTEB_TASKS, LoCoQMSumBundledRetrieval, loco_tasks

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_CHECKPOINT = ROOT.parent / "shared" / "conformance" / "m2-bert" / "retrieval"
needs_conformance = pytest.mark.skipif(not AUTHORS_CHECKPOINT.is_dir(), reason="../shared/conformance not present")


def loco_scores(output_dir: Path, *args: str, cache: Path | None = None) -> dict[str, dict[str, float]]:
    """eval.loco's metrics per model label (one task)."""
    caching = ["--cache-dir", str(cache)] if cache else ["--no-cache"]
    assert main([*args, *caching, "--quiet", "--output-dir", str(output_dir)]) == 0
    results = json.loads((output_dir / "results.json").read_text())["results"]
    return {r["model"]: r["metrics"] for r in results}


def mteb_scores(model, tasks) -> dict:
    """mteb's scores of the first split of the one task (no result cache, nothing downloaded)."""
    result = mteb.evaluate(model, tasks, cache=None, co2_tracker=False, show_progress_bar=False,
                           encode_kwargs={"batch_size": 16})
    (task_result,) = result.task_results
    (split_scores,) = task_result.scores["test"]
    return split_scores


def test_mteb_and_eval_loco_agree_on_the_bundled_qmsum_task(tiny_m2, tmp_path):
    cache = tmp_path / "cache"
    ours = loco_scores(tmp_path / "out", "--model", "all-MiniLM-L6-v2", "--model", str(tiny_m2), cache=cache)
    for spec, label in (("all-MiniLM-L6-v2", "all-MiniLM-L6-v2 (truncate, 256)"), (str(tiny_m2), "tiny-m2 (truncate, 512)")):
        model = loco_model(spec, cache_dir=cache)
        assert isinstance(model, LocoEncoder) and isinstance(model, mteb.models.EncoderProtocol)
        scores = mteb_scores(model, [LoCoQMSumBundledRetrieval()])
        # mteb hands the encoder the very inputs eval.loco gave it (all found in eval.loco's cache) ...
        assert model.retriever.counts.embedded == 0 and model.retriever.counts.cached == 281 + 35
        # ... and mteb's own search and metrics give nDCG@10 within 0.1 point of eval.loco's.
        assert scores["main_score"] == scores["ndcg_at_10"]
        assert abs(100 * scores["ndcg_at_10"] - 100 * ours[label]["nDCG@10"]) <= 0.1, (spec, scores["ndcg_at_10"])
        assert abs(scores["recall_at_10"] - ours[label]["Recall@10"]) <= 1e-3
    assert model.mteb_model_meta.name == "local/tiny-m2"
    assert dict(model.mteb_model_meta.experiment_kwargs) == {"protocol": "truncate", "max_length": 512,
                                                             "padding_mode": "masked"}


def test_chunk_max_is_a_search_model_with_the_same_scores(tiny_m2, tmp_path):
    subset = {"max_queries": 30, "max_documents": 8}
    # Uncached on both sides: mteb's run embeds on its own.
    ours = loco_scores(tmp_path, "--model", f"{tiny_m2}:chunk-max", "--model", f"{tiny_m2}:chunk-mean",
                       "--max-queries", "30", "--max-documents", "8")
    chunk_max = loco_model(f"{tiny_m2}:chunk-max")
    assert isinstance(chunk_max, LocoChunkMaxSearch) and isinstance(chunk_max, mteb.models.SearchProtocol)
    scores = mteb_scores(chunk_max, loco_tasks(**subset))
    assert scores["ndcg_at_10"] == pytest.approx(ours["tiny-m2 (chunk-max, 512)"]["nDCG@10"], abs=1e-3)
    chunk_mean = loco_model(str(tiny_m2), protocol="chunk-mean")
    scores = mteb_scores(chunk_mean, loco_tasks(**subset))
    assert scores["ndcg_at_10"] == pytest.approx(ours["tiny-m2 (chunk-mean, 512)"]["nDCG@10"], abs=1e-3)
    with pytest.raises(ValueError, match="mteb's encoder protocol cannot"):
        LocoEncoder(f"{tiny_m2}:chunk-max")
    with pytest.raises(ValueError, match="bm25 has nothing to embed"):
        loco_model("bm25")


def test_locov1_tasks_read_a_local_copy(tmp_path):
    import gzip

    # A LoCoV1-style folder (no split column: the test split), with one of LoCoV1's task names.
    source = ROOT / "eval" / "data" / "qmsum"
    for name in ("documents", "queries"):
        with gzip.open(source / f"{name}.jsonl.gz", "rt") as lines:
            rows = [json.loads(line) for line in lines]
        rows = [row for row in rows if row.get("split") == "test"][:40 if name == "queries" else None]
        for row in rows:
            row.pop("split")
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert len(LOCOV1_MTEB_TASKS) == 12 and LOCOV1_MTEB_TASKS["qmsum"].metadata.name == "LoCoV1QMSumRetrieval"
    (task,) = loco_tasks(str(tmp_path), ["qmsum"], max_documents=10)
    task.load_data()
    split = task.dataset["default"]["test"]
    assert len(split["corpus"]) == 10 and set(split["queries"]["id"]) == set(split["relevant_docs"])
    with pytest.raises(ValueError, match="not LoCoV1 task"):
        loco_tasks("hf", ["qmsun"])


@needs_conformance
def test_authors_checkpoint_in_mteb_runs_in_reference_mode(tmp_path):
    ours = loco_scores(tmp_path, "--model", str(AUTHORS_CHECKPOINT), "--max-queries", "20", "--max-documents", "6")
    model = loco_model(str(AUTHORS_CHECKPOINT))
    assert model.mteb_model_meta.experiment_kwargs["padding_mode"] == "reference"
    scores = mteb_scores(model, loco_tasks(max_queries=20, max_documents=6))
    (label,) = ours
    assert scores["ndcg_at_10"] == pytest.approx(ours[label]["nDCG@10"], abs=1e-3)

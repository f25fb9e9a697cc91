"""Retrieval metrics through pytrec_eval (trec_eval's own implementation, as BEIR uses).

A run maps qid -> {pid: score}; qrels map qid -> {pid: grade}. Scores are fractions in [0, 1]
averaged over every query of the qrels: a query the run does not answer counts as 0.
"""

from __future__ import annotations

import pytrec_eval

HEADLINE_METRIC = "nDCG@10"
# Our name -> the trec_eval measure it reads.
_TREC_MEASURES = {
    "nDCG@1": "ndcg_cut_1",
    "nDCG@3": "ndcg_cut_3",
    "nDCG@5": "ndcg_cut_5",
    "nDCG@10": "ndcg_cut_10",
    "nDCG@100": "ndcg_cut_100",
    "Recall@10": "recall_10",
    "Recall@100": "recall_100",
}
MRR_CUTOFF = 10
METRICS = (*_TREC_MEASURES, f"MRR@{MRR_CUTOFF}")

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def per_query_scores(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """metric name -> {qid: score} for every query of `qrels` (0 where the run has nothing)."""
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,3,5,10,100", "recall.10,100"})
    measured = evaluator.evaluate(run)
    # trec_eval's reciprocal rank has no cut-off: MRR@10 is its value on each query's top 10, ranked as
    # trec_eval ranks (score, then document id, both descending).
    top = {qid: dict(sorted(ranked.items(), key=lambda item: (item[1], item[0]), reverse=True)[:MRR_CUTOFF])
           for qid, ranked in run.items()}
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top)
    scores = {name: {qid: measured.get(qid, {}).get(measure, 0.0) for qid in qrels}
              for name, measure in _TREC_MEASURES.items()}
    scores[f"MRR@{MRR_CUTOFF}"] = {qid: reciprocal.get(qid, {}).get("recip_rank", 0.0) for qid in qrels}
    return scores


def evaluate_run(qrels: Qrels, run: Run) -> dict[str, float]:
    """Mean of each metric in `METRICS` over the queries of `qrels`."""
    if not qrels:
        raise ValueError("no queries to evaluate")
    return {name: sum(values.values()) / len(values) for name, values in per_query_scores(qrels, run).items()}

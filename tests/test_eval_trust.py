"""`python -m eval.loco` on hostile or broken inputs: it runs no code from a model folder unless asked,
gives the same numbers for the same inputs (and re-embeds when the code changes), refuses NaN
embeddings by name, checks every model before any work, and keeps the other models' results when one
fails. Each test builds its input itself and runs the real command (a subprocess or `main()`)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model_trust import minilm_copy, with_custom_module

from eval.benchmark import TaskResult
from eval.loco import main
from eval.report import full_table, scores_figure
from model import M2BertConfig, M2BertForMaskedLM, M2BertModel
from model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["--max-queries", "6", "--max-documents", "3"]


def loco(*args, cwd: Path, pythonpath: str = str(ROOT)) -> subprocess.CompletedProcess:
    """`python -m eval.loco ARGS` in a fresh process in `cwd`, importing the code on `pythonpath`."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    # Not run from the checkout: `python -m` would put the working directory first on the path.
    return subprocess.run([sys.executable, "-m", "eval.loco", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_results(output_dir: Path, *args) -> dict:
    """`main()` quietly into `output_dir` (it must succeed); its results.json."""
    assert main([*map(str, args), "--output-dir", str(output_dir), "--quiet"]) == 0
    return json.loads((output_dir / "results.json").read_text())


def cached_vectors(cache: Path) -> list[np.ndarray]:
    vectors = []
    for path in cache.glob("*.sqlite"):
        with sqlite3.connect(path) as connection:
            vectors += [np.frombuffer(blob, dtype=np.float32) for (blob,) in connection.execute(
                "SELECT vector FROM embeddings")]
    return vectors


@pytest.fixture()
def unreadable_data(tmp_path) -> Path:
    """A LoCo data folder that fails to load: an error about a model, not this, shows the data was not read."""
    folder = tmp_path / "unreadable-data"
    folder.mkdir()
    (folder / "documents.jsonl").write_text("{not json\n")
    (folder / "queries.jsonl").write_text("{not json\n")
    return folder


# --- 1. No code runs from a model folder unless the user asks -------------------------------------------

def test_a_folder_naming_its_own_module_is_refused_and_runs_only_with_trust_remote_code(tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = with_custom_module(minilm_copy(tmp_path / "evil"), marker)
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--model", folder, *SUBSET, "--output-dir", out, "--cache-dir", cache, "--quiet"]
    with pytest.raises(SystemExit) as exit_status:
        main(list(map(str, common)))
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert f"--model: {folder}: modules.json names module(s) ['modeling_evil.Evil']" in err
    assert "(--trust-remote-code) if you trust this folder" in err
    assert not marker.exists() and not out.exists() and not cache.exists()

    # A fresh process: the module name may already be imported in this one (tests/test_model_trust.py).
    trusted = loco(*common, "--trust-remote-code", cwd=tmp_path)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.read_text() == "the folder's code ran"
    (model,) = json.loads((out / "results.json").read_text())["models"]
    assert model["trust_remote_code"] is True and "error" not in model


def test_trust_is_given_per_model_in_a_config_and_the_mteb_wrapper_refuses_the_same(tmp_path, capsys):
    from eval.loco import _model_problems, _settings, build_parser
    from eval.mteb_models import loco_model

    marker = tmp_path / "marker"
    folder = with_custom_module(minilm_copy(tmp_path / "evil"), marker)
    config = tmp_path / "models.yaml"
    config.write_text(f"models:\n  - bm25\n  - {{model: {folder}, trust_remote_code: true}}\n")
    settings, specs, sources = _settings(build_parser().parse_args(["--config", str(config)]))
    assert [spec.trust_remote_code for spec in specs] == [False, True] and _model_problems(specs, sources) == []

    config.write_text(f"models:\n  - bm25\n  - {{model: {folder}}}\n")
    with pytest.raises(SystemExit) as exit_status:
        main(["--config", str(config), "--cache-dir", str(tmp_path / "cache")])
    assert exit_status.value.code == 2
    assert f"{config}, models[1]: {folder}: modules.json names module(s) ['modeling_evil.Evil']" in capsys.readouterr().err
    with pytest.raises(PermissionError, match=r"evil: modules.json names module\(s\) \['modeling_evil.Evil'\]"):
        loco_model(str(folder), cache_dir=tmp_path / "mteb-cache")
    assert not marker.exists() and not (tmp_path / "cache").exists() and not (tmp_path / "mteb-cache").exists()


# --- 2. The same inputs give the same numbers ------------------------------------------------------------

def test_a_pretraining_export_scores_the_same_in_every_run_and_from_the_cache(tmp_path):
    """Its pooler is not in the checkpoint: it must not come from the random state of the process."""
    torch.manual_seed(0)
    M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(tmp_path / "mlm")
    args = ["--model", tmp_path / "mlm", "--max-queries", "20", "--max-documents", "10"]
    cache = ["--cache-dir", tmp_path / "cache"]
    rows = []
    for seed, caching in ((1, ["--no-cache"]), (2, ["--no-cache"]), (3, cache), (4, cache)):
        torch.manual_seed(seed)  # a different global random state before every run
        rows.append(run_results(tmp_path / f"run-{seed}", *args, *caching)["results"][0])
    assert [row["metrics"] for row in rows[1:]] == [rows[0]["metrics"]] * 3  # exactly equal
    assert rows[2]["embedded"] == rows[3]["cached"] == 30 and rows[3]["embedded"] == 0


def test_changed_model_code_is_not_served_vectors_of_the_old_code(tiny_m2, tmp_path):
    """The cache space holds a fingerprint of the `model` package that computes the vectors: a copy of the
    code gives the cached vectors back; edit one line of it and everything is embedded anew."""
    source = tmp_path / "src"
    for package in ("model", "csrc"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    args = ["--model", tiny_m2, *SUBSET, "--cache-dir", tmp_path / "cache", "--quiet"]
    first = run_results(tmp_path / "first", *args)  # this checkout's code

    def run_copy(name: str) -> dict:
        finished = loco(*args, "--output-dir", tmp_path / name, cwd=tmp_path,
                        pythonpath=f"{source}{os.pathsep}{ROOT}")
        assert finished.returncode == 0, finished.stderr[-2000:]
        return json.loads((tmp_path / name / "results.json").read_text())

    same_code = run_copy("same-code")
    texts = first["results"][0]["embedded"]
    assert (same_code["results"][0]["embedded"], same_code["results"][0]["cached"]) == (0, texts)
    modeling = source / "model" / "modeling_m2_bert.py"
    modeling.write_text(modeling.read_text() + "\n# a changed implementation\n")
    changed = run_copy("changed-code")
    assert (changed["results"][0]["embedded"], changed["results"][0]["cached"]) == (texts, 0)
    assert changed["models"][0]["code"]["source"] != first["models"][0]["code"]["source"]
    assert changed["models"][0]["cache_space"] != first["models"][0]["cache_space"]
    assert first["models"][0]["code"]["version"] and "torch" in first["models"][0]["libraries"]


def toy_task(folder: Path, queries: dict[str, str]) -> Path:
    """A LoCo-format task `toy` with three documents, each query's answer the first."""
    folder.mkdir()
    documents = {"d1": "the committee agreed on the budget", "d2": "a long meeting about the remote control",
                 "d3": "marketing presented the trend watching results"}
    (folder / "documents.jsonl").write_text("".join(
        json.dumps({"pid": pid, "passage": text, "dataset": "toy", "split": "test"}) + "\n"
        for pid, text in documents.items()))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"qid": qid, "query": text, "answer_pids": ["d1"], "dataset": "toy", "split": "test"}) + "\n"
        for qid, text in queries.items()))
    return folder


def test_an_encoder_giving_nan_is_refused_naming_the_text_and_the_other_models_are_scored(tmp_path, capsys):
    """A finite checkpoint whose one huge weight (3e38, a word's embedding) overflows in fp32 for the texts
    holding that word: those embed to NaN, the others to plausible vectors."""
    torch.manual_seed(0)
    model_dir = tmp_path / "overflowing-m2"
    M2BertModel(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    state["embeddings.word_embeddings.weight"][load_tokenizer().convert_tokens_to_ids("zebra"), 0] = 3e38
    save_file(state, str(model_dir / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in state.values())  # the loader's check passes
    data = toy_task(tmp_path / "data", {"q1": "what did the committee agree on", "q2": "where did the zebra go",
                                        "q3": "who presented the trends"})
    out, cache = tmp_path / "out", tmp_path / "cache"
    status = main(["--data", str(data), "--model", "bm25", "--model", str(model_dir), "--cache-dir", str(cache),
                   "--output-dir", str(out), "--quiet"])
    assert status == 1
    results = json.loads((out / "results.json").read_text())
    expected = ("NonFiniteEmbeddingError: overflowing-m2 (truncate, 512): the embedding of task 'toy' query 'q2' "
                "('where did the zebra go') holds NaN or infinity (1 of 3 vectors in this batch do)")
    assert results["failed"]["overflowing-m2 (truncate, 512)"].startswith(expected)
    assert [(r["model"], r["task"]) for r in results["results"]] == [("bm25", "toy")]
    assert expected in capsys.readouterr().err
    assert cached_vectors(cache) == []  # the batch holding the NaN was not cached


# --- 3. Bad input gets a clear error before work starts; a failing model does not discard the others ----

def test_a_typo_in_the_last_model_fails_before_the_data_is_read_or_a_model_runs(unreadable_data, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_status:
        main(["--data", str(unreadable_data), "--model", "bm25", "--model", "all-MiniLM-L6-v2",
              "--model", "all-MiniLM-L6-v2:chunk-maxx", "--cache-dir", str(cache), "--output-dir", str(out)])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert ("bad input, nothing was run:\n  --model: model 'all-MiniLM-L6-v2:chunk-maxx': no such directory, and "
            "not a known name; a model is NAME[:PROTOCOL], NAME one of bm25, all-MiniLM-L6-v2 or a model directory, "
            "PROTOCOL one of truncate, chunk-mean, chunk-max") in err
    assert "documents.jsonl" not in err and not out.exists() and not cache.exists()


def bad_m2_config(tmp_path: Path, tiny_m2: Path) -> Path:
    folder = shutil.copytree(tiny_m2, tmp_path / "wide-m2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 65536}))
    return folder


@pytest.mark.parametrize("models, message", [
    (["{model: all-MiniLM-L6-v2, max_length: '128'}"],
     "models[0]: model 'all-MiniLM-L6-v2': max_length must be a positive integer, got '128'"),
    (["bm25", "{model: all-MiniLM-L6-v2, protocol: chunk-maxx}"],
     "models[1]: model 'all-MiniLM-L6-v2': unknown protocol 'chunk-maxx'; expected one of truncate, chunk-mean, "
     "chunk-max"),
    (["{model: all-MiniLM-L6-v2, trust_remote_code: 'yes'}"], "trust_remote_code must be true or false, got 'yes'"),
    (["{model: EMPTY}"], "models[0]: model 'EMPTY': the directory has neither config.json nor modules.json"),
    (["bm25", "WIDE_M2"], "models[1]: WIDE_M2/config.json: M2BertConfig: hidden_size=65536 is out of range"),
    (["{model: TINY_M2, max_length: 1024}"], "models[0]: model 'TINY_M2' reads at most 512 tokens; max_length=1024"),
])
def test_every_model_spec_is_checked_before_any_work(unreadable_data, tiny_m2, tmp_path, capsys, models, message):
    paths = {"EMPTY": tmp_path / "empty", "WIDE_M2": bad_m2_config(tmp_path, tiny_m2), "TINY_M2": tiny_m2}
    paths["EMPTY"].mkdir()
    for name, path in paths.items():
        models = [entry.replace(name, str(path)) for entry in models]
        message = message.replace(name, str(path))
    config = tmp_path / "models.yaml"
    config.write_text("models:\n" + "".join(f"  - {entry}\n" for entry in models))
    with pytest.raises(SystemExit) as exit_status:
        main(["--config", str(config), "--data", str(unreadable_data), "--cache-dir", str(tmp_path / "cache")])
    assert exit_status.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("setting, message", [
    ("top_k: 0", "top_k must be a positive integer, got 0"),
    ("batch_size: '8'", "batch_size must be a positive integer, got '8'"),
    ("search: fast", "search must be one of exact, faiss, got 'fast'"),
    ("tasks: qmsum", "tasks must be a list of task names, got 'qmsum'"),
])
def test_run_settings_of_a_config_are_checked_before_any_work(unreadable_data, tmp_path, capsys, setting, message):
    config = tmp_path / "run.yaml"
    config.write_text(f"models: [bm25]\n{setting}\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--data", str(unreadable_data)])
    assert f"{config}: {message}" in capsys.readouterr().err


def test_an_output_folder_holding_an_earlier_run_is_not_overwritten_unless_asked(tmp_path, capsys):
    out = tmp_path / "out"
    first = run_results(out, "--model", "bm25", *SUBSET)
    earlier = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exit_status:
        main(["--model", "bm25", "--max-queries", "3", "--output-dir", str(out), "--quiet"])
    assert exit_status.value.code == 2
    assert f"--output-dir {out} already holds an earlier run's results.json, results.csv, scores.png" in \
        capsys.readouterr().err
    assert (out / "results.json").read_bytes() == earlier
    again = run_results(out, "--model", "bm25", "--max-queries", "3", "--overwrite")
    assert again["results"][0]["n_queries"] == 3 != first["results"][0]["n_queries"]


def test_a_model_failing_at_run_time_leaves_the_others_results_and_exits_1(tiny_m2, tmp_path, capsys):
    broken = shutil.copytree(tiny_m2, tmp_path / "truncated-m2")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out, cache = tmp_path / "out", tmp_path / "cache"
    models = ["--model", "bm25", "--model", str(broken), "--model", str(tiny_m2)]
    status = main([*models, *SUBSET, "--cache-dir", str(cache), "--output-dir", str(out), "--quiet"])
    assert status == 1
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in results["models"]] == ["bm25", "truncated-m2 (truncate)", "tiny-m2 (truncate, 512)"]
    error = results["failed"]["truncated-m2 (truncate)"]
    assert error.startswith(f"ValueError: {weights}: cannot read weights") and "truncated or corrupt" in error
    assert list(results["failed"]) == ["truncated-m2 (truncate)"] and results["models"][1]["error"] == error
    assert [r["model"] for r in results["results"]] == ["bm25", "tiny-m2 (truncate, 512)"]
    assert results["averages"]["truncated-m2 (truncate)"]["main"] is None
    assert results["averages"]["tiny-m2 (truncate, 512)"]["main"] == results["results"][1]["metrics"]["nDCG@10"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    failed_rows = [(row["task"], row["main"], row["error"]) for row in rows if row["model"] == "truncated-m2 (truncate)"]
    assert failed_rows == [("qmsum", "", error), ("Average", "", error)]
    assert "| truncated-m2 (truncate) | – | – |" in captured.out
    assert f"1 model(s) failed (the outputs record their errors):\n  truncated-m2 (truncate): {error}" in captured.err
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    figure = scores_figure(full_table([TaskResult(**r) for r in results["results"]], results["models"],
                                      results["settings"]), "nDCG@10")  # what scores.png shows
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == [
        "bm25", "truncated-m2 (truncate) (failed)", "tiny-m2 (truncate, 512)"]

    # A sharded run goes on past the broken model too, and says so in its exit status.
    assert main([*models, *SUBSET, "--cache-dir", str(cache), "--shard", "0/1", "--quiet"]) == 1
    assert f"truncated-m2 (truncate): {error}" in capsys.readouterr().err

"""Retrieval fine-tuning end to end, through the command line under real DeepSpeed on CPU: the tiny M2 and
all-MiniLM-L6-v2 learn on a QMSum training subset, exports load everywhere, peak memory does not grow with
the number of negatives (OPL) or the batch (cached MNRL), and a stopped-and-resumed two-process cached-MNRL
run matches an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.distributed import free_port
from train.logging_utils import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "finetune_tiny_m2_qmsum.yaml"
MINILM_CONFIG = REPO / "configs" / "finetune_minilm_qmsum_opl.yaml"
TEXTS = ["The committee agreed on the budget for the remote control.",
         "Speaker A: okay, so we are recording. Speaker B: the XML format links the transcripts."]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A tiny M2-BERT as pretraining exports it (an `M2BertForMaskedLM` directory)."""
    from model import M2BertConfig, M2BertForMaskedLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("pretrained") / "tiny"
    M2BertForMaskedLM(M2BertConfig.from_preset("m2-bert-tiny")).save_pretrained(directory)
    return directory


def run_finetune(config: Path, overrides: list[str], *flags: str, processes: int = 1,
                 timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the CLI: `python -m train.finetune`, or the `deepspeed` launcher for several processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if processes == 1:
        command = [sys.executable, "-m", "train.finetune"]
    else:
        command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(processes),
                   "--master_port", str(free_port()), str(REPO / "train" / "finetune.py")]
    command += ["--config", str(config), *overrides, *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def finetune(config: Path, overrides: list[str], *flags: str, processes: int = 1, timeout: int = 300) -> dict:
    """Run the CLI (`run_finetune`) and return its summary.json."""
    result = run_finetune(config, overrides, *flags, processes=processes, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    output_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output.dir=")))
    return json.loads((output_dir / "summary.json").read_text())


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def first_and_last_quarter(run_dir: Path, key: str) -> tuple[float, float]:
    """Means of a logged training metric over the first and the last quarter of the steps."""
    values = [r[key] for r in read_metrics(run_dir, "train")]
    quarter = len(values) // 4
    return float(np.mean(values[:quarter])), float(np.mean(values[-quarter:]))


def assert_heldout_improved(summary: dict, margin_gain: float) -> None:
    """The held-out OPL loss falls and the held-out cosine margin rises by at least `margin_gain` (runs
    that learn nothing move it by about +-0.03: docs/finetuning.md)."""
    before, after = summary["eval_initial"], summary["eval"]
    assert after["loss"] < before["loss"] - 0.02, (before, after)
    assert after["margin"] > before["margin"] + margin_gain, (before, after)


def assert_logged(run_dir: Path) -> None:
    assert (run_dir / "curves.png").stat().st_size > 0
    assert any((run_dir / "tensorboard").iterdir())


def test_tiny_m2_learns_and_its_export_loads_as_m2_encoder_and_sentence_transformer(tiny_export, tmp_path):
    from sentence_transformers import SentenceTransformer

    from model import M2BertModel
    from model.encoders import M2Encoder, load_encoder

    run_dir = tmp_path / "run"
    summary = finetune(TINY_CONFIG, [f"model.name_or_path={tiny_export}", f"output.dir={run_dir}"])
    assert summary["finished"] and summary["loss"] == "opl"
    first_loss, last_loss = first_and_last_quarter(run_dir, "loss")
    first_margin, last_margin = first_and_last_quarter(run_dir, "margin")
    assert last_loss < first_loss - 0.05 and last_margin > first_margin + 0.1, (first_loss, last_loss,
                                                                               first_margin, last_margin)
    # Held-out queries ask about the slice's meetings too: the model must have learnt which words of a
    # query point to which meeting, not the training queries themselves (about +0.06 to +0.10 here).
    assert_heldout_improved(summary, margin_gain=0.04)
    assert_logged(run_dir)

    final = Path(summary["export"])
    encoder = load_encoder(str(final))
    assert isinstance(encoder, M2Encoder)
    expected = encoder.encode(TEXTS)
    np.testing.assert_allclose(M2BertModel.from_pretrained(final).encode(TEXTS), expected, atol=1e-5)
    pipeline = SentenceTransformer(str(final), device="cpu")
    np.testing.assert_allclose(pipeline.encode(TEXTS), expected, atol=1e-5)
    # the export holds the trained weights, not the pretraining export's
    assert not np.allclose(M2BertModel.from_pretrained(tiny_export).encode(TEXTS), expected, atol=1e-3)


def test_minilm_learns_and_exports_a_sentence_transformer(tmp_path):
    from sentence_transformers import SentenceTransformer

    from model.encoders import SentenceTransformerEncoder, load_encoder

    run_dir = tmp_path / "run"
    # One positive pair per query (the cosines start near 1 / (1 + negatives), the best constant), so
    # that the few steps go into telling documents apart rather than into raising every cosine.
    summary = finetune(MINILM_CONFIG, [
        f"output.dir={run_dir}", "data.max_documents=16", "data.max_queries=null", "data.heldout_queries=32",
        "data.query_max_length=64", "data.document_max_length=128", "negatives.per_positive=4",
        "loss.repeat_positive=false", "training.global_batch_size=8", "training.max_steps=20",
        "training.eval_every=100", "optimizer.lr=1e-4"])
    assert summary["finished"]
    assert_heldout_improved(summary, margin_gain=0.03)
    assert_logged(run_dir)

    final = Path(summary["export"])
    encoder = load_encoder(str(final))
    assert isinstance(encoder, SentenceTransformerEncoder)
    np.testing.assert_allclose(SentenceTransformer(str(final), device="cpu").encode(TEXTS), encoder.encode(TEXTS),
                               atol=1e-5)
    assert not np.allclose(load_encoder("all-MiniLM-L6-v2").encode(TEXTS), encoder.encode(TEXTS), atol=1e-4)


def test_peak_memory_does_not_grow_with_the_number_of_negatives(tiny_export, tmp_path):
    common = [f"model.name_or_path={tiny_export}", "data.max_documents=null", "data.heldout_queries=0",
              "data.query_max_length=512",
              "data.document_max_length=512", "training.checkpoint_every=1000", "output.tensorboard=false"]

    def peak(name: str, negatives: int, micro_batch_size: int, steps: int) -> int:
        summary = finetune(TINY_CONFIG, [*common, f"output.dir={tmp_path / name}",
                                         f"negatives.per_positive={negatives}",
                                         f"training.micro_batch_size={micro_batch_size}",
                                         f"training.global_batch_size={micro_batch_size * 4}"], "--stop-after-steps",
                           str(steps))
        return summary["peak_memory_bytes"]

    one = peak("one", negatives=1, micro_batch_size=1, steps=3)
    many = peak("many", negatives=32, micro_batch_size=1, steps=3)
    assert many <= 1.1 * one, (one, many)
    # The measurement can tell: embedding the 33 pairs of a query together (one micro-step) costs more.
    batched = peak("batched", negatives=32, micro_batch_size=33, steps=1)
    assert batched > 1.1 * one, (one, batched)


def test_cached_mnrl_peak_memory_does_not_grow_with_the_batch(tiny_export, tmp_path):
    common = [f"model.name_or_path={tiny_export}", "data.max_documents=null", "data.heldout_queries=0",
              "data.query_max_length=512", "data.document_max_length=512", "negatives.per_positive=1",
              "loss.mini_batch_size=2", "training.checkpoint_every=1000", "output.tensorboard=false"]

    def peak(loss: str, batch_size: int) -> int:
        summary = finetune(TINY_CONFIG, [*common, f"output.dir={tmp_path / f'{loss}{batch_size}'}", f"loss.name={loss}",
                                         f"training.micro_batch_size={batch_size}",
                                         f"training.global_batch_size={batch_size}"], "--stop-after-steps", "2")
        return summary["peak_memory_bytes"]

    small, large = peak("cached_mnrl", 2), peak("cached_mnrl", 32)
    assert large <= 1.1 * small, (small, large)  # 1.36 and 1.40 GiB here
    # The measurement can tell: plain MNRL embeds the 32 triplets' 96 texts together (2.3 GiB here).
    plain = peak("mnrl", 32)
    assert plain > 1.1 * small, (small, plain)


def test_stopped_and_resumed_two_process_run_matches_the_uninterrupted_one(tiny_export, tmp_path):
    # Cached MNRL over both processes' triplets (dropout on, replayed), BM25 negatives mined once per run.
    common = [f"model.name_or_path={tiny_export}", "loss.name=cached_mnrl", "loss.mini_batch_size=1",
              "negatives.kind=bm25", "training.micro_batch_size=2", "training.global_batch_size=8",
              "training.max_steps=6", "training.checkpoint_every=100", "training.eval_every=100",
              "data.heldout_queries=4", "output.tensorboard=false"]
    whole = finetune(TINY_CONFIG, [*common, f"output.dir={tmp_path / 'whole'}"], processes=2)
    resumed_dir = tmp_path / "resumed"
    first = finetune(TINY_CONFIG, [*common, f"output.dir={resumed_dir}"], "--stop-after-steps", "3", processes=2)
    assert not first["finished"] and first["step"] == 3 and "export" not in first
    (rankings,) = (resumed_dir / "negatives").iterdir()
    mined = rankings.stat().st_mtime_ns
    second = finetune(TINY_CONFIG, [*common, f"output.dir={resumed_dir}"], "--resume", processes=2)
    assert second["finished"] and whole["world_size"] == second["world_size"] == 2
    assert second["backward_calls_per_micro_step"] == 6 and second["negatives_kind"] == "bm25"
    # the resumed run read the rankings its first start mined (the same file name: the same data and settings)
    assert list((resumed_dir / "negatives").iterdir()) == [rankings] and rankings.stat().st_mtime_ns == mined
    assert [p.name for p in (tmp_path / "whole" / "negatives").iterdir()] == [rankings.name]

    expected = losses_by_step(tmp_path / "whole")
    assert sorted(expected) == list(range(1, 7))
    assert losses_by_step(resumed_dir) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    from safetensors.torch import load_file

    whole_weights = load_file(Path(whole["export"]) / "model.safetensors")
    resumed_weights = load_file(Path(second["export"]) / "model.safetensors")
    assert whole_weights.keys() == resumed_weights.keys()
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_folder_that_would_run_its_own_code_is_refused_before_any_work(tmp_path):
    from test_model_trust import minilm_copy, with_custom_module

    marker, run_dir = tmp_path / "marker", tmp_path / "run"
    folder = with_custom_module(minilm_copy(tmp_path / "evil"), marker)
    result = run_finetune(TINY_CONFIG, [f"model.name_or_path={folder}", f"output.dir={run_dir}"])
    assert result.returncode != 0
    assert (f"PermissionError: model.name_or_path: {folder}: modules.json names module(s) ['modeling_evil.Evil']"
            in result.stderr), result.stderr[-3000:]
    assert "model.trust_remote_code: true" in result.stderr
    assert not marker.exists() and not run_dir.exists()  # nothing ran, nothing was written


def test_trust_remote_code_reaches_the_encoder_loader(tmp_path):
    from test_model_trust import minilm_copy, with_custom_module

    from train.retrieval_task import DataSection, ModelSection, build_encoder, check_encoder_source

    marker = tmp_path / "marker"
    folder = with_custom_module(minilm_copy(tmp_path / "trusted"), marker)
    section = ModelSection(name_or_path=str(folder), trust_remote_code=True)
    check_encoder_source(section)
    build_encoder(section, DataSection())
    assert marker.read_text() == "the folder's code ran"

"""Checkpoints run no code, are published whole, and a run resumes from the newest complete one or refuses by name.

The resume cases run the real `Trainer` under real DeepSpeed (ZeRO-2, two gloo processes under torchrun) in a
child process (this file run as a script): one short run writes its checkpoints, then each case copies the run
folder, damages it as a kill, a storage fault or an attacker would, and resumes from it. Each case builds its
hostile input itself; the crafted pickles write a marker file if anything loads them without `weights_only`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_fixtures import VENV_BIN, cpu_env, killed_while_publishing, match_manifest, write_payload
from test_trainer import ACCUMULATION, MICRO_BATCH, STEPS, LeastSquaresTask

from train.checkpointing import LATEST_FILE, MANIFEST_FILE, CheckpointManager, file_sizes, step_tag
from train.logging_utils import METRICS_FILE, MetricsLogger

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# --- the resume cases (the child process) ------------------------------------------------------------------
# Each mutates a copy of the run's `checkpoints/` (3 complete checkpoints, steps 1-3) and says what resuming
# must do: continue from a step, or refuse with a message containing the given text.
CHECKPOINT_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt", "rng_rank1.pt")


def payload_case(name: str):
    def mutate(checkpoints: Path, marker: Path) -> None:
        write_payload(checkpoints / step_tag(3) / name, marker)
        match_manifest(checkpoints / step_tag(3))
    return mutate, {"error": f"{step_tag(3)}/{name}: refused: loading it would run ['builtins.exec']"}


def remove_manifests(checkpoints: Path, marker: Path) -> None:
    for manifest in checkpoints.glob(f"step*/{MANIFEST_FILE}"):
        manifest.unlink()


def remove_checkpoint_folders(checkpoints: Path, marker: Path) -> None:
    for folder in checkpoints.glob("step*"):
        shutil.rmtree(folder)


def truncate_and_match(checkpoints: Path, marker: Path) -> None:
    truncate(checkpoints / step_tag(3) / "mp_rank_00_model_states.pt")
    match_manifest(checkpoints / step_tag(3))


RESUME_CASES = {
    **{f"payload in {name}": payload_case(name) for name in CHECKPOINT_FILES},
    "killed while publishing step 3": (lambda c, m: killed_while_publishing(c, 3, previous=2), {"resumed_from": 2}),
    "rank 1's file of step 3 missing": (lambda c, m: (c / step_tag(3) / "rng_rank1.pt").unlink(),
                                        {"resumed_from": 2, "warning": f"{step_tag(3)}/rng_rank1.pt is missing"}),
    "model states of step 3 truncated": (lambda c, m: truncate(c / step_tag(3) / "mp_rank_00_model_states.pt"),
                                         {"resumed_from": 2, "warning": "mp_rank_00_model_states.pt has"}),
    "model states truncated, manifest matching": (truncate_and_match, {
        "resumed_from": 2, "warning": "mp_rank_00_model_states.pt: not a readable torch.save archive"}),
    "latest deleted": (lambda c, m: (c / LATEST_FILE).unlink(), {"resumed_from": 3}),
    "latest empty": (lambda c, m: (c / LATEST_FILE).write_text(""), {"resumed_from": 3}),
    "every manifest missing": (remove_manifests, {"error": "no complete checkpoint to resume from"}),
    "checkpoints gone, latest left": (remove_checkpoint_folders, {"error": f"names checkpoint '{step_tag(3)}', which "
                                                                          "is not in"}),
    "no checkpoint at all": (lambda c, m: shutil.rmtree(c), {"resumed_from": None}),
}


def run_config(directory: Path, keep_last: int = 3):
    from train.config import OptimizerConfig, OutputSection, RunConfig, TrainingSection

    return RunConfig(output=OutputSection(dir=str(directory), tensorboard=True),
                     training=TrainingSection(micro_batch_size=MICRO_BATCH, max_steps=STEPS, log_every=1,
                                              gradient_accumulation_steps=ACCUMULATION, checkpoint_every=1,
                                              keep_last=keep_last),
                     optimizer=OptimizerConfig(lr=0.05, warmup_fraction=0.0),
                     deepspeed={"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0})


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def resume_cases_in_this_process(root: Path) -> None:
    from train.checkpointing import CheckpointError
    from train.distributed import barrier, init_distributed, launch_environment, shutdown
    from train.trainer import Trainer

    device = init_distributed("cpu")
    env = launch_environment()

    def trainer(directory: Path, keep_last: int = 3) -> Trainer:
        config = run_config(directory, keep_last)
        return Trainer(config, LeastSquaresTask(config, env, device, chunks=1), device)

    trainer(root / "pristine").run()
    outcomes = {}
    recorder = Recorder()
    logging.getLogger("train.checkpointing").addHandler(recorder)
    for index, (name, (mutate, _)) in enumerate(RESUME_CASES.items()):
        folder = root / f"case{index}"
        if env.is_main:
            shutil.copytree(root / "pristine", folder)
            mutate(folder / "checkpoints", root / f"marker{index}")
        barrier()
        recorder.messages.clear()
        resumable = trainer(folder)
        try:
            outcome = {"resumed_from": resumable.resumed_from if resumable.resume() else None}
        except CheckpointError as err:
            outcome = {"error": str(err)}
        outcomes[name] = {**outcome, "warnings": list(recorder.messages)}
        barrier()

    # Fall back past a damaged checkpoint and train on: the run ends as the uninterrupted one, logs each step once.
    folder = root / "continued"
    if env.is_main:
        shutil.copytree(root / "pristine", folder)
        (folder / "checkpoints" / step_tag(3) / "rng_rank1.pt").unlink()
    barrier()
    recorder.messages.clear()
    continued = trainer(folder, keep_last=2)
    continued.resume()
    continued.run()
    outcomes["continued"] = {"resumed_from": continued.resumed_from, "warnings": list(recorder.messages)}
    if env.is_main:
        (root / "outcomes.json").write_text(json.dumps(outcomes, indent=2))
    shutdown()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("checkpoint-trust")
    command = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", __file__, str(root)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=540,
                            env=cpu_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    return root, json.loads((root / "outcomes.json").read_text())


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resume_takes_the_newest_complete_checkpoint_or_refuses_by_name(resumed, name):
    root, outcomes = resumed
    index = list(RESUME_CASES).index(name)
    expected, outcome = RESUME_CASES[name][1], outcomes[name]
    assert not (root / f"marker{index}").exists(), "code from a checkpoint file ran"
    if "error" in expected:
        assert "error" in outcome, outcome
        assert expected["error"] in outcome["error"], outcome["error"]
    else:
        assert outcome.get("resumed_from") == expected["resumed_from"], outcome
    if "warning" in expected:
        assert any(expected["warning"] in message for message in outcome["warnings"]), outcome["warnings"]
        assert any("resuming from" in message and step_tag(2) in message for message in outcome["warnings"])


def test_a_run_that_fell_back_ends_as_the_uninterrupted_one_and_logs_each_step_once(resumed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, outcomes = resumed
    assert outcomes["continued"]["resumed_from"] == 2
    assert any("rng_rank1.pt is missing" in message for message in outcomes["continued"]["warnings"])
    pristine, continued = root / "pristine", root / "continued"
    records = [json.loads(line) for line in (continued / METRICS_FILE).read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("train", 3)]
    expected = [json.loads(line) for line in (pristine / METRICS_FILE).read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]  # bit for bit
    events = EventAccumulator(str(continued / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]
    checkpoints = CheckpointManager(continued / "checkpoints", keep_last=2)
    assert checkpoints.tags() == [step_tag(2), step_tag(3)]  # step 1 pruned, step 3 replaced by a complete one
    assert checkpoints.problems(step_tag(3)) == [] and checkpoints.latest() == step_tag(3)
    assert (continued / "checkpoints" / LATEST_FILE).read_text() == step_tag(3)
    assert not list((continued / "checkpoints").glob(".*partial"))
    for name in ("weight", "bias"):
        whole, resumed_weights = (torch.load(run / "final" / "weights.pt", weights_only=True)[name]
                                  for run in (pristine, continued))
        assert torch.equal(whole, resumed_weights), name


# --- in-process checks of the pieces ------------------------------------------------------------------------
def test_a_pickle_that_runs_code_is_refused_by_every_loader_of_checkpoints(tmp_path):
    import pickle

    from train.checkpoint_loading import (CheckpointFileError, WeightsOnlyCheckpointEngine, load_weights_only,
                                          unsafe_globals, weights_only_loading)

    marker, path = tmp_path / "marker", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    write_payload(path, marker)
    torch.load(path, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    assert unsafe_globals(path) == ["builtins.exec"]
    for load in (load_weights_only, WeightsOnlyCheckpointEngine().load):
        with pytest.raises(CheckpointFileError, match=rf"{path}: refused: loading it would need more than tensors"):
            load(path)
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # as DeepSpeed's universal-checkpoint loader calls it
    assert not marker.exists()


def fake_checkpoint(manager: CheckpointManager, step: int) -> None:
    """A complete checkpoint of `step` published as `CheckpointManager.save` does (one small file for the parts)."""
    staging = manager.directory / f".{step_tag(step)}.checkpoint-partial"
    staging.mkdir(parents=True)
    torch.save({"step": torch.tensor(step)}, staging / "mp_rank_00_model_states.pt")
    manager.publish(staging, step_tag(step), step, world_size=1, files=file_sizes(staging))


def test_pruning_keeps_the_checkpoint_just_written_and_leaves_newer_ones(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4, 10, 11):  # 10 and 11: written by something else into this folder
        fake_checkpoint(manager, step)
    (manager.directory / step_tag(4) / MANIFEST_FILE).unlink()  # damaged
    (manager.directory / ".step00000007.checkpoint-partial").mkdir()  # a killed attempt's staging
    fake_checkpoint(manager, 6)
    manager.prune(step_tag(6))
    # Kept: 6 (just written) and the newest complete one before it (2); the damaged 4 and the leftover removed.
    assert manager.tags() == [step_tag(2), step_tag(6), step_tag(10), step_tag(11)]
    assert not list(manager.directory.glob(".*partial"))
    assert (manager.directory / LATEST_FILE).read_text() == step_tag(6)


def test_a_resumed_run_drops_what_the_interrupted_attempt_logged_after_its_checkpoint(tmp_path):
    lines = [json.dumps({"step": step, "split": split, "loss": float(step)})
             for step in range(0, 6) for split in ("train", "eval")]
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + '\n{"step": 6, "split": "tr')  # torn by a kill
    MetricsLogger(tmp_path, enabled=True, tensorboard=False, resumed_from=3).close()
    kept = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in kept] == [(s, split) for s in range(0, 4) for split in ("train", "eval")]
    MetricsLogger(tmp_path, enabled=True, tensorboard=False, resumed_from=None).close()  # a fresh start
    assert (tmp_path / METRICS_FILE).read_text() == ""
    (tmp_path / METRICS_FILE).write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=rf"{METRICS_FILE}, line 2: not valid JSON"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, resumed_from=3)


if __name__ == "__main__":
    resume_cases_in_this_process(Path(sys.argv[1]))

"""The `Trainer` contract that tasks build on, under real DeepSpeed (ZeRO-2, gradient accumulation) on CPU: a
micro-step may turn its loss into gradients with several `backward` calls (as gradient caching does) and
trains as with one. (Calling DeepSpeed's own `engine.backward` twice per micro-step would not: under ZeRO 1
and 2 the second call overwrites the first's gradients, which is why the trainer counts the calls.)

The runs happen in a child process (this file run as a script), so that the test session's own process
never joins a process group.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_fixtures import cpu_env

from train.config import OptimizerConfig, OutputSection, RunConfig, TrainingSection
from train.logging_utils import read_metrics
from train.trainer import Task

REPO = Path(__file__).resolve().parents[1]
STEPS, MICRO_BATCH, ACCUMULATION = 3, 8, 2


class LeastSquaresTask(Task):
    """Fit y = x·w + b on fixed data. With `chunks` > 1 a micro-step back-propagates its micro-batch in that
    many pieces, each piece's share of the mean squared error on its own."""

    config_class = RunConfig
    name = "least-squares"
    title = "least squares"

    def __init__(self, config: RunConfig, env, device, chunks: int):
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(STEPS * ACCUMULATION * MICRO_BATCH, 4, generator=generator)  # (N, 4)
        self.targets = self.inputs @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1  # (N,)
        self.chunks = self.backward_calls = chunks
        self.total_steps = STEPS

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 1)

    def micro_step(self, step, index, model, backward) -> dict[str, float]:
        start = (step * ACCUMULATION + index) * MICRO_BATCH
        inputs, targets = self.inputs[start:start + MICRO_BATCH], self.targets[start:start + MICRO_BATCH]
        loss_sum = 0.0
        for x, y in zip(inputs.chunk(self.chunks), targets.chunk(self.chunks)):
            loss = ((model(x).squeeze(-1) - y) ** 2).sum() / MICRO_BATCH  # this piece's share of the mean
            backward(loss)
            loss_sum += loss.item()
        return {"loss": loss_sum, "micro_steps": 1.0}

    def interval_metrics(self, sums, seconds) -> dict[str, float]:
        return {"loss": sums["loss"] / sums["micro_steps"]}

    def fresh_model(self) -> torch.nn.Module:
        return torch.nn.Linear(4, 1)

    def save_model(self, model, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, directory / "weights.pt")


def train_in_this_process(root: Path) -> None:
    from train.distributed import init_distributed, launch_environment, shutdown
    from train.trainer import Trainer

    device = init_distributed("cpu")
    for chunks in (1, 4):
        config = RunConfig(output=OutputSection(dir=str(root / f"chunks{chunks}"), tensorboard=False),
                           training=TrainingSection(micro_batch_size=MICRO_BATCH, max_steps=STEPS, log_every=1,
                                                    gradient_accumulation_steps=ACCUMULATION, checkpoint_every=100),
                           optimizer=OptimizerConfig(lr=0.05, warmup_fraction=0.0),
                           deepspeed={"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0})
        Trainer(config, LeastSquaresTask(config, launch_environment(), device, chunks), device).run()
    shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainer")
    result = subprocess.run([sys.executable, __file__, str(root)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=cpu_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return root


def test_several_backward_calls_per_micro_step_train_as_one(runs):
    whole, pieces = (torch.load(runs / f"chunks{n}" / "final" / "weights.pt", weights_only=True) for n in (1, 4))
    assert whole.keys() == pieces.keys() == {"weight", "bias"}
    for name in whole:
        torch.testing.assert_close(pieces[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    summaries = [json.loads((runs / f"chunks{n}" / "summary.json").read_text()) for n in (1, 4)]
    for summary in summaries:
        assert summary["finished"] and summary["step"] == STEPS and summary["accumulation_steps"] == ACCUMULATION
        assert summary["global_batch_size"] == MICRO_BATCH * ACCUMULATION and summary["zero_stage"] == 2
    losses = [[r["loss"] for r in read_metrics(runs / f"chunks{n}", "train")] for n in (1, 4)]
    assert len(losses[0]) == STEPS and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[0][-1] < losses[0][0]  # the weights really moved


if __name__ == "__main__":
    train_in_this_process(Path(sys.argv[1]))

"""The cached MNRL across processes: two gloo processes under DeepSpeed ZeRO-2, each with half of a batch, make
the gradient of the whole batch's loss, as one process holding all of it computes it with plain MNRL.

The weights are updated by plain SGD at lr 1 (an optimizer step is then minus the gradient; Adam would hide a
wrong gradient scale), through the trainer's own `backward` (DeepSpeed's gradient accumulation over the
mini-batches, its averaging over the processes). Dropout is off: the processes draw different masks than one
process would (tests/test_losses.py checks the dropout replay). The processes run this file as a script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pretrain_fixtures import cpu_env

from train.distributed import free_port
from train.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss

REPO = Path(__file__).resolve().parents[1]
PROCESSES, PER_PROCESS, MINI_BATCH = 2, 3, 2
# Document ids with duplicates within and across the processes' halves (e.g. document 0 is process 0's first
# positive, process 1's second positive and process 1's last negative).
POSITIVE_IDS = [0, 1, 2, 3, 0, 4]
NEGATIVE_IDS = [5, 3, 6, 7, 8, 0]


def tiny_encoder():
    from model import M2BertConfig, M2BertModel
    from model.encoders import M2Encoder

    torch.manual_seed(0)
    return M2Encoder(M2BertModel(M2BertConfig.from_preset("m2-bert-tiny", hidden_dropout_prob=0.0))).train()


def global_batch(encoder, rows: slice = slice(None)) -> dict:
    """The batch of both processes (or the `rows` of one), tokenized."""
    queries = [f"what did speaker {i} say about the {word}?" for i, word in enumerate(
        ["budget", "remote", "buttons", "battery", "colour", "market"])]
    documents = [f"meeting {i}: " + f"the {word} was discussed at length " * (3 + i) for i, word in enumerate(
        ["budget", "remote", "design", "battery", "colour", "market", "price", "logo", "speech", "kitchen",
         "trains", "garden"])]
    return dict(query_features=encoder.tokenize(queries[rows], 32),
                positive_features=encoder.tokenize(documents[:6][rows], 64),
                negative_features=encoder.tokenize(documents[6:][rows], 64),
                positive_ids=torch.tensor(POSITIVE_IDS[rows]), negative_ids=torch.tensor(NEGATIVE_IDS[rows]))


def step_in_this_process(out: Path) -> None:
    """One process's share: its half of the batch through the cached loss, one SGD step under ZeRO-2."""
    from train.distributed import (deepspeed_config, gather_full_state_dict, init_distributed, initialize_engine,
                                   launch_environment, shutdown)
    from train.trainer import Trainer

    init_distributed("cpu")
    rank = launch_environment().rank
    encoder = tiny_encoder()
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    calls = CachedMultipleNegativesRankingLoss.backward_calls(PER_PROCESS, PER_PROCESS, MINI_BATCH)
    config = deepspeed_config({"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                               "gradient_clipping": 0.0},  # DeepSpeed clips at 1.0 unless told otherwise
                              micro_batch_size=PER_PROCESS, gradient_accumulation_steps=calls, precision="fp32",
                              world_size=PROCESSES)
    engine = initialize_engine(encoder, torch.optim.SGD(encoder.parameters(), lr=1.0), None, config)
    trainer = SimpleNamespace(engine=engine, accumulation_steps=1, _backward_calls=0)  # what Trainer.backward reads
    mine = global_batch(encoder, slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS))
    output = CachedMultipleNegativesRankingLoss(engine, MINI_BATCH, scale=20.0)(
        **mine, backward=lambda loss: Trainer.backward(trainer, loss))
    after = gather_full_state_dict(engine)
    result = {"loss": output.loss, "calls": trainer._backward_calls, "global_steps": engine.global_steps}
    if rank == 0:
        result["step"] = {name: before[name] - after[name] for name in before}
    torch.save(result, out / f"rank{rank}.pt")
    shutdown()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cached")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES), "--master_port",
               str(free_port()), __file__, str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=cpu_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def test_two_processes_make_the_gradient_of_the_whole_batch(two_processes):
    encoder = tiny_encoder()
    batch = global_batch(encoder)
    embeddings = [encoder(batch[key]) for key in ("query_features", "positive_features", "negative_features")]
    loss = MultipleNegativesRankingLoss(scale=20.0)(*embeddings, batch["positive_ids"], batch["negative_ids"])
    loss.backward()

    results = [torch.load(two_processes / f"rank{rank}.pt", weights_only=True) for rank in range(PROCESSES)]
    for result in results:  # every process reports the loss of the whole batch, after one optimizer step
        assert result["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        assert result["calls"] == 6 and result["global_steps"] == 1
    steps = results[0]["step"]
    gradients = {name: p.grad for name, p in encoder.named_parameters() if p.grad is not None}
    assert steps.keys() >= gradients.keys() and len(gradients) > 50
    for name, gradient in gradients.items():
        atol = 1e-5 * max(1.0, gradient.abs().max().item())  # sums in another order (the filters' reach 100)
        torch.testing.assert_close(steps[name], gradient, rtol=1e-4, atol=atol,
                                   msg=lambda message: f"{name}: {message}")


if __name__ == "__main__":
    step_in_this_process(Path(sys.argv[1]))

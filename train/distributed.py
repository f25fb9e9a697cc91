"""Process-group and DeepSpeed set-up shared by pretraining and fine-tuning.

One code path from a single CPU process to many GPU nodes: launched by `deepspeed`, `torchrun` or
plain `python` (then a one-process group on a free local port), NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "amp_bf16")


@dataclass(frozen=True)
class LaunchEnvironment:
    """Where this process sits in the job, as its launcher describes it."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_environment() -> LaunchEnvironment:
    """Rank and world size from the launcher's variables (one process when there is no launcher)."""
    return LaunchEnvironment(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                             world_size=int(os.environ.get("WORLD_SIZE", "1")))


def free_port() -> int:
    """A TCP port free on this machine now (for a local rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device_kind: str = "auto") -> torch.device:
    """Join (or create) the process group through DeepSpeed and return this process's device.

    device_kind: "auto" (CUDA when available), "cuda" or "cpu". On CPU the backend is gloo and
    DeepSpeed's shared-memory all-reduce op is switched off: it serves only inference all-reduces, and
    building it costs ~45 s of compilation on the first run of every fresh environment.
    """
    import deepspeed

    use_cuda = torch.cuda.is_available() if device_kind == "auto" else device_kind == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is available")
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        # The `deepspeed` launcher says LOCAL_SIZE; streaming (and torchrun users) read LOCAL_WORLD_SIZE, and
        # without it every rank would take itself for its node's leader.
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    if "RANK" not in os.environ:  # plain `python`: a group of one, so the same code path runs everywhere
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    env = launch_environment()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
        backend = "nccl"
    else:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    logger.debug("rank %d/%d on %s (%s)", env.rank, env.world_size, device, backend)
    return device


def shutdown() -> None:
    """Leave the process group once every rank has reached this point (a clean exit; also quicker than leaving
    it to interpreter teardown). The barrier first: a rank that tears its gloo group down while a peer is
    still working in it can abort (std::terminate) instead of exiting."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """The sum (or another `op`, e.g. `dist.ReduceOp.MAX`) of `values` over all ranks, as a float64 CPU tensor
    (a copy; the input may live anywhere)."""
    result = values.detach().to(torch.float64, copy=True)
    if dist.is_initialized():
        # NCCL reduces CUDA tensors only, gloo CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        result = result.to(device)
        dist.all_reduce(result, op=op)
    return result.cpu()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is `amp_bf16` on GPU (fp32 weights, bf16 matmuls under autocast, as the authors trained) and fp32
    on CPU (the precision the tests check losses in). Not `bf16`: DeepSpeed's bf16 weights round the Hyena
    filters' parameters, which puts the filters ~13% off (docs/kernels.md, "Precision")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(block: dict, *, micro_batch_size: int, gradient_accumulation_steps: int,
                     precision: str, world_size: int) -> dict:
    """The DeepSpeed config: the YAML `deepspeed:` block plus what the run itself decides.

    Batch sizes come from the run config (a conflicting value in the block is an error). `precision`
    (already resolved) sets `bf16` (DeepSpeed keeps bf16 weights and fp32 master weights) or
    `torch_autocast` (`amp_bf16`: fp32 weights, bf16 matmuls, as the authors' Composer `amp_bf16`).
    """
    config = copy.deepcopy(block)
    derived = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
    }
    for key, value in derived.items():
        if key in config and config[key] != value:
            raise ValueError(f"deepspeed block sets {key}={config[key]!r} but the run config implies {value}; "
                             "set batch sizes in the training section only")
        config[key] = value
    for key in ("bf16", "fp16", "torch_autocast"):
        if key in config:
            raise ValueError(f"deepspeed block sets {key!r}; choose the precision with training.precision "
                             f"({', '.join(PRECISIONS)}) instead")
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "amp_bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    config.setdefault("steps_per_print", 10**9)  # progress is ours; DeepSpeed's own would repeat it
    config.setdefault("wall_clock_breakdown", False)
    return config


def initialize_engine(model: torch.nn.Module, optimizer, lr_scheduler, config: dict):
    """`deepspeed.initialize` with a client optimizer and scheduler; returns the engine.

    The scheduler is stepped by the engine once per optimizer step and saved in its checkpoints.
    """
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=config)
    return engine


def gather_full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The model's full fp32 parameters (any ZeRO stage, any precision) on rank 0; None on the others.

    Collective: every rank must call it. Buffers are not included (they are regenerated from the config).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    main = is_main_process()
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # no ZeRO partitioning and no master copy: the parameter itself is complete
            full = param.detach().float()
        if main:
            state[name] = full.detach().cpu().clone()
    return state if main else None

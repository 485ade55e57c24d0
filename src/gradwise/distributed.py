"""Several processes on torch.distributed: DDP or FSDP2, launched by torchrun.

    torchrun --nproc_per_node 2 -m gradwise train recipe.yaml      # or: gradwise train --nproc 2
    distributed: {strategy: auto}                                  # ddp with > 1 process

Every rank builds the same model from the same seed, reads the same data and walks the same global
order of batches; rank r takes the r-th slice of each global batch (``data.batch_size`` per rank),
so a step over W ranks is the step of one process on a W-times larger batch. Gradients are averaged
by DDP's all-reduce (or reduce-scattered by FSDP2); the loss is normalised over the global window's
samples, so the result equals single-process training on the global batch. Rank 0 alone writes the
run directory, logs, tracks and checkpoints (FSDP2: every rank writes its shard through
torch.distributed.checkpoint, which can load them on another number of ranks).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradwise.errors import ConfigError

__all__ = [
    "Dist",
    "all_sum",
    "barrier",
    "broadcast",
    "load_sharded",
    "save_sharded",
    "start",
    "stop",
    "sync_off",
    "wrap",
]


@dataclass
class Dist:
    """This process's place among the ranks."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp
    started_group: bool = False  # whether gradwise created the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def start(spec: Any, device: str = "auto") -> Dist:
    """Join the ranks torchrun started (``spec`` is the recipe's distributed section): the
    process group (NCCL on CUDA, gloo on the CPU), this rank's GPU, the strategy."""
    rank, world, local = from_env()
    strategy = spec.strategy
    if world == 1:
        return Dist(strategy="fsdp" if strategy == "fsdp" else "none")
    if strategy == "none":
        raise ConfigError(
            "distributed.strategy", "none", "ddp, fsdp or auto under torchrun",
            f"{world} processes were started; each would train a full copy on all the data",
        )  # fmt: skip
    cuda = (torch.cuda.is_available() and device in ("auto", "cuda")) or device.startswith("cuda")
    backend = spec.backend if spec.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=spec.timeout_s), rank=rank, world_size=world
        )
        started = True
    return Dist(rank, world, local, "ddp" if strategy == "auto" else strategy, started)


def stop(d: Dist) -> None:
    """End the process group gradwise started (every rank, also after an error)."""
    if d.started_group and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, device: torch.device, precision: str) -> nn.Module:
    """The module the training step runs: DDP around ``model``, or ``model`` itself sharded in
    place by FSDP2 (its blocks first, then the root), or ``model`` alone."""
    if not d.active or d.strategy == "none":
        return model
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else d.local_rank]
        return DistributedDataParallel(model, device_ids=ids if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from gradwise.finetune.layers import blocks

    policy = MixedPrecisionPolicy()
    if precision in ("bf16", "fp16"):
        low = torch.bfloat16 if precision == "bf16" else torch.float16
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def sync_off(engine: nn.Module, d: Dist, last: bool) -> Iterator[None]:
    """No gradient all-reduce on the micro-batches before the window's last (exact accumulation
    at a fraction of the communication): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    if last or not d.active:
        yield
    elif d.strategy == "ddp":
        with engine.no_sync():
            yield
    else:
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)


def all_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum of ``value`` over the ranks (``value`` itself on one)."""
    if not d.active:
        return value
    home = value.device
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        value = value.to(torch.device("cuda", torch.cuda.current_device()))
    value = value.clone()
    dist.all_reduce(value)
    return value.to(home)


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run directory it created)."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# -- sharded checkpoints (FSDP2): torch.distributed.checkpoint, loadable on any number of ranks --


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the weights and optimizer state into ``directory`` (one
    process alone, without a process group, writes them whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process writing all shards is what we mean here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(
            {"model": weights, "optimizer": optim},
            checkpoint_id=str(directory),
            no_dist=not dist.is_initialized(),
        )


def load_sharded(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Load shards written on any number of ranks into ``model`` (sharded by FSDP2 or whole) and,
    when given, its ``optimizer``: torch.distributed.checkpoint reshards as it reads."""
    import torch.distributed.checkpoint as dcp

    single = not dist.is_initialized()
    with warnings.catch_warnings():  # one process reading shards is what we mean here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        _load(dcp, directory, model, optimizer, single)


def _load(dcp: Any, directory: Path, model: nn.Module, optimizer: Any, single: bool) -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        weights = get_model_state_dict(model)
        dcp.load({"model": weights}, checkpoint_id=str(directory), no_dist=single)
        set_model_state_dict(model, weights)
        return
    weights, optim = get_state_dict(model, optimizer)
    dcp.load({"model": weights, "optimizer": optim}, checkpoint_id=str(directory), no_dist=single)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)


def full_norm(norm: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient norm as a plain tensor (FSDP2 computes it as a DTensor over the shards)."""
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm

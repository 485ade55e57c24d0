"""The doctor across ranks: models wrapped by DDP or sharded by FSDP2, and the exchange of statistics.

Under torch.distributed every rank runs its own Doctor. What each rank sees differs: its own
batches and losses, its own local gradients before DDP's all-reduce, and under FSDP2 only its shard
of every parameter (a DTensor). At each sampled step the ranks exchange what they measured in two
small ``all_gather`` calls, always the same two on every rank in the same order (a measurement that
failed on one rank is sent empty, never skipped, so no rank waits forever for another): a header
(step and segment sizes), then the payload (per-step losses and gradient norms, per-layer sums of
squares of the shards, a fingerprint of the parameters, the rules that fired on the rank alone).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import nn

try:  # torch >= 2.5; torch 2.4 has it under a private name
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the installed torch
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None  # type: ignore[assignment,misc]

SEGMENTS = (
    "loss",
    "grad",
    "grad_local",
    "layers",
    "ratios",
    "fresh",
    "fingerprint",
    "buffers",
    "codes",
)
"""The payload's segments, in order; each rank sends each one (empty when it has nothing)."""
FINGERPRINT_SAMPLE = 1024
"""Entries of a tensor that its fingerprint sums (all of them in smaller tensors)."""


def dist_available() -> bool:
    """Whether torch.distributed is built in and a process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any) -> tuple[Any, int, int]:
    """(group or None, this rank, world size) for the Doctor's ``process_group`` argument.

    "auto": the default group when torch.distributed is initialised with more than one rank;
    None: this process alone (no collectives); a ProcessGroup: that group.
    """
    if isinstance(process_group, str) and process_group != "auto":
        from gradwise.errors import ConfigError

        raise ConfigError(
            "process_group", process_group, '"auto", None or a torch.distributed ProcessGroup'
        )
    auto = isinstance(process_group, str)
    if process_group is None or (auto and not dist_available()):
        return None, 0, 1
    import torch.distributed as dist

    group = None if auto else process_group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if world < 2:
        return None, rank, world
    return (dist.group.WORLD if group is None else group), rank, world


def outside_world() -> int:
    """The world size of the default process group (1 when there is none)."""
    if not dist_available():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def unwrap(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module inside a DistributedDataParallel wrapper and "ddp"; any other model, None."""
    from torch.nn.parallel import DistributedDataParallel

    kind = None
    while isinstance(model, DistributedDataParallel):
        kind, model = "ddp", model.module
    return model, kind


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2-sharded parameter or its gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def replicas(t: torch.Tensor, world: int = 1) -> int:
    """How many of the ranks whose sums are added up hold the same values of ``t``: for a DTensor
    the mesh dimensions it is replicated over; for a plain tensor ``world`` (a full copy on each)."""
    if not is_dtensor(t):
        return world
    mesh = t.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


def sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2's fully_shard, tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


def local_squares(tensors: list[torch.Tensor], world: int = 1) -> torch.Tensor:
    """Sum of squares of this rank's shards of ``tensors`` (each shard counted once over replicas;
    plain tensors are copies on all ``world`` ranks), as a device tensor: summed over the ranks it
    is the square of the global norm."""
    if not tensors:
        return torch.tensor(0.0)
    shards = [local(t).detach() for t in tensors]
    norms = torch._foreach_norm(shards)
    factors = [1.0 / replicas(t, world) for t in tensors]
    return sum(n.float().pow(2) * f for n, f in zip(norms, factors, strict=True))


def sample_index(name: str, numel: int, device: torch.device) -> torch.Tensor | None:
    """A fixed sample of positions in a tensor of ``numel`` entries, the same on every rank (seeded
    by the tensor's name, not by call order); None: use every entry."""
    if numel <= FINGERPRINT_SAMPLE:
        return None
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(0, numel, (FINGERPRINT_SAMPLE,), generator=generator).to(device)


def collective_device(group: Any) -> torch.device:
    """Where the exchanged tensors must live: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Exchange:
    """The two all_gather calls of a sampled step: a header, then the padded payload."""

    def __init__(self, group: Any, world: int) -> None:
        self.group, self.world = group, world
        self.device = collective_device(group)

    def gather(
        self, step: int, segments: dict[str, torch.Tensor | None]
    ) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
        """Every rank's step and, per segment, every rank's values (float64, on the CPU).

        ``segments`` maps names in :data:`SEGMENTS` to 1-D tensors (None or absent: empty). The
        calls are the same on every rank whatever it sends: sizes go first, so a rank that sends
        less (a failed measurement, a different model) is padded, and the caller sees it.
        """
        import torch.distributed as dist

        parts = [_flat(segments.get(name), self.device) for name in SEGMENTS]
        sizes = [p.numel() for p in parts]
        header = torch.tensor([float(step), *sizes], dtype=torch.float64, device=self.device)
        headers = [torch.empty_like(header) for _ in range(self.world)]
        dist.all_gather(headers, header, group=self.group)
        table = torch.stack(headers).cpu().long().tolist()
        steps = [row[0] for row in table]
        longest = max(sum(row[1:]) for row in table)
        out: dict[str, list[torch.Tensor]] = {name: [] for name in SEGMENTS}
        if longest == 0:
            empty = torch.zeros(0, dtype=torch.float64)
            return steps, {name: [empty] * self.world for name in SEGMENTS}
        payload = torch.zeros(longest, dtype=torch.float64, device=self.device)
        if sum(sizes):
            payload[: sum(sizes)] = torch.cat(parts)
        rows = [torch.empty_like(payload) for _ in range(self.world)]
        dist.all_gather(rows, payload, group=self.group)
        for row, values in zip(table, torch.stack(rows).cpu(), strict=True):
            start = 0
            for name, size in zip(SEGMENTS, row[1:], strict=True):
                out[name].append(values[start : start + size])
                start += size
        return steps, out


def _flat(t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return t.detach().reshape(-1).to(device=device, dtype=torch.float64)


def agreed(values: list[torch.Tensor]) -> bool:
    """Whether every rank sent a segment of the same, non-zero size."""
    return bool(values) and values[0].numel() > 0 and len({v.numel() for v in values}) == 1

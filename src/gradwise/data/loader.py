"""DataLoaders with expert defaults and a data order that can be resumed exactly, mid-epoch.

The order of epoch e depends only on (seed, e), so a resumed run skips the batches it had already
consumed, by index, without loading them, and then sees exactly the batches the uninterrupted run saw.
In-memory tensors are gathered a whole batch at a time (one indexing op per tensor instead of one
``__getitem__`` per sample plus a collate), which is several times faster for tabular data.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices in an order fixed by (seed, epoch); :meth:`set_epoch` can skip batches.

    Over ``world`` ranks, batches are global (``batch_size`` per rank) and rank ``rank`` takes its
    slice of each, so the ranks together walk one process's order on the global batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.batch_size = batch_size * world  # the global batch
        self.drop_last, self.rank, self.world = drop_last, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for b in range(self.skip, self.num_batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world > 1:
                batch = batch.tensor_split(self.world)[self.rank]
            yield batch.tolist()

    def num_batches(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last and rest >= self.world else 0)

    def __len__(self) -> int:
        return self.num_batches() - self.skip


class RankShard(IterableDataset):
    """Every ``world``-th sample of a stream, from ``rank`` on (the stream's set_epoch passes on)."""

    def __init__(self, stream: IterableDataset, rank: int, world: int) -> None:
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.stream), self.rank, None, self.world)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)


class _BatchedTensors(Dataset):
    """A TensorDataset view that gathers a whole batch with one indexing op per tensor."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _already_collated(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


def in_memory(dataset: Dataset) -> bool:
    """Whether samples come from memory (worker processes would only add IPC cost)."""
    return isinstance(dataset, TensorDataset) or bool(getattr(dataset, "in_memory", False))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool | str = "auto",
    num_workers: int | str = "auto",
    pin_memory: bool | str = "auto",
    device: torch.device | None = None,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A DataLoader over ``dataset`` with a :class:`ResumableBatchSampler` and expert defaults.

    drop_last="auto" drops the last batch only when it would hold a single sample (that breaks
    BatchNorm and gives a very noisy step). An IterableDataset (a stream) gets a plain DataLoader in
    its own order, in the main process unless ``num_workers`` is given (the stream must then
    shard itself by worker; over ``world`` ranks, rank ``rank`` reads every world-th sample).
    ``batch_size`` is per rank. num_workers="auto" is 0 for in-memory data, else
    min(8, CPUs - 1) with persistent workers. pin_memory="auto" is on for CUDA.
    """
    if pin_memory == "auto":
        pin_memory = device is not None and device.type == "cuda"
    if isinstance(dataset, IterableDataset):  # a stream: its own order; workers would repeat it
        workers = 0 if num_workers == "auto" else int(num_workers)
        if world > 1:
            dataset = RankShard(dataset, rank, world)
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, pin_memory=bool(pin_memory)
        )
    n = len(dataset)
    if drop_last == "auto":
        drop_last = shuffle and n % batch_size == 1 and n > 1
    if num_workers == "auto":
        num_workers = 0 if in_memory(dataset) else max(0, min(8, (os.cpu_count() or 1) - 1))
    sampler = ResumableBatchSampler(
        n, batch_size, shuffle=shuffle, seed=seed, drop_last=bool(drop_last), rank=rank, world=world
    )
    batched = isinstance(dataset, TensorDataset) and num_workers == 0
    return DataLoader(
        _BatchedTensors(dataset) if batched else dataset,
        batch_sampler=sampler,
        collate_fn=_already_collated if batched else None,
        num_workers=int(num_workers),
        pin_memory=bool(pin_memory),
        persistent_workers=int(num_workers) > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def num_batches(loader: DataLoader) -> int | None:
    """Batches per epoch, or None for loaders without a length (iterable datasets)."""
    sampler = loader.batch_sampler
    if isinstance(sampler, ResumableBatchSampler):
        return sampler.num_batches()
    try:
        return len(loader)
    except TypeError:
        return None


def epoch_batches(loader: DataLoader, epoch: int, skip: int = 0) -> Iterator:
    """Iterate epoch ``epoch`` of ``loader``, starting after ``skip`` batches.

    For gradwise's own loaders the skip is by index (nothing is loaded) and worker seeds follow
    (seed, epoch). A foreign DataLoader is iterated and the skipped batches discarded; the caller
    restores the epoch-start RNG state first so that its shuffle order repeats.
    """
    sampler = loader.batch_sampler
    if isinstance(sampler, ResumableBatchSampler):
        sampler.set_epoch(epoch, skip)
        if loader.generator is not None:
            loader.generator.manual_seed(sampler.seed * 7919 + epoch)
        return iter(loader)
    for candidate in (loader.sampler, sampler, loader.dataset):
        if hasattr(candidate, "set_epoch"):  # e.g. DistributedSampler, a Hugging Face stream
            candidate.set_epoch(epoch)
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator, None)
    return iterator


def stop_workers(loader: object) -> None:
    """Stop a DataLoader's persistent worker processes now; it starts new ones when iterated again.

    As Lightning does at the end of fit. Left to the garbage collector, the same shutdown happens
    at some later collection and waits there 5 s for each worker (a 10 s stall measured after a
    text-data run), and until then the workers hold their memory.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimizer steps per epoch: a trailing partial accumulation window still makes a step."""
    return math.ceil(batches / accumulate)

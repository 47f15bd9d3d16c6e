"""Sampling and DataLoaders: which images an epoch draws, in what order, on which rank.

Order and augmentation depend only on (seed, epoch, rank, position), so a resumed run or one with
another number of workers sees the same samples augmented the same way.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, WeightedRandomSampler

from dataset import SegmentationFolder, SkipBadSamples
from errors import UserError
from utils import Runtime, init_worker


def epoch_seed(*parts: int) -> int:
    """A non-negative 63-bit seed from integers (int tuple hashes are the same in every process)."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class EpochSampler(Sampler):
    """Yields (seed, index) pairs whose order and augmentation depend only on (run seed, epoch, rank).

    set_epoch() re-seeds the wrapped sampler (its own set_epoch, or its generator); each position in
    the epoch gets its own augmentation seed. A resumed run, or one with another number of workers,
    sees the same samples augmented the same way as an uninterrupted one.
    """

    def __init__(
        self, sampler: Sampler, seed: int, generator: torch.Generator | None = None, rank: int = 0, size: int = 0
    ):
        self.sampler, self.seed, self.generator, self.rank, self.epoch = sampler, seed, generator, rank, 0
        self.size = size  # indices wrap around at the dataset's size (0: they never pass it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        else:
            self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            yield epoch_seed(self.seed, self.epoch, self.rank, position), index % self.size if self.size else index


class DistributedWeightedSampler(Sampler):
    """The weighted sampler under DDP: every rank draws the same weighted sample of the epoch
    (a seed shared through set_epoch) and keeps every world_size-th draw starting at its rank.
    """

    def __init__(self, weights: torch.Tensor, num_replicas: int, rank: int, seed: int = 0, num_samples: int = 0):
        self.weights, self.num_replicas, self.rank, self.seed, self.epoch = weights, num_replicas, rank, seed, 0
        self.num_samples = math.ceil((num_samples or len(weights)) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.num_samples * self.num_replicas, True, generator=generator)
        return iter(draws[self.rank :: self.num_replicas].tolist())


def make_weighted_sampler(
    dataset: SegmentationFolder, generator: torch.Generator | None = None, num_samples: int = 0
) -> WeightedRandomSampler:
    """Draw images holding rare classes more often (the inverse-frequency rule)."""
    return WeightedRandomSampler(
        dataset.sample_weights(), num_samples=num_samples or len(dataset), replacement=True, generator=generator
    )


def train_sampler(
    train_set: SegmentationFolder, *, weighted: bool, seed: int, runtime: Runtime, min_epoch_samples: int = 0
) -> EpochSampler:
    """Weighted (rare classes drawn more often) or uniform; under DDP each rank takes its own share.

    An epoch draws at least min_epoch_samples images: a set smaller than that is drawn several times (uniform:
    whole shuffled passes), so on a tiny set the validation and checkpoint after each epoch do not take most
    of the time, as nnU-Net's fixed-length epochs avoid."""
    generator = torch.Generator()
    ddp = runtime.ddp
    samples = max(len(train_set), min_epoch_samples)
    if ddp.world_size > 1 and weighted:
        sampler = DistributedWeightedSampler(train_set.sample_weights(), ddp.world_size, ddp.rank, seed, samples)
    elif ddp.world_size > 1:
        sampler = DistributedSampler(range(samples), ddp.world_size, ddp.rank, shuffle=True, seed=seed)
    elif weighted:
        sampler = make_weighted_sampler(train_set, generator, samples)
    else:
        sampler = RandomSampler(train_set, num_samples=samples, generator=generator)
    return EpochSampler(sampler, seed, generator, ddp.rank, size=len(train_set))


MAX_WORKERS_PER_GPU = 8


def loader_workers(requested: int | str, runtime: Runtime) -> int:
    """--workers auto. On the CPU none: the training step already fills every core, and a worker process only
    takes cores from it (README: data loader). On a GPU one worker per core this process may use (the cores
    torchrun's local processes share), less one for the training loop itself, up to MAX_WORKERS_PER_GPU."""
    if requested != "auto":
        return requested
    if runtime.device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(MAX_WORKERS_PER_GPU, cores - 1))


def workers_reason(runtime: Runtime) -> str:
    """Why loader_workers' auto chose what it did, for the start-up line."""
    if runtime.device.type != "cuda":
        return "the training step fills every CPU core"
    return f"one per free core, at most {MAX_WORKERS_PER_GPU}"


def as_lists(batch: list[tuple]) -> tuple[list, ...]:
    """Validation images keep their own sizes: a batch is lists, not stacked tensors."""
    return tuple(list(column) for column in zip(*batch, strict=True))


def build_loaders(
    train_set: SegmentationFolder,
    val_set: SegmentationFolder,
    *,
    batch_size: int,
    workers: int | str,
    weighted: bool,
    seed: int,
    strict: bool,
    runtime: Runtime,
    min_epoch_samples: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Bad samples are replaced in training and left out of validation (see SkipBadSamples).

    Validation is split into disjoint shards (no padding), so the all-reduced confusion matrix
    counts every validation image exactly once; its images keep their own sizes (batches of lists).
    """
    workers = loader_workers(workers, runtime)
    options = dict(
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        worker_init_fn=init_worker,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    epoch_size = max(len(train_set), min_epoch_samples)
    if batch_size > epoch_size:
        raise UserError(
            f"--batch-size {batch_size} is larger than an epoch's {epoch_size} images "
            f"({len(train_set)} training images, --min-epoch-samples {min_epoch_samples})"
        )
    sampler = train_sampler(
        train_set, weighted=weighted, seed=seed, runtime=runtime, min_epoch_samples=min_epoch_samples
    )
    train_items = SkipBadSamples(train_set, strict, before_colour=True)  # colour runs per batch on the device
    train_loader = DataLoader(train_items, batch_size, sampler=sampler, drop_last=True, **options)
    val_shard = range(runtime.ddp.rank, len(val_set), runtime.ddp.world_size)
    val_loader = DataLoader(
        SkipBadSamples(val_set, strict, replace=False), batch_size, sampler=val_shard, collate_fn=as_lists, **options
    )
    return train_loader, val_loader

"""Epoch length: a set smaller than --min-epoch-samples is drawn several times per epoch, in whole shuffled
passes (uniform) or by weight; larger sets are drawn exactly as before, on one process or several."""

from collections import Counter

import torch
from torch.utils.data import RandomSampler

from loaders import MAX_WORKERS_PER_GPU, epoch_seed, loader_workers, train_sampler
from utils import Distributed, Runtime


class Images:
    """What train_sampler reads of a dataset: its length and per-image weights."""

    def __init__(self, count: int, rare: int | None = None):
        self.weights = torch.ones(count, dtype=torch.double)
        if rare is not None:
            self.weights[rare] = 10.0

    def sample_weights(self):
        return self.weights

    def __len__(self):
        return len(self.weights)


def draws(dataset, *, weighted=False, min_epoch_samples=0, epoch=1, rank=0, world_size=1):
    runtime = Runtime(torch.device("cpu"), ddp=Distributed(rank=rank, world_size=world_size))
    sampler = train_sampler(dataset, weighted=weighted, seed=5, runtime=runtime, min_epoch_samples=min_epoch_samples)
    sampler.set_epoch(epoch)
    return [index for _, index in sampler]


def test_a_small_set_is_drawn_in_whole_shuffled_passes_up_to_the_epoch_length():
    indices = draws(Images(10), min_epoch_samples=25)
    counts = Counter(indices)
    assert len(indices) == 25 and set(counts) == set(range(10))
    assert sorted(indices[:10]) == sorted(indices[10:20]) == list(range(10))  # two whole passes, then a part
    assert draws(Images(10), min_epoch_samples=25, epoch=2) != indices


def test_the_weighted_draw_fills_the_epoch_and_keeps_its_skew():
    indices = draws(Images(10, rare=3), weighted=True, min_epoch_samples=2000)
    assert len(indices) == 2000
    assert Counter(indices)[3] / 2000 > 5 / 19  # weight 10 of 19


def test_a_set_at_least_the_epoch_length_is_drawn_as_one_pass_as_before():
    ours = draws(Images(30), min_epoch_samples=25)
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(5, 1))
    assert ours == list(RandomSampler(range(30), generator=generator))


def test_ranks_share_the_longer_epoch_between_them():
    shares = [draws(Images(10), min_epoch_samples=40, rank=r, world_size=2) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 20
    assert Counter(shares[0] + shares[1]) == {i: 4 for i in range(10)}
    weighted = [draws(Images(10), weighted=True, min_epoch_samples=40, rank=r, world_size=2) for r in (0, 1)]
    assert len(weighted[0]) == len(weighted[1]) == 20


def test_workers_auto_leaves_the_cpu_to_the_step_and_gives_each_gpu_its_share_of_cores(monkeypatch):
    cpu, gpu = Runtime(torch.device("cpu")), Runtime(torch.device("cuda", 0))
    assert loader_workers("auto", cpu) == 0 and loader_workers(3, cpu) == 3 and loader_workers(0, gpu) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # eight torchrun processes share 32 cores: 4 each, one the loop's
    assert loader_workers("auto", gpu) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers("auto", gpu) == MAX_WORKERS_PER_GPU
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert loader_workers("auto", gpu) == 1  # never none on a GPU: the loop would decode between steps

"""torchrun / DistributedDataParallel on the CPU with gloo: two processes on this machine."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

import train
from checkpoints import load_checkpoint
from conftest import ROOT, TINY_TRAIN_FLAGS, run_in_process
from dataset import SegmentationFolder, SkipBadSamples
from demo import make_demo_data
from engine import evaluate
from labels import LabelMapping
from loaders import DistributedWeightedSampler, as_lists, make_weighted_sampler
from model import ResidualAttnUNet
from predictor import Predictor
from sampling import Sampling
from utils import Runtime


@pytest.fixture(scope="module")
def odd_demo(tmp_path_factory):
    """9 validation images: not divisible by 2 ranks."""
    return make_demo_data(tmp_path_factory.mktemp("ddp") / "demo", num_train=24, num_val=9, size=48, seed=2)


def torchrun(*args, timeout=240):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(ROOT / "train.py"),
        *map(str, args),
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(odd_demo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp-run") / "run"
    # fp32: the check below compares argmaxes to 1e-6, which bf16 rounding under another thread count would not meet
    result = torchrun(
        "--data-root", odd_demo, "--epochs", "1", "--precision", "fp32", "--run-dir", run_dir, *TINY_TRAIN_FLAGS
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result


@pytest.mark.slow
def test_two_processes_write_one_run_whose_miou_equals_a_single_process_evaluation(ddp_run, odd_demo):
    run_dir, result = ddp_run
    assert result.stdout.count("epoch 1/1") == 1  # only rank 0 reports
    assert "2 processes" in result.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "epoch_001.pt", "last.pt"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not any(key.startswith("module.") for key in state["model"])
    events = EventAccumulator(str(run_dir))
    events.Reload()
    logged = events.Scalars("val/miou")[0].value

    model = ResidualAttnUNet(**state["model_args"]).to(memory_format=torch.channels_last)
    model.load_state_dict(state["model"])
    mapping = LabelMapping.from_dict(state["mapping"])
    val = SegmentationFolder(odd_demo / "images/val", odd_demo / "masks/val", None, mapping=mapping)
    loader = DataLoader(SkipBadSamples(val, replace=False), batch_size=3, collate_fn=as_lists)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=True)
    predictor = Predictor.for_validation(model.eval(), mapping, Sampling.from_training_flags(state["args"]), runtime)
    _, matrix, _, _, _ = evaluate(predictor, loader, num_classes=val.num_classes, runtime=runtime, epoch=1)
    assert matrix.matrix.sum().item() == 9 * 48 * 48  # every validation pixel counted exactly once
    assert matrix.compute()["miou"] == pytest.approx(logged, abs=1e-4)  # 1 thread per rank: other float sums
    assert state["history"][0]["miou"] == pytest.approx(logged, abs=1e-6)


@pytest.mark.slow
def test_the_ddp_checkpoint_resumes_in_a_single_process(ddp_run, tmp_path):
    run_dir, _ = ddp_run
    assert (
        train.main(
            [
                "--resume",
                str(run_dir / "checkpoints" / "last.pt"),
                "--epochs",
                "2",
                "--run-dir",
                str(tmp_path / "single"),
            ]
        )
        == 0
    )
    assert load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")["epoch"] == 2


def test_distributed_weighted_sampler_keeps_the_skew_and_gives_ranks_distinct_shares():
    weights = torch.ones(20, dtype=torch.double)
    weights[7] = 10.0  # the image holding a rare class
    ranks = [DistributedWeightedSampler(weights, 2, rank, seed=3) for rank in (0, 1)]
    union = []
    for epoch in range(300):
        lists = []
        for sampler in ranks:
            sampler.set_epoch(epoch)
            lists.append(list(sampler))
        assert lists[0] != lists[1]
        assert len(lists[0]) == len(lists[1]) == 10
        union += lists[0] + lists[1]
    single = make_weighted_sampler_share(weights)
    share = np.mean(np.array(union) == 7)
    assert share == pytest.approx(single, rel=0.1)
    assert share > 4 / 20


def make_weighted_sampler_share(weights):
    class Weighted:
        def sample_weights(self):
            return weights

        def __len__(self):
            return len(weights)

    sampler = make_weighted_sampler(Weighted(), torch.Generator().manual_seed(0))
    draws = [i for _ in range(300) for i in sampler]
    return np.mean(np.array(draws) == 7)


def test_sync_bn_on_the_cpu_is_a_clear_error(tiny_demo, tmp_path):
    result = run_in_process(
        train.main, "--data-root", tiny_demo, "--sync-bn", "--run-dir", tmp_path / "run", *TINY_TRAIN_FLAGS
    )
    assert result.returncode == 2 and "--sync-bn needs a torchrun job on CUDA GPUs" in result.stderr


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_job_with_its_message(odd_demo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(odd_demo, data)
    for i in range(0, 24, 2):
        (data / f"images/train/train_{i:05d}.jpg").write_bytes(b"")  # half the images: every rank meets one
    result = torchrun(
        "--data-root",
        data,
        "--epochs",
        "2",
        "--strict",
        "--sampler",
        "uniform",
        "--dist-timeout",
        "20",
        "--run-dir",
        tmp_path / "run",
        *TINY_TRAIN_FLAGS,
        timeout=180,
    )
    assert result.returncode != 0
    assert "unreadable image" in result.stdout + result.stderr


@pytest.mark.slow
def test_ranks_agree_on_the_validation_interval_and_the_time_budgets_plan(odd_demo, tmp_path):
    """Each rank times its own epochs: rank 0's interval and plan are everyone's, or the ranks' validations (a
    collective) would not meet and the job would hang."""
    run_dir = tmp_path / "run"
    flags = ["--data-root", odd_demo, "--time-budget", "0.3", "--run-dir", run_dir]
    result = torchrun(*flags, *TINY_TRAIN_FLAGS, "--val-every", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("--val-every auto: every") == 1
    last = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert last["epoch"] == last["args"]["epochs"] and last["history"][-1]["validated"] == 1
    assert isinstance(last["args"]["val_every"], int)

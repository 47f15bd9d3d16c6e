"""Start-up's measured choices: the candidates are what runs natively here less what a flag fixed, the choice follows
the measurement (a fake timer here: no wall-clock assertion), and a flag the user gave is never overridden."""

from __future__ import annotations

import pytest
import torch

import model_setup
import train
import tuning
from conftest import TINY_TRAIN_FLAGS, run_in_process
from tuning import Candidate, candidates, fastest
from utils import Runtime

CPU = Runtime(torch.device("cpu"), "fp32", False)


@pytest.mark.parametrize("native", [True, False])
def test_the_candidates_are_what_runs_natively_less_what_a_flag_fixed(native, monkeypatch):
    monkeypatch.setattr(tuning, "native_bf16", lambda device: native)
    both = {Candidate("fp32", True), Candidate("fp32", False)}
    expected = both | ({Candidate("bf16", True), Candidate("bf16", False)} if native else set())
    assert set(candidates(CPU, "auto", None)) == expected
    assert set(candidates(CPU, "fp32", None)) == both  # --precision fp32: only the layout is open
    assert set(candidates(CPU, "auto", False)) == {c for c in expected if not c.channels_last}  # --no-channels-last
    assert candidates(CPU, "fp32", True) == [Candidate("fp32", True)]


def test_the_choice_follows_the_measurement_and_a_single_candidate_is_not_timed():
    seconds = {Candidate("bf16", True): 0.9, Candidate("bf16", False): 1.1, Candidate("fp32", True): 0.7}
    seconds[Candidate("fp32", False)] = 0.8
    measured = fastest(list(seconds), seconds.__getitem__)
    assert measured.chosen == Candidate("fp32", True) and measured.seconds == seconds
    assert "fp32 channels_last 0.7 s a step (measured; bf16 channels_last 0.9 s" in measured.describe()

    def never(candidate):
        raise AssertionError("timed although nothing was left to choose")

    assert fastest([Candidate("bf16", False)], never).seconds == {}


def fake_fastest():
    """model_setup.fastest with a made-up step time per candidate: NCHW faster than channels_last, fp32 than bf16."""

    def seconds(candidate: Candidate) -> float:
        return (2.0 if candidate.channels_last else 1.0) + (0.5 if candidate.precision == "bf16" else 0.0)

    return lambda choices, _: tuning.fastest(choices, seconds)


@pytest.mark.parametrize("flags, chosen", [([], "cpu, fp32, NCHW"), (["--channels-last"], "cpu, fp32, channels_last")])
def test_training_runs_in_the_measured_choice_and_a_typed_flag_wins(flags, chosen, tiny_demo, tmp_path, monkeypatch):
    monkeypatch.setattr(model_setup, "fastest", fake_fastest())
    monkeypatch.setattr(tuning, "native_bf16", lambda device: True)  # both precisions open on any CPU
    run = tmp_path / "run"
    result = run_in_process(
        train.main, "--data-root", tiny_demo, "--epochs", "1", "--run-dir", run, *TINY_TRAIN_FLAGS, *flags
    )
    assert result.returncode == 0, result.stderr
    assert chosen in result.stdout  # the start-up line's runtime
    startup = next(line for line in result.stdout.splitlines() if line.startswith("start-up chose:"))
    if flags:
        assert "NCHW" not in startup.split("(measured")[0]  # only precisions were timed: the flag fixed the layout
    else:
        assert "fp32 NCHW 1 s a training step (measured; " in startup and "fp32 channels_last 2 s" in startup
    assert "a training step (measured" in (run / "config.yaml").read_text()  # the same words as config comments

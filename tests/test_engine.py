"""The training recipe's parts against PyTorch's own schedulers and plain arithmetic: learning-rate schedules,
weight-decay groups, gradient accumulation, clipping, the EMA."""

import pytest
import torch

from engine import train_step
from model import ResidualAttnUNet
from optimizer import UpdateRule, build_optimizer, ema_model, scheduled_lr
from utils import Runtime

CPU = Runtime(torch.device("cpu"))


def torch_schedule(epochs, warmup, schedule, steps_per_epoch=1, base=0.1):
    """The learning rate of each step from torch.optim.lr_scheduler, stepped once per step."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    lr_scheduler = torch.optim.lr_scheduler
    decay_steps, warmup_steps = (epochs - warmup) * steps_per_epoch, warmup * steps_per_epoch
    decay = (
        lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps)
        if schedule == "cosine"
        else lr_scheduler.PolynomialLR(optimizer, total_iters=decay_steps, power=0.9)
    )
    if warmup:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1, total_iters=warmup_steps)
        decay = lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup_steps])
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        decay.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
@pytest.mark.parametrize(("epochs", "warmup"), [(10, 0), (10, 3), (7, 1)])
@pytest.mark.parametrize("steps_per_epoch", [1, 5])
def test_schedules_equal_torch_schedulers_stepped_every_step(epochs, warmup, schedule, steps_per_epoch):
    steps = range(epochs * steps_per_epoch)
    kind = dict(base=0.1, epochs=epochs, warmup=warmup, schedule=schedule)
    ours = [scheduled_lr(step / steps_per_epoch, **kind) for step in steps]
    expected = torch_schedule(epochs, warmup, schedule, steps_per_epoch)
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_a_fractional_horizon_ends_the_schedule_partway_through_an_epoch():
    """A time budget that fits 2.5 epochs: the cosine over 2.5 epochs of 4 steps is CosineAnnealingLR over 10
    steps, and a step past the horizon stays at its end rather than rising again."""
    ours = [scheduled_lr(step / 4, base=0.1, epochs=2.5) for step in range(10)]
    assert ours == pytest.approx(torch_schedule(10, 0, "cosine"), rel=1e-9, abs=1e-12)
    assert scheduled_lr(2.75, base=0.1, epochs=2.5) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_reaches_convolution_weights_only():
    model = ResidualAttnUNet(3, 2, (4, 8))
    optimizer = build_optimizer(model, 1e-3, torch.device("cpu"), name="adamw", weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.ndim == 4), name
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(build_optimizer(model, 1e-3, torch.device("cpu")).param_groups) == 1  # the reference recipe's


def test_sgd_is_nnunets_nesterov_momentum_and_steps_as_torchs_sgd_does():
    """Two steps of build_optimizer's sgd against torch.optim.SGD(momentum=0.99, nesterov=True) on a copy."""
    ours, reference = conv_model(), conv_model()
    optimizer = build_optimizer(ours, 1e-2, torch.device("cpu"), name="sgd", weight_decay=3e-5)
    convolutions = [p for p in reference.parameters() if p.ndim > 1]
    biases = [p for p in reference.parameters() if p.ndim <= 1]
    groups = [{"params": convolutions, "weight_decay": 3e-5}, {"params": biases, "weight_decay": 0.0}]
    expected = torch.optim.SGD(groups, lr=1e-2, momentum=0.99, nesterov=True)
    images, masks = batch()
    for model, opt in ((ours, optimizer), (reference, expected)):
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(images), masks).backward()
            opt.step()
    assert isinstance(optimizer, torch.optim.SGD)
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


def conv_model(seed=0):
    """No BatchNorm: batch statistics would make micro-batches differ from the whole batch."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(6, 3, 1))


def batch(seed=0, n=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 3, (n, 8, 8), generator=generator)


def step_parts(model, optimizer=None):
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-2)
    return dict(loss_fn=torch.nn.CrossEntropyLoss(), optimizer=optimizer, scaler=CPU.grad_scaler(), runtime=CPU)


def test_two_accumulated_halves_update_as_the_whole_batch():
    images, masks = batch()
    whole, halves = conv_model(), conv_model()
    train_step(whole, images, masks, **step_parts(whole))
    parts, updates = step_parts(halves), UpdateRule(accumulate=2)
    train_step(halves, images[:2], masks[:2], **parts, updates=updates, update=False)
    train_step(halves, images[2:], masks[2:], **parts, updates=updates, update=True)
    for a, b in zip(whole.parameters(), halves.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in halves.parameters())  # cleared for the next group


def test_clipping_bounds_the_step_of_plain_sgd():
    model = conv_model()
    before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    parts = step_parts(model, torch.optim.SGD(model.parameters(), lr=1.0))
    train_step(model, *batch(), **parts, updates=UpdateRule(clip_grad=0.01))
    moved = torch.nn.utils.parameters_to_vector(model.parameters()) - before
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-4)


def test_the_ema_follows_the_weights_with_a_warming_decay():
    model = conv_model()
    ema = ema_model(model, decay=0.9)
    parts = step_parts(model)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(5):
        train_step(model, *batch(seed=n), **parts, updates=UpdateRule(ema=ema))
        decay = 0.0 if n == 0 else min(0.9, (1 + n) / (10 + n))  # the first update copies the weights
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    for averaged, reference in zip(ema.module.parameters(), expected, strict=True):
        torch.testing.assert_close(averaged, reference, rtol=1e-5, atol=1e-6)
    assert not torch.equal(next(ema.module.parameters()), next(model.parameters()))


def test_data_wait_counts_the_time_between_a_step_and_the_next_batch(monkeypatch):
    import engine

    wait = engine.DataWait(torch.device("cpu"), sync=True)
    wait.batch_arrived()  # the first batch (workers starting up) is not counted
    for event, now in (("step", 0.0), ("batch", 1.0), ("step", 3.0), ("batch", 4.0), ("step", 4.0)):
        monkeypatch.setattr(engine.time, "perf_counter", lambda now=now: now)
        wait.step_done() if event == "step" else wait.batch_arrived()
    assert (wait.waited, wait.elapsed) == (2.0, 4.0)  # waited 1 + 1 of the 4 s after the first step
    assert "50% of the time waiting for data with --workers 3" in wait.describe(3)
    assert "more --workers help only where cores sit idle" in wait.describe(3)  # the CPU's step fills its cores
    wait.device = torch.device("cuda")
    assert "add --workers if cores are free" in wait.describe(3)


def test_a_time_budget_counts_the_start_up_and_plans_again_at_the_pace_of_the_last_epochs(monkeypatch):
    import schedule

    budget = schedule.TimeBudget(seconds=100, started=1000.0)
    reserve = 100 * schedule.FINISH_RESERVE
    monkeypatch.setattr(schedule.time, "monotonic", lambda: 1012.0)  # start-up and the first epoch took 12 s
    assert budget.epochs_that_fit(1, 10.0) == 1 + int((100 - reserve - 12) // 10)
    monkeypatch.setattr(schedule.time, "monotonic", lambda: 1032.0)  # the second epoch took twice as long
    assert budget.epochs_that_fit(2, 20.0) == 2 + int((100 - reserve - 32) // 20)
    monkeypatch.setattr(schedule.time, "monotonic", lambda: 1042.0)  # fast again: the slower of the last two
    assert budget.epochs_that_fit(3, 10.0) == 3 + int((100 - reserve - 42) // 20)
    monkeypatch.setattr(schedule.time, "monotonic", lambda: 1150.0)  # an epoch overran the budget: stop here
    assert budget.epochs_that_fit(4, 108.0) == 4


def test_a_time_budget_plans_to_the_step_and_first_from_the_first_epochs_steps(monkeypatch):
    import schedule

    budget = schedule.TimeBudget(seconds=100, started=1000.0, steps_per_epoch=10, validation_steps=5)
    monkeypatch.setattr(schedule.time, "monotonic", lambda: 1010.0)  # start-up 6 s, then four steps of 1 s
    left = budget.finish - 1010.0 - 5  # the last validation (5 steps of 1 s until one is timed) is kept
    steps_that_fit = int(left / (10 + 5) * 10)  # epochs of 10 steps and a validation each
    assert budget.first_plan(4, step_seconds=1.0) == pytest.approx((4 + steps_that_fit) / 10)
    monkeypatch.setattr(schedule.time, "monotonic", lambda: 1080.0)  # after the fourth epoch
    budget.bookkeeping = 1.0
    left = budget.finish - 1080.0 - 3 - 1  # the timed validation of 3 s and the bookkeeping are kept
    assert budget.epochs_that_fit(4, 12.0, 3.0) == pytest.approx(4 + int(left / (12 + 3 + 1) * 10) / 10)
    assert budget.epochs_that_fit(4, 12.0, 3.0) % 1 != 0  # the last epoch planned in part

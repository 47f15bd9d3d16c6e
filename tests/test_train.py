import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import schedule
import train
from checkpoints import load_checkpoint
from conftest import ROOT, TINY_TRAIN_FLAGS, run_in_process, same_numerics


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_training_writes_checkpoints_events_and_figures(trained_run):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2
    assert state["mapping"]["names"] == ["background", "ellipse", "rectangle", "triangle", "star"]
    assert set(state["model_args"]) == {"in_channels", "num_classes", "widths", "dropout"}
    best = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    assert best["best_miou"] == max(h["miou"] for h in state["history"])
    miou = scalars(trained_run, "val/miou")
    assert sorted(miou) == [1, 2]
    assert miou[2] == pytest.approx(state["history"][1]["miou"], abs=1e-6)
    assert set(scalars(trained_run, "iou/star")) == {1, 2}
    for name in ("samples_epoch_002.png", "confusion_matrix_epoch_002.png"):
        with Image.open(trained_run / "samples" / name) as image:
            assert image.size[0] > 100
    with Image.open(trained_run / "curves.png") as image:
        image.verify()


def test_the_logged_val_miou_equals_a_fresh_evaluation_of_the_checkpoint(trained_run, tiny_demo):
    """The metric in the logs is what the saved weights score at each image's original size: the model on the
    resized image, its logits upsampled whole with F.interpolate (not band by band), compared with the mask."""
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    from dataset import SegmentationFolder
    from intensity import IMAGENET as normalize
    from labels import LabelMapping
    from metrics import ConfusionMatrix
    from model import ResidualAttnUNet
    from utils import autocast, resolve_precision

    state = load_checkpoint(trained_run / "checkpoints" / "last.pt")
    mapping = LabelMapping.from_dict(state["mapping"])
    val = SegmentationFolder(tiny_demo / "images/val", tiny_demo / "masks/val", None, mapping=mapping)
    model = ResidualAttnUNet(**state["model_args"])
    model.load_state_dict(state["model"])
    model.eval()
    matrix = ConfusionMatrix(val.num_classes)
    size = [state["args"]["image_size"]] * 2
    precision = resolve_precision(state["args"]["precision"], torch.device("cpu"))  # auto: bf16 only on bf16 CPUs
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        for i in range(len(val)):
            image, mask = val[i]
            assert image.shape[-2:] == mask.shape == (48, 48)  # the original size, not the training square
            x = normalize(TF.resize(image, size, antialias=True))[None]
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
            full = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
            matrix.update(full.argmax(1)[0], mask)
    assert matrix.compute()["miou"] == pytest.approx(state["history"][-1]["miou"], abs=1e-4)


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_with_the_scheduled_learning_rate(trained_run, tmp_path):
    run_dir = tmp_path / "resumed"
    assert (
        train.main(
            ["--resume", str(trained_run / "checkpoints" / "epoch_001.pt"), "--epochs", "2", "--run-dir", str(run_dir)]
        )
        == 0
    )
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    lr = scalars(run_dir, "lr")
    assert sorted(lr) == [2]  # epoch 1 is not trained again
    base = state["args"]["lr"]
    assert lr[2] == pytest.approx(base * (1 + math.cos(math.pi * 1 / 2)) / 2)


@pytest.mark.slow
def test_resume_auto_with_more_epochs_continues_the_same_run(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--data-root", str(tiny_demo), "--run-dir", str(run_dir), *TINY_TRAIN_FLAGS]
    assert train.main([*common, "--epochs", "1"]) == 0
    assert train.main([*common, "--epochs", "2", "--resume", "auto"]) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert sorted(scalars(run_dir, "val/miou")) == [1, 2]


def run_script(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], "--image-size: '0' is not a positive integer"),
        (["--widths", "64,,128"], "--widths: '64,,128' is not a comma-separated list"),
        (["--data-root", "/nonexistent/data"], "--data-root /nonexistent/data: no such folder"),
    ],
)
def test_user_mistakes_exit_2_with_one_line_and_no_traceback(flags, message):
    result = run_in_process(train.main, *flags, "--epochs", "1")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_existing_run_is_never_overwritten(trained_run):
    before = (trained_run / "checkpoints" / "last.pt").read_bytes()
    result = run_script("--run-dir", str(trained_run), "--epochs", "1")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (trained_run / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_compiled_training_says_what_its_first_step_cost_and_saves_plain_weights(tiny_demo, tmp_path, capsys):
    run_dir = tmp_path / "compiled"
    flags = ["--data-root", str(tiny_demo), "--epochs", "1", "--run-dir", str(run_dir), "--compile"]
    assert train.main([*flags, *TINY_TRAIN_FLAGS]) == 0
    assert "first step, torch.compile included:" in capsys.readouterr().out
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not any(name.startswith("_orig_mod") for name in state["model"])  # loads into an uncompiled model


def test_a_run_records_results_config_and_a_per_class_report(trained_run):
    import csv
    import json

    state = load_checkpoint(trained_run / "checkpoints" / "last.pt")
    with open(trained_run / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, record in zip(rows, state["history"], strict=True):
        for key in ("train_loss", "val_loss", "miou", "mdice", "pixel_acc", "lr"):
            assert float(row[key]) == pytest.approx(record[key], rel=1e-9)
        assert float(row["seconds"]) > 0 and float(row["images_per_s"]) > 0
    report = json.loads((trained_run / "report.json").read_text())
    matrix = torch.tensor(report["confusion_matrix"], dtype=torch.float64)
    tp, truth, predicted = matrix.diag(), matrix.sum(1), matrix.sum(0)
    with open(trained_run / "report.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["class"] for r in table] == state["mapping"]["names"]
    for k, row in enumerate(table):
        assert int(row["pixels"]) == truth[k]
        assert float(row["iou"]) == pytest.approx((tp[k] / (truth[k] + predicted[k] - tp[k])).item(), nan_ok=True)
        assert float(row["recall"]) == pytest.approx((tp[k] / truth[k]).item(), nan_ok=True)
        assert float(row["precision"]) == pytest.approx((tp[k] / predicted[k]).item(), nan_ok=True)
    assert report["miou"] == pytest.approx(state["best_miou"])  # the best epoch's matrix
    with Image.open(trained_run / "confusion_matrix.png") as image:
        image.verify()


def test_config_yaml_replays_the_run_and_typed_flags_override_it(trained_run, tmp_path):
    import yaml

    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["widths"] == [4, 8, 16, 32] and "run_dir" not in config
    run_dir = tmp_path / "replay"
    typed = ["--dist-timeout", "300"]  # typed over the file; (--epochs would change the schedule of every step)
    measured = load_checkpoint(trained_run / "checkpoints/epoch_001.pt")["args"]  # what start-up measured and ran
    assert (
        train.main(
            ["--config", str(trained_run / "config.yaml"), "--run-dir", str(run_dir), *typed, *same_numerics(measured)]
        )
        == 0
    )
    replayed = yaml.safe_load((run_dir / "config.yaml").read_text())
    numerics = {"precision": measured["precision"], "channels_last": measured["channels_last"]}
    assert replayed == {**config, "dist_timeout": 300, **numerics} and config["dist_timeout"] != 300
    first, again = (load_checkpoint(d / "checkpoints" / "epoch_001.pt") for d in (trained_run, run_dir))
    assert again["history"][0]["train_loss"] == pytest.approx(first["history"][0]["train_loss"], rel=1e-6)


def test_config_yaml_says_what_start_up_chose_and_why_above_the_values_it_chose(trained_run, tiny_demo, tmp_path):
    import yaml

    text = (trained_run / "config.yaml").read_text()
    notes = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    config = yaml.safe_load(text)
    assert notes[0] == "start-up chose:" and text.startswith("# start-up chose:\n")
    assert f"normalize {config['normalize']} (8-bit RGB photos)" in notes  # the tiny demo's PNGs are 8-bit RGB
    assert sum(note.startswith(("device ", "precision and layout ")) for note in notes) == 2  # layout: measured
    assert not any(note.startswith(("workers ", "val_every ", "in_channels ")) for note in notes)  # typed, default
    typed = ["--normalize", "imagenet", "--precision", "fp32", "--no-channels-last", "--device", "cpu"]
    run_dir = tmp_path / "typed"
    flags = ["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, *typed, "--epochs", "1", "--run-dir", str(run_dir)]
    assert train.main([*flags, "--in-channels", "auto"]) == 0
    text = (run_dir / "config.yaml").read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == ["# start-up chose:", "# in_channels 3 (the first training image's)"]  # the rest was typed
    assert yaml.safe_load(text)["in_channels"] == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch: 3\n", "unknown key 'epoch'"),
        ("epochs: many\n", "epochs: 'many' is not a positive integer"),
        ("compile: 1\n", "compile: 1 is not true or false"),
        ("optimizer: rmsprop\n", "optimizer: 'rmsprop' is not one of adam, adamw, sgd"),
        ("scale_range: 0.5\n", "scale_range: 0.5 is not what --scale-range takes"),
        ("- epochs\n", "expected flag names and values"),
        ("epochs: [1\n", "not a YAML file"),
    ],
)
def test_a_config_file_with_a_wrong_key_or_value_is_one_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = run_in_process(train.main, "--config", path, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert message in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


RECIPE_FLAGS = [
    *("--optimizer", "adamw", "--weight-decay", "0.05", "--warmup-epochs", "1", "--schedule", "poly"),
    *("--ema", "0.9", "--accumulate", "2", "--clip-grad", "0.5"),
]


def test_a_run_with_every_recipe_flag_resumes_to_the_weights_of_an_uninterrupted_one(tiny_demo, tmp_path, capsys):
    common = ["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, *RECIPE_FLAGS, "--epochs", "3", "--save-every", "1"]
    assert train.main([*common, "--run-dir", str(tmp_path / "whole")]) == 0
    printed = capsys.readouterr().out
    assert "batch 4 per step x 2 accumulated = 8 per update" in printed
    assert printed.count("of the time waiting for data with --workers 0") == 1  # the first epoch only
    resumed = tmp_path / "resumed"
    first = str(tmp_path / "whole/checkpoints/epoch_001.pt")
    assert train.main(["--resume", first, "--run-dir", str(resumed)]) == 0
    whole, again = (load_checkpoint(d / "checkpoints/last.pt") for d in (tmp_path / "whole", resumed))
    for key in ("model", "ema"):
        for name, tensor in whole[key].items():
            torch.testing.assert_close(again[key][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    assert again["ema_updates"] == whole["ema_updates"] == 3 * (24 // 4) // 2
    # poly after one warmup epoch, from an independent formula; the resumed run's csv holds each epoch once
    lrs = [float(line.split(",")[6]) for line in (resumed / "results.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([3e-3 / 2, 3e-3, 3e-3 * (1 - 1 / 2) ** 0.9])
    # the checkpoint's average is what inference uses unless told otherwise
    from predictor import Predictor
    from utils import Runtime

    runtime = Runtime(torch.device("cpu"))
    averaged = Predictor.from_checkpoint(resumed / "checkpoints/last.pt", runtime)
    trained = Predictor.from_checkpoint(resumed / "checkpoints/last.pt", runtime, ema=False)
    weight = "encoders.0.conv2.weight"
    assert not torch.equal(averaged.network.state_dict()[weight], trained.network.state_dict()[weight])


def test_a_time_budget_plans_the_epochs_and_a_resume_keeps_them(tiny_demo, tmp_path, monkeypatch):
    import yaml

    from optimizer import scheduled_lr
    from schedule import TimeBudget

    monkeypatch.setattr(TimeBudget, "epochs_that_fit", lambda self, done, *timings: 3)
    whole = tmp_path / "whole"
    flags = ["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, "--time-budget", "0.5", "--save-every", "1"]
    assert train.main([*flags, "--run-dir", str(whole)]) == 0
    last = load_checkpoint(whole / "checkpoints/last.pt")
    assert last["epoch"] == 3 and last["args"]["epochs"] == 3 and last["args"]["time_budget"] == 0.5
    cosine_over_3 = [scheduled_lr(done, base=3e-3, epochs=3) for done in (0, 1, 2)]  # each epoch's first step
    assert [h["lr"] for h in last["history"]] == pytest.approx(cosine_over_3)
    assert "epochs" not in yaml.safe_load((whole / "config.yaml").read_text())  # a replay fits its own epochs
    assert "\n# epochs as many as fit in 0.5 min, to the step" in (whole / "config.yaml").read_text()
    monkeypatch.setattr(TimeBudget, "epochs_that_fit", lambda self, done, *timings: 8)
    resumed = tmp_path / "resumed"
    assert train.main(["--resume", str(whole / "checkpoints/epoch_001.pt"), "--run-dir", str(resumed)]) == 0
    again = load_checkpoint(resumed / "checkpoints/last.pt")
    assert again["epoch"] == 3 and [h["lr"] for h in again["history"]] == pytest.approx(cosine_over_3)
    for flags in (["--time-budget", "2"], ["--preset", "reference"]):  # typed on a resume: a clear no
        result = run_in_process(train.main, "--resume", whole / "checkpoints/last.pt", *flags)
        assert result.returncode == 2 and f"{flags[0]} sets up a new run" in result.stderr


def test_epochs_and_a_time_budget_together_are_one_line(tiny_demo, tmp_path):
    result = run_in_process(train.main, "--data-root", tiny_demo, "--epochs", "3", "--time-budget", "1")
    assert result.returncode == 2 and "--epochs and --time-budget: give one" in result.stderr


def test_the_reference_preset_sets_the_reference_recipe_beneath_typed_flags(tiny_demo):
    from config import parse_args
    from presets import PRESETS

    settings, _ = parse_args(["--data-root", str(tiny_demo), "--preset", "reference", "--epochs", "2"])
    samples, optim = settings.samples, settings.optim
    assert samples.crop_size == 0 and samples.image_size == 256 and optim.loss == "ce" and samples.batch_size == 8
    assert settings.model.widths == (64, 128, 256, 512) and optim.lr == 1e-4 and optim.schedule == "cosine"
    assert optim.epochs == 2  # typed
    default, _ = parse_args(["--data-root", str(tiny_demo)])
    differs = [name for name, value in PRESETS["reference"].items() if default.flags()[name] != value]
    assert differs  # the preset is not today's defaults under another name


def test_crop_size_0_trains_on_whole_squashed_images_as_the_reference_design(tiny_demo, tmp_path):
    from config import parse_args
    from sampling import Sampling

    default, _ = parse_args(["--data-root", str(tiny_demo)])
    whole, _ = parse_args(["--data-root", str(tiny_demo), "--crop-size", "0"])
    assert Sampling.from_training_flags(default.flags()).mode == "slide"
    assert Sampling.from_training_flags(whole.flags()).mode == "resize"
    result = run_in_process(train.main, "--data-root", tiny_demo, "--scale-range", "1", "2", "--crop-size", "0")
    assert result.returncode == 2 and "--scale-range applies to --crop-size training only" in result.stderr


def test_a_batch_larger_than_an_epoch_is_one_line(tiny_demo, tmp_path):
    flags = ["--data-root", tiny_demo, *TINY_TRAIN_FLAGS, "--batch-size", "30", "--run-dir", tmp_path / "run"]
    result = run_in_process(train.main, *flags)
    assert result.returncode == 2 and "--batch-size 30 is larger than an epoch's 24 images" in result.stderr
    assert run_in_process(train.main, *flags, "--min-epoch-samples", "60", "--epochs", "1").returncode == 0


def test_a_time_budget_holds_when_later_epochs_run_slower(tiny_demo, tmp_path, monkeypatch):
    """From the third epoch on, every epoch takes 4 s longer (on a clock the test moves, so nothing sleeps): the
    run plans again after each epoch, ends within the budget plus 3%, and its last epoch ends the schedule."""
    import time

    real_monotonic, slowed = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + slowed[0])
    real_epoch = train.train_one_epoch

    def slow_from_the_third(training, loader, *, pace, **kwargs):
        slowed[0] += 4.0 if pace.epoch >= 3 else 0.0
        return real_epoch(training, loader, pace=pace, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", slow_from_the_third)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    flags = ["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, "--time-budget", "0.75", "--run-dir", str(run_dir)]
    assert train.main(flags) == 0
    assert time.monotonic() - started <= 45 * 1.03
    last = load_checkpoint(run_dir / "checkpoints/last.pt")
    epochs = last["args"]["epochs"]
    assert last["epoch"] == epochs >= 4  # planned again after the slow epochs, not fixed from the first
    assert last["optimizer"]["param_groups"][0]["lr"] < 0.02 * 3e-3  # the last step's: the schedule reached its end


def train_with_10_s_steps(tiny_demo, run_dir, monkeypatch, *flags) -> float:
    """train.main with every training step taking 10 s on a clock the test moves (nothing sleeps); returns the
    run's seconds on that clock."""
    import time

    import engine

    real_monotonic, moved = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + moved[0])
    real_step = engine.train_step

    def slow_step(*args, **kwargs):
        moved[0] += 10.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", slow_step)
    started = time.monotonic()
    assert train.main(["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, "--run-dir", str(run_dir), *flags]) == 0
    return time.monotonic() - started


def test_a_time_budget_spends_what_is_left_on_part_of_an_epoch(tiny_demo, tmp_path, monkeypatch, capsys):
    """A 90 s budget fits one epoch of six 10 s steps and part of a second, which is planned to the step (first a
    few steps into the first epoch, so the cosine spans the run from its start) rather than left unused, and the
    schedule ends where the run does."""
    run_dir = tmp_path / "run"
    seconds = train_with_10_s_steps(tiny_demo, run_dir, monkeypatch, "--time-budget", "1.5", "--save-every", "1")
    assert seconds <= 90 * 1.03
    last = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert last["epoch"] == last["args"]["epochs"] == 2 and last["history"][-1]["validated"] == 1
    first = load_checkpoint(run_dir / "checkpoints/epoch_001.pt")
    assert first["optimizer"]["param_groups"][0]["lr"] < 0.5 * 3e-3  # the first plan's cosine, not 50 epochs'
    # the last step's rate, at the schedule's end or a step before it (the clock's cut times this epoch's steps,
    # which may end a plan that fits by a fraction of a step one step early): at 50 epochs' cosine it is ~3e-3
    assert last["optimizer"]["param_groups"][0]["lr"] < 0.2 * 3e-3
    assert "epoch 2 cut short, the last" in capsys.readouterr().out


def test_a_time_budget_cuts_an_epoch_longer_than_the_whole_budget(tiny_demo, tmp_path, monkeypatch, capsys):
    """The first epoch's six 10 s steps would overrun the 45 s budget, so the epoch is cut after the last step
    that leaves room for one more and the validation."""
    run_dir = tmp_path / "run"
    seconds = train_with_10_s_steps(tiny_demo, run_dir, monkeypatch, "--time-budget", "0.75")
    # two or three steps (with the start-up's real seconds): one more and the validation would pass the budget
    assert 20 <= seconds <= 45 * 1.03
    last = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert last["epoch"] == last["args"]["epochs"] == 1 and last["history"][-1]["validated"] == 1
    assert "epoch 1 cut short, the last" in capsys.readouterr().out


def test_val_every_validates_every_nth_and_the_last_epoch_and_chooses_best_among_them(tiny_demo, tmp_path):
    import csv

    run_dir = tmp_path / "run"
    flags = ["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, "--epochs", "5", "--val-every", "2"]
    assert train.main([*flags, "--run-dir", str(run_dir), "--save-every", "1"]) == 0
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [row["validated"] for row in rows] == ["0", "1", "0", "1", "1"]
    assert rows[0]["miou"] == "" and rows[1]["miou"] != ""  # an epoch not validated has no scores
    best = load_checkpoint(run_dir / "checkpoints/best.pt")
    assert best["epoch"] in (2, 4, 5)
    assert best["best_miou"] == max(float(row["miou"]) for row in rows if row["validated"] == "1")
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        f"{kind}_epoch_{e:03d}.png" for kind in ("confusion_matrix", "samples") for e in (2, 4, 5)
    ]  # figures only where there was a validation
    resumed = tmp_path / "resumed"
    assert train.main(["--resume", str(run_dir / "checkpoints/epoch_003.pt"), "--run-dir", str(resumed)]) == 0
    again = list(csv.DictReader((resumed / "results.csv").open()))
    assert [row["validated"] for row in again] == ["0", "1", "0", "1", "1"]


def test_val_every_auto_is_chosen_after_the_first_validation_and_kept_on_resume(
    tiny_demo, tmp_path, monkeypatch, capsys
):
    chosen = []
    monkeypatch.setattr(schedule, "validation_interval", lambda t, v: chosen.append((t, v)) or 3)
    run_dir = tmp_path / "run"
    flags = ["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, "--epochs", "4", "--save-every", "1", "--val-every"]
    assert train.main([*flags, "auto", "--run-dir", str(run_dir)]) == 0
    assert len(chosen) == 1 and chosen[0][1] > 0  # once, from the first validation's measured cost
    assert "--val-every auto: every 3 epochs" in capsys.readouterr().out
    history = load_checkpoint(run_dir / "checkpoints/last.pt")["history"]
    assert [h["validated"] for h in history] == [1, 0, 1, 1]  # the first, every third, the last
    assert load_checkpoint(run_dir / "checkpoints/epoch_001.pt")["args"]["val_every"] == 3  # what resume reads


def test_the_automatic_validation_interval_keeps_validation_to_a_tenth():
    from schedule import VALIDATION_SHARE, validation_interval

    assert validation_interval(train_seconds=10.0, validation_seconds=1.0) == 1  # cheap: every epoch
    assert validation_interval(train_seconds=10.0, validation_seconds=1.2) == 2
    every = validation_interval(train_seconds=825.0, validation_seconds=870.0)  # the reference design's split
    assert every == 10 and 870 / (every * 825 + 870) <= VALIDATION_SHARE
    assert 870 / ((every - 1) * 825 + 870) > VALIDATION_SHARE  # the smallest interval that does it


def test_val_every_auto_validates_every_epoch_until_its_first_validation_chooses_the_interval():
    """The plan carries an interval from the start (1 while auto waits) and the fact that it is still to be chosen;
    the first validation's cost chooses it once: 0.9 / 0.1 x 2.5 s / 10 s = 2.25, so every 3 epochs."""
    from types import SimpleNamespace

    from schedule import Plan, next_plan

    one_rank = SimpleNamespace(ddp=SimpleNamespace(broadcast=lambda value: value))
    plan = Plan.start(6, "auto")
    assert (plan.val_every, plan.interval_pending) == (1, True)
    assert all(plan.validates(epoch) for epoch in range(1, 7))
    chosen, said = next_plan(plan, None, 1, 10.0, 2.5, runtime=one_rank)
    assert chosen == Plan(6.0, 3) and said[0].startswith("--val-every auto: every 3 epochs")
    assert [epoch for epoch in range(1, 7) if chosen.validates(epoch)] == [3, 6]
    assert next_plan(chosen, None, 2, 10.0, None, runtime=one_rank) == (chosen, [])  # chosen once
    assert Plan.start(6, 2) == Plan(6.0, 2)


def test_early_stopping_counts_validations(tiny_demo, tmp_path, monkeypatch):
    """The first validation is the best, none after it improves: with --early-stop 2 the run stops at the second
    validation after it, whatever the epochs between."""
    from stopping import EarlyStopping

    def first_is_best(self, miou):
        improved = self.best < 0
        self.best = miou if improved else self.best
        self.epochs_without_gain = 0 if improved else self.epochs_without_gain + 1
        return improved

    monkeypatch.setattr(EarlyStopping, "update", first_is_best)
    run_dir = tmp_path / "run"
    flags = ["--data-root", str(tiny_demo), *TINY_TRAIN_FLAGS, "--epochs", "20", "--val-every", "3"]
    assert train.main([*flags, "--early-stop", "2", "--run-dir", str(run_dir)]) == 0
    history = load_checkpoint(run_dir / "checkpoints/last.pt")["history"]
    assert [h["epoch"] for h in history if h["validated"]] == [3, 6, 9] and history[-1]["epoch"] == 9

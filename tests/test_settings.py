"""train.py's settings: every flag has exactly one home, the parts are frozen, and what a run records beside
them is what it discovered, not what was asked for."""

import dataclasses

import pytest
import yaml

import train
from conftest import TINY_TRAIN_FLAGS
from settings import PARTS, TrainSettings
from train_flags import get_args_parser


def test_every_train_flag_has_one_field_in_one_settings_part():
    dests = {a.dest for a in get_args_parser()._actions if a.option_strings and a.dest != "help"}
    fields = [f.name for part in PARTS.values() for f in dataclasses.fields(part)]
    assert len(fields) == len(set(fields))  # no field in two parts
    assert set(fields) - dests == {"demo"}  # the one setting resolved from the others, not typed


def test_the_settings_are_frozen(tiny_demo):
    from config import parse_args

    settings, _ = parse_args(["--data-root", str(tiny_demo)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.optim.epochs = 3
    assert TrainSettings.from_flags(settings.flags()) == settings


def test_a_run_records_the_channels_normalisation_and_epochs_it_found(tiny_demo, tmp_path):
    """--in-channels auto and --normalize auto are recorded as found; the settings passed in stay as typed."""
    seen = []
    real_fit = train.fit

    def spy(*args, settings, **kwargs):
        seen.append(settings)
        return real_fit(*args, settings=settings, **kwargs)

    run_dir = tmp_path / "run"
    flags = ["--data-root", str(tiny_demo), "--epochs", "1", "--run-dir", str(run_dir), "--in-channels", "auto"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "fit", spy)
        assert train.main([*flags, *TINY_TRAIN_FLAGS]) == 0
    assert seen[0].data.in_channels == "auto" and seen[0].data.normalize == "auto"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["in_channels"] == 3 and recorded["normalize"] == "imagenet"  # the demo's JPEGs: 8-bit RGB
    from checkpoints import load_checkpoint

    saved = load_checkpoint(run_dir / "checkpoints/last.pt")["args"]
    assert saved["in_channels"] == 3 and saved["normalize"] == "imagenet" and saved["epochs"] == 1

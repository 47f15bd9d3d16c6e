"""peers/compare.py: the table it prints and the commands it runs for this repo (the peers need their own venvs)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("compare", ROOT / "peers/compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_the_table_has_each_methods_mean_and_spread_per_set_and_budget():
    rows = [
        {"method": "ours", "set": "phc", "minutes": "5", "foreground_iou": value} for value in ("0.80", "0.86", "0.83")
    ] + [{"method": "smp", "set": "phc", "minutes": "5", "foreground_iou": "0.7"}]
    lines = compare.table(rows).splitlines()
    assert lines[2] == "| phc | 5 | ours | 3 | 0.830 | 0.800 - 0.860 |"
    assert lines[3] == "| phc | 5 | smp | 1 | 0.700 | 0.700 - 0.700 |"


def test_ours_is_scored_on_last_pt_never_a_checkpoint_chosen_on_the_validation_images(tmp_path):
    train, infer = compare.ours(Path("data/real/phc"), tmp_path / "pred", 2, 5.0, ["--lr", "1e-3"])
    assert train[1] == "train.py" and train[train.index("--seed") + 1] == 2 and train[-2:] == ["--lr", "1e-3"]
    assert infer[infer.index("--checkpoint") + 1].name == "last.pt"

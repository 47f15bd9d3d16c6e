"""peers/compare.py: the table it prints and the commands it runs for this repo (the peers need their own venvs)."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

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


def test_a_run_that_did_not_finish_is_reported_as_such_never_as_a_score_of_0():
    rows = [{"method": "pytorch-unet", "set": "phc", "minutes": "5", "foreground_iou": ""} for _ in range(3)]
    rows += [{"method": "pytorch-unet", "set": "gravel", "minutes": "5", "foreground_iou": v} for v in ("0.5", "")]
    lines = compare.table(rows).splitlines()
    assert lines[2] == "| gravel | 5 | pytorch-unet | 1 (1 did not finish) | 0.500 | 0.500 - 0.500 |"
    assert lines[3] == "| phc | 5 | pytorch-unet | 3 | did not finish | |"


def test_the_instance_table_has_ap50_mean_and_spread_per_method():
    spec = importlib.util.spec_from_file_location("compare_instances", ROOT / "peers/compare_instances.py")
    instances = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(instances)
    rows = [
        {"method": "ours", "set": "gravel", "minutes": "5", "ap50": a, "ap50_95": "0.3", "pq": "0.4"}
        for a in ("0.5", "0.7")
    ]
    assert instances.table(rows).splitlines()[2] == "| gravel | 5 | ours | 2 | 0.600 | 0.500 - 0.700 | 0.300 | 0.400 |"


def test_the_ceilings_split_touching_objects_only_through_a_separation_map(tmp_path):
    """Two touching squares (10x10 and 10x6): components make them one blob, matched to the larger square only
    (IoU 100/160), so AP50 is 1 / (1 + 0 + 1); either perfect map gives both objects back."""
    spec = importlib.util.spec_from_file_location("compare_instances", ROOT / "peers/compare_instances.py")
    instances = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(instances)
    ids = np.zeros((16, 24), np.uint16)
    ids[3:13, 2:12], ids[3:13, 12:18] = 1, 2
    for split in ("train", "val"):
        (tmp_path / "masks_instance" / split).mkdir(parents=True)
        Image.fromarray(ids).save(tmp_path / "masks_instance" / split / "a.png")
    row = instances.ceilings([tmp_path]).splitlines()[2]
    assert row == f"| {tmp_path.name} | 2 | 0.500 (1 objects) | 1.000 (2 objects) | 1.000 (2 objects) |"


def test_a_lead_is_claimed_only_where_the_paired_interval_excludes_zero():
    """ours finds both images' object, components neither (+1 on each image: a lead); stardist finds the first only
    (+0 and +1: the interval reaches 0, so even)."""
    spec = importlib.util.spec_from_file_location("compare_instances", ROOT / "peers/compare_instances.py")
    instances = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(instances)
    found = {"ours": ("a", "b"), "components": (), "stardist": ("a",)}
    rows = [
        {"method": method, "set": "set", "seed": "0", "minutes": "5.0", "image": name, "ap50": float(name in names)}
        for method, names in found.items()
        for name in ("a", "b")
    ]
    lines = instances.paired_intervals(rows).splitlines()[2:]
    assert lines[0] == "| set | 5 | components: +1.000 (2 images x seeds) | +1.000 to +1.000 | ours |"
    assert lines[1].startswith("| set | 5 | stardist: +0.500 (2 images x seeds) | +0.000 to +1.000 | even |")

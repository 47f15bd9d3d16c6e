"""peers/compare.py: the protocol (tuning split, search, freeze), the table it prints and the commands it runs for
this repo (the peers need their own venvs)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"peers/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load("compare")
peer_common = sys.modules["peer_common"]  # compare.py put peers/ on the path and imported it
compare_instances = load("compare_instances")


def test_the_table_has_each_methods_mean_and_spread_per_split_set_and_settings():
    rows = [
        {"method": "ours", "split": "report", "set": "phc", "minutes": "5", "settings": "{}", "foreground_iou": v}
        for v in ("0.80", "0.86", "0.83")
    ]
    rows += [{"method": "smp", "set": "phc", "minutes": "5", "settings": '{"batch": 4}', "foreground_iou": "0.7"}]
    lines = compare.table(rows).splitlines()
    assert lines[2] == "| report | phc | 5 | ours | its defaults | 3 | 0.830 | 0.800 - 0.860 |"
    assert lines[3] == "| report | phc | 5 | smp | batch 4 | 1 | 0.700 | 0.700 - 0.700 |"  # older rows: report


def test_ours_runs_in_fp32_with_its_settings_and_is_scored_on_last_pt(tmp_path):
    train, infer = compare.ours(Path("data/real/phc"), tmp_path / "pred", 2, 5.0, {"batch": 8, "lr": 3e-3})
    assert train[1] == "train.py" and train[train.index("--seed") + 1] == 2
    assert train[train.index("--batch-size") + 1] == 8 and train[train.index("--lr") + 1] == 3e-3
    assert train[train.index("--precision") + 1] == "fp32" and infer[infer.index("--precision") + 1] == "fp32"
    assert infer[infer.index("--checkpoint") + 1].name == "last.pt"
    defaults, _ = compare.ours(Path("data/real/phc"), tmp_path / "pred", 0, 5.0, {})
    assert "--batch-size" not in defaults and "--lr" not in defaults


def test_a_run_that_did_not_finish_is_reported_as_such_never_as_a_score_of_0():
    rows = [{"method": "pytorch-unet", "set": "phc", "minutes": "5", "foreground_iou": ""} for _ in range(3)]
    rows += [{"method": "pytorch-unet", "set": "gravel", "minutes": "5", "foreground_iou": v} for v in ("0.5", "")]
    lines = compare.table(rows).splitlines()
    assert (
        lines[2]
        == "| report | gravel | 5 | pytorch-unet | its defaults | 1 (1 did not finish) | 0.500 | 0.500 - 0.500 |"
    )
    assert lines[3] == "| report | phc | 5 | pytorch-unet | its defaults | 3 | did not finish | |"


def test_the_tuning_split_halves_the_training_images_and_never_holds_a_report_image(tmp_path):
    data = tmp_path / "set"
    for split, stems in (("train", "abcde"), ("val", "vw")):
        for folder, suffix in (("images", ".jpg"), ("masks", ".png"), ("masks_instance", ".png")):
            (data / folder / split).mkdir(parents=True, exist_ok=True)
            for stem in stems:
                (data / folder / split / f"{stem}{suffix}").write_text(folder + stem)
    (data / "masks/train/classes.json").write_text('{"0": "background", "1": "cell"}')
    view = peer_common.tuning_view(data, tmp_path / "views")
    assert view == tmp_path / "views/set"
    assert (view / "masks/train/classes.json").read_text() == '{"0": "background", "1": "cell"}'
    for folder, suffix in (("images", ".jpg"), ("masks", ".png"), ("masks_instance", ".png")):
        found = sorted(p.name for p in (view / folder / "train").iterdir() if p.suffix != ".json")
        assert found == [f"{s}{suffix}" for s in "abc"]
        assert sorted(p.name for p in (view / folder / "val").iterdir()) == [f"{s}{suffix}" for s in "de"]
        assert (view / folder / "val" / f"d{suffix}").read_text() == folder + "d"  # the set's own file, linked
    assert peer_common.tuning_view(data, tmp_path / "views") == view  # again: the same view, no error


def test_freeze_takes_each_methods_best_tuning_mean_and_counts_a_run_without_a_model_as_0(tmp_path):
    def row(method, settings, value, split="tune"):
        return {"method": method, "settings": json.dumps(settings), "split": split, "foreground_iou": value}

    rows = [row("smp", {"lr": 1e-3}, v) for v in ("0.70", "0.74")] + [row("smp", {"lr": 3e-3}, v) for v in ("0.9", "")]
    rows += [row("ours", {"batch": 4}, "0.8"), row("ours", {"batch": 8}, "0.99", split="report")]  # report: never
    frozen = compare.freeze(rows, tmp_path)["methods"]
    assert frozen["smp"]["settings"] == {"lr": 1e-3} and frozen["smp"]["tuning_mean"] == 0.72
    assert frozen["smp"]["searched"] == {"lr 0.001": 0.72, "lr 0.003": 0.45}
    assert frozen["ours"]["settings"] == {"batch": 4} and list(frozen["ours"]["searched"]) == ["batch 4"]


def test_a_search_on_the_images_that_report_is_refused():
    command = [sys.executable, str(ROOT / "peers/compare.py"), "--search", "--sets", "data/real/phc"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and "--split tune only" in result.stderr


def test_every_method_has_a_search_grid_and_each_searched_one_a_frozen_setting():
    frozen = json.loads((ROOT / "peers/frozen.json").read_text())["methods"]
    searched = {method for method, grid in compare.SEARCH.items() if grid != [{}]}
    assert set(compare.SEARCH) == set(compare.METHODS) and searched <= set(frozen) <= set(compare.METHODS)
    assert all(isinstance(frozen[method]["settings"], dict) for method in frozen)


def test_nnunet_plans_for_the_memory_searched_and_its_default_row_runs_as_it_ships(tmp_path):
    sized = compare.nnunet(Path("data/real/phc"), tmp_path / "pred", 0, 5.0, {"memory": 2})
    default = compare.nnunet(
        Path("data/real/phc"), tmp_path / "pred", 0, 5.0, compare.frozen_settings("nnunet-default")
    )
    assert sized[0][2:] == [Path("data/real/phc"), tmp_path / "pred/masks", 300.0, 2]
    assert default[0][2:] == [Path("data/real/phc"), tmp_path / "pred/masks", 300.0]


def test_a_methods_commands_run_in_turn_and_the_last_json_line_is_what_it_says_of_itself(tmp_path):
    said = "import json; print('training'); print(json.dumps({'steps': %d}))"
    commands = [[sys.executable, "-c", said % 3], [sys.executable, "-c", said % 7], [sys.executable, "-c", "1"]]
    assert peer_common.run_commands(commands, {"PATH": ""}) == {"steps": 7}
    quiet = [[sys.executable, "-c", said % 3], [sys.executable, "-c", "print('predicted')"]]
    assert peer_common.run_commands(quiet, {"PATH": ""}) == {"steps": 3}
    failing = [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", said % 1]]
    try:
        peer_common.run_commands(failing, {"PATH": ""})
        raise AssertionError("a failing command was not raised")
    except subprocess.CalledProcessError as err:
        assert err.returncode == 3


PYTORCH_UNET_STAND_IN = {  # its train.py's shape: model and dataset made in __main__, a checkpoint only per epoch
    "unet/__init__.py": "import torch\nclass UNet(torch.nn.Conv2d):\n    def __init__(self):\n"
    "        super().__init__(3, 2, 1)\n",
    "utils/__init__.py": "",
    "utils/data_loading.py": "class BasicDataset:\n    def __init__(self):\n        self.mask_values = [0, 255]\n"
    "class CarvanaDataset(BasicDataset):\n    pass\n",
    "train.py": "import sys, time, torch\nfrom unet import UNet\nfrom utils.data_loading import BasicDataset\n"
    "if __name__ == '__main__':\n    model, dataset = UNet(), BasicDataset()\n"
    "    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-5)\n"
    "    for step in range(10**9):\n        model(torch.ones(1, 3, 4, 4)).sum().backward()\n"
    "        optimizer.step()\n        if step == 2:\n            print('stepping', flush=True)\n"
    "        time.sleep(0.01)\n",
}


def test_pytorch_unet_saves_the_model_as_it_stands_when_the_budget_ends(tmp_path):
    """The budget's end inside an epoch: the weights trained so far are saved in its checkpoints' layout."""
    for name, text in PYTORCH_UNET_STAND_IN.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    command = [sys.executable, str(ROOT / "peers/pytorch_unet_budget.py"), "2", "--epochs", "1000"]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert run.stdout.readline() == "stepping\n"
    said = json.loads(run.communicate(timeout=60)[0].strip().splitlines()[-1])
    state = torch.load(tmp_path / "checkpoints/checkpoint_budget_end.pth")
    assert run.returncode == 0 and said["steps"] >= 3 and state["mask_values"] == [0, 255]
    assert set(state) == {"weight", "bias", "mask_values"}


def test_ours_objects_run_in_fp32_like_the_peers_and_components_without_instances(tmp_path):
    for method, off in (("ours", False), ("components", True)):
        train, infer = compare_instances.METHODS[method](Path("data/real/phc"), tmp_path / "pred", 1, 5.0)
        assert train[train.index("--precision") + 1] == "fp32" and infer[infer.index("--precision") + 1] == "fp32"
        assert ("--instances" in train) == off and infer[infer.index("--checkpoint") + 1].name == "last.pt"


def test_the_instance_table_has_ap50_mean_and_spread_per_method():
    rows = [
        {"method": "ours", "set": "gravel", "minutes": "5", "ap50": a, "ap50_95": "0.3", "pq": "0.4"}
        for a in ("0.5", "0.7")
    ]
    row = compare_instances.table(rows).splitlines()[2]
    assert row == "| gravel | 5 | ours | 2 | 0.600 | 0.500 - 0.700 | 0.300 | 0.400 |"


def test_the_ceilings_split_touching_objects_only_through_a_separation_map(tmp_path):
    """Two touching squares (10x10 and 10x6): components make them one blob, matched to the larger square only
    (IoU 100/160), so AP50 is 1 / (1 + 0 + 1); either perfect map gives both objects back."""
    ids = np.zeros((16, 24), np.uint16)
    ids[3:13, 2:12], ids[3:13, 12:18] = 1, 2
    for split in ("train", "val"):
        (tmp_path / "masks_instance" / split).mkdir(parents=True)
        Image.fromarray(ids).save(tmp_path / "masks_instance" / split / "a.png")
    row = compare_instances.ceilings([tmp_path]).splitlines()[2]
    assert row == f"| {tmp_path.name} | 2 | 0.500 (1 objects) | 1.000 (2 objects) | 1.000 (2 objects) |"


def test_a_lead_is_claimed_only_where_the_paired_interval_excludes_zero():
    """ours finds both images' object, components neither (+1 on each image: a lead); stardist finds the first only
    (+0 and +1: the interval reaches 0, so even); a tuning row never enters a claim."""
    found = {"ours": ("a", "b"), "components": (), "stardist": ("a",)}
    rows = [
        {"method": method, "set": "set", "seed": "0", "minutes": "5.0", "image": name, "ap50": float(name in names)}
        for method, names in found.items()
        for name in ("a", "b")
    ]
    tuning = {"method": "cellpose", "split": "tune", "set": "set", "seed": "0", "minutes": "5.0", "image": "a"}
    lines = peer_common.paired_intervals([*rows, tuning | {"ap50": 0.0}], "ap50").splitlines()[2:]
    assert lines[0] == "| set | 5 | components: +1.000 (2 images x seeds) | +1.000 to +1.000 | ours |"
    assert lines[1].startswith("| set | 5 | stardist: +0.500 (2 images x seeds) | +0.000 to +1.000 | even |")
    assert len(lines) == 2


def test_the_methods_settings_run_in_turn_and_extra_flags_go_to_ours_only():
    found = compare.variants(["ours", "pytorch-unet"], True, ["--augment", "none"])
    assert found[:4] == [
        ("ours", {"batch": 4, "lr": 3e-4, "flags": ["--augment", "none"]}),
        ("pytorch-unet", {"scale": 0.5}),
        ("ours", {"batch": 4, "lr": 1e-3, "flags": ["--augment", "none"]}),
        ("pytorch-unet", {"scale": 0.25}),
    ]
    assert [method for method, _ in found[4:]] == ["ours"] * 4  # its grid is the longer
    assert compare.variants(["smp"], False, ["--lr", "1"]) == [("smp", compare.frozen_settings("smp"))]

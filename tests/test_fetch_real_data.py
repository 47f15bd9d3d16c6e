"""The copy in milesial/Pytorch-UNet's layout that the README's comparison trains that repo on."""

import numpy as np
from PIL import Image

from fetch_real_data import plain_unet_layout


def test_the_plain_unet_layout_holds_rgb_images_the_same_masks_and_the_validation_images(tmp_path):
    rng = np.random.default_rng(0)
    grey = {split: rng.integers(0, 255, (12, 10), dtype=np.uint8) for split in ("train", "val")}
    mask = (grey["train"] > 128).astype(np.uint8)
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            (tmp_path / "set" / kind / split).mkdir(parents=True)
        Image.fromarray(grey[split]).save(tmp_path / "set" / "images" / split / f"{split}1.png")
        Image.fromarray(mask).save(tmp_path / "set" / "masks" / split / f"{split}1.png")
    (tmp_path / "set" / "masks" / "train" / "classes.json").write_text("{}")
    plain_unet_layout(tmp_path / "set", tmp_path / "plain")
    image = Image.open(tmp_path / "plain" / "imgs" / "train1.png")
    assert image.mode == "RGB" and (np.asarray(image)[..., 1] == grey["train"]).all()
    assert (np.asarray(Image.open(tmp_path / "plain" / "masks" / "train1.png")) == mask).all()
    files = sorted(str(p.relative_to(tmp_path / "plain")) for p in (tmp_path / "plain").rglob("*.*"))
    assert files == ["imgs/train1.png", "masks/train1.png", "val/val1.png"]  # no classes.json


def test_cell_tracking_challenge_frames_pair_with_their_silver_truth_and_split_by_frame(tmp_path):
    import tifffile

    from fetch_real_data import convert

    files = []
    for frame in (0, 39, 40, 49):
        (tmp_path / "02").mkdir(exist_ok=True)
        (tmp_path / "02_ST/SEG").mkdir(parents=True, exist_ok=True)
        image, label = tmp_path / f"02/t{frame:03d}.tif", tmp_path / f"02_ST/SEG/man_seg{frame:03d}.tif"
        tifffile.imwrite(image, np.full((6, 8), frame, np.uint8))
        ids = np.zeros((6, 8), np.uint16)
        ids[1:3, 2:5] = 7 + frame  # any id > 0 is a cell
        tifffile.imwrite(label, ids)
        files += [image, label]
    assert convert(files, "phc", tmp_path / "out") == 4
    split = {p.stem: p.parent.name for p in (tmp_path / "out/phc/masks").rglob("t*.png")}
    assert split == {"t000": "train", "t039": "train", "t040": "val", "t049": "val"}
    mask = np.asarray(Image.open(tmp_path / "out/phc/masks/val/t049.png"))
    assert mask.sum() == 6 and mask[1, 2] == 1
    assert (np.asarray(Image.open(tmp_path / "out/phc/images/train/t039.png")) == 39).all()


def test_a_time_lapse_stack_gives_each_frame_with_its_labels_in_8_bits_split_by_frame(tmp_path):
    import tifffile

    from fetch_real_data import convert

    stack = np.stack([np.full((4, 5), 1000 + 100 * frame, np.uint16) for frame in range(6)])
    stack[5, 0, 0] = 3000  # the stack's range: 1000-3000
    ids = np.zeros((6, 4, 5), np.uint16)
    ids[:, 1:3, 1:4] = np.arange(1, 7, dtype=np.uint16)[:, None, None]  # one nucleus, its id the frame's
    tifffile.imwrite(tmp_path / "example_images.tif", stack)
    tifffile.imwrite(tmp_path / "example_label.tif", ids)
    assert convert([tmp_path / "example_images.tif", tmp_path / "example_label.tif"], "nuclei", tmp_path / "out") == 6
    split = {p.stem: p.parent.name for p in (tmp_path / "out/nuclei/masks").rglob("t*.png")}
    assert split == {**{f"t00{f}": "train" for f in range(4)}, "t004": "val", "t005": "val"}
    frame2 = np.asarray(Image.open(tmp_path / "out/nuclei/images/train/t002.png"))
    assert frame2.dtype == np.uint8 and (frame2 == round((1200 - 1000) / 2000 * 255)).all()
    assert (np.asarray(Image.open(tmp_path / "out/nuclei/masks_instance/val/t005.png"))[1:3, 1:4] == 6).all()
    assert np.asarray(Image.open(tmp_path / "out/nuclei/masks/val/t004.png")).sum() == 6

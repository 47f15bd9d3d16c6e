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

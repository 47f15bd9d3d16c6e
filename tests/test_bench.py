"""bench.py's generated inputs are what the product reads: its checkpoints load and segment like a run's."""

import numpy as np

from benchmarks.data import write_checkpoint, write_photo
from predictor import Predictor
from utils import Runtime


def test_the_bench_checkpoint_loads_and_segments_at_the_image_size(tmp_path):
    write_checkpoint(tmp_path / "m.pt", classes=3, widths=(4, 8), image_size=32)
    write_photo(tmp_path / "p.jpg", (50, 40), seed=0)
    predictor = Predictor.from_checkpoint(tmp_path / "m.pt", Runtime.from_flags("cpu", "fp32", False))
    labels = predictor.predict(tmp_path / "p.jpg")
    assert predictor.sampling.mode == "resize" and labels.shape == (40, 50) and set(np.unique(labels)) <= {0, 1, 2}

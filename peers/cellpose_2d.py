"""Peer: Cellpose 3.1.1.3 from random init (CellposeModel(pretrained_model=None)), trained by its own
train.train_seg with its defaults (AdamW 0.005, weight decay 1e-5, batch 8, 224 px patches, its rotate-and-resize
augmentation, rescaling to the training set's mean diameter) and its learning-rate schedule over as many epochs as fit
the wall-clock budget (counted from this script's start: a training step of its shape is timed first and the epochs
that fit are planned from it; should the epochs run slower, training stops at the budget with the weights it has),
then model.eval at the training set's diameter on the validation images, written as uint16 PNGs.

    /tmp/cellpose-venv/bin/python peers/cellpose_2d.py DATA OUT SECONDS [--seed N]

DATA/images/{train,val}/*.png and DATA/masks_instance/{train,val}/*.png (uint16 ids), as fetch_real_data.py writes.
Prints one JSON line: epochs, steps, threads, precision, training seconds.
"""

import argparse
import glob
import json
import math
import os
import random
import time

import numpy as np
from PIL import Image

t_start = time.time()
parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("out")
parser.add_argument("seconds", type=float)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

import torch  # noqa: E402
from cellpose import dynamics, models, train  # noqa: E402

random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)
PREDICT_RESERVE = 0.05  # of the budget, left for predicting the validation images
BATCH, PATCH = 8, 224  # train_seg's defaults: batch_size, bsize


def load(split: str):
    images, labels, names = [], [], []
    for path in sorted(glob.glob(f"{args.data}/images/{split}/*.png")):
        stem = os.path.splitext(os.path.basename(path))[0]
        images.append(np.asarray(Image.open(path).convert("L")).astype(np.float32))  # channels [0, 0]: grey
        labels.append(np.asarray(Image.open(f"{args.data}/masks_instance/{split}/{stem}.png")).astype(np.int32))
        names.append(stem)
    return images, labels, names


os.makedirs(args.out, exist_ok=True)
X, Y, _ = load("train")
Xv, _, names = load("val")
model = models.CellposeModel(gpu=False, pretrained_model=None)
flows = dynamics.labels_to_flows(Y, device=model.device)  # once: train_seg takes precomputed flows as they are
common = dict(train_data=X, train_labels=flows, channels=[0, 0], save_path=args.out, min_train_masks=1)
model = models.CellposeModel(gpu=False, pretrained_model=None)
probe = torch.randn(BATCH, model.nchan, PATCH, PATCH)
for _ in range(2):  # one untimed step of train_seg's shape, then one timed (forward, loss stand-in, backward)
    started = time.time()
    model.net(probe)[0].square().mean().backward()
model.net.zero_grad(set_to_none=True)
epoch_seconds = (time.time() - started) * math.ceil(len(X) / BATCH)
left = args.seconds * (1 - PREDICT_RESERVE) - (time.time() - t_start)
epochs = max(1, math.floor(left / epoch_seconds))


class OutOfTime(Exception):
    pass


get_batch = train._get_batch


steps = 0


def batch_within_budget(*args_, **kwargs):
    """train_seg's own batch reader, counting its steps and refusing once the budget is spent: the weights trained so
    far are kept."""
    global steps
    if time.time() - t_start > args.seconds * (1 - PREDICT_RESERVE):
        raise OutOfTime
    steps += 1
    return get_batch(*args_, **kwargs)


train._get_batch = batch_within_budget
try:
    train.train_seg(model.net, n_epochs=epochs, model_name="peer", **common)
except OutOfTime:
    print(f"cellpose: stopped at the budget within its {epochs} planned epochs")
trained = time.time() - t_start
os.makedirs(f"{args.out}/instances", exist_ok=True)
diameter = float(model.net.diam_labels.item())
for x, stem in zip(Xv, names, strict=True):
    masks = model.eval(x, channels=[0, 0], diameter=diameter)[0]
    Image.fromarray(masks.astype(np.uint16)).save(f"{args.out}/instances/{stem}.png")
print(
    json.dumps(
        {
            "epochs": epochs,
            "steps": steps,
            "threads": torch.get_num_threads(),
            "precision": "fp32",
            "train_s": round(trained),
        }
    )
)

"""Peer: Cellpose 3.1.1.3 from random init (CellposeModel(pretrained_model=None)), trained by its own
train.train_seg with its defaults (AdamW 0.005, weight decay 1e-5, batch 8, 224 px patches, its rotate-and-resize
augmentation, rescaling to the training set's mean diameter) and its learning-rate schedule, in epochs of one batch
(its nimg_per_epoch: the 10 warm-up epochs of its schedule then take 10 steps, not most of a short budget), until the
wall-clock budget (counted from this script's start, or compare_instances.py's PEER_DEADLINE) stops it with the
weights it has; then model.eval at the training set's diameter on the validation images (after the budget, as every
method predicts), written as uint16 PNGs.

    /tmp/cellpose-venv/bin/python peers/cellpose_2d.py DATA OUT SECONDS [--seed N]

DATA/images/{train,val}/*.png and DATA/masks_instance/{train,val}/*.png (uint16 ids), as fetch_real_data.py writes.
Prints one JSON line: epochs, steps, threads, precision, training seconds.
"""

import math
import random
import time

import numpy as np
from peer_common import load_split, peer_args, write_labels

t_start = time.time()
args = peer_args()

import torch  # noqa: E402
from cellpose import dynamics, models, train  # noqa: E402

random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)
BATCH, PATCH = 8, 224  # train_seg's defaults: batch_size, bsize
CONSTANT_UP_TO = 100  # train_seg's schedule over at most this many epochs: 10 of warm-up, then constant (no decay)


X, Y, _ = load_split(args.data, "train", "L")  # channels [0, 0]: grey
Xv, _, names = load_split(args.data, "val", "L")
model = models.CellposeModel(gpu=False, pretrained_model=None)
flows = dynamics.labels_to_flows(Y, device=model.device)  # once: train_seg takes precomputed flows as they are
common = dict(train_data=X, train_labels=flows, channels=[0, 0], save_path=args.out, min_train_masks=1)
probe = torch.randn(BATCH, model.nchan, PATCH, PATCH)
for _ in range(2):  # one untimed step of train_seg's shape, then one timed (forward, loss stand-in, backward)
    started = time.time()
    model.net(probe)[0].square().mean().backward()
model.net.zero_grad(set_to_none=True)
step_seconds = time.time() - started
left = args.seconds - (time.time() - t_start)
# Epochs of one batch (its nimg_per_epoch), so that its 10 warm-up epochs end after 10 steps instead of taking a
# short budget whole. Where fewer steps fit than CONSTANT_UP_TO, the schedule is the same prefix whatever n_epochs
# is, so the budget stops it (never early); where more fit, they are planned, for its decay to end the run.
epochs = max(CONSTANT_UP_TO, math.floor(left / step_seconds))
common["nimg_per_epoch"] = BATCH


class OutOfTime(Exception):
    pass


get_batch = train._get_batch
steps = 0


def batch_within_budget(*args_, **kwargs):
    """train_seg's own batch reader, counting its steps and refusing once the budget is spent: the weights trained so
    far are kept."""
    global steps
    if time.time() - t_start > args.seconds:
        raise OutOfTime
    steps += 1
    return get_batch(*args_, **kwargs)


train._get_batch = batch_within_budget
try:
    train.train_seg(model.net, n_epochs=epochs, model_name="peer", **common)
except OutOfTime:
    print(f"cellpose: stopped at the budget within its {epochs} planned epochs")
trained = time.time() - t_start
diameter = float(model.net.diam_labels.item())
predicted = [model.eval(x, channels=[0, 0], diameter=diameter)[0] for x in Xv]
summary = {"epochs": epochs, "steps": steps, "threads": torch.get_num_threads(), "precision": "fp32"}
write_labels(args.out, names, predicted, summary | {"train_s": round(trained)})
